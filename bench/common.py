"""Helpers shared by the benchmark scripts: child processes that always die, medians, tables."""
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def tool(name):
    """A console script of this venv (huey_consumer, celery, rq, jobserver)."""
    path = BIN / name
    if not path.exists():
        raise SystemExit(f"{path} not found: install the bench extra (pip install -e '.[bench]')")
    return str(path)


def spawn(argv, env=None, log_path=None):
    """Start a helper process in its own session, so stop() can end it and its children."""
    out = open(log_path, "wb") if log_path else subprocess.DEVNULL
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = str(ROOT) + os.pathsep + full_env.get("PYTHONPATH", "")
    full_env.update(env or {})
    proc = subprocess.Popen(argv, cwd=ROOT, env=full_env, stdout=out, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    if log_path:
        out.close()
    return proc


def stop(proc, sig=signal.SIGTERM, grace=10.0):
    """End `proc` and its process group: `sig`, then SIGKILL after `grace` seconds."""
    if proc is None:
        return
    for s, wait in ((sig, grace), (signal.SIGKILL, 5.0)):
        if proc.poll() is not None:
            break
        try:
            os.killpg(proc.pid, s)
        except ProcessLookupError:
            break
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            continue
    # the group may outlive its leader (pool children): make sure it is gone
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def wait_until(predicate, timeout, interval=0.05):
    """Poll `predicate` until true or `timeout` s pass; returns its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def table(headers, rows):
    """A Markdown table (printed, and pasted into docs/benchmarks.md)."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    def line(r):
        return "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"
    out = [line(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in cells[1:]]
    return "\n".join(out)


def git_state():
    """Commit and whether the tree was dirty: the numbers belong to that code."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "jobserver"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head + ("+dirty(jobserver/)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def chosen(only, known, what):
    """The names a comma-separated `--only` picks from `known` (all when empty); exits on a typo."""
    names = only.split(",") if only else list(known)
    for name in names:
        if name not in known:
            raise SystemExit(f"unknown {what} {name}; choose from {', '.join(known)}")
    return names
