-- The limiter's decision and, when it admits, the (product, user) budget's reservation,
-- in one atomic call: one round trip where there were two. common.lua comes first, then
-- limit() (bucket.lua) and reserve() (reserve.lua), each given its own KEYS and ARGV.
-- KEYS[1..3], ARGV[1..5]: bucket.lua's; KEYS[4..5], ARGV[6..11]: reserve.lua's (all six
-- keys share the (product, user) hash tag: one Redis Cluster slot).
-- Returns bucket.lua's four figures, then reserve.lua's three; -1 in the fifth place
-- when the limits refused and nothing was reserved.
local decision = limit({KEYS[1], KEYS[2], KEYS[3]}, {ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]})
if decision[1] ~= 0 then
  return {decision[1], decision[2], decision[3], decision[4], -1, '0', 0}
end
local reserved = reserve({KEYS[4], KEYS[5]}, {ARGV[6], ARGV[7], ARGV[8], ARGV[9], ARGV[10], ARGV[11]})
return {decision[1], decision[2], decision[3], decision[4], reserved[1], reserved[2], reserved[3]}
