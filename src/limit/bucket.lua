-- One decision on one identity's token bucket and daily counter, atomically, on
-- Redis's own clock (all instances share it; effects replicate, Redis >= 5).
--
-- KEYS[1]: the bucket, a hash {t = tokens (fractional), ts = unix microseconds}
-- KEYS[2], KEYS[3]: the daily counters (integers) of two consecutive days of
--   DAY_TIMEZONE, their dates in the key names: the caller's day and its neighbour
--   across the nearer midnight
-- ARGV: capacity, refill per second (may be fractional), daily quota, the unix second
--   at which the second day starts (the first ends), the unix second at which it ends
--
-- Days: Lua knows no time zones or DST, so the caller computes the days from its own
-- clock; Redis's TIME picks which of the two the decision falls in. Every instance thus
-- changes day at the same instant, Redis's midnight, whatever its own clock says; a
-- caller's clock would have to be half a day off for TIME to fall outside both days.
--
-- Returns {outcome, remaining, reset_ms, retry_ms}: outcome 0 admitted, 1 rate limited,
-- 2 daily quota exceeded. Lua numbers reach the client as truncated integers, so every
-- figure is rounded here on purpose and the fractional state never leaves the script.
-- A refusal writes nothing: it takes nothing from the bucket or the counter.
local capacity = tonumber(ARGV[1])
local rate = tonumber(ARGV[2])
local quota = tonumber(ARGV[3])
local boundary = tonumber(ARGV[4])
local late_end = tonumber(ARGV[5])

local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])

-- The day of this decision on Redis's clock, and when it ends (unix seconds).
local day_key, day_end = KEYS[3], late_end
if now < boundary * 1000000 then
  day_key, day_end = KEYS[2], boundary
end

local tokens = capacity
local bucket = redis.call('HMGET', KEYS[1], 't', 'ts')
if bucket[1] and bucket[2] then
  -- A clock that steps back refills nothing rather than taking tokens away.
  local elapsed = math.max(0, now - tonumber(bucket[2]))
  tokens = math.min(capacity, tonumber(bucket[1]) + elapsed * rate / 1000000)
end

local used = tonumber(redis.call('GET', day_key) or 0)

-- Bounded so that PEXPIRE always gets a plain integer (about a year).
local function millis(seconds_)
  return math.min(math.ceil(seconds_ * 1000), 31536000000)
end

local outcome = 0
local retry_ms = 0
if used >= quota then
  -- When both refuse, the daily quota answers. At least 1 ms: a Redis clock past both
  -- days (a caller half a day off) still answers a positive Retry-After.
  outcome = 2
  retry_ms = math.max(1, math.ceil((day_end * 1000000 - now) / 1000))
elseif tokens < 1 then
  outcome = 1
  retry_ms = millis((1 - tokens) / rate)
else
  tokens = tokens - 1
  local to_full_ms = millis((capacity - tokens) / rate)
  redis.call('HSET', KEYS[1], 't', string.format('%.17g', tokens), 'ts', string.format('%.0f', now))
  -- The bucket is forgotten once it would be full again: a missing bucket is a full one.
  redis.call('PEXPIRE', KEYS[1], to_full_ms + 1000)
  redis.call('INCR', day_key)
  -- No decision reads the counter once Redis's clock is past the day's end; the hour
  -- covers a replica promoted with a clock slightly behind.
  redis.call('EXPIREAT', day_key, day_end + 3600)
end

return {outcome, math.floor(math.max(tokens, 0)), millis((capacity - tokens) / rate), retry_ms}
