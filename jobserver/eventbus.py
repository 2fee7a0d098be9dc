"""The process's one reader of the events table, for all of its open streams.

Two hundred open streams must not mean two hundred readers polling the journal. The bus
is one thread with one EventCursor: woken at once when this process commits events
(Journal.on_events), and every `poll_interval` for those that other processes sharing
the journal commit. What it reads it hands to the subscriptions: a job's stream gets
its job's rows, a stream of all jobs a ring of its bell (it reads and filters the table
itself, from its own position, so that a resumed or filtered stream needs no catch-up
here). It reads at most every MIN_GAP seconds, so a burst of commits costs one read.

The bus is a doorbell with the mail attached, not the record: a job's stream checks
that the rows it is handed follow its last one without a gap (a job's seq has none) and
reads the table for the job when they do not, or when its mailbox overflowed. With no
subscription the bus does nothing at all, and starts again at the journal's end.
"""
import collections
import logging
import threading

from .errors import JobserverError
from .eventcursor import EventCursor

log = logging.getLogger(__name__)

#: seconds between two reads at least: the commits of a burst are read together
MIN_GAP = 0.02
#: rows a job's mailbox holds; past that it says so and the stream reads the table
MAILBOX = 256


class Subscription:
    """What a stream waits on: `wait(timeout)` until rows came, the bell rang or the bus
    closed; `take()` the rows (and whether some were dropped)."""

    __slots__ = ("job_id", "_rows", "_lost", "_lock", "_event", "closed")

    def __init__(self, job_id=None):
        self.job_id = job_id  # None: every job's events (the bell only)
        self._rows = collections.deque()
        self._lost = False
        self._lock = threading.Lock()
        self._event = threading.Event()
        self.closed = False

    def wait(self, timeout):
        """True if something came (or the bus closed) within `timeout` seconds."""
        return self._event.wait(timeout)

    def take(self):
        """(rows handed over since the last take, True if some were dropped)."""
        with self._lock:
            self._event.clear()
            rows, lost = list(self._rows), self._lost
            self._rows.clear()
            self._lost = False
        return rows, lost

    def hand(self, rows):
        """The bus's: rows of this subscription's job (kept up to MAILBOX)."""
        with self._lock:
            room = MAILBOX - len(self._rows)
            if len(rows) > room:
                self._lost = True
                rows = rows[:max(0, room)]
            self._rows.extend(rows)
        self._event.set()

    def ring(self):
        """The bus's: events came (a stream of all jobs reads them itself)."""
        self._event.set()

    def end(self):
        """The bus's: it closes; the stream ends."""
        self.closed = True
        self._event.set()


class EventBus:
    """Reads new events for this process's subscriptions (see the module)."""

    def __init__(self, journal, poll_interval: float):
        self._journal = journal
        self._poll = poll_interval
        self._lock = threading.Lock()
        self._by_job = {}  # job id -> set of Subscriptions
        self._all = set()
        self._cursor = None  # made when the first subscription comes, dropped with the last
        self._priming = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = None
        journal.on_events(self.wake)

    def subscribe(self, job_id: str | None = None) -> Subscription:
        """A subscription to one job's events (or, None, to the bell of every job's).

        Returns once the bus reads every event committed from now on: the caller may read
        what came before from the table, and then take what the bus hands it."""
        sub = Subscription(job_id)
        with self._priming:
            if self._stop.is_set():
                sub.end()
                return sub
            if self._cursor is None:
                self._cursor = EventCursor.at_end(self._journal)
            with self._lock:
                if job_id is None:
                    self._all.add(sub)
                else:
                    self._by_job.setdefault(job_id, set()).add(sub)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="jobserver-events", daemon=True)
                self._thread.start()
        self._wake.set()
        return sub

    def unsubscribe(self, sub: Subscription):
        with self._lock:
            if sub.job_id is None:
                self._all.discard(sub)
            else:
                subs = self._by_job.get(sub.job_id)
                if subs is not None:
                    subs.discard(sub)
                    if not subs:
                        del self._by_job[sub.job_id]

    def wake(self):
        """Read now: this process committed events (the journal's hook; quick)."""
        if not self._wake.is_set():
            self._wake.set()

    def close(self):
        """End every subscription (their streams close) and the thread."""
        self._stop.set()
        self._wake.set()
        with self._lock:
            subs = list(self._all) + [s for group in self._by_job.values() for s in group]
            self._all.clear()
            self._by_job.clear()
        for sub in subs:
            sub.end()
        if self._thread is not None:
            self._thread.join(5)

    @property
    def subscribers(self) -> int:
        with self._lock:
            return len(self._all) + sum(len(group) for group in self._by_job.values())

    def _loop(self):
        while not self._stop.is_set():
            self._wake.wait(self._poll)
            self._wake.clear()
            if self._stop.is_set():
                return
            with self._priming:
                if not self.subscribers:
                    self._cursor = None  # idle: start at the end when someone comes
                    continue
                cursor = self._cursor
            try:
                while True:
                    self._dispatch(cursor.read())
                    if not cursor.full:
                        break
            except JobserverError as exc:  # the journal away: streams read it themselves later
                log.warning("reading events failed (%s); trying again", exc)
                self._stop.wait(min(5.0, max(self._poll, 0.5)))
            except Exception:  # a bug must not end every stream's events
                log.exception("reading events failed")
                self._stop.wait(1.0)
            self._stop.wait(MIN_GAP)

    def _dispatch(self, read):
        if not read:
            return
        by_job = {}
        for row, _floor in read:
            by_job.setdefault(row.job_id, []).append(row)
        with self._lock:
            everyone = list(self._all)
            mine = [(sub, rows) for job_id, rows in by_job.items()
                    for sub in self._by_job.get(job_id, ())]
        for sub, rows in mine:
            sub.hand(rows)
        for sub in everyone:
            sub.ring()
