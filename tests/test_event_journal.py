"""The events table: each change's event in the change's own transaction, numbered per job
in commit order, progress rate-limited but never left stale, and read in id order although
MySQL commits ids out of order."""
import time

import pymysql
import pytest
from conftest import wait_for
from test_journal import barrier, claim_one, insert, make_job
from test_write_defects import Call, one_transaction

from jobserver import JobServer, Registry
from jobserver.errors import InvalidTransition, JournalUnavailable
from jobserver.eventcursor import HOLE_GRACE, EventCursor
from jobserver.eventlog import EventRow, to_job_event
from jobserver.journal import PROGRESS_EVENT_EVERY, open_journal
from jobserver.model import EventKind, JobEvent, State

FAST = dict(lease_seconds=5, poll_interval=0.05, shutdown_grace=2)


@pytest.fixture
def journal(db_url):
    j = open_journal(db_url)
    yield j
    j.close()


def told(journal, job_id):
    return [(row.seq, to_job_event(row)) for row in journal.job_events(job_id)]


def test_every_change_of_a_job_is_its_event_numbered_in_order(journal):
    job_id = insert(journal, callback_url="https://example.com/hook")
    job = claim_one(journal)
    journal.set_progress(job_id, job.lease_token, {"done": 1, "total": 2, "message": "half"})
    journal.start_step(job_id, job.lease_token, "fetch", 1)
    journal.end_step(job_id, job.lease_token, "fetch", "succeeded", result=1)
    journal.requeue(job_id, job.lease_token, 0, {"type": "KeyError", "message": "x"})
    again = claim_one(journal)
    journal.finish(job_id, again.lease_token, State.FAILED, error={"type": "ValueError"}, callback=True)
    [delivery] = journal.claim_callbacks(1, 60_000)
    journal.record_callback(delivery["id"], delivery["claim_token"], "failed", last_error="HTTP 500")
    journal.rearm_callback(job_id)
    journal.retry(job_id)
    barrier(journal)
    assert told(journal, job_id) == list(enumerate([
        JobEvent.state_changed(job_id, State.QUEUED),
        JobEvent.state_changed(job_id, State.RUNNING, attempt=1),
        JobEvent.progressed(job_id, {"done": 1, "total": 2, "message": "half"}),
        JobEvent.step_changed(job_id, "fetch", "running"),
        JobEvent.step_changed(job_id, "fetch", "succeeded"),
        JobEvent.state_changed(job_id, State.QUEUED, error_type="KeyError"),
        JobEvent.state_changed(job_id, State.RUNNING, attempt=2),
        JobEvent.state_changed(job_id, State.FAILED, error_type="ValueError", callback="pending"),
        JobEvent.callback_attempted(job_id, "failed", 1),
        JobEvent.callback_attempted(job_id, "pending", 0),
        JobEvent.state_changed(job_id, State.QUEUED),
    ], start=1))


def test_a_change_fenced_out_or_refused_writes_no_event(journal):
    job_id = insert(journal)
    old = claim_one(journal)
    assert journal.give_back(job_id, old.lease_token)
    new = claim_one(journal)
    journal.set_progress(job_id, old.lease_token, {"done": 99})  # the old run: fenced out
    journal.start_step(job_id, old.lease_token, "stale", 1)
    journal.start_step(job_id, new.lease_token, "s", 1)
    with pytest.raises(JournalUnavailable):  # the CHECK constraint refuses the state
        journal.end_step(job_id, new.lease_token, "s", "bogus-state")
    barrier(journal)
    kinds = [(row.kind, to_job_event(row).state or to_job_event(row).step_state)
             for row in journal.job_events(job_id)]
    assert kinds == [("state", State.QUEUED), ("state", State.RUNNING), ("state", State.QUEUED),
                     ("state", State.RUNNING), ("step", "running")]


def test_the_events_of_a_shared_transaction_survive_one_refused_op(journal):
    """One op of a batch refused: the batch runs again op by op under savepoints; the
    others' events are written, the refused op's are not, the numbers have no gap."""
    ids = [insert(journal) for _ in range(3)]
    runs = journal.claim("node", 3, 60_000)
    calls = [Call(lambda r=r: journal.end_step(r.id, r.lease_token, "s", "succeeded", result=1))
             for r in runs]
    bad = Call(lambda: journal.end_step(runs[0].id, runs[0].lease_token, "t", "bogus"))
    with one_transaction(journal, expect=4):
        for call in [*calls, bad]:
            call.start()
    for call in [*calls, bad]:
        call.join(30)
    assert [call.error for call in calls] == [None] * 3
    assert isinstance(bad.error, JournalUnavailable)
    for job_id in ids:
        rows = journal.job_events(job_id)
        assert [row.seq for row in rows] == [1, 2, 3]
        assert rows[-1].kind == "step"


def test_progress_in_a_tight_loop_journals_a_few_events_and_always_the_last(db_url):
    registry = Registry()

    @registry.task("t.busy")
    def busy(ctx):
        started = time.monotonic()
        i = 0
        while time.monotonic() - started < 0.6:
            i += 1
            ctx.progress(i, None)
        ctx.progress("last", None)
        return i

    with JobServer(db_url, tasks=registry, workers=1, **FAST) as server:
        job_id = server.submit("t.busy")
        calls = server.wait(job_id, 30)["result"]
        rows = server.journal.job_events(job_id)
    progress = [to_job_event(row).progress["done"] for row in rows if row.kind == "progress"]
    assert calls > 100  # the loop did report in a tight loop
    assert len(progress) <= 0.6 / PROGRESS_EVENT_EVERY + 3
    assert progress[-1] == "last"  # owed, and journaled before the finish
    assert [row.kind for row in rows][-2:] == ["progress", "state"]


def test_a_held_back_progress_event_is_journaled_when_its_time_comes(journal):
    """A run reports twice and then goes quiet: the second note's event comes on its own."""
    job_id = insert(journal)
    job = claim_one(journal)
    journal.set_progress(job_id, job.lease_token, {"done": 1})
    barrier(journal)
    journal.set_progress(job_id, job.lease_token, {"done": 2})
    barrier(journal)
    assert journal.get_job(job_id).progress == {"done": 2}  # the row takes every note
    wait_for(lambda: [to_job_event(r).progress for r in journal.job_events(job_id)
                      if r.kind == "progress"] == [{"done": 1}, {"done": 2}],
             timeout=5, message="the held-back event")


def test_two_servers_on_mariadb_number_each_jobs_events_without_gap(mysql_url):
    """Two processes' writers (here two JobServers) write events of the same jobs: claims
    and finishes by one, cancels by the other; every job's seq runs 1, 2, 3... in order."""
    registry = Registry()

    @registry.task("t.stepped")
    def stepped(ctx):
        for i in range(3):
            ctx.step(f"s{i}", lambda: i)
            ctx.progress(i, 3)
        return "ok"

    first = JobServer(mysql_url, tasks=registry, workers=4, **FAST)
    second = JobServer(mysql_url, tasks=registry, workers=4, **FAST)
    try:
        first.start()
        second.start()
        ids = [job["id"] for job, _ in first.submit_many([{"task": "t.stepped"}] * 40)]
        for job_id in ids[::3]:
            try:
                second.cancel(job_id)
            except InvalidTransition:
                continue  # ended already: nothing to cancel
        for job_id in ids:
            assert second.wait(job_id, 60)["state"] in ("succeeded", "cancelled")
        for job_id in ids:
            rows = first.journal.job_events(job_id)
            assert [row.seq for row in rows] == list(range(1, len(rows) + 1))
            assert [row.id for row in rows] == sorted(row.id for row in rows)
            last_state = [to_job_event(r).state for r in rows if r.kind == "state"][-1]
            assert last_state == State(first.get(job_id)["state"])
    finally:
        first.stop()
        second.stop()


# --- reading in id order --------------------------------------------------------------------------
def test_the_cursor_reads_an_event_that_commits_after_a_higher_one_on_mariadb(mysql_url):
    """The MySQL trap: ids are given at insert, so a transaction holding a lower id can
    commit after a reader saw higher ones. A reader of `id > last` misses it; the cursor
    keeps the hole and reads it when it fills."""
    journal = open_journal(mysql_url)
    raw = _raw(mysql_url)
    try:
        insert(journal)
        naive = EventCursor.at_end(journal, ordered=True)  # plain `id > last`
        cursor = EventCursor.at_end(journal)
        with raw.cursor() as cur:
            cur.execute("BEGIN")
            cur.execute("INSERT INTO events (job_id, seq, kind, data) VALUES ('late', 1, 'state', "
                        "'{\"state\":\"queued\"}')")
            late_id = cur.lastrowid
            later = insert(journal)  # committed, with higher ids
            first = cursor.read()
            assert [row.job_id for row, _ in first] == [later]
            assert first[-1][1] == late_id - 1  # the resume point stays below the hole
            assert [row.job_id for row, _ in naive.read()] == [later]
            cur.execute("COMMIT")
        second = cursor.read()
        assert [(row.id, row.job_id) for row, _ in second] == [(late_id, "late")]
        assert cursor.floor == first[-1][0].id and cursor.holes == 0
        assert naive.read() == []  # the naive reader has lost it for good
    finally:
        raw.close()
        journal.close()


def _raw(mysql_url):
    from urllib.parse import urlparse
    p = urlparse(mysql_url)
    return pymysql.connect(host=p.hostname, port=p.port or 3306, user=p.username or "root",
                           password=p.password or "", database=p.path.lstrip("/"), autocommit=True)


class _Events:
    """A journal stand-in holding event rows by id (for the cursor's clock and holes)."""

    class dialect:
        name = "mysql"

    def __init__(self):
        self.rows = {}

    def add(self, *ids):
        for i in ids:
            self.rows[i] = EventRow(i, "job", i, "state", "{}")

    def last_event_id(self):
        return max(self.rows, default=0)

    def event_ids_after(self, after, limit):
        return sorted(i for i in self.rows if i > after)[:limit]

    def events_after(self, after, limit, scoped=False):
        return [self.rows[i] for i in sorted(self.rows) if i > after][:limit]

    def events_between(self, low, high, limit, scoped=False):
        return [self.rows[i] for i in sorted(self.rows) if low <= i <= high][:limit]


def test_a_hole_is_given_up_after_the_grace_and_holes_at_the_start_are_kept():
    now = [0.0]
    events = _Events()
    events.add(1, 2, 4)  # 3 is in flight when the cursor starts
    cursor = EventCursor.at_end(events, clock=lambda: now[0])
    assert cursor.floor == 2 and cursor.holes == 1
    events.add(5, 7)
    assert [(row.id, floor) for row, floor in cursor.read()] == [(5, 2), (7, 2)]
    events.add(3)
    assert [(row.id, floor) for row, floor in cursor.read()] == [(3, 5)]
    now[0] = HOLE_GRACE + 1  # 6 never came: rolled back
    assert cursor.read() == [] and cursor.floor == 7 and cursor.holes == 0
    events.add(6)
    assert cursor.read() == []  # too late: given up (a commit held for longer than the grace)


def test_an_ordered_journal_keeps_no_holes(sqlite_url):
    journal = open_journal(sqlite_url)
    try:
        ids = [insert(journal) for _ in range(3)]
        cursor = EventCursor(journal)
        journal.insert_jobs([make_job()])
        read = cursor.read()
        assert [row.job_id for row, _ in read][:3] == ids and cursor.holes == 0
        assert [floor for _row, floor in read] == [row.id for row, _ in read]
    finally:
        journal.close()


def test_event_rows_turn_back_into_the_job_events_the_pool_tells():
    job_id = "j"
    for event in (JobEvent.state_changed(job_id, State.RUNNING, attempt=3),
                  JobEvent.state_changed(job_id, State.FAILED, error_type="E", callback="pending"),
                  JobEvent.progressed(job_id, {"done": 1, "total": None, "message": "m"}),
                  JobEvent.step_changed(job_id, "s", "failed"),
                  JobEvent.callback_attempted(job_id, "delivered", 2)):
        from jobserver import eventlog
        data = {
            EventKind.STATE: lambda e: eventlog.data_state(e.state, e.attempt, e.error_type, e.callback),
            EventKind.PROGRESS: lambda e: eventlog.data_progress(
                '{"done":1,"message":"m","total":null}'),
            EventKind.STEP: lambda e: eventlog.data_step(e.step, e.step_state),
            EventKind.CALLBACK: lambda e: eventlog.data_callback(e.callback, e.callback_attempts),
        }[event.kind](event)
        assert to_job_event(EventRow(1, job_id, 1, event.kind.value, data)) == event


def test_a_huge_progress_note_is_cut_in_its_event(journal):
    job_id = insert(journal)
    job = claim_one(journal)
    journal.set_progress(job_id, job.lease_token, {"done": 5, "total": 9, "message": "x" * 100_000})
    barrier(journal)
    assert journal.get_job(job_id).progress["message"] == "x" * 100_000
    [row] = [r for r in journal.job_events(job_id) if r.kind == "progress"]
    note = to_job_event(row).progress
    assert note["done"] == 5 and note["total"] == 9 and len(note["message"]) == 500
    assert len(row.data) < 1000


def test_two_journals_on_one_sqlite_file_number_a_jobs_events_in_turn(sqlite_url):
    """The writer remembers the seqs it numbered, but only while no other connection has
    written: here the other journal's events come between two of this one's."""
    first, second = open_journal(sqlite_url), open_journal(sqlite_url)
    try:
        job_id = insert(first)
        [run] = second.claim("other", 1, 60_000)
        second.finish(job_id, run.lease_token, State.FAILED, error={"type": "E"})
        first.retry(job_id)  # its memory says seq 1: the file says 3
        [again] = first.claim("this", 1, 60_000)
        second.set_progress(job_id, again.lease_token, {"done": 1})
        barrier(second)
        first.finish(job_id, again.lease_token, State.SUCCEEDED)
        events = [(row.seq, to_job_event(row).kind, to_job_event(row).state)
                  for row in first.job_events(job_id)]
    finally:
        first.close()
        second.close()
    assert events == [(1, EventKind.STATE, State.QUEUED), (2, EventKind.STATE, State.RUNNING),
                      (3, EventKind.STATE, State.FAILED), (4, EventKind.STATE, State.QUEUED),
                      (5, EventKind.STATE, State.RUNNING), (6, EventKind.PROGRESS, None),
                      (7, EventKind.STATE, State.SUCCEEDED)]


def test_a_deleted_jobs_events_go_but_no_id_is_ever_given_twice(db_url):
    """Ids are the highest plus one: deleting the highest event would give its id again,
    and a reader that had read it would never see the new event. The highest stays."""
    journal = open_journal(db_url)
    try:
        older, newest = insert(journal), insert(journal)
        for job_id in (older, newest):
            journal.cancel(job_id)
        top = journal.last_event_id()
        reader = EventCursor(journal, after=top)
        journal.delete_job(older)
        journal.delete_job(newest)  # it holds the highest event
        assert journal.job_events(older) == []
        assert [row.id for row in journal.job_events(newest)] == [top]  # kept, alone
        fresh = insert(journal)
        assert [row.job_id for row, _floor in reader.read()] == [fresh]
        assert journal.events_after(0, scoped=True)[0].owner is None  # an orphan reads as gone
    finally:
        journal.close()
