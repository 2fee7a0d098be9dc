"""The write path's reliability: one op's failure stays its own, a returned step is committed,
an outcome is never dropped, progress never freezes, and MySQL compares keys exactly.

Each test here failed before its fix. Failures are real: a duplicate key, a string the
driver cannot encode, a trigger that refuses a row (the database's own refusal), a held
SQLite write lock, or a TCP relay cut in front of MariaDB. Nothing is mocked.
"""
import sqlite3
import threading
import time
from contextlib import contextmanager
from urllib.parse import urlparse, urlunparse

import pymysql
import pytest
from conftest import wait_for

from jobserver import InvalidJob, JobServer, Registry
from jobserver.codec import dumps
from jobserver.errors import JournalUnavailable, WriteRefused
from jobserver.ids import new_id
from jobserver.journal import State, open_journal
from jobserver.journal_sql import SCHEMA_VERSION
from jobserver.tasks import JobContext

FAST = dict(poll_interval=0.05, shutdown_grace=1)
TERMINAL = {"succeeded", "failed", "cancelled"}


# --- helpers ------------------------------------------------------------------------------
def make_job(owner="alice", key=None, params=None, **fields):
    """A row for `insert_jobs`: every column a submit sets."""
    row = {"id": new_id(), "task": "t.echo", "owner": owner, "params": dumps(params or {}),
           "priority": 0, "max_retries": 0, "timeout": None, "callback_url": None,
           "idempotency_key": key, "request_hash": None if key is None else "h" * 64}
    row.update(fields)
    return row


def barrier(journal):
    """Return once every write queued before it (casts included) has ended."""
    journal.renew([], 1000, "nobody")


@contextmanager
def one_transaction(journal, expect):
    """Hold the journal's committer while the block queues `expect` writes, so that they
    all share its next transaction (the test-only reach into `_writer` is that hold)."""
    writer, gate, holding = journal._writer, threading.Event(), threading.Event()

    def hold(_cur):
        holding.set()
        gate.wait(20)
    writer.cast(hold)
    assert holding.wait(10)
    try:
        yield
        wait_for(lambda: writer._queue.qsize() >= expect, timeout=10, message=f"{expect} queued writes")
    finally:
        gate.set()


class Call(threading.Thread):
    """`fn()` on its own thread; `.value` or `.error` once joined."""

    def __init__(self, fn):
        super().__init__(daemon=True)
        self.fn, self.value, self.error, self.seconds = fn, None, None, None

    def run(self):
        start = time.monotonic()
        try:
            self.value = self.fn()
        except Exception as exc:  # the test looks at it
            self.error = exc
        self.seconds = time.monotonic() - start

    def result(self, timeout=30):
        self.join(timeout)
        assert not self.is_alive(), "the call did not return"
        return self


def finished(server, job_id, timeout=15):
    return wait_for(lambda: (lambda job: job if job["state"] in TERMINAL else None)(server.get(job_id)),
                    timeout=timeout, message=f"job {job_id} to finish")


def raw_sql(url, statement):
    """Run one statement outside the journal: fault injection (a trigger) or a downgrade."""
    parsed = urlparse(url)
    if parsed.scheme == "sqlite":
        conn = sqlite3.connect(parsed.path[1:], isolation_level=None)
        try:
            conn.execute(statement)
        finally:
            conn.close()
        return
    conn = pymysql.connect(host=parsed.hostname, port=parsed.port or 3306, user=parsed.username,
                           password=parsed.password or "", database=parsed.path[1:], autocommit=True)
    try:
        with conn.cursor() as cur:
            cur.execute(statement)
    finally:
        conn.close()


def refuse_when(url, name, table, event, condition):
    """A trigger that makes the database refuse a row of `table` when `condition` holds
    (`condition` in SQL over NEW, the same text on both engines)."""
    if url.startswith("sqlite"):
        raw_sql(url, f"CREATE TRIGGER {name} BEFORE {event} ON {table} WHEN {condition} "
                     "BEGIN SELECT RAISE(ABORT, 'refused by test trigger'); END")
    else:
        raw_sql(url, f"CREATE TRIGGER {name} BEFORE {event} ON {table} FOR EACH ROW BEGIN "
                     f"IF {condition} THEN SIGNAL SQLSTATE '45000' "
                     "SET MESSAGE_TEXT = 'refused by test trigger'; END IF; END")


@contextmanager
def proxied(mysql_url):
    """(the URL of `mysql_url` through a TCP relay, the relay) — cut it to cut the network."""
    from http_fixtures import TcpProxy
    url = urlparse(mysql_url)
    proxy = TcpProxy((url.hostname, url.port or 3306))
    auth = url.username + (f":{url.password}" if url.password else "")
    try:
        yield urlunparse(url._replace(netloc=f"{auth}@127.0.0.1:{proxy.port}")), proxy
    finally:
        proxy.close()


@pytest.fixture
def journal(db_url):
    j = open_journal(db_url)
    yield j
    j.close()


def running_job(journal, **fields):
    """Insert a job and claim it: the claimed Job (with its lease token)."""
    journal.insert_jobs([make_job(**fields)])
    [job] = journal.claim("node-a", 1, 60_000)
    return job


# --- 1. exact keys on MySQL -------------------------------------------------------------------
def test_keys_differing_only_by_trailing_spaces_are_two_keys(journal):
    """MySQL's PAD SPACE collation made 'k' and 'k ' one key: the batch failed after ~6 s."""
    start = time.monotonic()
    pairs = journal.insert_jobs([make_job(key="k"), make_job(key="k ")])
    assert time.monotonic() - start < 3
    assert [created for _row, created in pairs] == [True, True]
    for key, (row, _created) in zip(("k", "k "), pairs):
        [(again, created)] = journal.insert_jobs([make_job(key=key)])
        assert (again.id, created) == (row.id, False)
    assert journal.count_queued() == 2


def test_owners_and_step_names_differing_by_trailing_spaces_stay_apart(journal):
    """Under PAD SPACE an owner 'alice ' listed alice's jobs, and step 'a ' replayed step 'a'."""
    [(mine, _)] = journal.insert_jobs([make_job(owner="alice")])
    rows, _steps, _next = journal.list_jobs(owner="alice ", with_steps=False)
    assert rows == []
    [job] = journal.claim("node-a", 1, 60_000)
    assert job.id == mine.id
    ctx = JobContext(job, journal)
    assert ctx.step("a", lambda: "first") == "first"
    assert ctx.step("a ", lambda: "second") == "second"
    assert {s["name"]: s["state"] for s in journal.get_steps(job.id)} == {"a": "succeeded",
                                                                             "a ": "succeeded"}


def test_migration_2_makes_an_existing_mysql_journal_compare_exactly(mysql_url):
    """A journal created before version 2 (PAD SPACE tables) is converted when opened."""
    open_journal(mysql_url).close()
    for table in ("jobs", "steps", "callbacks", "tokens", "settings"):
        raw_sql(mysql_url, f"ALTER TABLE {table} CONVERT TO CHARACTER SET utf8mb4 COLLATE utf8mb4_bin")
    # back to version 1 as it was: the later migrations' indexes go too, as they run again
    for index in ("jobs_finished", "jobs_task"):
        raw_sql(mysql_url, f"DROP INDEX {index} ON jobs")
    raw_sql(mysql_url, "DROP TABLE events")  # made by a later version: a version 1 journal has none
    raw_sql(mysql_url, "DELETE FROM schema_version WHERE version > 1")
    journal = open_journal(mysql_url)
    try:
        assert journal.schema_version() == SCHEMA_VERSION
        pairs = journal.insert_jobs([make_job(key="k"), make_job(key="k ")])
        assert [created for _row, created in pairs] == [True, True]
    finally:
        journal.close()


def test_two_servers_keep_their_leases_while_one_submits_keys_differing_by_spaces(mysql_url):
    """Seen with two servers and a 3 s lease: the refused pair held one server's committer for
    ~6 s, its heartbeat missed the lease, and the other server ran the job a second time."""
    registry, runs = Registry(), []

    @registry.task("t.long")
    def long(ctx):
        runs.append(ctx.job_id)
        ctx.wait(5)
        return "done"

    @registry.task("t.quick")
    def quick(ctx):
        return "quick"

    options = dict(FAST, tasks=registry, workers=1, lease_seconds=3)
    first, second = JobServer(mysql_url, **options), JobServer(mysql_url, **options)
    try:
        first.start()
        job_id = first.submit("t.long")
        wait_for(lambda: first.get(job_id)["state"] == "running", message="the job to start")
        second.start()
        pairs = first.submit_many([{"task": "t.quick", "idempotency_key": "k"},
                                   {"task": "t.quick", "idempotency_key": "k "}])
        assert [created for _job, created in pairs] == [True, True]
        job = finished(first, job_id)
        assert (job["state"], job["attempts"]) == ("succeeded", 1)
        assert runs == [job_id]
    finally:
        second.stop(grace=1)
        first.stop(grace=1)


# --- 1 and 3. one op's failure is its own ---------------------------------------------------
def test_a_refused_insert_fails_alone_and_its_neighbours_commit_at_once(journal):
    """A duplicate id in one submit: only that submit fails (refused for good), the others of
    its transaction commit without delay (it was retried as transient for ~6 s, then all failed)."""
    job = running_job(journal)
    [(taken, _)] = journal.insert_jobs([make_job()])
    good = make_job(owner="bob")
    with one_transaction(journal, expect=3):
        calls = [Call(lambda: journal.insert_jobs([make_job(id=taken.id)])),
                 Call(lambda: journal.insert_jobs([good])),
                 Call(lambda: journal.renew([(job.id, job.lease_token)], 60_000, "node-a"))]
        for call in calls:
            call.start()
            time.sleep(0.05)  # keep their order in the queue
    refused, submitted, renewed = (call.result() for call in calls)
    assert isinstance(refused.error, WriteRefused) and isinstance(refused.error, JournalUnavailable)
    assert submitted.error is None and submitted.value[0][1] is True
    assert renewed.error is None and renewed.value == (set(), set())
    assert max(submitted.seconds, renewed.seconds) < 3
    assert journal.get_job(good["id"]) is not None


def test_an_exception_outside_the_database_fails_only_its_own_op(journal):
    """A lone surrogate makes the driver raise UnicodeEncodeError inside the batch: it failed the
    whole transaction, so a finish beside it was lost."""
    job = running_job(journal)
    with one_transaction(journal, expect=2):
        bad = Call(lambda: journal.insert_jobs([make_job(key="k\ud800")]))
        bad.start()
        time.sleep(0.05)
        finish = Call(lambda: journal.finish(job.id, job.lease_token, State.SUCCEEDED, result=7))
        finish.start()
    assert finish.result().error is None
    assert journal.get_job(job.id).result == 7
    assert isinstance(bad.result().error, WriteRefused)


def test_a_race_for_one_idempotency_key_between_two_servers_gives_one_job(mysql_url):
    """Two servers take the same keys at once: each key makes one job, the other server's
    submit is a repeat of it, and the job beside the key in each submit is made on both,
    never an error (a guard of the isolated re-run, which must look the key up again)."""
    registry = Registry()
    registry.task("t.echo")(lambda ctx: None)
    servers = [JobServer(mysql_url, tasks=registry) for _ in range(2)]
    try:
        for round_ in range(30):
            start = threading.Barrier(2)
            specs = [{"task": "t.echo", "idempotency_key": f"race-{round_}"}, {"task": "t.echo"}]

            def submit(server, start=start, specs=specs):
                start.wait(5)
                return server.submit_many(specs)
            calls = [Call(lambda s=s: submit(s)) for s in servers]
            for call in calls:
                call.start()
            results = [call.result() for call in calls]
            assert [r.error for r in results] == [None, None]
            [(keyed_a, created_a), (other_a, _)], [(keyed_b, created_b), (other_b, _)] = (
                r.value for r in results)
            assert keyed_a["id"] == keyed_b["id"] and {created_a, created_b} == {True, False}
            assert other_a["id"] != other_b["id"]
    finally:
        for server in servers:
            server.stop()


def test_in_process_submits_refuse_strings_the_journal_cannot_store(db_url):
    """HTTP refuses lone surrogates in its strict JSON; in process they reached the driver."""
    registry = Registry()
    registry.task("t.echo")(lambda ctx: None)
    server = JobServer(db_url, tasks=registry)
    try:
        for spec in ({"idempotency_key": "k\ud800"}, {"callback_url": "https://example.com/\udfff"}):
            with pytest.raises(InvalidJob):
                server.submit("t.echo", **spec)
        for owner in ("bob\ud800", "o" * 191, "", 7):
            with pytest.raises(InvalidJob):
                server.submit("t.echo", owner=owner)
        deep = {}
        for _ in range(100_000):
            deep = {"d": deep}
        with pytest.raises(InvalidJob):  # the JSON encoder's RecursionError reached the caller
            server.submit("t.echo", deep)
        kept = server.get(server.submit("t.echo", {"text": "caf\u00e9 \ud800"}, owner="o" * 190))
        assert kept["params"] == {"text": "caf\u00e9 \ud800"}  # JSON text escapes it
    finally:
        server.stop()


# --- 2. a returned step is committed --------------------------------------------------------
def test_a_step_that_returned_is_recorded_though_its_start_record_was_refused(db_url):
    """The start record is queued without waiting; when it failed, end_step's UPDATE found no
    row, step() returned as if checkpointed, and the next attempt ran the step again."""
    journal = open_journal(db_url)
    try:
        refuse_when(db_url, "refuse_step_start", "steps", "INSERT", "NEW.state = 'running'")
        job = running_job(journal)
        calls = []
        assert JobContext(job, journal).step("s", lambda: calls.append(1) or {"n": 1}) == {"n": 1}
        step = journal.get_step(job.id, "s")
        assert step is not None and step["state"] == "succeeded"
        assert JobContext(job, journal).step("s", lambda: calls.append(2)) == {"n": 1}
        assert calls == [1]
    finally:
        journal.close()


def test_a_step_start_lost_to_the_network_is_recorded_by_its_end(mysql_url):
    """The start record's transaction fails (network cut); the end record writes the whole row."""
    with proxied(mysql_url) as (url, proxy):
        journal = open_journal(url)
        try:
            job = running_job(journal)
            proxy.cut()
            journal.start_step(job.id, job.lease_token, "s", 1)
            with pytest.raises(JournalUnavailable):
                barrier(journal)  # the start record's transaction has failed by now
            proxy.resume()
            journal.end_step(job.id, job.lease_token, "s", "succeeded", result=[1, 2])
            step = journal.get_step(job.id, "s")
            assert step["state"] == "succeeded" and step["result"] == "[1,2]"
            assert step["started_at"] <= step["finished_at"]
        finally:
            journal.close()


# --- 3. an outcome write is never dropped ---------------------------------------------------
def test_a_finish_the_journal_refuses_ends_the_job_failed_with_a_clear_error(db_url):
    """A refused finish was retried for ever (the job stayed running); now it fails the job."""
    registry = Registry()

    @registry.task("t.poison")
    def poison(ctx):
        return "poison"

    @registry.task("t.fine")
    def fine(ctx):
        return "fine"

    server = JobServer(db_url, tasks=registry, workers=2, lease_seconds=5, **FAST)
    refuse_when(db_url, "refuse_poison", "jobs", "UPDATE", "NEW.result = '\"poison\"'")
    try:
        server.start()
        refused_id, fine_id = server.submit("t.poison"), server.submit("t.fine")
        job = finished(server, refused_id)
        assert (job["state"], job["result"]) == ("failed", None)
        assert job["error"]["type"] == "OutcomeRefused" and job["error"]["message"]
        assert finished(server, fine_id)["result"] == "fine"
        assert server.pool.join(5)
    finally:
        server.stop()


def test_a_finish_sharing_a_transaction_with_a_broken_op_is_recorded(db_url):
    """A finish beside an op that raised outside the database failed with it, and the pool
    dropped that error: the job stayed `running` and ran again after its lease."""
    registry, release = Registry(), threading.Event()

    @registry.task("t.gate")
    def gate(ctx):
        release.wait(20)
        return "done"

    server = JobServer(db_url, tasks=registry, workers=1, lease_seconds=30, **FAST)
    try:
        server.start()
        job_id = server.submit("t.gate")
        wait_for(lambda: server.get(job_id)["state"] == "running", message="the job to start")
        with one_transaction(server.journal, expect=2):
            release.set()  # the task returns: its finish is queued behind the hold
            wait_for(lambda: not server.pool.running_ids(), message="the finish to be queued")
            bad = Call(lambda: server.journal.insert_jobs([make_job(key="\udc80")]))
            bad.start()
        bad.result()
        assert server.pool.join(10)
        job = server.get(job_id)
        assert (job["state"], job["result"], job["attempts"]) == ("succeeded", "done", 1)
        assert isinstance(bad.error, WriteRefused)
    finally:
        release.set()
        server.stop()


# --- 9. progress never freezes --------------------------------------------------------------
def test_progress_moves_again_after_its_transaction_failed(journal):
    """An op before the note raised, the note's op never ran, and the note stayed marked as
    queued: every later note was dropped for good."""
    job = running_job(journal)
    with one_transaction(journal, expect=2):
        bad = Call(lambda: journal.insert_jobs([make_job(key="\ud800")]))
        bad.start()
        wait_for(lambda: journal._writer._queue.qsize() >= 1, message="the broken op")
        journal.set_progress(job.id, job.lease_token, {"done": 1})
    bad.result()
    journal.set_progress(job.id, job.lease_token, {"done": 2})
    barrier(journal)
    assert journal.get_job(job.id).progress == {"done": 2}


def test_progress_moves_again_after_the_network_to_mariadb_was_cut(mysql_url):
    with proxied(mysql_url) as (url, proxy):
        journal = open_journal(url)
        try:
            job = running_job(journal)
            proxy.cut()
            journal.set_progress(job.id, job.lease_token, {"done": 1})
            with pytest.raises(JournalUnavailable):
                barrier(journal)
            proxy.resume()
            journal.set_progress(job.id, job.lease_token, {"done": 2})
            barrier(journal)
            assert journal.get_job(job.id).progress == {"done": 2}
        finally:
            journal.close()
