-- Store one encoded response with its TTL (and, for a varying answer, the pointer at its primary key), count the
-- store, and say so on the wake-up channel: waiters on the entry wake, and every worker drops its in-memory copy.
-- One call, one round trip.
-- KEYS[1]  the cache key
-- KEYS[2]  the domain's counters (hash; this script adds 1 to 'sets')
-- KEYS[3]  (optional) the primary key that gets the vary pointer
-- ARGV[1]  the encoded response
-- ARGV[2]  TTL in milliseconds
-- ARGV[3]  the wake-up channel
-- ARGV[4]  the message naming the entry ("<domain>\n<digest>")
-- ARGV[5], ARGV[6], ARGV[7]  (with KEYS[3]) the encoded pointer, its TTL in milliseconds, the message naming it
-- Nothing else is written per entry: every byte that lives as long as an entry is the entry itself, with its TTL,
-- so under volatile-lru (or any policy that evicts) Redis can always make room by evicting old entries.
-- Entries are counted by sampling the keyspace (measure_entries.lua), never from a list that eviction would falsify.
-- Every key here carries the domain's {hash tag}: one slot on a Redis Cluster.
if KEYS[3] then
  redis.call('SET', KEYS[3], ARGV[5], 'PX', ARGV[6])
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('HINCRBY', KEYS[2], 'sets', 1)
if KEYS[3] then
  redis.call('PUBLISH', ARGV[3], ARGV[7])
end
redis.call('PUBLISH', ARGV[3], ARGV[4])
return string.len(ARGV[1])
