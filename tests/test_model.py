"""The model of a job: the transition table against every state-changing statement, the Job
value and its public form, the JobEvents a job's run tells, and the pool's ordered stop."""
import re
import threading
import time

import pytest
from callback_receiver import Receiver
from conftest import wait_for

from jobserver import JobServer, Registry
from jobserver.journal import open_journal
from jobserver.journal_drivers import MysqlDialect, SqliteDialect
from jobserver.journal_sql import JOB_COLUMNS, MIGRATIONS, Sql
from jobserver.model import (
    TERMINAL,
    TRANSITIONS,
    Action,
    EventKind,
    Job,
    JobEvent,
    State,
    StepSummary,
    next_states,
)

FAST = dict(lease_seconds=1, poll_interval=0.05, shutdown_grace=2)

# --- the transition table against the SQL -----------------------------------------------------
#: every statement that changes a job's state (or its cancel flag), by the action it makes
STATEMENT_ACTIONS = {
    "claim_update": Action.CLAIM, "finish": Action.FINISH, "requeue": Action.RETRY_LATER,
    "give_back": Action.GIVE_BACK, "crash_requeue": Action.CRASH_REQUEUE,
    "crash_fail": Action.CRASH_FAIL, "cancel_queued": Action.CANCEL_QUEUED,
    "cancel_running": Action.REQUEST_CANCEL, "retry": Action.RETRY,
}
#: writes of the run holding a lease: guarded on `running`, they never change the state
LEASE_WRITES = {"renew", "progress", "touch"}
_UPDATE = re.compile(r"UPDATE jobs SET (?P<set>.*?) WHERE (?P<where>.*)", re.S)
_SETS_STATE = re.compile(r"(?:^|, )state = (?:'(?P<state>\w+)'|(?P<bound>\?|%s))")
_GUARD = re.compile(r"\+?state (?:= '(?P<one>\w+)'|IN \((?P<many>[^)]*)\))")


def _job_updates(sql):
    """{attribute name: text} of every UPDATE of the jobs table an Sql holds."""
    found = {name: text for name, text in vars(sql).items()
             if isinstance(text, str) and text.startswith("UPDATE jobs ")}
    found["claim_update"] = sql.claim_update(1)
    return found


def _parsed(text):
    """(states the WHERE accepts, state the SET writes: a name, '?' if bound, None if kept)."""
    match = _UPDATE.fullmatch(text)
    assert match, text
    guard = _GUARD.search(match["where"])
    assert guard, f"no state guard: {text}"
    names = [guard["one"]] if guard["one"] else re.findall(r"'(\w+)'", guard["many"])
    sets = _SETS_STATE.search(match["set"])
    target = None if sets is None else (sets["state"] or "?")
    return frozenset(State(n) for n in names), target


@pytest.mark.parametrize("dialect", [SqliteDialect, MysqlDialect], ids=["sqlite", "mysql"])
def test_every_state_changing_statement_follows_the_transition_table(dialect):
    updates = _job_updates(Sql(dialect))
    assert set(updates) == set(STATEMENT_ACTIONS) | LEASE_WRITES, "an UPDATE of jobs the test does not know"
    for name in LEASE_WRITES:
        sources, target = _parsed(updates[name])
        assert (sources, target) == ({State.RUNNING}, None), name
    for name, action in STATEMENT_ACTIONS.items():
        sources, target = _parsed(updates[name])
        move = TRANSITIONS[action]
        assert sources == move.sources, f"{name} starts from {sources}, the table says {move.sources}"
        if target is None:  # the state stays: only a flag is set
            assert move.targets == move.sources, name
        elif target == "?":  # bound: Journal.finish checks it against the table
            assert len(move.targets) > 1, name
        else:
            assert {State(target)} == move.targets, f"{name} ends in {target}, the table says {move.targets}"
    claim_select = Sql(dialect).claim_select
    assert f"state = '{State.QUEUED.value}'" in claim_select  # the claim picks what it may take
    deletes = {name: text for name, text in vars(Sql(dialect)).items()
               if isinstance(text, str) and text.startswith("DELETE FROM jobs ")}
    assert list(deletes) == ["delete_job"]
    guard = _GUARD.search(deletes["delete_job"])
    assert {State(n) for n in re.findall(r"'(\w+)'", guard["many"])} == TRANSITIONS[Action.DELETE].sources


def test_the_table_is_closed_and_terminal_states_are_left_only_by_a_retry_or_a_delete():
    assert set(TRANSITIONS) == set(Action)
    for action, move in TRANSITIONS.items():
        assert move.targets or action is Action.DELETE, action  # a delete leaves no state: no row
        assert all(isinstance(s, State) for s in move.sources | move.targets)
    assert TRANSITIONS[Action.DELETE].sources == TERMINAL
    assert TRANSITIONS[Action.SUBMIT].sources == frozenset()  # a new job: no state before
    assert TERMINAL == {State.SUCCEEDED, State.FAILED, State.CANCELLED}
    assert next_states(State.QUEUED) == {State.RUNNING, State.CANCELLED}
    assert next_states(State.RUNNING) == {State.RUNNING, State.QUEUED, State.SUCCEEDED,
                                          State.FAILED, State.CANCELLED}
    assert next_states(State.SUCCEEDED) == frozenset()
    assert next_states(State.FAILED) == next_states(State.CANCELLED) == {State.QUEUED}
    reachable, todo = set(), set(TRANSITIONS[Action.SUBMIT].targets)
    while todo:
        state = todo.pop()
        reachable.add(state)
        todo |= next_states(state) - reachable
    assert reachable == set(State), "a state no action leads to"


def test_the_schema_admits_exactly_the_states_of_the_enum():
    """A new State needs a migration that widens the CHECK: this test says so."""
    statements = [text for version in sorted(MIGRATIONS) for entry in MIGRATIONS[version]
                  for text in (entry.values() if isinstance(entry, dict) else [entry])]  # dict: by engine
    checks = [re.search(r"\bstate VARCHAR\(16\) NOT NULL CHECK \(state IN\s*\(([^)]*)\)\)", text)
              for text in statements if text.lstrip().startswith("CREATE TABLE IF NOT EXISTS jobs")]
    newest = [c for c in checks if c][-1]
    assert set(re.findall(r"'(\w+)'", newest.group(1))) == {s.value for s in State}


def test_a_submit_writes_queued_and_finish_refuses_a_state_the_table_does_not_allow(sqlite_url):
    journal = open_journal(sqlite_url)
    try:
        [(job, created)] = journal.insert_jobs([{
            "id": "00000000-0000-7000-8000-000000000001", "task": "t", "owner": "o", "params": "{}",
            "priority": 0, "max_retries": 0, "timeout": None, "callback_url": None,
            "idempotency_key": None, "request_hash": None}])
        assert created and {job.state} == TRANSITIONS[Action.SUBMIT].targets
        assert journal.get_job(job.id).state is State.QUEUED
        [claimed] = journal.claim("n", 1, 60_000)
        for state in (State.QUEUED, State.RUNNING):
            with pytest.raises(ValueError):
                journal.finish(claimed.id, claimed.lease_token, state)
        assert journal.get_job(job.id).state is State.RUNNING
    finally:
        journal.close()


# --- the Job value ----------------------------------------------------------------------------
def _row(**values):
    """A row of the journal's job columns, as a SELECT gives it (JSON as text, 0/1 flags)."""
    row = dict(id="0193f000-0000-7000-8000-000000000001", task="t.echo", owner="alice", state="running",
               params='{"a":[1,2]}', priority=3, attempts=2, max_retries=4, timeout=None,
               run_at=1_700_000_000_123, lease_owner="node", lease_token=7, lease_expires=1_700_000_030_000,
               crashes=1, progress='{"done":1,"message":null,"total":5}', result=None,
               error='{"message":"m","type":"E"}', cancel_requested=1, callback_url=None,
               idempotency_key=None, request_hash=None, created_at=1_700_000_000_000,
               started_at=1_700_000_000_200, finished_at=None)
    row.update(values)
    return tuple(row[c] for c in JOB_COLUMNS)


def test_a_job_is_made_from_a_row_in_one_place():
    job = Job.from_row(_row())
    assert job.state is State.RUNNING and job.params == {"a": [1, 2]}
    assert job.progress == {"done": 1, "total": 5, "message": None} and job.result is None
    assert job.error == {"type": "E", "message": "m"} and job.cancel_requested is True
    assert (job.attempts, job.crashes, job.lease_token) == (2, 1, 7)
    given = {"a": [1, 2]}
    assert Job.from_row(_row(), given).params is given  # a submit's params are not decoded again
    assert Job.from_row(_row()) == job == Job(**{name: getattr(job, name) for name in JOB_COLUMNS})
    assert type(job) is Job
    with pytest.raises(AttributeError):
        job.state = State.QUEUED  # frozen
    assert not hasattr(job, "__dict__")  # slots
    event = JobEvent.state_changed(job.id, State.RUNNING, attempt=2)
    assert type(event) is JobEvent and (event.kind, event.attempt, event.step) == (EventKind.STATE, 2, None)
    with pytest.raises(AttributeError):
        event.state = State.FAILED


def test_the_public_form_follows_api_md():
    job = Job.from_row(_row())
    steps = [StepSummary("fetch", "succeeded", 1_700_000_000_300, 1_700_000_000_400),
             StepSummary("parse", "running", 1_700_000_000_500, None)]
    public = job.to_public(steps, task_timeout=600)
    assert list(public) == ["id", "task", "state", "owner", "params", "priority", "attempts",
                            "max_retries", "run_at", "progress", "steps", "result", "error",
                            "cancel_requested", "callback", "queue", "timeout", "created_at",
                            "started_at", "finished_at"]
    assert public["state"] == "running" and type(public["state"]) is str
    assert public["queue"] == "default"
    assert public["timeout"] == 600  # the task's default: the limit the job runs under
    assert public["run_at"] == "2023-11-14T22:13:20.123Z" and public["finished_at"] is None
    assert public["steps"] == [
        {"name": "fetch", "state": "succeeded", "started_at": "2023-11-14T22:13:20.300Z",
         "finished_at": "2023-11-14T22:13:20.400Z"},
        {"name": "parse", "state": "running", "started_at": "2023-11-14T22:13:20.500Z", "finished_at": None}]
    assert public["callback"] is None and public["cancel_requested"] is True
    own = Job.from_row(_row(timeout=2.5))
    assert own.to_public(task_timeout=600)["timeout"] == 2.5 and own.effective_timeout(600) == 2.5
    assert job.to_public()["timeout"] is None and job.effective_timeout(None) is None

    hooked = Job.from_row(_row(callback_url="https://example.com/hook"))
    assert hooked.to_public()["callback"] == {"url": "https://example.com/hook", "state": "pending",
                                              "attempts": 0, "last_error": None, "delivered_at": None}
    delivery = {"url": "https://example.com/hook", "state": "delivered", "attempts": 2,
                "last_error": None, "delivered_at": 1_700_000_001_000}
    assert hooked.to_public(callback=delivery)["callback"]["delivered_at"] == "2023-11-14T22:13:21.000Z"


# --- events -------------------------------------------------------------------------------------
def _recording(server):
    events, lock = [], threading.Lock()

    def listen(event):
        with lock:
            events.append(event)
    server.add_listener(listen)
    return events


def test_a_job_with_steps_tells_its_events_in_order(db_url):
    registry = Registry()

    @registry.task("t.stepped")
    def stepped(ctx):
        ctx.progress(0, 2, "starting")
        ctx.step("fetch", lambda: 1)
        with pytest.raises(ValueError):
            ctx.step("parse", lambda: int("x"))
        ctx.progress(2, 2)
        return "done"

    server = JobServer(db_url, tasks=registry, workers=1, **FAST)
    events = _recording(server)
    with server:
        job_id = server.submit("t.stepped")
        assert server.wait(job_id, 20)["state"] == "succeeded"
        wait_for(lambda: any(e.ended for e in events), message="the terminal event")
    mine = [e for e in events if e.job_id == job_id]
    assert all(isinstance(e, JobEvent) for e in mine)
    assert [(e.kind, e.state or e.step_state, e.step) for e in mine] == [
        (EventKind.STATE, State.RUNNING, None),
        (EventKind.PROGRESS, None, None),
        (EventKind.STEP, "running", "fetch"),
        (EventKind.STEP, "succeeded", "fetch"),
        (EventKind.STEP, "running", "parse"),
        (EventKind.STEP, "failed", "parse"),
        (EventKind.PROGRESS, None, None),
        (EventKind.STATE, State.SUCCEEDED, None),
    ]
    assert mine[0].attempt == 1 and mine[1].progress == {"done": 0, "total": 2, "message": "starting"}
    assert mine[-1].callback is None and mine[-1].ended


def test_retries_failures_cancels_and_callbacks_are_events_too(sqlite_url):
    registry = Registry()

    @registry.task("t.flaky", max_retries=1, retry_backoff=0)
    def flaky(ctx):
        if ctx.attempt == 1:
            raise KeyError("first attempt")
        return "ok"

    receiver = Receiver()
    server = JobServer(sqlite_url, tasks=registry, workers=1, callback_allow=("127.0.0.0/8",),
                       callback_attempts=2, callback_backoff=0.05, **FAST)
    events = _recording(server)
    try:
        with server:
            flaky_id = server.submit("t.flaky", callback_url=receiver.url())
            assert server.wait(flaky_id, 20)["state"] == "succeeded"
            queued = server.submit("t.flaky", delay=60, callback_url=receiver.url())
            server.cancel(queued)
            wait_for(lambda: sum(e.kind is EventKind.CALLBACK for e in events) == 2,
                     message="both deliveries")
    finally:
        receiver.close()
    flaky_events = [(e.kind, e.state, e.error_type, e.callback) for e in events if e.job_id == flaky_id]
    assert flaky_events == [
        (EventKind.STATE, State.RUNNING, None, None),
        (EventKind.STATE, State.QUEUED, "KeyError", None),
        (EventKind.STATE, State.RUNNING, None, None),
        (EventKind.STATE, State.SUCCEEDED, None, "pending"),
        (EventKind.CALLBACK, None, None, "delivered"),
    ]
    # told by the request thread that cancelled and by the deliverer: no order between them
    cancelled = {(e.kind, e.state, e.callback) for e in events if e.job_id == queued}
    assert cancelled == {(EventKind.STATE, State.CANCELLED, "pending"),
                         (EventKind.CALLBACK, None, "delivered")}
    assert [e.callback_attempts for e in events if e.kind is EventKind.CALLBACK] == [1, 1]


def test_a_listener_that_raises_does_not_keep_events_from_the_others(sqlite_url):
    registry = Registry()
    registry.task("t.noop")(lambda ctx: None)
    server = JobServer(sqlite_url, tasks=registry, workers=1, **FAST)
    server.add_listener(lambda event: 1 / 0)
    events = _recording(server)
    with server:
        job_id = server.submit("t.noop")
        assert server.wait(job_id, 20)["state"] == "succeeded"
        wait_for(lambda: any(e.ended for e in events), message="the terminal event")


# --- the ordered stop -----------------------------------------------------------------------------
def test_a_draining_pool_claims_nothing_keeps_its_lease_and_finishes_in_grace(db_url):
    registry, started, release = Registry(), threading.Event(), threading.Event()

    @registry.task("t.hold")
    def hold(ctx):
        started.set()
        release.wait(20)  # ignores the stop request: it ends within the grace
        return "held"

    registry.task("t.next")(lambda ctx: "next")
    server = JobServer(db_url, tasks=registry, workers=2, **FAST).start()
    try:
        held = server.submit("t.hold")
        wait_for(started.is_set, message="the job to start")
        lease = server.journal.get_job(held).lease_expires
        stopper = threading.Thread(target=server.pool.stop, kwargs={"grace": 20})
        stopper.start()
        wait_for(lambda: server.pool.draining, message="draining")
        later = server.submit("t.next")
        time.sleep(1.5)  # past the 1 s lease: heartbeats go on while draining, claims do not
        assert server.journal.get_job(later).state is State.QUEUED
        assert server.journal.get_job(held).lease_expires > lease + 500
        assert stopper.is_alive()  # waiting for the held job, within its grace
        release.set()
        stopper.join(10)
        assert not stopper.is_alive()
        job = server.journal.get_job(held)
        assert (job.state, job.result, job.attempts) == (State.SUCCEEDED, "held", 1)
        assert server.journal.get_job(later).attempts == 0
        began = time.monotonic()
        server.pool.stop()  # a second stop is a no-op
        assert time.monotonic() - began < 0.5
    finally:
        release.set()
        server.stop()


def test_a_stop_keeps_retrying_an_outcome_while_the_journal_is_away(mysql_url):
    """The outcome write fails while draining; the dispatcher keeps retrying it within the grace."""
    from urllib.parse import urlparse, urlunparse

    from http_fixtures import TcpProxy

    registry, release = Registry(), threading.Event()

    @registry.task("t.gate")
    def gate(ctx):
        release.wait(30)
        return "done"

    url = urlparse(mysql_url)
    proxy = TcpProxy((url.hostname, url.port or 3306))
    auth = url.username + (f":{url.password}" if url.password else "")
    server = JobServer(urlunparse(url._replace(netloc=f"{auth}@127.0.0.1:{proxy.port}")),
                       tasks=registry, workers=1, lease_seconds=60, poll_interval=0.05)
    try:
        server.start()
        job_id = server.submit("t.gate")
        wait_for(lambda: server.get(job_id)["state"] == "running", message="the job to start")
        proxy.cut()
        release.set()
        stopper = threading.Thread(target=server.pool.stop, kwargs={"grace": 30})
        stopper.start()
        time.sleep(1.0)  # the write fails and is retried, draining
        assert stopper.is_alive()
        proxy.resume()
        stopper.join(30)
        assert not stopper.is_alive()
        job = server.get(job_id)
        assert (job["state"], job["result"], job["attempts"]) == ("succeeded", "done", 1)
    finally:
        release.set()
        server.stop(grace=1)
        proxy.close()
