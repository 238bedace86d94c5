-- name=spillway_limits_settle_v1
--
-- Corrects an admitted request's tokens once its real usage is known, on Redis's
-- clock: `delta` > 0 charges more (the bucket may go into debt), `delta` < 0 refunds
-- (never above capacity). Same stored layout as reserve.lua (see there), and the
-- same arithmetic (buckets.lua, put in front of this script); the argument order is written by `RedisLimiter::settle` in
-- src/limit/redis.rs: edit them together.
--
-- KEYS[1]  buckets hash: tl, ta (tokens level in micro-tokens, updated at in us)
-- KEYS[2]  slots sorted set (reserve.lua's)
-- ARGV[1]  tokens capacity, 0 = no tokens limit   ARGV[2] tokens per minute
-- ARGV[3]  delta, in tokens                        ARGV[4] permit id to release, "" = none
--
-- Reply: the tokens remaining after settling (0 without a tokens limit).
--
-- The request's concurrency lease is removed here too, so that ending a request is
-- one call.
--
-- A missing bucket is a full one (its key expired because it had refilled), so a
-- charge is still recorded after the key has gone; a refund into it changes nothing.

local capacity, per_minute, delta = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local permit = ARGV[4]

if permit ~= nil and permit ~= '' then
  redis.call('ZREM', KEYS[2], permit)
end
if capacity == 0 or delta == 0 then
  return 0
end

local stored = redis.call('HMGET', KEYS[1], 'tl', 'ta')
if (tonumber(stored[1]) == nil or tonumber(stored[2]) == nil) and delta <= 0 then
  return capacity
end
local tokens = load(stored[1], stored[2], capacity, per_minute)
tokens.level = math.min(math.max(tokens.level - delta * UNIT, DEBT_FLOOR), tokens.full)

redis.call('HSET', KEYS[1], 'tl', string.format('%.0f', tokens.level), 'ta', string.format('%.0f', tokens.at))
local keep_ms = math.ceil(wait(tokens, tokens.full) / 1000) + MARGIN_MS
if redis.call('PTTL', KEYS[1]) < keep_ms then
  redis.call('PEXPIRE', KEYS[1], keep_ms)
end
return remaining(tokens)
