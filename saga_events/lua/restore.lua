-- restore.lua: write one instance back from a registrar's last view, after
-- an empty restart, before the rebuild is declared ready.
--
-- KEYS[1] record     KEYS[2] tombstone   KEYS[3] index   KEYS[4] deadlines
-- KEYS[5] order      KEYS[6] rev         KEYS[7] counts
-- ARGV[1] record     the whole record JSON (as the mirror decoded it, re-encoded)
-- ARGV[2] incarnation:seq of the record
-- ARGV[3] ttl_ms     ARGV[4] backstop_ms   ARGV[5] service
-- Reply: 1 if restored, 0 if the instance is already there (an agent
-- re-announced first) or has ordering state (a record, an order entry, or a
-- tombstone: a leave or reap that came after the restart wins).
-- The deadline is fresh (now + ttl): an instance that really died is reaped
-- one ttl later, as any crash. Caps do not apply: the view was within them.
-- A restore is a record change: INCR rev and a feed message, as apply.lua's.
if redis.call('EXISTS', KEYS[1], KEYS[2]) > 0 or redis.call('HEXISTS', KEYS[5], KEYS[1]) == 1 then
  return 0
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[4])
redis.call('HSET', KEYS[5], KEYS[1], ARGV[2])
if redis.call('SADD', KEYS[3], KEYS[1]) == 1 then
  redis.call('HINCRBY', KEYS[7], ARGV[5], 1)
end
redis.call('ZADD', KEYS[4], now + tonumber(ARGV[3]), KEYS[1])
local rev = redis.call('INCR', KEYS[6])
redis.call('PUBLISH', string.sub(KEYS[6], 1, -4) .. 'feed', '{"rev":' .. string.format('%.0f', rev)
  .. ',"ch":[["set",' .. cjson.encode(KEYS[1]) .. ',' .. ARGV[1] .. ']]}')
return 1
