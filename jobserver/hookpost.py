"""One webhook POST to a checked address, bounded as a whole by one deadline.

An HTTP client's timeout is usually per operation: a receiver that sends its answer a
byte every half second never lets a read time out, and holds the delivery thread for as
long as it likes. Here every step (connect, TLS handshake, each send, each read of the
status line and headers) waits at most for what is left of the deadline, so the whole
exchange ends by then. (CPython bounds a TLS read or handshake as a whole by the socket
timeout; a plain recv returns with the first bytes.) The body of the answer is not read:
the status and the headers are what count.

The connection goes to `target.address`, the address the SSRF guard just approved; the
Host header, TLS SNI and the certificate check use the name as written. One request per
connection (`Connection: close`), no proxies, no redirects, nothing read from the
environment.
"""
import functools
import socket
import ssl
import time
from dataclasses import dataclass
from urllib.parse import quote, urlsplit

MAX_HEAD = 64 * 1024  # bytes of status line and headers; a longer head is refused
_RECV = 16 * 1024
_SEND = 64 * 1024
_SAFE = "!#$%&'()*+,/:;=?@[]~"  # what may stay as written in a request target (as requests does)


class PostFailed(Exception):
    """No usable answer: `name` is what a delivery records (ConnectTimeout, ReadTimeout,
    ConnectionError, SSLError, InvalidResponse)."""

    def __init__(self, name, reason=""):
        super().__init__(f"{name}: {reason}" if reason else name)
        self.name = name


@dataclass(frozen=True)
class Answer:
    """The status and headers (lower-case names) of a receiver's answer."""
    status: int
    headers: dict


def post(target, headers, body, timeout, verify=True):
    """POST `body` (bytes) to `target` (a urlguard.Target) with `headers`; the Answer.

    Ends within `timeout` seconds whatever the receiver does. `verify` is True (the system's
    CAs), a CA bundle path, or False (no certificate check). Raises PostFailed."""
    deadline = time.monotonic() + timeout
    sock = _connect(target, deadline, verify)
    try:
        _send_all(sock, _request(target, headers, body), deadline)
        return _read_answer(sock, deadline)
    except TimeoutError:
        raise PostFailed("ReadTimeout", f"no answer within {timeout:g} s") from None
    except ssl.SSLError as exc:
        raise PostFailed("SSLError", str(exc)) from None
    except OSError as exc:
        raise PostFailed("ConnectionError", str(exc)) from None
    finally:
        sock.close()


def _left(deadline):
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("the deadline passed")
    return left


def _connect(target, deadline, verify):
    """A connected (and for https, handshaken) socket to the checked address."""
    try:
        sock = socket.create_connection((target.address, target.port), timeout=_left(deadline))
    except TimeoutError:
        raise PostFailed("ConnectTimeout", "connect timed out") from None
    except OSError as exc:
        raise PostFailed("ConnectionError", str(exc)) from None
    if target.scheme != "https":
        return sock
    try:
        sock.settimeout(_left(deadline))  # the handshake as a whole waits at most this
        return _tls_context(verify).wrap_socket(sock, server_hostname=target.host)
    except TimeoutError:
        sock.close()
        raise PostFailed("ConnectTimeout", "TLS handshake timed out") from None
    except ssl.SSLError as exc:  # a certificate that does not match is one (and a ValueError)
        sock.close()
        raise PostFailed("SSLError", str(exc)) from None
    except OSError as exc:
        sock.close()
        raise PostFailed("ConnectionError", str(exc)) from None


@functools.lru_cache(maxsize=8)
def _tls_context(verify):
    """One context per trust setting (loading the CAs takes milliseconds; contexts are shared)."""
    context = ssl.create_default_context(cafile=verify if isinstance(verify, str) else None)
    if verify is False:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def _request(target, headers, body):
    parts = urlsplit(target.url)
    path = quote(parts.path or "/", safe=_SAFE) + (f"?{quote(parts.query, safe=_SAFE)}" if parts.query else "")
    lines = [f"POST {path} HTTP/1.1", f"Host: {_ascii_host(target)}", f"Content-Length: {len(body)}",
             "Connection: close"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def _ascii_host(target):
    """The Host header in ASCII (an internationalised name in its IDNA form)."""
    header = target.host_header
    if header.isascii():
        return header
    return header.replace(target.host, target.host.encode("idna").decode("ascii"))


def _send_all(sock, data, deadline):
    view = memoryview(data)
    while view:
        sock.settimeout(_left(deadline))
        sent = sock.send(view[:_SEND])
        view = view[sent:]


def _read_answer(sock, deadline):
    """Read up to the end of the final head (1xx interim answers are skipped)."""
    buffer = b""
    while True:
        end = buffer.find(b"\r\n\r\n")
        while end < 0 and len(buffer) <= MAX_HEAD:
            sock.settimeout(_left(deadline))
            chunk = sock.recv(_RECV)
            if not chunk:
                raise PostFailed("ConnectionError", "the receiver closed the connection before answering")
            buffer += chunk
            end = buffer.find(b"\r\n\r\n")
        if not 0 <= end <= MAX_HEAD:
            raise PostFailed("InvalidResponse", f"the answer's head is over {MAX_HEAD} bytes")
        answer = _parse_head(buffer[:end])
        buffer = buffer[end + 4:]
        if not 100 <= answer.status < 200:
            return answer


def _parse_head(head):
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    version, _, rest = status_line.partition(" ")
    code = rest[:3]
    if not (version.startswith("HTTP/1.") and code.isdigit() and len(code) == 3
            and rest[3:4] in ("", " ")):
        raise PostFailed("InvalidResponse", "the answer does not begin with an HTTP/1.x status line")
    headers = {}
    for line in header_lines:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return Answer(int(code), headers)
