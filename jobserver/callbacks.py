"""Callbacks: Standard Webhooks signing, the retry schedule, and the deliverer.

When a job with a callback_url ends, the journal writes a delivery row in the same
transaction. The `Deliverer` claims due rows (each claim hides a row from other
deliverers for the callback timeout plus a margin, so a crashed process's claims come
back), POSTs the public job on its own small thread pool, and records the outcome:
delivered, failed, or pending again at the next time of the schedule. Nothing here
runs on a job worker or an HTTP request thread, so a slow receiver holds only a
delivery thread, and at most for the callback timeout: that bounds the whole exchange
(hookpost.py), however slowly the receiver answers. And one receiver holds at most half
of the delivery threads (shares.py), so a slow one leaves the others threads of their own.
"""
import base64
import binascii
import email.utils
import hashlib
import hmac
import logging
import os
import random
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC

from .codec import dumps
from .errors import InvalidCallback, JobNotFound, JobserverError
from .hookpost import PostFailed, post
from .model import EventKind, JobEvent
from .shares import CLAIM_SCAN, Shares
from .urlguard import ForbiddenAddress, Unresolvable, UrlGuard

log = logging.getLogger(__name__)

SECRET_PREFIX = "whsec_"
MIN_KEY_BYTES = 16
#: seconds before attempt 2, 3, ... 10 (attempt 1 is at once): Svix's schedule, about three days
DEFAULT_SCHEDULE = (0, 5, 300, 1800, 7200, 18000, 36000, 50400, 72000, 86400)
JITTER = 0.1
MAX_RETRY_AFTER = 24 * 3600
CLAIM_MARGIN = 30.0
USER_AGENT = "jobserver-webhooks/1"


class InvalidSignature(JobserverError, ValueError):
    """A webhook's signature headers are missing, stale, or match no signature."""


# --- secrets and signatures --------------------------------------------------------------
def generate_secret():
    """A new secret: whsec_ and 32 random bytes in base64."""
    return SECRET_PREFIX + base64.b64encode(os.urandom(32)).decode("ascii")


def secret_key(secret):
    """The HMAC key inside a whsec_<base64> secret; ValueError if it is not one."""
    if not isinstance(secret, str) or not secret.startswith(SECRET_PREFIX):
        raise ValueError("a callback secret looks like whsec_<base64>")
    text = secret[len(SECRET_PREFIX):]
    try:  # unpadded base64 is accepted, as the standardwebhooks libraries do
        key = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("a callback secret looks like whsec_<base64>: the part after whsec_ "
                         "is not base64") from None
    if len(key) < MIN_KEY_BYTES:
        raise ValueError(f"a callback secret holds at least {MIN_KEY_BYTES} bytes")
    return key


def signing_secret(journal, config):
    """The server's signing secret: config.callback_secret, else the one kept in the journal
    (made at first use, so every process sharing the journal signs alike)."""
    if config.callback_secret is not None:
        secret_key(config.callback_secret)
        return config.callback_secret
    secret = journal.setting("callback_secret", generate_secret)
    secret_key(secret)
    return secret


def _signature(key, msg_id, timestamp, body):
    mac = hmac.new(key, b"%s.%d.%s" % (msg_id.encode(), timestamp, body), hashlib.sha256)
    return mac.digest()


def sign(secret, msg_id, timestamp, body):
    """The webhook-signature value `v1,<base64>` for a message."""
    return "v1," + base64.b64encode(_signature(secret_key(secret), msg_id, int(timestamp), body)).decode()


def webhook_headers(secret, msg_id, body, now=None):
    """webhook-id, webhook-timestamp and webhook-signature for `body` (bytes)."""
    timestamp = int(time.time() if now is None else now)
    return {"webhook-id": msg_id, "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(secret, msg_id, timestamp, body)}


def verify(secret, headers, body, tolerance=300, now=None):
    """Check a webhook as a receiver would; raises InvalidSignature, returns None if good.

    Timestamps more than `tolerance` seconds old or ahead are refused (replays); any of
    several space-separated signatures may match; comparison is constant-time."""
    lower = {str(k).lower(): v for k, v in headers.items()}
    msg_id, stamp, sigs = (lower.get(h) for h in ("webhook-id", "webhook-timestamp", "webhook-signature"))
    if not (msg_id and stamp and sigs):
        raise InvalidSignature("missing webhook-id, webhook-timestamp or webhook-signature")
    if not re.fullmatch(r"[0-9]{1,12}", stamp):
        raise InvalidSignature("webhook-timestamp is not unix seconds")
    if abs((time.time() if now is None else now) - int(stamp)) > tolerance:
        raise InvalidSignature("webhook-timestamp is too old or too far ahead")
    body = body.encode() if isinstance(body, str) else bytes(body)
    expected = _signature(secret_key(secret), msg_id, int(stamp), body)
    matched = False
    for item in sigs.split():
        version, _, value = item.partition(",")
        try:
            given = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            continue
        matched |= version == "v1" and hmac.compare_digest(given, expected)
    if not matched:
        raise InvalidSignature("no matching signature")


# --- the schedule ------------------------------------------------------------------------
class Schedule:
    """When to try again: the default schedule, or `attempts` tries `backoff` seconds apart."""

    def __init__(self, attempts=None, backoff=None):
        if attempts is not None and attempts < 1:
            raise ValueError("callback_attempts must be at least 1")
        if backoff is not None and backoff < 0:
            raise ValueError("callback_backoff must not be negative")
        count = attempts or len(DEFAULT_SCHEDULE)
        if backoff is not None:
            self.delays = (0.0,) + (float(backoff),) * (count - 1)
        else:
            tail = (DEFAULT_SCHEDULE[-1],) * max(0, count - len(DEFAULT_SCHEDULE))
            self.delays = tuple(float(d) for d in (DEFAULT_SCHEDULE + tail)[:count])

    @property
    def attempts(self):
        return len(self.delays)

    def next_delay(self, attempts_made, retry_after=None):
        """Seconds until the next attempt after `attempts_made` failed ones, or None: give up."""
        if attempts_made >= len(self.delays):
            return None
        if retry_after is not None:
            return float(min(max(retry_after, 0), MAX_RETRY_AFTER))
        return self.delays[attempts_made] * random.uniform(1 - JITTER, 1 + JITTER)


def parse_retry_after(value, now=None):
    """Seconds from a Retry-After header (delta seconds or an HTTP date), bounded; None if absent or odd."""
    if not value:
        return None
    value = value.strip()
    if re.fullmatch(r"[0-9]{1,10}", value):
        return min(int(value), MAX_RETRY_AFTER)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # "-0000": UTC, with no zone named
        when = when.replace(tzinfo=UTC)
    seconds = when.timestamp() - (time.time() if now is None else now)
    return min(max(0.0, seconds), MAX_RETRY_AFTER)


# --- delivery ----------------------------------------------------------------------------
class Deliverer:
    """Delivers journaled callbacks on `config.callback_workers` threads of its own.

    `render(job_id)` gives the public job (the body); `emit(JobEvent)` hears of each
    recorded attempt. Wire `on_event` to the server's job events so a job that ends here
    is delivered at once; rows written by other processes are found by polling every
    `config.poll_interval` seconds."""

    def __init__(self, journal, config, render, emit=None):
        if config.callback_workers < 1 or config.callback_timeout <= 0:
            raise ValueError("callback_workers must be at least 1 and callback_timeout positive")
        self.journal = journal
        self.render = render
        self._emit = emit
        self.guard = UrlGuard(config.callback_allow)
        self.schedule = Schedule(config.callback_attempts, config.callback_backoff)
        self.secret = signing_secret(journal, config)
        self.timeout = config.callback_timeout
        self.workers = config.callback_workers
        self.poll_interval = config.poll_interval
        self.lease_ms = int((self.timeout + CLAIM_MARGIN) * 1000)
        self.shares = Shares(self.workers, put_off_ms=int(self.timeout * 1000))
        self.verify_tls = True  # tests may point this at a CA bundle
        self.outcomes = {"delivered": 0, "failed": 0, "retried": 0}
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._busy = 0
        self._next_due = None
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._executor = None
        self._thread = None

    # --- lifecycle ------------------------------------------------------------------
    def start(self):
        """Start claiming due deliveries (pending ones from before a restart first)."""
        self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix="jobserver-callback")
        self._thread = threading.Thread(target=self._loop, name="jobserver-callbacks", daemon=True)
        self._thread.start()

    def stop(self):
        """Stop claiming; give deliveries in flight up to the callback timeout, then leave them
        (their claims lapse and another start delivers them again)."""
        if self._thread is None or self._stopping.is_set():
            return
        self._stopping.set()
        self._wake.set()
        self._thread.join(self.timeout + 5.0)
        with self._idle:
            self._idle.wait_for(lambda: self._busy == 0, timeout=self.timeout + 1.0)
            busy = self._busy
        self._executor.shutdown(wait=False, cancel_futures=True)
        if busy:
            log.warning("stopped with %d callback deliveries in flight; they are retried later", busy)

    def wake(self):
        """Look for due deliveries now."""
        self._wake.set()

    def on_event(self, event):
        """A server listener: a state change that wrote a delivery here makes it due now."""
        if event.kind is EventKind.STATE and event.callback == "pending" and not self._wake.is_set():
            self._wake.set()

    # --- claiming -------------------------------------------------------------------
    def _loop(self):
        while not self._stopping.is_set():
            self._wake.clear()
            if self._claim():
                continue  # every free thread got work: more may be due
            self._wake.wait(self._wait_time())

    def _wait_time(self):
        """Until the next poll, or sooner when a retry recorded here falls due."""
        with self._lock:
            due = self._next_due
            if due is not None and due <= time.monotonic():
                self._next_due = due = None
                return 0.0
        if due is None:
            return self.poll_interval
        return min(self.poll_interval, max(0.0, due - time.monotonic()))

    def _claim(self):
        """Hand due rows to free threads; True to look again at once (every free thread got
        one, or a slow receiver's rows were put off and others may be behind them)."""
        free = self.workers - self._busy
        if free <= 0:
            return False
        plan = self.shares.plan(free)
        try:
            rows = (self.journal.claim_callbacks(max(CLAIM_SCAN, free), self.lease_ms, choose=plan)
                    if self.journal.callbacks_due() else [])
        except JobserverError as exc:
            log.warning("cannot claim callbacks (%s); trying again", exc)
            self._stopping.wait(self.poll_interval)
            return False
        if self._stopping.is_set():
            return False  # too late to start them: their claims lapse and they are tried again
        for row in rows:
            with self._lock:
                self._busy += 1
            self.shares.started(row)
            self._executor.submit(self._run, row)
        return len(rows) == free or plan.put_off > 0

    # --- one attempt ----------------------------------------------------------------
    def _run(self, row):
        """Attempt one delivery and record it; never raises (this is an executor thread)."""
        job_id, msg_id = row["job_id"], row["id"]
        try:
            state, error, retry_in = self._attempt(row)
            retry_ms = int(retry_in * 1000)
            if not self.journal.record_callback(msg_id, row["claim_token"], state, error, retry_ms):
                log.warning("job %s: callback %s was claimed by another deliverer meanwhile", job_id, msg_id)
                return
            if state == "pending":
                self._due_in(retry_in)
            if self._emit is not None:
                self._emit(JobEvent.callback_attempted(job_id, state, row["attempts"] + 1))
        except JobserverError as exc:
            log.warning("job %s: callback %s outcome not recorded (%s); it is tried again later",
                        job_id, msg_id, exc)
        except Exception:  # a bug here must not kill the thread nor lose the others
            log.exception("job %s: callback %s failed unexpectedly", job_id, msg_id)
        finally:
            self.shares.finished(row)
            with self._idle:
                self._busy -= 1
                self._idle.notify_all()
            self._wake.set()

    def _due_in(self, seconds):
        with self._lock:
            due = time.monotonic() + seconds + 0.01  # the journal's clock decides; a little after it
            self._next_due = due if self._next_due is None else min(self._next_due, due)

    def _attempt(self, row):
        """POST once: (state, last_error, seconds until the next try)."""
        job_id, attempt = row["job_id"], row["attempts"] + 1
        status, error, retry_after = self._send(row)
        if status is not None and 200 <= status < 300:
            log.info("job %s: callback %s delivered (attempt %d)", job_id, row["id"], attempt)
            return self._count("delivered", None, 0.0)
        if status == 410 or error in ("JobNotFound", "InvalidCallback"):
            log.warning("job %s: callback %s failed for good: %s", job_id, row["id"], error)
            return self._count("failed", error, 0.0)
        delay = self.schedule.next_delay(attempt, retry_after)
        if delay is None:
            log.warning("job %s: callback %s failed after %d attempts: %s", job_id, row["id"], attempt, error)
            return self._count("failed", error, 0.0)
        log.info("job %s: callback %s attempt %d: %s; next in %.1f s", job_id, row["id"], attempt, error, delay)
        return self._count("retried", error, delay, state="pending")

    def _count(self, outcome, error, delay, state=None):
        with self._lock:
            self.outcomes[outcome] += 1
        return state or outcome, error, delay

    def _send(self, row):
        """(status or None, last_error, retry_after seconds or None) of one POST."""
        try:
            target = self.guard.target(row["url"])
            body = dumps(self.render(row["job_id"])).encode()
        except ForbiddenAddress:
            return None, "ForbiddenAddress", None
        except Unresolvable:
            return None, "NameResolutionError", None
        except (InvalidCallback, JobNotFound) as exc:
            return None, type(exc).__name__, None
        headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT,
                   **webhook_headers(self.secret, row["id"], body)}
        try:
            answer = post(target, headers, body, self.timeout, verify=self.verify_tls)
        except PostFailed as exc:
            return None, exc.name, None
        except Exception as exc:  # whatever it is, it counts as a failed attempt, not a lost one
            log.exception("job %s: callback %s: unexpected error sending", row["job_id"], row["id"])
            return None, type(exc).__name__, None
        status = answer.status
        return (status, None if 200 <= status < 300 else f"HTTP {status}",
                parse_retry_after(answer.headers.get("retry-after")))

