-- Remove every stored GET answer of one upstream URL (RFC 9111 4.4: an unsafe request to it was answered without
-- an error), found in the URL's index that store_entry.lua keeps, and say so on the wake-up channel, so that every
-- worker drops its in-memory copy.
-- KEYS[1]  the URL's index (a set of cache keys: answers, their variants, vary pointers)
-- ARGV[1]  the wake-up channel
-- ARGV[2]  what the domain's cache keys start with ("<prefix>cache:{<domain>}:"): a message names the rest
-- ARGV[3]  the domain
-- Returns the keys that still existed and were removed.
-- Every key in the index carries the same {hash tag} as the index: one slot on a Redis Cluster.
local members = redis.call('SMEMBERS', KEYS[1])
local removed = {}
for _, key in ipairs(members) do
  if redis.call('UNLINK', key) == 1 then
    removed[#removed + 1] = key
  end
  if string.sub(key, 1, string.len(ARGV[2])) == ARGV[2] then
    redis.call('PUBLISH', ARGV[1], ARGV[3] .. '\n' .. string.sub(key, string.len(ARGV[2]) + 1))
  end
end
redis.call('UNLINK', KEYS[1])
return removed
