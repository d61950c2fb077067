-- wrk script for bench/spool_bench.py: bench/wrk/post.lua (same arguments, same
-- BENCH_RESULT line) that stops sending once FILL_COUNT answers have come back, so
-- the spool is filled with that many events, give or take the calls in flight (at
-- most one per connection). Use one thread (-t1): the count is per thread. wrk itself
-- waits out its -d: the harness ends it with SIGINT once the events are on disk, and
-- wrk then prints its result.
--
--   FILL_COUNT=100000 WRK_POST_LUA=bench/wrk/post.lua wrk -t1 -d 3600s ... -s bench/wrk/fill.lua URL -- ...

dofile(os.getenv("WRK_POST_LUA"))

local post_response = response
local wanted = tonumber(os.getenv("FILL_COUNT") or "0")
local got = 0

function response(status, headers, body)
   post_response(status, headers, body)
   got = got + 1
   if wanted > 0 and got >= wanted then
      wrk.thread:stop()
   end
end
