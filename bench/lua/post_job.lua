-- POST /jobs with one job.
wrk.method = "POST"
wrk.body = '{"task": "bench.noop"}'
wrk.headers["Content-Type"] = "application/json"
