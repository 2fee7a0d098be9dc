"""Reading every job's events in id order, each once, where ids may commit out of order.

An event's id is assigned when its row is inserted, not when its transaction commits.
SQLite has one writer at a time, so its ids commit in order: a reader of `id > last`
misses nothing (a gap is an event deleted with its job). On MySQL, several processes'
transactions insert concurrently and commit in any order: a reader that has seen id 105
may see 103 commit a moment later, and a plain `id > last` would never see it.

The design here: a cursor remembers the *holes* below the highest id it has read, the
ids it has not seen, and reads each of them again (a primary-key range that finds
nothing most of the time) until it fills or HOLE_GRACE seconds pass; a hole that old
is taken for a rolled-back insert (a batch retried after a deadlock leaves one) or an
event deleted with its job, and given up. Its resume point, `floor`, is just below the
lowest open hole: every id up to it has been read or given up, so a stream resumed from
it misses nothing and repeats at most what it had read above a hole. The journal inserts
a batch's events as its last statement before COMMIT, so a hole lives for about a commit;
HOLE_GRACE is a hundred times that and more.

Not chosen: a commit-ordered counter (one row every transaction updates last, so that
ids commit in order). It serialises the commits of every process sharing the journal on
one row lock, and one process whose commit stalls (a network hiccup) stalls them all.
And per job no hole can hide an event: every writer of a job's event holds the job's row
lock from before its insert until its commit, so one job's ids commit in order.
"""
import time

from .journal import EVENT_PAGE

__all__ = ["EventCursor", "HOLE_GRACE"]

#: seconds an unseen id below the highest one read is looked for before it is given up
HOLE_GRACE = 10.0
#: holes kept at most (past it the oldest are given up: a storm of rollbacks)
MAX_HOLES = 256
#: holes read again per read, the newest first (the likeliest to be commits in flight)
HOLE_READS = 8
#: ids a cursor made at the end looks back over for holes (transactions in flight)
START_WINDOW = 1000


class EventCursor:
    """Reads a journal's events above a position, in id order, each once (see the module).

    `read()` returns the events committed since the last read, as (EventRow, floor)
    pairs: the floor after that event, which is what a stream sends as the event's
    `id:` (resuming from it skips what was delivered). `scoped`: rows carry their job's
    owner, task and state. Not thread-safe: one reader owns a cursor."""

    def __init__(self, journal, after=0, scoped=False, *, ordered=None, clock=time.monotonic):
        self._journal = journal
        self._scoped = scoped
        self._top = after  # the highest id read (or the start)
        self._holes = []  # [low, high, first seen]: ids not read, sorted, all below _top
        # SQLite commits ids in order: no hole ever fills, none is kept
        self._ordered = journal.dialect.name == "sqlite" if ordered is None else ordered
        self._clock = clock
        self.full = False  # the last read returned as many new events as it could

    @classmethod
    def at_end(cls, journal, scoped=False, **options):
        """A cursor at the journal's newest event: what commits from now on is read. On
        MySQL the ids just below the newest that are not committed yet are holes."""
        top = journal.last_event_id()
        cursor = cls(journal, top, scoped, **options)
        if not cursor._ordered and top:
            low = max(0, top - START_WINDOW)
            seen = journal.event_ids_after(low, limit=START_WINDOW + EVENT_PAGE)
            cursor._top = low
            cursor._advance(sorted(set(seen) | {top}), cursor._clock())
        return cursor

    @property
    def floor(self) -> int:
        """Every id up to this one has been read or given up."""
        return self._holes[0][0] - 1 if self._holes else self._top

    @property
    def holes(self) -> int:
        return len(self._holes)

    def read(self, limit=EVENT_PAGE):
        """[(EventRow, floor after it)] committed since the last read: filled holes first,
        then new events in id order. At most `limit` new ones: read again when full."""
        now = self._clock()
        out = []
        if self._holes:
            self._holes = [h for h in self._holes if now - h[2] < HOLE_GRACE][-MAX_HOLES:]
            for hole in list(self._holes[-HOLE_READS:]):
                for row in self._journal.events_between(hole[0], hole[1], limit, scoped=self._scoped):
                    self._fill(row.id)
                    out.append((row, self.floor))
        rows = self._journal.events_after(self._top, limit, scoped=self._scoped)
        for row in rows:
            self._advance((row.id,), now)
            out.append((row, self.floor))
        self.full = len(rows) >= limit
        return out

    def _advance(self, ids, now):
        """Take ids above the top, in order: the ids skipped on the way are holes."""
        for event_id in ids:
            if event_id <= self._top:
                continue
            if event_id > self._top + 1 and not self._ordered:
                self._holes.append([self._top + 1, event_id - 1, now])
            self._top = event_id
        if len(self._holes) > MAX_HOLES:
            del self._holes[:-MAX_HOLES]

    def _fill(self, event_id):
        """An id inside a hole was read: the hole shrinks or splits around it."""
        for i, (low, high, since) in enumerate(self._holes):
            if low <= event_id <= high:
                parts = [[lo, hi, since] for lo, hi in ((low, event_id - 1), (event_id + 1, high))
                         if lo <= hi]
                self._holes[i:i + 1] = parts
                return
