"""The model of a job: its states, the one table of moves between them, the `Job` value made
from a journal row, and the `JobEvent`s that tell listeners what happened to a job.

Every state change of a job is a row of `TRANSITIONS`; the journal's guarded UPDATEs are
built from it (journal_sql.py) and tests/test_model.py checks every statement against it.
Adding a state (say `waiting`) is: a `State` member with its note, its rows in
`TRANSITIONS`, and a migration that lets the jobs table's CHECK constraint hold it.
Nothing here knows SQL, threads or HTTP.
"""
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields, make_dataclass
from enum import Enum
from typing import Any, NamedTuple

from .codec import loads
from .ids import format_ms

__all__ = ["State", "Action", "Transition", "TRANSITIONS", "TERMINAL", "next_states",
           "Job", "StepSummary", "EventKind", "JobEvent", "DEFAULT_QUEUE"]

#: the queue every job is in until queues exist (API.md lists the field already)
DEFAULT_QUEUE = "default"


class State(str, Enum):
    """A job's state. Closed: the jobs table's CHECK constraint holds the same set."""

    #: journaled and waiting for a worker (and for its run_at: a delay or a retry's backoff)
    QUEUED = "queued"
    #: claimed by one worker under a lease that the worker renews while the task runs
    RUNNING = "running"
    #: the task returned; `result` holds what it returned (terminal)
    SUCCEEDED = "succeeded"
    #: the task raised with no retries left, passed its time limit, or crashed its process
    #: `max_crashes` times; `error` says which (terminal, but a retry request queues it again)
    FAILED = "failed"
    #: cancelled before it started, or stopped by the task when a cancel was requested
    #: (terminal, but a retry request queues it again)
    CANCELLED = "cancelled"


class Action(str, Enum):
    """What moves a job: each name is one guarded statement of the journal."""

    #: a submit writes the job; it had no state before
    SUBMIT = "submit"
    #: a worker takes a due job and holds it under a new lease token
    CLAIM = "claim"
    #: the run ends: the task's result, its last error, or the cancel it honoured
    FINISH = "finish"
    #: the run failed with retries left: queued again after a backoff
    RETRY_LATER = "retry-later"
    #: a stopping worker hands back a run it will not finish; the attempt is not counted
    GIVE_BACK = "give-back"
    #: the run's process died (lease expired, or its pid is gone): queued again, a crash counted
    CRASH_REQUEUE = "crash-requeue"
    #: the job's process died for the `max_crashes`-th time: failed with WorkerLost
    CRASH_FAIL = "crash-fail"
    #: a user cancels a job that has not started yet
    CANCEL_QUEUED = "cancel-queued"
    #: a user asks a running job to stop: only the flag is set, the run then finishes
    REQUEST_CANCEL = "request-cancel"
    #: a user queues a failed or cancelled job again, under the same id
    RETRY = "retry"
    #: a user forgets a job that ended: its row goes (with its steps and deliveries)
    DELETE = "delete"


class Transition(NamedTuple):
    """The states an action may start from (none: a new job) and those it may lead to
    (none: the job is gone)."""
    sources: frozenset[State]
    targets: frozenset[State]


def _move(sources, targets):
    return Transition(frozenset(sources), frozenset(targets))


_Q, _R, _S, _F, _C = State.QUEUED, State.RUNNING, State.SUCCEEDED, State.FAILED, State.CANCELLED

#: Every allowed change of a job's state, by the action that makes it.
TRANSITIONS: Mapping[Action, Transition] = {
    Action.SUBMIT: _move((), {_Q}),
    Action.CLAIM: _move({_Q}, {_R}),
    Action.FINISH: _move({_R}, {_S, _F, _C}),
    Action.RETRY_LATER: _move({_R}, {_Q}),
    Action.GIVE_BACK: _move({_R}, {_Q}),
    Action.CRASH_REQUEUE: _move({_R}, {_Q}),
    Action.CRASH_FAIL: _move({_R}, {_F}),
    Action.CANCEL_QUEUED: _move({_Q}, {_C}),
    Action.REQUEST_CANCEL: _move({_R}, {_R}),
    Action.RETRY: _move({_F, _C}, {_Q}),
    Action.DELETE: _move({_S, _F, _C}, ()),
}


def next_states(state: State) -> frozenset[State]:
    """The states a job in `state` may move to, by any action."""
    return frozenset(target for move in TRANSITIONS.values() if state in move.sources
                     for target in move.targets)


#: The states only a user's retry (or delete) leaves: a job there has ended.
TERMINAL = frozenset(state for state in State
                     if all(action in (Action.RETRY, Action.DELETE) for action, move in TRANSITIONS.items()
                            if state in move.sources))


class StepSummary(NamedTuple):
    """A step as a job's representation shows it (the journal's narrow step columns)."""
    name: str
    state: str
    started_at: int
    finished_at: int | None


_STATES = {state.value: state for state in State}


def _quick_maker(cls):
    """A callable making a `cls` (a frozen, slotted dataclass) from the same arguments as
    its __init__, several times faster.

    A frozen dataclass's __init__ sets each field with object.__setattr__, ~150 ns a field:
    the hot paths make two Jobs (24 fields) and two JobEvents per job, which came to 5 % of
    the instructions of a job submitted over HTTP and run (bench.wsgi_cost post-run). The
    values go into a mutable twin of the same slot layout, whose __init__ stores them with
    plain attribute stores, and the object then becomes a `cls` (CPython allows the class
    change between classes of identical slots)."""
    def __post_init__(self):
        self.__class__ = cls

    return make_dataclass(f"_{cls.__name__}Draft", [
        (f.name, f.type, field(default=f.default)) if f.default is not MISSING else (f.name, f.type)
        for f in fields(cls)], slots=True, namespace={"__post_init__": __post_init__})


@dataclass(frozen=True, slots=True)
class Job:
    """A job as the journal holds it, its JSON documents decoded. Fields are the jobs
    table's columns, in the order the journal selects them (journal_sql.JOB_COLUMNS).

    Times are integer milliseconds since the epoch (the database's clock)."""

    id: str
    task: str
    owner: str
    state: State
    params: dict
    priority: int
    attempts: int          # runs started, crashes and given-back runs excepted
    max_retries: int
    timeout: float | None  # the job's own limit in seconds; None: the task's default
    run_at: int            # not claimed before this time
    lease_owner: str | None
    lease_token: int       # goes up by one at each claim: fences out an older run's writes
    lease_expires: int | None
    crashes: int           # runs that ended with their process dying
    progress: dict | None
    result: Any
    error: dict | None
    cancel_requested: bool
    callback_url: str | None
    idempotency_key: str | None
    request_hash: str | None
    created_at: int
    started_at: int | None
    finished_at: int | None

    @staticmethod
    def from_row(row: Sequence, params: dict | None = None) -> "Job":
        """The Job of a row of the journal's job columns (in `Job`'s field order).

        `params`: the decoded params when the caller has them already (a submit), so a
        big document is not decoded a second time; None: decode the row's text."""
        values = list(row)
        values[_STATE] = _STATES[values[_STATE]]
        values[_PARAMS] = loads(values[_PARAMS]) if params is None else params
        for i in _MAYBE_NULL:  # NULL in most rows (a job not yet running, a poll of a running one)
            if values[i] is not None:
                values[i] = loads(values[i])
        values[_CANCEL] = bool(values[_CANCEL])
        return _make_job(*values)

    def effective_timeout(self, task_default: float | None) -> float | None:
        """The time limit this job runs under: its own, else its task's default, else None."""
        return self.timeout if self.timeout is not None else task_default

    def to_public(self, steps: Sequence[StepSummary] = (), callback: Mapping | None = None, *,
                  task_timeout: float | None = None) -> dict:
        """The job representation of API.md, in its order. `callback`: the job's latest
        delivery row, if any; `task_timeout`: the task's default time limit."""
        return {
            "id": self.id, "task": self.task, "state": self.state.value, "owner": self.owner,
            "params": self.params, "priority": self.priority, "attempts": self.attempts,
            "max_retries": self.max_retries, "run_at": format_ms(self.run_at),
            "progress": self.progress,
            "steps": [{"name": s.name, "state": s.state, "started_at": format_ms(s.started_at),
                       "finished_at": format_ms(s.finished_at)} for s in steps],
            "result": self.result, "error": self.error, "cancel_requested": self.cancel_requested,
            "callback": None if self.callback_url is None else self._public_callback(callback),
            "queue": DEFAULT_QUEUE,
            "timeout": self.timeout if self.timeout is not None else task_timeout,
            "created_at": format_ms(self.created_at), "started_at": format_ms(self.started_at),
            "finished_at": format_ms(self.finished_at),
        }

    def _public_callback(self, callback):
        if callback is None:  # the job has not ended yet: nothing was written
            return {"url": self.callback_url, "state": "pending", "attempts": 0,
                    "last_error": None, "delivered_at": None}
        return {"url": callback["url"], "state": callback["state"], "attempts": callback["attempts"],
                "last_error": callback["last_error"],
                "delivered_at": format_ms(callback["delivered_at"])}


JOB_FIELDS = tuple(f.name for f in fields(Job))
_make_job = _quick_maker(Job)
_STATE, _PARAMS, _CANCEL = (JOB_FIELDS.index(name) for name in ("state", "params", "cancel_requested"))
_MAYBE_NULL = tuple(JOB_FIELDS.index(name) for name in ("progress", "result", "error"))  # JSON or NULL


class EventKind(str, Enum):
    """What a JobEvent is about."""

    #: the job moved to another state (`state`, and `attempt`, `error_type`, `callback`)
    STATE = "state"
    #: the running task reported progress (`progress`)
    PROGRESS = "progress"
    #: a step started or ended (`step`, `step_state`)
    STEP = "step"
    #: a callback delivery was attempted (`callback`, `callback_attempts`)
    CALLBACK = "callback"


@dataclass(frozen=True, slots=True)
class JobEvent:
    """Something that happened to a job in this process. State, callback and step-end
    events are told once committed; progress and a step's start once queued for the next
    commit. Build one with the constructors below."""

    kind: EventKind
    job_id: str
    #: STATE: the job's new state
    state: State | None = None
    #: STATE into running: the attempt that starts
    attempt: int | None = None
    #: STATE into queued (a retry later) or failed: the error's type
    error_type: str | None = None
    #: PROGRESS: the note {"done", "total", "message"}
    progress: dict | None = None
    #: STEP: the step's name and its state ("running", "succeeded", "failed")
    step: str | None = None
    step_state: str | None = None
    #: STATE: "pending" when this change wrote a callback delivery (the deliverer looks at
    #: once); CALLBACK: the delivery's state after the attempt ("pending": tried again later)
    callback: str | None = None
    #: CALLBACK: the attempts made so far
    callback_attempts: int | None = None

    @staticmethod
    def state_changed(job_id: str, state: State, *, attempt: int | None = None,
                      error_type: str | None = None, callback: str | None = None) -> "JobEvent":
        return _make_event(EventKind.STATE, job_id, state, attempt, error_type, callback=callback)

    @staticmethod
    def progressed(job_id: str, note: dict) -> "JobEvent":
        return _make_event(EventKind.PROGRESS, job_id, progress=note)

    @staticmethod
    def step_changed(job_id: str, name: str, state: str) -> "JobEvent":
        return _make_event(EventKind.STEP, job_id, step=name, step_state=state)

    @staticmethod
    def callback_attempted(job_id: str, state: str, attempts: int) -> "JobEvent":
        return _make_event(EventKind.CALLBACK, job_id, callback=state, callback_attempts=attempts)

    @property
    def ended(self) -> bool:
        """True for a state event into a terminal state."""
        return self.kind is EventKind.STATE and self.state in TERMINAL


_make_event = _quick_maker(JobEvent)
