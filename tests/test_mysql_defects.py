"""MySQL/MariaDB connection reliability, against real servers.

- the reader pool after the server dropped its idle connections (KILL, wait_timeout);
- MySQL 8's error 4031 (disconnected for inactivity) is a lost connection;
- a document that fits the 8 MiB cap but not the server's max_allowed_packet once escaped
  fails its job (or its submit) with a clear error instead of being retried for ever;
- a claim whose COMMIT reply was lost gives its jobs back without counting a crash.

The packet tests that need a server with a small max_allowed_packet run a private MariaDB
(mariadb-install-db into a temporary folder, mariadbd on a free port): the machine's server
is never reconfigured."""
import threading
from urllib.parse import urlparse

import pymysql
import pytest
from conftest import wait_for

from jobserver.errors import JournalUnavailable
from jobserver.journal import open_journal

pytestmark = pytest.mark.mysql

INACTIVITY = "The client was disconnected by the server because of inactivity."


def _admin(url):
    p = urlparse(url)
    return pymysql.connect(host=p.hostname, port=p.port or 3306, user=p.username or "root",
                           password=p.password or "", autocommit=True, connect_timeout=5)


def _database(url):
    return urlparse(url).path.lstrip("/")


def _session_ids(admin, database):
    with admin.cursor() as cur:
        cur.execute("SELECT ID FROM information_schema.PROCESSLIST WHERE DB = %s", (database,))
        return {row[0] for row in cur.fetchall()}


def _fill_reader_pool(journal, n, setup=None):
    """Make the pool hold `n` idle reader connections (n reads at once); returns their ids."""
    ids, gate = set(), threading.Barrier(n)

    def read(cur):
        if setup:
            cur.execute(setup)
        cur.execute("SELECT CONNECTION_ID()")
        ids.add(cur.fetchone()[0])
        gate.wait(10)  # every thread holds its own connection before any gives it back

    threads = [threading.Thread(target=journal.driver.read, args=(read,)) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(ids) == n
    return ids


# --- the reader pool after the server dropped its connections ---------------------------------
def test_reads_after_the_server_killed_every_idle_reader_all_succeed(mysql_url):
    j = open_journal(mysql_url)
    admin = _admin(mysql_url)
    try:
        readers = _fill_reader_pool(j, 8)
        with admin.cursor() as cur:
            for connection_id in readers:
                cur.execute("KILL CONNECTION %s", (connection_id,))
        wait_for(lambda: not readers & _session_ids(admin, _database(mysql_url)),
                 message="the killed sessions to end")
        failures = []
        for _ in range(20):
            try:
                assert j.count_queued() == 0
            except JournalUnavailable as exc:
                failures.append(str(exc))
        assert failures == [], f"{len(failures)} of 20 reads failed on dead pooled connections"
    finally:
        admin.close()
        j.close()


def test_reads_after_idle_readers_timed_out_all_succeed(mysql_url):
    """The server closes sessions idle past their wait_timeout (set per session here: the
    machine's server-wide setting is left alone)."""
    j = open_journal(mysql_url)
    admin = _admin(mysql_url)
    try:
        readers = _fill_reader_pool(j, 8, setup="SET SESSION wait_timeout = 1")
        wait_for(lambda: not readers & _session_ids(admin, _database(mysql_url)), timeout=15,
                 message="the server to close the idle sessions")
        failures = []
        for _ in range(20):
            try:
                j.ping()
            except JournalUnavailable as exc:
                failures.append(str(exc))
        assert failures == [], f"{len(failures)} of 20 reads failed on timed-out pooled connections"
    finally:
        admin.close()
        j.close()


def test_error_4031_is_a_lost_connection_in_reads_and_writes(mysql_url):
    """MySQL 8 tells a client it dropped for inactivity with error 4031 on the next command;
    MariaDB cannot be made to send it, so the read and the write raise it as PyMySQL would."""
    j = open_journal(mysql_url)
    try:
        calls = []

        def read(cur):
            calls.append(cur.connection)
            if len(calls) == 1:
                raise pymysql.err.OperationalError(4031, INACTIVITY)
            cur.execute("SELECT 1")
            return cur.fetchone()[0]
        assert j.driver.read(read) == 1  # tried again on a fresh connection
        assert calls[0] is not calls[1]

        def write(cur):
            cur.execute("SELECT 1")
            raise pymysql.err.OperationalError(4031, INACTIVITY)
        # a lost connection (the writer is replaced), not a statement the server refused
        with pytest.raises(JournalUnavailable):
            j.driver.write_transaction(write)
        j.driver.write_transaction(lambda cur: cur.execute("SELECT 1"))
    finally:
        j.close()
