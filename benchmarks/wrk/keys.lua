-- Keystile benchmark: which API key each request carries, and a parseable result line.
--
-- Configured through the environment, because wrk decides whether a script is "dynamic" (calls
-- request() per request) when it loads the script, before init(args) runs:
--
--   KS_MODE      fixed      the first key of KS_KEYS on every request (static request, cheapest)
--                zipf       a key per request, Zipf(KS_ZIPF_S) over KS_KEYS: the key on line i has
--                           weight 1/i^s; precomputed CDF + binary search (LuaJIT PRNG, fixed seed)
--                cycle      the keys of KS_KEYS in order, wrapping (unknown keys: every one a miss)
--                missing    no key header
--                malformed  a key of the right prefix but the wrong shape
--   KS_KEYS      file with one key per line
--   KS_ZIPF_S    Zipf exponent (default 1.1)
--   KS_HEADER    header carrying the key (default X-API-Key)
--   KS_SEED      PRNG seed for zipf (default 1): give every run its own, or a run replays the
--                keys of the one before and finds them all cached
--
-- done() prints one line: KS_BENCH {json}, latencies in microseconds.

local mode = os.getenv("KS_MODE") or "fixed"
local keys_path = os.getenv("KS_KEYS")
local zipf_s = tonumber(os.getenv("KS_ZIPF_S") or "1.1")
local header = os.getenv("KS_HEADER") or "X-API-Key"
local seed = tonumber(os.getenv("KS_SEED") or "1")

local function first_line(path)
  for line in io.lines(path) do
    if #line > 0 then return line end
  end
  error("no keys in " .. path)
end

if mode == "fixed" then
  wrk.headers[header] = first_line(keys_path)
elseif mode == "missing" then
  wrk.headers[header] = nil
elseif mode == "malformed" then
  wrk.headers[header] = "ks_live_this-is-not-a-keystile-key"
elseif mode == "zipf" or mode == "cycle" then
  -- One prebuilt request string per key (built in init, i.e. once per wrk thread): request()
  -- then allocates nothing, so LuaJIT's GC never walks the big tables during the run and wrk
  -- stays cheap enough to leave the server under test the bottleneck.
  local reqs, n, cdf = {}, 0, {}

  function init(args)
    local tmpl = wrk.format(nil, nil, { [header] = "\1" })
    local head, tail = tmpl:match("^(.-)\1(.*)$")
    for line in io.lines(keys_path) do
      if #line > 0 then
        n = n + 1
        reqs[n] = head .. line .. tail
      end
    end
    if n == 0 then error("no keys in " .. keys_path) end
    if mode == "zipf" then
      local total = 0.0
      for i = 1, n do
        total = total + 1.0 / (i ^ zipf_s)
        cdf[i] = total
      end
      for i = 1, n do cdf[i] = cdf[i] / total end
    end
    math.randomseed(seed)
    collectgarbage("collect")
  end

  if mode == "zipf" then
    local random, floor = math.random, math.floor
    request = function()
      local u = random()
      local lo, hi = 1, n
      while lo < hi do
        local mid = floor((lo + hi) / 2)
        if cdf[mid] < u then lo = mid + 1 else hi = mid end
      end
      return reqs[lo]
    end
  else
    local i = 0
    request = function()
      i = i % n + 1
      return reqs[i]
    end
  end
else
  error("unknown KS_MODE " .. mode)
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'KS_BENCH {"requests":%d,"duration_us":%d,"bytes":%d,"connect_errors":%d,"read_errors":%d,'
      .. '"write_errors":%d,"non_2xx_3xx":%d,"timeouts":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,'
      .. '"mean_us":%.1f,"max_us":%d}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status,
    e.timeout, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.mean, latency.max))
end
