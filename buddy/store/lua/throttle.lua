-- Reserve the earliest upstream start time for one domain that keeps every window within its limit.
-- KEYS[1]  the sorted set of reserved start times (score = start, ms since the epoch): the domain's, or, for a
--          mapping with per-credential limits, the credential partition's
-- KEYS[2]  the penalty hash of the requests' partition: until (ms), level, last (ms of the last penalty event):
--          the credential partition's, or the domain's for requests without credentials
-- KEYS[3]  the domain's penalty hash (the same as KEYS[2] for requests without credentials): a pause that applies
--          to every partition
-- ARGV[1]  this request's unique member name
-- ARGV[2]  the longest delay, in ms, a request may be held before it is refused instead
-- ARGV[3]  guard, in ms, added to every window (absorbs jitter between reservation and arrival upstream)
-- ARGV[4]  quiet period, in ms, after which the penalty level decays to 0
-- ARGV[5..] pairs of window length (ms) and limit; at most a handful
-- Returns {accepted 1|0, delay ms, binding limit, binding window ms, penalty level, reserved 1|0}: accepted and not
-- reserved means paused: wait `delay`, then ask again.
-- Time comes from Redis, so every worker and host agrees on it. A refused request reserves nothing,
-- and raises the penalty (exponential, capped at the longest delay) like an upstream 429 would.
-- The work is one function, `throttle(starts key, penalty key, domain penalty key, args, first)`, reading the ARGV
-- above from
-- args[first], args[first + 1], ...: lead.lua runs the same function after taking the fill lock.
local function throttle(starts, penalty_key, domain_penalty_key, args, first)
  local clock = redis.call('TIME')
  local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
  local member = args[first]
  local max_delay = tonumber(args[first + 1])
  local guard = tonumber(args[first + 2])
  local quiet = tonumber(args[first + 3])

  local penalty = redis.call('HMGET', penalty_key, 'until', 'level', 'last')
  local penalty_until = tonumber(penalty[1]) or 0
  local level = tonumber(penalty[2]) or 0
  local last_event = tonumber(penalty[3]) or 0
  if level > 0 and now - last_event > quiet then
    level = 0
    redis.call('HSET', penalty_key, 'level', 0)
  end

  local function refuse(delay, limit, window)
    level = level + 1
    local pause = math.min(1000 * 2 ^ (level - 1), max_delay)
    redis.call('HSET', penalty_key, 'until', math.max(penalty_until, now + pause), 'level', level, 'last', now)
    redis.call('PEXPIRE', penalty_key, math.max(penalty_until, now + pause) - now + quiet)
    return {0, delay, limit, window, level, 0}
  end

  -- Paused (this partition, or the whole domain): wait until the pause ends, then ask again. Nothing is reserved
  -- meanwhile, so that a paused partition's requests hold back no other partition's.
  local paused_until = penalty_until
  if domain_penalty_key ~= penalty_key then
    paused_until = math.max(paused_until, tonumber(redis.call('HGET', domain_penalty_key, 'until')) or 0)
  end
  local t = math.max(now, paused_until)
  local newest = redis.call('ZRANGE', starts, -1, -1, 'WITHSCORES')
  if newest[2] and tonumber(newest[2]) > t then
    t = tonumber(newest[2])  -- starts are handed out in order, so only windows ending at t matter
  end

  local binding_limit, binding_window, longest = 0, 0, 0
  for _ = 1, 8 do
    local moved = false
    for i = first + 4, #args, 2 do
      local span = tonumber(args[i]) + guard
      local limit = tonumber(args[i + 1])
      if span > longest then longest = span end
      local inside = redis.call('ZCOUNT', starts, '(' .. (t - span), '+inf')
      if inside >= limit then
        local oldest = redis.call('ZRANGEBYSCORE', starts, '(' .. (t - span), '+inf', 'WITHSCORES', 'LIMIT', inside - limit, 1)
        t = tonumber(oldest[2]) + span
        binding_limit, binding_window, moved = limit, tonumber(args[i]), true
      end
    end
    if not moved then break end
  end

  local delay = t - now
  if delay > max_delay then
    return refuse(delay, binding_limit, binding_window)
  end
  if paused_until > now then
    return {1, paused_until - now, binding_limit, binding_window, level, 0}
  end

  redis.call('ZADD', starts, t, member)
  redis.call('ZREMRANGEBYSCORE', starts, '-inf', now - longest)
  redis.call('PEXPIRE', starts, delay + longest)
  return {1, delay, binding_limit, binding_window, level, 1}
end
-- main: the standalone script (lead.lua reuses everything above this line)
return throttle(KEYS[1], KEYS[2], KEYS[3], ARGV, 1)
