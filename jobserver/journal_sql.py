"""The journal's SQL text: the schema and its migrations, and every statement (`Sql`).

Statements are written once with `?` markers and translated once, when a Journal opens,
for the driver's paramstyle. Only dialect constants (the clock, the row-lock suffix,
column types) are formatted in; every value is a bound parameter. Nothing here runs SQL:
`journal.Journal` does.
"""

SCHEMA_VERSION = 3

JOB_COLUMNS = ("id", "task", "owner", "state", "params", "priority", "attempts", "max_retries",
               "timeout", "run_at", "lease_owner", "lease_token", "lease_expires", "crashes",
               "progress", "result", "error", "cancel_requested", "callback_url",
               "idempotency_key", "request_hash", "created_at", "started_at", "finished_at")
_COLS = ", ".join(JOB_COLUMNS)

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
        """CREATE TABLE IF NOT EXISTS projects (
            id {autoid},
            projname VARCHAR(190) NOT NULL,
            prodesc {text} NULL,
            job_id VARCHAR(36) NULL,
            created_at BIGINT NOT NULL
        ){opts}""",
    ],
    # MySQL's utf8mb4_bin is PAD SPACE: 'k' and 'k ' compared equal, so the unique index made
    # them one idempotency key (and 'alice ' listed alice's jobs, step 'a ' replayed step 'a').
    # Every table moves to the server's NO PAD binary collation ({exact}: utf8mb4_nopad_bin on
    # MariaDB, utf8mb4_0900_bin on MySQL 8), which compares as SQLite's BINARY already does.
    # This rebuilds each table once: on a large journal it takes a while, under a lock.
    2: [{"mysql": f"ALTER TABLE {table} CONVERT TO CHARACTER SET utf8mb4 COLLATE {{exact}}"}
        for table in ("jobs", "steps", "callbacks", "tokens", "settings", "projects")],
    # 3: the dashboard at a million jobs.
    # jobs_finished: the overview reads finished jobs by time; counts by state of the last
    # hour or day and of the unfinished jobs (finished_at NULL) come from this index alone,
    # without touching rows, an owner's too. jobs_task: a list filtered by task reads one
    # page of the index, newest first, instead of scanning the table for a task that has
    # few jobs (a task never changes, so only a submit pays for this index). A (state, id)
    # index would do the same for a state filter, but claims and finishes would pay for it.
    3: [
        "CREATE INDEX jobs_finished ON jobs (finished_at, state, owner)",
        "CREATE INDEX jobs_task ON jobs (task, id)",
    ],
}

# {exact} of a MySQL migration: the server's NO PAD binary utf8mb4 collation
MYSQL_EXACT_COLLATION = (
    "SELECT COLLATION_NAME FROM information_schema.COLLATIONS "
    "WHERE COLLATION_NAME IN ('utf8mb4_nopad_bin', 'utf8mb4_0900_bin') ORDER BY COLLATION_NAME DESC")


class Sql:
    """Every statement, written once with `?` markers; `now` is the database clock in ms."""

    def __init__(self, dialect):
        now, lock = dialect.now_ms, dialect.lock_rows
        q = dialect.translate
        self.now = q(f"SELECT {now}")
        self.insert_job = q(f"INSERT INTO jobs ({_COLS}) VALUES ({', '.join('?' * len(JOB_COLUMNS))})")
        self.find_idempotent = q(f"SELECT {_COLS} FROM jobs WHERE owner = ? AND idempotency_key = ?")
        self.get_job = q(f"SELECT {_COLS} FROM jobs WHERE id = ?")
        job_cols = ", ".join(f"j.{c}" for c in JOB_COLUMNS)
        self.get_job_and_steps = q(
            f"SELECT {job_cols}, s.name AS step_name, s.state AS step_state, "
            "s.started_at AS step_started_at, s.finished_at AS step_finished_at "
            "FROM jobs j LEFT JOIN steps s ON s.job_id = j.id WHERE j.id = ? ORDER BY s.seq")
        self.count_queued = q("SELECT COUNT(*) FROM jobs WHERE state = 'queued'")
        self.claim_select = q(
            f"SELECT {_COLS} FROM jobs WHERE state = 'queued' AND run_at <= {now} "
            f"ORDER BY priority DESC, run_at, id LIMIT ?{lock}")
        # `+state`: the ids pick the rows (the primary key); without the unary plus SQLite
        # plans this by the state index and scans every queued job (MySQL ignores the plus)
        claim_head = (
            "UPDATE jobs SET state = 'running', lease_owner = ?, lease_token = lease_token + 1, "
            f"lease_expires = {now} + ?, attempts = attempts + 1, "
            f"started_at = COALESCE(started_at, {now}) WHERE +state = 'queued' AND id IN ")
        self.claim_updates = {}

        def claim_update(n):
            """The claim UPDATE for `n` ids: one statement and one round trip per batch.
            Only the count of `?` markers varies; the ids themselves are bound."""
            statement = self.claim_updates.get(n)
            if statement is None:
                markers = ", ".join(["?"] * n)
                statement = self.claim_updates[n] = q(f"{claim_head}({markers})")
            return statement
        self.claim_update = claim_update
        fence = "WHERE id = ? AND state = 'running' AND lease_token = ?"
        self.renew = q(f"UPDATE jobs SET lease_expires = {now} + ? {fence}")
        self.cancel_flags = q(
            "SELECT id FROM jobs WHERE state = 'running' AND lease_owner = ? AND cancel_requested = 1")
        self.progress = q(f"UPDATE jobs SET progress = ? {fence}")
        self.finish = q(
            f"UPDATE jobs SET state = ?, result = ?, error = ?, finished_at = {now}, "
            f"lease_owner = NULL, lease_expires = NULL {fence}")
        self.requeue = q(
            f"UPDATE jobs SET state = 'queued', error = ?, run_at = {now} + ?, "
            f"lease_owner = NULL, lease_expires = NULL {fence}")
        self.give_back = q(
            f"UPDATE jobs SET state = 'queued', attempts = attempts - 1, run_at = {now}, "
            f"lease_owner = NULL, lease_expires = NULL {fence}")
        self.crash_requeue = q(
            f"UPDATE jobs SET state = 'queued', crashes = crashes + 1, run_at = {now}, "
            f"lease_owner = NULL, lease_expires = NULL {fence}")
        self.crash_fail = q(
            f"UPDATE jobs SET state = 'failed', crashes = crashes + 1, error = ?, finished_at = {now}, "
            f"lease_owner = NULL, lease_expires = NULL {fence}")
        self.expired = q(
            f"SELECT id, lease_token, crashes FROM jobs WHERE state = 'running' "
            f"AND lease_expires < {now}{lock}")
        self.held_by = q(
            f"SELECT id, lease_token, crashes FROM jobs WHERE state = 'running' AND lease_owner = ?{lock}")
        self.running_owners = q("SELECT DISTINCT lease_owner FROM jobs WHERE state = 'running'")
        self.touch = q(f"UPDATE jobs SET lease_expires = lease_expires {fence}")
        self.state_of = q("SELECT state FROM jobs WHERE id = ?")
        self.cancel_queued = q(
            f"UPDATE jobs SET state = 'cancelled', cancel_requested = 1, finished_at = {now} "
            "WHERE id = ? AND state = 'queued'")
        self.cancel_running = q("UPDATE jobs SET cancel_requested = 1 WHERE id = ? AND state = 'running'")
        self.retry = q(
            f"UPDATE jobs SET state = 'queued', attempts = 0, crashes = 0, result = NULL, error = NULL, "
            f"progress = NULL, cancel_requested = 0, run_at = {now}, started_at = NULL, "
            "finished_at = NULL WHERE id = ? AND state IN ('failed', 'cancelled')")
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
        # tokens, settings, projects
        self.add_token = q(f"INSERT INTO tokens (name, token_hash, admin, created_at) VALUES (?, ?, ?, {now})")
        self.find_token = q("SELECT name, admin FROM tokens WHERE token_hash = ?")
        self.count_tokens = q("SELECT COUNT(*) FROM tokens")
        self.get_setting = q("SELECT value FROM settings WHERE name = ?")
        self.add_setting = q(f"{dialect.insert_ignore} INTO settings (name, value) VALUES (?, ?)")
        self.touch_setting = q("UPDATE settings SET value = ? WHERE name = ?")
        self.add_project = q(
            f"INSERT INTO projects (projname, prodesc, job_id, created_at) VALUES (?, ?, ?, {now})")
        self.get_projects = q("SELECT projname, prodesc, job_id FROM projects WHERE job_id = ?")
        # one op of a shared transaction, isolated from the others (after one of them failed)
        self.savepoint = q("SAVEPOINT journal_op")
        self.rollback_to_savepoint = q("ROLLBACK TO SAVEPOINT journal_op")
        self.release_savepoint = q("RELEASE SAVEPOINT journal_op")
        # schema
        self.version_table = q("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        self.get_version = q("SELECT MAX(version) FROM schema_version")
        self.set_version = q("INSERT INTO schema_version (version) VALUES (?)")
        self.list = self._list_queries(q)
        self.list_steps = {key: q(
            "SELECT s.job_id, s.name, s.seq, s.state, s.started_at, s.finished_at FROM steps s "
            f"JOIN (SELECT id FROM jobs{where} ORDER BY id DESC LIMIT ?) page ON s.job_id = page.id "
            "ORDER BY s.job_id, s.seq") for key, where in self._list_filters()}
        self._dashboard_queries(dialect)

    @staticmethod
    def _list_filters():
        """One WHERE clause per combination of the optional filters, built from constants."""
        names = ("owner", "state", "task", "before")
        tests = {"owner": "owner = ?", "state": "state = ?", "task": "task = ?", "before": "id < ?"}
        for mask in range(16):
            key = tuple(bool(mask & (1 << i)) for i in range(4))
            used = [tests[n] for n, on in zip(names, key) if on]
            yield key, (" WHERE " + " AND ".join(used)) if used else ""

    def _list_queries(self, q):
        return {key: q(f"SELECT {_COLS} FROM jobs{where} ORDER BY id DESC LIMIT ?")
                for key, where in self._list_filters()}

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
                         for state in ("succeeded", "failed", "cancelled"))
        for suffix, mine in (("", ""), ("_owner", " AND +owner = ?")):
            setattr(self, "stats_unfinished" + suffix, q(
                f"SELECT state, COUNT(*) FROM {jobs} WHERE finished_at IS NULL{mine} GROUP BY state"))
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
        self.delete_job = q(
            "DELETE FROM jobs WHERE id = ? AND state IN ('succeeded', 'failed', 'cancelled')")
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
