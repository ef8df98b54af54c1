-- Keep the fill lock alive while its owner still works (compare, then PEXPIRE).
-- KEYS[1]  the lock key
-- ARGV[1]  the owner's token
-- ARGV[2]  new TTL in milliseconds
-- Returns 1 if the caller still owns the lock, else 0.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
