"""The no-op task used by the HTTP benchmark: `jobserver serve --tasks bench.bench_tasks`."""
from jobserver import task


@task(name="bench.noop")
def noop(ctx):
    return None
