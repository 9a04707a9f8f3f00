-- apply.lua: apply a batch of events, each to one instance, ordered by (incarnation, seq).
--
-- Batch layout (one EVALSHA applies N events in order, as N calls would):
--   KEYS[1..5]          index, deadlines, order, rev, counts (shared)
--   KEYS[6+3i .. 8+3i]  record, tombstone, override of event i (0-based)
--   ARGV[1..6]          shared: tomb_ttl_ms, next, max_per_service,
--                       max_instances, unknown_leave_ms, backstop_min_ms
--   ARGV[7+6i .. 12+6i] event i: kind, incarnation, seq, body, ttl_ms, service
--   Reply: one reply per event, below. TIME is read once per batch.
-- Each event is applied by apply_one(KEYS, ARGV) with its own KEYS and ARGV
-- (the batch's, and backstop_ms = max(10 x ttl, backstop_min_ms), tombstone
-- life max(tomb_ttl_ms, 3 x ttl)) laid out as follows:
--
-- KEYS[1] record      saga:{ns}:inst:<service>:<id>
-- KEYS[2] tombstone   saga:{ns}:tomb:<service>:<id>
-- KEYS[3] index       saga:{ns}:index       (set of record keys)
-- KEYS[4] deadlines   saga:{ns}:deadlines   (zset record key -> deadline ms)
-- KEYS[5] order       saga:{ns}:order       (hash record key -> "inc:seq")
-- KEYS[6] rev         saga:{ns}:rev         (INCR on every record change)
-- KEYS[7] counts      saga:{ns}:counts      (hash service -> members of index)
-- KEYS[8] override    saga:{ns}:override:<service>:<id> (an operator's drain,
--                     JSON; optional): while it exists, an announce's body is
--                     stored with "draining":true and "override":<it, plus
--                     "self_draining": the body's own flag>; a leave deletes it
-- ARGV[1] kind        'announce' | 'leave'
-- ARGV[2] incarnation ARGV[3] seq
-- ARGV[4] body        record JSON without its leading '{' (announce only)
-- ARGV[5] ttl_ms      (announce only; 0 for a leave)
-- ARGV[6] backstop_ms the record's PX: max(10 x ttl, 2 h)
-- ARGV[7] tomb_ttl_ms the least tombstone life (10 min); a tombstone lives
--                     max(ARGV[7], 3 x ttl), ttl from the event or, for a
--                     leave, from the stored record
-- ARGV[8] next        '1': when something is stored, ignore ARGV[2..3] and use
--                     the stored incarnation with the next seq (writers
--                     without a sequence of their own: the HTTP gateway)
-- ARGV[9] service     the service name (the counts field)
-- ARGV[10] max_per_service, ARGV[11] max_instances: caps on creation (0: none)
-- ARGV[12] unknown_leave_ms: life of an unknown leave's marker (0: none)
-- Reply {status, registered_at_ms, now_ms, incarnation, seq}; status is one of
--   created | updated | refreshed | removed | absent | stale | capped
--   With ARGV[8] '1' (the HTTP gateway), a change (created, updated, removed)
--   adds its rev and, for created and updated, the record as stored:
--   {status, registered_at_ms, now_ms, incarnation, seq, rev[, record]}, so
--   the writer shows its own change at once (read-your-writes).
--
-- Ordering: the newest (incarnation, seq) applied to an instance lives in the
-- order hash, or, once the record is gone (leave, reap), in the tombstone: an
-- event not newer than it changes nothing. The record keeps the pair of its
-- last change.
--
-- Unknown leaves cost little: a leave for an id with no record, no order entry
-- and no tombstone writes only a short-lived marker (ARGV[12], 30 s by default,
-- not the 10 min tombstone), so a flood of them frees itself within seconds
-- and the per-service rate limit bounds it. Ordering: a leave that overtakes its
-- own instance's first announce (two registrars, a backlog) still stops that
-- announce if it lands within ARGV[12]; a later one creates the instance,
-- which is then reaped one ttl later, as any crash.
-- Heartbeats are invisible: an unchanged record only moves its deadline (a
-- zset write outside the mirrors' subscription) and its order entry; its PX
-- is refreshed when less than half of the backstop is left (checked on every
-- 4th seq), so at most once per backstop/2 >= 1 h per instance (one 'expire'
-- notification to each mirror).
-- Out of memory: removal deletes before it writes; once a script has written,
-- Redis lets its further writes through, and the tombstone SET is a pcall, so
-- a leave removes the record even when the tombstone cannot be stored.
-- Every record change (create, update, remove) INCRs KEYS[6].
-- and PUBLISHes it on the feed channel saga:{ns}:feed (KEYS[6] with 'feed' for
-- 'rev'): {"rev":<new rev>,"ch":[["set",<key>,<record as stored>]]} or
-- [["del",<key>]] (saga_events/feed.py reads it).
-- The code below is laid out for the hot path (an unchanged heartbeat costs
-- MGET, HGET, ZADD, HSET and no table or closure of its own): the shared
-- KEYS/ARGV are read once per call, each event's are passed as arguments.
local call, smatch, sfind, sformat = redis.call, string.match, string.find, string.format
local t = call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local nows = sformat('%.0f', now)
local IDX, DL, ORD, REV, CNT = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local FEED = string.sub(REV, 1, -4) .. 'feed'
local least_tomb, after_newest = tonumber(ARGV[1]), ARGV[2] == '1'
local max_per, max_total = tonumber(ARGV[3]), tonumber(ARGV[4])
local unknown_leave, least_backstop = ARGV[5], tonumber(ARGV[6])

local function pair(s)
  if not s then return nil, nil end
  local i, q = smatch(s, '^(%d+):(%d+)$')
  if not i then return nil, nil end
  return tonumber(i), tonumber(q)
end

-- -1: (inc, seq) is older than (i, q); 0: the same; 1: newer
local function cmp(inc, seq, i, q)
  if inc ~= i then return inc < i and -1 or 1 end
  if seq ~= q then return seq < q and -1 or 1 end
  return 0
end

local function publish(rev, change)
  call('PUBLISH', FEED, '{"rev":' .. sformat('%.0f', rev) .. ',"ch":[' .. change .. ']}')
end

local function leave(rkey, tkey, okey, incs, seqs, service, cur, ostr, tomb, creg)
  if not cur and not ostr and not tomb then
    -- Nothing was ever stored: only a short-lived marker (unknown_leave ms, 0: none).
    if tonumber(unknown_leave) > 0 then
      call('SET', tkey, incs .. ':' .. seqs, 'PX', unknown_leave)
    end
    return {'absent', '0', nows, incs, seqs}
  end
  local life = least_tomb
  local rttl = cur and tonumber(smatch(cur, '"ttl_ms":(%d+)'))
  if rttl and 3 * rttl > life then life = 3 * rttl end
  local status = 'absent'
  if cur then
    call('DEL', rkey)
    if call('SREM', IDX, rkey) == 1 then
      if call('HINCRBY', CNT, service, -1) <= 0 then
        call('HDEL', CNT, service)
      end
    end
    call('ZREM', DL, rkey)
    status = 'removed'
  end
  call('HDEL', ORD, rkey)
  if okey then
    call('DEL', okey)
  end
  redis.pcall('SET', tkey, incs .. ':' .. seqs, 'PX', sformat('%.0f', life))
  if cur then
    local rev = call('INCR', REV)
    publish(rev, '["del",' .. cjson.encode(rkey) .. ']')
    if after_newest then
      return {status, creg or '0', nows, incs, seqs, rev}
    end
  end
  return {status, creg or '0', nows, incs, seqs}
end

-- A change: write the record (created or updated), its order, index and deadline.
local function write(rkey, incs, seqs, inc, ci, creg, body, ttl, backstop, service, cur)
  local member = call('SISMEMBER', IDX, rkey) == 1
  if not cur and not member then
    if max_per > 0 and tonumber(call('HGET', CNT, service) or '0') >= max_per then
      return {'capped', '0', nows, incs, seqs}
    end
    if max_total > 0 and call('SCARD', IDX) >= max_total then
      return {'capped', '0', nows, incs, seqs}
    end
  end
  local reg = nows
  if ci and inc == ci then
    reg = creg
  end
  local record = '{"incarnation":' .. incs .. ',"seq":' .. seqs .. ',"registered_at_ms":' .. reg
    .. ',' .. body
  call('SET', rkey, record, 'PX', sformat('%d', backstop))
  call('HSET', ORD, rkey, incs .. ':' .. seqs)
  if not member then
    call('SADD', IDX, rkey)
    call('HINCRBY', CNT, service, 1)
  end
  call('ZADD', DL, now + ttl, rkey)
  local rev = call('INCR', REV)
  publish(rev, '["set",' .. cjson.encode(rkey) .. ',' .. record .. ']')
  local status = cur and 'updated' or 'created'
  if after_newest then
    return {status, reg, nows, incs, seqs, rev, record}
  end
  return {status, reg, nows, incs, seqs}
end

local function apply_one(rkey, tkey, okey, kind, incs, seqs, body, ttl, service)
  -- One MGET reads the record, the tombstone and the override (one call, not three).
  local got = call('MGET', rkey, tkey, okey)
  local is_leave = kind == 'leave'
  if not is_leave then
    local ov = got[3]
    if ov then
      local base, own = smatch(body, '^(.*),"draining":([a-z]+)}$')
      local head = smatch(ov, '^({.*)}$')
      if base and head then
        body = base .. ',"draining":true,"override":' .. head .. ',"self_draining":' .. own .. '}}'
      end
    end
  end
  local inc, seq = tonumber(incs), tonumber(seqs)
  local tomb = got[2]
  local ti, ts = pair(tomb)
  local cur = got[1]
  -- The record's ordering and registered_at_ms; rest: where its body starts
  -- (compared in place, not copied out).
  local ci, cs, creg, rest
  if cur then
    ci, cs, creg, rest = smatch(cur, '^{"incarnation":(%d+),"seq":(%d+),"registered_at_ms":(%d+),()')
  end
  if ci then
    ci = tonumber(ci)
    cs = tonumber(cs)
  end
  local ostr = call('HGET', ORD, rkey)
  local oi, oq = pair(ostr)
  if not oi and ci then
    oi, oq = ci, cs
  end
  if ti and cmp(inc, seq, ti, ts) <= 0 then
    return {'stale', '0', nows, incs, seqs}
  end
  if after_newest and oi then
    inc, seq = oi, oq + 1
    incs, seqs = sformat('%.0f', inc), sformat('%.0f', seq)
  end
  local order = oi and cmp(inc, seq, oi, oq) or 1
  if is_leave then
    if order <= 0 then
      return {'stale', creg or '0', nows, incs, seqs}
    end
    return leave(rkey, tkey, okey, incs, seqs, service, cur, ostr, tomb, creg)
  end
  if order < 0 then
    return {'stale', creg or '0', nows, incs, seqs}
  end
  local backstop = 10 * ttl
  if backstop < least_backstop then backstop = least_backstop end
  if ci and inc == ci and #cur - rest + 1 == #body and sfind(cur, body, rest, true) == rest then
    -- Unchanged record (a heartbeat, or a duplicate): move the deadline only.
    call('ZADD', DL, now + ttl, rkey)
    if order > 0 then
      call('HSET', ORD, rkey, incs .. ':' .. seqs)
    end
    -- The backstop is checked on a duplicate (order 0: the HTTP gateway's
    -- heartbeats) and on every 4th seq (an agent's heartbeats count up by one;
    -- its changes rewrite the record with a fresh PX anyway): the half left is
    -- >= 5 ttl, 15 heartbeats, so this costs one PTTL per 4 heartbeats, not 1.
    if (order == 0 or seq % 4 == 0) and call('PTTL', rkey) < backstop / 2 then
      call('PEXPIRE', rkey, sformat('%d', backstop))
    end
    return {'refreshed', creg, nows, incs, seqs}
  end
  if order == 0 then
    return {'stale', creg or '0', nows, incs, seqs}  -- same (incarnation, seq), other record
  end
  return write(rkey, incs, seqs, inc, ci, creg, body, ttl, backstop, service, cur)
end

local out = {}
for i = 0, (#ARGV - 6) / 6 - 1 do
  local k, a = 6 + 3 * i, 6 + 6 * i
  out[i + 1] = apply_one(KEYS[k], KEYS[k + 1], KEYS[k + 2], ARGV[a + 1], ARGV[a + 2],
    ARGV[a + 3], ARGV[a + 4], tonumber(ARGV[a + 5]), ARGV[a + 6])
end
return out
