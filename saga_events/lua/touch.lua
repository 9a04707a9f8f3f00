-- touch.lua: move the deadlines of unchanged instances (the registrar's touch path).
--
-- The registrar sends an announce here instead of apply.lua only when its own
-- view holds the instance's record with the event's incarnation, a seq at or
-- after the event's `since` (the seq of the agent's last content change), no
-- operator override and the event's content (saga_events/_touch.py says why
-- that is safe without reading the record or the order entry). So this
-- script neither reads nor writes the record's body, its order entry or the
-- tombstone: it only moves the deadline of a record that is still there.
--
-- KEYS[1]        deadlines  saga:{ns}:deadlines (zset record key -> deadline ms)
-- KEYS[1+i]      record key of event i (1-based)
-- ARGV[1]        backstop_min_ms
-- ARGV[2i], ARGV[2i+1]  event i: ttl_ms, seq
-- Reply: one integer per event: 1 refreshed (deadline moved to now + ttl);
--   0 absent: no deadline member (a leave or the reaper removed the record:
--   XX never re-adds it) or, when checked, no record (PTTL -2). The registrar
--   sends an absent event through apply.lua, which re-creates the record
--   after a reap or answers stale after a leave.
-- TIME is read once per call. On every 4th seq, as apply.lua does for an
-- unchanged heartbeat, the record's backstop PX is refreshed when less than
-- half of max(10 x ttl, backstop_min_ms) is left.
local call = redis.call
local t = call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local DL = KEYS[1]
local least_backstop = tonumber(ARGV[1])
local out = {}
for i = 2, #KEYS do
  local rkey = KEYS[i]
  local ttl = tonumber(ARGV[2 * i - 2])
  local ok = 1
  -- CH counts a moved score; 0 is also the answer for a score that did not
  -- change (two touches in one ms), so a 0 asks whether the member is there.
  if call('ZADD', DL, 'XX', 'CH', now + ttl, rkey) == 0 and not call('ZSCORE', DL, rkey) then
    ok = 0
  elseif tonumber(ARGV[2 * i - 1]) % 4 == 0 then
    local backstop = 10 * ttl
    if backstop < least_backstop then backstop = least_backstop end
    local left = call('PTTL', rkey)
    if left == -2 then
      ok = 0
    elseif left < backstop / 2 then
      call('PEXPIRE', rkey, string.format('%d', backstop))
    end
  end
  out[i - 1] = ok
end
return out
