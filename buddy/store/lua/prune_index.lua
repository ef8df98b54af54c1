-- Forget index entries whose TTL has passed (Redis already dropped the responses themselves).
-- KEYS[1]  the domain's index (sorted set: digest -> expiry ms)
-- KEYS[2]  the domain's entry sizes (hash)
-- KEYS[3]  the domain's counters (hash; 'bytes' goes down, 'expired' up)
-- ARGV[1]  at most this many entries per call, so Redis is never blocked for long
-- Returns how many were pruned; call again while it returns ARGV[1].
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local gone = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
local freed = 0
for _, digest in ipairs(gone) do
  freed = freed + tonumber(redis.call('HGET', KEYS[2], digest) or 0)
  redis.call('HDEL', KEYS[2], digest)
  redis.call('ZREM', KEYS[1], digest)
end
if #gone > 0 then
  redis.call('HINCRBY', KEYS[3], 'bytes', -freed)
  redis.call('HINCRBY', KEYS[3], 'expired', #gone)
end
return #gone
