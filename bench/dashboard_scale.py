"""The dashboard's reads at a million jobs: p50/p95 of GET /stats and GET /jobs over real HTTP.

    python -m bench.dashboard_scale                  # 10^6 jobs in a fresh SQLite file
    python -m bench.dashboard_scale --jobs 200000 --requests 100
    python -m bench.dashboard_scale --db mysql://root@127.0.0.1:3306/bench_dash

How the journal is filled: rows are made in Python with the journal's own column list
(JOB_COLUMNS) and written with the journal's own INSERT statement (`journal.sql.insert_job`,
the statement every submit runs) by `executemany`, 50,000 rows per transaction, through the
driver's write transaction. Ids are UUIDv7 of each job's submit time, as new_id() makes
them. The jobs are finished (90 % succeeded, 7 % failed, 3 % cancelled), spread evenly
over the last `--days` (default 7, the default result_ttl: a journal that holds 10^6 jobs
for a week runs about 6,000 an hour), over 5 tasks and 20 owners; a few hundred are queued
or running (due in a year, or leased far ahead, so the server's pool leaves them be).
Then `jobserver serve` (a separate process, as an operator runs it) serves the file and
each route is asked `--requests` times in turn over one keep-alive connection, as an admin and as one owner (a twentieth of the jobs).
"""
import argparse
import json
import os
import random
import socket
import statistics
import tempfile
import time

import requests

from bench.common import spawn, stop, tool, wait_until
from jobserver.auth import create_token
from jobserver.journal import open_journal
from jobserver.journal_sql import JOB_COLUMNS

TASKS = ("reports.build", "mail.send", "images.resize", "billing.sync", "search.index")
RUN_SECONDS = {"reports.build": 40.0, "mail.send": 0.4, "images.resize": 2.5,
               "billing.sync": 9.0, "search.index": 1.2}
OWNERS = tuple(f"user{i:02d}" for i in range(20))
CHUNK = 50_000


def uuid7(ms, rng):
    """A UUIDv7 text for millisecond `ms`, laid out as jobserver.ids.new_id lays it out."""
    value = (ms << 80) | (0x7 << 76) | (rng.getrandbits(12) << 64) | (0b10 << 62) | rng.getrandbits(62)
    h = f"{value:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def make_rows(n, now_ms, days, seed=7, unfinished=300):
    """`n` job rows (tuples in JOB_COLUMNS order), oldest first, submitted over `days` up to now."""
    rng = random.Random(seed)
    span = int(days * 86_400_000)
    columns = {name: i for i, name in enumerate(JOB_COLUMNS)}
    for i in range(n):
        created = now_ms - span + (span * i) // n
        task = TASKS[i % len(TASKS)]
        wait = int(rng.expovariate(1 / 300))  # ms in the queue
        run = int(rng.lognormvariate(0, 0.6) * RUN_SECONDS[task] * 1000)
        started, finished = created + wait, created + wait + run
        roll = rng.random()
        state, error = "succeeded", None
        if i >= n - unfinished:  # the newest few are still queued or running
            state, started, finished = ("queued", None, None) if i % 2 else ("running", started, None)
        elif roll < 0.07:
            state = "failed"
            error = json.dumps({"type": "RuntimeError", "message": "upstream said 503",
                                "traceback": "Traceback (most recent call last):\n  ...\nRuntimeError: upstream said 503\n"})
        elif roll < 0.10:
            state = "cancelled"
        if finished is not None and finished > now_ms:
            finished = now_ms
        row = [None] * len(JOB_COLUMNS)
        values = {
            "id": uuid7(created, rng), "task": task, "owner": OWNERS[i % len(OWNERS)], "state": state,
            "params": json.dumps({"n": i, "region": "eu"}), "priority": 0,
            "attempts": 0 if state == "queued" else 1, "max_retries": 3, "timeout": None,
            # queued ones are due in a year, so the benchmark's own pool leaves them alone
            "run_at": created + (365 * 86_400_000 if state == "queued" else 0),
            "lease_owner": "bench-node" if state == "running" else None, "lease_token": 1,
            "lease_expires": now_ms + 365 * 86_400_000 if state == "running" else None, "crashes": 0,
            "progress": None, "result": json.dumps({"ok": True}) if state == "succeeded" else None,
            "error": error, "cancel_requested": int(state == "cancelled"), "callback_url": None,
            "idempotency_key": None, "request_hash": None, "created_at": created,
            "started_at": started, "finished_at": finished,
        }
        for name, value in values.items():
            row[columns[name]] = value
        yield tuple(row)


def fill(journal, n, days=7.0, now_ms=None, unfinished=300):
    """Write `n` jobs into `journal` with its own INSERT, CHUNK rows per transaction."""
    now_ms = now_ms or time.time_ns() // 1_000_000
    statement = journal.sql.insert_job
    batch = []

    def flush():
        rows = list(batch)
        journal.driver.write_transaction(lambda cur: cur.executemany(statement, rows))
        batch.clear()
    for row in make_rows(n, now_ms, days, unfinished=unfinished):
        batch.append(row)
        if len(batch) >= CHUNK:
            flush()
    if batch:
        flush()


def timed(session, url, headers, count):
    """p50 and p95 in ms of `count` GETs of `url`; every answer must be 200."""
    times = []
    for _ in range(count):
        start = time.perf_counter()
        response = session.get(url, headers=headers, timeout=60)
        times.append((time.perf_counter() - start) * 1000)
        if response.status_code != 200:
            raise SystemExit(f"{url}: {response.status_code} {response.text[:300]}")
    times.sort()
    return statistics.median(times), times[max(0, int(len(times) * 0.95) - 1)]


def serve(db, port):
    """`jobserver serve` on the filled journal: the real server, as an operator runs it."""
    return spawn([tool("jobserver"), "serve", "--db", db, "--host", "127.0.0.1", "--port", str(port),
                  "--workers", "1", "--tasks", "jobserver.demo"],
                 log_path=os.path.join(tempfile.gettempdir(), "dashboard_scale_serve.log"))


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=1_000_000)
    parser.add_argument("--days", type=float, default=7.0)
    parser.add_argument("--db", default=None, help="journal URL (default: a fresh SQLite file)")
    parser.add_argument("--requests", type=int, default=200)
    args = parser.parse_args(argv)
    tmp = None
    if args.db is None:
        tmp = tempfile.TemporaryDirectory(prefix="jobserver-dash-")
        args.db = f"sqlite:///{tmp.name}/journal.db"
    proc = None
    try:
        journal = open_journal(args.db)
        try:
            if journal.list_jobs(limit=1, with_steps=False)[0]:
                raise SystemExit(f"{args.db} holds jobs already: give an empty journal")
            started = time.perf_counter()
            fill(journal, args.jobs, args.days)
            print(f"filled {args.jobs:,} jobs over {args.days:g} days in "
                  f"{time.perf_counter() - started:.1f} s ({args.db})")
            admin = create_token(journal, "bench-admin", admin=True)
            owner_token = create_token(journal, OWNERS[3])  # sees 1/20 of the jobs
        finally:
            journal.close()
        port = free_port()
        proc = serve(args.db, port)
        base = f"http://127.0.0.1:{port}"
        if not wait_until(lambda: _healthy(base), 60):
            raise SystemExit("jobserver serve did not come up; see dashboard_scale_serve.log")
        with requests.Session() as session:
            run(session, base, admin, owner_token, args.requests)
    finally:
        stop(proc)
        if tmp is not None:
            tmp.cleanup()


def _healthy(base):
    try:
        return requests.get(base + "/healthz", timeout=2).status_code == 200
    except requests.RequestException:
        return False


def run(session, base, admin, owner_token, count):
    cases = [
        ("GET /stats", "/stats"),
        ("GET /jobs (first page)", "/jobs"),
        ("GET /jobs?state=failed", "/jobs?state=failed"),
        ("GET /jobs?state=queued", "/jobs?state=queued"),
        ("GET /jobs?state=running", "/jobs?state=running"),
        ("GET /jobs?task=billing.sync", "/jobs?task=billing.sync"),
        ("GET /jobs?task=no.such.task", "/jobs?task=no.such.task"),
        ("GET /jobs?state=failed&task=mail.send", "/jobs?state=failed&task=mail.send"),
        ("GET /jobs?queue=default", "/jobs?queue=default"),
        ("GET /jobs (second page)", None),
    ]
    print(f"{'route':44} {'as':6} {'p50 ms':>8} {'p95 ms':>8}")
    for who, token in (("admin", admin), ("owner", owner_token)):
        headers = {"Authorization": f"Bearer {token}"}
        for label, path in cases:
            if path is None:
                first = session.get(base + "/jobs", headers=headers, timeout=60).json()
                path = f"/jobs?cursor={first['next']}"
            timed(session, base + path, headers, 3)  # warm the connection and the cache
            p50, p95 = timed(session, base + path, headers, count)
            print(f"{label:44} {who:6} {p50:8.1f} {p95:8.1f}", flush=True)


if __name__ == "__main__":
    main()
