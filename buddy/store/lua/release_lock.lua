-- Hand the leader's result to its followers and wake them: store the shared result (if any),
-- delete the lock only if this token still owns it (compare-and-delete), then publish.
-- KEYS[1]  the lock key
-- KEYS[2]  the shared-result key for this token
-- ARGV[1]  the owner's token
-- ARGV[2]  the wake-up channel
-- ARGV[3]  the message (the cache key)
-- ARGV[4]  the shared result blob, or '' when followers read the cache or a relay instead
-- ARGV[5]  the shared result's TTL in milliseconds
if ARGV[4] ~= '' then
  redis.call('SET', KEYS[2], ARGV[4], 'PX', ARGV[5])
end
local owned = 0
if redis.call('GET', KEYS[1]) == ARGV[1] then
  owned = redis.call('DEL', KEYS[1])
end
redis.call('PUBLISH', ARGV[2], ARGV[3])
return owned
