"""The journal: every job, step, callback delivery and token as committed rows.

One `Journal` class runs all SQL; its text lives beside it in journal_sql.py, and two
small dialects (SQLite, MySQL/MariaDB, in journal_drivers.py) supply the few pieces
that differ. Every value is a bound parameter.

Writes go through a `GroupCommitter`, so concurrent submits, claims and finishes
share one transaction and one fsync. Every write of a running job is fenced by its
lease token: `WHERE id=? AND state='running' AND lease_token=?`, row count checked.
Times are integer milliseconds since the epoch, taken from the database's clock.

Reads give `model.Job` values; which state changes are allowed is model.TRANSITIONS.

Every change of a job also writes its event (eventlog.py) in the same transaction: the
ops queue them on the transaction, and the batch inserts them in one statement at its
end, each numbered after the job's last (read under the job's row lock, which the op's
own UPDATE holds). Progress events are rate-limited per run (PROGRESS_EVENT_EVERY): a
task reporting in a tight loop still updates its row at each commit, but journals a few
events a second, the last one always (on a timer, or before the run's next event).
"""
import functools
import logging
import operator
import random
import threading
import time
from contextlib import contextmanager
from typing import NamedTuple

from . import journal_drivers as drivers
from .admission import waiting
from .codec import MAX_DOCUMENT, dumps
from .errors import (
    IdempotencyConflict,
    InvalidJob,
    InvalidTransition,
    JournalRefusesWrites,
    JournalUnavailable,
    LeaseLost,
    ServerClosed,
    TokenExists,
    WriteRefused,
)
from .eventlog import EventRow, data_callback, data_progress, data_state, data_step
from .groupcommit import GroupCommitter
from .ids import lowest_id_at, new_callback_id
from .journal_sql import ENDED, JOB_COLUMNS, MAX_IDS, MIGRATIONS, MYSQL_EXACT_COLLATION, SCHEMA_VERSION, Sql
from .model import TERMINAL, TRANSITIONS, Action, Job, State, StepSummary
from .timer import Timer

__all__ = ["Journal", "open_journal", "Page", "Recovery", "UserTransaction", "State", "TERMINAL",
           "SCHEMA_VERSION"]

log = logging.getLogger(__name__)

#: a row whose JSON documents hold more characters than this is decoded without the
#: request's admission turn (admission.py): other requests run meanwhile
LONG_DECODE = 256 * 1024
WRITE_PROBE = "write_probe"  # the settings row that Journal.writable() rewrites
WRITE_PROBE_SECONDS = 2.0  # how long a write probe's outcome stands


#: seconds between two progress events of one run (the job's row takes every note)
PROGRESS_EVENT_EVERY = 0.5
#: rows of the events table one read returns at most
EVENT_PAGE = 500
#: jobs whose last event's seq the writer keeps in memory at most (SQLite)
MAX_REMEMBERED_SEQS = 100_000

_DOMAIN_ERRORS = (IdempotencyConflict, InvalidTransition, LeaseLost, TokenExists)  # an op's own answer, not a failure
_BATCH_ATTEMPTS = 12  # transient failures (busy, deadlock) of one batch before it gives up: ~6 s


class _Tx:
    """What the operations of one write transaction share: the clock, read once, the
    job rows they submitted (with their idempotency keys) and the events they report,
    inserted together at the end — or, `isolated`, each op's inside its own savepoint.
    `fresh`: the ids of jobs submitted in it (their events are numbered from 1);
    `numbered`: the last seq of each job it wrote events of (None: it wrote none)."""
    __slots__ = ("now", "rows", "keys", "isolated", "events", "fresh", "deleted", "numbered")

    def __init__(self, isolated):
        self.now = None
        self.rows = []
        self.keys = {}
        self.isolated = isolated
        self.events = []  # (job id, kind, data)
        self.fresh = set()
        self.deleted = set()  # jobs deleted in it: no event of theirs is inserted
        self.numbered = None


class _Isolate(Exception):
    """One op of a shared transaction failed on its own: roll the transaction back and run
    it again with each op under its own savepoint, so that op fails alone."""


_QUEUED = data_state(State.QUEUED)  # the event of a submit, a retry, a job given back
_job_values = operator.itemgetter(*JOB_COLUMNS)  # a job dict as the INSERT's parameters
_ID, _STATE, _ATTEMPTS, _LEASE_OWNER, _LEASE_TOKEN, _PARAMS, _PROGRESS, _RESULT, _ERROR = (
    JOB_COLUMNS.index(name) for name in ("id", "state", "attempts", "lease_owner", "lease_token",
                                         "params", "progress", "result", "error"))


class Page(NamedTuple):
    """A page of `Journal.list_jobs`: its jobs, their steps by job id, the cursor of the rest."""
    jobs: list[Job]
    steps: dict[str, list[StepSummary]]
    next: str | None


class Recovery(NamedTuple):
    """What `Journal.recover` did: ids queued again, ids failed (WorkerLost), and which of
    the failed ones got a callback delivery."""
    requeued: list[str]
    failed: list[str]
    with_callback: frozenset[str]


class UserTransaction:
    """What `Journal.transaction()` yields to code that keeps its own rows in the journal's
    database: a DB-API `cursor` in an open transaction, the driver's DB-API `paramstyle`
    ("qmark" on SQLite, "pyformat" on MySQL), the `dialect` ("sqlite" or "mysql"), and
    `sql(text)`, which turns a statement written with `?` markers into the driver's style."""
    __slots__ = ("cursor", "paramstyle", "dialect", "sql")

    def __init__(self, cursor, paramstyle, dialect, translate):
        self.cursor = cursor
        self.paramstyle = paramstyle
        self.dialect = dialect
        self.sql = translate


def _fetch_one(cur, sql, args=()):
    cur.execute(sql, args)
    return cur.fetchone()


def _fetch_all(cur, sql, args=()):
    cur.execute(sql, args)
    return cur.fetchall()


def _scalar(cur, sql, args=()):
    """The first column of the first row, or None."""
    row = _fetch_one(cur, sql, args)
    return None if row is None else row[0]


def _dicts(cur, sql, args=()):
    """Rows as dicts by column name (steps and callbacks; jobs are `Job` values)."""
    cur.execute(sql, args)
    cols = [d[0] for d in cur.description]
    return [dict(zip(cols, row)) for row in cur.fetchall()]


def _dict(cur, sql, args=()):
    rows = _dicts(cur, sql, args)
    return rows[0] if rows else None


def _stored_size(row):
    """Characters of JSON a job row holds (its documents; the rest is a few hundred bytes)."""
    return (len(row[_PARAMS]) + len(row[_PROGRESS] or "") + len(row[_RESULT] or "")
            + len(row[_ERROR] or ""))


def _decode(row):
    """The Job of a row; a big one is decoded without the request's turn (admission.py)."""
    if _stored_size(row) > LONG_DECODE:
        with waiting():
            return Job.from_row(row)
    return Job.from_row(row)


def _claimed(row, node):
    """The Job of a row the claim UPDATE just took, with the values that UPDATE wrote."""
    values = list(row)
    values[_STATE] = State.RUNNING.value
    values[_LEASE_OWNER] = node
    values[_LEASE_TOKEN] += 1
    values[_ATTEMPTS] += 1
    return Job.from_row(values)


class Journal:
    """The durable store behind a JobServer. Thread-safe; one instance per process is enough.

    Opened with `open_journal(url)`. Reads run on per-thread (SQLite) or pooled (MySQL)
    connections; writes run in shared transactions on the committer thread.
    """

    def __init__(self, driver):
        self.driver = driver
        self.dialect = driver.dialect
        self.sql = Sql(self.dialect)
        self.url = driver.url
        self._migrate()
        self._writer = GroupCommitter(self._run_batch)
        self._tx = None  # the _Tx of the transaction the committer thread is running
        self._progress = {}  # (job id, lease token) -> newest progress note not yet written
        self._progress_lock = threading.Lock()
        # progress events, touched by ops only (the committer thread): when each run last
        # journaled one, and the newest note a run owes its stream (held back by the limit)
        self._progress_at = {}
        self._owed = {}
        self._timer = Timer("jobserver-progress-events")
        self._event_hooks = []
        # SQLite: the last seq of the jobs whose events this process numbered (_last_seqs)
        self._seqs = {} if self.sql.data_version is not None else None
        self._seqs_version = None
        self._closed = False
        self._write_probe = (float("-inf"), None)  # (monotonic time, error or None) of the last probe
        self._write_probe_lock = threading.Lock()

    # --- plumbing ---------------------------------------------------------------------
    def close(self):
        """Commit queued writes and close every connection. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self._timer.close()  # owed progress events go into the last commits
        self._writer.close()
        self.driver.close()

    def on_events(self, fn):
        """`fn()` after each commit that wrote events (on the committer thread: quick, no
        waiting). Streams in this process are woken by it; others read the table."""
        self._event_hooks.append(fn)

    def _read(self, fn):
        # as writes do: a closed SQLite connection would raise sqlite3.ProgrammingError,
        # and a MySQL pool would quietly open connections that nothing closes
        if self._closed:
            raise ServerClosed("the journal is closed")
        return self.driver.read(fn)

    def _write(self, fn, on_done=None):
        """Run `fn` in the next shared transaction: wait for the commit, or with `on_done`
        return at once and have `on_done(result, error)` called after it."""
        if on_done is None:
            return self._writer.call(fn)
        self._writer.cast(fn, on_done)
        return None

    def _refuse_oversize(self, what, *texts):
        """WriteRefused now, before queueing, for a write whose JSON documents the database
        cannot take in one statement (MySQL's max_allowed_packet, counted escaped): sent,
        it would be refused on every retry and, in a shared transaction, fail its batch-mates."""
        reason = self.driver.oversize(*texts)
        if reason is not None:
            raise WriteRefused(f"{what} cannot be stored: {reason}")

    def _run_batch(self, batch):
        """Run a batch in one write transaction, each op's failure its own.

        The fast pass runs every op, then one INSERT for every job they submitted. If an
        op fails on its own (the database refuses its statement, or it raises anything
        else), that pass is rolled back and the batch runs again with each op under its
        own savepoint: the op gets its error (WriteRefused), the others commit together.
        A transient failure (busy, deadlock) runs the batch again after a backoff."""
        isolated, delay = False, 0.005
        for _attempt in range(_BATCH_ATTEMPTS):
            done = []  # the committed transaction's after-commit list
            try:
                self.driver.write_transaction(functools.partial(self._apply, batch, isolated, done))
                self._committed(done)
                return
            except _Isolate:
                isolated = True
            except drivers.TransientError:
                time.sleep(delay * random.uniform(0.5, 1.5))
                delay = min(delay * 2, 1.0)
            except (drivers.StatementError, WriteRefused) as exc:
                # a refusal that took the transaction with it (no savepoint survives it)
                self._run_alone(batch, exc)
                return
        raise JournalUnavailable("the journal stayed busy; try again later")

    def _run_alone(self, batch, exc):
        """Run each op of a batch in a transaction of its own, to find the one the database
        refuses: only that op fails; each other op is reported as its own transaction ended."""
        if len(batch) == 1:
            if isinstance(exc, WriteRefused):
                raise exc  # refused for good: the caller must not retry it as "unavailable"
            cause = exc.__cause__
            if cause is not None and self.driver.refuses_statement(cause):
                raise _refused(cause)
            raise JournalUnavailable(f"the journal refused the write: {cause}") from exc
        for op in batch:
            try:
                self._run_batch([op])
            except JournalUnavailable as single:
                op.error = single

    def _apply(self, batch, isolated, done, cur):
        """Run a batch's operations, then the job inserts they queued, as one statement,
        then their events, as another; `isolated`, each op under its own savepoint with
        its inserts and events. `done` gets the transaction's after-commit list."""
        tx = self._tx = _Tx(isolated)
        done[:] = [tx]
        try:
            if isolated:
                for op in batch:
                    self._apply_isolated(op, cur)
                return
            for op in batch:
                op.error = None
                try:
                    op.result = op.fn(cur)
                except _DOMAIN_ERRORS as exc:
                    op.error = exc
                except Exception as exc:
                    self._isolate_if_refused(exc)
            try:
                if tx.rows:  # e.g. another process took one of our idempotency keys
                    cur.executemany(self.sql.insert_job, tx.rows)
                self._insert_events(cur, tx)
            except Exception as exc:
                self._isolate_if_refused(exc)
        finally:
            self._tx = None

    def _insert_events(self, cur, tx):
        """Insert the events the transaction's ops queued, each numbered after its job's
        last: one statement for the numbers (none for jobs submitted in this transaction)
        and one for the rows. The ops hold each job's row lock already (their UPDATE took
        it), so on MySQL no other transaction can number an event of these jobs meanwhile."""
        if tx.deleted:
            tx.events[:] = [event for event in tx.events if event[0] not in tx.deleted]
        if not tx.events:
            return
        fresh = tx.fresh
        known = [job_id for job_id in {event[0] for event in tx.events} if job_id not in fresh]
        last = self._last_seqs(cur, tx, known) if known else {}
        rows = []
        for job_id, kind, data in tx.events:
            seq = last[job_id] = (last.get(job_id) or 0) + 1
            rows.append((job_id, seq, kind, data))
        cur.executemany(self.sql.insert_event, rows)
        tx.events.clear()
        if tx.numbered is None:
            tx.numbered = last
        else:
            tx.numbered.update(last)

    def _last_seqs(self, cur, tx, job_ids):
        """{job id: the seq of its last event} for these jobs (absent: none yet): one query
        per MAX_IDS jobs. On SQLite, the numbers this process committed last stand in for
        the query while no other connection has written since (PRAGMA data_version says):
        a claim or a finish then costs the events table no read."""
        last, missing = {}, job_ids
        cache = self._seqs
        if cache is not None:
            version = _scalar(cur, self.sql.data_version)
            if version != self._seqs_version or tx.isolated:
                cache.clear()  # another connection wrote, or isolated ops commit apart
                self._seqs_version = None if tx.isolated else version
            if cache:
                last = {job_id: cache[job_id] for job_id in job_ids if job_id in cache}
                missing = [job_id for job_id in job_ids if job_id not in last]
        for start in range(0, len(missing), MAX_IDS):
            chunk = missing[start:start + MAX_IDS]
            cur.execute(self.sql.last_seqs(len(chunk)), chunk)
            last.update(cur.fetchall())
        return last

    def _committed(self, done):
        """After a commit that wrote events: remember their numbers (SQLite) and wake this
        process's streams."""
        tx = done[0] if done else None
        if tx is None or tx.numbered is None:
            return
        if self._seqs is not None and not tx.isolated:
            if len(self._seqs) > MAX_REMEMBERED_SEQS:
                self._seqs.clear()
            self._seqs.update(tx.numbered)
        for fn in self._event_hooks:
            try:
                fn()
            except Exception:  # a hook's bug must not fail ops that committed
                log.exception("event hook failed")

    def _event(self, job_id, kind, data):
        """Queue an event of the job on the running transaction (ops only)."""
        self._tx.events.append((job_id, kind, data))

    def _isolate_if_refused(self, exc):
        """Raise _Isolate for one op's own failure; re-raise the transaction's (the driver
        maps it: busy or deadlock run the batch again, a lost connection fails it)."""
        if self.driver.refuses_statement(exc):
            raise _Isolate() from exc
        raise exc

    def _apply_isolated(self, op, cur):
        """Run one op under a savepoint: if it fails, only its own writes are undone.

        A job insert that hits a unique key runs once more: another process has just
        committed that idempotency key, and the op now finds it (a repeat, or a conflict)."""
        tx = self._tx
        for attempt in (1, 2):
            op.error = None
            marks = len(tx.events), set(tx.fresh)
            cur.execute(self.sql.savepoint)
            try:
                op.result = op.fn(cur)
                self._insert_events(cur, tx)
            except Exception as exc:
                if not isinstance(exc, _DOMAIN_ERRORS) and not self.driver.refuses_statement(exc):
                    raise
                self._roll_back_op(cur, exc)
                del tx.events[marks[0]:]
                tx.fresh = marks[1]
                if attempt == 1 and isinstance(exc, self.driver.integrity_errors):
                    continue
                op.error = exc if isinstance(exc, _DOMAIN_ERRORS) else _refused(exc)
                return
            cur.execute(self.sql.release_savepoint)
            return

    def _roll_back_op(self, cur, exc):
        """Undo one op's writes. If the savepoint is gone, the refusal took the transaction
        with it: raise it for the driver to map (then each op runs alone); after a domain
        error, the rollback's own failure is the transaction's trouble."""
        try:
            cur.execute(self.sql.rollback_to_savepoint)
            cur.execute(self.sql.release_savepoint)
        except Exception:
            if isinstance(exc, _DOMAIN_ERRORS):
                raise
            log.debug("rolling back to an op's savepoint failed", exc_info=True)
            raise exc from None

    def _migrate(self):
        def migrate(cur):
            cur.execute(self.sql.version_table)
            cur.execute(self.sql.get_version)
            current = cur.fetchone()[0] or 0
            names = {}  # what an engine's own statement names: {exact}, looked up once
            for version in sorted(v for v in MIGRATIONS if v > current):
                for statement in MIGRATIONS[version]:
                    if not isinstance(statement, dict):
                        cur.execute(self.dialect.ddl(statement))
                    elif self.dialect.name in statement:
                        text = statement[self.dialect.name]
                        if "{exact}" in text and not names:
                            names["exact"] = self._exact_collation(cur)
                        cur.execute(text.format(**names))
                cur.execute(self.sql.set_version, (version,))
        self.driver.migrate(migrate)

    def _exact_collation(self, cur):
        """The MySQL server's NO PAD binary utf8mb4 collation (its name differs by server)."""
        cur.execute(MYSQL_EXACT_COLLATION)
        row = cur.fetchone()
        if row is None:
            raise JournalUnavailable("this MySQL server has no NO PAD binary collation "
                                     "(MariaDB 10.2 or MySQL 8.0.17 and later have one)")
        return row[0]

    def ping(self):
        """Raise JournalUnavailable unless the database answers; returns its clock in ms."""
        return self._read(lambda cur: _scalar(cur, self.sql.now))

    def writable(self) -> None:
        """Raise JournalRefusesWrites (a JournalUnavailable) if the journal refuses writes (a
        read-only file, directory or database server, a full disk), logging the cause once
        when that begins.

        The answer comes from one tiny write transaction, made through the group committer
        (so it shares a commit with whatever else is being written) at most every
        WRITE_PROBE_SECONDS; in between, callers get the last outcome, so a health check
        polled every second costs no fsync of its own."""
        checked_at, error = self._write_probe
        if (time.monotonic() - checked_at >= WRITE_PROBE_SECONDS
                and self._write_probe_lock.acquire(blocking=False)):
            try:
                error = self._probe_write(was_refusing=error is not None)
                self._write_probe = (time.monotonic(), error)
            finally:
                self._write_probe_lock.release()
        if error is not None:
            raise error

    def _probe_write(self, was_refusing):
        """None if a write commits, else the JournalUnavailable to raise (its cause chained)."""
        stamp = str(time.time_ns())  # a new value: an UPDATE that changes nothing writes nothing

        def op(cur):
            cur.execute(self.sql.touch_setting, (stamp, WRITE_PROBE))
            if cur.rowcount == 0:
                cur.execute(self.sql.add_setting, (WRITE_PROBE, stamp))
        try:
            self._write(op)
        except JournalUnavailable as exc:
            if not was_refusing:
                log.warning("the journal refuses writes: %s", root_cause(exc))
            refused = JournalRefusesWrites()
            refused.__cause__ = exc
            return refused
        if was_refusing:
            log.info("the journal takes writes again")
        return None

    def _now(self, cur):
        """The database's clock in ms: run_at and leases are compared with it."""
        if self.dialect.clock_is_local:
            return time.time_ns() // 1_000_000
        cur.execute(self.sql.now)
        return cur.fetchone()[0]

    def schema_version(self):
        """The schema version recorded in the database (SCHEMA_VERSION once opened)."""
        return self._read(lambda cur: _scalar(cur, self.sql.get_version))

    # --- submit -----------------------------------------------------------------------
    def insert_jobs(self, jobs):
        """Insert jobs (dicts of JOB_COLUMNS less the clock columns) in one transaction.

        `delay_ms` in a job sets its run_at after the database's now; `decoded_params`, the
        value its `params` text holds, spares the returned Job a decode. Returns a list of
        (Job, created) pairs; an idempotency key already used by the same owner with
        the same request_hash gives the existing job and created=False, with another
        hash IdempotencyConflict (and nothing of the batch is written). Params the database
        cannot take (too large once escaped) are InvalidJob, and nothing is written.
        """
        for job in jobs:
            try:
                self._refuse_oversize("'params'", job["params"])
            except WriteRefused as exc:
                raise InvalidJob(str(exc)) from None

        def op(cur):
            tx = self._tx
            if tx.now is None:
                tx.now = self._now(cur)
            out, fresh, keys = [], [], {}
            for job in jobs:
                key = (job["owner"], job.get("idempotency_key"))
                existing = self._find_idempotent(cur, job, keys.get(key) or tx.keys.get(key))
                if existing is not None:
                    out.append((existing, False))
                    continue
                row = dict(job, created_at=tx.now, run_at=tx.now + job.get("delay_ms", 0),
                           state="queued", attempts=0, lease_owner=None, lease_token=0,
                           lease_expires=None, crashes=0, progress=None, result=None, error=None,
                           cancel_requested=0, started_at=None, finished_at=None)
                row.pop("delay_ms", None)
                values = _job_values(row)
                made = Job.from_row(values, job.get("decoded_params"))
                if key[1] is not None:
                    keys[key] = made
                out.append((made, True))
                fresh.append(values)
                tx.fresh.add(made.id)
                tx.events.append((made.id, "state", _QUEUED))
            # nothing is written until every job of this submit passed: the batch's inserts
            # go in as one statement at the end of the transaction (isolated: here, inside
            # this op's savepoint)
            if not tx.isolated:
                tx.rows.extend(fresh)
            elif fresh:
                cur.executemany(self.sql.insert_job, fresh)
            tx.keys.update(keys)
            return out
        return self._write(op)

    def _find_idempotent(self, cur, job, pending=None):
        """The job already holding this submit's idempotency key (`pending`: one queued for
        insert in this transaction), or None; IdempotencyConflict if it was another request."""
        if job.get("idempotency_key") is None:
            return None
        existing = pending
        if existing is None:
            row = _fetch_one(cur, self.sql.find_idempotent, (job["owner"], job["idempotency_key"]))
            existing = None if row is None else Job.from_row(row)
        if existing is None:
            return None
        if existing.request_hash != job["request_hash"]:
            raise IdempotencyConflict(job["idempotency_key"], existing.id)
        return existing

    def count_queued(self):
        with waiting():  # a count over many queued rows is a long read: let polls pass meanwhile
            return self._read(lambda cur: _scalar(cur, self.sql.count_queued))

    def job_gauges(self):
        """{state: (jobs in it, for queued the age in ms of the job due longest or None)} for
        each unfinished state that has jobs: an index range, for a scrape every few seconds."""
        with waiting():  # many queued jobs make a long read: let polls pass meanwhile
            rows = self._read(lambda cur: _fetch_all(cur, self.sql.job_gauges))
        return {State(state): (int(count), None if age is None else int(age)) for state, count, age in rows}

    def observe_commits(self, observer):
        """`observer(seconds, operations)` after each group-commit batch (committed or not),
        on the committer thread: it must be quick. None removes it."""
        self._writer.observer = observer

    # --- reads ------------------------------------------------------------------------
    def get_job(self, job_id):
        """The Job, or None."""
        row = self._read(lambda cur: _fetch_one(cur, self.sql.get_job, (job_id,)))
        return None if row is None else _decode(row)

    def get_job_and_steps(self, job_id):
        """(Job, its steps in order) — the poll path — or (None, []).

        On one connection: the job's row, saying whether it has steps, then (if it has)
        their four narrow columns. A join would copy the job's documents into every step's
        row; a second statement for every poll would cost MySQL a round trip."""
        def read(cur):
            row = _fetch_one(cur, self.sql.get_job_has_steps, (job_id,))
            if row is None:
                return None, ()
            return row[:-1], (_fetch_all(cur, self.sql.job_steps, (job_id,)) if row[-1] else ())
        row, steps = self._read(read)
        if row is None:
            return None, []
        return _decode(row), [StepSummary._make(step) for step in steps]

    def get_steps(self, job_id):
        """Every step of a job in order, as dicts of their columns (result and error as the
        stored JSON text)."""
        return self._read(lambda cur: _dicts(cur, self.sql.get_steps, (job_id,)))

    def get_step(self, job_id, name):
        return self._read(lambda cur: _dict(cur, self.sql.get_step, (job_id, name)))

    def list_jobs(self, owner=None, state=None, task=None, before=None, limit=50, with_steps=True,
                  max_bytes=None):
        """A Page of jobs newest first, filtered; `before` is the id to continue below (a cursor).

        The page holds at most `limit` jobs, and with `max_bytes` stops before the job whose
        JSON documents would take it past that many characters (it holds one job at least);
        `next` is then the cursor of the rest. Memory follows the page, not `limit`: the
        candidates' ids and stored sizes are read first, then only the rows of the page."""
        key = (owner is not None, state is not None, task is not None, before is not None)
        args = tuple(v for v in (owner, state, task, before) if v is not None) + (limit + 1,)

        def read(cur):
            sizes = _fetch_all(cur, self.sql.list_sizes[key], args)
            ids, total = [], 0
            for job_id, size in sizes[:limit]:
                total += size
                if ids and max_bytes is not None and total > max_bytes:
                    break
                ids.append(job_id)
            jobs, steps = [], {}
            for start in range(0, len(ids), MAX_IDS):
                chunk = ids[start:start + MAX_IDS]
                cur.execute(self.sql.page_jobs(len(chunk)), chunk)
                # row by row (fetchone): each row's text is let go once it is decoded
                jobs.extend(Job.from_row(row) for row in iter(cur.fetchone, None))
                if with_steps:
                    for job_id, *step in _fetch_all(cur, self.sql.page_steps(len(chunk)), chunk):
                        steps.setdefault(job_id, []).append(StepSummary(*step))
            return Page(jobs, steps, ids[-1] if len(ids) < len(sizes) else None)
        with waiting():  # a page of big results is a long read: let polls pass meanwhile
            return self._read(read)

    # --- events -----------------------------------------------------------------------
    def job_events(self, job_id, after=0, limit=EVENT_PAGE):
        """The job's events numbered above `after`, in order: at most `limit` EventRows."""
        rows = self._read(lambda cur: _fetch_all(cur, self.sql.job_events, (job_id, after, limit)))
        return [EventRow(*row) for row in rows]

    def last_seq(self, job_id):
        """The number of the job's last event (0: none)."""
        return self._read(lambda cur: _scalar(cur, self.sql.last_seq, (job_id,))) or 0

    def last_event_id(self):
        """The highest event id (0: none yet)."""
        return self._read(lambda cur: _scalar(cur, self.sql.last_event_id)) or 0

    def event_ids_after(self, after, limit=EVENT_PAGE):
        """The ids of events above `after`, in order (a reader's starting view of them)."""
        return [row[0] for row in self._read(
            lambda cur: _fetch_all(cur, self.sql.event_ids_after, (after, limit)))]

    def events_after(self, after, limit=EVENT_PAGE, scoped=False):
        """Every job's events above id `after`, in id order; `scoped`, with their jobs'
        owner, task and state (to filter a stream by)."""
        sql = self.sql.scoped_events_after if scoped else self.sql.events_after
        return [EventRow(*row) for row in self._read(
            lambda cur: _fetch_all(cur, sql, (after, limit)))]

    def events_between(self, low, high, limit=EVENT_PAGE, scoped=False):
        """Events with ids from `low` to `high` (both included), in id order."""
        sql = self.sql.scoped_events_between if scoped else self.sql.events_between
        return [EventRow(*row) for row in self._read(
            lambda cur: _fetch_all(cur, sql, (low, high, limit)))]

    # --- claim, lease, finish ---------------------------------------------------------
    def claim(self, node, limit, lease_ms):
        """Take up to `limit` due queued jobs for `node`, best priority first, in one transaction.

        Each claimed job is `running` with a new lease token and one more attempt; the
        returned Jobs carry the values now in the table (but lease_expires and started_at)."""
        def op(cur):
            rows = _fetch_all(cur, self.sql.claim_select, (limit,))
            if not rows:
                return []
            cur.execute(self.sql.claim_update(len(rows)), (node, lease_ms, *[r[_ID] for r in rows]))
            claimed = []
            for row in rows:
                try:
                    claimed.append(_claimed(row, node))
                except (ValueError, KeyError, TypeError) as exc:
                    # a row this code cannot read (a document that is not JSON, a state it does
                    # not know) fails alone: failing the claim would stop every claim behind it
                    self._fail_unreadable(cur, row, exc)
            events = self._tx.events
            for job in claimed:
                events.append((job.id, "state", data_state(State.RUNNING, attempt=job.attempts)))
            return claimed
        return self._write(op)

    def _fail_unreadable(self, cur, row, exc):
        """End a just-claimed job whose row cannot be decoded as failed (CorruptJob)."""
        log.error("job %s cannot be read (%s: %s); failing it", row[_ID], type(exc).__name__, exc)
        error = dumps({"type": "CorruptJob", "message": "the journal's row of this job cannot be read"})
        cur.execute(self.sql.finish, (State.FAILED.value, None, error, row[_ID], row[_LEASE_TOKEN] + 1))

    def renew(self, leases, lease_ms, node):
        """Extend the leases [(id, token)] this node holds.

        Returns (lost, cancel): ids whose lease is gone, ids whose cancel was requested."""
        def op(cur):
            lost = set()
            for job_id, token in leases:
                cur.execute(self.sql.renew, (lease_ms, job_id, token))
                if cur.rowcount == 0:
                    lost.add(job_id)
            cur.execute(self.sql.cancel_flags, (node,))
            return lost, {row[0] for row in cur.fetchall()}
        return self._write(op)

    def set_progress(self, job_id, token, progress):
        """Record progress without waiting for the commit (a lost note is harmless).

        Notes coalesce: while one is queued, a newer note replaces it, so a task that
        reports in a tight loop costs one UPDATE per commit, not one per call."""
        key = (job_id, token)
        text = dumps(progress, MAX_DOCUMENT)
        self._refuse_oversize("the progress note", text)
        with self._progress_lock:
            queued = key in self._progress
            self._progress[key] = text
        if queued:
            return
        taken = []

        def op(cur):
            if not taken:  # a batch may run twice; keep the note it first took
                with self._progress_lock:
                    taken.append(self._progress.pop(key))
            cur.execute(self.sql.progress, (taken[0], job_id, token))
            if cur.rowcount:
                self._progress_event(key, taken[0])

        def on_done(_result, error):
            if error is None:
                return
            log.warning("progress note of job %s not written: %s", job_id, error)
            if not taken:
                # the transaction failed before the op took its note: drop the note, or it
                # would stay marked as queued and every later note would be dropped too
                with self._progress_lock:
                    self._progress.pop(key, None)
        try:
            self._writer.cast(op, on_done)
        except ServerClosed:
            with self._progress_lock:
                self._progress.pop(key, None)
            raise

    def _progress_event(self, key, text):
        """Journal a run's progress event, or owe it if the run journaled one less than
        PROGRESS_EVENT_EVERY ago: the newest owed note is journaled when the time is up,
        or before the run's next event, whichever comes first (ops only)."""
        now = time.monotonic()
        last = self._progress_at.get(key)
        if last is None or now - last >= PROGRESS_EVENT_EVERY:
            if len(self._progress_at) >= 4096:  # runs ended elsewhere leave theirs: drop the stale
                self._progress_at = {k: t for k, t in self._progress_at.items()
                                     if now - t < PROGRESS_EVENT_EVERY}
            self._progress_at[key] = now
            self._owed.pop(key, None)
            self._event(key[0], "progress", data_progress(text))
            return
        if key not in self._owed:
            self._timer.at(last + PROGRESS_EVENT_EVERY, functools.partial(self._pay_later, key))
        self._owed[key] = text

    def _pay_owed(self, key, ending=False):
        """Before another event of the run: journal the progress event it owes, if any;
        `ending`, the run ends here and its rate state goes (ops only)."""
        if ending:
            self._progress_at.pop(key, None)
        if self._owed:
            text = self._owed.pop(key, None)
            if text is not None:
                self._event(key[0], "progress", data_progress(text))

    def _pay_later(self, key):
        """The timer's half of _progress_event: a write that journals what the run owes,
        if it still owes it and still holds the job (the progress UPDATE is its fence)."""
        def op(cur):
            text = self._owed.get(key)
            if text is None:
                return
            cur.execute(self.sql.progress, (text, *key))
            if cur.rowcount:
                self._progress_event(key, text)
            else:
                self._owed.pop(key, None)
        try:
            self._writer.cast(op)
        except ServerClosed:
            pass  # closing: the note is in the job's row; its event is lost with the stream

    def _fence(self, cur, job_id, token):
        cur.execute(self.sql.touch, (job_id, token))
        if cur.rowcount == 0:
            raise LeaseLost(job_id)

    def finish(self, job_id, token, state, result=None, error=None, callback=False, on_done=None):
        """End a run in a terminal state; with `callback` (the job has a callback_url), write
        its callback delivery, under an id minted here, in the same transaction.

        Raises (or, with `on_done`, reports) LeaseLost if this run no longer holds the job;
        raises WriteRefused at once if the database cannot take the result."""
        state = State(state)
        if state not in TRANSITIONS[Action.FINISH].targets:
            raise ValueError(f"a run ends succeeded, failed or cancelled, not {state.value}")
        result_text = None if result is None else dumps(result)
        error_text = None if error is None else dumps(error)
        self._refuse_oversize("the job's result", result_text, error_text)

        error_type = None if error is None else error.get("type")

        def op(cur):
            cur.execute(self.sql.finish, (state.value, result_text, error_text, job_id, token))
            if cur.rowcount == 0:
                raise LeaseLost(job_id)
            delivery = None
            if callback:
                cur.execute(self.sql.add_callback, (new_callback_id(), job_id))
                delivery = "pending" if cur.rowcount else None
            self._pay_owed((job_id, token), ending=True)
            self._event(job_id, "state", data_state(state, error_type=error_type, callback=delivery))
        self._write(op, on_done)

    def requeue(self, job_id, token, delay_ms, error, on_done=None):
        """Put a failed run back in the queue for a retry after `delay_ms`."""
        text = dumps(error)
        self._refuse_oversize("the job's error", text)

        data = data_state(State.QUEUED, error_type=error.get("type"))

        def op(cur):
            cur.execute(self.sql.requeue, (text, delay_ms, job_id, token))
            if cur.rowcount == 0:
                raise LeaseLost(job_id)
            self._pay_owed((job_id, token), ending=True)
            self._event(job_id, "state", data)
        self._write(op, on_done)

    def give_back(self, job_id, token):
        """Return a job this node will not finish (shutdown) to the queue; its attempt is not counted."""
        def op(cur):
            cur.execute(self.sql.give_back, (job_id, token))
            if cur.rowcount != 1:
                return False
            self._pay_owed((job_id, token), ending=True)
            self._event(job_id, "state", _QUEUED)
            return True
        return self._write(op)

    def give_back_unknown(self, node: str, known: set) -> list:
        """Give back the jobs held under `node` whose (id, lease token) is not in `known`, with
        neither their attempt nor a crash counted; returns their ids.

        A claim whose COMMIT reached the server but whose reply was lost committed jobs that
        nothing runs: left alone they would wait out their lease and count a crash each."""
        def op(cur):
            cur.execute(self.sql.held_by, (node,))
            released = []
            for job_id, token, _crashes in cur.fetchall():
                if (job_id, token) not in known:
                    cur.execute(self.sql.give_back, (job_id, token))
                    if cur.rowcount:
                        released.append(job_id)
                        self._event(job_id, "state", _QUEUED)
            return released
        return self._write(op)

    def recover(self, max_crashes, worker_lost_error, owner=None):
        """Requeue running jobs whose lease expired (or, with `owner`, that a dead node held).

        A job's crash count goes up by one; at `max_crashes` it fails with `worker_lost_error`
        instead (and its callback delivery is written). Returns a Recovery."""
        error_text = dumps(worker_lost_error)
        lost_type = worker_lost_error.get("type")
        requeued_data = data_state(State.QUEUED, error_type=lost_type)

        def op(cur):
            if owner is None:
                cur.execute(self.sql.expired)
            else:
                cur.execute(self.sql.held_by, (owner,))
            requeued, failed, with_callback = [], [], set()
            for job_id, token, crashes in cur.fetchall():
                if crashes + 1 >= max_crashes:
                    cur.execute(self.sql.crash_fail, (error_text, job_id, token))
                    if cur.rowcount:
                        failed.append(job_id)
                        cur.execute(self.sql.add_callback, (new_callback_id(), job_id))
                        if cur.rowcount:
                            with_callback.add(job_id)
                        self._event(job_id, "state", data_state(
                            State.FAILED, error_type=lost_type,
                            callback="pending" if job_id in with_callback else None))
                else:
                    cur.execute(self.sql.crash_requeue, (job_id, token))
                    if cur.rowcount:
                        requeued.append(job_id)
                        self._event(job_id, "state", requeued_data)
            return Recovery(requeued, failed, frozenset(with_callback))
        return self._write(op)

    def running_owners(self):
        """The lease owners of every running job (to find dead nodes on this host)."""
        return self._read(lambda cur: [r[0] for r in _fetch_all(cur, self.sql.running_owners)])

    # --- steps ------------------------------------------------------------------------
    def start_step(self, job_id, token, name, seq):
        """Mark a step running (queued with the next commit, not awaited)."""
        data = data_step(name, "running")

        def op(cur):
            self._fence(cur, job_id, token)
            cur.execute(self.sql.start_step, (job_id, name, seq))
            self._pay_owed((job_id, token))
            self._event(job_id, "step", data)
        self._writer.cast(op)

    def end_step(self, job_id, token, name, state, result=None, error=None, seq=0, elapsed_ms=0):
        """Record a step's outcome; returns once committed, else raises (LeaseLost if fenced out,
        WriteRefused if the database cannot take its result).

        The start record was not awaited and may have failed: then this writes the whole
        row (`seq`, started `elapsed_ms` ago), so a step that returned is always recorded."""
        result_text = None if result is None else dumps(result)
        error_text = None if error is None else dumps(error)
        self._refuse_oversize(f"the result of step {name!r}", result_text, error_text)

        data = data_step(name, state)

        def op(cur):
            self._fence(cur, job_id, token)
            cur.execute(self.sql.end_step, (state, result_text, error_text, job_id, name))
            if cur.rowcount == 0:
                cur.execute(self.sql.add_step, (job_id, name, seq, state, result_text, error_text,
                                                max(0, int(elapsed_ms))))
            self._pay_owed((job_id, token))
            self._event(job_id, "step", data)
        self._write(op)

    # --- user actions -----------------------------------------------------------------
    def cancel(self, job_id):
        """Cancel a queued job at once (its callback delivery written, under an id minted
        here), or flag a running one. Returns the state the job is now in.

        Raises InvalidTransition for a finished job, or with state None when there is no such job."""
        def op(cur):
            # guarded UPDATEs, not a SKIP LOCKED read: a running job's row is often locked
            # for a moment by its own node's heartbeat or progress note, and must not look absent
            cur.execute(self.sql.cancel_queued, (job_id,))
            if cur.rowcount:
                cur.execute(self.sql.add_callback, (new_callback_id(), job_id))
                self._event(job_id, "state", data_state(
                    State.CANCELLED, callback="pending" if cur.rowcount else None))
                return State.CANCELLED
            cur.execute(self.sql.cancel_running, (job_id,))
            if cur.rowcount:
                return State.RUNNING
            raise InvalidTransition(job_id, _scalar(cur, self.sql.state_of, (job_id,)), "cancel")
        return self._write(op)

    def retry(self, job_id):
        """Queue a failed or cancelled job again under the same id."""
        def op(cur):
            cur.execute(self.sql.retry, (job_id,))
            if cur.rowcount == 0:
                raise InvalidTransition(job_id, _scalar(cur, self.sql.state_of, (job_id,)), "retry")
            self._event(job_id, "state", _QUEUED)
        self._write(op)

    # --- callbacks --------------------------------------------------------------------
    def latest_callback(self, job_id):
        return self._read(lambda cur: _dict(cur, self.sql.latest_callback, (job_id,)))

    def callbacks_due(self):
        """True if a pending delivery is due; a read, so an idle deliverer takes no write lock."""
        return self._read(lambda cur: _fetch_one(cur, self.sql.any_callback_due)) is not None

    def claim_callbacks(self, limit, lease_ms, choose=None):
        """Take due pending deliveries; each is hidden from other deliverers for `lease_ms`.

        `choose(rows)`, given up to `limit` due rows (soonest first), may pick: it returns
        (take, later, later_ms), the rows to claim and rows to put off by `later_ms` (hidden
        as a claim hides them, not returned). It runs inside the transaction: it must be
        quick, and it may run again if the transaction is retried."""
        def op(cur):
            rows = _dicts(cur, self.sql.due_callbacks, (limit,))
            take, later, later_ms = (rows, (), 0) if choose is None else choose(rows)
            for row in later:
                cur.execute(self.sql.claim_callback, (later_ms, row["id"]))
            for row in take:
                cur.execute(self.sql.claim_callback, (lease_ms, row["id"]))
                row["claim_token"] += 1
            return take
        return self._write(op)

    def record_callback(self, callback_id, token, state, last_error=None, retry_in_ms=0):
        """Record one delivery attempt: state 'delivered', 'failed', or 'pending' (retry later)."""
        def op(cur):
            cur.execute(self.sql.record_callback,
                        (state, last_error, retry_in_ms, state, callback_id, token))
            if cur.rowcount != 1:
                return False
            job_id, attempts = _fetch_one(cur, self.sql.callback_of, (callback_id,))
            self._callback_event(cur, job_id, state, attempts)
            return True
        return self._write(op)

    def _callback_event(self, cur, job_id, state, attempts):
        # the job's last seq is read under its row lock, as for every other event
        if _fetch_one(cur, self.sql.lock_job, (job_id,)) is not None:
            self._event(job_id, "callback", data_callback(state, attempts))

    def rearm_callback(self, job_id):
        """Make a job's failed delivery pending again; returns False if there is none failed."""
        def op(cur):
            row = _dict(cur, self.sql.latest_callback, (job_id,))
            if row is None:
                return False
            cur.execute(self.sql.rearm_callback, (row["id"],))
            if cur.rowcount != 1:
                return False
            self._callback_event(cur, job_id, "pending", 0)
            return True
        return self._write(op)

    # --- tokens, settings ---------------------------------------------------------------
    def add_token(self, name, token_hash, admin):
        def op(cur):
            try:
                cur.execute(self.sql.add_token, (name, token_hash, int(admin)))
            except self.driver.integrity_errors:
                raise TokenExists(name) from None
        self._write(op)

    def find_token(self, token_hash):
        """(name, admin) for a token hash, or None."""
        row = self._read(lambda cur: _fetch_one(cur, self.sql.find_token, (token_hash,)))
        return None if row is None else (row[0], bool(row[1]))

    def has_tokens(self):
        return self._read(lambda cur: _scalar(cur, self.sql.count_tokens)) > 0

    def setting(self, name, default_factory=None):
        """A stored setting; with `default_factory`, store its value first if none exists."""
        def read(cur):
            return _scalar(cur, self.sql.get_setting, (name,))
        value = self._read(read)
        if value is None and default_factory is not None:
            fresh = default_factory()
            self._write(lambda cur: cur.execute(self.sql.add_setting, (name, fresh)))
            value = self._read(read)  # another process may have won the race
        return value

    # --- the user's own rows ------------------------------------------------------------
    @contextmanager
    def transaction(self):
        """A transaction of your own on the journal's database, for task code that keeps
        its own rows beside the jobs (demo.py's `projects`)::

            with ctx.journal.transaction() as tx:
                tx.cursor.execute(tx.sql("INSERT INTO mine (a, b) VALUES (?, ?)"), (a, b))

        Commits when the block ends; rolls back and re-raises when it raises (the driver's
        own errors, for your statements, pass unchanged). See UserTransaction. It runs on a
        connection of its own, outside the journal's shared transactions: keep it short
        (on SQLite it holds the database's one write lock until it ends)."""
        if self._closed:
            raise ServerClosed("the journal is closed")
        with self.driver.transaction() as cur:
            yield UserTransaction(cur, self.driver.paramstyle, self.dialect.name, self.dialect.translate)

    # --- the dashboard: overview, delete, bulk ----------------------------------------
    def stats(self, owner=None, sample=2000, day=True):
        """What the overview shows, read at the journal's clock (`now`, ms): unfinished jobs
        by state, finished ones by state in the last hour and day ({"hour": {state: n},
        "day": ...}), finished per minute and state since `minutes_from` (the start of the
        minute 59 minutes ago) as [(minute, {state: n})], jobs submitted in the last hour,
        and the newest `sample` runs of the last hour. `day=False` skips the day's counts
        (the one read that grows with a whole day of jobs: callers may keep it a while).

        Every read is a range of an index (jobs_finished, the primary key, jobs_owner),
        so its cost follows the hour's and the day's jobs, not the table's size."""
        own = () if owner is None else (owner,)
        suffix = "" if owner is None else "_owner"
        sql = self.sql

        def read(cur):
            now = self._now(cur)
            hour, day_from = now - 3_600_000, now - 86_400_000
            minutes_from = (now // 60_000 - 59) * 60_000
            cur.execute(getattr(sql, "stats_unfinished" + suffix), own)
            unfinished = {state: int(n) for state, n in cur.fetchall()}
            finished = {}
            for window, since in (("hour", hour), ("day", day_from))[:2 if day else 1]:
                cur.execute(getattr(sql, "stats_finished" + suffix), (since, *own))
                finished[window] = dict(zip(ENDED, (int(n or 0) for n in cur.fetchone())))
            cur.execute(getattr(sql, "stats_minutes" + suffix), (minutes_from, *own))
            minutes = [(int(m), dict(zip(ENDED, (int(n or 0) for n in counts))))
                       for m, *counts in cur.fetchall()]
            since = lowest_id_at(hour)
            if owner is None:
                cur.execute(sql.stats_submitted, (since,))
            else:
                cur.execute(sql.stats_submitted_owner, (owner, since))
            submitted = int(cur.fetchone()[0])
            cur.execute(getattr(sql, "stats_runs" + suffix), (hour, *own, sample))
            runs = cur.fetchall()
            return {"now": now, "unfinished": unfinished, "finished": finished,
                    "minutes_from": minutes_from, "minutes": minutes,
                    "submitted_hour": submitted, "runs": runs, "sample": sample}
        with waiting():  # several index ranges: let polls pass meanwhile
            return self._read(read)

    def delete_job(self, job_id):
        """Forget a terminal job: its row, steps, callback deliveries and events, in one
        transaction.

        Raises InvalidTransition if it is not terminal (state None: there is no such job)."""
        def op(cur):
            if not self._delete_one(cur, job_id):
                raise InvalidTransition(job_id, _scalar(cur, self.sql.state_of, (job_id,)), "delete")
        self._write(op)

    def _delete_one(self, cur, job_id):
        cur.execute(self.sql.delete_job, (job_id,))
        if cur.rowcount == 0:
            return False
        cur.execute(self.sql.delete_steps, (job_id,))
        cur.execute(self.sql.delete_callbacks, (job_id,))
        cur.execute(self.sql.delete_events, (job_id, _scalar(cur, self.sql.last_event_id) or 0))
        self._tx.deleted.add(job_id)  # an event of it queued in this transaction is dropped
        return True

    def bulk_page(self, owner=None, state=None, task=None, before=None, ids=None, limit=1000):
        """[(id, state)] of the jobs a bulk action names, newest first: the filter's next
        `limit` below `before`, or those of `ids` that pass the filter."""
        def read(cur):
            if ids is None:
                key = (owner is not None, state is not None, task is not None, before is not None)
                args = tuple(v for v in (owner, state, task, before) if v is not None) + (limit,)
                cur.execute(self.sql.bulk_page[key], args)
                return [(row[0], row[2]) for row in cur.fetchall()]
            if not ids:
                return []
            cur.execute(self.sql.bulk_by_ids(len(ids)), tuple(ids))
            return [(i, s) for i, o, s, t in cur.fetchall()
                    if (owner is None or o == owner) and (state is None or s == state)
                    and (task is None or t == task) and (before is None or i < before)][:limit]
        with waiting():
            return self._read(read)

    def bulk(self, action, job_ids):
        """Apply `action` (cancel, retry, delete) to each of `job_ids` in one transaction,
        each change guarded by the job's state as the single-job action is.

        Returns (changed, with_callback): {id: outcome} for the jobs it changed (for cancel
        the new state: cancelled, or running with cancel requested; for retry 'queued', for
        delete 'deleted'), and the ids of the cancelled jobs whose delivery was written."""
        sql = self.sql

        def op(cur):
            changed, with_callback = {}, set()
            for job_id in job_ids:
                if action == "cancel":
                    cur.execute(sql.cancel_queued, (job_id,))
                    if cur.rowcount:
                        cur.execute(sql.add_callback, (new_callback_id(), job_id))
                        if cur.rowcount:
                            with_callback.add(job_id)
                        changed[job_id] = State.CANCELLED
                        self._event(job_id, "state", data_state(
                            State.CANCELLED, callback="pending" if job_id in with_callback else None))
                        continue
                    cur.execute(sql.cancel_running, (job_id,))
                    if cur.rowcount:
                        changed[job_id] = State.RUNNING
                elif action == "retry":
                    cur.execute(sql.retry, (job_id,))
                    if cur.rowcount:
                        changed[job_id] = State.QUEUED
                        self._event(job_id, "state", _QUEUED)
                elif action == "delete":
                    if self._delete_one(cur, job_id):
                        changed[job_id] = "deleted"
                else:
                    raise ValueError(f"unknown bulk action {action!r}")
            return changed, frozenset(with_callback)
        return self._write(op)


def _refused(exc):
    """WriteRefused for an op the database (or the driver) refused for good."""
    error = WriteRefused(f"the journal refused the write ({type(exc).__name__}: {str(exc)[:300]})")
    error.__cause__ = exc
    return error


def root_cause(exc):
    """The innermost cause of `exc`, as text: the driver's own words for what failed."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return str(exc) or type(exc).__name__


def open_journal(url, **options):
    """Open (creating or migrating) the journal at `url`: sqlite:///path or mysql://user:pw@host/db."""
    return Journal(drivers.connect(url, **options))
