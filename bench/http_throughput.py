"""HTTP throughput with wrk: bare Flask, the SQLite floor, `jobserver serve`, and Flask + Celery + Redis.

Measurements (each in a freshly started server process, fresh journal):
  hello          bare Flask on waitress (8 threads): GET / -> "hello" (the issue's reference)
  hello-get      the same app: GET /jobs/{id} -> "hello", ids at random by the js-get wrk script
  hello-post     the same app: POST /jobs (the js-post request) -> 202 "hello"
  floor-get      bare Flask on waitress (8 threads): GET /jobs/{id} reads one row by primary key
                 from a SQLite WAL file (a connection per thread), the least a journal poll costs
  floor-post     the same app: POST /jobs inserts one row and commits (synchronous=FULL), the
                 least a durable submit costs without group commit
  js-post        jobserver serve: POST /jobs, one job {"task": "bench.noop"}, run by its pool
  js-batch       jobserver serve: POST /jobs, a JSON array of 100 jobs (one transaction)
  js-get         jobserver serve: GET /jobs/{id} over 1000 finished jobs, ids at random
  celery-post    Flask (waitress, 8 threads) route calling noop.delay(), Redis broker+backend,
                 with a Celery worker (--pool threads -c 8) draining the queue

    .venv/bin/python -m bench.http_throughput                 # 12 s each, 3 repeats
    .venv/bin/python -m bench.http_throughput --quick         # 3 s each, 1 repeat
    .venv/bin/python -m bench.http_throughput --only hello,js-post --js-threads 8,32

wrk runs with -t2 -c50 by default (--wrk-threads, --connections). The servers and wrk
share the machine's cores. `--js-threads` takes a list: every js-* measurement runs once
per waitress thread count. Every server is started in its own session and killed (TERM,
then KILL) when its measurement ends, failed or not.
"""
import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid

import requests

from bench.common import ROOT, chosen, git_state, median, spawn, stop, table, tool, wait_until

LUA = ROOT / "bench" / "lua"
REDIS_URL = "redis://127.0.0.1:6379/13"
TARGETS = ("hello", "hello-get", "hello-post", "floor-get", "floor-post", "js-post", "js-batch",
           "js-get", "celery-post")
DESCRIBE = {
    "hello": "bare Flask 'hello' on waitress, 8 threads: GET /",
    "hello-get": "bare Flask on waitress, 8 threads: GET /jobs/{id} -> 'hello' (js-get's wrk script)",
    "hello-post": "bare Flask on waitress, 8 threads: POST /jobs -> 202 'hello' (js-post's request)",
    "floor-get": "bare Flask on waitress, 8 threads: GET /jobs/{id}, one SQLite primary-key SELECT",
    "floor-post": "bare Flask on waitress, 8 threads: POST /jobs, one SQLite INSERT + COMMIT (FULL)",
    "js-post": "jobserver serve --threads T --workers 8 (SQLite FULL): POST /jobs, 1 job, run by its pool",
    "js-batch": "jobserver serve --threads T --workers 8 --max-queued none (SQLite FULL): "
                "POST /jobs, 100 jobs/request",
    "js-get": "jobserver serve --threads T --workers 8 (SQLite FULL): GET /jobs/{id}",
    "celery-post": "Flask on waitress, 8 threads, POST /jobs -> noop.delay(); Redis; "
                   "celery worker --pool threads -c 8",
}
# what each measurement is also divided by: the bare app doing the same HTTP exchange,
# and the bare app doing the same least SQLite work
SAME_SHAPE = {"hello-get": "hello-get", "floor-get": "hello-get", "js-get": "hello-get",
              "hello-post": "hello-post", "floor-post": "hello-post", "js-post": "hello-post",
              "celery-post": "hello-post"}
FLOOR = {"js-get": "floor-get", "js-post": "floor-post", "celery-post": "floor-post"}
N_IDS = 1000


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url, proc, timeout=30.0):
    def up():
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before answering")
        try:
            return requests.get(url, timeout=2).status_code == 200
        except requests.RequestException:
            return False
    if not wait_until(up, timeout, 0.1):
        raise RuntimeError(f"{url} did not answer within {timeout} s")


def start_jobserver(tmp, port, threads, extra=()):
    """`jobserver serve` if the CLI works, else create_app in-process served by waitress."""
    db = f"sqlite:///{tmp}/jobs.db"
    argv = [tool("jobserver"), "serve", "--db", db, "--host", "127.0.0.1", "--port", str(port),
            "--threads", str(threads), "--workers", "8", "--tasks", "bench.bench_tasks", *extra]
    proc = spawn(argv, log_path=f"{tmp}/serve.log")
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", proc, 20)
        return proc, "jobserver serve"
    except RuntimeError:
        stop(proc)
    proc = spawn([sys.executable, "-m", "bench.http_apps", "jobserver", "--port", str(port),
                  "--threads", str(threads), "--db", db], log_path=f"{tmp}/app.log")
    wait_http(f"http://127.0.0.1:{port}/healthz", proc, 20)
    return proc, "create_app in-process (jobserver serve did not start)"


def run_wrk(args, url, script, tmp, script_args=()):
    body = (LUA / script).read_text() + "\n" + (LUA / "report.lua").read_text()
    path = os.path.join(tmp, "wrk.lua")
    with open(path, "w") as f:
        f.write(body)
    argv = ["wrk", f"-t{args.wrk_threads}", f"-c{args.connections}", f"-d{args.duration}s",
            "--timeout", "10s", "-s", path, url]
    if script_args:
        argv += ["--", *script_args]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=args.duration + 60).stdout
    for line in out.splitlines():
        if line.startswith("WRKJSON "):
            r = json.loads(line[8:])
            r["rps"] = r["requests"] / (r["duration_us"] / 1e6)
            r["p99_ms"] = r["p99_us"] / 1000
            r["p50_ms"] = r["p50_us"] / 1000
            return r
    raise RuntimeError(f"wrk printed no result: {out[-500:]}")


def _write_ids(tmp, ids):
    path = f"{tmp}/ids.txt"
    with open(path, "w") as f:
        f.write("\n".join(ids) + "\n")
    return path


def _finished_jobs(base):
    """Submit N_IDS jobs in batches, wait for the last, return their ids."""
    ids = []
    for _ in range(N_IDS // 100):
        resp = requests.post(base + "/jobs", json=[{"task": "bench.noop"}] * 100, timeout=30)
        resp.raise_for_status()
        ids += [job["id"] for job in resp.json()]
    last = requests.get(f"{base}/jobs/{ids[-1]}?wait=30", timeout=40).json()
    if last["state"] != "succeeded":
        raise RuntimeError(f"pre-submitted jobs did not finish: {last['state']}")
    return ids


def measure(args, target, threads):
    """One wrk run of `target` (js-* with `threads` waitress threads) in fresh processes."""
    tmp = tempfile.mkdtemp(prefix="httpbench-")
    procs = []
    queue = None
    try:
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        if target.startswith(("hello", "floor")):
            ids_file = _write_ids(tmp, [str(uuid.uuid4()) for _ in range(N_IDS)])
            app = target.split("-")[0]
            extra = ["--db", f"{tmp}/floor.db", "--ids", ids_file] if app == "floor" else []
            procs.append(spawn([sys.executable, "-m", "bench.http_apps", app, "--port", str(port),
                                "--threads", "8", *extra], log_path=f"{tmp}/{app}.log"))
            wait_http(base + "/", procs[-1])
            if target == "hello":
                return run_wrk(args, base + "/", "get.lua", tmp)
            if target.endswith("-get"):
                return run_wrk(args, base + "/jobs/x", "get_job.lua", tmp, [ids_file])
            return run_wrk(args, base + "/jobs", "post_job.lua", tmp)
        if target == "celery-post":
            queue = f"bench-http-{uuid.uuid4().hex[:8]}"
            env = {"BENCH_REDIS_URL": args.redis_url, "BENCH_CELERY_QUEUE": queue}
            procs.append(spawn([tool("celery"), "-A", "bench.celery_app", "worker", "--pool", "threads",
                                "-c", "8", "-Q", queue, "-n", f"{queue}@%h", "--without-gossip",
                                "--without-mingle", "--without-heartbeat", "-l", "WARNING"],
                               env=env, log_path=f"{tmp}/worker.log"))
            procs.append(spawn([sys.executable, "-m", "bench.http_apps", "celery", "--port", str(port),
                                "--threads", "8"], env=env, log_path=f"{tmp}/celery-app.log"))
            wait_http(base + "/", procs[-1])
            return run_wrk(args, base + "/jobs", "post_job.lua", tmp)
        extra = ("--max-queued", "none") if target == "js-batch" else ()
        proc, how = start_jobserver(tmp, port, threads, extra)
        procs.append(proc)
        if target == "js-post":
            r = run_wrk(args, base + "/jobs", "post_job.lua", tmp)
        elif target == "js-batch":
            r = run_wrk(args, base + "/jobs", "post_batch.lua", tmp)
            r["jobs_per_s"] = r["rps"] * 100
        else:
            ids_file = _write_ids(tmp, _finished_jobs(base))
            r = run_wrk(args, base + "/jobs/x", "get_job.lua", tmp, [ids_file])
        r["how"] = how
        return r
    finally:
        for proc in reversed(procs):
            stop(proc)
        if queue:
            _cleanup_celery(args.redis_url, queue)
        shutil.rmtree(tmp, ignore_errors=True)


def _cleanup_celery(url, queue):
    """Delete this run's queue and the result keys in the bench's own Redis database."""
    try:
        from redis import Redis
        r = Redis.from_url(url, socket_timeout=30)
        keys = [queue, f"_kombu.binding.{queue}", f"_kombu.binding_permanent.{queue}"] + list(r.scan_iter(match="celery-task-meta-*", count=1000))
        for i in range(0, len(keys), 1000):
            r.delete(*keys[i:i + 1000])
    except Exception as exc:
        print(f"redis cleanup failed: {exc}", file=sys.stderr)


def _runs(names, thread_counts):
    """(label, target, waitress threads) for every measurement, js-* once per thread count."""
    runs = []
    for name in names:
        if name.startswith("js-"):
            runs += [(f"{name}@{t}" if len(thread_counts) > 1 else name, name, t) for t in thread_counts]
        else:
            runs.append((name, name, 8))
    return runs


def _bad(r):
    return r["non_2xx_3xx"] + r["connect_errors"] + r["read_errors"] + r["timeouts"]


def _ratio(med, label, base_label):
    if not base_label or not med.get(label) or not med.get(base_label):
        return None
    return f"{med[label] / med[base_label]:.2f}"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=int, default=12, help="seconds per measurement (default 12)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="3 s per measurement, 1 repeat")
    p.add_argument("--wrk-threads", type=int, default=2)
    p.add_argument("--connections", type=int, default=50)
    p.add_argument("--only", help="comma-separated: " + ", ".join(TARGETS))
    p.add_argument("--js-threads", default="8",
                   help="waitress threads of jobserver serve, a comma-separated list (default 8, "
                        "as the bare Flask apps)")
    p.add_argument("--redis-url", default=REDIS_URL,
                   help="Redis database for Celery (the bench deletes its result keys there)")
    p.add_argument("--json-out")
    args = p.parse_args()
    if args.quick:
        args.duration, args.repeats = 3, 1
    if shutil.which("wrk") is None:
        raise SystemExit("wrk not found: apt-get install -y wrk")
    names = chosen(args.only, TARGETS, "target")
    thread_counts = [int(t) for t in args.js_threads.split(",")]
    runs = _runs(names, thread_counts)
    print(f"# http throughput: wrk -t{args.wrk_threads} -c{args.connections} -d{args.duration}s, "
          f"{args.repeats} repeat(s), js threads {args.js_threads}, code {git_state()}, "
          f"{os.cpu_count()} CPUs", flush=True)
    results = {label: [] for label, _target, _threads in runs}
    for rep in range(args.repeats):  # interleaved: a noisy minute hurts every system alike
        for label, target, threads in runs:
            try:
                r = measure(args, target, threads)
            except Exception as exc:
                r = {"error": f"{type(exc).__name__}: {exc}"[:300]}
            results[label].append(r)
            if "error" in r:
                print(f"  [{rep + 1}] {label}: ERROR {r['error']}", flush=True)
            else:
                print(f"  [{rep + 1}] {label}: {r['rps']:,.0f} req/s, p50 {r['p50_ms']:.1f} ms, "
                      f"p99 {r['p99_ms']:.1f} ms, {_bad(r)} errors/non-2xx"
                      + (f", {r['jobs_per_s']:,.0f} jobs/s" if "jobs_per_s" in r else "")
                      + (f" [{r['how']}]" if r.get("how", "jobserver serve") != "jobserver serve" else ""),
                      flush=True)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"code": git_state(), "args": vars(args), "results": results}, f, indent=1)
    ok = {label: [r for r in rs if "error" not in r] for label, rs in results.items()}
    med = {label: median([r["rps"] for r in rs]) for label, rs in ok.items()}
    rows = []
    for label, target, _threads in runs:
        rs = ok[label]
        posting = target.endswith(("-post", "-batch"))
        jobs = median([r.get("jobs_per_s", r["rps"]) for r in rs]) if posting and rs else None
        same = SAME_SHAPE.get(target)
        rows.append([label, f"{med[label]:,.0f}" if med[label] else None,
                     f"{median([r['p99_ms'] for r in rs]):.1f}" if rs else None,
                     f"{jobs:,.0f}" if jobs else None,
                     _ratio(med, label, "hello"),
                     _ratio(med, label, same) if same != target else None,
                     _ratio(med, label, FLOOR.get(target)),
                     sum(_bad(r) for r in rs), f"{len(rs)}/{len(results[label])}"])
    print()
    print(table(["measurement", "req/s (median)", "p99 ms", "jobs/s", "÷ hello", "÷ same request, bare",
                 "÷ SQLite floor", "errors+non-2xx", "ok runs"], rows))
    print()
    for name in names:
        print(f"- {name}: {DESCRIBE[name]}")


if __name__ == "__main__":
    main()
