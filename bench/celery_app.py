"""Celery app for the benchmarks: Redis broker and result backend.

BENCH_REDIS_URL names the Redis database, BENCH_CELERY_QUEUE the queue (unique per run)."""
import os

from celery import Celery

REDIS = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/13")
QUEUE = os.environ.get("BENCH_CELERY_QUEUE", "bench")

app = Celery("bench", broker=REDIS, backend=REDIS)
app.conf.update(
    task_default_queue=QUEUE,
    result_expires=900,              # backstop: the benchmark deletes its own result keys
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
    task_ignore_result=False,
)


@app.task(name="bench.noop")
def noop():
    return None
