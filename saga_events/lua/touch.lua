-- touch.lua: apply unchanged heartbeats without their bodies (the registrar's touch path).
--
-- The registrar sends an announce here instead of apply.lua only when its own
-- view holds the instance's record with the event's incarnation, a seq at or
-- after the event's `since` (the seq of the agent's last content change), no
-- operator override and the event's content (saga_events/_touch.py says why
-- the record then holds the event's content). So this script does what
-- apply.lua does for an unchanged heartbeat, without reading the record, the
-- tombstone or the override (apply.lua's MGET) and without the ~300-byte body:
-- the order entry decides (the tombstone is older than the entry of a record
-- that exists), the deadline moves, the entry moves up, the backstop is kept.
--
-- KEYS[1]        deadlines  saga:{ns}:deadlines (zset record key -> deadline ms)
-- KEYS[2]        order      saga:{ns}:order     (hash record key -> "inc:seq")
-- KEYS[2+i]      record key of event i (1-based)
-- ARGV[1]        backstop_min_ms
-- ARGV[3i-1], ARGV[3i], ARGV[3i+1]  event i: ttl_ms, incarnation, seq
-- Reply: one integer per event:
--   1 refreshed: the deadline moved to now + ttl, the order entry to the event's
--     pair when newer (as apply.lua's 'refreshed')
--   2 stale: the event is older than the order entry (nothing written)
--   0 absent: no order entry or no deadline member (a leave or the reaper
--     removed the record: ZADD XX never re-adds it) or, when checked, no
--     record (PTTL -2). The registrar then sends the event through apply.lua,
--     which re-creates the record after a reap or answers stale after a leave.
-- TIME is read once per call. The backstop PX is refreshed when less than half
-- of max(10 x ttl, backstop_min_ms) is left, checked on a duplicate and on
-- every 4th seq, as apply.lua does.
local call, smatch = redis.call, string.match
local t = call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local DL, ORD = KEYS[1], KEYS[2]
local least_backstop = tonumber(ARGV[1])
local out = {}
for i = 3, #KEYS do
  local rkey = KEYS[i]
  local a = 3 * i - 7
  local ttl, incs, seqs = tonumber(ARGV[a]), ARGV[a + 1], ARGV[a + 2]
  local inc, seq = tonumber(incs), tonumber(seqs)
  local oi, oq = smatch(call('HGET', ORD, rkey) or '', '^(%d+):(%d+)$')
  local ok = 0
  if oi then
    oi, oq = tonumber(oi), tonumber(oq)
    local order = 0
    if inc ~= oi then order = inc < oi and -1 or 1
    elseif seq ~= oq then order = seq < oq and -1 or 1 end
    if order < 0 then
      ok = 2
    -- CH counts a moved score; 0 is also the answer for a score that did not
    -- change (two touches in one ms), so a 0 asks whether the member is there.
    elseif call('ZADD', DL, 'XX', 'CH', now + ttl, rkey) == 1 or call('ZSCORE', DL, rkey) then
      ok = 1
      if order == 0 or seq % 4 == 0 then
        local backstop = 10 * ttl
        if backstop < least_backstop then backstop = least_backstop end
        local left = call('PTTL', rkey)
        if left == -2 then
          ok = 0  -- the record is gone: apply.lua re-creates it (the entry stays as it was)
        elseif left < backstop / 2 then
          call('PEXPIRE', rkey, string.format('%d', backstop))
        end
      end
      if ok == 1 and order > 0 then
        call('HSET', ORD, rkey, incs .. ':' .. seqs)
      end
    end
  end
  out[i - 2] = ok
end
return out
