"""The Prometheus registry of one JobServer, fed by its JobEvents; GET /metrics serves it.

Counts live in memory, in one dict under one lock: the JobServer's event listener, its
submit path, the HTTP hook and the journal's commit observer each do a lookup and an
increment there. prometheus_client's own Counter and Histogram run four Python calls per
increment: with them GET /jobs/{id} cost 22,000 instructions more (bench.wsgi_cost), with
this 3,000. The library still does what it is for: the families, the exposition format,
the escaping and the OpenMetrics negotiation. A scrape never counts rows: the gauges of jobs by state come from
the journal, one range of the jobs_claim index read at most every `ttl` seconds and kept
between scrapes. Each JobServer has its own CollectorRegistry: tests build several servers
in one process, and the global default registry would mix them.

Labels are bounded (docs/metrics.md): `task` takes the names this server's task registry
holds, and UNKNOWN_TASK for any other (a job submitted by another process, or an event
that carries no task); never a job id, an owner or a host. Every series of a registered
task exists from the start, at zero, so a rate() has a start and an absent series means
an unknown name, not "nothing happened yet".
"""
import bisect
import logging
import threading
import time
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString

from .errors import JobserverError
from .model import DEFAULT_QUEUE, TERMINAL, Action, EventKind, Job, JobEvent, State
from .tasks import Registry

__all__ = ["Metrics", "UNKNOWN_TASK", "UNMATCHED", "RUN_BUCKETS", "COMMIT_BUCKETS", "GAUGE_TTL"]

log = logging.getLogger(__name__)

#: seconds: job run times and queue waits, up to an hour (Flower's stop at 10 s)
RUN_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
               120.0, 300.0, 600.0, 1800.0, 3600.0)
#: seconds: one group-commit batch, an fsync (~1 ms) up to a journal that stalls
COMMIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                  2.5, 5.0, 10.0)
#: seconds the journal's gauges are kept between scrapes
GAUGE_TTL = 5.0
#: the `task` label of a job whose task this server's registry does not know
UNKNOWN_TASK = ""
#: the `route` and `method` labels of a request that matched no route
UNMATCHED = "unmatched"
_ENDED = tuple(sorted(state.value for state in TERMINAL))
_UNFINISHED = tuple(state for state in State if state not in TERMINAL)
#: a callback attempt's outcome, by the delivery's state after it
_DELIVERY_OUTCOMES = {"delivered": "delivered", "pending": "retrying", "failed": "failed"}
_RECOVERY_OUTCOMES = {Action.CRASH_REQUEUE: "requeued", Action.CRASH_FAIL: "failed"}
_STATE, _CALLBACK, _RUNNING = EventKind.STATE, EventKind.CALLBACK, State.RUNNING
_RETRY_LATER = Action.RETRY_LATER
_ENDED_NAMES = {state: state.value for state in TERMINAL}

# what a count is of: the first item of its key (the others are its label values)
SUBMITTED, STARTED, FINISHED, RETRIED, RECOVERED = "submitted", "started", "finished", "retried", "recovered"
DELIVERIES, REQUESTS, COMMIT_OPS, STREAMS = "deliveries", "requests", "commit_ops", "streams"
RUN, WAIT, COMMIT = "run", "wait", "commit"  # histograms: (what, *labels, bucket index)

#: (what, metric name, help, label names)
_COUNTERS = (
    (SUBMITTED, "jobserver_jobs_submitted", "Jobs submitted (journaled) through this process.", ("task",)),
    (STARTED, "jobserver_jobs_started", "Runs started by this process's workers (each attempt).", ("task",)),
    (FINISHED, "jobserver_jobs_finished", "Jobs that reached a terminal state through this process.",
     ("task", "state")),
    (RETRIED, "jobserver_jobs_retried", "Runs that failed with retries left: queued again after a "
     "backoff.", ("task",)),
    (RECOVERED, "jobserver_jobs_recovered", "Jobs whose process died while running them, found by "
     "this process.", ("outcome",)),
    (DELIVERIES, "jobserver_callback_deliveries", "Callback delivery attempts, by what came of them.",
     ("outcome",)),
    (REQUESTS, "jobserver_http_requests", "HTTP requests answered, by route (URL rule), method and "
     "status.", ("route", "method", "status")),
    (COMMIT_OPS, "jobserver_journal_operations", "Journal writes committed in group-commit batches.", ()),
)
#: (what, metric name, help, label names, bucket bounds)
_HISTOGRAMS = (
    (RUN, "jobserver_job_run_seconds", "Seconds a run took, from its start to its finish or its "
     "failure.", ("task",), RUN_BUCKETS),
    (WAIT, "jobserver_job_queue_wait_seconds", "Seconds a job was due before a worker took it.",
     ("task",), RUN_BUCKETS),
    (COMMIT, "jobserver_journal_commit_seconds", "Seconds one group-commit batch of journal writes "
     "took, its commit included.", (), COMMIT_BUCKETS),
)
_BOUNDS = {what: bounds for what, _name, _help, _labels, bounds in _HISTOGRAMS}
_COMMIT_SUM, _COMMIT_OPS = (COMMIT, None), (COMMIT_OPS,)


class Metrics:
    """One JobServer's metrics. `on_event` is its JobEvent listener, `count_submitted` its
    submit path's, `count_request` the HTTP hook's, `observe_commit` the journal's commit
    observer; `registry` is what GET /metrics encodes.

    For the event streams, either of: `stream_opened()` when a stream starts sending and
    `stream_closed()` when it ends (in a `finally`), or `with metrics.streaming(): ...`
    around its life; or `add_open_streams(fn)` once, `fn()` giving how many are open, read
    at each scrape (nothing on the streams' own path). The gauge is the sum of both."""

    def __init__(self, tasks: Registry, *, gauges: Callable[[], dict] | None = None,
                 busy: Callable[[], int] | None = None, workers: int = 0,
                 gauge_ttl: float = GAUGE_TTL):
        self._registry_of_tasks = tasks
        self._tasks = tasks.tasks  # name -> spec, live: a task registered later counts too
        self._lock = threading.Lock()
        self._counts = {}  # (what, *label values) -> int; histograms: (..., bucket index)
        self._sums = {}    # (what, *label values) -> float: a histogram's sum
        self._stream_counts = []  # add_open_streams()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Counts(self))
        #: the gauges read at scrape time; `.ttl` is how long the journal's are kept
        self.live = _LiveGauges(gauges, gauge_ttl, busy, workers)
        self.registry.register(self.live)

    # --- the hot paths: a lookup and an increment under the lock ----------------------
    def on_event(self, event: JobEvent) -> None:
        """The JobServer's listener. Progress and step events cost two comparisons; a state
        event one or two counts and a histogram's bucket, in one hold of the lock."""
        kind = event.kind
        if kind is not _STATE:
            if kind is _CALLBACK:
                outcome = _DELIVERY_OUTCOMES.get(event.callback)
                if outcome is not None:
                    self._add((DELIVERIES, outcome))
            return
        task = event.task if event.task in self._tasks else UNKNOWN_TASK
        state = event.state
        if state is _RUNNING:
            key, also, histogram, seconds = (STARTED, task), None, WAIT, event.queue_seconds
        else:
            ended = _ENDED_NAMES.get(state)
            key = None if ended is None else (FINISHED, task, ended)
            action = event.action
            recovered = _RECOVERY_OUTCOMES.get(action)
            also = ((RETRIED, task) if action is _RETRY_LATER
                    else None if recovered is None else (RECOVERED, recovered))
            histogram, seconds = RUN, event.run_seconds
        if seconds is not None:  # the first bucket whose bound is >= seconds (le); past all: +Inf
            bucket, total = (histogram, task, bisect.bisect_left(RUN_BUCKETS, seconds)), (histogram, task)
        counts, lock = self._counts, self._lock
        lock.acquire()  # not `with`: half the cost, and nothing below raises
        try:
            if key is not None:
                counts[key] = counts.get(key, 0) + 1
            if also is not None:
                counts[also] = counts.get(also, 0) + 1
            if seconds is not None:
                counts[bucket] = counts.get(bucket, 0) + 1
                sums = self._sums
                sums[total] = sums.get(total, 0.0) + seconds
        finally:
            lock.release()

    def count_submitted(self, results: Iterable[tuple[Job, bool]]) -> None:
        """The submit path's: its (job, created) pairs; the jobs created count."""
        known, counts = self._tasks, self._counts
        with self._lock:
            for job, created in results:
                if created:
                    key = (SUBMITTED, job.task if job.task in known else UNKNOWN_TASK)
                    counts[key] = counts.get(key, 0) + 1

    def count_request(self, route: str, method: str, status: int) -> None:
        """One answered HTTP request: `route` is the URL rule it matched, `method` one of
        the rule's (UNMATCHED for both when no rule matched: the client chose them)."""
        self._add((REQUESTS, route, method, status))

    def observe_commit(self, seconds: float, operations: int) -> None:
        """The journal's commit observer: one observation per group-commit batch."""
        key = (COMMIT, None, bisect.bisect_left(COMMIT_BUCKETS, seconds))
        counts, sums = self._counts, self._sums
        with self._lock:
            counts[key] = counts.get(key, 0) + 1
            sums[_COMMIT_SUM] = sums.get(_COMMIT_SUM, 0.0) + seconds
            counts[_COMMIT_OPS] = counts.get(_COMMIT_OPS, 0) + operations

    def stream_opened(self) -> None:
        self._add((STREAMS,))

    def stream_closed(self) -> None:
        self._add((STREAMS,), -1)

    def streaming(self):
        """`with metrics.streaming():` around an event stream's life."""
        return _OpenStream(self)

    def add_open_streams(self, count: Callable[[], int]) -> None:
        """Have each scrape add `count()` to the open event streams (an Api's stream slots
        in use, say): nothing to call as streams open and close."""
        self._stream_counts.append(count)

    def open_streams(self) -> int:
        """The event streams open now, as the gauge shows them."""
        with self._lock:
            counted = self._counts.get((STREAMS,), 0)
        return counted + sum(count() for count in list(self._stream_counts))

    def _add(self, key, amount=1):
        counts, lock = self._counts, self._lock
        lock.acquire()
        try:
            counts[key] = counts.get(key, 0) + amount
        finally:
            lock.release()

    # --- scraping ---------------------------------------------------------------------
    def snapshot(self) -> tuple[dict, dict]:
        """(counts, sums) as they are now: copies, read under the lock."""
        with self._lock:
            return dict(self._counts), dict(self._sums)

    def task_labels(self) -> list[str]:
        """The `task` label values every task series has from the start."""
        return [spec.name for spec in self._registry_of_tasks] + [UNKNOWN_TASK]


class _OpenStream:
    __slots__ = ("_metrics",)

    def __init__(self, metrics):
        self._metrics = metrics

    def __enter__(self):
        self._metrics.stream_opened()
        return self

    def __exit__(self, *exc_info):
        self._metrics.stream_closed()
        return False


class _Counts:
    """The in-memory counts as Prometheus families: counters, histograms, open streams."""

    def __init__(self, metrics):
        self._metrics = metrics

    def describe(self):
        return [family for family, _what in self._families()] + [_streams_family()]

    def collect(self):
        counts, sums = self._metrics.snapshot()
        tasks = [(task,) for task in self._metrics.task_labels()]
        starting = {  # the series that exist from the start, at zero
            SUBMITTED: tasks, STARTED: tasks, RETRIED: tasks,
            FINISHED: [(task, state) for (task,) in tasks for state in _ENDED],
            RECOVERED: [(o,) for o in _RECOVERY_OUTCOMES.values()],
            DELIVERIES: [(o,) for o in _DELIVERY_OUTCOMES.values()],
            REQUESTS: [], COMMIT_OPS: [()], RUN: tasks, WAIT: tasks, COMMIT: [(None,)]}
        found = {}
        for key, value in counts.items():
            found.setdefault(key[0], {})[key[1:]] = value
        for family, what in self._families():
            mine = found.get(what, {})
            if isinstance(family, HistogramMetricFamily):
                _add_histograms(family, what, starting[what], mine, sums)
            else:
                for values in dict.fromkeys(starting[what] + sorted(mine, key=_sort_key)):
                    family.add_metric([str(v) for v in values], mine.get(values, 0))
            yield family
        streams = _streams_family()
        streams.add_metric([], self._metrics.open_streams())
        yield streams

    @staticmethod
    def _families():
        """Each family, empty, with what its counts are keyed by."""
        for what, name, help_text, labels in _COUNTERS:
            yield CounterMetricFamily(name, help_text, labels=labels), what
        for what, name, help_text, labels, _bounds in _HISTOGRAMS:
            yield HistogramMetricFamily(name, help_text, labels=labels), what


def _streams_family():
    return GaugeMetricFamily("jobserver_event_streams_open", "Event streams (SSE) open now.")


def _add_histograms(family, what, starting, found, sums):
    """One histogram per label value: cumulative buckets from the counts per bucket index.
    An unlabelled histogram's counts are keyed by the label value None."""
    bounds = (*_BOUNDS[what], float("inf"))
    series = dict.fromkeys(starting + sorted({key[:-1] for key in found}, key=_sort_key))
    for values in series:
        cumulative, buckets = 0, []
        for index, bound in enumerate(bounds):
            cumulative += found.get((*values, index), 0)
            buckets.append((floatToGoString(bound), cumulative))
        labels = [] if values == (None,) else list(values)
        family.add_metric(labels, buckets, sums.get((what, *values), 0.0))


def _sort_key(values):
    return tuple(str(v) for v in values)


class _LiveGauges:
    """The gauges read when scraped: jobs by state and the oldest due job's age from the
    journal (kept `ttl` seconds), the pool's busy threads. A journal that does not answer
    leaves its two gauges out of the scrape (stale numbers would look like a calm queue)."""

    def __init__(self, read, ttl, busy, workers):
        self._read = read
        self.ttl = ttl
        self._busy = busy
        self._workers = workers
        self._lock = threading.Lock()
        self._cached = (float("-inf"), None)

    def describe(self):
        return list(self._families(None, live=False))

    def collect(self):
        return list(self._families(self._journal_counts(), live=True))

    def _journal_counts(self):
        if self._read is None:
            return None
        with self._lock:  # scrapes at once read once
            read_at, counts = self._cached
            if time.monotonic() - read_at < self.ttl:
                return counts
            try:
                counts = self._read()
            except JobserverError as exc:
                log.warning("metrics: the journal's job counts are unavailable: %s", exc)
                counts = None
            self._cached = (time.monotonic(), counts)
            return counts

    def _families(self, counts, live):
        jobs = GaugeMetricFamily("jobserver_jobs", "Jobs in each unfinished state now, in the "
                                 "whole journal (every process sharing it).", labels=["queue", "state"])
        oldest = GaugeMetricFamily("jobserver_oldest_queued_job_age_seconds", "Seconds the "
                                   "queued job due longest has been due (0: none due).", labels=["queue"])
        busy = GaugeMetricFamily("jobserver_worker_threads_busy", "Worker threads of this process "
                                 "running a task now.")
        total = GaugeMetricFamily("jobserver_worker_threads", "Worker threads of this process.")
        if counts is not None:
            for state in _UNFINISHED:
                jobs.add_metric([DEFAULT_QUEUE, state.value], counts.get(state, (0, None))[0])
            age_ms = counts.get(State.QUEUED, (0, None))[1]
            oldest.add_metric([DEFAULT_QUEUE], max(0, age_ms or 0) / 1000)
        if live:
            busy.add_metric([], self._busy() if self._busy is not None else 0)
            total.add_metric([], self._workers)
        return jobs, oldest, busy, total
