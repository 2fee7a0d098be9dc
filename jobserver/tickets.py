"""Stream tickets: a short-lived, signed stand-in for a token, for `?ticket=` on the streams.

A browser's EventSource cannot send an Authorization header, and a long-lived token must
never go into a URL (logs, proxies and browser history keep URLs). So a caller trades its
token for a ticket (POST /tickets): `v1.<payload>.<signature>`, the payload naming the
caller (its token's name and whether it is an admin) and when the ticket expires, the
signature an HMAC-SHA256 of it under a secret kept in the journal's settings (made at
first use, like the callback secret: every process sharing the journal accepts the
tickets of every other). Only the two event streams accept one; a ticket anywhere else
is no credential. A ticket cannot be revoked: it lasts TICKET_SECONDS.
"""
import base64
import binascii
import hashlib
import hmac
import json
import secrets
import time

from .auth import MAX_NAME, Principal, Unauthorized

__all__ = ["Tickets", "TICKET_SECONDS"]

#: how long a ticket lasts
TICKET_SECONDS = 600
SETTING = "stream_ticket_secret"
_VERSION = "v1"
MAX_TICKET = 1024  # characters: a longer ?ticket= is refused before any work


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Tickets:
    """Issues and checks tickets with the journal's ticket secret (read once, then kept)."""

    def __init__(self, journal, ttl: float = TICKET_SECONDS, clock=time.time):
        self._journal = journal
        self._ttl = ttl
        self._clock = clock
        self._key = None

    def _secret(self) -> bytes:
        if self._key is None:
            text = self._journal.setting(SETTING, lambda: secrets.token_urlsafe(32))
            self._key = text.encode("ascii")
        return self._key

    def _sign(self, signed: str) -> str:
        return _b64(hmac.new(self._secret(), signed.encode("ascii"), hashlib.sha256).digest())

    def issue(self, principal: Principal) -> tuple[str, int]:
        """(ticket, expiry in ms since the epoch) for `principal`."""
        expires_ms = int((self._clock() + self._ttl) * 1000)
        payload = json.dumps({"sub": principal.name, "adm": bool(principal.admin), "exp": expires_ms},
                             separators=(",", ":"), ensure_ascii=True)
        signed = f"{_VERSION}.{_b64(payload.encode('ascii'))}"
        return f"{signed}.{self._sign(signed)}", expires_ms

    def verify(self, ticket: str) -> Principal:
        """The caller a ticket names; Unauthorized if it is malformed, forged or expired."""
        if not isinstance(ticket, str) or len(ticket) > MAX_TICKET or not ticket.isascii():
            raise Unauthorized("the ticket is not valid")
        version, _, rest = ticket.partition(".")
        body, _, signature = rest.partition(".")
        if version != _VERSION or not body or not signature:
            raise Unauthorized("the ticket is not valid")
        if not hmac.compare_digest(signature, self._sign(f"{version}.{body}")):
            raise Unauthorized("the ticket is not valid")
        try:
            claims = json.loads(_unb64(body))
            name, admin, expires_ms = claims["sub"], claims["adm"], claims["exp"]
        except (binascii.Error, ValueError, TypeError, KeyError):
            raise Unauthorized("the ticket is not valid") from None
        if not (isinstance(name, str) and 0 < len(name) <= MAX_NAME and isinstance(admin, bool)
                and isinstance(expires_ms, int)):
            raise Unauthorized("the ticket is not valid")
        if self._clock() * 1000 >= expires_ms:
            raise Unauthorized("the ticket has expired: ask POST /tickets for a new one")
        return Principal(name, admin)
