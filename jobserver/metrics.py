"""The Prometheus registry of one JobServer, fed by its JobEvents; GET /metrics serves it.

Counters and histograms live in memory: the JobServer's event listener and its submit path
move them (a dict lookup and an increment per event), so a scrape never counts rows. The
gauges of jobs by state come from the journal, one range of the jobs_claim index read at
most every `gauge_ttl` seconds and kept between scrapes. Each JobServer has its own
CollectorRegistry: tests build several servers in one process, and the global default
registry would mix them.

Labels are bounded (docs/metrics.md): `task` takes the names this server's task registry
holds, and UNKNOWN_TASK for any other (a job submitted by another process, or an event
that carries no task); never a job id, an owner or a host. Every series of a registered
task exists from the start, at zero, so a rate() has a start and an absent series means
an unknown name, not "nothing happened yet".

docs/metrics.md lists every metric with its meaning and example queries.
"""
import logging
import threading
import time
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily

from .errors import JobserverError
from .model import DEFAULT_QUEUE, TERMINAL, Action, EventKind, JobEvent, State
from .tasks import Registry

__all__ = ["Metrics", "UNKNOWN_TASK", "RUN_BUCKETS", "COMMIT_BUCKETS", "GAUGE_TTL"]

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
#: route x method x status children kept for lookup (far more than the API has)
MAX_ROUTE_SERIES = 10_000
#: outcome label of a callback attempt, by the delivery's state after it
_DELIVERY_OUTCOMES = {"delivered": "delivered", "pending": "retrying", "failed": "failed"}
_UNFINISHED = tuple(state for state in State if state not in TERMINAL)
_ENDED = tuple(sorted(TERMINAL, key=lambda state: state.value))
_STATE, _CALLBACK, _RUNNING = EventKind.STATE, EventKind.CALLBACK, State.RUNNING


class _TaskSeries:
    """The children of one `task` label value, looked up once per event."""
    __slots__ = ("submitted", "started", "finished", "retried", "run", "wait")

    def __init__(self, metrics, task):
        self.submitted = metrics.submitted_total.labels(task)
        self.started = metrics.started_total.labels(task)
        self.finished = {state: metrics.finished_total.labels(task, state.value) for state in _ENDED}
        self.retried = metrics.retried_total.labels(task)
        self.run = metrics.run_seconds.labels(task)
        self.wait = metrics.queue_wait_seconds.labels(task)


class Metrics:
    """One JobServer's metrics. `on_event` is its JobEvent listener, `count_submitted` its
    submit path's, `observe_commit` the journal's commit observer; `registry` is what
    GET /metrics encodes.

    For the event streams: `stream_opened()` when a stream starts sending, `stream_closed()`
    when it ends (in a `finally`), or `with metrics.streaming(): ...` around its life."""

    def __init__(self, tasks: Registry, *, gauges: Callable[[], dict] | None = None,
                 busy: Callable[[], int] | None = None, workers: int = 0,
                 gauge_ttl: float = GAUGE_TTL):
        self.registry = CollectorRegistry(auto_describe=False)
        self._tasks_known = tasks
        self._lock = threading.Lock()  # making a task's or a route's series
        r = self.registry
        self.submitted_total = Counter("jobserver_jobs_submitted", "Jobs submitted (journaled) "
                                       "through this process.", ["task"], registry=r)
        self.started_total = Counter("jobserver_jobs_started", "Runs started by this process's "
                                     "workers (each attempt).", ["task"], registry=r)
        self.finished_total = Counter("jobserver_jobs_finished", "Jobs that reached a terminal "
                                      "state through this process.", ["task", "state"], registry=r)
        self.retried_total = Counter("jobserver_jobs_retried", "Runs that failed with retries "
                                     "left: queued again after a backoff.", ["task"], registry=r)
        self.recovered_total = Counter("jobserver_jobs_recovered", "Jobs whose process died while "
                                       "running them, found by this process.", ["outcome"], registry=r)
        self.deliveries_total = Counter("jobserver_callback_deliveries", "Callback delivery "
                                        "attempts, by what came of them.", ["outcome"], registry=r)
        self.requests_total = Counter("jobserver_http_requests", "HTTP requests answered, by "
                                      "route (URL rule), method and status.",
                                      ["route", "method", "status"], registry=r)
        self.run_seconds = Histogram("jobserver_job_run_seconds", "Seconds a run took, from its "
                                     "start to its finish or its failure.", ["task"],
                                     buckets=RUN_BUCKETS, registry=r)
        self.queue_wait_seconds = Histogram("jobserver_job_queue_wait_seconds", "Seconds a job "
                                            "was due before a worker took it.", ["task"],
                                            buckets=RUN_BUCKETS, registry=r)
        self.commit_seconds = Histogram("jobserver_journal_commit_seconds", "Seconds one "
                                        "group-commit batch of journal writes took, its commit "
                                        "included.", buckets=COMMIT_BUCKETS, registry=r)
        self.commit_ops_total = Counter("jobserver_journal_operations", "Journal writes "
                                        "committed in group-commit batches.", registry=r)
        self.streams_open = Gauge("jobserver_event_streams_open", "Event streams (SSE) open now.",
                                  registry=r)
        self.stream_opened = self.streams_open.inc
        self.stream_closed = self.streams_open.dec
        self.recovered = {action: self.recovered_total.labels(outcome) for action, outcome in
                          ((Action.CRASH_REQUEUE, "requeued"), (Action.CRASH_FAIL, "failed"))}
        self.deliveries = {state: self.deliveries_total.labels(outcome)
                           for state, outcome in _DELIVERY_OUTCOMES.items()}
        unknown = _TaskSeries(self, UNKNOWN_TASK)
        self._series = {None: unknown, UNKNOWN_TASK: unknown}
        for spec in tasks:
            self._series[spec.name] = _TaskSeries(self, spec.name)
        self._routes = {}  # (endpoint, method, status) -> counter child
        #: the gauges read at scrape time; `.ttl` is how long the journal's are kept
        self.live = _LiveGauges(gauges, gauge_ttl, busy, workers)
        r.register(self.live)

    # --- the hot paths ----------------------------------------------------------------
    def on_event(self, event: JobEvent) -> None:
        """The JobServer's listener: one lookup and an increment or two per state event."""
        kind = event.kind
        if kind is not _STATE:
            if kind is _CALLBACK:
                child = self.deliveries.get(event.callback)
                if child is not None:
                    child.inc()
            return
        series = self._series.get(event.task) or self._task_series(event.task)
        state = event.state
        if state is _RUNNING:
            series.started.inc()
            if event.queue_seconds is not None:
                series.wait.observe(event.queue_seconds)
            return
        if event.run_seconds is not None:
            series.run.observe(event.run_seconds)
        finished = series.finished.get(state)
        if finished is not None:
            finished.inc()
        action = event.action
        if action is Action.RETRY_LATER:
            series.retried.inc()
        elif action is Action.CRASH_REQUEUE or action is Action.CRASH_FAIL:
            self.recovered[action].inc()

    def count_submitted(self, tasks: Iterable[str]) -> None:
        """The submit path's: the task of each job it created."""
        for task in tasks:
            (self._series.get(task) or self._task_series(task)).submitted.inc()

    def observe_commit(self, seconds: float, operations: int) -> None:
        """The journal's commit observer: one observation per group-commit batch."""
        self.commit_seconds.observe(seconds)
        self.commit_ops_total.inc(operations)

    def count_request(self, rule, method: str, status: int) -> None:
        """One answered HTTP request; `rule` is the URL rule it matched (None: none did)."""
        key = (None if rule is None else rule.endpoint, method, status)
        child = self._routes.get(key)
        if child is None:
            child = self._route_child(key, rule)
        child.inc()

    # --- making series on first use ---------------------------------------------------
    def _task_series(self, task):
        """The series of a task registered after this server was made, or the unknown
        task's: a name outside the registry never becomes a label value."""
        if task not in self._tasks_known:
            return self._series[None]
        with self._lock:
            series = self._series.get(task)
            if series is None:
                series = self._series[task] = _TaskSeries(self, task)
        return series

    def _route_child(self, key, rule):
        _endpoint, method, status = key
        # a matched route's method is one of the rule's own (another answers 405, matching
        # no rule); an unmatched request's path and method are whatever the client sent
        route, method = (rule.rule, method) if rule is not None else (UNMATCHED, UNMATCHED)
        child = self.requests_total.labels(route, method, str(status))
        with self._lock:
            if len(self._routes) < MAX_ROUTE_SERIES:
                self._routes[key] = child
        return child

    def streaming(self):
        """`with metrics.streaming():` around an event stream's life."""
        return _OpenStream(self)


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
