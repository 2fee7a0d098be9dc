"""No-op job throughput, end to end: jobserver (SQLite FULL/NORMAL, MariaDB) vs Huey, Celery, RQ.

One trial = N no-op jobs submitted as fast as the submitter allows; the clock runs from
the first submit to the last completion. Every trial runs in a fresh child process (so
no thread, connection or cache leaks from one trial into the next) and the trials are
interleaved round-robin across repeats, so a noisy minute hurts every system alike.

    .venv/bin/python -m bench.core_throughput              # N=20000, 3 repeats, all systems
    .venv/bin/python -m bench.core_throughput --quick      # N=300, 1 repeat: smoke test
    .venv/bin/python -m bench.core_throughput --only jobserver-sqlite-full-batch,celery-redis

Every wait is bounded (--timeout per trial); worker processes are started in their own
session and killed (TERM, then KILL) in `finally`, and the parent kills a child trial's
whole process group if it overruns.
"""
import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid

from bench.common import ROOT, chosen, git_state, median, spawn, stop, table, tool, wait_until

REDIS_URL = "redis://127.0.0.1:6379/13"
MYSQL_URL = "mysql://root@127.0.0.1:3306"

CONFIGS = {
    # name: (system, description)
    "jobserver-sqlite-full-batch": "jobserver, SQLite synchronous=FULL, submit_many(1000)",
    "jobserver-sqlite-full-threads": "jobserver, SQLite synchronous=FULL, submit() from 8 threads",
    "jobserver-sqlite-normal-batch": "jobserver, SQLite synchronous=NORMAL, submit_many(1000)",
    "jobserver-sqlite-normal-threads": "jobserver, SQLite synchronous=NORMAL, submit() from 8 threads",
    "jobserver-mariadb-batch": "jobserver, MariaDB (InnoDB defaults), submit_many(1000)",
    "jobserver-mariadb-threads": "jobserver, MariaDB (InnoDB defaults), submit() from 8 threads",
    "huey-sqlite": "Huey SqliteHuey (WAL, synchronous=FULL), consumer -w 8 -k thread, enqueue 1 by 1",
    "celery-redis": "Celery, Redis broker+backend, worker --pool threads -c 8, .delay() 1 by 1",
    "rq-redis": "RQ, Redis, `rq worker-pool -n 2 -w SimpleWorker`, enqueue 1 by 1",
    "rq-redis-batch": "RQ, Redis, `rq worker-pool -n 2 -w SimpleWorker`, enqueue_many(1000)",
}
BASELINE = "jobserver-sqlite-full-batch"


# --- jobserver ------------------------------------------------------------------------
def trial_jobserver(args, name):
    from jobserver import JobServer, Registry

    reg = Registry()

    @reg.task("bench.noop")
    def noop(ctx):
        return None

    tmp = tempfile.mkdtemp(prefix="jsbench-")
    dbname = None
    if "-sqlite-" in name:
        url = f"sqlite:///{tmp}/jobs.db"
        if "-normal-" in name:
            url += "?synchronous=NORMAL"
    else:
        import pymysql
        dbname = f"jsbench_{os.getpid()}_{uuid.uuid4().hex[:6]}"
        conn = pymysql.connect(host="127.0.0.1", user="root", connect_timeout=10)
        conn.cursor().execute(f"CREATE DATABASE {dbname}")
        conn.close()
        url = f"{args.mysql_url}/{dbname}"
    n = args.n
    done = threading.Event()
    lock = threading.Lock()
    counts = {"succeeded": 0, "other": 0}

    def listener(event):
        if not event.ended:
            return
        with lock:
            counts["succeeded" if event.state == "succeeded" else "other"] += 1
            if counts["succeeded"] + counts["other"] >= n:
                done.set()

    server = JobServer(url, tasks=reg, workers=8, poll_interval=0.05)
    # Count journal transactions without touching jobserver/: the committer looks up
    # driver.write_transaction and its own _execute on the instance at every batch.
    stats = {"transactions": 0, "ops": 0, "batches": 0}
    driver, writer = server.journal.driver, server.journal._writer
    real_tx, real_exec = driver.write_transaction, writer._execute

    def counting_tx(fn):
        stats["transactions"] += 1
        return real_tx(fn)

    def counting_exec(batch):
        stats["batches"] += 1
        stats["ops"] += len(batch)
        return real_exec(batch)

    driver.write_transaction = counting_tx
    writer._execute = counting_exec
    server.add_listener(listener)
    server.start()
    try:
        # one warm-up job so connections and threads exist before the clock starts
        server.wait(server.submit("bench.noop", {}), 30)
        with lock:
            counts.update(succeeded=0, other=0)
        stats.update(transactions=0, ops=0, batches=0)
        t0 = time.perf_counter()
        if name.endswith("-batch"):
            for start in range(0, n, args.batch):
                server.submit_many([{"task": "bench.noop"}] * min(args.batch, n - start))
        else:
            per = [n // args.threads + (1 if i < n % args.threads else 0) for i in range(args.threads)]
            errors = []

            def submitter(count):
                try:
                    for _ in range(count):
                        server.submit("bench.noop", {})
                except Exception as exc:  # reported, and the trial then times out short
                    errors.append(repr(exc))

            threads = [threading.Thread(target=submitter, args=(c,)) for c in per]
            for t in threads:
                t.start()
            for t in threads:
                t.join(args.timeout)
            if errors:
                raise RuntimeError(f"submit failed: {errors[0]}")
        t_submitted = time.perf_counter()
        finished = done.wait(max(1.0, args.timeout - (t_submitted - t0)))
        t_end = time.perf_counter()
        snap = dict(stats)
        with lock:
            completed = counts["succeeded"] + counts["other"]
        return {
            "completed": completed, "failed": counts["other"], "timed_out": not finished,
            "seconds": t_end - t0, "submit_seconds": t_submitted - t0,
            "transactions": snap["transactions"], "ops": snap["ops"],
            "commits_per_job": snap["transactions"] / n, "ops_per_commit":
                snap["ops"] / snap["batches"] if snap["batches"] else None,
        }
    finally:
        server.stop(grace=5)
        shutil.rmtree(tmp, ignore_errors=True)
        if dbname:
            import pymysql
            conn = pymysql.connect(host="127.0.0.1", user="root", connect_timeout=10)
            conn.cursor().execute(f"DROP DATABASE IF EXISTS {dbname}")
            conn.close()


# --- Huey -----------------------------------------------------------------------------
def trial_huey(args, name):
    tmp = tempfile.mkdtemp(prefix="hueybench-")
    os.environ["BENCH_HUEY_DB"] = f"{tmp}/huey.db"
    from bench.huey_app import huey, noop

    # -d/-m 0.05: poll every 50 ms like jobserver's poll_interval=0.05 (the default backs off to 10 s)
    consumer = spawn([tool("huey_consumer"), "bench.huey_app.huey", "-w", "8", "-k", "thread",
                      "-d", "0.05", "-m", "0.05", "-b", "1.0", "-C", "-q"],
                     env={"BENCH_HUEY_DB": f"{tmp}/huey.db"}, log_path=f"{tmp}/consumer.log")
    try:
        warm = noop()
        if warm.get(blocking=True, timeout=60) is not True:
            raise RuntimeError("huey consumer did not answer the warm-up task")
        huey.storage.flush_results()
        n = args.n
        t0 = time.perf_counter()
        for _ in range(n):
            noop()
        t_submitted = time.perf_counter()
        size = huey.storage.result_store_size
        reached = wait_until(lambda: size() >= n, max(1.0, args.timeout - (t_submitted - t0)), 0.05)
        t_end = time.perf_counter()
        return {"completed": size(), "failed": None, "timed_out": not reached,
                "seconds": t_end - t0, "submit_seconds": t_submitted - t0}
    finally:
        stop(consumer, sig=signal.SIGINT)
        shutil.rmtree(tmp, ignore_errors=True)


# --- Celery ---------------------------------------------------------------------------
def trial_celery(args, name):
    queue = f"bench-celery-{uuid.uuid4().hex[:8]}"
    os.environ.update(BENCH_REDIS_URL=args.redis_url, BENCH_CELERY_QUEUE=queue)
    from celery.result import ResultSet

    from bench.celery_app import app, noop

    pool = ["--pool", "threads", "-c", "8"] if args.celery_pool == "threads" else \
        ["--pool", "prefork", "-c", "2"]
    log = tempfile.NamedTemporaryFile(prefix="celerybench-", suffix=".log", delete=False).name
    worker = spawn([tool("celery"), "-A", "bench.celery_app", "worker", *pool, "-Q", queue,
                    "-n", f"{queue}@%h", "--without-gossip", "--without-mingle",
                    "--without-heartbeat", "-l", "WARNING"],
                   env={"BENCH_REDIS_URL": args.redis_url, "BENCH_CELERY_QUEUE": queue}, log_path=log)
    ids = []
    try:
        warm = noop.delay()
        ids.append(warm.id)
        warm.get(timeout=60)
        n = args.n
        t0 = time.perf_counter()
        results = [noop.delay() for _ in range(n)]
        t_submitted = time.perf_counter()
        ids += [r.id for r in results]
        timed_out = False
        try:
            ResultSet(results).join_native(timeout=max(1.0, args.timeout - (t_submitted - t0)),
                                           propagate=False)
        except Exception as exc:  # celery's TimeoutError
            if "Timeout" not in type(exc).__name__:
                raise
            timed_out = True
        t_end = time.perf_counter()
        completed = sum(1 for r in results if r.ready())
        failed = sum(1 for r in results if r.failed())
        return {"completed": completed, "failed": failed, "timed_out": timed_out,
                "seconds": t_end - t0, "submit_seconds": t_submitted - t0, "pool": args.celery_pool}
    finally:
        stop(worker, grace=15)
        _redis_cleanup(args.redis_url, [f"celery-task-meta-{i}" for i in ids],
                       [queue, f"_kombu.binding.{queue}", f"_kombu.binding_permanent.{queue}"])
        try:
            app.close()
        except Exception:
            pass
        os.unlink(log)


# --- RQ -------------------------------------------------------------------------------
def trial_rq(args, name):
    from redis import Redis
    from rq import Queue

    queue_name = f"bench-rq-{uuid.uuid4().hex[:8]}"
    redis = Redis.from_url(args.redis_url, socket_timeout=30)
    q = Queue(queue_name, connection=redis)
    argv = ([tool("rq"), "worker-pool", "-n", str(args.rq_workers)] if args.rq_workers > 1
            else [tool("rq"), "worker"])
    log = tempfile.NamedTemporaryFile(prefix="rqbench-", suffix=".log", delete=False).name
    worker = spawn(argv + ["-w", "rq.worker.SimpleWorker", "-u", args.redis_url, "-q", queue_name],
                   log_path=log)
    ids = []
    func = "bench.rq_tasks.noop"
    try:
        warm = q.enqueue(func)
        ids.append(warm.id)
        if not wait_until(lambda: warm.get_status(refresh=True) == "finished", 60):
            raise RuntimeError("rq worker did not run the warm-up job")
        registry = q.finished_job_registry
        base = registry.count
        n = args.n
        t0 = time.perf_counter()
        if name.endswith("-batch"):
            for start in range(0, n, args.batch):
                datas = [Queue.prepare_data(func) for _ in range(min(args.batch, n - start))]
                ids += [j.id for j in q.enqueue_many(datas)]
        else:
            for _ in range(n):
                ids.append(q.enqueue(func).id)
        t_submitted = time.perf_counter()
        def done():
            return registry.count - base >= n
        reached = wait_until(done, max(1.0, args.timeout - (t_submitted - t0)), 0.05)
        t_end = time.perf_counter()
        return {"completed": registry.count - base, "failed": q.failed_job_registry.count,
                "timed_out": not reached, "seconds": t_end - t0, "submit_seconds": t_submitted - t0,
                "rq_workers": args.rq_workers}
    finally:
        stop(worker, grace=15)
        keys = [f"rq:job:{i}" for i in ids] + [f"rq:results:{i}" for i in ids]
        _redis_cleanup(args.redis_url, keys, [], pattern=f"*{queue_name}*",
                       set_members={"rq:queues": f"rq:queue:{queue_name}"})
        os.unlink(log)


def _redis_cleanup(url, keys, more, pattern=None, set_members=None):
    """Delete the keys this trial made (never a whole database: others may use Redis)."""
    try:
        from redis import Redis
        r = Redis.from_url(url, socket_timeout=30)
        found = list(r.scan_iter(match=pattern, count=1000)) if pattern else []
        allkeys = list(keys) + list(more) + found
        for i in range(0, len(allkeys), 1000):
            r.delete(*allkeys[i:i + 1000])
        for key, member in (set_members or {}).items():
            r.srem(key, member)
        for worker in r.smembers("rq:workers"):  # registrations of workers that are gone
            if not r.exists(worker):
                r.srem("rq:workers", worker)
    except Exception as exc:
        print(f"redis cleanup failed: {exc}", file=sys.stderr)


def run_trial(args):
    name = args.trial
    if name.startswith("jobserver-"):
        result = trial_jobserver(args, name)
    elif name.startswith("huey-"):
        result = trial_huey(args, name)
    elif name.startswith("celery-"):
        result = trial_celery(args, name)
    elif name.startswith("rq-"):
        result = trial_rq(args, name)
    else:
        raise SystemExit(f"unknown trial {name}")
    result.update(config=name, n=args.n, code=git_state(), jobs_per_s=result["completed"] / result["seconds"]
                  if result["seconds"] > 0 else None)
    print("RESULT " + json.dumps(result), flush=True)


# --- driver ---------------------------------------------------------------------------
def child(args, name):
    argv = [sys.executable, "-m", "bench.core_throughput", "--trial", name, "--n", str(args.n),
            "--timeout", str(args.timeout), "--threads", str(args.threads), "--batch", str(args.batch),
            "--celery-pool", args.celery_pool, "--rq-workers", str(args.rq_workers),
            "--redis-url", args.redis_url, "--mysql-url", args.mysql_url]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=args.timeout + 90)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        return {"config": name, "error": "trial overran its time limit and was killed"}
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    for line in out.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return {"config": name, "error": (err.strip().splitlines() or ["no result"])[-1][:300]}


def fmt(x, digits=0):
    return None if x is None else f"{x:,.{digits}f}"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=20_000, help="jobs per trial (default 20000)")
    p.add_argument("--repeats", type=int, default=3, help="trials per configuration; the median is reported")
    p.add_argument("--quick", action="store_true", help="smoke test: --n 300 --repeats 1")
    p.add_argument("--only", help="comma-separated configurations (default: all): " + ", ".join(CONFIGS))
    p.add_argument("--timeout", type=float, default=300.0, help="seconds a trial may take (default 300)")
    p.add_argument("--threads", type=int, default=8, help="submitting threads for *-threads (default 8)")
    p.add_argument("--batch", type=int, default=1000, help="jobs per submit_many/enqueue_many call")
    p.add_argument("--celery-pool", choices=("threads", "prefork"), default="threads",
                   help="threads: --pool threads -c 8 (default); prefork: --pool prefork -c 2")
    p.add_argument("--rq-workers", type=int, default=2,
                   help="RQ SimpleWorker processes (rq worker-pool -n N; 1: rq worker)")
    p.add_argument("--redis-url", default=REDIS_URL)
    p.add_argument("--mysql-url", default=MYSQL_URL, help="server URL without the database name")
    p.add_argument("--json-out", help="also write every trial's result to this file")
    p.add_argument("--trial", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.trial:
        return run_trial(args)
    if args.quick:
        args.n, args.repeats = 300, 1
    names = chosen(args.only, CONFIGS, "configuration")
    print(f"# core throughput: N={args.n} no-op jobs, {args.repeats} repeat(s), code {git_state()}, "
          f"{os.cpu_count()} CPUs", flush=True)
    results = {name: [] for name in names}
    for rep in range(args.repeats):
        for name in names:
            r = child(args, name)
            results[name].append(r)
            if "error" in r:
                print(f"  [{rep + 1}] {name}: ERROR {r['error']}", flush=True)
            else:
                extra = f", {r['commits_per_job']:.3f} commits/job" if "commits_per_job" in r else ""
                print(f"  [{rep + 1}] {name}: {r['jobs_per_s']:,.0f} jobs/s "
                      f"({r['completed']}/{args.n} in {r['seconds']:.2f} s, submit {r['submit_seconds']:.2f} s"
                      f"{', TIMED OUT' if r['timed_out'] else ''}{extra})", flush=True)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"n": args.n, "repeats": args.repeats, "code": git_state(), "results": results}, f,
                      indent=1)
    med = {name: median([r.get("jobs_per_s") for r in rs if "error" not in r and not r["timed_out"]])
           for name, rs in results.items()}
    base = med.get(BASELINE)
    rows = []
    for name in names:
        ok = [r for r in results[name] if "error" not in r]
        rows.append([
            name, fmt(med[name]), fmt(median([r["submit_seconds"] for r in ok]) and
                                      args.n / median([r["submit_seconds"] for r in ok])),
            f"{base / med[name]:.2f}x" if base and med[name] else None,
            fmt(median([r.get("commits_per_job") for r in ok]), 3),
            fmt(median([r.get("ops_per_commit") for r in ok]), 1),
            f"{len([r for r in ok if not r['timed_out']])}/{len(results[name])}",
        ])
    print()
    print(table(["configuration", "jobs/s (median)", "submit jobs/s", "jobserver FULL batch / this",
                 "commits/job", "ops/commit", "ok runs"], rows))
    print()
    for name in names:
        print(f"- {name}: {CONFIGS[name]}")


if __name__ == "__main__":
    main()
