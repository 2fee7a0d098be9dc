"""A real webhook receiver on 127.0.0.1 for the callback tests: scripted answers, recorded requests."""
import socket
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Receiver:
    """Answers POSTs from a script of (status, headers, sleep) and records each request.

    When the script runs out, it answers `default`."""

    def __init__(self, port=0, tls=None):
        self.requests = []
        self.script = []
        self.default = (200, {}, 0.0)
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", port), _handler(self))
        self._server.daemon_threads = True
        self.scheme = "http"
        if tls is not None:  # (certificate file, key file): serve https
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
            self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
            self.scheme = "https"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()

    @property
    def port(self):
        return self._server.server_address[1]

    def url(self, path="/hook"):
        return f"{self.scheme}://127.0.0.1:{self.port}{path}"

    def respond(self, *answers):
        """Queue answers: (status,), (status, headers) or (status, headers, sleep seconds)."""
        with self._lock:
            for answer in answers:
                status, headers, sleep = (tuple(answer) + ({}, 0.0))[:3]
                self.script.append((status, headers, sleep))

    def count(self):
        with self._lock:
            return len(self.requests)

    def _next(self, record):
        with self._lock:
            self.requests.append(record)
            return self.script.pop(0) if self.script else self.default

    def close(self):
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


def _handler(receiver):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            record = {"path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()},
                      "body": body, "at": time.monotonic()}
            status, headers, sleep = receiver._next(record)
            if sleep:
                time.sleep(sleep)
            try:
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")
            except OSError:  # the client gave up (timeout test)
                self.close_connection = True

        def log_message(self, *args):
            pass

    return Handler


def fake_dns(table):
    """A resolver answering from `table` (host -> [addresses]), shaped like getaddrinfo.
    The table is read at each call, so a test can change an answer (DNS rebinding)."""
    def resolve(host, port, type=0):
        if host not in table:
            raise socket.gaierror(socket.EAI_NONAME, "unknown host")
        return [(socket.AF_INET6 if ":" in a else socket.AF_INET, type, 6, "", (a, port))
                for a in table[host]]
    return resolve
