"""The dashboard's overview: the journal's raw counts shaped as GET /stats answers them.

Pure functions over what `Journal.stats` read, so the shape is tested without a server.
Run times are from a job's first start to its finish (a retried job's backoff counts);
waits from submit to first start. Percentiles are nearest-rank over the newest runs of
the last hour (at most the journal's `sample`), which is what an operator asks: "how
long does this task take now?", not over all time."""
import math

from .ids import format_ms
from .model import DEFAULT_QUEUE, State
from .model import TERMINAL as _ENDED

UNFINISHED = ("queued", "running", "waiting")
TERMINAL = tuple(state.value for state in State if state in _ENDED)
MINUTES = 60


def percentile(sorted_values, fraction):
    """Nearest-rank percentile of an ascending list (None for an empty one)."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return sorted_values[rank - 1]


def summarize(raw):
    """The GET /stats document (without `viewer` and `features`, which HTTP adds)."""
    unfinished = {state: raw["unfinished"].get(state, 0) for state in UNFINISHED}
    hour = dict(raw["finished"]["hour"], submitted=raw["submitted_hour"])
    day = dict(raw["finished"]["day"])
    first_minute = raw["minutes_from"] // 60_000
    series = {state: [0] * MINUTES for state in TERMINAL}
    for minute, counts in raw["minutes"]:
        index = minute - first_minute
        if 0 <= index < MINUTES:
            for state in TERMINAL:
                series[state][index] += counts.get(state, 0)
    runs = raw["runs"]
    return {
        "generated_at": format_ms(raw["now"]),
        "states": unfinished,
        "last_hour": hour,
        "last_day": day,
        "queues": [{"name": DEFAULT_QUEUE, **unfinished}],
        "minutes": {"start": format_ms(raw["minutes_from"]), "step_seconds": 60, **series},
        "tasks": _tasks(runs),
        "sample": {"runs": len(runs), "limit": raw["sample"],
                   "complete": len(runs) < raw["sample"]},
    }


def _tasks(runs):
    """Per task: runs, failures and p50/p95 of run time and of wait, in seconds."""
    by_task = {}
    for task, state, created_at, started_at, finished_at in runs:
        entry = by_task.setdefault(task, ([], [], [0]))
        entry[0].append((finished_at - started_at) / 1000)
        entry[1].append(max(0, started_at - created_at) / 1000)
        if state == "failed":
            entry[2][0] += 1
    out = []
    for task in sorted(by_task):
        run_times, waits, (failed,) = by_task[task]
        run_times.sort()
        waits.sort()
        out.append({"task": task, "runs": len(run_times), "failed": failed,
                    "run_p50": percentile(run_times, 0.5), "run_p95": percentile(run_times, 0.95),
                    "wait_p50": percentile(waits, 0.5), "wait_p95": percentile(waits, 0.95)})
    return out
