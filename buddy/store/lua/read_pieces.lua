-- Read a stored value in pieces, so that no reply holds it whole (see buddy/store/pieces.py).
-- KEYS[1]  a stored value (a string)
-- ARGV[1]  the size of a piece, in bytes
-- Returns the value's pieces in order (the last one may be shorter), all of one version of it (a script runs
-- atomically), or false when the key holds nothing.
local size = redis.call('STRLEN', KEYS[1])
if size == 0 then
  return false
end
local piece = tonumber(ARGV[1])
local pieces = {}
for start = 0, size - 1, piece do
  pieces[#pieces + 1] = redis.call('GETRANGE', KEYS[1], start, start + piece - 1)
end
return pieces
