-- Store one encoded response with its TTL, and count the store.
-- KEYS[1]  the cache key
-- KEYS[2]  the domain's counters (hash; this script adds 1 to 'sets')
-- ARGV[1]  the encoded response
-- ARGV[2]  TTL in milliseconds
-- Nothing else is written per entry: every byte that lives as long as an entry is the entry itself, with its TTL,
-- so under volatile-lru (or any policy that evicts) Redis can always make room by evicting old entries.
-- Entries are counted by sampling the keyspace (measure_entries.lua), never from a list that eviction would falsify.
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('HINCRBY', KEYS[2], 'sets', 1)
return string.len(ARGV[1])
