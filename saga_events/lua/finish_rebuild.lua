-- finish_rebuild.lua: end a rebuild, compare-and-set on the epoch.
--
-- KEYS[1] epoch        saga:{ns}:epoch
-- ARGV[1] expected     the exact epoch value this caller read ('<id>:rebuilding')
-- ARGV[2] value        the value to set ('<id>:ready')
-- ARGV[3] min_age_ms   0: finish now (the rebuild's own registrar). Otherwise
--                      finish only if the epoch started (its '<started_ms>-'
--                      prefix, written from Redis TIME) at least this long ago
--                      by Redis's clock: taking over an abandoned rebuild never
--                      trusts the caller's clock.
-- Reply: 1 if set, 0 if the epoch is not ARGV[1] (superseded) or too young.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
local min_age = tonumber(ARGV[3])
if min_age > 0 then
  local started = tonumber(string.match(ARGV[1], '^(%d+)-'))
  if not started then
    return 0
  end
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  if now - started < min_age then
    return 0
  end
end
redis.call('SET', KEYS[1], ARGV[2])
return 1
