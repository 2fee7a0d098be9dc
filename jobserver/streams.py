"""Server-Sent Events: the bodies of `GET /jobs/{id}/events` and `GET /events` (docs/events.md).

Framing: a stream opens with `retry:` (jittered 2-5 s) and, unless it resumes, an
`event: snapshot` (one job as GET gives it; for all jobs a first page of the list); then
one `event: <kind>` per journaled event (state, progress, step, callback), its `data:`
one line of JSON with the job's id and seq, its `id:` what a reconnect sends back as
Last-Event-ID: a job's seq for one job, an EventCursor floor for all jobs. `: ping` after
`ping` seconds of silence; a job's stream closes after the job's terminal state.

Bounds: each open stream holds a waitress thread, so streams have slots of their own
(`stream_slots`; `jobserver serve` adds as many threads, so streams never take the API's)
and a lifetime (`stream_lifetime`, jittered, then the server closes and the browser
resumes). Past the slots a stream answers 200 with a snapshot and a long `retry:` and
closes: a 503 would make an EventSource give up for good. A client that went away is
noticed at the next ping (the socket's end is seen, or the write fails), which frees its
slot. Rendering runs under the API's admission turn (admission.py); the waits do not.
"""
import json
import logging
import random
import threading
import time

from .errors import JobserverError
from .eventcursor import EventCursor
from .eventlog import EventRow, ends_job, public_data
from .journal import EVENT_PAGE
from .model import DEFAULT_QUEUE, TERMINAL

log = logging.getLogger(__name__)

RETRY_MS = (2000, 5000)
#: past the slot bound: come back much later
BUSY_RETRY_MS = (30_000, 60_000)
#: a stream's lifetime varies by this fraction, so that streams opened together do not
#: all reconnect together
LIFETIME_JITTER = 0.1
#: jobs in the snapshot of a stream of all jobs (the newest, as GET /jobs lists them)
SNAPSHOT_JOBS = 20
#: seconds a stream of all jobs waits between two reads at least (a burst is read once)
ALL_MIN_GAP = 0.1
#: pages one wake of a stream of all jobs reads at most before it sends what it has
ALL_PAGES = 4
#: the states a stream filter may name
_STATES = frozenset(state.value for state in TERMINAL) | {"queued", "running"}


def retry_field(busy=False) -> str:
    low, high = BUSY_RETRY_MS if busy else RETRY_MS
    return f"retry: {random.randint(low, high)}\n"


def frame(kind: str, data: str, event_id=None) -> str:
    """One event; `data` is one line of JSON (compact JSON holds no newline)."""
    head = f"event: {kind}\n" if event_id is None else f"event: {kind}\nid: {event_id}\n"
    return f"{head}data: {data}\n\n"


class Body:
    """A stream's WSGI body: the chunks of `chunks` (a generator), as bytes; `close()` (the
    server calls it however the response ended, iterated or not) ends the generator and
    runs `release` once."""

    def __init__(self, chunks, release):
        self._chunks = chunks
        self._release = release

    def __iter__(self):
        return self

    def __next__(self):
        return next(self._chunks).encode("utf-8")

    def close(self):
        try:
            self._chunks.close()
        finally:
            release, self._release = self._release, None
            if release is not None:
                release()


class Streams:
    """The event streams of one Api: its slots, the server's event bus, the settings.

    `encode(value)` is the API's compact JSON encoder; `gate` its admission gate."""

    def __init__(self, server, gate, encode):
        config = server.config
        if config.stream_slots < 0:
            raise ValueError("stream_slots must not be negative")
        if not config.stream_lifetime > 0 or not config.stream_ping > 0:
            raise ValueError("stream_lifetime and stream_ping must be positive")
        self.server = server
        self.journal = server.journal
        self.bus = server.events
        self.gate = gate
        self.encode = encode
        self.lifetime = config.stream_lifetime
        self.ping_every = config.stream_ping
        self._slots = threading.BoundedSemaphore(config.stream_slots) if config.stream_slots else None
        self._open = 0
        server.metrics.add_open_streams(lambda: self._open)  # the open-streams gauge, read at scrape
        self._lock = threading.Lock()

    @property
    def open(self) -> int:
        """Streams holding a slot now."""
        return self._open

    def _take_slot(self) -> bool:
        if self._slots is None or not self._slots.acquire(blocking=False):
            return False
        with self._lock:
            self._open += 1
        return True

    def _give_slot(self):
        with self._lock:
            self._open -= 1
        self._slots.release()

    # --- the answers that hold no slot --------------------------------------------------
    @staticmethod
    def come_back_later() -> str:
        """The whole body of a stream refused while the server drains: reconnect later."""
        return retry_field(busy=True) + "\n"

    def busy(self, snapshot: str) -> str:
        """The whole body of a stream refused for want of a slot: the snapshot (no id: a
        resume later starts where the client was) and a long `retry:`."""
        return retry_field(busy=True) + frame("snapshot", snapshot)

    # --- one job ------------------------------------------------------------------------
    def job_stream(self, job_id: str, owner, after, disconnected=None):
        """(status, body text or Body) of GET /jobs/{id}/events for a caller whose jobs
        are `owner`'s (None: everyone's), resuming after seq `after` (None: afresh).
        Raises JobNotFound. Runs under the request's admission turn."""
        if after is None:
            last = self.journal.last_seq(job_id)  # the snapshot, read next, is at least this new
            job = self.server.get(job_id, owner)
        else:
            job = self.server.get(job_id, owner)  # a terminal state read first is final at `last`
            last = self.journal.last_seq(job_id)
            if job["state"] in TERMINAL and after >= last:
                return 204, None
            last = min(after, last)
        if not self._take_slot():
            return 200, self.busy(self.encode(job))
        try:
            sub = self.bus.subscribe(job_id)
        except BaseException:
            self._give_slot()
            raise
        first = retry_field()
        first += frame("snapshot", self.encode(job), last) if after is None else "\n"
        run = _JobRun(self, job_id, last, job["state"] in TERMINAL, sub, disconnected)
        return 200, Body(run.chunks(first), lambda: self._end(sub))

    def _end(self, sub):
        self.bus.unsubscribe(sub)
        self._give_slot()

    # --- every job ------------------------------------------------------------------------
    def all_stream(self, owner, task=None, state=None, queue=None, after=None, disconnected=None):
        """(status, body) of GET /events: the events of `owner`'s jobs (None: everyone's)
        that pass the filters, from event position `after` (None: from now, with a
        snapshot). Runs under the request's admission turn."""
        if state is not None and state not in _STATES:
            raise ValueError(f"unknown state {state!r}")
        matches = _Filter(owner, task, state, queue)
        if not self._take_slot():
            return 200, self.busy(self._list_snapshot(matches))
        try:
            sub = self.bus.subscribe(None)
            if after is None:
                cursor = EventCursor.at_end(self.journal, scoped=True)
                first = retry_field() + frame("snapshot", self._list_snapshot(matches), cursor.floor)
            else:
                cursor = EventCursor(self.journal, after, scoped=True)
                first = retry_field() + "\n"
        except BaseException:
            self._give_slot()
            raise
        run = _AllRun(self, cursor, matches, sub, disconnected)
        return 200, Body(run.chunks(first), lambda: self._end(sub))

    def _list_snapshot(self, matches):
        if not matches.queue_exists:
            return self.encode({"jobs": [], "next": None})
        jobs, next_cursor = self.server.list(owner=matches.owner, state=matches.state,
                                             task=matches.task, limit=SNAPSHOT_JOBS)
        return self.encode({"jobs": jobs, "next": next_cursor})

    def lifetime_deadline(self):
        return time.monotonic() + self.lifetime * random.uniform(1 - LIFETIME_JITTER, 1)


class _Filter:
    """Which events a stream of all jobs passes: the owner's (None: all), and those of the
    task, queue and state asked for. A state event passes `state` when it moves the job
    into that state; any other event when its job is in that state now."""

    def __init__(self, owner, task, state, queue):
        self.owner, self.task, self.state = owner, task, state
        self.queue_exists = queue in (None, DEFAULT_QUEUE)  # every job is in the default queue

    def __call__(self, row: EventRow) -> bool:
        if row.owner is None or not self.queue_exists:
            return False  # the job is gone (deleted meanwhile), or the queue has no jobs
        if self.owner is not None and row.owner != self.owner:
            return False
        if self.task is not None and row.task != self.task:
            return False
        if self.state is None:
            return True
        if row.kind == "state":
            return json.loads(row.data).get("state") == self.state
        return row.job_state == self.state


class _Run:
    """What both streams do: send, wait for the bus outside the admission turn, ping,
    notice a client that went away, end at the lifetime or when the bus closes."""

    def __init__(self, streams, sub, disconnected):
        self.streams = streams
        self.sub = sub
        self.disconnected = disconnected or (lambda: False)
        self.deadline = streams.lifetime_deadline()
        self.next_ping = 0.0

    def chunks(self, first):
        """The stream's text, chunk by chunk (the generator behind its Body)."""
        gate = self.streams.gate
        yield first
        self.next_ping = time.monotonic() + self.streams.ping_every
        try:
            with gate.turn():
                text, done = self.catch_up()
            while True:
                if text:
                    yield text
                    self.next_ping = time.monotonic() + self.streams.ping_every
                if done:
                    return
                woke = self.wait()
                if woke is None:
                    return
                with gate.turn():
                    text, done = self.on_wake() if woke else self.on_ping()
        except JobserverError as exc:  # the journal away or closed: the client resumes later
            log.info("event stream ended: %s", exc)

    def wait(self):
        """True when the bus handed something, False when a ping is due, None to end
        (lifetime over, bus closed, client gone)."""
        while True:
            now = time.monotonic()
            if now >= self.deadline or self.sub.closed:
                return None
            if now >= self.next_ping:
                if self.disconnected():
                    return None
                return False
            if self.sub.wait(min(self.next_ping, self.deadline) - now):
                return None if self.sub.closed else True

    def on_ping(self):
        """(text, done) at a ping: a look at the table (nothing missed, whatever the bus
        did) and the ping itself."""
        text, done = self.catch_up()
        return text or self.ping(), done


class _JobRun(_Run):
    """The stream of one job's events, by seq."""

    def __init__(self, streams, job_id, last, terminal, sub, disconnected):
        super().__init__(streams, sub, disconnected)
        self.job_id = job_id
        self.last = last
        self.terminal = terminal

    def catch_up(self):
        """(text, done) of the job's events after the last sent, read from the table."""
        out = []
        while True:
            rows = self.streams.journal.job_events(self.job_id, self.last, EVENT_PAGE)
            out.append(self.render(rows))
            if len(rows) < EVENT_PAGE:
                break
        return "".join(out), self.terminal

    def on_wake(self):
        rows, lost = self.sub.take()
        if lost:
            return self.catch_up()  # the mailbox overflowed: the table has what it dropped
        fresh = [row for row in rows if row.seq > self.last]
        if fresh and (fresh[0].seq != self.last + 1
                      or any(b.seq != a.seq + 1 for a, b in zip(fresh, fresh[1:]))):
            return self.catch_up()
        return self.render(fresh), self.terminal

    def render(self, rows):
        parts = []
        for row in rows:
            if row.seq <= self.last:
                continue
            parts.append(frame(row.kind, public_data(row), row.seq))
            self.last = row.seq
            if row.kind == "state":
                self.terminal = ends_job(row)
        return "".join(parts)

    @staticmethod
    def ping():
        return ": ping\n\n"


class _AllRun(_Run):
    """The stream of every job's events (filtered), by EventCursor position."""

    def __init__(self, streams, cursor, matches, sub, disconnected):
        super().__init__(streams, sub, disconnected)
        self.cursor = cursor
        self.matches = matches
        self.sent_floor = cursor.floor
        self.read_at = 0.0

    def catch_up(self):
        out = []
        for _page in range(ALL_PAGES):
            read = self.cursor.read()
            for row, floor in read:
                if self.matches(row):
                    out.append(frame(row.kind, public_data(row), floor))
                    self.sent_floor = floor
            if not self.cursor.full:
                break
        self.read_at = time.monotonic()
        return "".join(out), False

    def wait(self):
        """As every stream waits, and then, after a ring, until ALL_MIN_GAP has passed since
        the last read (outside the turn): the commits of a burst are read at once."""
        woke = super().wait()
        if woke:
            gap = self.read_at + ALL_MIN_GAP - time.monotonic()
            if gap > 0:
                time.sleep(min(gap, max(0.0, self.deadline - time.monotonic())))
        return woke

    def on_wake(self):
        self.sub.take()
        return self.catch_up()

    def ping(self):
        """A ping, with the position reached if events that passed no filter moved it:
        an `id:` without data moves a browser's Last-Event-ID and fires no event."""
        if self.cursor.floor > self.sent_floor:
            self.sent_floor = self.cursor.floor
            return f": ping\nid: {self.sent_floor}\n\n"
        return ": ping\n\n"

