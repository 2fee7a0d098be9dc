"""Single-job POST throughput (wrk) beside 200 open event streams on jobs that report progress.

    .venv/bin/python -m bench.stream_load                     # 200 streams, 10 s per run, 3 rounds
    .venv/bin/python -m bench.stream_load --streams 50 --duration 5 --rounds 1

Each round starts a fresh `jobserver serve` (SQLite FULL, --threads 8 as bench/http_throughput's
js-post, --stream-slots STREAMS + 8, --workers STREAMS + 8) and submits STREAMS jobs
`bench.progress` that report progress 10 times a second for the whole round. Then wrk
(`-t2 -c50`, POST /jobs with one bench.noop job, as js-post) runs three times:
  jobs-only      the progress jobs run, no stream is open
  streams        STREAMS streams are open, one per job (GET /jobs/{id}/events), read by one
                 client thread over raw sockets (selectors), every event counted
  jobs-only-2    the streams closed again (a check that the server is back where it was)
and once before the jobs are submitted (`idle`); each run waits for the last run's jobs to
be done, and odd rounds run `streams` before `jobs-only`. The aim: `streams` within 20 % of
`jobs-only`. The streams are checked to be live (every stream had its snapshot, events
arrive throughout) and the server's log for errors.
"""
import argparse
import json
import os
import selectors
import shutil
import socket
import statistics
import tempfile
import threading
import time

import requests

from bench.common import git_state, spawn, stop, tool
from bench.http_throughput import free_port, run_wrk, wait_http


class Streams:
    """`n` raw HTTP/1.1 event streams on one selector thread, counting the bytes and events."""

    def __init__(self, port, paths):
        self.selector = selectors.DefaultSelector()
        self.sockets = []
        self.events = 0
        self.snapshots = 0
        self.closed = 0
        self._tail = {}
        self._stop = threading.Event()
        for path in paths:
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                         "Accept: text/event-stream\r\n\r\n".encode())
            sock.setblocking(False)
            self.selector.register(sock, selectors.EVENT_READ)
            self.sockets.append(sock)
            self._tail[sock] = b""
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self):
        while not self._stop.is_set():
            for key, _mask in self.selector.select(timeout=0.2):
                sock = key.fileobj
                try:
                    data = sock.recv(65536)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data:
                    self.selector.unregister(sock)
                    self.closed += 1
                    continue
                text = self._tail[sock] + data
                self.events += text.count(b"\nevent: ") + text.startswith(b"event: ")
                self.snapshots += text.count(b"event: snapshot")
                self._tail[sock] = text[-16:]

    def close(self):
        self._stop.set()
        self._thread.join(5)
        for sock in self.sockets:
            sock.close()


def drained(base, timeout=120):
    """Wait until no bench.noop job is queued or running: each wrk run starts from an idle pool."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        busy = [requests.get(base + "/jobs", params={"state": state, "task": "bench.noop", "limit": 1},
                             timeout=30).json()["jobs"] for state in ("queued", "running")]
        if not any(busy):
            return
        time.sleep(0.2)
    raise RuntimeError("the noop jobs of the last run did not drain")


def measure_round(args, tmp, streams_first=False):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    n = args.streams
    argv = [tool("jobserver"), "serve", "--db", f"sqlite:///{tmp}/jobs.db", "--host", "127.0.0.1",
            "--port", str(port), "--threads", "8", "--workers", str(n + 8),
            "--stream-slots", str(n + 8), "--tasks", "bench.bench_tasks", "--max-queued", "none"]
    proc = spawn(argv, log_path=f"{tmp}/serve.log")
    out = {}
    try:
        wait_http(base + "/healthz", proc, 30)
        out["idle"] = run_wrk(args, base + "/jobs", "post_job.lua", tmp)
        seconds = 4 * args.duration + 60
        jobs = requests.post(base + "/jobs", json=[{"task": "bench.progress", "params": {"seconds": seconds}}] * n,
                             timeout=30).json()
        ids = [job["id"] for job in jobs]

        def running():
            page = requests.get(base + "/jobs", params={"state": "running", "task": "bench.progress",
                                                        "limit": 500}, timeout=30).json()
            return len(page["jobs"]) >= n
        deadline = time.monotonic() + 60
        while not running():
            if time.monotonic() > deadline:
                raise RuntimeError("the progress jobs did not all start")
            time.sleep(0.2)
        def jobs_only(label):
            drained(base)
            out[label] = run_wrk(args, base + "/jobs", "post_job.lua", tmp)

        def with_streams():
            streams = Streams(port, [f"/jobs/{job_id}/events" for job_id in ids])
            try:
                deadline = time.monotonic() + 30
                while streams.snapshots < n and time.monotonic() < deadline:
                    time.sleep(0.1)
                if streams.snapshots < n:
                    raise RuntimeError(f"only {streams.snapshots} of {n} streams opened")
                drained(base)
                before, started = streams.events, time.monotonic()
                r = run_wrk(args, base + "/jobs", "post_job.lua", tmp)
                r["stream_events_per_s"] = (streams.events - before) / (time.monotonic() - started)
                r["streams_closed"] = streams.closed
                out["streams"] = r
            finally:
                streams.close()
        # the order alternates between rounds: a later run meets a bigger journal
        if streams_first:
            with_streams()
            jobs_only("jobs-only")
        else:
            jobs_only("jobs-only")
            with_streams()
        jobs_only("jobs-only-2")
        log = open(f"{tmp}/serve.log", errors="replace").read()
        out["log_errors"] = sum(1 for line in log.splitlines() if " ERROR " in line or "Traceback" in line)
        return out
    finally:
        stop(proc)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--streams", type=int, default=200)
    p.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--wrk-threads", type=int, default=2)
    p.add_argument("--connections", type=int, default=50)
    p.add_argument("--json-out")
    args = p.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk not found: apt-get install -y wrk")
    print(f"# stream load: {args.streams} streams, wrk -t{args.wrk_threads} -c{args.connections} "
          f"-d{args.duration}s, {args.rounds} round(s), code {git_state()}, {os.cpu_count()} CPUs", flush=True)
    rounds = []
    for i in range(args.rounds):
        tmp = tempfile.mkdtemp(prefix="streamload-")
        try:
            result = measure_round(args, tmp, streams_first=i % 2 == 1)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        rounds.append(result)
        print(f"  [{i + 1}] " + ", ".join(f"{k} {v['rps']:,.0f} req/s" for k, v in result.items()
                                          if isinstance(v, dict))
              + f"; {result['streams']['stream_events_per_s']:,.0f} stream events/s, "
                f"{result['streams']['streams_closed']} streams closed, {result['log_errors']} log errors",
              flush=True)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"code": git_state(), "args": vars(args), "rounds": rounds}, f, indent=1)
    med = {k: statistics.median(r[k]["rps"] for r in rounds) for k in ("idle", "jobs-only", "streams", "jobs-only-2")}
    p99 = {k: statistics.median(r[k]["p99_ms"] for r in rounds) for k in med}
    print()
    print("| measurement | req/s (median) | p99 ms |")
    print("|---|---|---|")
    for k in med:
        print(f"| {k} | {med[k]:,.0f} | {p99[k]:.1f} |")
    drop = 1 - med["streams"] / med["jobs-only"]
    print(f"\nstreams vs jobs-only: {drop:+.1%} drop (aim: at most 20 %)")


if __name__ == "__main__":
    main()
