"""Defects a review of issue 8's change found: each test failed before its fix."""
import sqlite3
import time

from conftest import wait_for

from jobserver import JobServer, Registry
from jobserver.errors import WriteRefused
from jobserver.ids import new_id

FAST = dict(workers=2, poll_interval=0.05, lease_seconds=1.5, shutdown_grace=1.0)


def _registry():
    registry = Registry()

    @registry.task("t.sleep")
    def sleep(ctx, seconds=3.0):
        ctx.wait(seconds)
        return "slept"

    @registry.task("t.echo")
    def echo(ctx, **params):
        return params
    return registry


def _insert_unreadable_row(path):
    """A queued job whose params are not JSON, as a foreign writer or a bad restore leaves it."""
    now = int(time.time() * 1000)
    conn = sqlite3.connect(path)
    with conn:
        conn.execute(
            "INSERT INTO jobs (id, task, owner, state, params, priority, attempts, max_retries, "
            "run_at, lease_token, crashes, cancel_requested, created_at) "
            "VALUES (?, 't.echo', 'anonymous', 'queued', '{bad', 10, 0, 0, ?, 0, 0, 0, ?)",
            (new_id(), now, now))
    conn.close()


def test_an_unreadable_queued_row_fails_alone_and_leases_stay_renewed(tmp_path):
    """Before: the claim decoded its rows inside its own op, so one row that would not decode
    failed every claim, and the heartbeat (run after the claim) never ran: a running job's
    lease lapsed while it ran, for another node to run it again."""
    path = tmp_path / "j.db"
    with JobServer(f"sqlite:///{path}", tasks=_registry(), **FAST) as server:
        running = server.submit("t.sleep", {"seconds": 4.0})
        wait_for(lambda: server.get(running)["state"] == "running", message="the sleep to run")
        _insert_unreadable_row(path)
        later = server.submit("t.echo", {"after": True})
        wait_for(lambda: server.get(later)["state"] == "succeeded", message="a later job to run")
        conn = sqlite3.connect(path)
        rows = conn.execute("SELECT state, error FROM jobs WHERE id NOT IN (?, ?)", (running, later)).fetchall()
        conn.close()
        assert len(rows) == 1 and rows[0][0] == "failed" and '"CorruptJob"' in rows[0][1]
        job = server.journal.get_job(running)
        assert job.state == "running" and job.lease_expires > time.time() * 1000
        wait_for(lambda: server.get(running)["state"] == "succeeded", timeout=15,
                 message="the sleep to finish")
        assert server.get(running)["attempts"] == 1


def test_a_write_refused_for_good_is_422_not_503(tmp_path, monkeypatch):
    """A refused write would be refused again: a 503 with Retry-After told clients to retry."""
    from jobserver.http import create_app
    server = JobServer(f"sqlite:///{tmp_path / 'j.db'}", tasks=_registry(), **FAST)
    try:
        def refuse(*_args, **_kwargs):
            raise WriteRefused("the journal refused the write (DataError: secret driver text)")
        monkeypatch.setattr(server.journal, "insert_jobs", refuse)
        answer = create_app(server).test_client().post("/jobs", json={"task": "t.echo"})
        assert answer.status_code == 422 and "Retry-After" not in answer.headers
        assert "secret driver text" not in answer.get_data(as_text=True)
    finally:
        server.stop()


def test_a_journal_outage_inside_a_task_keeps_the_database_address_out_of_the_job():
    """The job's error goes to its owner and its callback receiver: before, the message and
    traceback held "cannot connect to MySQL at <host>: (2003, ...)"."""
    from jobserver.errors import JournalUnavailable
    from jobserver.pool import error_info
    try:
        raise JournalUnavailable("cannot connect to MySQL at db.internal.example: (2003, secret)")
    except JournalUnavailable as exc:
        info = error_info(exc)
    assert info["type"] == "JournalUnavailable"
    assert "db.internal" not in repr(info) and "2003" not in repr(info)
