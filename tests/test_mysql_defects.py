"""MySQL/MariaDB connection reliability, against real servers.

- the reader pool after the server dropped its idle connections (KILL, wait_timeout);
- MySQL 8's error 4031 (disconnected for inactivity) is a lost connection;
- a document that fits the 8 MiB cap but not the server's max_allowed_packet once escaped
  fails its job (or its submit) with a clear error instead of being retried for ever;
- a claim whose COMMIT reply was lost gives its jobs back without counting a crash.

The packet tests that need a server with a small max_allowed_packet run a private MariaDB
(mariadb-install-db into a temporary folder, mariadbd on a free port): the machine's server
is never reconfigured."""
import getpass
import os
import shutil
import socket
import struct
import subprocess
import threading
import time
import uuid
from urllib.parse import urlparse, urlunparse

import pymysql
import pytest
from conftest import wait_for

from jobserver import InvalidJob, JobServer, Registry
from jobserver.errors import JournalUnavailable, WriteRefused
from jobserver.ids import new_id
from jobserver.journal import open_journal

pytestmark = pytest.mark.mysql

TERMINAL = {"succeeded", "failed", "cancelled"}
FAST = dict(workers=2, poll_interval=0.05, lease_seconds=5, shutdown_grace=1)
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


def _finished(server, job_id, timeout):
    return wait_for(lambda: (lambda job: job if job["state"] in TERMINAL else None)(server.get(job_id)),
                    timeout=timeout, message=f"job {job_id} to end")


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


# --- documents that the server's max_allowed_packet cannot take ----------------------------------
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def small_packet_server(tmp_path_factory):
    """A private MariaDB with max_allowed_packet = 4 MiB, as production servers often have.

    Skipped (with the reason) where the MariaDB binaries are absent, but failed under CI."""
    mariadbd, install = shutil.which("mariadbd") or "/usr/sbin/mariadbd", shutil.which("mariadb-install-db")
    if not (os.access(mariadbd, os.X_OK) and install):
        message = "mariadbd and mariadb-install-db are needed for a private MariaDB instance"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message)
        pytest.skip(message)
    base = tmp_path_factory.mktemp("mariadb")
    user = ["--user=" + getpass.getuser()] if os.geteuid() == 0 else []
    small = ["--innodb-log-file-size=8M", "--innodb-buffer-pool-size=16M", "--skip-name-resolve"]
    subprocess.run([install, "--no-defaults", f"--datadir={base / 'data'}", "--skip-test-db",
                    "--auth-root-authentication-method=normal", *user, *small],
                   check=True, capture_output=True, timeout=120)
    port = _free_port()
    log = base / "error.log"
    proc = subprocess.Popen([mariadbd, "--no-defaults", f"--datadir={base / 'data'}", *user, *small,
                             f"--socket={base / 'mysql.sock'}", f"--port={port}",
                             "--bind-address=127.0.0.1", "--max-allowed-packet=4M", "--skip-log-bin",
                             f"--pid-file={base / 'mariadbd.pid'}", f"--log-error={log}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"mysql://root@127.0.0.1:{port}/test"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                _admin(url).close()
                break
            except pymysql.err.OperationalError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"the private MariaDB did not start: {log.read_text()[-2000:]}")
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def small_packet_url(small_packet_server):
    """A fresh database on the private 4 MiB-packet server."""
    name = "jst_" + uuid.uuid4().hex[:12]
    admin = _admin(small_packet_server)
    with admin.cursor() as cur:
        cur.execute("CREATE DATABASE " + name)  # hex digits only
    yield urlunparse(urlparse(small_packet_server)._replace(path="/" + name))
    with admin.cursor() as cur:
        cur.execute("DROP DATABASE IF EXISTS " + name)
    admin.close()


def _quotes(json_bytes):
    """A string whose JSON text is about `json_bytes` long, every character escaped twice over:
    JSON makes each `"` into `\\"`, and PyMySQL escapes both of those characters again."""
    return '"' * (json_bytes // 2 - 1)


def _big_result_tasks():
    registry = Registry()

    @registry.task("t.big")
    def big(ctx, size):
        return _quotes(size)

    @registry.task("t.big_step")
    def big_step(ctx, size):
        return ctx.step("load", lambda: _quotes(size))

    @registry.task("t.echo")
    def echo(ctx, **params):
        return params
    return registry


def _assert_refused_and_server_works(server, job_id, error_type="OutcomeRefused"):
    """A refused outcome fails the job as OutcomeRefused; a refused step result raises
    WriteRefused out of ctx.step() into the task, which fails with it."""
    started = time.monotonic()
    job = _finished(server, job_id, timeout=30)
    assert job["state"] == "failed", job["state"]
    assert job["error"]["type"] == error_type
    assert "max_allowed_packet" in job["error"]["message"]
    assert time.monotonic() - started < 20
    other = server.submit("t.echo", {"after": True})
    assert _finished(server, other, timeout=20)["result"] == {"after": True}


def test_a_result_too_large_once_escaped_fails_its_job(small_packet_url):
    """~7.9 MiB of JSON (under the 8 MiB cap), ~15.8 MiB once escaped, on a 4 MiB-packet server."""
    with JobServer(small_packet_url, tasks=_big_result_tasks(), **FAST) as server:
        job_id = server.submit("t.big", {"size": int(7.9 * 2**20)})
        _assert_refused_and_server_works(server, job_id)


def test_a_result_that_fits_only_unescaped_fails_but_one_that_fits_escaped_succeeds(small_packet_url):
    with JobServer(small_packet_url, tasks=_big_result_tasks(), **FAST) as server:
        fits = server.submit("t.big", {"size": int(1.9 * 2**20)})  # 3.8 MiB escaped
        assert len(_finished(server, fits, timeout=30)["result"]) > 900_000
        job_id = server.submit("t.big", {"size": 3 * 2**20})  # 3 MiB of JSON, 6 MiB escaped
        _assert_refused_and_server_works(server, job_id)


def test_a_step_result_too_large_once_escaped_fails_its_job(small_packet_url):
    with JobServer(small_packet_url, tasks=_big_result_tasks(), **FAST) as server:
        job_id = server.submit("t.big_step", {"size": 3 * 2**20})
        _assert_refused_and_server_works(server, job_id, "WriteRefused")


def test_params_too_large_once_escaped_are_an_invalid_job(small_packet_url):
    with JobServer(small_packet_url, tasks=_big_result_tasks(), **FAST) as server:
        with pytest.raises(InvalidJob, match="max_allowed_packet"):
            server.submit("t.echo", {"s": _quotes(3 * 2**20)})
        assert _finished(server, server.submit("t.echo", {"n": 1}), timeout=20)["result"] == {"n": 1}


def test_a_statement_over_the_packet_is_refused_before_it_is_sent(small_packet_url):
    """Any statement, not only the documents the journal checks: the server would drop the
    connection (PyMySQL says 2006 "gone away", as for a dead server) on every retry."""
    j = open_journal(small_packet_url)
    try:
        with pytest.raises(WriteRefused, match="max_allowed_packet"):
            j.driver.write_transaction(lambda cur: cur.execute("SELECT %s", ("x" * (5 * 2**20),)))
        with pytest.raises(WriteRefused, match="max_allowed_packet"):
            j.driver.read(lambda cur: cur.execute("SELECT %s", ("x" * (5 * 2**20),)))
        j.driver.write_transaction(lambda cur: cur.execute("SELECT %s", ("x" * (3 * 2**20),)))
    finally:
        j.close()


def test_a_refused_statement_fails_only_its_own_write_in_a_shared_batch(small_packet_url):
    """A write too large for the packet shares a transaction with good ones: only it fails."""
    j = open_journal(small_packet_url)
    try:
        [(job, _)] = j.insert_jobs([_job()])
        [claimed] = j.claim("node-a", 1, 60_000)
        outcomes, refused, lock = [], [], threading.Lock()

        def good(n):
            try:
                j.insert_jobs([_job()])
                ok = True
            except JournalUnavailable:
                ok = False
            with lock:
                outcomes.append(ok)

        def bad():
            try:
                j.setting("huge", lambda: "x" * (5 * 2**20))  # no up-front check: the cursor's
            except JournalUnavailable as exc:
                refused.append(exc)

        for i in range(1500):  # a backlog, so that what follows shares one transaction
            j.set_progress(job.id, claimed.lease_token, {"done": i})
        threads = [threading.Thread(target=good, args=(n,)) for n in range(8)]
        threads.insert(4, threading.Thread(target=bad))
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert outcomes == [True] * 8
        assert [type(exc) for exc in refused] == [WriteRefused]
        assert j.count_queued() == 8
    finally:
        j.close()


def test_a_result_at_the_document_cap_fails_its_job_on_a_default_server(mysql_url):
    """The default 16 MiB packet: a result of exactly 8 MiB of JSON text is just over it once
    escaped (the shared server's settings are only read, never changed)."""
    admin = _admin(mysql_url)
    with admin.cursor() as cur:
        cur.execute("SELECT @@max_allowed_packet")
        packet = cur.fetchone()[0]
    admin.close()
    if packet > 16 * 2**20:
        pytest.skip(f"this server takes packets of {packet} bytes: an 8 MiB document always fits")
    with JobServer(mysql_url, tasks=_big_result_tasks(), **FAST) as server:
        job_id = server.submit("t.big", {"size": 8 * 2**20})
        _assert_refused_and_server_works(server, job_id)


# --- a claim whose COMMIT reply was lost -----------------------------------------------------
class CommitReplyCutter:
    """A MySQL-aware TCP relay: once armed, the COMMIT of the next transaction that claimed a
    job reaches the server (which commits it), and the reply is dropped with the connection.

    It reads the client's command packets (3-byte length, sequence number, command byte;
    0x03 is a query) to see the claim's UPDATE and the COMMIT that follows it."""

    CLAIM = b"UPDATE jobs SET state = 'running'"

    def __init__(self, target):
        self.target = target
        self.armed = threading.Event()
        self.cuts = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, url):
        p = urlparse(url)
        auth = p.username + (f":{p.password}" if p.password else "")
        return urlunparse(p._replace(netloc=f"{auth}@127.0.0.1:{self.port}"))

    def _accept(self):
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            state = {"claimed": False, "swallow": False, "pumps": 2, "lock": threading.Lock()}
            threading.Thread(target=self._requests, args=(client, upstream, state), daemon=True).start()
            threading.Thread(target=self._replies, args=(upstream, client, state), daemon=True).start()

    def _requests(self, src, dst, state):
        buffer = b""
        try:
            while data := src.recv(65536):
                buffer += data
                while len(buffer) >= 4:
                    length = struct.unpack("<I", buffer[:3] + b"\0")[0]
                    if len(buffer) < 4 + length:
                        break
                    packet, buffer = buffer[:4 + length], buffer[4 + length:]
                    self._inspect(packet, state)
                    dst.sendall(packet)
        except OSError:
            pass
        self._done(src, dst, state)

    def _inspect(self, packet, state):
        if packet[3] != 0 or packet[4:5] != b"\x03":  # only a query that opens a command
            return
        query = packet[5:]
        if query.startswith(self.CLAIM):
            state["claimed"] = True
        elif query in (b"COMMIT", b"ROLLBACK"):
            if query == b"COMMIT" and state["claimed"] and self.armed.is_set():
                self.armed.clear()
                state["swallow"] = True  # before the COMMIT is sent: its reply is the next data
            state["claimed"] = False

    def _replies(self, src, dst, state):
        try:
            while data := src.recv(65536):
                if state["swallow"]:  # the server committed; the client never hears so
                    self.cuts += 1
                    break
                dst.sendall(data)
        except OSError:
            pass
        self._done(src, dst, state)

    @staticmethod
    def _done(src, dst, state):
        """One direction ended: end the other (shutdown wakes its recv); the last one closes."""
        for sock in (src, dst):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        with state["lock"]:
            state["pumps"] -= 1
            last = state["pumps"] == 0
        if last:
            src.close()
            dst.close()

    def close(self):
        try:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes accept()
        except OSError:
            pass
        self._listener.close()


def test_a_claim_whose_commit_reply_was_lost_is_given_back_without_a_crash(mysql_url):
    p = urlparse(mysql_url)
    proxy = CommitReplyCutter((p.hostname, p.port or 3306))
    registry, runs = Registry(), []

    @registry.task("t.once")
    def once(ctx):
        runs.append(ctx.attempt)
        return "ran"

    try:
        with JobServer(proxy.url(mysql_url), tasks=registry, **dict(FAST, workers=1)) as server:
            proxy.armed.set()
            started = time.monotonic()
            job_id = server.submit("t.once")
            job = _finished(server, job_id, timeout=30)
            took = time.monotonic() - started
            row = server.journal.get_job(job_id)
        assert proxy.cuts == 1, "the claim's COMMIT reply was not cut"
        assert (job["state"], job["result"], runs) == ("succeeded", "ran", [1])
        assert (row.attempts, row.crashes) == (1, 0), "the lost claim was counted as a crash"
        assert took < FAST["lease_seconds"], "the job waited for its lease to run out"
    finally:
        proxy.close()


def test_jobs_held_under_this_node_that_it_does_not_run_are_given_back(db_url):
    """The recovery after a claim in doubt, on both journals: a job held under our node id
    with a lease we do not know goes back to the queue, with neither an attempt nor a crash."""
    j = open_journal(db_url)
    try:
        [(held, _)] = j.insert_jobs([_job()])
        [(ours, _)] = j.insert_jobs([_job()])
        [(other, _)] = j.insert_jobs([_job()])
        claimed = {job.id: job for job in j.claim("node-a", 2, 60_000)}
        j.claim("node-b", 1, 60_000)
        known = {(ours.id, claimed[ours.id].lease_token)}
        assert j.give_back_unknown("node-a", known) == [held.id]
        assert [(r.state, r.attempts, r.crashes) for r in map(j.get_job, (held.id,))] == [
            ("queued", 0, 0)]
        assert j.get_job(ours.id).state == "running"  # what we run is left alone
        assert j.get_job(other.id).lease_owner == "node-b"  # and other nodes' jobs
    finally:
        j.close()


def _job():
    return {"id": new_id(), "task": "t.echo", "owner": "alice", "params": "{}", "priority": 0,
            "max_retries": 0, "timeout": None, "callback_url": None, "idempotency_key": None,
            "request_hash": None}


# --- no secret in an error ----------------------------------------------------------------------
def test_no_error_from_the_driver_carries_the_password(mysql_url):
    p = urlparse(mysql_url)
    secret = "S3cretPW-" + uuid.uuid4().hex[:6]
    wrong_password = urlunparse(p._replace(netloc=f"{p.username}:{secret}@{p.hostname}:{p.port or 3306}"))
    nobody_listens = urlunparse(p._replace(netloc=f"{p.username}:{secret}@127.0.0.1:{_free_port()}"))
    for url in (wrong_password, nobody_listens):
        with pytest.raises(JournalUnavailable) as caught:
            open_journal(url)
        assert secret not in str(caught.value) and secret not in repr(caught.value.__cause__)
    with pytest.raises(ValueError) as caught:
        open_journal("mysq://" + wrong_password.split("://", 1)[1])
    assert secret not in str(caught.value)

