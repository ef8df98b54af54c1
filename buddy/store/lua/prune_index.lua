-- Drop the per-domain bookkeeping that versions up to 0.2 kept beside the entries, if it is still there.
-- KEYS[1]  the domain's old index (sorted set: digest -> expiry), no TTL
-- KEYS[2]  the domain's old entry sizes (hash: digest -> bytes), no TTL
-- KEYS[3]  the domain's counters (hash; the old 'bytes' and 'expired' fields go, the rest stays)
-- Both structures grew by one member per stored entry and were never evicted, so under volatile-lru they could
-- fill Redis and leave no room for any entry; entries are now counted by sampling (measure_entries.lua).
-- UNLINK frees them off the main thread; it is allowed even when Redis is out of memory.
-- Returns how many of the two keys were there.
local gone = redis.call('UNLINK', KEYS[1], KEYS[2])
redis.call('HDEL', KEYS[3], 'bytes', 'expired')
return gone
