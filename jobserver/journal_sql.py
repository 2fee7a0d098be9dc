"""The journal's SQL text: the schema and its migrations, and every statement (`Sql`).

Statements are written once with `?` markers and translated once, when a Journal opens,
for the driver's paramstyle. Only dialect constants (the clock, the row-lock suffix,
column types) are formatted in; every value is a bound parameter. Nothing here runs SQL:
`journal.Journal` does.
"""

from .model import JOB_FIELDS, TERMINAL, TRANSITIONS, Action, State

SCHEMA_VERSION = 4

JOB_COLUMNS = JOB_FIELDS  # every SELECT of a job lists these, in this order: Job.from_row reads them so
_COLS = ", ".join(JOB_COLUMNS)
#: the most ids one statement binds (a list page's rows are read in runs of this many)
MAX_IDS = 64
#: the terminal states in the order of the dashboard's per-state sums
ENDED = tuple(state.value for state in State if state in TERMINAL)


def leaving(action, column="state"):
    """`state = 'x'` (or `state IN (...)`): the states `action` may start from, as the table
    TRANSITIONS says. Only the table's constants are formatted in."""
    names = sorted(f"'{state.value}'" for state in TRANSITIONS[action].sources)
    return f"{column} = {names[0]}" if len(names) == 1 else f"{column} IN ({', '.join(names)})"


def entering(action):
    """`state = 'x'`: the one state `action` leads to (FINISH's is bound: it has three)."""
    [target] = TRANSITIONS[action].targets
    return f"state = '{target.value}'"

# --- schema ---------------------------------------------------------------------------
# A text entry runs on every engine: {text} is a column for JSON documents, {opts} the table
# options, both from the dialect. A dict entry is one engine's own statement, by dialect name.
MIGRATIONS = {
    1: [
        """CREATE TABLE IF NOT EXISTS jobs (
            id VARCHAR(36) NOT NULL PRIMARY KEY,
            task VARCHAR(200) NOT NULL,
            owner VARCHAR(190) NOT NULL,
            state VARCHAR(16) NOT NULL CHECK (state IN
                ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
            params {text} NOT NULL,
            priority INTEGER NOT NULL DEFAULT 0,
            attempts INTEGER NOT NULL DEFAULT 0,
            max_retries INTEGER NOT NULL DEFAULT 0,
            timeout DOUBLE PRECISION NULL,
            run_at BIGINT NOT NULL,
            lease_owner VARCHAR(120) NULL,
            lease_token BIGINT NOT NULL DEFAULT 0,
            lease_expires BIGINT NULL,
            crashes INTEGER NOT NULL DEFAULT 0,
            progress {text} NULL,
            result {text} NULL,
            error {text} NULL,
            cancel_requested INTEGER NOT NULL DEFAULT 0,
            callback_url VARCHAR(2048) NULL,
            idempotency_key VARCHAR(190) NULL,
            request_hash CHAR(64) NULL,
            created_at BIGINT NOT NULL,
            started_at BIGINT NULL,
            finished_at BIGINT NULL
        ){opts}""",
        "CREATE INDEX jobs_claim ON jobs (state, priority DESC, run_at, id)",
        "CREATE INDEX jobs_owner ON jobs (owner, id)",
        "CREATE UNIQUE INDEX jobs_idempotency ON jobs (owner, idempotency_key)",
        """CREATE TABLE IF NOT EXISTS steps (
            job_id VARCHAR(36) NOT NULL,
            name VARCHAR(190) NOT NULL,
            seq INTEGER NOT NULL,
            state VARCHAR(16) NOT NULL CHECK (state IN ('running', 'succeeded', 'failed')),
            result {text} NULL,
            error {text} NULL,
            started_at BIGINT NOT NULL,
            finished_at BIGINT NULL,
            PRIMARY KEY (job_id, name)
        ){opts}""",
        """CREATE TABLE IF NOT EXISTS callbacks (
            id VARCHAR(64) NOT NULL PRIMARY KEY,
            job_id VARCHAR(36) NOT NULL,
            url VARCHAR(2048) NOT NULL,
            state VARCHAR(16) NOT NULL CHECK (state IN ('pending', 'delivered', 'failed')),
            attempts INTEGER NOT NULL DEFAULT 0,
            next_at BIGINT NOT NULL,
            claim_token BIGINT NOT NULL DEFAULT 0,
            last_error VARCHAR(500) NULL,
            delivered_at BIGINT NULL,
            created_at BIGINT NOT NULL
        ){opts}""",
        "CREATE INDEX callbacks_due ON callbacks (state, next_at)",
        "CREATE INDEX callbacks_job ON callbacks (job_id, created_at)",
        """CREATE TABLE IF NOT EXISTS tokens (
            name VARCHAR(190) NOT NULL PRIMARY KEY,
            token_hash CHAR(64) NOT NULL UNIQUE,
            admin INTEGER NOT NULL DEFAULT 0,
            created_at BIGINT NOT NULL
        ){opts}""",
        """CREATE TABLE IF NOT EXISTS settings (
            name VARCHAR(190) NOT NULL PRIMARY KEY,
            value {text} NOT NULL
        ){opts}""",
        # until version 0.1 this migration also made the demo's `projects` table; journals
        # made then keep it (and its rows): demo.py creates the same table when it is missing
    ],
    # MySQL's utf8mb4_bin is PAD SPACE: 'k' and 'k ' compared equal, so the unique index made
    # them one idempotency key (and 'alice ' listed alice's jobs, step 'a ' replayed step 'a').
    # Every table moves to the server's NO PAD binary collation ({exact}: utf8mb4_nopad_bin on
    # MariaDB, utf8mb4_0900_bin on MySQL 8), which compares as SQLite's BINARY already does.
    # This rebuilds each table once: on a large journal it takes a while, under a lock.
    # (The demo's `projects` table, which journals made by version 1 hold, is the demo's
    # own now: its collation is left alone.)
    2: [{"mysql": f"ALTER TABLE {table} CONVERT TO CHARACTER SET utf8mb4 COLLATE {{exact}}"}
        for table in ("jobs", "steps", "callbacks", "tokens", "settings")],
    # 3: the dashboard at a million jobs.
    # jobs_finished: the overview reads finished jobs by time; counts by state of the last
    # hour or day and of the unfinished jobs (finished_at NULL) come from this index alone,
    # without touching rows, an owner's too. jobs_task: a list filtered by task reads one
    # page of the index, newest first, instead of scanning the table for a task that has
    # few jobs (a task never changes, so only a submit pays for this index). A (state, id)
    # index would do the same for a state filter, but claims and finishes would pay for it.
    3: [
        # SQLite: only finished jobs are in it (a partial index), so a claim, which changes the
        # state of an unfinished job, does not rewrite an entry of it: with every job in it the
        # index cost a tenth of the no-op throughput. MySQL has no partial indexes.
        {"sqlite": "CREATE INDEX jobs_finished ON jobs (finished_at, state, owner) "
                   "WHERE finished_at IS NOT NULL",
         "mysql": "CREATE INDEX jobs_finished ON jobs (finished_at, state, owner)"},
        "CREATE INDEX jobs_task ON jobs (task, id)",
    ],
    # 4: what happened to each job, for the event streams (eventlog.py, streams.py), written
    # in the transaction of the change it reports and deleted with its job. `id` orders
    # every job's events; it is assigned at insert, so on MySQL a lower id may commit after
    # a higher one (eventcursor.py reads with that in mind). `seq` numbers one job's events
    # from 1 in commit order: the writer holds the job's row lock when it reads the last one.
    # No CHECK on `kind`: a new kind of event (children) needs no migration.
    4: [
        """CREATE TABLE IF NOT EXISTS events (
            id {autoid},
            job_id VARCHAR(36) NOT NULL,
            seq INTEGER NOT NULL,
            kind VARCHAR(16) NOT NULL,
            data {text} NOT NULL
        ){opts}""",
        "CREATE UNIQUE INDEX events_job ON events (job_id, seq)",
        {"mysql": "ALTER TABLE events CONVERT TO CHARACTER SET utf8mb4 COLLATE {exact}"},
    ],
}

# {exact} of a MySQL migration: the server's NO PAD binary utf8mb4 collation
MYSQL_EXACT_COLLATION = (
    "SELECT COLLATION_NAME FROM information_schema.COLLATIONS "
    "WHERE COLLATION_NAME IN ('utf8mb4_nopad_bin', 'utf8mb4_0900_bin') ORDER BY COLLATION_NAME DESC")


class Sql:
    """Every statement, written once with `?` markers; `now` is the database clock in ms.

    A statement that changes a job's state takes its `WHERE state ...` test and its new
    state from model.TRANSITIONS (`leaving`, `entering`), named by the action it makes."""

    def __init__(self, dialect):
        now, lock = dialect.now_ms, dialect.lock_rows
        q = self._q = dialect.translate
        self.now = q(f"SELECT {now}")
        self.insert_job = q(f"INSERT INTO jobs ({_COLS}) VALUES ({', '.join('?' * len(JOB_COLUMNS))})")
        self.find_idempotent = q(f"SELECT {_COLS} FROM jobs WHERE owner = ? AND idempotency_key = ?")
        self.get_job = q(f"SELECT {_COLS} FROM jobs WHERE id = ?")
        # the poll path: the job's row and whether it has steps to read (most have none:
        # then one round trip is all a poll costs)
        self.get_job_has_steps = q(
            f"SELECT {_COLS}, EXISTS (SELECT 1 FROM steps WHERE steps.job_id = jobs.id) FROM jobs WHERE id = ?")
        self.job_steps = q("SELECT name, state, started_at, finished_at FROM steps WHERE job_id = ? ORDER BY seq")
        queued, running = State.QUEUED.value, State.RUNNING.value
        self.count_queued = q(f"SELECT COUNT(*) FROM jobs WHERE state = '{queued}'")
        # /metrics' gauges, read every few seconds: per unfinished state its count and (queued)
        # the age in ms of the job due longest. Only state and run_at: one range of the
        # covering index jobs_claim, never the table (tests/test_metrics.py checks the plans)
        unfinished = ", ".join(sorted(f"'{state.value}'" for state in State if state not in TERMINAL))
        self.job_gauges = q(
            f"SELECT state, COUNT(*), {now} - MIN(CASE WHEN state = '{queued}' AND run_at <= {now} "
            f"THEN run_at END) FROM jobs WHERE state IN ({unfinished}) GROUP BY state")
        self.claim_select = q(
            f"SELECT {_COLS} FROM jobs WHERE {leaving(Action.CLAIM)} AND run_at <= {now} "
            f"ORDER BY priority DESC, run_at, id LIMIT ?{lock}")
        # `+state`: the ids pick the rows (the primary key); without the unary plus SQLite
        # plans this by the state index and scans every queued job (MySQL ignores the plus)
        self.claim_updates = {}
        self.claim_update = self._per_count(self.claim_updates, (
            f"UPDATE jobs SET {entering(Action.CLAIM)}, lease_owner = ?, lease_token = lease_token + 1, "
            f"lease_expires = {now} + ?, attempts = attempts + 1, "
            f"started_at = COALESCE(started_at, {now}) WHERE {leaving(Action.CLAIM, '+state')} AND id IN "
            "({markers})"))
        # a write of the run that holds the job's lease: any other run's is fenced out
        held = f"WHERE id = ? AND state = '{running}' AND lease_token = ?"
        self.renew = q(f"UPDATE jobs SET lease_expires = {now} + ? {held}")
        self.cancel_flags = q(
            f"SELECT id FROM jobs WHERE state = '{running}' AND lease_owner = ? AND cancel_requested = 1")
        self.progress = q(f"UPDATE jobs SET progress = ? {held}")
        self.touch = q(f"UPDATE jobs SET lease_expires = lease_expires {held}")

        def fenced(action):
            return f"WHERE id = ? AND {leaving(action)} AND lease_token = ?"
        released = "lease_owner = NULL, lease_expires = NULL"
        self.finish = q(  # the one transition with several ends: the state is bound, and checked
            f"UPDATE jobs SET state = ?, result = ?, error = ?, finished_at = {now}, "
            f"{released} {fenced(Action.FINISH)}")
        self.requeue = q(
            f"UPDATE jobs SET {entering(Action.RETRY_LATER)}, error = ?, run_at = {now} + ?, "
            f"{released} {fenced(Action.RETRY_LATER)}")
        self.give_back = q(
            f"UPDATE jobs SET {entering(Action.GIVE_BACK)}, attempts = attempts - 1, run_at = {now}, "
            f"{released} {fenced(Action.GIVE_BACK)}")
        self.crash_requeue = q(
            f"UPDATE jobs SET {entering(Action.CRASH_REQUEUE)}, crashes = crashes + 1, run_at = {now}, "
            f"{released} {fenced(Action.CRASH_REQUEUE)}")
        self.crash_fail = q(
            f"UPDATE jobs SET {entering(Action.CRASH_FAIL)}, crashes = crashes + 1, error = ?, "
            f"finished_at = {now}, {released} {fenced(Action.CRASH_FAIL)}")
        self.expired = q(
            f"SELECT id, lease_token, crashes FROM jobs WHERE state = '{running}' "
            f"AND lease_expires < {now}{lock}")
        self.held_by = q(
            f"SELECT id, lease_token, crashes FROM jobs WHERE state = '{running}' AND lease_owner = ?{lock}")
        self.running_owners = q(f"SELECT DISTINCT lease_owner FROM jobs WHERE state = '{running}'")
        self.state_of = q("SELECT state FROM jobs WHERE id = ?")
        self.cancel_queued = q(
            f"UPDATE jobs SET {entering(Action.CANCEL_QUEUED)}, cancel_requested = 1, finished_at = {now} "
            f"WHERE id = ? AND {leaving(Action.CANCEL_QUEUED)}")
        self.cancel_running = q(  # the state stays: the run sees the flag and finishes cancelled
            f"UPDATE jobs SET cancel_requested = 1 WHERE id = ? AND {leaving(Action.REQUEST_CANCEL)}")
        self.retry = q(
            f"UPDATE jobs SET {entering(Action.RETRY)}, attempts = 0, crashes = 0, result = NULL, "
            f"error = NULL, progress = NULL, cancel_requested = 0, run_at = {now}, started_at = NULL, "
            f"finished_at = NULL WHERE id = ? AND {leaving(Action.RETRY)}")
        # steps
        self.get_step = q("SELECT name, seq, state, result, error, started_at, finished_at "
                          "FROM steps WHERE job_id = ? AND name = ?")
        self.get_steps = q("SELECT name, seq, state, result, error, started_at, finished_at "
                           "FROM steps WHERE job_id = ? ORDER BY seq")
        self.start_step = q(
            "REPLACE INTO steps (job_id, name, seq, state, result, error, started_at, finished_at) "
            f"VALUES (?, ?, ?, 'running', NULL, NULL, {now}, NULL)")
        self.end_step = q(
            f"UPDATE steps SET state = ?, result = ?, error = ?, finished_at = {now} "
            "WHERE job_id = ? AND name = ?")
        # the whole row, for an end whose start record never committed (started `?` ms ago)
        self.add_step = q(
            "INSERT INTO steps (job_id, name, seq, state, result, error, started_at, finished_at) "
            f"VALUES (?, ?, ?, ?, ?, ?, {now} - ?, {now})")
        # callbacks
        self.add_callback = q(
            "INSERT INTO callbacks (id, job_id, url, state, attempts, next_at, created_at) "
            f"SELECT ?, id, callback_url, 'pending', 0, {now}, {now} FROM jobs "
            "WHERE id = ? AND callback_url IS NOT NULL")
        cb_cols = "id, job_id, url, state, attempts, next_at, claim_token, last_error, delivered_at, created_at"
        self.latest_callback = q(
            f"SELECT {cb_cols} FROM callbacks WHERE job_id = ? ORDER BY created_at DESC, id DESC LIMIT 1")
        self.any_callback_due = q(
            f"SELECT id FROM callbacks WHERE state = 'pending' AND next_at <= {now} LIMIT 1")
        self.due_callbacks = q(
            f"SELECT {cb_cols} FROM callbacks WHERE state = 'pending' AND next_at <= {now} "
            f"ORDER BY next_at LIMIT ?{lock}")
        self.claim_callback = q(
            f"UPDATE callbacks SET claim_token = claim_token + 1, next_at = {now} + ? "
            "WHERE id = ? AND state = 'pending'")
        self.record_callback = q(
            f"UPDATE callbacks SET state = ?, attempts = attempts + 1, last_error = ?, next_at = {now} + ?, "
            f"delivered_at = CASE WHEN ? = 'delivered' THEN {now} ELSE NULL END "
            "WHERE id = ? AND claim_token = ? AND state = 'pending'")
        self.rearm_callback = q(
            f"UPDATE callbacks SET state = 'pending', attempts = 0, next_at = {now}, last_error = NULL "
            "WHERE id = ? AND state = 'failed'")
        # tokens, settings
        self.add_token = q(f"INSERT INTO tokens (name, token_hash, admin, created_at) VALUES (?, ?, ?, {now})")
        self.find_token = q("SELECT name, admin FROM tokens WHERE token_hash = ?")
        self.count_tokens = q("SELECT COUNT(*) FROM tokens")
        self.get_setting = q("SELECT value FROM settings WHERE name = ?")
        self.add_setting = q(f"{dialect.insert_ignore} INTO settings (name, value) VALUES (?, ?)")
        self.touch_setting = q("UPDATE settings SET value = ? WHERE name = ?")
        self._event_statements(q, dialect)
        # one op of a shared transaction, isolated from the others (after one of them failed)
        self.savepoint = q("SAVEPOINT journal_op")
        self.rollback_to_savepoint = q("ROLLBACK TO SAVEPOINT journal_op")
        self.release_savepoint = q("RELEASE SAVEPOINT journal_op")
        # schema
        self.version_table = q("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        self.get_version = q("SELECT MAX(version) FROM schema_version")
        self.set_version = q("INSERT INTO schema_version (version) VALUES (?)")
        # a list page: first each candidate's id and stored size (a few bytes a row, however
        # big its documents), then the rows that fit the page's byte budget, by id
        size = ("LENGTH(params) + COALESCE(LENGTH(progress), 0) + COALESCE(LENGTH(result), 0) "
                "+ COALESCE(LENGTH(error), 0)")
        self.list_sizes = {key: q(f"SELECT id, {size} FROM jobs{where} ORDER BY id DESC LIMIT ?")
                           for key, where in self._list_filters()}
        self.page_jobs_made, self.page_steps_made = {}, {}
        self.page_jobs = self._per_count(
            self.page_jobs_made, f"SELECT {_COLS} FROM jobs WHERE id IN ({{markers}}) ORDER BY id DESC")
        self.page_steps = self._per_count(self.page_steps_made, (
            "SELECT job_id, name, state, started_at, finished_at FROM steps "
            "WHERE job_id IN ({markers}) ORDER BY job_id, seq"))
        self._dashboard_queries(dialect)

    def _event_statements(self, q, dialect):
        """The events table's statements (eventlog.py): written in batches, read by job and
        in id order, the latter with the job's owner, task and state beside each event."""
        self.insert_event = q("INSERT INTO events (job_id, seq, kind, data) VALUES (?, ?, ?, ?)")
        self.last_seqs_made = {}
        self.last_seqs = self._per_count(
            self.last_seqs_made,
            "SELECT job_id, MAX(seq) FROM events WHERE job_id IN ({markers}) GROUP BY job_id")
        self.last_seq = q("SELECT MAX(seq) FROM events WHERE job_id = ?")
        cols = "id, job_id, seq, kind, data"
        self.job_events = q(
            f"SELECT {cols} FROM events WHERE job_id = ? AND seq > ? ORDER BY seq LIMIT ?")
        self.last_event_id = q("SELECT MAX(id) FROM events")
        self.event_ids_after = q("SELECT id FROM events WHERE id > ? ORDER BY id LIMIT ?")
        self.events_after = q(f"SELECT {cols} FROM events WHERE id > ? ORDER BY id LIMIT ?")
        self.events_between = q(
            f"SELECT {cols} FROM events WHERE id >= ? AND id <= ? ORDER BY id LIMIT ?")
        scoped = ("SELECT e.id, e.job_id, e.seq, e.kind, e.data, j.owner, j.task, j.state "
                  "FROM events e LEFT JOIN jobs j ON j.id = e.job_id")
        self.scoped_events_after = q(f"{scoped} WHERE e.id > ? ORDER BY e.id LIMIT ?")
        self.scoped_events_between = q(
            f"{scoped} WHERE e.id >= ? AND e.id <= ? ORDER BY e.id LIMIT ?")
        # an event of a change that wrote no job column takes the job's row lock this way,
        # so that the job's last seq is read under it as for every other event
        self.lock_job = q(f"SELECT id FROM jobs WHERE id = ?{dialect.lock_row}")
        self.callback_of = q("SELECT job_id, attempts FROM callbacks WHERE id = ?")
        # the highest event stays, whoever's it is: its id must never be given again (a
        # reader that has seen it reads above it); MySQL cannot read the table it deletes from
        self.delete_events = q("DELETE FROM events WHERE job_id = ? AND id < ?")
        self.data_version = dialect.data_version

    def _per_count(self, made, text):
        """`statement(n)`: `text` with `n` bound `?` markers in place of {markers}: one
        statement and one round trip for a batch of ids. Made once per count, kept in `made`
        (a claim's counts go up to the pool's workers, a list page's up to MAX_IDS)."""
        def statement(n):
            found = made.get(n)
            if found is None:
                found = made[n] = self._q(text.format(markers=", ".join(["?"] * n)))
            return found
        return statement

    @staticmethod
    def _list_filters():
        """One WHERE clause per combination of the optional filters, built from constants."""
        names = ("owner", "state", "task", "before")
        tests = {"owner": "owner = ?", "state": "state = ?", "task": "task = ?", "before": "id < ?"}
        for mask in range(16):
            key = tuple(bool(mask & (1 << i)) for i in range(4))
            used = [tests[n] for n, on in zip(names, key) if on]
            yield key, (" WHERE " + " AND ".join(used)) if used else ""

    # --- the dashboard: overview, delete, bulk -----------------------------------------
    # the minute a finished_at falls in (integer division differs between the engines)
    _MINUTE_OF = {"sqlite": "finished_at / 60000", "mysql": "finished_at DIV 60000"}
    # name the index: for `GROUP BY state` both engines may rather walk all of jobs_claim,
    # which is in state order, than sort the few groups of a jobs_finished range
    _BY_FINISHED = {"sqlite": "jobs INDEXED BY jobs_finished", "mysql": "jobs FORCE INDEX (jobs_finished)"}

    def _dashboard_queries(self, dialect):
        """The overview's reads (each an index range on jobs_finished or a primary-key
        range, never a scan of the table) and the delete and bulk statements.

        `+owner`: SQLite would otherwise pick jobs_owner for `owner = ?` and walk every job
        the owner ever had; the window of jobs_finished holds the owner column already."""
        q = dialect.translate
        minute = self._MINUTE_OF[dialect.name]
        jobs = self._BY_FINISHED[dialect.name]
        # per terminal state, one SUM each: a GROUP BY state sorts the range in a temporary
        # B-tree, several times slower over a day of jobs than these sums
        sums = ", ".join(f"SUM(CASE WHEN state = '{state}' THEN 1 ELSE 0 END)"
                         for state in ENDED)
        unfinished = ", ".join(f"'{state.value}'" for state in State if state not in TERMINAL)
        for suffix, mine in (("", ""), ("_owner", " AND +owner = ?")):
            # unfinished jobs: a range of the claim index's state prefix (jobs_finished holds
            # only finished ones on SQLite)
            setattr(self, "stats_unfinished" + suffix, q(
                f"SELECT state, COUNT(*) FROM jobs WHERE state IN ({unfinished}){mine} GROUP BY state"))
            setattr(self, "stats_finished" + suffix, q(
                f"SELECT {sums} FROM {jobs} WHERE finished_at >= ?{mine}"))
            setattr(self, "stats_minutes" + suffix, q(
                f"SELECT {minute} AS minute, {sums} FROM {jobs} "
                f"WHERE finished_at >= ?{mine} GROUP BY {minute}"))
            setattr(self, "stats_runs" + suffix, q(
                f"SELECT task, state, created_at, started_at, finished_at FROM {jobs} "
                f"WHERE finished_at >= ?{mine} AND started_at IS NOT NULL "
                "ORDER BY finished_at DESC LIMIT ?"))
        # ids are UUIDv7: those at or above a time's lowest id were submitted since
        self.stats_submitted = q("SELECT COUNT(*) FROM jobs WHERE id >= ?")
        self.stats_submitted_owner = q("SELECT COUNT(*) FROM jobs WHERE owner = ? AND id >= ?")
        self.delete_job = q(f"DELETE FROM jobs WHERE id = ? AND {leaving(Action.DELETE)}")
        self.delete_steps = q("DELETE FROM steps WHERE job_id = ?")
        self.delete_callbacks = q("DELETE FROM callbacks WHERE job_id = ?")
        # bulk: the page of ids a filter names, as the list reads it (same filters, same order)
        self.bulk_page = {key: q(f"SELECT id, owner, state, task FROM jobs{where} ORDER BY id DESC LIMIT ?")
                          for key, where in self._list_filters()}
        self.bulk_ids = {}

        def bulk_by_ids(n):
            """The rows of `n` named ids (only the count of markers varies; ids are bound)."""
            statement = self.bulk_ids.get(n)
            if statement is None:
                markers = ", ".join(["?"] * n)
                statement = self.bulk_ids[n] = q(
                    f"SELECT id, owner, state, task FROM jobs WHERE id IN ({markers}) ORDER BY id DESC")
            return statement
        self.bulk_by_ids = bulk_by_ids
