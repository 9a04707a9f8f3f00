-- bump_epoch.lua: tell mirrors to resync by replacing a 'ready' epoch.
--
-- KEYS[1] epoch   saga:{ns}:epoch
-- ARGV[1] value   the new epoch ('<started_ms>-<hex>:ready')
-- Reply: 1 if replaced, 0 if left alone.
-- A missing epoch calls for a rebuild, not a resync; a 'rebuilding' one ends
-- with a new epoch anyway (a mirror that saw 'ready' in the middle of a
-- rebuild would resync to a registry not yet rebuilt): both are left alone.
local current = redis.call('GET', KEYS[1])
if not current or string.sub(current, -11) == ':rebuilding' then
  return 0
end
redis.call('SET', KEYS[1], ARGV[1])
return 1
