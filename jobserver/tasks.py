"""Tasks: the `@task` decorator, the registry, and the context a running job sees."""
import threading
import time
from dataclasses import dataclass, field

from .codec import MAX_DOCUMENT, dumps, loads, storable
from .errors import JobCancelled, UnknownTask
from .model import JobEvent

MAX_STEP_NAME = 190  # the journal's steps.name column


@dataclass(frozen=True)
class TaskSpec:
    """A registered task and its defaults (a job may override max_retries and timeout)."""
    name: str
    fn: object
    max_retries: int = 0
    timeout: float | None = None
    retry_backoff: float = 1.0
    retry_backoff_max: float = 600.0
    priority: int = 0

    def options(self):
        return {"max_retries": self.max_retries, "timeout": self.timeout,
                "retry_backoff": self.retry_backoff, "priority": self.priority}


@dataclass
class Registry:
    """Task name -> TaskSpec. `default_registry` is the one module-level registry;
    tests and embedders can make their own."""
    tasks: dict = field(default_factory=dict)

    def register(self, spec):
        existing = self.tasks.get(spec.name)
        if existing is not None and existing.fn is not spec.fn:
            raise ValueError(f"task {spec.name!r} is already registered to {existing.fn!r}")
        self.tasks[spec.name] = spec
        return spec

    def get(self, name):
        try:
            return self.tasks[name]
        except KeyError:
            raise UnknownTask(name) from None

    def __contains__(self, name):
        return name in self.tasks

    def default_timeout(self, name):
        """The time limit of a task's jobs that set none (None: no limit, or no such task here)."""
        spec = self.tasks.get(name)
        return None if spec is None else spec.timeout

    def __iter__(self):
        return iter(sorted(self.tasks.values(), key=lambda spec: spec.name))

    def task(self, name=None, *, max_retries=0, timeout=None, retry_backoff=1.0,
             retry_backoff_max=600.0, priority=0):
        """Decorator: register `fn(ctx, **params)` under `name` (default module.function)."""
        def decorate(fn):
            spec = TaskSpec(name or f"{fn.__module__}.{fn.__qualname__}", fn, int(max_retries),
                            timeout, float(retry_backoff), float(retry_backoff_max), int(priority))
            self.register(spec)
            fn.task_name = spec.name
            return fn
        return decorate


default_registry = Registry()


def task(name=None, **options):
    """Register a task in the default registry: `@task(name="reports.build", max_retries=3)`.

    Options: max_retries (0), timeout (seconds, None = no limit), retry_backoff (base
    seconds of the exponential backoff, 1.0), retry_backoff_max (600), priority (0)."""
    return default_registry.task(name, **options)


class JobContext:
    """What a running task is handed as its first argument.

    `step()` checkpoints, `progress()` reports, `check_cancelled()` stops the task when a
    cancel was requested or its time limit passed. The pool builds one per run from the
    claimed `Job`; `emit(JobEvent)` hears of its progress and steps."""

    def __init__(self, job, journal, emit=None):
        self.job_id = job.id
        self.attempt = job.attempts
        self.task = job.task
        self.owner = job.owner
        self._token = job.lease_token
        self._journal = journal
        self._cancel = threading.Event()
        self._cancel_reason = "cancel requested"
        self._step_seq = 0
        self._emit = emit
        self.started = time.monotonic()
        if job.cancel_requested:
            self._cancel.set()

    @property
    def journal(self):
        """The journal this job is recorded in: a task keeps its own rows beside the jobs
        with `ctx.journal.transaction()` (see demo.create_project)."""
        return self._journal

    @property
    def cancelled(self):
        """True once a cancel was requested (or the time limit passed)."""
        return self._cancel.is_set()

    def check_cancelled(self):
        """Raise JobCancelled if the job should stop; call it between units of work."""
        if self._cancel.is_set():
            raise JobCancelled(self._cancel_reason)

    def wait(self, seconds):
        """Sleep up to `seconds`, waking early on cancel; returns True if cancelled."""
        return self._cancel.wait(seconds)

    def request_cancel(self, reason="cancel requested"):
        self._cancel_reason = reason
        self._cancel.set()

    def progress(self, done, total=None, message=None):
        """Record progress (`done` of `total`, with a message); written with the next commit."""
        note = {"done": done, "total": total, "message": None if message is None else str(message)}
        self._journal.set_progress(self.job_id, self._token, note)
        if self._emit is not None:
            self._emit(JobEvent.progressed(self.job_id, note))

    def step(self, name, fn, *args, **kwargs):
        """Run `fn(*args, **kwargs)` once for this job, checkpointed under `name`.

        If an earlier attempt finished this step, its recorded result is returned and `fn`
        is not called. The result must be JSON; it is committed before step() returns.
        Step names must be unique within a job."""
        if not isinstance(name, str) or not name or len(name) > MAX_STEP_NAME or not storable(name):
            # MySQL would refuse the row and the step would silently lose its checkpoint
            raise ValueError(f"a step name is a non-empty string of at most {MAX_STEP_NAME} characters "
                             "(UTF-8: no lone surrogates)")
        self._step_seq += 1
        seq = self._step_seq
        recorded = self._journal.get_step(self.job_id, name)
        if recorded is not None and recorded["state"] == "succeeded":
            return loads(recorded["result"])
        self.check_cancelled()
        started = time.monotonic()
        # not awaited: the end record below writes the whole row if this one was lost, and
        # it is awaited (a step that returned is committed; otherwise step() raises)
        self._journal.start_step(self.job_id, self._token, name, seq)
        self._step_event(name, "running")
        try:
            result = fn(*args, **kwargs)
            dumps(result, MAX_DOCUMENT)  # refuse a result we could not replay, before recording success
        except BaseException as exc:
            self._journal.end_step(self.job_id, self._token, name, "failed",
                                   error={"type": type(exc).__name__, "message": str(exc)[:2000]},
                                   seq=seq, elapsed_ms=(time.monotonic() - started) * 1000)
            self._step_event(name, "failed")
            raise
        self._journal.end_step(self.job_id, self._token, name, "succeeded", result=result,
                               seq=seq, elapsed_ms=(time.monotonic() - started) * 1000)
        self._step_event(name, "succeeded")
        return result

    def _step_event(self, name, state):
        if self._emit is not None:
            self._emit(JobEvent.step_changed(self.job_id, name, state))
