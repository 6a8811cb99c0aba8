-- Settlement: release the lease and turn the reservation into the real token count.
-- Idempotent: the first settle of a request wins (the worker on completion, or the gateway
-- refunding on failure, deadline or disconnect); later ones change nothing but the lease.
--
-- KEYS  1 leases  2 tenant leases  3 reservations  4 reservation amounts  5 token bucket
--       6 half-open probe holder of the deployment's upstream circuit
-- ARGV  1 request_id  2 tokens actually used  3 now_ms  4 ms per token (token bucket)
--       5 budget key prefix  6 drain counter prefix ('' when this was no completion)
--
-- Returns the tokens that had been reserved, or -1 if the request was already settled.

local rid = ARGV[1]
local actual = tonumber(ARGV[2])
local now = tonumber(ARGV[3])
local ms_per_token = tonumber(ARGV[4])

redis.call('ZREM', KEYS[1], rid)
redis.call('ZREM', KEYS[2], rid)
-- A probe that ends without reaching the upstream (dropped, cancelled, refunded) hands the
-- half-open circuit to the next request instead of blocking it until its deadline.
if redis.call('GET', KEYS[6]) == rid then redis.call('DEL', KEYS[6]) end
local entry = redis.call('HGET', KEYS[4], rid)
if not entry then return -1 end
-- A completion counts towards the drain rate (Retry-After) once, when it settles first.
if ARGV[6] ~= '' then
  local counter = ARGV[6] .. math.floor(now / 1000)
  redis.call('INCR', counter)
  redis.call('EXPIRE', counter, 30)
end
redis.call('HDEL', KEYS[4], rid)
redis.call('ZREM', KEYS[3], rid)
local month, amount = string.match(entry, '^(%d+):(%d+)$')
amount = tonumber(amount)
local budget = ARGV[5] .. month
if redis.call('EXISTS', budget) == 1 then
  redis.call('HINCRBY', budget, 'reserved', -amount)
  if actual > 0 then redis.call('HINCRBY', budget, 'used', actual) end
end

-- Give the unused part of the reservation back to the tokens-per-minute bucket.
local unused = amount - actual
if unused > 0 and ms_per_token > 0 then
  local tat = tonumber(redis.call('GET', KEYS[5]) or 0)
  if tat > now then
    local refunded = math.max(now, tat - unused * ms_per_token)
    redis.call('SET', KEYS[5], refunded, 'PX', math.max(1, math.ceil(refunded - now)))
  end
end
return amount
