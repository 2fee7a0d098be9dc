"""Callback receivers that trickle their answer: each attempt ends at the callback timeout,
counts as failed and is retried; and one slow receiver does not starve the others."""
import json
import socket
import threading
import time

import pytest
from callback_receiver import Receiver
from conftest import wait_for

from jobserver import shares
from jobserver.server import JobServer
from jobserver.tasks import Registry

TASKS = Registry()
FAST = dict(workers=2, poll_interval=0.05, lease_seconds=5.0, shutdown_grace=1.0,
            callback_allow=("127.0.0.0/8",), callback_backoff=0.05)
TRICKLE = 0.5  # seconds between the bytes of the trickler's answer
#: an answer whose head never ends: a status line, then header after header
ENDLESS_ANSWER = b"HTTP/1.1 200 OK\r\n" + b"X-Slow: yes\r\n" * 10_000


@TASKS.task("t.echo")
def echo(ctx, **params):
    return params


class Trickler:
    """A receiver on 127.0.0.1 that answers every request one byte each TRICKLE seconds,
    for ever; it records when each connection came and when the client closed it."""

    def __init__(self):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.lock = threading.Lock()
        self.connections = []  # [accepted at, closed at or None]
        self.most_at_once = 0
        self.stopping = threading.Event()
        threading.Thread(target=self._accept, name="test-trickler", daemon=True).start()

    def url(self):
        return f"http://127.0.0.1:{self.port}/hook"

    def open_now(self):
        with self.lock:
            return self._open_locked()

    def _accept(self):
        while not self.stopping.is_set():
            try:
                conn, _addr = self.listener.accept()
            except OSError:
                return
            record = [time.monotonic(), None]
            with self.lock:
                self.connections.append(record)
                self.most_at_once = max(self.most_at_once, self._open_locked())
            threading.Thread(target=self._answer, args=(conn, record), daemon=True).start()

    def _open_locked(self):
        return sum(1 for _came, gone in self.connections if gone is None)

    def _answer(self, conn, record):
        conn.settimeout(TRICKLE)
        with conn:
            for i in range(len(ENDLESS_ANSWER)):
                if self.stopping.is_set() or self._client_closed(conn):
                    break
                try:
                    conn.sendall(ENDLESS_ANSWER[i:i + 1])
                except OSError:
                    break
        with self.lock:
            record[1] = time.monotonic()

    @staticmethod
    def _client_closed(conn):
        """Read what the client sent (its request) for up to TRICKLE seconds; True on EOF."""
        deadline = time.monotonic() + TRICKLE
        while (left := deadline - time.monotonic()) > 0:
            conn.settimeout(left)
            try:
                if not conn.recv(65536):
                    return True
            except TimeoutError:
                return False
            except OSError:
                return True
        return False

    def close(self):
        self.stopping.set()
        self.listener.close()


@pytest.fixture
def trickler():
    receiver = Trickler()
    yield receiver
    receiver.close()


@pytest.fixture
def make_server(db_url):
    servers = []

    def make(**options):
        server = JobServer(db_url, tasks=TASKS, **dict(FAST, **options))
        servers.append(server.start())
        return server
    yield make
    for server in servers:
        server.stop()


def callback_of(server, job_id, state, timeout=10.0):
    def settled():
        callback = server.get(job_id)["callback"]
        return callback if callback and callback["state"] == state else None
    return wait_for(settled, timeout=timeout, message=f"callback {state}")


def test_a_trickled_answer_ends_each_attempt_at_the_timeout_and_is_retried(make_server, trickler):
    timeout = 1.0
    server = make_server(callback_timeout=timeout, callback_attempts=3)
    job_id = server.submit("t.echo", callback_url=trickler.url())
    callback = callback_of(server, job_id, "failed", timeout=3 * timeout + 6)
    assert callback["attempts"] == 3 and callback["last_error"] == "ReadTimeout"
    wait_for(lambda: trickler.open_now() == 0, timeout=3, message="the trickler to see the closes")
    held = [gone - came for came, gone in trickler.connections]
    assert len(held) == 3 and max(held) < timeout + 0.75, held


def test_a_slow_receiver_does_not_starve_another(make_server, trickler):
    fast = Receiver()
    try:
        timeout = 5.0
        server = make_server(callback_workers=4, callback_timeout=timeout, callback_attempts=1)
        server.submit_many([{"task": "t.echo", "params": {"i": i}, "callback_url": trickler.url()}
                            for i in range(100)])
        wait_for(lambda: trickler.open_now() >= 2, timeout=5, message="slow deliveries in flight")
        started = time.monotonic()
        quick = server.submit_many([{"task": "t.echo", "params": {"i": i}, "callback_url": fast.url()}
                                    for i in range(5)])
        for job, _created in quick:
            callback_of(server, job["id"], "delivered", timeout=timeout)
        # delivered while the slow host's attempts were still in flight (they last 5 s)
        assert time.monotonic() - started < 3.0
        assert fast.count() == 5
        assert trickler.most_at_once <= 2  # half of the 4 delivery threads, at most
    finally:
        fast.close()


def test_a_claim_takes_rows_in_turn_across_receivers_within_their_share(monkeypatch):
    plan_for = shares.Shares(threads=4, put_off_ms=5000)  # a share of 2
    rows = [{"url": url} for url in ["http://a.example/1"] * 5 + ["http://b.example:81/"] * 2
            + ["HTTP://A.EXAMPLE:80/2", "https://a.example/"]]
    take, later, _ms = plan_for.plan(4)(rows)
    assert [row["receiver"] for row in take] == ["a.example:80", "b.example:81", "a.example:443",
                                                 "a.example:80"]
    assert later == []
    first_take = take
    for row in take:
        plan_for.started(row)
    monkeypatch.setattr(shares, "SLOW_AFTER", 0.0)  # busy "for long enough" at once
    rows = [{"url": url} for url in ["http://a.example/1"] * 3 + ["http://c.example/"]]
    take, later, later_ms = plan_for.plan(3)(rows)
    # a.example:80 has its whole share in flight: its rows are put off; c's are taken
    assert [row["receiver"] for row in take] == ["c.example:80"]
    assert [row["receiver"] for row in later] == ["a.example:80"] * 3 and later_ms == 5000
    # once its deliveries end, the receiver has its share again
    assert plan_for.plan(0)(rows)[0] == []  # no thread free, nothing taken
    for row in first_take:
        plan_for.finished(row)
    take, later, _ms = plan_for.plan(3)(rows)
    assert [row["receiver"] for row in take] == ["a.example:80", "c.example:80", "a.example:80"]
    assert later == []


# --- the raw POST: what goes out, and answers that are odd -----------------------------
class Scripted:
    """A receiver that reads each request whole and answers `answer` (raw bytes), then closes."""

    def __init__(self, answer):
        self.answer = answer
        self.requests = []  # raw request bytes
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._serve, name="test-scripted", daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _addr = self.listener.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                data = b""
                while b"\r\n\r\n" not in data and (chunk := conn.recv(65536)):
                    data += chunk
                head, _, body = data.partition(b"\r\n\r\n")
                length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                                  if line.lower().startswith(b"content-length:")))
                while len(body) < length and (chunk := conn.recv(65536)):
                    body += chunk
                self.requests.append(head + b"\r\n\r\n" + body)
                try:
                    conn.sendall(self.answer)
                except OSError:  # the client stopped reading (an answer too long)
                    pass

    def close(self):
        self.listener.close()


@pytest.mark.parametrize("answer, state, last_error", [
    (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n", "delivered", None),
    (b"HTTP/1.0 200\r\nContent-Length: 0\r\n\r\n", "delivered", None),
    (b"SSH-2.0-OpenSSH_9.6\r\n\r\n", "failed", "InvalidResponse"),
    (b"HTTP/1.1 200 OK\r\n" + b"X-Long: " + b"a" * 70_000 + b"\r\n\r\n", "failed", "InvalidResponse"),
    (b"", "failed", "ConnectionError"),
])
def test_odd_answers(sqlite_url, answer, state, last_error):
    receiver = Scripted(answer)
    try:
        with JobServer(sqlite_url, tasks=TASKS, **dict(FAST, callback_attempts=1)) as server:
            job_id = server.submit("t.echo", callback_url=f"http://127.0.0.1:{receiver.port}/hook")
            callback = callback_of(server, job_id, state)
            assert callback["last_error"] == last_error
    finally:
        receiver.close()


def test_the_request_is_one_http_post_with_its_target_escaped(sqlite_url):
    receiver = Scripted(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    try:
        with JobServer(sqlite_url, tasks=TASKS, **FAST) as server:
            url = f"http://127.0.0.1:{receiver.port}/h\u00e9/%41?q=\u00fc&r=1#frag"
            job_id = server.submit("t.echo", callback_url=url)
            callback_of(server, job_id, "delivered")
            public = server.get(job_id)
    finally:
        receiver.close()
    [raw] = receiver.requests
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    assert lines[0] == "POST /h%C3%A9/%41?q=%C3%BC&r=1 HTTP/1.1"  # no fragment; escapes kept
    headers = {name.lower(): value for name, _, value in (line.partition(": ") for line in lines[1:])}
    assert headers["host"] == f"127.0.0.1:{receiver.port}"
    assert headers["content-length"] == str(len(body)) and headers["connection"] == "close"
    assert headers["content-type"] == "application/json"
    assert headers["webhook-id"] and headers["webhook-signature"].startswith("v1,")
    assert json.loads(body)["id"] == job_id and public["callback"]["state"] == "delivered"
