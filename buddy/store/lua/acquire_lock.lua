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
if ARGV[3] ~= '' then
  local successor = redis.call('GET', KEYS[2])
  if successor then
    return {0, successor}
  end
end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  if ARGV[3] ~= '' then
    redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[4])
  end
  return {1, ARGV[1]}
end
return {0, redis.call('GET', KEYS[1]) or ''}
