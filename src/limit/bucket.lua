-- One decision on one identity's token bucket and daily counter, atomically, on
-- Redis's own clock (all instances share it; effects replicate, Redis >= 5).
--
-- KEYS[1]: the bucket, a hash {t = tokens (fractional), ts = unix microseconds}
-- KEYS[2]: the daily counter, a hash {d = UTC day number, n = requests that day}
-- ARGV: capacity, refill per second (may be fractional), daily quota
--
-- Returns {outcome, remaining, reset_ms, retry_ms}: outcome 0 admitted, 1 rate limited,
-- 2 daily quota exceeded. Lua numbers reach the client as truncated integers, so every
-- figure is rounded here on purpose and the fractional state never leaves the script.
-- A refusal writes nothing: it takes nothing from the bucket or the counter.
local capacity = tonumber(ARGV[1])
local rate = tonumber(ARGV[2])
local quota = tonumber(ARGV[3])

local time = redis.call('TIME')
local seconds = tonumber(time[1])
local now = seconds * 1000000 + tonumber(time[2])
local today = math.floor(seconds / 86400)

local tokens = capacity
local bucket = redis.call('HMGET', KEYS[1], 't', 'ts')
if bucket[1] and bucket[2] then
  -- A clock that steps back refills nothing rather than taking tokens away.
  local elapsed = math.max(0, now - tonumber(bucket[2]))
  tokens = math.min(capacity, tonumber(bucket[1]) + elapsed * rate / 1000000)
end

local used = 0
local counter = redis.call('HMGET', KEYS[2], 'd', 'n')
if counter[1] and tonumber(counter[1]) == today then
  used = tonumber(counter[2])
end

-- Bounded so that PEXPIRE always gets a plain integer (about a year).
local function millis(seconds_)
  return math.min(math.ceil(seconds_ * 1000), 31536000000)
end

local outcome = 0
local retry_ms = 0
if used >= quota then
  -- When both refuse, the daily quota answers.
  outcome = 2
  retry_ms = math.ceil(((today + 1) * 86400 * 1000000 - now) / 1000)
elseif tokens < 1 then
  outcome = 1
  retry_ms = millis((1 - tokens) / rate)
else
  tokens = tokens - 1
  used = used + 1
  local to_full_ms = millis((capacity - tokens) / rate)
  redis.call('HSET', KEYS[1], 't', string.format('%.17g', tokens), 'ts', string.format('%.0f', now))
  -- The bucket is forgotten once it would be full again: a missing bucket is a full one.
  redis.call('PEXPIRE', KEYS[1], to_full_ms + 1000)
  redis.call('HSET', KEYS[2], 'd', today, 'n', used)
  -- Yesterday's counter means nothing; an hour's margin covers instances' clock skew.
  redis.call('EXPIREAT', KEYS[2], (today + 1) * 86400 + 3600)
end

return {outcome, math.floor(math.max(tokens, 0)), millis((capacity - tokens) / rate), retry_ms}
