-- wrk script for the benchmark: optional POST body, and a done() that prints
-- the numbers on one line that run.py parses ("BENCH_RESULT {json}").
-- BENCH_POST_BYTES=N makes every request a POST of N bytes to the URL.

local post_bytes = tonumber(os.getenv("BENCH_POST_BYTES") or "")
if post_bytes and post_bytes > 0 then
  wrk.method = "POST"
  wrk.body = string.rep("x", post_bytes)
  wrk.headers["Content-Type"] = "application/octet-stream"
end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_RESULT {"duration_us":%.0f,"requests":%.0f,"bytes":%.0f,' ..
    '"errors":{"connect":%.0f,"read":%.0f,"write":%.0f,"status":%.0f,"timeout":%.0f},' ..
    '"latency_us":{"min":%.0f,"mean":%.1f,"p50":%.0f,"p90":%.0f,"p99":%.0f,"p999":%.0f,"max":%.0f}}\n',
    summary.duration, summary.requests, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.min, latency.mean, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency:percentile(99.9), latency.max))
end
