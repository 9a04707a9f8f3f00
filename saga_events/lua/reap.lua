-- reap.lua: remove the instances whose deadline has passed (Redis clock).
--
-- KEYS[1] deadlines  saga:{ns}:deadlines (zset record key -> deadline ms)
-- KEYS[2] index      saga:{ns}:index
-- KEYS[3] order      saga:{ns}:order
-- KEYS[4] mark       saga:{ns}:reaper   (Redis time of the last reap by any registrar)
-- KEYS[5] rev        saga:{ns}:rev
-- KEYS[6] counts     saga:{ns}:counts   (hash service -> members of index)
-- KEYS[7] graced     saga:{ns}:graced   (zset record key -> deadline granted by a stall)
-- ARGV[1] limit       at most this many reaps per call
-- ARGV[2] stall_ms    a gap since the last reap longer than this is a stall; 0: this
--                     reap is a stall even with no mark (after the intake was down)
-- ARGV[3] grace_ms    the deadline a stall grants to an instance due before it
-- ARGV[4] tomb_ttl_ms the least tombstone life; it lives max(ARGV[4], 3 x ttl)
-- ARGV[5] inst prefix saga:{ns}:inst:   ARGV[6] tomb prefix saga:{ns}:tomb:
-- ARGV[7] override prefix saga:{ns}:override: (optional): a reaped instance's
--         operator drain is deleted with it
-- Reply: the record keys reaped (an empty list during a stall's grace).
-- The keys deleted are published in one feed message with the rev range they
-- took: {"rev":<rev after>,"ch":[["del",<key>],...]} (saga_events/feed.py).
--
-- It touches the record and tombstone keys named by the deadlines set, not
-- declared in KEYS: sound in Redis Cluster only because every registry key
-- shares the {ns} hash tag.
-- Reaping keeps the ordering state: the instance's newest (incarnation, seq)
-- goes to its tombstone, so nothing older than what was reaped recreates it;
-- an agent that was alive but late comes back with its next, newer event.
-- Stalls: a gap since the last reap by any registrar (Redis paused, no
-- registrar running, a Sentinel failover) means heartbeats sent meanwhile have
-- not landed yet, so an instance overdue or due within grace_ms gets grace_ms
-- to heartbeat instead of being reaped with the dead; but only once per stall
-- and instance: one whose deadline is still the one a stall granted (no
-- heartbeat since) is reaped at the next stall.
-- Out of memory: the freeing writes (DEL, SREM, ZREM, HDEL) come first; the
-- tombstone, the counters and the mark are written after them or by pcall.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local nows = string.format('%.0f', now)
local last = tonumber(redis.call('GET', KEYS[4]) or '0')
if (last > 0 or ARGV[2] == '0') and now - last > tonumber(ARGV[2]) then
  redis.pcall('SET', KEYS[4], nows, 'PX', 86400000)
  local grace = now + tonumber(ARGV[3])
  -- Not only the overdue: an instance due within the grace could not heartbeat
  -- either while nobody applied its events (a failover outlasting a ttl).
  local overdue = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', grace, 'WITHSCORES')
  local args, graced = {}, {}
  for i = 1, #overdue, 2 do
    local k, d = overdue[i], overdue[i + 1]
    if redis.call('ZSCORE', KEYS[7], k) ~= d then
      args[#args + 1] = grace
      args[#args + 1] = k
    end
  end
  for i = 1, #args, 1000 do
    local chunk = {}
    for j = i, math.min(i + 999, #args) do chunk[#chunk + 1] = args[j] end
    redis.pcall('ZADD', KEYS[1], 'XX', unpack(chunk))
    redis.pcall('ZADD', KEYS[7], unpack(chunk))
  end
  if #args > 0 then
    return {}
  end
end
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
local changed = 0
local gone = {}
local tombs = {}
local least = tonumber(ARGV[4])
local ip, tp = ARGV[5], ARGV[6]
for _, k in ipairs(due) do
  local rec = redis.call('GET', k)
  local o = redis.call('HGET', KEYS[3], k)
  if not o and rec then
    local i, q = string.match(rec, '^{"incarnation":(%d+),"seq":(%d+),')
    if i then o = i .. ':' .. q end
  end
  if redis.call('DEL', k) == 1 then changed = changed + 1; gone[changed] = k end
  if redis.call('SREM', KEYS[2], k) == 1 then
    local service = string.match(string.sub(k, #ip + 1), '^([^:]+):')
    if service then
      tombs[#tombs + 1] = {'count', service}
    end
  end
  if ARGV[7] and string.sub(k, 1, #ip) == ip then
    redis.call('DEL', ARGV[7] .. string.sub(k, #ip + 1))
  end
  if o and string.sub(k, 1, #ip) == ip then
    local life = least
    local rttl = rec and tonumber(string.match(rec, '"ttl_ms":(%d+)'))
    if rttl and 3 * rttl > life then life = 3 * rttl end
    tombs[#tombs + 1] = {tp .. string.sub(k, #ip + 1), o, life}
  end
end
if #due > 0 then
  redis.call('ZREM', KEYS[1], unpack(due))
  redis.call('HDEL', KEYS[3], unpack(due))
  redis.pcall('ZREM', KEYS[7], unpack(due))
end
for _, w in ipairs(tombs) do
  if w[1] == 'count' then
    local left = redis.pcall('HINCRBY', KEYS[6], w[2], -1)
    if type(left) == 'number' and left <= 0 then redis.pcall('HDEL', KEYS[6], w[2]) end
  else
    redis.pcall('SET', w[1], w[2], 'PX', string.format('%.0f', w[3]))
  end
end
if changed > 0 then
  local rev = redis.pcall('INCRBY', KEYS[5], changed)
  if type(rev) == 'number' then
    for i, k in ipairs(gone) do gone[i] = '["del",' .. cjson.encode(k) .. ']' end
    redis.pcall('PUBLISH', string.sub(KEYS[5], 1, -4) .. 'feed', '{"rev":'
      .. string.format('%.0f', rev) .. ',"ch":[' .. table.concat(gone, ',') .. ']}')
  end
end
redis.pcall('SET', KEYS[4], nows, 'PX', 86400000)
redis.pcall('ZREMRANGEBYSCORE', KEYS[7], '-inf', now - 3600000)
return due
