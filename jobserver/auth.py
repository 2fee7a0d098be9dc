"""Bearer tokens: who is calling, and which jobs they may see.

A token is `secrets.token_urlsafe(32)`, shown once; the journal keeps only its SHA-256
hash, so a leaked journal does not leak working tokens. While no token exists the
server is in open mode: every caller is `anonymous`. `Authenticator` caches the
"any tokens?" answer for about a second, so open mode costs no database read per
request, while a token created by `jobserver token create` takes effect within that
second on every process sharing the journal.

Scope: a caller sees and acts on the jobs it owns (others' answer 404, as if absent);
an admin token sees every owner's. Jobs submitted in open mode belong to `anonymous`,
so once tokens exist only an admin sees them.
"""
import hashlib
import ipaddress
import re
import secrets
import threading
import time
from dataclasses import dataclass

from .errors import JobserverError

ANONYMOUS = "anonymous"
MAX_NAME = 190
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]*\Z")
_BEARER = re.compile(r"Bearer +([A-Za-z0-9._~+/=-]{1,512}) *\Z", re.IGNORECASE)


class Unauthorized(JobserverError):
    """Tokens exist and the request carries no valid one (HTTP 401)."""


@dataclass(frozen=True)
class Principal:
    """The caller: a token's name (the owner of the jobs it submits) and whether it is admin."""
    name: str
    admin: bool = False

    @property
    def scope(self):
        """The owner filter for reads and actions: None (every owner) for an admin."""
        return None if self.admin else self.name


_ANONYMOUS = Principal(ANONYMOUS)  # every caller in open mode (frozen: one serves all)


def hash_token(token):
    """The stored form of a token (hex SHA-256): tokens are random, so no salt is needed."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def create_token(journal, name, admin=False):
    """Store a new token for `name` and return it; only its hash is kept.

    Raises ValueError for a bad name and TokenExists if `name` has a token already."""
    if not isinstance(name, str) or len(name) > MAX_NAME or not _NAME.match(name):
        raise ValueError("a token name is 1-190 letters, digits and . _ @ + -, "
                         "starting with a letter or digit")
    if name == ANONYMOUS:
        raise ValueError(f"{ANONYMOUS!r} is the open-mode user; choose another name")
    token = secrets.token_urlsafe(32)
    journal.add_token(name, hash_token(token), bool(admin))
    return token


def is_loopback_host(host):
    """True if binding `host` only accepts connections from this machine.

    Names other than `localhost` are not resolved: an unknown name counts as public."""
    text = (host or "").strip().strip("[]").lower()
    if text == "localhost":
        return True
    try:
        return ipaddress.ip_address(text.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


class Authenticator:
    """Turns an Authorization header into a Principal, or raises Unauthorized.

    Caches has_tokens() and found tokens for `ttl` seconds (tokens are never revoked
    in place, so a cached hit stays right); unknown tokens always go to the journal."""

    def __init__(self, journal, ttl=1.0, max_cached=1024):
        self._journal = journal
        self._ttl = ttl
        self._max_cached = max_cached
        self._lock = threading.Lock()
        self._open = (float("-inf"), True)
        self._known = {}

    def open_mode(self):
        """True while no token exists (cached for `ttl` seconds)."""
        checked_at, is_open = self._open
        if time.monotonic() - checked_at > self._ttl:
            is_open = not self._journal.has_tokens()
            self._open = (time.monotonic(), is_open)
        return is_open

    def identify(self, authorization):
        """The caller of a request with this Authorization header value (or None)."""
        if self.open_mode():
            return _ANONYMOUS
        match = _BEARER.match(authorization or "")
        if match is None:
            raise Unauthorized("this server needs a bearer token: Authorization: Bearer <token>")
        digest = hash_token(match.group(1))
        now = time.monotonic()
        with self._lock:
            cached = self._known.get(digest)
        if cached is not None and now - cached[0] <= self._ttl:
            return cached[1]
        found = self._journal.find_token(digest)
        if found is None:
            raise Unauthorized("the bearer token is not valid")
        principal = Principal(found[0], found[1])
        with self._lock:
            if len(self._known) >= self._max_cached:
                self._known.clear()
            self._known[digest] = (now, principal)
        return principal
