"""Connections for the journal: SQLite (stdlib) and MySQL/MariaDB (PyMySQL).

Each driver owns its dialect (the few SQL fragments that differ), its connections
and the mapping of driver errors to three outcomes: `TransientError` (the batch may
simply run again: busy, deadlock), `StatementError` (a statement was refused) and
`JournalUnavailable` (the database cannot be reached). Nothing above the journal
imports `sqlite3` or `pymysql`.
"""
import logging
import os
import queue
import sqlite3
import threading
from urllib.parse import parse_qs, unquote, urlparse

import pymysql
from pymysql.constants import CLIENT

from .admission import waiting
from .errors import JournalUnavailable
from .redact import mask_url

log = logging.getLogger(__name__)


class TransientError(Exception):
    """The transaction lost a race (busy, deadlock, lock wait); running it again may succeed."""


class StatementError(Exception):
    """The database refused a statement; the cause is chained."""


class SqliteDialect:
    name = "sqlite"
    # SQLite keeps 'now' in whole milliseconds; julianday() hands it over as a float, so
    # ROUND (not a truncating CAST, which can land one millisecond early) gets it back
    now_ms = "CAST(ROUND((julianday('now') - 2440587.5) * 86400000.0) AS INTEGER)"
    # the database runs inside this process, on this machine's clock: reading that clock
    # in Python (truncated to the millisecond, as SQLite does) gives the same time without
    # a statement
    clock_is_local = True
    lock_rows = ""  # BEGIN IMMEDIATE already holds the database's one write lock
    insert_ignore = "INSERT OR IGNORE"

    @staticmethod
    def translate(sql):
        return sql

    @staticmethod
    def ddl(statement):
        return statement.format(text="TEXT", opts="", autoid="INTEGER PRIMARY KEY AUTOINCREMENT")


class MysqlDialect:
    name = "mysql"
    now_ms = "CAST(UNIX_TIMESTAMP(CURRENT_TIMESTAMP(3)) * 1000 AS SIGNED)"
    clock_is_local = False  # every box sharing the database goes by the server's clock
    lock_rows = " FOR UPDATE SKIP LOCKED"
    insert_ignore = "INSERT IGNORE"

    @staticmethod
    def translate(sql):
        assert "%" not in sql, "PyMySQL formats with %: keep literal percent signs out of SQL"
        return sql.replace("?", "%s")

    @staticmethod
    def ddl(statement):
        return statement.format(
            text="MEDIUMTEXT", autoid="BIGINT AUTO_INCREMENT PRIMARY KEY",
            opts=" ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin")


_SYNCHRONOUS = {level: f"PRAGMA synchronous = {level}" for level in ("FULL", "NORMAL", "EXTRA")}


class SqliteDriver:
    """SQLite in WAL mode: one connection per reading thread, one for the writer thread.

    `synchronous=FULL` (the default) fsyncs the WAL at every commit, so a committed job
    survives power loss; `NORMAL` survives a crash of the process but may lose the last
    commits on power loss or an OS crash. Several processes may share the file: writes
    take the file's write lock with BEGIN IMMEDIATE and wait up to `busy_timeout_ms`.
    """

    dialect = SqliteDialect
    integrity_errors = (sqlite3.IntegrityError,)

    def __init__(self, url, path, synchronous="FULL", busy_timeout_ms=10_000):
        if synchronous.upper() not in _SYNCHRONOUS:
            raise ValueError(f"synchronous must be FULL, NORMAL or EXTRA, not {synchronous!r}")
        self.url = url
        self.path = path
        self.synchronous = synchronous.upper()
        self.busy_timeout_ms = int(busy_timeout_ms)
        self._local = threading.local()
        self._all = []
        self._lock = threading.Lock()
        self._writer = None
        self._closed = False

    def _connect(self):
        try:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                                   timeout=self.busy_timeout_ms / 1000)
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute(_SYNCHRONOUS[self.synchronous])
        except sqlite3.Error as exc:
            raise JournalUnavailable(self._open_failure(exc)) from exc
        with self._lock:
            self._all.append(conn)
        return conn

    def _open_failure(self, exc):
        """Why the journal could not be opened, in words that point at the fix."""
        directory = os.path.dirname(os.path.abspath(self.path))
        if not os.access(directory, os.W_OK):  # WAL mode makes its -wal and -shm files there
            return f"the SQLite journal {self.path} refuses writes: its directory is read-only ({exc})"
        if getattr(exc, "sqlite_errorname", "").startswith("SQLITE_READONLY"):
            return f"the SQLite journal {self.path} refuses writes: {exc}"
        return f"cannot open SQLite journal {self.path}: {exc}"

    def read(self, fn):
        if self._closed:
            raise JournalUnavailable("the journal is closed")
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self._connect()
        try:
            return fn(conn.cursor())
        except sqlite3.OperationalError as exc:
            raise JournalUnavailable(f"journal read failed: {exc}") from exc

    def write_transaction(self, fn):
        """BEGIN IMMEDIATE; fn(cursor); COMMIT — rolled back if anything raises."""
        if self._writer is None:
            self._writer = self._connect()
        self._transaction(self._writer, fn)

    def migrate(self, fn):
        conn = self._connect()
        try:
            self._transaction(conn, fn)
        except TransientError as exc:
            raise JournalUnavailable("the journal stayed locked while creating the schema") from exc

    @staticmethod
    def _transaction(conn, fn):
        cur = conn.cursor()
        try:
            cur.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            raise TransientError(str(exc)) from exc
        try:
            fn(cur)
            cur.execute("COMMIT")
        except BaseException as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            if isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc):
                raise TransientError(str(exc)) from exc
            if isinstance(exc, sqlite3.OperationalError) and "disk" in str(exc):
                raise JournalUnavailable(f"journal write failed: {exc}") from exc
            if isinstance(exc, sqlite3.Error):
                raise StatementError(str(exc)) from exc
            raise

    def close(self):
        self._closed = True
        with self._lock:
            conns, self._all = self._all, []
        for conn in conns:
            try:
                conn.close()
            except sqlite3.Error:
                log.debug("closing a SQLite connection failed", exc_info=True)


_MYSQL_TRANSIENT = {1205, 1213, 1614}  # lock wait timeout, deadlock, rolled back
_MYSQL_GONE = {2003, 2006, 2013, 2014, 2055, 1927, 1053, 1077}


class MysqlDriver:
    """MySQL/MariaDB over PyMySQL: a bounded pool of reader connections and one writer.

    PyMySQL connections are not shared between threads; a connection that failed is
    thrown away and the next use makes a new one. Sessions run in UTC at READ COMMITTED,
    with FOUND_ROWS so that a guarded UPDATE reports the rows it matched.
    """

    dialect = MysqlDialect
    integrity_errors = (pymysql.err.IntegrityError,)

    def __init__(self, url, host, port, user, password, database, pool_size=16, timeout=30):
        self.url = url
        self._params = dict(host=host, port=port, user=user, password=password, database=database,
                            autocommit=True, charset="utf8mb4", connect_timeout=5,
                            read_timeout=timeout, write_timeout=timeout, client_flag=CLIENT.FOUND_ROWS)
        self._idle = queue.LifoQueue()
        self._slots = threading.BoundedSemaphore(pool_size)
        self._writer = None
        self._closed = False

    def _connect(self):
        try:
            conn = pymysql.connect(**self._params)
            with conn.cursor() as cur:
                cur.execute("SET time_zone = '+00:00'")
                cur.execute("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")
            return conn
        except pymysql.err.MySQLError as exc:
            raise JournalUnavailable(f"cannot connect to MySQL at {self._params['host']}: {exc}") from exc

    def read(self, fn):
        if self._closed:
            raise JournalUnavailable("the journal is closed")
        with waiting():  # a round trip to the server: other request threads may run meanwhile
            return self._read(fn)

    def _read(self, fn):
        if not self._slots.acquire(timeout=10):
            raise JournalUnavailable("all journal connections are busy")
        try:
            for attempt in (1, 2):  # an idle connection may have been closed by the server
                try:
                    conn = self._idle.get_nowait()
                except queue.Empty:
                    conn = self._connect()
                try:
                    with conn.cursor() as cur:
                        result = fn(cur)
                    self._idle.put(conn)
                    return result
                except (pymysql.err.OperationalError, pymysql.err.InterfaceError) as exc:
                    conn.close()
                    if attempt == 2 or _code(exc) not in _MYSQL_GONE:
                        raise JournalUnavailable(f"journal read failed: {exc}") from exc
        finally:
            self._slots.release()

    def write_transaction(self, fn):
        conn = self._begin_on_writer()
        try:
            with conn.cursor() as cur:
                fn(cur)
            conn.commit()
        except BaseException as exc:
            self._rollback(conn)
            if isinstance(exc, pymysql.err.MySQLError):
                code = _code(exc)
                if code in _MYSQL_TRANSIENT:
                    raise TransientError(str(exc)) from exc
                if code in _MYSQL_GONE or isinstance(exc, pymysql.err.InterfaceError):
                    self._writer = None
                    conn.close()
                    raise JournalUnavailable(f"journal write failed: {exc}") from exc
                raise StatementError(str(exc)) from exc
            raise

    def _begin_on_writer(self):
        """The writer connection with a transaction begun.

        If the server dropped the idle writer (wait_timeout, a restart, a failover), BEGIN
        is the first thing to fail and nothing of the transaction has run: one fresh
        connection tries again, so the first write after a quiet night does not fail."""
        for attempt in (1, 2):
            if self._writer is None:
                self._writer = self._connect()
            conn = self._writer
            try:
                conn.begin()
                return conn
            except (pymysql.err.OperationalError, pymysql.err.InterfaceError) as exc:
                self._writer = None
                try:
                    conn.close()
                except pymysql.err.Error:
                    log.debug("closing a dead connection failed", exc_info=True)
                if attempt == 2:
                    raise JournalUnavailable(f"journal write failed: {exc}") from exc
                log.info("the journal writer's connection was closed (%s); reconnecting", exc)

    @staticmethod
    def _rollback(conn):
        try:
            conn.rollback()
        except pymysql.err.MySQLError:
            log.debug("rollback failed; the connection will be replaced", exc_info=True)

    def migrate(self, fn):
        conn = self._connect()
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT GET_LOCK('jobserver_migrate', 60)")
                try:
                    fn(cur)
                finally:
                    cur.execute("SELECT RELEASE_LOCK('jobserver_migrate')")
        except pymysql.err.MySQLError as exc:
            raise JournalUnavailable(f"cannot create the journal schema: {exc}") from exc
        finally:
            conn.close()

    def close(self):
        self._closed = True
        while True:
            try:
                self._idle.get_nowait().close()
            except queue.Empty:
                break
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _code(exc):
    return exc.args[0] if exc.args and isinstance(exc.args[0], int) else None


def connect(url, **options):
    """A driver for `sqlite:///relative.db`, `sqlite:////abs/path.db` or `mysql://user:pw@host:port/db`.

    SQLite takes `?synchronous=NORMAL` in the URL (or `synchronous=` here). Errors name the
    URL with its password masked."""
    try:
        parsed = urlparse(url)
        port = parsed.port
    except ValueError as exc:  # a password with an unencoded / reads as a port: never echo it
        raise ValueError(f"cannot read the journal URL {mask_url(url)!r} ({type(exc).__name__}): "
                         "percent-encode / ? # @ : in the password") from None
    query = {k: v[-1] for k, v in parse_qs(parsed.query).items()}
    if parsed.scheme == "sqlite":
        path = parsed.path[1:] if parsed.path.startswith("/") else parsed.path
        if not path:
            raise ValueError("a SQLite URL names a file: sqlite:///jobserver.db")
        if os.path.dirname(path):
            try:
                os.makedirs(os.path.dirname(path), exist_ok=True)
            except OSError as exc:
                raise JournalUnavailable(f"cannot make the SQLite journal's directory "
                                         f"{os.path.dirname(path)}: {exc.strerror}") from exc
        sync = options.pop("synchronous", None) or query.get("synchronous", "FULL")
        return SqliteDriver(url, path, synchronous=sync, **options)
    if parsed.scheme in ("mysql", "mysql+pymysql", "mariadb"):
        database = parsed.path.lstrip("/")
        if not database:
            raise ValueError("a MySQL URL names a database: mysql://user:pw@host:3306/name")
        return MysqlDriver(url, host=parsed.hostname or "127.0.0.1", port=port or 3306,
                           user=unquote(parsed.username or "root"),
                           password=unquote(parsed.password or ""), database=database, **options)
    raise ValueError(f"unsupported journal URL {mask_url(url)!r}: use sqlite:///path or mysql://user:pw@host/db")
