-- wrk script for bench/soak.py: many client addresses, a mix of calls.
--
--   wrk ... -s bench/wrk/soak.lua URL -- SECRET BAD_TOKEN THROTTLED_AGENT THREADS
--
-- The sidecar trusts 127.0.0.1 as a proxy, so X-Forwarded-For names the
-- client; it is set per request. Each call is, at random:
--   35% valid, from a fresh address                 200 (403 from 224.0.0.0/3)
--   30% bad token, from a fresh address             401: a lockout record (403 ...)
--   15% bad token, from a "hammer" address: each    401 x 10, then 429 locked_out:
--       one is used for 12 calls in a row               a lock
--   10% valid, from one of 64 hot addresses         429 rate_limited past the burst
--   10% valid, to the throttled agent, fresh        200 up to its 20/s, then 429
-- Fresh addresses are distinct by construction: the n-th one (all threads
-- together) is n * 2654435761 mod 2^32 (an odd multiplier: a bijection),
-- spelled as IPv4 for even n and as an IPv6 /64 in 2001:db8::/32 for odd n
-- (the lockout and the per-IP limit group IPv6 by /64). Hammer addresses are
-- /64s in 2001:db9::/32, hot ones in 2001:dba::/64: no overlap.
--
-- At the end it prints one line
--   SOAK_RESULT {json}
-- with the request count, socket errors, the status counts, the calls per
-- kind, and how many distinct addresses were sent.

local threads = {}
local nsetup = 0

function setup(thread)
   nsetup = nsetup + 1
   thread:set("tid", nsetup)
   table.insert(threads, thread)
end

local M = 2654435761
local TWO32 = 4294967296
local HOT = 64
local HAMMER_CALLS = 12

-- n * M mod 2^32, exact in doubles (a plain n * M passes 2^53 past n = 3.4M).
local function scramble(n)
   local hi, lo = math.floor(n / 65536), n % 65536
   return (((hi * M) % TWO32) * 65536 + lo * M) % TWO32
end

local function v4(x)
   return string.format("%d.%d.%d.%d", math.floor(x / 16777216), math.floor(x / 65536) % 256,
                        math.floor(x / 256) % 256, x % 256)
end

local function v6(prefix, x)
   return string.format("%s:%x:%x:%x:%x:%x:%x", prefix, math.floor(x / 65536), x % 65536,
                        math.random(0, 65535), math.random(0, 65535),
                        math.random(0, 65535), math.random(0, 65535))
end

function init(args)
   secret, bad, throttled = args[1], args[2], args[3]
   nthreads = tonumber(args[4] or "1")
   math.randomseed(os.time() * 7919 + tid)
   fresh, hammers, hammer_left = 0, 0, 0
   kinds = {valid = 0, bad = 0, hammer = 0, hot = 0, throttled = 0}
   statuses = {}
   body_main = '{"agent":"my-agent","message":"hello"}'
   body_throttled = '{"agent":"' .. throttled .. '","message":"hello"}'
   headers = {["Content-Type"] = "application/json"}
end

local function fresh_address()
   local n = fresh * nthreads + tid - 1
   fresh = fresh + 1
   local x = scramble(n)
   if n % 2 == 0 then
      return v4(x)
   end
   return v6("2001:db8", x)
end

local function hammer_address()
   if hammer_left == 0 then
      hammers = hammers + 1
      hammer_left = HAMMER_CALLS
   end
   hammer_left = hammer_left - 1
   local n = (hammers - 1) * nthreads + tid - 1
   return string.format("2001:db9:%x:%x::1", math.floor(n / 65536), n % 65536)
end

function request()
   local r = math.random(0, 99)
   local token, body, addr = secret, body_main, nil
   if r < 35 then
      kinds.valid = kinds.valid + 1
      addr = fresh_address()
   elseif r < 65 then
      kinds.bad = kinds.bad + 1
      token, addr = bad, fresh_address()
   elseif r < 80 then
      kinds.hammer = kinds.hammer + 1
      token, addr = bad, hammer_address()
   elseif r < 90 then
      kinds.hot = kinds.hot + 1
      addr = string.format("2001:dba::%x", math.random(0, HOT - 1))
   else
      kinds.throttled = kinds.throttled + 1
      body, addr = body_throttled, fresh_address()
   end
   headers["Authorization"] = "Bearer " .. token
   headers["X-Forwarded-For"] = addr
   return wrk.format("POST", nil, headers, body)
end

function response(status, headers, body)
   statuses[status] = (statuses[status] or 0) + 1
end

local function json_counts(t)
   local parts = {}
   for k, v in pairs(t) do
      parts[#parts + 1] = string.format('"%s":%d', tostring(k), v)
   end
   return "{" .. table.concat(parts, ",") .. "}"
end

function done(summary, latency, requests)
   local st, kd = {}, {}
   local fresh_all, hammers_all, hot_used = 0, 0, 0
   for _, t in ipairs(threads) do
      for k, v in pairs(t:get("statuses") or {}) do
         st[k] = (st[k] or 0) + v
      end
      for k, v in pairs(t:get("kinds") or {}) do
         kd[k] = (kd[k] or 0) + v
      end
      fresh_all = fresh_all + (t:get("fresh") or 0)
      hammers_all = hammers_all + (t:get("hammers") or 0)
   end
   if (kd.hot or 0) > 0 then
      hot_used = HOT
   end
   local e = summary.errors
   io.write(string.format(
      'SOAK_RESULT {"requests":%d,"duration_us":%d,' ..
      '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
      '"statuses":%s,"kinds":%s,"addresses":{"fresh":%d,"hammer":%d,"hot":%d},' ..
      '"latency_us":{"p50":%d,"p99":%d,"max":%d}}\n',
      summary.requests, summary.duration,
      e.connect, e.read, e.write, e.status, e.timeout,
      json_counts(st), json_counts(kd), fresh_all, hammers_all, hot_used,
      latency:percentile(50), latency:percentile(99), latency.max))
end
