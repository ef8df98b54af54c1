-- Store one encoded response with its TTL (and, for a varying answer, the pointer at its primary key), count the
-- store, let go of the fill lock its leader held (when asked), and say so on the wake-up channel: the waiters on
-- the entry wake, and every worker drops its in-memory copy. One call, one round trip.
-- KEYS[1]  the cache key
-- KEYS[2]  the domain's counters (hash; this script adds 1 to 'sets')
-- KEYS[3], KEYS[4]  as ARGV[5] says: the primary key that gets the vary pointer, the fill lock to let go
-- ARGV[1]  the encoded response
-- ARGV[2]  TTL in milliseconds
-- ARGV[3]  the wake-up channel
-- ARGV[4]  the message naming the entry ("<domain>\n<digest>")
-- ARGV[5]  what else: '' nothing; 'p' a pointer (KEYS[3]; ARGV[6] the encoded pointer, ARGV[7] its TTL in ms,
--          ARGV[8] the message naming it); 'l' a lock (KEYS[3]; ARGV[6] the leader's token); 'pl' both (KEYS[3] and
--          ARGV[6..8] the pointer, KEYS[4] and ARGV[9] the lock)
-- Returns {bytes stored, 1 if the lock was still the leader's and is gone, else 0}.
-- Nothing else is written per entry: every byte that lives as long as an entry is the entry itself, with its TTL,
-- so under volatile-lru (or any policy that evicts) Redis can always make room by evicting old entries.
-- Entries are counted by sampling the keyspace (measure_entries.lua), never from a list that eviction would falsify.
-- Every key here carries the domain's {hash tag}: one slot on a Redis Cluster.
local with = ARGV[5]
if with == 'p' or with == 'pl' then
  redis.call('SET', KEYS[3], ARGV[6], 'PX', ARGV[7])
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('HINCRBY', KEYS[2], 'sets', 1)
local released = 0
if with == 'l' or with == 'pl' then
  local lock, token = KEYS[3], ARGV[6]
  if with == 'pl' then
    lock, token = KEYS[4], ARGV[9]
  end
  if redis.call('GET', lock) == token then
    released = redis.call('DEL', lock)
  end
end
if with == 'p' or with == 'pl' then
  redis.call('PUBLISH', ARGV[3], ARGV[8])
end
redis.call('PUBLISH', ARGV[3], ARGV[4])
return {string.len(ARGV[1]), released}
