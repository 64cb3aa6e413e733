-- wrk -s: print the run's summary as one JSON line (latencies in microseconds).
-- Only done() is defined, so wrk keeps sending its static request at full speed.
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%.0f,"duration_us":%.0f,"bytes":%.0f,'
      .. '"p50_us":%.1f,"p90_us":%.1f,"p99_us":%.1f,"mean_us":%.1f,"max_us":%.1f,'
      .. '"err_connect":%.0f,"err_read":%.0f,"err_write":%.0f,"err_status":%.0f,'
      .. '"err_timeout":%.0f}\n',
    summary.requests, summary.duration, summary.bytes,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.mean, latency.max,
    e.connect, e.read, e.write, e.status, e.timeout))
end
