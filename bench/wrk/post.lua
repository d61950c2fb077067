-- wrk script for webhook-sidecar benchmarks.
--
--   wrk ... -s bench/wrk/post.lua URL -- TOKEN EXPECTED_STATUS [BODY [CODE]]
--
-- Sends one fixed JSON POST (built once per thread, so wrk stays fast):
-- Content-Type: application/json, Authorization: Bearer TOKEN (TOKEN "-"
-- sends no Authorization header), BODY defaulting to the issue's small call.
-- With CODE, a response of EXPECTED_STATUS must also carry the string "CODE"
-- in its body (a 429 locked_out is not a 429 rate_limited); the others count
-- as "wrong_code".
--
-- Counts every response status, because throughput alone hides a target that
-- answers fast with the wrong thing (a 401 instead of a 200, a 429 from a rate
-- limit, a 502 from a broken upstream). At the end it prints one line
--   BENCH_RESULT {json}
-- with the request count, wrk's socket errors, the status counts, how many
-- responses were not EXPECTED_STATUS ("unexpected"), and latency percentiles
-- in microseconds. bench/run.py parses that line; a human can read it too.

local threads = {}

function setup(thread)
   table.insert(threads, thread)
end

function init(args)
   local token = args[1] or "-"
   expected = tonumber(args[2] or "200")
   local body = args[3] or '{"agent":"my-agent","message":"hello"}'
   if args[4] then
      code_mark = '"' .. args[4] .. '"'
   end
   wrong_code = 0
   wrk.method = "POST"
   wrk.body = body
   wrk.headers["Content-Type"] = "application/json"
   if token ~= "-" then
      wrk.headers["Authorization"] = "Bearer " .. token
   end
   statuses = {}
end

function response(status, headers, body)
   statuses[status] = (statuses[status] or 0) + 1
   if code_mark and status == expected and not string.find(body, code_mark, 1, true) then
      wrong_code = wrong_code + 1
   end
end

function done(summary, latency, requests)
   local agg = {}
   local expected_status = 200
   local wrong = 0
   for _, t in ipairs(threads) do
      expected_status = t:get("expected") or expected_status
      wrong = wrong + (t:get("wrong_code") or 0)
      local s = t:get("statuses") or {}
      for k, v in pairs(s) do
         agg[k] = (agg[k] or 0) + v
      end
   end
   local parts = {}
   local unexpected = 0
   local counted = 0
   for k, v in pairs(agg) do
      parts[#parts + 1] = string.format('"%d":%d', k, v)
      counted = counted + v
      if k ~= expected_status then
         unexpected = unexpected + v
      end
   end
   local e = summary.errors
   io.write(string.format(
      'BENCH_RESULT {"requests":%d,"duration_us":%d,"bytes":%d,' ..
      '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
      '"statuses":{%s},"counted":%d,"expected":%d,"unexpected":%d,"wrong_code":%d,' ..
      '"latency_us":{"min":%d,"mean":%.1f,"stdev":%.1f,"max":%d,' ..
      '"p50":%d,"p75":%d,"p90":%d,"p99":%d,"p999":%d}}\n',
      summary.requests, summary.duration, summary.bytes,
      e.connect, e.read, e.write, e.status, e.timeout,
      table.concat(parts, ","), counted, expected_status, unexpected, wrong,
      latency.min, latency.mean, latency.stdev, latency.max,
      latency:percentile(50), latency:percentile(75), latency:percentile(90),
      latency:percentile(99), latency:percentile(99.9)))
end
