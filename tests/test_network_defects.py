"""The network edges, with real sockets: many idle and trickling connections do not lock
clients out of `jobserver serve`, and problems and /healthz reveal nothing of the
server's insides to an unauthenticated caller."""
import logging
import resource
import selectors
import socket
import sys
import threading
import time
from urllib.parse import urlparse, urlunparse

import pytest
import requests
from callback_receiver import fake_dns
from http_fixtures import TcpProxy, assert_problem, launch
from liveserver import JOBSERVER, ServeProcess, clean_env, run_cli

from jobserver.auth import create_token
from jobserver.urlguard import UrlGuard

JOB = {"task": "demo.echo", "params": {}}
SILENT = 500
TRICKLING = 490
SLOW_BODIES = 10
HEADER_TIMEOUT = 3
BODY_TIMEOUT = 5
#: a request head that never ends within the test, sent one byte every TRICKLE seconds
TRICKLE = 0.5
NEVER_ENDING_HEAD = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: " + b"a" * 4096
#: a whole head at once, then a body that never ends within the test
SLOW_BODY_HEAD = b"POST /jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 4096\r\n\r\n"
#: the child's soft fd limit before `serve` raises it (select() could not watch past 1024)
CHILD_SOFT_LIMIT = 1024
_EXEC_WITH_LIMIT = ("import os, resource, sys; "
                    "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE); "
                    "resource.setrlimit(resource.RLIMIT_NOFILE, (int(sys.argv[1]), hard)); "
                    "os.execv(sys.argv[2], sys.argv[2:])")


# --- 1,000 idle and trickling connections ------------------------------------------------
@pytest.fixture
def fd_room():
    """Room in this process for the test's 1,000 sockets (the soft limit raised if need be)."""
    need = SILENT + TRICKLING + SLOW_BODIES + 256
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < need + CHILD_SOFT_LIMIT:
        pytest.skip(f"the hard fd limit {hard} is too low for {need} sockets")
    if soft != resource.RLIM_INFINITY and soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


class Crowd:
    """Connections to a server: silent ones, ones trickling a request head that never ends
    a byte each TRICKLE seconds, and ones trickling a body alike. `wait_closed()` waits
    for the server to close them."""

    def __init__(self, port):
        self.port = port
        self.silent, self.trickling, self.slow_bodies = [], [], []
        self.closed_at = {}  # socket -> when the server's close was seen
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._trickle, name="test-trickle", daemon=True)

    def connect(self, silent, trickling, slow_bodies):
        for count, group in ((silent, self.silent), (trickling, self.trickling),
                             (slow_bodies, self.slow_bodies)):
            for _ in range(count):
                sock = socket.create_connection(("127.0.0.1", self.port), timeout=5)
                if group is self.slow_bodies:
                    sock.sendall(SLOW_BODY_HEAD)
                sock.setblocking(False)
                group.append(sock)
        self._thread.start()

    def _trickle(self):
        sent = 0
        while not self._stop.wait(TRICKLE):
            for sock in self.trickling + self.slow_bodies:
                try:
                    sock.send(b"{" if sock in self.slow_bodies else NEVER_ENDING_HEAD[sent:sent + 1])
                except OSError:  # closed by the server (EPIPE, ECONNRESET): it stays closed
                    pass
            sent = min(sent + 1, len(NEVER_ENDING_HEAD) - 1)

    def wait_closed(self, sockets, timeout):
        """Wait until the server closed every one of `sockets`; the number still open."""
        selector = selectors.DefaultSelector()
        for sock in sockets:
            if sock not in self.closed_at:
                selector.register(sock, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        try:
            while selector.get_map() and time.monotonic() < deadline:
                for key, _events in selector.select(deadline - time.monotonic()):
                    try:
                        data = key.fileobj.recv(4096)
                    except BlockingIOError:
                        continue
                    except OSError:
                        data = b""
                    if not data:
                        self.closed_at[key.fileobj] = time.monotonic()
                        selector.unregister(key.fileobj)
            return len(selector.get_map())
        finally:
            selector.close()

    def close(self):
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
        for sock in self.silent + self.trickling + self.slow_bodies:
            sock.close()


def test_serve_refuses_a_connection_bound_that_is_not_positive(tmp_path):
    serve = ServeProcess(tmp_path / "serve.log", db=f"sqlite:///{tmp_path / 'j.db'}")
    result = run_cli(*serve.cmd[1:], "--header-timeout", "0")
    assert result.returncode == 2 and "header_timeout must be positive" in result.stderr


def _timed(method, url, **kwargs):
    started = time.monotonic()
    response = requests.request(method, url, timeout=10, **kwargs)
    return response, time.monotonic() - started


@pytest.mark.timeout(90)
def test_a_thousand_idle_and_trickling_connections_lock_no_client_out(tmp_path, fd_room):
    serve = ServeProcess(tmp_path / "serve.log", db=f"sqlite:///{tmp_path / 'j.db'}",
                         env=clean_env(JOBSERVER_HEADER_TIMEOUT=str(HEADER_TIMEOUT),
                                       JOBSERVER_BODY_TIMEOUT=str(BODY_TIMEOUT)))
    # the child starts with a soft fd limit of 1,024: serve must raise it to hold 1,000 clients
    serve.cmd = [sys.executable, "-c", _EXEC_WITH_LIMIT, str(CHILD_SOFT_LIMIT), JOBSERVER] + serve.cmd[1:]
    crowd = None
    with serve:
        # a long poll that outlasts the head deadline: being served, it must not be cut
        held = requests.post(serve.url + "/jobs", json=dict(JOB, delay=60), timeout=10).json()
        long_poll = {}

        def poll():
            url = f"{serve.url}/jobs/{held['id']}?wait={HEADER_TIMEOUT + 3}"
            long_poll["response"], long_poll["seconds"] = _timed("GET", url)
        poller = threading.Thread(target=poll, name="test-long-poll")
        poller.start()
        crowd = Crowd(serve.port)
        try:
            crowd.connect(SILENT, TRICKLING, SLOW_BODIES)
            opened = time.monotonic()
            for _ in range(3):
                health, seconds = _timed("GET", serve.url + "/healthz")
                assert health.status_code == 200 and seconds < 1.0, (health.status_code, seconds)
                submit, seconds = _timed("POST", serve.url + "/jobs", json=JOB)
                assert submit.status_code == 202 and seconds < 1.0, (submit.status_code, seconds)
            # every trickler and every silent connection is dropped after the head deadline
            # (swept once a second), however busy the trickle keeps it
            still_open = crowd.wait_closed(crowd.trickling + crowd.silent, timeout=HEADER_TIMEOUT + 6)
            assert still_open == 0
            first_close = min(crowd.closed_at.values()) - opened
            assert first_close >= HEADER_TIMEOUT - 1.5, "connections were closed before their deadline"
            # a request whose head came whole gets the longer deadline for its body
            assert crowd.wait_closed(crowd.slow_bodies, timeout=BODY_TIMEOUT + 4) == 0
            assert min(crowd.closed_at[sock] for sock in crowd.slow_bodies) - opened >= BODY_TIMEOUT - 1.5
            poller.join(HEADER_TIMEOUT + 10)
            assert long_poll["response"].status_code == 200
            assert long_poll["seconds"] >= HEADER_TIMEOUT + 2.5  # held for its whole wait
            # and a keep-alive client that just finished a request is not cut by the sweep
            with requests.Session() as session:
                assert session.get(serve.url + "/healthz", timeout=5).status_code == 200
                time.sleep(1.5)
                assert session.get(serve.url + "/healthz", timeout=5).status_code == 200
        finally:
            crowd.close()
            poller.join(15)


# --- what problems and /healthz reveal -------------------------------------------------
@pytest.mark.mysql
def test_an_unreachable_journal_is_a_generic_503_and_the_log_has_the_rest(mysql_url, caplog):
    url = urlparse(mysql_url)
    proxy = TcpProxy((url.hostname, url.port or 3306))
    auth = url.username + (f":{url.password}" if url.password else "")
    caplog.set_level(logging.WARNING, logger="jobserver")
    try:
        with launch(urlunparse(url._replace(netloc=f"{auth}@127.0.0.1:{proxy.port}")),
                    start=False) as live:
            job_id = live.post("/jobs", json={"task": "t.echo"}).json()["id"]
            proxy.cut()
            answers = [live.get("/healthz"), live.get(f"/jobs/{job_id}"), live.get("/jobs"),
                       live.post("/jobs", json={"task": "t.echo"}),
                       live.post(f"/jobs/{job_id}/cancel")]
    finally:
        proxy.close()
    for r in answers:
        body = assert_problem(r, 503)
        for secret in ("127.0.0.1", str(proxy.port), "MySQL", "2003", "2013", "connect", "journal read"):
            assert secret.lower() not in body["detail"].lower(), body
        assert body["request_id"] == r.headers["X-Request-Id"]
        logged = [rec.getMessage() for rec in caplog.records if body["request_id"] in rec.getMessage()]
        assert logged, f"no log line names request {body['request_id']}"
        # the operator's line has what the client was not told: the cause, with its address
        assert any("127.0.0.1" in line or "MySQL" in line or "journal" in line for line in logged), logged
    assert any(str(proxy.port) in rec.getMessage() or "(20" in rec.getMessage()
               for rec in caplog.records), "the driver's text is in no log line"


def test_healthz_shows_the_node_only_to_an_admin(sqlite_url):
    with launch(sqlite_url) as live:
        assert live.get("/healthz").json() == {"status": "ok"}  # open mode: anyone
        journal = live.server.journal
        alice = create_token(journal, "alice")
        root = create_token(journal, "root", admin=True)
        for token in (None, alice, "not-a-token"):
            r = live.get("/healthz", token=token)
            assert r.status_code == 200 and r.json() == {"status": "ok"}, (token, r.text)
        deadline = time.monotonic() + 5  # tokens take effect within the auth cache's second
        while "node" not in (admin := live.get("/healthz", token=root).json()):
            assert time.monotonic() < deadline, admin
            time.sleep(0.05)
        assert admin == {"status": "ok", "node": live.server.pool.node_id}


def test_a_refused_callback_host_is_named_but_not_what_it_resolves_to(sqlite_url):
    with launch(sqlite_url) as live:
        guard = UrlGuard(resolver=fake_dns({"db.internal.example": ["10.20.30.40"]}))
        live.server.callback_guard = guard.check
        for url, status in (("http://db.internal.example/hook", 422), ("http://nowhere.example/", 422)):
            body = assert_problem(live.post("/jobs", json={"task": "t.echo", "callback_url": url}), status)
            assert urlparse(url).hostname in body["detail"]
            for secret in ("10.20.30.40", "10.", "unknown host", "Errno"):
                assert secret not in body["detail"], body
