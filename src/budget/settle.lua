-- One settlement, atomically (common.lua is prepended): the reservation is replaced by
-- the actual cost, whether it is still open or was charged in full on expiry.
-- ARGV: reservation id, actual cost, now, settled marker dropped at, keys kept until.
-- Returns {outcome: 0 nothing to settle (repeat, or never reserved), 1 settled,
-- 2 replaced the charge of an expired reservation; expired charged now}.
local h, z = KEYS[1], KEYS[2]
local id = ARGV[1]
local charged = sweep(h, z, ARGV[3])
local outcome = 0
local got = redis.call('HMGET', h, 'r:' .. id, 'c:' .. id)
local open, expired = got[1], got[2]
if open then
  redis.call('HDEL', h, 'r:' .. id)
  redis.call('ZREM', z, 'r|' .. id)
  decr(h, 'open', open)
  outcome = 1
elseif expired then
  redis.call('HDEL', h, 'c:' .. id)
  decr(h, 'spend', expired)
  outcome = 2
end
if outcome > 0 then
  redis.call('HINCRBY', h, 'spend', ARGV[2])
  redis.call('HSET', h, 's:' .. id, 1)
  redis.call('ZADD', z, ARGV[4], 's|' .. id)
  redis.call('EXPIREAT', h, ARGV[5])
  redis.call('EXPIREAT', z, ARGV[5])
end
return {outcome, charged}
