-- wrk script for benchmarks/serve.py: POST the bytes of the file $WRK_BODY (read in binary
-- mode, so an Open Inference Protocol binary body works too) with the headers listed in the
-- file $WRK_HEADERS ("Name: value" per line), and print a one-line JSON summary in done().
--
--   WRK_BODY=body.bin WRK_HEADERS=headers.txt \
--     wrk -t1 -c32 -d10s --latency --timeout 10s -s post.lua http://127.0.0.1:8000/predict
--
-- wrk counts a response with status > 399 in errors.status; no response() callback is set, so
-- wrk does not hand every response to Lua (that would cost load-generator CPU).

local body_path = assert(os.getenv("WRK_BODY"), "set WRK_BODY to the request body file")
local f = assert(io.open(body_path, "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()

local headers_path = os.getenv("WRK_HEADERS")
if headers_path then
  for line in io.lines(headers_path) do
    local k, v = line:match("^([^:]+):%s*(.-)%s*$")
    if k then wrk.headers[k] = v end
  end
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests":%.0f,"duration_us":%.0f,"bytes":%.0f,' ..
    '"errors":{"connect":%.0f,"read":%.0f,"write":%.0f,"status":%.0f,"timeout":%.0f},' ..
    '"latency_us":{"mean":%.2f,"stdev":%.2f,"min":%.0f,"max":%.0f,' ..
    '"p50":%.0f,"p75":%.0f,"p90":%.0f,"p99":%.0f,"p999":%.0f},"body_bytes":%.0f}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.mean, latency.stdev, latency.min, latency.max,
    latency:percentile(50), latency:percentile(75), latency:percentile(90),
    latency:percentile(99), latency:percentile(99.9), #wrk.body))
end
