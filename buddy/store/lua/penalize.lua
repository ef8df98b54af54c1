-- An upstream said 429 or 503: pause the domain. With a Retry-After, for exactly that long; without one,
-- for an exponentially growing time (1 s, 2 s, 4 s, ...) capped at the longest delay.
-- KEYS[1]  the domain's penalty hash: until (ms), level, last (ms of the last penalty event)
-- ARGV[1]  the upstream's Retry-After in ms, or -1 when it sent none
-- ARGV[2]  the longest delay in ms (cap of the exponential pause)
-- ARGV[3]  quiet period in ms after which the level decays to 0
-- Returns {until ms, level}.
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local state = redis.call('HMGET', KEYS[1], 'until', 'level', 'last')
local current = tonumber(state[1]) or 0
local level = tonumber(state[2]) or 0
if level > 0 and now - (tonumber(state[3]) or 0) > tonumber(ARGV[3]) then
  level = 0
end
level = level + 1
local pause = tonumber(ARGV[1])
if pause < 0 then
  pause = math.min(1000 * 2 ^ (level - 1), tonumber(ARGV[2]))
end
local untill = math.max(current, now + pause)
redis.call('HSET', KEYS[1], 'until', untill, 'level', level, 'last', now)
redis.call('PEXPIRE', KEYS[1], untill - now + tonumber(ARGV[3]))
return {untill, level}
