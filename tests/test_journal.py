"""The journal contract: the same tests against SQLite and MariaDB (`db_url`).

Everything is inspected through the Journal's own methods, never with raw SQL."""
import math
import re
import threading
from urllib.parse import urlparse

import pymysql
import pytest
from conftest import wait_for

from jobserver import journal_drivers
from jobserver.codec import dumps
from jobserver.errors import (
    IdempotencyConflict,
    InvalidTransition,
    JournalUnavailable,
    LeaseLost,
    ServerClosed,
    WriteRefused,
)
from jobserver.ids import new_id
from jobserver.journal import SCHEMA_VERSION, Journal, State, open_journal
from jobserver.tasks import JobContext

WORKER_LOST = {"type": "WorkerLost", "message": "the job's process died"}


@pytest.fixture
def journal(db_url):
    """An open journal on a fresh database, closed after the test."""
    j = open_journal(db_url)
    yield j
    j.close()


def make_job(task="t.echo", owner="alice", params=None, **fields):
    """A row for `insert_jobs`: every column a submit sets, with test defaults."""
    row = {"id": new_id(), "task": task, "owner": owner, "params": dumps(params or {}),
           "priority": 0, "max_retries": 0, "timeout": None, "callback_url": None,
           "idempotency_key": None, "request_hash": None}
    row.update(fields)
    return row


def insert(journal, **fields):
    """Insert one job; return its id."""
    [(job, created)] = journal.insert_jobs([make_job(**fields)])
    assert created
    return job.id


def claim_one(journal, node="node-a", lease_ms=60_000):
    """Claim exactly one job and return it (a Job)."""
    [job] = journal.claim(node, 1, lease_ms)
    return job


def barrier(journal):
    """Return once every write queued before it (casts included) is committed."""
    journal.renew([], 1000, "nobody")


def wait_lease_expired(journal, job_id):
    """Poll the database clock until the job's lease is in the past."""
    expires = journal.get_job(job_id).lease_expires
    wait_for(lambda: journal.ping() > expires, timeout=5, message="lease expiry")


# --- schema ---------------------------------------------------------------------------
def test_schema_created_versioned_and_reopen_is_a_no_op(db_url):
    first = open_journal(db_url)
    job_id = insert(first, params={"kept": True})
    assert first.schema_version() == SCHEMA_VERSION == 4
    first.close()
    first.close()  # closing twice is harmless
    again = open_journal(db_url)
    try:
        assert again.schema_version() == SCHEMA_VERSION
        assert again.get_job(job_id).params == {"kept": True}
    finally:
        again.close()


# --- submit -----------------------------------------------------------------------------
def test_insert_get_round_trip_keeps_every_field(journal):
    before = journal.ping()
    spec = make_job(task="reports.build", owner="bob", params={"month": "2026-10", "n": [1, 2.5, None]},
                    priority=7, max_retries=4, timeout=12.5, callback_url="https://example.com/hook",
                    idempotency_key="k-1", request_hash="a" * 64, delay_ms=5000)
    [(returned, created)] = journal.insert_jobs([spec])
    after = journal.ping()
    row = journal.get_job(spec["id"])
    assert created
    for name in ("id", "task", "owner", "priority", "max_retries", "timeout", "callback_url",
                 "idempotency_key", "request_hash"):
        assert getattr(row, name) == spec[name], name
    assert row.params == {"month": "2026-10", "n": [1, 2.5, None]}
    assert row.state is State.QUEUED
    assert (row.attempts, row.crashes, row.lease_token) == (0, 0, 0)
    assert row.lease_owner is None and row.lease_expires is None
    assert row.progress is None and row.result is None and row.error is None
    assert row.cancel_requested is False
    assert row.started_at is None and row.finished_at is None
    assert before <= row.created_at <= after
    assert row.run_at == row.created_at + 5000
    assert returned.created_at == row.created_at and returned.run_at == row.run_at
    assert journal.get_job(new_id()) is None


def test_idempotent_repeat_returns_the_existing_job(journal):
    first = make_job(idempotency_key="once", request_hash="h" * 64)
    [(row, created)] = journal.insert_jobs([first])
    assert created
    repeat = make_job(idempotency_key="once", request_hash="h" * 64)
    [(again, created)] = journal.insert_jobs([repeat])
    assert not created and again.id == first["id"]
    assert journal.get_job(repeat["id"]) is None
    assert journal.count_queued() == 1


def test_idempotency_conflict_writes_nothing_of_the_batch(journal):
    insert(journal, idempotency_key="k", request_hash="1" * 64)
    fresh = make_job()
    clash = make_job(idempotency_key="k", request_hash="2" * 64)
    with pytest.raises(IdempotencyConflict) as info:
        journal.insert_jobs([fresh, clash])
    assert info.value.key == "k"
    assert journal.get_job(fresh["id"]) is None and journal.get_job(clash["id"]) is None
    assert journal.count_queued() == 1


def test_different_owners_may_reuse_a_key(journal):
    a = insert(journal, owner="alice", idempotency_key="k", request_hash="1" * 64)
    b = insert(journal, owner="bob", idempotency_key="k", request_hash="2" * 64)
    assert a != b and journal.count_queued() == 2


# --- claim ------------------------------------------------------------------------------
def test_claim_orders_by_priority_then_run_at_then_id(journal):
    late_low_id = "00000000-0000-7000-8000-000000000001"
    early_high_id = "ffffffff-ffff-7fff-bfff-fffffffffff0"
    journal.insert_jobs([make_job(id=early_high_id, priority=1)])
    first_ms = journal.get_job(early_high_id).run_at
    wait_for(lambda: journal.ping() > first_ms, timeout=5, message="the clock to move")
    journal.insert_jobs([make_job(id=late_low_id, priority=1)])
    same_time = ["33333333-0000-7000-8000-000000000000", "22222222-0000-7000-8000-000000000000"]
    journal.insert_jobs([make_job(id=same_time[0], priority=1), make_job(id=same_time[1], priority=1),
                         make_job(id="11111111-0000-7000-8000-000000000000", priority=-3),
                         make_job(id="44444444-0000-7000-8000-000000000000", priority=9)])
    claimed = [job.id for job in journal.claim("n", 10, 60_000)]
    assert claimed == ["44444444-0000-7000-8000-000000000000", early_high_id, late_low_id,
                       same_time[1], same_time[0], "11111111-0000-7000-8000-000000000000"]


def test_claim_sets_lease_and_counts_the_attempt(journal):
    job_id = insert(journal)
    job = claim_one(journal, node="node-x", lease_ms=30_000)
    row = journal.get_job(job_id)
    assert job.state is State.RUNNING and row.state is State.RUNNING
    assert job.lease_token == row.lease_token == 1
    assert job.attempts == row.attempts == 1
    assert row.lease_owner == "node-x"
    assert row.lease_expires - row.started_at == pytest.approx(30_000, abs=1000)
    assert journal.claim("node-y", 5, 30_000) == []


def test_delayed_job_is_not_claimable_before_run_at(journal):
    job_id = insert(journal, delay_ms=1200)
    run_at = journal.get_job(job_id).run_at
    assert journal.claim("n", 5, 60_000) == []
    [job] = wait_for(lambda: journal.claim("n", 5, 60_000), timeout=10, message="the delayed job")
    assert job.id == job_id
    assert journal.get_job(job_id).started_at >= run_at


def test_a_job_is_due_the_moment_its_submit_returns(journal):
    # submits stamp run_at from the clock the journal reads in-process (SQLite) or from the
    # server (MySQL); the claim compares it with the clock of its SQL: the two must agree
    # to the millisecond, or a fresh job waits for the next poll
    for _ in range(200):
        job_id = insert(journal)
        assert [job.id for job in journal.claim("n", 5, 60_000)] == [job_id]


def test_claim_takes_at_most_the_batch_limit(journal):
    journal.insert_jobs([make_job() for _ in range(5)])
    sizes = [len(journal.claim("n", 2, 60_000)) for _ in range(4)]
    assert sizes == [2, 2, 1, 0]


# --- fencing ------------------------------------------------------------------------------
def test_writes_with_a_stale_token_are_refused_and_change_nothing(journal):
    job_id = insert(journal)
    old = claim_one(journal)
    journal.start_step(job_id, old.lease_token, "done-step", 1)
    journal.end_step(job_id, old.lease_token, "done-step", "succeeded", result=1)
    assert journal.give_back(job_id, old.lease_token)
    new = claim_one(journal, node="node-b")
    assert new.lease_token == old.lease_token + 1
    journal.set_progress(job_id, new.lease_token, {"done": 1, "total": 2, "message": None})
    barrier(journal)
    before = journal.get_job(job_id)
    steps_before = journal.get_steps(job_id)
    stale = old.lease_token

    with pytest.raises(LeaseLost):
        journal.finish(job_id, stale, State.SUCCEEDED, result="stale")
    with pytest.raises(LeaseLost):
        journal.requeue(job_id, stale, 0, {"type": "X", "message": "stale"})
    with pytest.raises(LeaseLost):
        journal.end_step(job_id, stale, "done-step", "failed", error={"type": "X", "message": ""})
    assert journal.give_back(job_id, stale) is False
    journal.set_progress(job_id, stale, {"done": 99, "total": 2, "message": "stale"})
    journal.start_step(job_id, stale, "stale-step", 2)
    lost, _cancel = journal.renew([(job_id, stale)], 60_000, "node-a")
    barrier(journal)

    assert lost == {job_id}
    assert journal.get_job(job_id) == before
    assert journal.get_steps(job_id) == steps_before
    assert journal.get_step(job_id, "stale-step") is None


def test_renew_extends_live_leases_and_reports_lost_and_cancelled(journal):
    keep, cancel_me, gone = (insert(journal) for _ in range(3))
    jobs = {job.id: job for job in journal.claim("me", 3, 2_000)}
    journal.cancel(cancel_me)
    old_expiry = journal.get_job(keep).lease_expires
    leases = [(keep, jobs[keep].lease_token), (cancel_me, jobs[cancel_me].lease_token),
              (gone, jobs[gone].lease_token + 5)]
    lost, cancel = journal.renew(leases, 60_000, "me")
    assert lost == {gone}
    assert cancel == {cancel_me}
    assert journal.get_job(keep).lease_expires >= old_expiry + 55_000
    assert journal.renew([], 60_000, "someone-else") == (set(), set())


# --- recovery -----------------------------------------------------------------------------
def test_recover_requeues_expired_leases_then_fails_at_max_crashes(journal):
    job_id = insert(journal, callback_url="https://example.com/cb")
    for crash in (1, 2):
        job = claim_one(journal, lease_ms=1)
        assert job.id == job_id
        wait_lease_expired(journal, job_id)
        requeued, failed, _with_callback = journal.recover(3, WORKER_LOST)
        assert (requeued, failed) == ([job_id], [])
        row = journal.get_job(job_id)
        assert row.state is State.QUEUED and row.crashes == crash and row.lease_owner is None
    assert journal.latest_callback(job_id) is None
    assert claim_one(journal, lease_ms=1).id == job_id
    live_id = insert(journal)
    assert claim_one(journal, lease_ms=60_000).id == live_id
    wait_lease_expired(journal, job_id)
    requeued, failed, with_callback = journal.recover(3, WORKER_LOST)
    assert (requeued, failed) == ([], [job_id]) and with_callback == {job_id}
    row = journal.get_job(job_id)
    assert row.state is State.FAILED and row.crashes == 3 and row.attempts == 3
    assert row.error["type"] == "WorkerLost" and row.finished_at is not None
    callback = journal.latest_callback(job_id)
    assert re.fullmatch(r"msg_[0-9a-f]{32}", callback["id"]) and callback["state"] == "pending"
    assert callback["url"] == "https://example.com/cb"
    assert journal.get_job(live_id).state is State.RUNNING  # a live lease is left alone


def test_recover_by_owner_takes_a_dead_nodes_jobs_even_with_live_leases(journal):
    dead_job, other_job = insert(journal), insert(journal)
    claim_one(journal, node="dead-node")
    claim_one(journal, node="live-node")
    assert sorted(journal.running_owners()) == ["dead-node", "live-node"]
    assert journal.recover(3, WORKER_LOST)[:2] == ([], [])
    assert journal.recover(3, WORKER_LOST, owner="dead-node")[:2] == ([dead_job], [])
    assert journal.get_job(dead_job).state == "queued"
    assert journal.get_job(other_job).state == "running"
    assert journal.running_owners() == ["live-node"]


# --- cancel and retry ----------------------------------------------------------------------
def test_cancel_queued_running_and_terminal(journal):
    queued = insert(journal, callback_url="https://example.com/cb")
    assert journal.cancel(queued) is State.CANCELLED
    row = journal.get_job(queued)
    assert row.state is State.CANCELLED and row.finished_at is not None
    assert re.fullmatch(r"msg_[0-9a-f]{32}", journal.latest_callback(queued)["id"])

    running = insert(journal)
    job = claim_one(journal)
    assert journal.cancel(running) is State.RUNNING
    row = journal.get_job(running)
    assert row.state is State.RUNNING and row.cancel_requested is True
    journal.finish(running, job.lease_token, State.CANCELLED)

    for done in (queued, running):
        with pytest.raises(InvalidTransition) as info:
            journal.cancel(done)
        assert info.value.state == "cancelled"
    with pytest.raises(InvalidTransition):
        journal.cancel(new_id())


def test_retry_only_failed_or_cancelled(journal):
    failed, cancelled, succeeded, queued = (insert(journal) for _ in range(4))
    jobs = {job.id: job for job in journal.claim("n", 3, 60_000)}
    journal.finish(failed, jobs[failed].lease_token, State.FAILED, error={"type": "E", "message": "x"})
    journal.finish(cancelled, jobs[cancelled].lease_token, State.CANCELLED)
    journal.finish(succeeded, jobs[succeeded].lease_token, State.SUCCEEDED, result=1)
    for job_id in (failed, cancelled):
        journal.retry(job_id)
        row = journal.get_job(job_id)
        assert row.state is State.QUEUED and row.attempts == 0 and row.error is None
        assert row.finished_at is None and row.cancel_requested is False
    claimed = {job.id: job for job in journal.claim("n", 3, 60_000)}
    assert set(claimed) == {failed, cancelled, queued}
    assert claimed[failed].lease_token == jobs[failed].lease_token + 1  # tokens never go back
    journal.finish(queued, claimed[queued].lease_token, State.SUCCEEDED)
    for job_id, state in ((succeeded, "succeeded"), (queued, "succeeded"), (failed, "running")):
        with pytest.raises(InvalidTransition) as info:
            journal.retry(job_id)
        assert info.value.state == state


# --- list ---------------------------------------------------------------------------------
def test_list_filters_and_pages_newest_first(journal):
    ids = [insert(journal, owner="alice" if i % 3 else "bob", task="t.a" if i % 2 else "t.b")
           for i in range(9)]
    [first] = journal.claim("n", 1, 60_000)
    journal.start_step(first.id, first.lease_token, "s1", 1)
    journal.end_step(first.id, first.lease_token, "s1", "succeeded")
    newest_first = ids[::-1]

    rows, steps, _next = journal.list_jobs(limit=100)
    assert [r.id for r in rows] == newest_first
    assert [s.name for s in steps[first.id]] == ["s1"]

    pages, before = [], None
    while True:
        rows, _, _next = journal.list_jobs(before=before, limit=4)
        if not rows:
            break
        pages.append([r.id for r in rows])
        before = rows[-1].id
    assert pages == [newest_first[0:4], newest_first[4:8], newest_first[8:9]]

    rows, _, _next = journal.list_jobs(owner="alice", task="t.a", limit=100)
    assert [r.id for r in rows] == [i for n, i in enumerate(ids) if n % 3 and n % 2][::-1]
    rows, _, _next = journal.list_jobs(state="running", limit=100)
    assert [r.id for r in rows] == [first.id]
    rows, _, _next = journal.list_jobs(owner="bob", state="queued", before=ids[6], limit=100)
    assert first.id == ids[0]  # the oldest is claimed first
    assert [r.id for r in rows] == [ids[3]]


# --- steps ----------------------------------------------------------------------------------
def test_steps_are_recorded_and_replayed_on_the_next_attempt(journal):
    job_id = insert(journal)
    first = claim_one(journal)
    ctx = JobContext(first, journal)
    calls = []
    assert ctx.step("fetch", lambda: calls.append("fetch") or {"rows": 3}) == {"rows": 3}
    with pytest.raises(KeyError):
        ctx.step("parse", lambda: calls.append("parse") or {}["missing"])
    [fetch, parse] = journal.get_steps(job_id)
    row, summary = journal.get_job_and_steps(job_id)
    assert row.id == job_id and [(s.name, s.state) for s in summary] == [
        ("fetch", "succeeded"), ("parse", "failed")]
    assert journal.get_job_and_steps("no-such-job") == (None, [])
    assert (fetch["name"], fetch["seq"], fetch["state"]) == ("fetch", 1, "succeeded")
    assert (parse["name"], parse["seq"], parse["state"]) == ("parse", 2, "failed")
    assert fetch["finished_at"] >= fetch["started_at"]
    journal.requeue(job_id, first.lease_token, 0, {"type": "KeyError", "message": "missing"})

    second = claim_one(journal)
    ctx = JobContext(second, journal)
    assert ctx.step("fetch", lambda: calls.append("fetch again")) == {"rows": 3}
    assert ctx.step("parse", lambda: calls.append("parse again") or "ok") == "ok"
    assert calls == ["fetch", "parse", "parse again"]
    assert [s["state"] for s in journal.get_steps(job_id)] == ["succeeded", "succeeded"]


# --- JSON ---------------------------------------------------------------------------------
def test_json_columns_refuse_nan_and_leave_the_row_alone(journal):
    job_id = insert(journal)
    job = claim_one(journal)
    token = job.lease_token
    before = journal.get_job(job_id)
    nan = math.nan
    with pytest.raises(ValueError):
        journal.finish(job_id, token, State.SUCCEEDED, result={"x": nan})
    with pytest.raises(ValueError):
        journal.requeue(job_id, token, 0, {"type": "E", "message": "m", "value": math.inf})
    with pytest.raises(ValueError):
        journal.set_progress(job_id, token, {"done": nan})
    journal.start_step(job_id, token, "s", 1)
    with pytest.raises(ValueError):
        journal.end_step(job_id, token, "s", "succeeded", result=[-math.inf])
    barrier(journal)
    assert journal.get_job(job_id) == before
    journal.finish(job_id, token, State.SUCCEEDED, result={"x": 1.5})
    assert journal.get_job(job_id).result == {"x": 1.5}


# --- group commit -------------------------------------------------------------------------
def test_concurrent_submits_from_many_threads_are_all_committed(journal):
    threads, per_thread = 16, 25
    made, errors = [], []
    lock = threading.Lock()

    def submit(n):
        try:
            for i in range(per_thread):
                [(job, created)] = journal.insert_jobs([make_job(params={"n": n, "i": i})])
                with lock:
                    made.append(job.id)
        except Exception as exc:  # reported below; a thread must not die silently
            errors.append(exc)

    workers = [threading.Thread(target=submit, args=(n,)) for n in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(60)
    assert errors == []
    assert len(set(made)) == threads * per_thread
    assert journal.count_queued() == threads * per_thread
    rows, _, _next = journal.list_jobs(limit=1000, with_steps=False)
    assert {r.id for r in rows} == set(made)


def test_a_refused_statement_fails_only_its_own_write(journal):
    """One bad write in a shared transaction must not fail (or hide) its batch-mates' writes."""
    job_id = insert(journal)
    token = claim_one(journal).lease_token
    for round_ in range(3):
        outcomes, lock = [], threading.Lock()

        def good(n):
            spec = make_job(params={"round": round_, "n": n})
            try:
                journal.insert_jobs([spec])
                ok = True
            except JournalUnavailable:
                ok = False
            with lock:
                outcomes.append((spec["id"], ok))

        def bad():
            journal.start_step(job_id, token, "s", 1)
            with pytest.raises(JournalUnavailable):  # the CHECK constraint refuses the state
                journal.end_step(job_id, token, "s", "bogus-state")

        # a backlog keeps the committer busy so that what follows shares one transaction
        for i in range(1500):
            journal.set_progress(job_id, token, {"done": i, "total": None, "message": None})
        threads = [threading.Thread(target=good, args=(n,)) for n in range(8)]
        threads.insert(4, threading.Thread(target=bad))
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert len(outcomes) == 8
        for spec_id, ok in outcomes:
            assert ok, "a good write was failed because another write in its batch was refused"
            assert journal.get_job(spec_id) is not None


# --- every statement runs on this engine -----------------------------------------------------
class _RecordingCursor:
    """A real cursor that remembers the SQL text it was given."""

    def __init__(self, cur, seen):
        self._cur = cur
        self._seen = seen

    def execute(self, sql, *args):
        self._seen.add(sql)
        return self._cur.execute(sql, *args)

    def executemany(self, sql, rows):
        self._seen.add(sql)
        return self._cur.executemany(sql, rows)

    def __getattr__(self, name):
        return getattr(self._cur, name)


def _recording_journal(url, seen):
    """A Journal whose driver hands out recording cursors (the database is real)."""
    driver = journal_drivers.connect(url)
    for name in ("read", "write_transaction", "migrate"):
        original = getattr(driver, name)
        setattr(driver, name, lambda fn, original=original: original(
            lambda cur: fn(_RecordingCursor(cur, seen))))
    return Journal(driver)


def _all_statements(sql):
    """Every SQL text an `_Sql` holds (plain attributes and the values of its dicts)."""
    out = set()
    for value in vars(sql).values():
        if isinstance(value, dict):
            out.update(value.values())
        elif isinstance(value, str):
            out.add(value)
    return out


def _exercise(j):
    """Call every public Journal method at least once, each in a way that reaches its SQL."""
    j.ping()
    a = make_job(idempotency_key="k", request_hash="1" * 64, callback_url="https://example.com/x")
    j.insert_jobs([a])
    j.insert_jobs([make_job(idempotency_key="k", request_hash="1" * 64)])
    b_id, _c_id, d_id = insert(j), insert(j), insert(j)
    j.count_queued()
    j.job_gauges()
    with pytest.raises(WriteRefused):  # a duplicate id: the batch runs again under savepoints
        j.insert_jobs([make_job(id=b_id)])
    ja, jb, jc = j.claim("n", 3, 1)
    j.renew([(ja.id, ja.lease_token)], 60_000, "n")
    j.set_progress(jb.id, jb.lease_token, {"done": 1})
    j.start_step(jb.id, jb.lease_token, "s", 1)
    j.end_step(jb.id, jb.lease_token, "s", "succeeded", result=1)
    j.end_step(jb.id, jb.lease_token, "s-unstarted", "succeeded", result=1)  # its start was lost
    j.get_step(jb.id, "s")
    j.get_steps(jb.id)
    j.get_job_and_steps(jb.id)
    j.requeue(jb.id, jb.lease_token, 0, {"type": "E", "message": ""})
    j.finish(ja.id, ja.lease_token, State.SUCCEEDED, result=2, callback=True)
    wait_lease_expired(j, jc.id)
    j.recover(1, WORKER_LOST)  # crash_fail
    j.retry(jc.id)
    j.recover(5, WORKER_LOST, owner="n")
    jd = j.claim("m", 5, 1)[0]
    wait_lease_expired(j, jd.id)
    j.recover(5, WORKER_LOST)  # crash_requeue of an expired lease
    j.running_owners()
    j.give_back(*[(x.id, x.lease_token) for x in j.claim("m", 1, 60_000)][0])
    j.cancel(d_id)
    held = j.claim("m", 1, 60_000)[0]
    j.cancel(held.id)
    with pytest.raises(InvalidTransition):
        j.cancel(d_id)  # cancelled already: the state is read to say so
    assert j.callbacks_due()
    for cb in j.claim_callbacks(10, 60_000):
        j.record_callback(cb["id"], cb["claim_token"], "failed", last_error="boom")
    j.latest_callback(a["id"])
    j.rearm_callback(a["id"])
    j.add_token("admin", "f" * 64, True)
    j.find_token("f" * 64)
    j.has_tokens()
    j.setting("secret", lambda: "whsec_x")
    j.writable()
    for owner in (None, "alice"):
        for state in (None, "queued"):
            for task in (None, "t.echo"):
                for before in (None, "ffffffff"):
                    j.list_jobs(owner=owner, state=state, task=task, before=before, limit=5)
                    j.bulk_page(owner=owner, state=state, task=task, before=before, limit=5)
        j.stats(owner=owner)
    j.bulk_page(ids=[a["id"], b_id])
    for action in ("cancel", "retry", "delete"):
        j.bulk(action, [b_id, a["id"]])
    j.delete_job(d_id)
    j.job_events(jb.id, after=1)
    j.last_seq(jb.id)
    j.event_ids_after(j.last_event_id() - 3)
    for scoped in (False, True):
        j.events_after(0, scoped=scoped)
        j.events_between(1, 3, scoped=scoped)
    return b_id


def test_every_statement_runs_on_this_engine(db_url):
    seen = set()
    j = _recording_journal(db_url, seen)
    try:
        _exercise(j)
        barrier(j)
        missing = _all_statements(j.sql) - seen
    finally:
        j.close()
    assert not missing, f"statements never run: {sorted(missing)}"


def test_racing_idempotent_submits_from_two_journals_make_one_job(db_url):
    """Two processes' journals (separate writers) insert one key at once: one job, one winner."""
    journals = [open_journal(db_url), open_journal(db_url)]
    start, results, errors = threading.Barrier(8), [], []
    lock = threading.Lock()

    def submit(j):
        spec = make_job(idempotency_key="race", request_hash="r" * 64)
        start.wait(10)
        try:
            [(job, created)] = j.insert_jobs([spec])
        except Exception as exc:  # reported below
            errors.append(exc)
            return
        with lock:
            results.append((job.id, created))

    try:
        threads = [threading.Thread(target=submit, args=(journals[n % 2],)) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert errors == []
        assert len(results) == 8 and len({job_id for job_id, _ in results}) == 1
        assert sum(created for _, created in results) == 1
        assert journals[0].count_queued() == 1
    finally:
        for j in journals:
            j.close()


def test_a_closed_journal_refuses_reads_and_writes_alike(db_url):
    j = open_journal(db_url)
    job_id = insert(j)
    j.close()
    for call in (lambda: j.get_job(job_id), lambda: j.list_jobs(), j.ping, j.count_queued,
                 lambda: j.insert_jobs([make_job()]), lambda: j.claim("n", 1, 1000)):
        with pytest.raises(ServerClosed):
            call()


def test_one_key_twice_in_one_batch_makes_one_job(journal):
    first = make_job(idempotency_key="dup", request_hash="1" * 64)
    again = make_job(idempotency_key="dup", request_hash="1" * 64)
    [(a, a_created), (b, b_created)] = journal.insert_jobs([first, again])
    assert (a.id, a_created) == (first["id"], True)
    assert (b.id, b_created) == (first["id"], False)
    assert journal.count_queued() == 1
    with pytest.raises(IdempotencyConflict):
        journal.insert_jobs([make_job(idempotency_key="other", request_hash="1" * 64),
                             make_job(idempotency_key="other", request_hash="2" * 64)])
    assert journal.count_queued() == 1


def _drop_connections_server_side(mysql_url):
    """Fault injection, not inspection: the server closes every connection to the test's
    database, as its wait_timeout, a restart or a failover would."""
    parsed = urlparse(mysql_url)
    name = parsed.path.lstrip("/")
    admin = pymysql.connect(host=parsed.hostname, port=parsed.port or 3306, user=parsed.username or "root",
                            password=parsed.password or "", autocommit=True, connect_timeout=5)
    try:
        with admin.cursor() as cur:
            cur.execute("SELECT id FROM information_schema.processlist WHERE db = %s", (name,))
            for (connection_id,) in cur.fetchall():
                cur.execute("KILL CONNECTION %s", (int(connection_id),))
    finally:
        admin.close()


@pytest.mark.mysql
def test_connections_dropped_by_the_server_are_replaced_without_failing_a_call(mysql_url):
    j = open_journal(mysql_url)
    try:
        insert(j)
        assert j.count_queued() == 1
        _drop_connections_server_side(mysql_url)
        assert j.count_queued() == 1  # a read on a dead pooled connection
        insert(j)  # the first write on a dead writer connection
        assert j.count_queued() == 2
    finally:
        j.close()
