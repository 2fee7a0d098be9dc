"""CORS: which web origins may call the API from a browser, and the headers that say so.

A frontend served from another origin (`https://app.example.com` calling the API on
`https://jobs.example.com`) needs the browser's permission: a preflight (OPTIONS with
Origin and Access-Control-Request-Method) before any request with an Authorization or a
JSON Content-Type header, then Access-Control-Allow-Origin on the answer itself.
`--cors-origin` names the origins; no other gets any CORS header, and with none named
the server sends none (docs/operations.md, "Browsers on other origins").

Exact origins only: `*` and `null` are refused at start. A wildcard would let any page a
user opens drive the API with whatever token that page holds, and a server in open mode
(no tokens) with none at all; `null` is every sandboxed frame and file:// page at once.
Credentials mode stays off (no Access-Control-Allow-Credentials): callers send bearer
tokens, never cookies. Nothing here knows Flask.
"""
import ipaddress
import re
from collections.abc import Iterable
from urllib.parse import urlsplit

__all__ = ["CorsPolicy", "normalize_origin", "ALLOW_METHODS", "ALLOW_HEADERS", "EXPOSE_HEADERS",
           "MAX_AGE"]

ALLOW_METHODS = "GET, POST, DELETE"
ALLOW_HEADERS = "Authorization, Content-Type, Idempotency-Key, Last-Event-ID, X-Request-Id"
EXPOSE_HEADERS = "Location, X-Request-Id, Retry-After"
#: seconds a browser may keep a preflight's answer (Chromium keeps at most 7,200)
MAX_AGE = 7200
_DEFAULT_PORTS = {"http": 80, "https": 443}
# DNS labels, and `_` as browsers allow it in host names (docker compose service names)
_HOST_NAME = re.compile(r"(?=.{1,253}\Z)[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?)*\Z")


def normalize_origin(text: str) -> str:
    """`scheme://host[:port]` as a browser sends it in Origin (lower case, no default port),
    or ValueError saying what is wrong with `text`."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("an origin is scheme://host[:port], e.g. https://app.example.com")
    given = text.strip()
    if given == "*":
        raise ValueError("'*' is not allowed: name each origin (a wildcard would let any web "
                         "page call the API with the tokens it holds)")
    if given.lower() == "null":
        raise ValueError("'null' is not allowed: it is every sandboxed frame and file:// page")
    try:
        parts = urlsplit(given)
        port = parts.port
    except ValueError:
        raise ValueError(f"{given!r} is not scheme://host[:port]") from None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.netloc:
        raise ValueError(f"{given!r} is not an http:// or https:// origin (scheme://host[:port])")
    if parts.path or parts.query or parts.fragment or given.endswith(("?", "#")):
        raise ValueError(f"{given!r} has a path or a query: an origin is scheme://host[:port] "
                         f"only, e.g. {scheme}://{parts.netloc}")
    if parts.username is not None or parts.password is not None:
        raise ValueError(f"{given!r} has a user name: an origin is scheme://host[:port] only")
    host = _host(parts.hostname or "", given)
    if port is None or port == _DEFAULT_PORTS[scheme]:
        return f"{scheme}://{host}"
    return f"{scheme}://{host}:{port}"


def _host(hostname, given):
    host = hostname.lower()
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        if not _HOST_NAME.match(host):
            raise ValueError(f"{given!r}: {hostname!r} is not a host name (write an "
                             "internationalized name in its xn-- form)") from None
        return host
    return f"[{address.compressed}]" if address.version == 6 else address.compressed


class CorsPolicy:
    """The allowed origins, and the headers of an answer to each request's Origin."""

    def __init__(self, origins: Iterable[str]):
        allowed = set()
        for origin in origins:
            try:
                allowed.add(normalize_origin(origin))
            except ValueError as exc:
                raise ValueError(f"--cors-origin: {exc}") from None
        self.origins = frozenset(allowed)

    def __bool__(self):
        return bool(self.origins)

    def allows(self, origin: str | None) -> bool:
        """True for an Origin header naming an allowed origin exactly (as browsers send it)."""
        return origin is not None and origin in self.origins

    @staticmethod
    def is_preflight(origin: str | None, requested_method: str | None) -> bool:
        """True for an OPTIONS request that is a preflight: it names its Origin and the
        method it asks for (another OPTIONS request is an ordinary one)."""
        return origin is not None and requested_method is not None

    def preflight_headers(self, origin: str | None) -> dict:
        """What a preflight from `origin` is answered with besides the actual-answer headers:
        nothing for an origin that is not allowed."""
        if not self.allows(origin):
            return {}
        return {"Access-Control-Allow-Methods": ALLOW_METHODS,
                "Access-Control-Allow-Headers": ALLOW_HEADERS,
                "Access-Control-Max-Age": str(MAX_AGE)}

    def answer_headers(self, origin: str | None) -> dict:
        """The headers of any answer to a request from `origin` (an error's too)."""
        if not self.allows(origin):
            return {}
        return {"Access-Control-Allow-Origin": origin, "Access-Control-Expose-Headers": EXPOSE_HEADERS}
