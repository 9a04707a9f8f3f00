-- init_counts.lua: fill the per-service counts from the index, once, for a
-- registry written before the caps existed (run at registrar start).
--
-- KEYS[1] index    saga:{ns}:index
-- KEYS[2] counts   saga:{ns}:counts (hash service -> members of index)
-- ARGV[1] inst prefix saga:{ns}:inst:
-- Reply: the number of index members counted (0 when counts already exist
-- or the index is empty).
-- A counts hash that exists is kept: the scripts maintain it from then on.
if redis.call('EXISTS', KEYS[2]) == 1 then
  return 0
end
local members = redis.call('SMEMBERS', KEYS[1])
local n = #ARGV[1]
for _, k in ipairs(members) do
  local service = string.match(string.sub(k, n + 1), '^([^:]+):')
  if service then
    redis.call('HINCRBY', KEYS[2], service, 1)
  end
end
return #members
