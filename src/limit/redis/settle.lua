-- name=spillway_limits_settle_v1
--
-- Corrects an admitted request's tokens once its real usage is known, on Redis's
-- clock: `delta` > 0 charges more (the bucket may go into debt), `delta` < 0 refunds
-- (never above capacity). Same stored layout and arithmetic as reserve.lua (see
-- there); the argument order is written by `RedisLimiter::settle` in
-- src/limit/redis.rs: edit them together.
--
-- KEYS[1]  buckets hash: tl, ta (tokens level in micro-tokens, updated at in us)
-- ARGV[1]  tokens capacity   ARGV[2] tokens per minute   ARGV[3] delta, in tokens
--
-- Reply: the tokens remaining after settling.
--
-- A missing bucket is a full one (its key expired because it had refilled), so a
-- charge is still recorded after the key has gone; a refund into it changes nothing.

local UNIT = 1000000
local STEP = 60
local DEBT_FLOOR = -4503599627370496
local MARGIN_MS = 1000

local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])

local capacity, per_minute, delta = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local full = capacity * UNIT

local stored = redis.call('HMGET', KEYS[1], 'tl', 'ta')
local level, at = tonumber(stored[1]), tonumber(stored[2])
if level == nil or at == nil then
  if delta <= 0 then return capacity end
  level, at = full, now
end
level = math.max(level, DEBT_FLOOR)
if now > at then
  local steps = math.floor((now - at) / STEP)
  if level + steps * per_minute >= full then
    level, at = full, now
  else
    level, at = level + steps * per_minute, at + steps * STEP
  end
end

level = math.min(math.max(level - delta * UNIT, DEBT_FLOOR), full)

local missing = full - level
local reset_us = 0
if missing > 0 then
  local steps = math.floor(missing / per_minute)
  if steps * per_minute < missing then steps = steps + 1 end
  reset_us = at + steps * STEP - now
end
redis.call('HSET', KEYS[1], 'tl', string.format('%.0f', level), 'ta', string.format('%.0f', at))
local keep_ms = math.ceil(math.max(reset_us, 0) / 1000) + MARGIN_MS
if redis.call('PTTL', KEYS[1]) < keep_ms then
  redis.call('PEXPIRE', KEYS[1], keep_ms)
end
if level <= 0 then return 0 end
return math.floor(level / UNIT)
