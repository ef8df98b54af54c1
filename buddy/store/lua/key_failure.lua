-- Refused access keys from one client address: count the wrong ones, lock the address out when they come too
-- often, and say when the refusals are due for a log line (one per interval per address, for every worker and
-- host on this Redis). buddy.store.key_failures.LocalFailures follows the same rules without Redis.
-- KEYS[1]  the address's hash: failures (wrong keys in a row), strikes (lock-outs in a row), last (ms of the
--          last wrong key), until (ms: the end of the current lock-out), unlogged (refusals in no log line
--          yet), logged (ms of the last log line)
-- ARGV[1]  what happened: 'wrong' (a wrong key), 'refused' (a refusal that tried no key, or was refused
--          untried during a lock-out), 'flush' (nothing: only a log line, if one is due)
-- ARGV[2]  now, ms
-- ARGV[3]  wrong keys in a row that lock the address out (0: never)
-- ARGV[4]  the longest lock-out, ms (the first is 1 s, each next one twice as long)
-- ARGV[5]  how long after the last wrong key, or the end of a lock-out, the address starts afresh, ms
-- ARGV[6]  the log interval, ms
-- Returns {until (0: not locked out), refusals to log now (0: none), unlogged left, strikes, ms of the last
--          log line, and when one is due now, ms of the line before it (0: none, it is the first)}.
local mode, now = ARGV[1], tonumber(ARGV[2])
local limit, longest, fresh, every = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local state = redis.call('HMGET', KEYS[1], 'failures', 'strikes', 'last', 'until', 'unlogged', 'logged')
local failures, strikes = tonumber(state[1]) or 0, tonumber(state[2]) or 0
local last, untill = tonumber(state[3]) or 0, tonumber(state[4]) or 0
local unlogged, logged = tonumber(state[5]) or 0, tonumber(state[6]) or 0
if mode == 'flush' and unlogged == 0 then
  return {untill > now and untill or 0, 0, 0, strikes, logged, 0}
end
if mode ~= 'flush' then
  unlogged = unlogged + 1
end
if mode == 'wrong' and untill <= now and limit > 0 then
  if now - math.max(last, untill) > fresh then
    failures, strikes = 0, 0
  end
  failures, last = failures + 1, now
  if strikes > 0 or failures >= limit then
    strikes = strikes + 1
    untill = now + math.floor(math.min(1000 * 2 ^ (strikes - 1), longest))
  end
end
local report, before = 0, logged
if unlogged > 0 and now - logged >= every then
  report, unlogged, logged = unlogged, 0, now
end
redis.call('HSET', KEYS[1], 'failures', failures, 'strikes', strikes, 'last', last, 'until', untill,
  'unlogged', unlogged, 'logged', logged)
redis.call('PEXPIRE', KEYS[1], math.max(untill, now) - now + fresh + every)
return {untill > now and untill or 0, report, unlogged, strikes, logged, report > 0 and before or 0}
