"""Demo tasks for trying jobserver out and for tests: `jobserver serve --tasks jobserver.demo`.

They validate their arguments and raise TypeError/ValueError with a message that names
the argument, so a bad submit shows up as a readable job error."""
import time

from . import task

MAX_SECONDS = 24 * 3600.0
MAX_STEPS = 10_000
MAX_NAME = 190


def _number(name, value, low=0.0, high=MAX_SECONDS):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, not {type(value).__name__}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be between {low:g} and {high:g}, not {value!r}")
    return float(value)


def _integer(name, value, low, high):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an integer, not {type(value).__name__}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be between {low} and {high}, not {value!r}")
    return value


def _pause(ctx, seconds):
    """Sleep `seconds`; a cancel ends the sleep at once and the job as `cancelled`."""
    ctx.wait(seconds)
    ctx.check_cancelled()


@task(name="demo.echo")
def echo(ctx, **params):
    """Return the params unchanged."""
    return params


@task(name="demo.sleep", timeout=MAX_SECONDS + 60)
def sleep(ctx, seconds=1.0):
    """Sleep `seconds`, stopping early when cancelled; returns the seconds slept."""
    seconds = _number("seconds", seconds)
    started = time.monotonic()
    _pause(ctx, seconds)
    return {"slept": round(time.monotonic() - started, 3)}


@task(name="demo.steps", max_retries=3, retry_backoff=0.5)
def steps(ctx, n=3, seconds=0.5):
    """Run `n` checkpointed steps of `seconds` each; a retry skips the finished ones."""
    n = _integer("n", n, 0, MAX_STEPS)
    seconds = _number("seconds", seconds)
    ctx.progress(0, n, "starting")
    for i in range(1, n + 1):
        ctx.step(f"step-{i}", _step, ctx, i, seconds)
        ctx.progress(i, n, f"step {i} of {n} done")
    return {"steps": n}


def _step(ctx, i, seconds):
    _pause(ctx, seconds)
    return i


@task(name="demo.fail", max_retries=3, retry_backoff=0.5)
def fail(ctx, message="demo failure", times=None):
    """Raise RuntimeError(message) on the first `times` attempts (every attempt when None)."""
    if not isinstance(message, str):
        raise TypeError(f"message must be a string, not {type(message).__name__}")
    if times is not None:
        times = _integer("times", times, 0, 1000)
    if times is None or ctx.attempt <= times:
        raise RuntimeError(message)
    return {"attempt": ctx.attempt, "failed_before": times}


@task(name="demo.create_project", max_retries=3, timeout=60)
def create_project(ctx, projname, prodesc=None):
    """Insert a row into a `projects` table of the journal's database (bound parameters:
    stored literally). The table is the demo's own, made here when it is missing.

    The insert is a checkpointed step that first looks for this job's row, in the same
    transaction, so neither a retry nor a re-run after a crash between insert and
    checkpoint inserts twice."""
    if not isinstance(projname, str) or not projname.strip():
        raise TypeError("projname must be a non-empty string")
    if len(projname) > MAX_NAME:
        raise ValueError(f"projname must be at most {MAX_NAME} characters")
    if prodesc is not None and not isinstance(prodesc, str):
        raise TypeError(f"prodesc must be a string or null, not {type(prodesc).__name__}")
    ctx.step("insert", _insert_project, ctx, projname, prodesc)
    return {"projname": projname, "prodesc": prodesc, "job_id": ctx.job_id}


# --- the demo's own table: user code keeping its rows beside the jobs ---------------------
# The same columns as the table that jobserver 0.1 made in every journal, so a journal
# from then keeps its table and its rows, and these statements work on both.
_PROJECTS_TABLE = {
    "sqlite": """CREATE TABLE IF NOT EXISTS projects (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        projname VARCHAR(190) NOT NULL,
        prodesc TEXT NULL,
        job_id VARCHAR(36) NULL,
        created_at BIGINT NOT NULL)""",
    "mysql": """CREATE TABLE IF NOT EXISTS projects (
        id BIGINT AUTO_INCREMENT PRIMARY KEY,
        projname VARCHAR(190) NOT NULL,
        prodesc MEDIUMTEXT NULL,
        job_id VARCHAR(36) NULL,
        created_at BIGINT NOT NULL
    ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin""",
}
_INSERT_PROJECT = "INSERT INTO projects (projname, prodesc, job_id, created_at) VALUES (?, ?, ?, ?)"
_PROJECTS_OF_JOB = "SELECT projname, prodesc, job_id FROM projects WHERE job_id = ? ORDER BY id"


def _insert_project(ctx, projname, prodesc):
    with ctx.journal.transaction() as tx:
        tx.cursor.execute(_PROJECTS_TABLE[tx.dialect])  # first: MySQL commits around DDL
        tx.cursor.execute(tx.sql(_PROJECTS_OF_JOB), (ctx.job_id,))
        if not any(row[0] == projname for row in tx.cursor.fetchall()):
            tx.cursor.execute(tx.sql(_INSERT_PROJECT),
                              (projname, prodesc, ctx.job_id, time.time_ns() // 1_000_000))
    return True


def projects_for(journal, job_id):
    """The `projects` rows a job inserted, as dicts (none before the demo's first insert)."""
    with journal.transaction() as tx:
        tx.cursor.execute(_PROJECTS_TABLE[tx.dialect])
        tx.cursor.execute(tx.sql(_PROJECTS_OF_JOB), (job_id,))
        return [{"projname": name, "prodesc": desc, "job_id": job} for name, desc, job in tx.cursor.fetchall()]
