"""Huey app for bench/core_throughput.py: `huey_consumer bench.huey_app.huey -w 8 -k thread`.

The SQLite file comes from BENCH_HUEY_DB. Huey's SqliteStorage default (fsync=None) leaves
SQLite at its default synchronous level, FULL, in WAL mode: the same durability as
jobserver's default."""
import os

from huey import SqliteHuey

huey = SqliteHuey(name="bench", filename=os.environ.get("BENCH_HUEY_DB", "/tmp/bench-huey.db"),
                  results=True)


@huey.task()
def noop():
    return True  # Huey stores no result for None; the benchmark counts stored results
