-- Shared by the budget scripts (prepended to each). Keys of one call share the scope's
-- hash tag: KEYS[1] the day's hash {spend, open, r:<id> = open amount, c:<id> = expired
-- and charged amount, s:<id> = settled marker}; KEYS[2] a sorted set of due times:
-- 'r|<id>' when an open reservation expires, 's|<id>' when a settled marker is dropped.
--
-- Amounts are integers of 1e-9 USD up to 2^63 - 1, written as decimal strings. Lua
-- numbers are doubles (exact only below 2^53), so amounts are never added or compared as
-- Lua numbers: stored sums change only through HINCRBY (exact 64-bit), and comparisons
-- use two limbs of 9 digits each (every limb and limb sum is far below 2^53).

local LIMB = 1000000000

-- A non-negative integer string (or false/nil for 0) as {high, low}.
local function big(s)
  if not s then return {0, 0} end
  s = tostring(s)
  local n = #s
  if n <= 9 then return {0, tonumber(s)} end
  return {tonumber(string.sub(s, 1, n - 9)), tonumber(string.sub(s, n - 8))}
end

local function add(a, b)
  local lo = a[2] + b[2]
  local hi = a[1] + b[1]
  if lo >= LIMB then
    lo = lo - LIMB
    hi = hi + 1
  end
  return {hi, lo}
end

local function le(a, b)
  return a[1] < b[1] or (a[1] == b[1] and a[2] <= b[2])
end

-- max(a - b, 0)
local function sub0(a, b)
  if le(a, b) then return {0, 0} end
  local lo = a[2] - b[2]
  local hi = a[1] - b[1]
  if lo < 0 then
    lo = lo + LIMB
    hi = hi - 1
  end
  return {hi, lo}
end

local function str(a)
  if a[1] == 0 then return string.format('%.0f', a[2]) end
  return string.format('%.0f%09.0f', a[1], a[2])
end

local function decr(h, field, amount)
  if amount ~= '0' then redis.call('HINCRBY', h, field, '-' .. amount) end
end

-- Charges reservations whose time ran out (in full: open -> spend) and drops old settled
-- markers. At most 100 per call: the rest wait for the next call, and meanwhile count
-- as open, which weighs on the budget exactly as charged spend does.
local function sweep(h, z, now)
  local due = redis.call('ZRANGEBYSCORE', z, '-inf', now, 'LIMIT', 0, 100)
  local charged = 0
  for _, member in ipairs(due) do
    local id = string.sub(member, 3)
    if string.sub(member, 1, 1) == 'r' then
      local amount = redis.call('HGET', h, 'r:' .. id)
      if amount then
        redis.call('HDEL', h, 'r:' .. id)
        redis.call('HSET', h, 'c:' .. id, amount)
        decr(h, 'open', amount)
        redis.call('HINCRBY', h, 'spend', amount)
        charged = charged + 1
      end
    else
      redis.call('HDEL', h, 's:' .. id)
    end
    redis.call('ZREM', z, member)
  end
  return charged
end
