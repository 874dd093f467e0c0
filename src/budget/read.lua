-- A scope's figures for the day, expired reservations charged first (common.lua is
-- prepended). ARGV: now. Returns {spend, open} as strings ('0' for an unknown day) and the
-- count of expired reservations charged now.
local h, z = KEYS[1], KEYS[2]
local charged = sweep(h, z, ARGV[1])
local got = redis.call('HMGET', h, 'spend', 'open')
return {got[1] or '0', got[2] or '0', charged}
