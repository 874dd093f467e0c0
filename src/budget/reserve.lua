-- One scope's admission decision, atomically (common.lua is prepended).
-- ARGV: reservation id, amount, budget, now, expires at, keys kept until (unix seconds).
-- Returns {admitted 0/1, remaining before this request (string), expired charged now}.
-- Repeatable: an id already reserved, charged or settled is admitted again without
-- adding anything.
local h, z = KEYS[1], KEYS[2]
local id, amount, budget = ARGV[1], ARGV[2], big(ARGV[3])
local charged = sweep(h, z, ARGV[4])
-- One read for all this decision needs (each call from a script has its cost).
local got = redis.call('HMGET', h, 'spend', 'open', 'r:' .. id, 'c:' .. id, 's:' .. id)
local committed = add(big(got[1]), big(got[2]))

local own = got[3] or got[4]
if own then
  return {1, str(sub0(budget, sub0(committed, big(own)))), charged}
end
local remaining = str(sub0(budget, committed))
if got[5] then
  return {1, remaining, charged}
end
if not le(add(committed, big(amount)), budget) then
  return {0, remaining, charged}
end
redis.call('HSET', h, 'r:' .. id, amount)
redis.call('HINCRBY', h, 'open', amount)
redis.call('ZADD', z, ARGV[5], 'r|' .. id)
redis.call('EXPIREAT', h, ARGV[6])
redis.call('EXPIREAT', z, ARGV[6])
return {1, remaining, charged}
