-- Store one encoded response and keep the domain's index: which entries exist, until when, how big.
-- KEYS[1]  the cache key
-- KEYS[2]  the domain's index (sorted set: digest -> expiry, ms since the epoch)
-- KEYS[3]  the domain's entry sizes (hash: digest -> bytes)
-- KEYS[4]  the domain's counters (hash; this script maintains 'bytes' and 'sets')
-- ARGV[1]  the encoded response
-- ARGV[2]  TTL in milliseconds
-- ARGV[3]  the digest (the cache key's last part)
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local size = string.len(ARGV[1])
local old = tonumber(redis.call('HGET', KEYS[3], ARGV[3]) or 0)
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[2]), ARGV[3])
redis.call('HSET', KEYS[3], ARGV[3], size)
redis.call('HINCRBY', KEYS[4], 'bytes', size - old)
redis.call('HINCRBY', KEYS[4], 'sets', 1)
return size
