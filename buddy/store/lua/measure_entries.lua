-- Measure some of one domain's cache keys, as found by SCAN: how many are responses, their size, their TTLs,
-- without counting as an access: reading the metrics must not make an entry look recently used to LRU eviction.
-- KEYS[1], KEYS[2], ...  cache keys of one domain (one hash tag, so one Cluster slot); one gone meanwhile counts 0
-- ARGV[1..m]  ascending upper bounds (ms of TTL left) of the TTL buckets; a last bucket takes everything above
-- Returns {responses, bytes of responses, vary pointers, count in bucket 1, ..., count in bucket m + 1}.
-- PTTL, OBJECT ENCODING and MEMORY USAGE leave a key's LRU clock alone (GET, STRLEN and GETRANGE would not).
-- Bytes are what Redis spends on the key (MEMORY USAGE: the compressed blob plus its per-key overhead). A vary
-- pointer ('RV' + a short list of header names) is a string of at most 44 bytes, which Redis stores 'embstr';
-- a response never is that short. A server without OBJECT and MEMORY (fakeredis) is read with STRLEN and
-- GETRANGE instead.
local bounds = {}
for i, bound in ipairs(ARGV) do
  bounds[i] = tonumber(bound)
end
local responses, bytes, pointers = 0, 0, 0
local buckets = {}
for i = 1, #bounds + 1 do
  buckets[i] = 0
end
for _, key in ipairs(KEYS) do
  local ttl = redis.call('PTTL', key)
  if ttl ~= -2 then
    local size, pointer = redis.pcall('MEMORY', 'USAGE', key), false
    if type(size) == 'number' then
      pointer = redis.call('OBJECT', 'ENCODING', key) == 'embstr'
    else
      size = redis.call('STRLEN', key)
      pointer = redis.call('GETRANGE', key, 0, 1) == 'RV'
    end
    if pointer then
      pointers = pointers + 1
    else
      responses = responses + 1
      bytes = bytes + size
      local slot = #bounds + 1
      if ttl >= 0 then
        for i, bound in ipairs(bounds) do
          if ttl < bound then
            slot = i
            break
          end
        end
      end
      buckets[slot] = buckets[slot] + 1
    end
  end
end
local out = {responses, bytes, pointers}
for i = 1, #buckets do
  out[#out + 1] = buckets[i]
end
return out
