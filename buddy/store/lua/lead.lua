-- Take the fill lock for a miss (or say whom to follow) and, as the new leader, do in the same call what a leader
-- does first: look at the entry again (the previous leader may have stored it since the miss) and, when it is
-- not there, reserve the upstream start. The functions `acquire` (acquire_lock.lua) and `throttle` (throttle.lua)
-- are prepended to this text.
-- KEYS[1]  the lock key
-- KEYS[2]  the successor key of the leader the caller was following (unused when ARGV[3] is '')
-- KEYS[3]  the cache key the request looked up (its primary entry)
-- KEYS[4..6]  throttle.lua's KEYS[1..3]: the reserved start times, the partition's and the domain's penalty hashes
-- ARGV[1..4]  as acquire_lock.lua: token, lock TTL ms, the vanished leader's token or '', successor TTL ms
-- ARGV[5..]   as throttle.lua's ARGV[1..]: slot member, longest delay, guard, quiet period, window/limit pairs
-- Every key carries the mapping's hash tag, so on a Redis Cluster they all live in one slot.
-- Returns {0, token of the leader to follow}; or, having taken the lock, {1, token, entry} when the cache key
-- holds something (then nothing is reserved: the caller decides whether it may serve it, and throttles itself
-- if not; `entry` is its first PIECE bytes, PIECE set before this text: see buddy/store/pieces.py), else {1, token, false, throttle verdict} (the verdict as throttle.lua returns it; a refusal
-- reserves nothing, and the lock is held either way: the followers share the leader's answer, a 429 too).
local taken = acquire(KEYS[1], KEYS[2], ARGV)
if taken[1] == 0 then
  return taken
end
local entry = redis.call('GETRANGE', KEYS[3], 0, PIECE - 1)
if entry ~= '' then
  return {1, ARGV[1], entry}
end
return {1, ARGV[1], false, throttle(KEYS[4], KEYS[5], KEYS[6], ARGV, 5)}
