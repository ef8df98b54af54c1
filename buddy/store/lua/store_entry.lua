-- Store one encoded response and keep the domain's index: which entries exist, until when, how big.
-- KEYS[1]  the cache key
-- KEYS[2]  the domain's index (sorted set: digest -> expiry, ms since the epoch)
-- KEYS[3]  the domain's entry sizes (hash: digest -> bytes)
-- KEYS[4]  the domain's counters (hash; this script maintains 'bytes' and 'sets')
-- ARGV[1]  the encoded response
-- ARGV[2]  TTL in milliseconds
-- ARGV[3]  the digest (the cache key's last part)
-- It also forgets up to 10 index entries whose TTL has passed, so the index stays bounded even when
-- nobody reads the metrics (which prune the rest).
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local gone = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, 10)
local freed = 0
for _, digest in ipairs(gone) do
  freed = freed + tonumber(redis.call('HGET', KEYS[3], digest) or 0)
  redis.call('HDEL', KEYS[3], digest)
  redis.call('ZREM', KEYS[2], digest)
end
if #gone > 0 then
  redis.call('HINCRBY', KEYS[4], 'bytes', -freed)
  redis.call('HINCRBY', KEYS[4], 'expired', #gone)
end
local size = string.len(ARGV[1])
local old = tonumber(redis.call('HGET', KEYS[3], ARGV[3]) or 0)
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[2]), ARGV[3])
redis.call('HSET', KEYS[3], ARGV[3], size)
redis.call('HINCRBY', KEYS[4], 'bytes', size - old)
redis.call('HINCRBY', KEYS[4], 'sets', 1)
return size
