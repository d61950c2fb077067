-- wrk script for bench/dedup_bench.py: bench/wrk/post.lua (same arguments, same
-- BENCH_RESULT line), plus
--   - a fresh value of the header $DEDUP_HEADER on every request (none when it is
--     empty), so every keyed call is a new delivery: claimed, forwarded,
--     remembered. The values are "$DEDUP_PREFIX-<thread>-<n>": the harness gives
--     each run its own prefix;
--   - X-Bench-Dedup: $DEDUP_SWITCH ("keep" or "skip") on every request, read by
--     bench/dedup_switch.py.
--
--   DEDUP_HEADER=Idempotency-Key DEDUP_SWITCH=keep DEDUP_PREFIX=run1 \
--     WRK_POST_LUA=bench/wrk/post.lua wrk ... -s bench/wrk/dedup.lua URL -- ...

dofile(os.getenv("WRK_POST_LUA"))

local post_setup = setup
local next_thread = 0

function setup(thread)
   next_thread = next_thread + 1
   thread:set("thread_id", next_thread)
   post_setup(thread)
end

local counter = 0
local prefix = (os.getenv("DEDUP_PREFIX") or "dedup") .. "-"
local header = os.getenv("DEDUP_HEADER") or ""
wrk.headers["X-Bench-Dedup"] = os.getenv("DEDUP_SWITCH") or "keep"

function request()
   if header ~= "" then
      counter = counter + 1
      wrk.headers[header] = prefix .. (thread_id or 0) .. "-" .. counter
   end
   return wrk.format()
end
