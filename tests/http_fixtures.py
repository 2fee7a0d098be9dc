"""A live HTTP server for tests: a JobServer, create_app, and real waitress on a free port.

`launch(db_url)` is the server as a context manager; the `live` and `live_sqlite`
fixtures (conftest.py) are built on it and need no import. TASKS and FAST are the test
tasks and the short intervals every in-process server of the suite uses."""
import socket
import threading
from contextlib import ExitStack, contextmanager

import requests
from waitress import wasyncore

from jobserver.http import create_app
from jobserver.httpserver import create_http_server
from jobserver.server import JobServer
from jobserver.tasks import Registry

TASKS = Registry()
PROBLEM = "application/problem+json"
# short intervals so tests wait for work, not for the clock
FAST = dict(workers=2, poll_interval=0.05, lease_seconds=5.0, shutdown_grace=1.0)


@TASKS.task("t.echo")
def echo(ctx, **params):
    return params


@TASKS.task("t.sleep")
def sleep(ctx, seconds=0.3):
    """Sleeps, stopping early when cancelled (as demo.sleep does)."""
    ctx.wait(seconds)
    ctx.check_cancelled()
    return seconds


@TASKS.task("t.fail")
def fail(ctx, message="boom"):
    raise RuntimeError(message)


class Live:
    """A running server: `.server` (JobServer), `.url(path)`, and requests helpers."""

    def __init__(self, server, base, prefix=""):
        self.server = server
        self.base = base
        self.prefix = prefix
        self.session = requests.Session()

    def url(self, path):
        return self.base + self.prefix + path

    def request(self, method, path, token=None, **kwargs):
        headers = dict(kwargs.pop("headers", None) or {})
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        kwargs.setdefault("timeout", 30)
        return self.session.request(method, self.url(path), headers=headers, **kwargs)

    def get(self, path, **kwargs):
        return self.request("GET", path, **kwargs)

    def post(self, path, **kwargs):
        return self.request("POST", path, **kwargs)


@contextmanager
def serving(app, threads=8):
    """Serve a WSGI app with waitress on 127.0.0.1 and a free port; yields the base URL.

    waitress has no stop(): the loop runs here in short polls until told to stop, and
    every socket is closed by the loop's own thread once the request threads are done,
    so no thread writes to a descriptor another thread has closed."""
    httpd = create_http_server(app, host="127.0.0.1", port=0, threads=threads)
    stop = threading.Event()

    def run():
        while not stop.is_set():
            httpd.asyncore.loop(timeout=0.05, map=httpd._map, count=1)  # the server's loop
        wasyncore.close_all(httpd._map)

    thread = threading.Thread(target=run, name="test-waitress", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.effective_port}"
    finally:
        httpd.task_dispatcher.shutdown(timeout=10)  # lets running requests finish
        stop.set()
        thread.join(10)


@contextmanager
def launch(db_url, url_prefix="", tasks=TASKS, start=True, **overrides):
    """A JobServer (started unless start=False: then jobs are only journaled, never run)
    behind a live HTTP server; everything stopped afterwards."""
    options = dict(FAST, **overrides)
    with ExitStack() as stack:
        server = JobServer(db_url, tasks=tasks, **options)
        if start:
            server.start()
        stack.callback(server.stop)
        base = stack.enter_context(serving(create_app(server, url_prefix=url_prefix)))
        # open event streams (a browser's) end first: waitress waits for its threads
        stack.callback(server.events.close)
        live = Live(server, base, url_prefix)
        stack.callback(live.session.close)
        yield live


def assert_problem(response, status):
    """The response is an RFC 9457 problem with this status; returns its body."""
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"].startswith(PROBLEM), response.headers
    body = response.json()
    assert body["status"] == status
    assert isinstance(body["type"], str) and body["type"]
    assert isinstance(body["title"], str) and body["title"]
    assert isinstance(body["detail"], str)
    assert "Traceback" not in response.text
    return body


class TcpProxy:
    """A TCP relay on 127.0.0.1 in front of `target`, to cut a journal's network for real.

    `cut()` drops every relayed connection and refuses new ones; `resume()` listens on
    the same port again."""

    def __init__(self, target):
        self.target = target
        self._lock = threading.Lock()
        self._sockets = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._start()

    def _start(self):
        threading.Thread(target=self._accept, args=(self._listener,), daemon=True).start()

    def _accept(self, listener):
        while True:
            try:
                client, _addr = listener.accept()
            except OSError:
                return  # listener closed by cut()
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                if listener.fileno() == -1:  # cut() ran meanwhile: this one is cut too
                    client.close()
                    upstream.close()
                    return
                self._sockets += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pump(src, dst):
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for sock in (src, dst):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self):
        with self._lock:
            sockets, self._sockets = [self._listener] + self._sockets, []
        for sock in sockets:  # shutdown first: close() alone wakes neither accept() nor recv()
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def resume(self):
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._start()

    def close(self):
        self.cut()


def __getattr__(name):
    """`from http_fixtures import live` as test modules wrote it before the fixtures moved
    to conftest.py: the same fixture, so such a module keeps running."""
    if name in ("live", "live_sqlite"):
        import conftest
        return getattr(conftest, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
