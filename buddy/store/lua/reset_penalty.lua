-- The upstream answered normally again: the penalty level goes back to 0 (a pause already set stays).
-- KEYS[1]  the domain's penalty hash
-- Returns 1 if there was a level to reset.
if (tonumber(redis.call('HGET', KEYS[1], 'level')) or 0) > 0 then
  redis.call('HSET', KEYS[1], 'level', 0)
  return 1
end
return 0
