"""A JobServer in its own process, for the crash and multi-process tests.

    python tests/proc_worker.py DB_URL WORKDIR [--workers N] [--lease S] [--max-crashes N]

It runs the tasks of `registry` below until SIGTERM (then stops gracefully) or SIGKILL.
Tasks leave their traces as files in WORKDIR, one line per event, so that the test can
count executions across processes that were killed. `ready-<pid>` appears once the pool
has started (after its recovery pass).
"""
import argparse
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

if __name__ == "__main__":  # run as a script: make the package importable from the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jobserver import JobServer, Registry

registry = Registry()
WORKDIR = Path(os.environ.get("JOBSERVER_TEST_WORKDIR", "."))


def append(name, line):
    """Append one line to WORKDIR/name with a single write (atomic for short lines)."""
    fd = os.open(WORKDIR / name, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def read_lines(workdir, pattern):
    """Every line of the files in `workdir` matching `pattern`, split into fields."""
    return [line.split() for path in sorted(Path(workdir).glob(pattern))
            for line in path.read_text().splitlines() if line]


@registry.task("proc.record")
def record(ctx, seconds=0.0):
    """Sleep, then log `job_id pid start end` (monotonic ns) to runs-<pid>.log."""
    start = time.monotonic_ns()
    if seconds:
        time.sleep(seconds)
    append(f"runs-{os.getpid()}.log", f"{ctx.job_id} {os.getpid()} {start} {time.monotonic_ns()}")
    return os.getpid()


@registry.task("proc.wait")
def wait(ctx, seconds=30.0):
    """Wait up to `seconds`, stopping with JobCancelled as soon as a cancel is seen."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        ctx.check_cancelled()
        ctx.wait(0.05)
    return "not cancelled"


@registry.task("proc.steps")
def steps(ctx, n, pause_before=None):
    """Run `n` checkpointed steps; before step `pause_before`, wait for the file `go`."""
    for i in range(1, n + 1):
        if i == pause_before:
            deadline = time.monotonic() + 60
            while not (WORKDIR / "go").exists() and time.monotonic() < deadline:
                time.sleep(0.02)
        ctx.step(f"s{i}", lambda i=i: append(f"steps-{ctx.job_id}.log", f"{i} {os.getpid()}") or i)
    return n


@registry.task("proc.suicide")
def suicide(ctx):
    """Log the attempt, then SIGKILL this very process."""
    append(f"suicide-{ctx.job_id}.log", f"{ctx.attempt} {os.getpid()}")
    os.kill(os.getpid(), signal.SIGKILL)


class Workers:
    """Worker processes started by a test; `close()` kills and reaps whatever still runs."""

    def __init__(self, db_url, workdir):
        self.db_url = db_url
        self.workdir = Path(workdir)
        self.procs = []

    def spawn(self, workers=4, lease=2.0, max_crashes=3, node_id=None, ready_timeout=30.0,
              wait_ready=True, extra=()):
        """Start one worker process and return its Popen once its pool has started
        (at once with `wait_ready=False`, for a process that may die before it says so)."""
        log_path = self.workdir / f"worker-{len(self.procs)}.out"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, __file__, self.db_url, str(self.workdir), "--workers", str(workers),
                 "--lease", str(lease), "--max-crashes", str(max_crashes)]
                + (["--node-id", node_id] if node_id else []) + list(extra),
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.procs.append(proc)
        deadline = time.monotonic() + ready_timeout
        while wait_ready and not (self.workdir / f"ready-{proc.pid}").exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"worker {proc.pid} did not start:\n{log_path.read_text()}")
            time.sleep(0.02)
        return proc

    def kill(self, proc):
        """SIGKILL the process and reap it."""
        proc.kill()
        proc.wait(10)

    def terminate(self, proc, timeout=20):
        """SIGTERM (graceful stop) and reap; returns the exit code."""
        proc.terminate()
        return proc.wait(timeout)

    def close(self):
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)


def submit_forever(server, threads=4):
    """Submit from several threads, logging each id once submit() has returned, until killed."""
    def loop():
        while True:
            append("submitted.log", server.submit("proc.record"))
    for _ in range(threads):
        threading.Thread(target=loop, daemon=True).start()
    (WORKDIR / f"ready-{os.getpid()}").touch()
    threading.Event().wait()


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("db")
    parser.add_argument("workdir")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--lease", type=float, default=2.0)
    parser.add_argument("--max-crashes", type=int, default=3)
    parser.add_argument("--node-id", default=None)
    parser.add_argument("--submit-forever", action="store_true",
                        help="do not run jobs: submit from 4 threads until killed")
    args = parser.parse_args(argv)
    global WORKDIR
    WORKDIR = Path(args.workdir)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(process)d %(name)s %(message)s")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    server = JobServer(args.db, tasks=registry, workers=args.workers, lease_seconds=args.lease,
                       poll_interval=0.05, max_crashes=args.max_crashes, shutdown_grace=2,
                       node_id=args.node_id)
    if args.submit_forever:
        submit_forever(server)
    server.start()
    (WORKDIR / f"ready-{os.getpid()}").touch()
    while not stop.wait(0.2):
        pass
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
