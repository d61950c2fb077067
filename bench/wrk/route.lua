-- wrk script for bench/routes_bench.py: one fixed POST whose body is read from a file.
--
--   wrk ... -s bench/wrk/route.lua URL -- BODY_FILE EXPECTED_STATUS [Name:value ...]
--
-- Prints one line "BENCH_RESULT {json}" with the request count, the status counts and
-- how many responses were not EXPECTED_STATUS.

local threads = {}

function setup(thread)
   table.insert(threads, thread)
end

function init(args)
   local f = assert(io.open(args[1], "rb"))
   wrk.body = f:read("*a")
   f:close()
   expected = tonumber(args[2])
   wrk.method = "POST"
   wrk.headers["Content-Type"] = "application/json"
   for i = 3, #args do
      local name, value = string.match(args[i], "^([^:]+):(.*)$")
      wrk.headers[name] = value
   end
   statuses = {}
end

function response(status, headers, body)
   statuses[status] = (statuses[status] or 0) + 1
end

function done(summary, latency, requests)
   local agg, unexpected, expected_status = {}, 0, 200
   for _, t in ipairs(threads) do
      expected_status = t:get("expected") or expected_status
      for k, v in pairs(t:get("statuses") or {}) do
         agg[k] = (agg[k] or 0) + v
      end
   end
   local parts = {}
   for k, v in pairs(agg) do
      parts[#parts + 1] = string.format('"%d":%d', k, v)
      if k ~= expected_status then
         unexpected = unexpected + v
      end
   end
   io.write(string.format(
      'BENCH_RESULT {"requests":%d,"duration_us":%d,"statuses":{%s},"unexpected":%d,' ..
      '"p50_us":%d,"p99_us":%d}\n',
      summary.requests, summary.duration, table.concat(parts, ","), unexpected,
      latency:percentile(50), latency:percentile(99)))
end
