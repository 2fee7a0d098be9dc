"""The tasks of the HTTP benchmarks: `jobserver serve --tasks bench.bench_tasks`."""
from jobserver import task


@task(name="bench.noop")
def noop(ctx):
    return None


@task(name="bench.progress", timeout=24 * 3600)
def progress(ctx, seconds=60.0, every=0.1):
    """Report progress every `every` seconds for `seconds` (bench/stream_load.py's jobs)."""
    ticks = int(seconds / every)
    for i in range(ticks):
        if ctx.wait(every):
            break
        ctx.progress(i + 1, ticks)
    return ticks
