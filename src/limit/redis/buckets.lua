-- The bucket arithmetic shared by reserve.lua and settle.lua, put in front of each
-- when it is built (src/limit/redis.rs): one definition of how a stored bucket is
-- read and refilled.
--
-- Levels are integer micro-tokens (1e-6 token); a bucket refills exactly
-- `per_minute` micro-tokens every 60 us, so refill is exact integer arithmetic in
-- Lua's doubles (every value stays below 2^53) and never drifts. A missing hash or
-- field is a full bucket: keys expire once their buckets are full again. Time is
-- Redis's (`TIME`), in microseconds.

local UNIT = 1000000
local STEP = 60
local DEBT_FLOOR = -4503599627370496
local LONGEST = 4503599627370496
local MARGIN_MS = 1000

local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])

local function floor_div(a, b)
  local q = math.floor(a / b)
  if q * b > a then q = q - 1 elseif (q + 1) * b <= a then q = q + 1 end
  return q
end

local function ceil_div(a, b)
  local q = floor_div(a, b)
  if q * b < a then q = q + 1 end
  return q
end

-- A bucket brought up to `now`; a missing level is a full bucket.
local function load(level, at, capacity, per_minute)
  local b = { full = capacity * UNIT, rate = per_minute }
  level, at = tonumber(level), tonumber(at)
  if level == nil or at == nil then
    b.level, b.at = b.full, now
    return b
  end
  b.level, b.at = math.max(level, DEBT_FLOOR), at
  if now > b.at then
    local steps = math.floor((now - b.at) / STEP)
    local refilled = b.level + steps * b.rate
    if refilled >= b.full then
      b.level, b.at = b.full, now
    else
      b.level, b.at = refilled, b.at + steps * STEP
    end
  end
  return b
end

-- Microseconds until the level reaches `target` micro-tokens; 0 if it has.
local function wait(b, target)
  local missing = target - b.level
  if missing <= 0 then return 0 end
  local us = b.at + ceil_div(missing, b.rate) * STEP - now
  return math.min(math.max(us, 1), LONGEST)
end

local function remaining(b)
  if b.level <= 0 then return 0 end
  return floor_div(b.level, UNIT)
end

