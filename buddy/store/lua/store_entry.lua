-- Store one encoded response with its TTL (and, for a varying answer, the pointer at its primary key), count the
-- store, let go of the fill lock its leader held (when asked), note a GET answer in its URL's index (so that an
-- unsafe request to that URL can remove it), and say so on the wake-up channel: the waiters on the entry wake, and
-- every worker drops its in-memory copy. One call, one round trip.
-- KEYS[1]  the cache key
-- KEYS[2]  the domain's counters (hash; this script adds 1 to 'sets')
-- KEYS[3..] as ARGV[5] says, in this order: the primary key that gets the vary pointer ('p'), the fill lock to let
--          go ('l'), the index of the stored GET answers of the entry's URL ('i')
-- ARGV[1]  the encoded response
-- ARGV[2]  TTL in milliseconds
-- ARGV[3]  the wake-up channel
-- ARGV[4]  the message naming the entry ("<domain>\n<digest>")
-- ARGV[5]  which of 'p', 'l', 'i' apply, in that order ('' for none); their arguments follow from ARGV[6] on:
--          'p' the encoded pointer, its TTL in ms, the message naming it; 'l' the leader's token; 'i' nothing
-- Returns {bytes stored, 1 if the lock was still the leader's and is gone, else 0}.
-- Nothing is written per entry but the entry itself and, for a GET answer, its name in its URL's index; both
-- expire, so under volatile-lru (or any policy that evicts) Redis can always make room by evicting old ones.
-- Entries are counted by sampling the keyspace (measure_entries.lua), never from a list that eviction would falsify.
-- Every key here carries the domain's {hash tag}: one slot on a Redis Cluster.
local with = ARGV[5]
local k, a = 3, 6
local pointer, pointer_message
if string.find(with, 'p', 1, true) then
  pointer, pointer_message = KEYS[k], ARGV[a + 2]
  redis.call('SET', pointer, ARGV[a], 'PX', ARGV[a + 1])
  k, a = k + 1, a + 3
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('HINCRBY', KEYS[2], 'sets', 1)
local released = 0
if string.find(with, 'l', 1, true) then
  if redis.call('GET', KEYS[k]) == ARGV[a] then
    released = redis.call('DEL', KEYS[k])
  end
  k, a = k + 1, a + 1
end
if string.find(with, 'i', 1, true) then
  local index, keep = KEYS[k], tonumber(ARGV[2])
  redis.call('SADD', index, KEYS[1])
  if pointer then
    redis.call('SADD', index, pointer)
  end
  if redis.call('PTTL', index) < keep then
    redis.call('PEXPIRE', index, keep)
  end
end
if pointer_message then
  redis.call('PUBLISH', ARGV[3], pointer_message)
end
redis.call('PUBLISH', ARGV[3], ARGV[4])
return {string.len(ARGV[1]), released}
