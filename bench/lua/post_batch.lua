-- POST /jobs with a JSON array of 100 jobs (one transaction).
local jobs = {}
for i = 1, 100 do jobs[i] = '{"task": "bench.noop"}' end
wrk.method = "POST"
wrk.body = "[" .. table.concat(jobs, ",") .. "]"
wrk.headers["Content-Type"] = "application/json"
