-- Admission: one atomic decision per request, with nothing written when it is refused.
--
-- KEYS  1 leases (ZSET rid -> deadline)        2 tenant leases (ZSET)
--       3 demand (ZSET tenant -> last ask ms)   4 weights (HASH tenant -> weight)
--       5 key's request bucket (GCRA TAT)       6 tenant's token bucket (GCRA TAT)
--       7 budget this month (HASH used/reserved) 8 reservations (ZSET rid -> deadline)
--       9 reservation amounts (HASH rid -> "yyyymm:tokens")
--      10 breaker (exists while the upstream circuit is open)
--      11 deny flag of the key                  12 deny flag of the tenant
--      13 consecutive upstream failures          14 half-open probe holder
--      15 priority demand (HASH class -> last ask ms)
-- ARGV  1 now_ms  2 request_id  3 deadline_ms  4 tenant_id  5 weight
--       6 priority (0 high, 1 normal, 2 low)  7 capacity  8 requests per minute
--       9 tokens per minute  10 monthly budget  11 tokens to reserve  12 month (yyyymm)
--      13 budget key prefix  14 drain counter prefix  15 enforce capacity (1/0)
--      16 breaker failure threshold (0: this deployment has no upstream circuit)
--
-- Returns {verdict, retry_after_ms, requests_remaining, in_use, rate_reset_ms}.

local now = tonumber(ARGV[1])
local rid = ARGV[2]
local deadline = tonumber(ARGV[3])
local tenant = ARGV[4]
local weight = tonumber(ARGV[5])
local priority = tonumber(ARGV[6])
local capacity = tonumber(ARGV[7])
local rpm = tonumber(ARGV[8])
local tpm = tonumber(ARGV[9])
local monthly = tonumber(ARGV[10])
local cost = tonumber(ARGV[11])
local month = ARGV[12]
local budget_prefix = ARGV[13]
local drain_prefix = ARGV[14]
local enforce = ARGV[15] == '1'
local threshold = tonumber(ARGV[16])
local WINDOW = 60000
-- How long an ask counts as present demand, for fair shares and priority headroom.
local RECENT = 5000
-- Limits below 1 cannot be configured (validators); read them as 1 rather than divide by 0.
rpm = math.max(rpm, 1)
tpm = math.max(tpm, 1)

if redis.call('EXISTS', KEYS[11]) == 1 then return {'invalid_api_key', 0, 0, 0, 0} end
if redis.call('EXISTS', KEYS[12]) == 1 then return {'tenant_suspended', 0, 0, 0, 0} end
local open_ms = redis.call('PTTL', KEYS[10])
if open_ms > 0 then return {'upstream_unavailable', open_ms, 0, 0, 0} end
-- Half-open: the open period is over but no request has succeeded since. One probe at a
-- time goes through; the others are told to come back shortly.
local probing = false
if threshold > 0 and tonumber(redis.call('GET', KEYS[13]) or 0) >= threshold then
  local holder = redis.call('GET', KEYS[14])
  if holder and holder ~= rid then return {'upstream_unavailable', 1000, 0, 0, 0} end
  probing = true
end

-- The key's requests per minute: GCRA with a burst of one minute's worth.
local rate_interval = WINDOW / rpm
local rate_tat = tonumber(redis.call('GET', KEYS[5]) or now)
if rate_tat < now then rate_tat = now end
local new_rate_tat = rate_tat + rate_interval
if now < new_rate_tat - WINDOW then
  local wait = math.ceil(new_rate_tat - WINDOW - now)
  return {'rate_limited', wait, 0, 0, math.ceil(rate_tat - now)}
end
local remaining = math.floor((WINDOW - (new_rate_tat - now)) / rate_interval)
local reset_ms = math.ceil(new_rate_tat - now)

-- The tenant's tokens per minute, charged with the tokens reserved.
local token_interval = WINDOW / tpm
local tok_tat = tonumber(redis.call('GET', KEYS[6]) or now)
if tok_tat < now then tok_tat = now end
local new_tok_tat = tok_tat + cost * token_interval
if now < new_tok_tat - WINDOW then
  return {'tokens_rate_limited', math.ceil(new_tok_tat - WINDOW - now), remaining, 0, reset_ms}
end

-- The monthly budget. Reservations whose deadline passed are refunded first: a gateway that
-- died between admission and settlement cannot hold a tenant's budget for ever.
local expired = redis.call('ZRANGEBYSCORE', KEYS[8], '-inf', now)
for _, old in ipairs(expired) do
  local entry = redis.call('HGET', KEYS[9], old)
  if entry then
    local old_month, amount = string.match(entry, '^(%d+):(%d+)$')
    -- (A month whose key has expired is long over: nothing to give back there.)
    if redis.call('EXISTS', budget_prefix .. old_month) == 1 then
      redis.call('HINCRBY', budget_prefix .. old_month, 'reserved', -tonumber(amount))
    end
    redis.call('HDEL', KEYS[9], old)
  end
  redis.call('ZREM', KEYS[8], old)
end
local used = tonumber(redis.call('HGET', KEYS[7], 'used') or 0)
local reserved = tonumber(redis.call('HGET', KEYS[7], 'reserved') or 0)
if used + reserved + cost > monthly then
  return {'quota_exceeded', 0, remaining, 0, reset_ms}
end

-- The deployment's capacity, its priority classes and each tenant's fair share.
local in_use = 0
if enforce then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  in_use = redis.call('ZCARD', KEYS[1])
  local mine = redis.call('ZCARD', KEYS[2])
  redis.call('ZADD', KEYS[3], now, tenant)
  redis.call('HSET', KEYS[4], tenant, weight)
  redis.call('HSET', KEYS[15], priority, now)
  redis.call('PEXPIRE', KEYS[3], 60000)
  redis.call('PEXPIRE', KEYS[4], 60000)
  redis.call('PEXPIRE', KEYS[15], 60000)

  -- Lower priorities stop short of the full capacity while a higher class is asking, so
  -- they are shed first; with no higher class about, they may fill it.
  local function asking(class)
    return now - tonumber(redis.call('HGET', KEYS[15], class) or 0) < RECENT
  end
  local limit = capacity
  if priority == 2 and (asking(0) or asking(1)) then
    limit = math.max(1, math.floor(capacity * 0.75))
  elseif priority == 1 and asking(0) then
    limit = math.max(1, math.floor(capacity * 0.9))
  end
  local excess = 0
  local own_share = 1.0
  if in_use >= limit then
    excess = in_use - limit + 1
  elseif in_use * 2 >= capacity then
    -- Contention: a tenant may hold at most its weight's share among those asking now.
    redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now - RECENT)
    local total = 0
    for _, t in ipairs(redis.call('ZRANGE', KEYS[3], 0, -1)) do
      total = total + tonumber(redis.call('HGET', KEYS[4], t) or 1)
    end
    -- Rounded up, so that equal shares cover the whole capacity (3 tenants on 8: 3 each,
    -- not 2 each with 2 slots idle); the capacity itself still caps the total.
    local share = math.max(1, math.ceil(capacity * weight / math.max(total, weight)))
    if mine >= share then
      excess = mine - share + 1
      if in_use > 0 then own_share = math.max(mine, 1) / in_use end
    end
  end
  if excess > 0 then
    -- Retry-After from the measured drain rate: completions per second over the last
    -- 10 s, or the last 30 s (how long the counters live) when the recent window is empty.
    local second = math.floor(now / 1000)
    local done, window = 0, 0
    for i = 1, 30 do
      done = done + tonumber(redis.call('GET', drain_prefix .. (second - i)) or 0)
      window = i
      if i == 10 and done > 0 then break end
    end
    local rate = done / window * own_share
    local wait
    if rate > 0 then
      wait = math.ceil(excess / rate * 1000)
    else
      -- Nothing finished for 30 s: there is no drain rate to go by. Say the shortest wait;
      -- a refusal costs the client one round trip, a wait that is too long costs capacity.
      wait = 1000
    end
    return {'queue_full', wait, remaining, in_use, reset_ms}
  end
  redis.call('ZADD', KEYS[1], deadline, rid)
  redis.call('ZADD', KEYS[2], deadline, rid)
  -- The sets outlive their longest lease: a short lease never shortens their life.
  local keep = math.max(1000, deadline - now) + 60000
  for i = 1, 2 do
    if redis.call('PTTL', KEYS[i]) < keep then redis.call('PEXPIRE', KEYS[i], keep) end
  end
  in_use = in_use + 1
end

-- Admitted: only now is anything charged.
if probing then
  redis.call('SET', KEYS[14], rid, 'PX', math.max(1000, deadline - now))
end
redis.call('SET', KEYS[5], new_rate_tat, 'PX', math.max(1, math.ceil(new_rate_tat - now)))
redis.call('SET', KEYS[6], new_tok_tat, 'PX', math.max(1, math.ceil(new_tok_tat - now)))
redis.call('ZADD', KEYS[8], deadline, rid)
redis.call('HSET', KEYS[9], rid, month .. ':' .. cost)
redis.call('HINCRBY', KEYS[7], 'reserved', cost)
redis.call('PEXPIRE', KEYS[7], 3456000000)
return {'ok', 0, remaining, in_use, reset_ms}
