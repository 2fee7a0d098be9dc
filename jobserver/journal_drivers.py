"""Connections for the journal: SQLite (stdlib) and MySQL/MariaDB (PyMySQL).

Each driver owns its dialect (the few SQL fragments that differ), its connections
and the mapping of driver errors to four outcomes: `TransientError` (the batch may
simply run again: busy, deadlock), `StatementError` (a statement was refused),
`WriteRefused` (a statement too large for the server: it would be refused on every
retry) and `JournalUnavailable` (the database cannot be reached). Nothing above the
journal imports `sqlite3` or `pymysql`.
"""
import logging
import os
import queue
import sqlite3
import threading
import time
from contextlib import contextmanager
from urllib.parse import parse_qs, unquote, urlparse

import pymysql
import pymysql.cursors
from pymysql.constants import CLIENT

from .admission import waiting
from .errors import JournalUnavailable, WriteRefused
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
    lock_row = ""
    # a number that changes when another connection commits (None where there is none)
    data_version = "PRAGMA data_version"
    insert_ignore = "INSERT OR IGNORE"

    @staticmethod
    def translate(sql):
        return sql

    @staticmethod
    def ddl(statement):
        # autoid: a rowid, the highest plus one. AUTOINCREMENT would also never reuse the id
        # of a deleted highest row, at the price of a page written per commit: the journal
        # never deletes the highest event instead (Journal._delete_one)
        return statement.format(text="TEXT", opts="", autoid="INTEGER PRIMARY KEY")


class MysqlDialect:
    name = "mysql"
    now_ms = "CAST(UNIX_TIMESTAMP(CURRENT_TIMESTAMP(3)) * 1000 AS SIGNED)"
    clock_is_local = False  # every box sharing the database goes by the server's clock
    lock_rows = " FOR UPDATE SKIP LOCKED"
    lock_row = " FOR UPDATE"  # wait for the row: a read that must not skip it
    data_version = None
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
    paramstyle = sqlite3.paramstyle
    refusals = (sqlite3.IntegrityError, sqlite3.DataError, sqlite3.InterfaceError,
                sqlite3.ProgrammingError, sqlite3.NotSupportedError)

    @classmethod
    def refuses_statement(cls, exc):
        """True if `exc`, raised by one statement, refused that statement alone (a constraint,
        a value it cannot bind or store) and the transaction may go on; False for trouble of
        the transaction or the database (busy, I/O, read-only, corrupt)."""
        return isinstance(exc, cls.refusals) or not isinstance(exc, sqlite3.Error)

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

    def _thread_connection(self):
        if self._closed:
            raise JournalUnavailable("the journal is closed")
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self._connect()
        return conn

    def read(self, fn):
        conn = self._thread_connection()
        try:
            return fn(conn.cursor())
        except sqlite3.OperationalError as exc:
            raise JournalUnavailable(f"journal read failed: {exc}") from exc

    @contextmanager
    def transaction(self):
        """A user's transaction on this thread's connection: BEGIN IMMEDIATE (waiting up to
        busy_timeout for the write lock), COMMIT, or ROLLBACK when the block raised."""
        conn = self._thread_connection()
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            raise JournalUnavailable(f"cannot begin a transaction: {exc}") from exc
        try:
            yield conn.cursor()
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

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

    @staticmethod
    def oversize(*texts):
        """SQLite takes any document the codec allows: never a reason to refuse one."""
        return None

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
# the connection is lost: cannot connect, gone away, lost during a query, out of sync, lost,
# killed, shutdown, server shutdown, and MySQL 8's "disconnected because of inactivity"
_MYSQL_GONE = {2003, 2006, 2013, 2014, 2055, 1927, 1053, 1077, 4031}
# the server refused a statement for its size (the packet, or a value built in it)
_MYSQL_TOO_LARGE = {1153, 1301}
#: A pooled connection idle this long is pinged before it is lent (at most half the server's
#: wait_timeout): one round trip, and only for a connection the server may have dropped.
PING_IDLE_AFTER = 5.0
#: Bytes of a packet that are not the statement's text (command byte, framing), with margin.
PACKET_MARGIN = 1024
#: Bytes of a statement besides the JSON documents it carries: its SQL text and the other
#: values (ids, names, a callback URL), escaped.
STATEMENT_MARGIN = 16 * 1024
# what PyMySQL's escape_string doubles; JSON text holds only the backslash and the quotes
_ESCAPED = ("\\", '"', "'", "\0", "\n", "\r", "\032")


class _BoundedCursor(pymysql.cursors.Cursor):
    """A cursor that refuses, before sending it, a statement over the server's max_allowed_packet.

    The server would drop the connection mid-packet, which PyMySQL reports as 2006 "server has
    gone away", the same as a dead server: the write would be retried for ever. The limit is
    the connection's `max_allowed_packet`, set from the server's value when it connected."""

    def execute(self, query, args=None):
        if args is not None:
            query = self.mogrify(query, args)
        limit = self.connection.max_allowed_packet - PACKET_MARGIN
        if len(query) * 4 > limit:  # a UTF-8 character is at most 4 bytes: only then count them
            size = len(query) if not isinstance(query, str) or query.isascii() else len(query.encode())
            if size > limit:
                raise WriteRefused(f"a statement of {size} bytes is over the database's "
                                   f"max_allowed_packet of {self.connection.max_allowed_packet} bytes")
        return super().execute(query)

    @property
    def max_stmt_length(self):
        """executemany() joins rows into statements up to this long: never over the packet."""
        return min(pymysql.cursors.Cursor.max_stmt_length,
                   self.connection.max_allowed_packet - PACKET_MARGIN)


class MysqlDriver:
    """MySQL/MariaDB over PyMySQL: a bounded pool of reader connections and one writer.

    PyMySQL connections are not shared between threads; a connection that failed is
    thrown away and the next use makes a new one. Sessions run in UTC at READ COMMITTED,
    with FOUND_ROWS so that a guarded UPDATE reports the rows it matched.

    The server drops sessions behind the pool's back (wait_timeout, a restart, KILL): an
    idle reader is pinged before it is lent when it idled a few seconds or since before a
    connection was found dead, and a read that finds its connection dead runs once more on
    a new connection, so one dead connection costs no failed read and a run of them no
    run of failed reads.
    """

    dialect = MysqlDialect
    integrity_errors = (pymysql.err.IntegrityError,)
    paramstyle = pymysql.paramstyle
    # one statement refused for its data, besides PyMySQL's IntegrityError and DataError: bad
    # null, out of range, truncated, no default, incorrect string, too long, foreign keys, a
    # SIGNAL, a CHECK constraint (MySQL 8, MariaDB)
    refused_codes = frozenset({1048, 1264, 1265, 1292, 1364, 1366, 1406, 1451, 1452, 1644, 3819, 4025})

    @classmethod
    def refuses_statement(cls, exc):
        """True if `exc`, raised by one statement, refused that statement alone for its data
        (a key, a constraint, a value the column cannot hold) and the transaction may go on,
        or was raised in Python (a string PyMySQL cannot encode). Anything else (busy, lost,
        read-only, denied) is the transaction's or the server's trouble."""
        if not isinstance(exc, pymysql.err.MySQLError):
            return True
        return (isinstance(exc, (pymysql.err.IntegrityError, pymysql.err.DataError))
                or _code(exc) in cls.refused_codes)

    def __init__(self, url, host, port, user, password, database, pool_size=16, timeout=30):
        self.url = url
        self._params = dict(host=host, port=port, user=user, password=password, database=database,
                            autocommit=True, charset="utf8mb4", connect_timeout=5,
                            read_timeout=timeout, write_timeout=timeout, client_flag=CLIENT.FOUND_ROWS,
                            cursorclass=_BoundedCursor)
        self._idle = queue.LifoQueue()  # (connection, monotonic time it was given back)
        self._slots = threading.BoundedSemaphore(pool_size)
        self._writer = None
        self._closed = False
        self._max_packet = None  # the server's max_allowed_packet, read at every connect
        self._ping_after = PING_IDLE_AFTER
        self._lost_at = float("-inf")  # when a connection was last found dead

    def _connect(self):
        conn = None
        try:
            conn = pymysql.connect(**self._params)
            with conn.cursor() as cur:
                cur.execute("SET time_zone = '+00:00'")
                cur.execute("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")
                cur.execute("SELECT @@max_allowed_packet, @@wait_timeout")
                packet, wait_timeout = cur.fetchone()
        except pymysql.err.MySQLError as exc:
            if conn is not None:
                _close_quietly(conn)
            raise JournalUnavailable(f"cannot connect to MySQL at {self._params['host']}: {exc}") from exc
        conn.max_allowed_packet = self._max_packet = int(packet)
        self._ping_after = min(PING_IDLE_AFTER, int(wait_timeout) / 2)
        return conn

    def oversize(self, *texts):
        """Why one statement carrying these JSON texts (None for NULL) would be too large for
        the server, or None if it fits.

        PyMySQL escapes a backslash or a quote as two characters, and JSON text is ASCII, so
        a text takes at most twice its length; the exact count is made only near the limit."""
        if self._max_packet is None:
            return None
        room = self._max_packet - PACKET_MARGIN - STATEMENT_MARGIN
        texts = [t for t in texts if t]
        if 2 * sum(map(len, texts)) <= room:
            return None
        size = sum(len(t) + sum(t.count(c) for c in _ESCAPED) for t in texts)
        if size <= room:
            return None
        return (f"{sum(map(len, texts)):,} bytes of JSON are {size:,} once escaped, more than one "
                f"statement may carry (the database's max_allowed_packet is {self._max_packet:,} bytes)")

    def read(self, fn):
        if self._closed:
            raise JournalUnavailable("the journal is closed")
        with waiting():  # a round trip to the server: other request threads may run meanwhile
            return self._read(fn)

    def _read(self, fn):
        if not self._slots.acquire(timeout=10):
            raise JournalUnavailable("all journal connections are busy")
        try:
            conn = self._checkout()
            for attempt in (1, 2):
                try:
                    with conn.cursor() as cur:
                        result = fn(cur)
                except (pymysql.err.OperationalError, pymysql.err.InterfaceError) as exc:
                    _close_quietly(conn)
                    if attempt == 2 or not _lost(exc):
                        raise JournalUnavailable(f"journal read failed: {exc}") from exc
                    self._lost_at = time.monotonic()  # its idle peers may be dead too: ping them
                    conn = self._connect()  # once more on a new connection, not another pooled one
                    continue
                except BaseException:
                    _close_quietly(conn)  # it may hold a half-read result
                    raise
                self._idle.put((conn, time.monotonic()))
                return result
        finally:
            self._slots.release()

    @contextmanager
    def transaction(self):
        """A user's transaction on a pooled connection: BEGIN, COMMIT, or ROLLBACK when the
        block raised. A connection that failed is closed, not put back."""
        if not self._slots.acquire(timeout=10):
            raise JournalUnavailable("all journal connections are busy")
        try:
            conn = self._checkout()
            try:
                conn.begin()
            except pymysql.err.MySQLError as exc:
                _close_quietly(conn)
                raise JournalUnavailable(f"cannot begin a transaction: {exc}") from exc
            healthy = False
            try:
                with conn.cursor() as cur:
                    yield cur
                conn.commit()
                healthy = True
            except BaseException:
                try:
                    conn.rollback()
                    healthy = True
                except pymysql.err.MySQLError:
                    log.debug("rollback failed; the connection is closed", exc_info=True)
                raise
            finally:
                if healthy:
                    self._idle.put((conn, time.monotonic()))
                else:
                    _close_quietly(conn)
        finally:
            self._slots.release()

    def _checkout(self):
        """A pooled connection that answers, or a new one (the caller holds a slot)."""
        while True:
            try:
                conn, since = self._idle.get_nowait()
            except queue.Empty:
                return self._connect()
            if time.monotonic() - since < self._ping_after and since > self._lost_at:
                return conn  # in use a moment ago and nothing seen dead since: no round trip
            try:
                conn.ping(reconnect=False)
                return conn
            except pymysql.err.MySQLError:
                _close_quietly(conn)
                self._lost_at = time.monotonic()

    def write_transaction(self, fn):
        conn = self._begin_on_writer()
        try:
            with conn.cursor() as cur:
                fn(cur)
            conn.commit()
        except BaseException as exc:
            self._rollback(conn)
            if isinstance(exc, pymysql.err.MySQLError):
                raise self._write_error(conn, exc) from exc
            raise

    def _write_error(self, conn, exc):
        """The outcome a failed write transaction maps to; a lost connection is replaced."""
        code = _code(exc)
        if code in _MYSQL_TRANSIENT:
            return TransientError(str(exc))
        if code in _MYSQL_TOO_LARGE or _lost(exc):
            self._writer = None
            _close_quietly(conn)
            self._lost_at = time.monotonic()
            if code in _MYSQL_TOO_LARGE:
                return WriteRefused(f"the database refused a statement as too large: {exc}")
            return JournalUnavailable(f"journal write failed: {exc}")
        return StatementError(str(exc))

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
                _close_quietly(conn)
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
                _close_quietly(self._idle.get_nowait()[0])
            except queue.Empty:
                break
        if self._writer is not None:
            _close_quietly(self._writer)
            self._writer = None


def _lost(exc):
    """True if a PyMySQL error says the connection is gone (not that a statement failed)."""
    return _code(exc) in _MYSQL_GONE or isinstance(exc, pymysql.err.InterfaceError)


def _close_quietly(conn):
    try:
        conn.close()
    except pymysql.err.Error:  # closing a dead connection may fail: it is dropped either way
        log.debug("closing a MySQL connection failed", exc_info=True)


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
    # the scheme only: the URL may hold a password
    raise ValueError(f"unsupported journal URL scheme {parsed.scheme!r}: "
                     "use sqlite:///path or mysql://user:pw@host/db")
