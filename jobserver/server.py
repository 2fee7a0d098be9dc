"""JobServer: the journal, the pool and the callbacks wired together; the in-process API.

Everything the HTTP layer does goes through here, so an embedding application can
do the same in-process: submit, get, list, wait, cancel, retry."""
import hashlib
import importlib
import logging
import threading
import time

from .admission import waiting
from .callbacks import Deliverer
from .codec import MAX_DOCUMENT, dumps, storable
from .config import Config
from .errors import InvalidJob, InvalidTransition, JobNotFound, QueueFull, ServerClosed
from .eventbus import EventBus
from .ids import new_id
from .journal import open_journal
from .metrics import Metrics
from .model import DEFAULT_QUEUE, TERMINAL, Action, JobEvent, State
from .pool import Pool
from .stats import summarize
from .tasks import Registry, default_registry

log = logging.getLogger(__name__)

ANONYMOUS = "anonymous"
MAX_PRIORITY = 1000
MAX_DELAY = 366 * 24 * 3600.0
MAX_TIMEOUT = 7 * 24 * 3600.0
MAX_RETRIES = 100
MAX_KEY = 190
MAX_TASK = 200
MAX_OWNER = 190  # the journal's owner column (a token's name)
MAX_PAGE_BYTES = 8 * 1024 * 1024  # a list page stops early (with a cursor) past this much JSON
BULK_LIMIT = 1000  # jobs one bulk call acts on
STATS_DAY_TTL = 30.0  # seconds the overview's last-day counts are kept
BULK_ACTIONS = ("cancel", "retry", "delete")
_STATE_NAMES = frozenset(s.value for s in State)
_FIELDS = frozenset({"task", "params", "priority", "delay", "max_retries", "timeout",
                     "idempotency_key", "callback_url"})  # what a submit spec may hold


class Waiters:
    """Wakes threads waiting for a job to end (long-poll, tests) when this process ends it."""

    def __init__(self):
        self._lock = threading.Lock()
        self._events = {}

    def add(self, job_id):
        event = threading.Event()
        with self._lock:
            self._events.setdefault(job_id, set()).add(event)
        return event

    def remove(self, job_id, event):
        with self._lock:
            waiting = self._events.get(job_id)
            if waiting is not None:
                waiting.discard(event)
                if not waiting:
                    del self._events[job_id]

    def notify(self, job_id):
        with self._lock:
            waiting = list(self._events.get(job_id, ()))
        for event in waiting:
            event.set()


def _request_hash(task, params):
    return hashlib.sha256(dumps([task, params]).encode()).hexdigest()


def load_task_modules(names):
    """Import modules whose @task decorators fill the default registry."""
    for name in names:
        importlib.import_module(name)


class JobServer:
    """A job server in this process: `JobServer("sqlite:///jobs.db", workers=8).start()`.

    `tasks` is a Registry (default: the module-level one that @task fills) or a list of
    module names to import into it. Other keyword arguments override Config fields."""

    def __init__(self, db=None, *, tasks=None, workers=None, config=None, **options):
        config = config or Config()
        changes = dict(options)
        if db is not None:
            changes["db"] = db
        if workers is not None:
            changes["workers"] = workers
        self.config = config.with_(**changes)
        if tasks is None or isinstance(tasks, Registry):
            self.registry = tasks if tasks is not None else default_registry
        else:
            load_task_modules(tasks)
            self.registry = default_registry
        load_task_modules(self.config.tasks)
        self.journal = open_journal(self.config.db)
        self.waiters = Waiters()
        self.events = EventBus(self.journal, self.config.poll_interval)  # for the event streams
        self._listeners = []
        try:
            self.pool = Pool(self.journal, self.registry, workers=self.config.workers,
                             lease_seconds=self.config.lease_seconds,
                             poll_interval=self.config.poll_interval,
                             shutdown_grace=self.config.shutdown_grace,
                             max_crashes=self.config.max_crashes, listener=self._on_event,
                             node_id=self.config.node_id)
            self.deliverer = Deliverer(self.journal, self.config, render=self.get, emit=self._on_event)
        except ValueError:  # a bad node id, callback secret or setting: do not leave the journal open
            self.journal.close()
            raise
        self.callback_guard = self.deliverer.guard.check  # url -> url, or InvalidCallback
        self.add_listener(self.deliverer.on_event)
        self.metrics = Metrics(self.registry, gauges=self.journal.job_gauges, busy=self.pool.busy,
                               workers=self.config.workers)
        self.add_listener(self.metrics.on_event)
        self.journal.observe_commits(self.metrics.observe_commit)
        self._depth = (0.0, 0)
        self._day_counts = {}  # owner -> (monotonic time, the last day's counts): stats()
        self._state = "new"
        self._lock = threading.Lock()

    # --- lifecycle --------------------------------------------------------------------
    def start(self):
        """Recover, then run jobs. Returns self."""
        with self._lock:
            if self._state != "new":
                raise ServerClosed(f"server is {self._state}")
            self._state = "running"
        self.pool.start()
        self.deliverer.start()
        return self

    def stop(self, grace=None):
        """Refuse new work, let running jobs finish (up to `grace` s), give the rest back, close."""
        with self._lock:
            if self._state in ("stopping", "stopped"):
                return
            started = self._state == "running"
            self._state = "stopping"
        self.events.close()  # open streams end now; their clients resume elsewhere or later
        if started:
            self.pool.stop(grace)
            self.deliverer.stop()  # waits at most the callback timeout for a slow receiver
        self.journal.close()
        self._state = "stopped"

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.stop()

    @property
    def accepting(self):
        return self._state in ("new", "running")

    def add_listener(self, fn):
        """`fn(event)` for each JobEvent in this process: state, progress, step, callback.

        Listeners run on the pool's threads, including the journal's committer (an
        outcome is announced once it is committed): they must be quick and must not
        wait for journal writes. Hand work to your own thread."""
        self._listeners.append(fn)

    def _on_event(self, event):
        if event.ended:
            self.waiters.notify(event.job_id)
        for fn in self._listeners:
            try:
                fn(event)
            except Exception:  # one listener's bug must not keep the event from the others
                log.exception("job %s: event listener %r failed", event.job_id, fn)

    # --- submit -----------------------------------------------------------------------
    def submit(self, task, params=None, *, owner=ANONYMOUS, **options):
        """Journal one job and return its id once the row is committed."""
        spec = dict(options, task=task, params={} if params is None else params)
        [(job, _created)] = self.submit_many([spec], owner=owner)
        return job["id"]

    def submit_many(self, specs, owner=ANONYMOUS):
        """Journal several jobs in one transaction: [(public job, created)], created=False
        for an idempotent repeat. All or nothing: one bad spec refuses the batch."""
        if not self.accepting:
            raise ServerClosed("the server is shutting down")
        if len(specs) > self.config.max_batch:
            raise InvalidJob(f"a batch holds at most {self.config.max_batch} jobs")
        if not isinstance(owner, str) or not owner or len(owner) > MAX_OWNER or not storable(owner):
            raise InvalidJob(f"the owner must be a non-empty string of at most {MAX_OWNER} characters")
        rows = [self._row(spec, owner) for spec in specs]  # each with its decoded params
        self._check_depth(len(rows))
        results = self.journal.insert_jobs(rows)
        created = sum(1 for _job, was_created in results if was_created)
        if created:
            self.pool.wake()
            self.metrics.count_submitted(results)
            self._depth = (self._depth[0], self._depth[1] + created)
        # a repeat shows its stored params (equal, as its request hash matched, but in the
        # journal's key order, as every later read shows them)
        return [(self._public(job), was_created) for job, was_created in results]

    def _row(self, spec, owner):
        """The journal row of a submit spec, its params decoded beside their text — or
        InvalidJob / UnknownTask."""
        if not isinstance(spec, dict):
            raise InvalidJob("a job is a JSON object")
        if not _FIELDS.issuperset(spec):
            unknown = set(spec) - _FIELDS
            raise InvalidJob(f"unknown field(s): {', '.join(sorted(map(str, unknown)))}")
        task = spec.get("task")
        if not isinstance(task, str) or not task or len(task) > MAX_TASK or not storable(task):
            raise InvalidJob("'task' must be a non-empty string")
        task_spec = self.registry.get(task)
        params = spec.get("params", {})
        if params is None:
            params = {}
        if not isinstance(params, dict):
            raise InvalidJob("'params' must be an object")
        try:
            params_text = dumps(params, MAX_DOCUMENT)  # ASCII: a lone surrogate is escaped
        except (TypeError, ValueError) as exc:
            raise InvalidJob(f"'params' cannot be stored as JSON: {exc}") from None
        except RecursionError:
            raise InvalidJob("'params' nests too deeply to be stored as JSON") from None
        key = _opt_str(spec, "idempotency_key", MAX_KEY)
        callback_url = _opt_str(spec, "callback_url", 2048)
        if callback_url is not None:
            if self.callback_guard is None:
                raise InvalidJob("callbacks are not enabled on this server")
            callback_url = self.callback_guard(callback_url)
        return {
            "id": new_id(), "task": task, "owner": owner, "params": params_text,
            "priority": _opt_int(spec, "priority", -MAX_PRIORITY, MAX_PRIORITY, task_spec.priority),
            "max_retries": _opt_int(spec, "max_retries", 0, MAX_RETRIES, task_spec.max_retries),
            "timeout": _opt_num(spec, "timeout", 0.001, MAX_TIMEOUT, None),
            "delay_ms": int(_opt_num(spec, "delay", 0, MAX_DELAY, 0) * 1000),
            "callback_url": callback_url, "idempotency_key": key,
            "request_hash": _request_hash(task, params) if key is not None else None,
            "decoded_params": params,
        }

    def _check_depth(self, adding):
        limit = self.config.max_queued
        if limit is None:
            return
        checked_at, depth = self._depth
        if time.monotonic() - checked_at > 1.0 or depth + adding > limit:
            depth = self.journal.count_queued()
            self._depth = (time.monotonic(), depth)
        if depth + adding > limit:
            raise QueueFull(limit, retry_after=max(1, int(self.config.poll_interval * 4)))

    # --- reads and actions ------------------------------------------------------------
    def get(self, job_id, owner=None):
        """The job as API.md shows it; JobNotFound if absent or not `owner`'s (None: any owner)."""
        job, steps = (self.journal.get_job_and_steps(job_id) if _plausible_id(job_id) else (None, []))
        self._check_visible(job_id, job, owner)
        callback = self.journal.latest_callback(job_id) if job.callback_url else None
        return self._public(job, steps, callback)

    def _visible(self, job_id, owner):
        """The Job of a job `owner` may see (None: any), else JobNotFound."""
        job = self.journal.get_job(job_id) if _plausible_id(job_id) else None
        self._check_visible(job_id, job, owner)
        return job

    @staticmethod
    def _check_visible(job_id, job, owner):
        """The one visibility rule for reads and actions alike: another owner's job is absent."""
        if job is None or (owner is not None and job.owner != owner):
            raise JobNotFound(job_id)

    def _public(self, job, steps=(), callback=None):
        return job.to_public(steps, callback, task_timeout=self.registry.default_timeout(job.task))

    def list(self, owner=None, state=None, task=None, cursor=None, limit=50):
        """(jobs newest first, next cursor or None). A page stops early, with a cursor, once
        its documents reach MAX_PAGE_BYTES: one result may hold megabytes."""
        if state is not None and state not in _STATE_NAMES:
            raise InvalidJob(f"unknown state {state!r}")
        page = self.journal.list_jobs(owner=owner, state=state, task=task, before=cursor,
                                      limit=limit, max_bytes=MAX_PAGE_BYTES)
        return [self._public(job, page.steps.get(job.id, ())) for job in page.jobs], page.next

    def wait(self, job_id, timeout, owner=None):
        """The job once it is terminal, or as it is after `timeout` seconds."""
        deadline = time.monotonic() + max(0.0, timeout)
        event = self.waiters.add(job_id)
        try:
            while True:
                job = self.get(job_id, owner)
                remaining = deadline - time.monotonic()
                if job["state"] in TERMINAL or remaining <= 0:
                    return job
                # woken at once when this process ends the job; another process's, at the next look
                with waiting():
                    event.wait(min(remaining, self.config.poll_interval))
                event.clear()
        finally:
            self.waiters.remove(job_id, event)

    def cancel(self, job_id, owner=None):
        """Cancel a queued job, or ask a running one to stop. InvalidTransition if finished."""
        job = self._visible(job_id, owner)
        if self.journal.cancel(job_id) is State.CANCELLED:
            self._on_event(JobEvent.state_changed(job_id, State.CANCELLED, task=job.task,
                                                  action=Action.CANCEL_QUEUED,
                                                  callback="pending" if job.callback_url else None))
        else:
            self.pool.cancel_local(job_id)
        return self.get(job_id, owner)

    def retry(self, job_id, owner=None):
        """Queue a failed or cancelled job again under the same id. InvalidTransition otherwise."""
        self._visible(job_id, owner)
        self.journal.retry(job_id)
        self.pool.wake()
        return self.get(job_id, owner)

    def retry_callback(self, job_id, owner=None):
        """Deliver a job's failed callback again: same webhook-id, a fresh schedule.

        InvalidTransition if its latest delivery is not failed (or it has none)."""
        self._visible(job_id, owner)
        if not self.journal.rearm_callback(job_id):
            latest = self.journal.latest_callback(job_id)
            state = f"callback {latest['state']}" if latest else "without a callback"
            raise InvalidTransition(job_id, state, "retry the callback of")
        self.deliverer.wake()
        return self.get(job_id, owner)

    def tasks(self):
        return [dict(name=spec.name, **spec.options()) for spec in self.registry]

    def health(self, details=False):
        """{"status": "ok"} (or "stopping"); with `details`, also this process's node id
        (host name and pid: for operators, not for anyone who asks). Raises
        JournalUnavailable unless the journal answers and takes writes."""
        self.journal.ping()
        self.journal.writable()
        health = {"status": "ok" if self.accepting else "stopping"}
        if details:
            health["node"] = self.pool.node_id
        return health

    # --- the dashboard: overview, delete, bulk ---------------------------------------
    def stats(self, owner=None):
        """The overview of `owner`'s jobs (None: everyone's), as GET /stats answers it.

        The last day's counts are read at most every STATS_DAY_TTL seconds per owner (a
        day of jobs is the one range that is long to count); the rest is read each time."""
        cache = self._day_counts
        now = time.monotonic()
        cached = cache.get(owner)
        fresh = cached is not None and now - cached[0] < STATS_DAY_TTL
        raw = self.journal.stats(owner=owner, day=not fresh)
        if fresh:
            raw["finished"]["day"] = cached[1]
        else:
            if len(cache) >= 1024:  # one entry per owner looking: bounded all the same
                cache.clear()
            cache[owner] = (now, raw["finished"]["day"])
        return summarize(raw)

    def delete(self, job_id, owner=None):
        """Forget a terminal job, its steps and its callback deliveries.

        JobNotFound if `owner` may not see it; InvalidTransition if it has not ended."""
        self._visible(job_id, owner)
        self.journal.delete_job(job_id)

    def bulk(self, action, owner=None, state=None, task=None, queue=None, ids=None, cursor=None,
             limit=BULK_LIMIT):
        """Apply cancel, retry or delete to the next `limit` of `owner`'s jobs that the
        filter matches, newest first, below `cursor`. Returns (matched, changed, next cursor).

        Each job changes as its single-job action would change it (guarded by its state);
        a job the filter names that the action does not apply to is matched, not changed."""
        if action not in BULK_ACTIONS:
            raise InvalidJob(f"'action' is one of {', '.join(BULK_ACTIONS)}")
        if state is not None and state not in _STATE_NAMES:
            raise InvalidJob(f"unknown state {state!r}")
        if queue is not None and queue != DEFAULT_QUEUE:
            return 0, 0, None  # every job is in the default queue until queues land
        page = self.journal.bulk_page(owner=owner, state=state, task=task, before=cursor,
                                      ids=ids, limit=limit + 1)
        more = len(page) > limit
        page = page[:limit]
        changed, with_callback = (self.journal.bulk(action, [job_id for job_id, _state in page])
                                  if page else ({}, frozenset()))
        for job_id, outcome in changed.items():  # what the single-job actions announce
            if outcome == State.CANCELLED:
                self._on_event(JobEvent.state_changed(
                    job_id, State.CANCELLED, callback="pending" if job_id in with_callback else None))
            elif outcome == State.RUNNING:
                self.pool.cancel_local(job_id)
        if action == "retry" and changed:
            self.pool.wake()
        return len(page), len(changed), (page[-1][0] if more else None)


def _plausible_id(job_id):
    return isinstance(job_id, str) and len(job_id) <= 64


def _opt_str(spec, name, max_len):
    value = spec.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or not value or len(value) > max_len or not storable(value):
        # a lone surrogate would make the driver raise inside the shared write transaction
        raise InvalidJob(f"'{name}' must be a non-empty string of at most {max_len} characters "
                         "(UTF-8: no lone surrogates)")
    return value


def _opt_int(spec, name, low, high, default):
    return _opt_number(spec, name, low, high, default, int, "an integer")


def _opt_num(spec, name, low, high, default):
    value = _opt_number(spec, name, low, high, default, (int, float), "a number")
    return None if value is None else float(value)


def _opt_number(spec, name, low, high, default, types, kind):
    value = spec.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, types) or not low <= value <= high:
        raise InvalidJob(f"'{name}' must be {kind} from {low} to {high}")
    return value
