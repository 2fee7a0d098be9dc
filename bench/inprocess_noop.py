"""A minimal in-process driver: N no-op jobs through one JobServer, end to end.

    python -m bench.inprocess_noop sqlite:////tmp/noop.db --n 20000 --workers 8

Submits with submit_many (500 a call) from one thread and counts completions with a
listener; no warm-up, no subprocess. bench/core_throughput.py is the full comparison
with the peers; this one is for quick before/after checks of the core.
"""
import argparse
import threading
import time

from jobserver import JobServer, Registry


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("db", help="journal URL (use a fresh database)")
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--timeout", type=float, default=120.0)
    args = parser.parse_args()

    registry = Registry()
    registry.task("bench.noop")(lambda ctx: None)
    done, lock, finished = [0], threading.Lock(), threading.Event()

    def count(event):
        if event.ended and event.state == "succeeded":
            with lock:
                done[0] += 1
                if done[0] == args.n:
                    finished.set()

    server = JobServer(args.db, tasks=registry, workers=args.workers, poll_interval=0.05,
                       max_queued=None)
    server.add_listener(count)
    server.start()
    try:
        start = time.perf_counter()
        for i in range(0, args.n, 500):
            server.submit_many([{"task": "bench.noop"}] * min(500, args.n - i))
        submitted = time.perf_counter() - start
        finished.wait(args.timeout)
        elapsed = time.perf_counter() - start
    finally:
        server.stop()
    print(f"{done[0]}/{args.n} jobs: submit {args.n / submitted:,.0f} jobs/s, "
          f"end to end {done[0] / elapsed:,.0f} jobs/s ({args.workers} workers)")


if __name__ == "__main__":
    main()
