-- name=spillway_limits_reserve_v1
--
-- Admits or refuses one request of one caller, all or nothing, on Redis's clock:
-- one request from the requests bucket, `cost` tokens from the tokens bucket and a
-- concurrency slot (a lease in a sorted set). The decision order is the local
-- limiter's (src/limit/local.rs): a cost above the tokens capacity is "too large"
-- with nothing taken; otherwise every limit is looked at, and only if all agree is
-- anything taken.
--
-- The reply layout is read by `ReserveReply::parse` in src/limit/redis.rs, and the
-- argument order is written by `RedisLimiter::reserve` there: edit them together,
-- and bump the version in this name and in `LAYOUT_VERSION` when the stored layout
-- changes.
--
-- KEYS[1]  buckets hash: rl, ra (requests level, updated at); tl, ta (tokens)
-- KEYS[2]  slots sorted set: member = permit id, score = lease expiry (ms, Redis time)
-- ARGV[1]  requests capacity, 0 = no requests limit   ARGV[2] requests per minute
-- ARGV[3]  tokens capacity, 0 = no tokens limit       ARGV[4] tokens per minute
-- ARGV[5]  token cost                                  ARGV[6] max concurrent, 0 = none
-- ARGV[7]  permit id                                   ARGV[8] lease length, ms
--
-- Reply: { outcome (0 admitted, 1 denied, 2 too large),
--          requests remaining, requests reset (us), requests wait (us, 0 = fits),
--          tokens remaining, tokens reset (us), tokens wait (us, 0 = fits),
--          1 if no concurrency slot was free else 0 }
--
-- The bucket arithmetic (`load`, `wait`, `remaining`, `now`) is buckets.lua's,
-- which is put in front of this script when it is built.

local request_capacity, requests_per_minute = tonumber(ARGV[1]), tonumber(ARGV[2])
local token_capacity, tokens_per_minute = tonumber(ARGV[3]), tonumber(ARGV[4])
local cost, max_concurrent = tonumber(ARGV[5]), tonumber(ARGV[6])
local permit, lease_ms = ARGV[7], tonumber(ARGV[8])

local stored = redis.call('HMGET', KEYS[1], 'rl', 'ra', 'tl', 'ta')
local requests, tokens
if request_capacity > 0 then
  requests = load(stored[1], stored[2], request_capacity, requests_per_minute)
end
if token_capacity > 0 then
  tokens = load(stored[3], stored[4], token_capacity, tokens_per_minute)
end

local function reply(outcome, requests_wait, tokens_wait, slot_refused)
  local out = { outcome, 0, 0, requests_wait, 0, 0, tokens_wait, slot_refused }
  if requests then out[2], out[3] = remaining(requests), wait(requests, requests.full) end
  if tokens then out[5], out[6] = remaining(tokens), wait(tokens, tokens.full) end
  return out
end

-- 1. Tokens: a look. A cost above the capacity can never fit.
local tokens_wait = 0
if tokens then
  if cost > token_capacity then return reply(2, 0, 0, 0) end
  if cost > 0 then tokens_wait = wait(tokens, cost * UNIT) end
end

-- 2. Concurrency: expired leases (a replica that died holding them) are dropped.
local now_ms = math.floor(now / 1000)
local slot_refused = 0
if max_concurrent > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now_ms)
  if redis.call('ZCARD', KEYS[2]) >= max_concurrent then slot_refused = 1 end
end

-- 3. Requests: one, if the bucket holds it.
local requests_wait = 0
if requests then requests_wait = wait(requests, UNIT) end

if requests_wait > 0 or tokens_wait > 0 or slot_refused == 1 then
  return reply(1, requests_wait, tokens_wait, slot_refused)
end

-- 4. Everything agreed: take, write, and let the keys expire once full again.
local longest_reset = 0
local fields = {}
if requests then
  requests.level = requests.level - UNIT
  longest_reset = math.max(longest_reset, wait(requests, requests.full))
  table.insert(fields, 'rl'); table.insert(fields, string.format('%.0f', requests.level))
  table.insert(fields, 'ra'); table.insert(fields, string.format('%.0f', requests.at))
end
if tokens then
  tokens.level = tokens.level - cost * UNIT
  longest_reset = math.max(longest_reset, wait(tokens, tokens.full))
  table.insert(fields, 'tl'); table.insert(fields, string.format('%.0f', tokens.level))
  table.insert(fields, 'ta'); table.insert(fields, string.format('%.0f', tokens.at))
end
if #fields > 0 then
  redis.call('HSET', KEYS[1], unpack(fields))
  redis.call('PEXPIRE', KEYS[1], math.ceil(longest_reset / 1000) + MARGIN_MS)
end
if max_concurrent > 0 then
  redis.call('ZADD', KEYS[2], now_ms + lease_ms, permit)
  if redis.call('PTTL', KEYS[2]) < lease_ms + MARGIN_MS then
    redis.call('PEXPIRE', KEYS[2], lease_ms + MARGIN_MS)
  end
end
return reply(0, 0, 0, 0)
