-- Take the fill lock for one cache key, or say whom to follow.
-- KEYS[1]  the lock key
-- KEYS[2]  the successor key of the leader the caller was following (unused when ARGV[3] is '')
-- ARGV[1]  this request's token
-- ARGV[2]  lock TTL in milliseconds
-- ARGV[3]  the token of the leader the caller was following and saw vanish, or ''
-- ARGV[4]  successor TTL in milliseconds
-- Returns {1, token} when this request is now the leader, else {0, token of the leader to follow}.
-- A leader that vanished (its worker was killed) gets one successor: the first waiter to come here
-- takes the lock and is recorded, so the other waiters follow it, even if it has already finished.
-- The work is one function, `acquire(lock key, successor key, args)`: lead.lua runs the same function.
local function acquire(lock, successor_key, args)
  if args[3] ~= '' then
    local successor = redis.call('GET', successor_key)
    if successor then
      return {0, successor}
    end
  end
  if redis.call('SET', lock, args[1], 'NX', 'PX', args[2]) then
    if args[3] ~= '' then
      redis.call('SET', successor_key, args[1], 'PX', args[4])
    end
    return {1, args[1]}
  end
  return {0, redis.call('GET', lock) or ''}
end
-- main: the standalone script (lead.lua reuses everything above this line)
return acquire(KEYS[1], KEYS[2], ARGV)
