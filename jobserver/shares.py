"""Fair shares of the callback delivery threads across receivers.

A receiver is a host and port as the callback URL says them. Each gets at most half of
the delivery threads at a time (at least one), so a receiver that answers slowly, or
never, leaves threads for the others. A claim looks at more due rows than it has free
threads and hands them out in turn across receivers, soonest due first within each,
none past its receiver's share. Rows it cannot take stay due; but once a receiver is
slow (its whole share busy for SLOW_AFTER seconds), its due rows are put off (by the
callback timeout, the longest its attempts in flight can take), so that the next claim
reaches the rows of other receivers that were due behind them.
"""
import threading
import time
from urllib.parse import urlsplit

from .urlguard import SCHEMES

#: due deliveries a claim looks at, at least (soonest first)
CLAIM_SCAN = 64
#: seconds a receiver's whole share must have been busy for it to count as slow
SLOW_AFTER = 1.0


def receiver_of(url):
    """Whom a callback URL calls: "host:port" (the URL itself if it does not parse)."""
    try:
        parts = urlsplit(url)
        port = parts.port or SCHEMES.get(parts.scheme.lower())
    except ValueError:
        return url
    return f"{(parts.hostname or '').lower()}:{port}"


class Shares:
    """Deliveries in flight per receiver, and the claim plans that keep each to its share."""

    def __init__(self, threads, put_off_ms):
        self.share = max(1, threads // 2)
        self.put_off_ms = put_off_ms
        self._lock = threading.Lock()
        self._in_flight = {}  # receiver -> start times (monotonic) of its deliveries in flight

    def plan(self, free):
        """A `choose` for Journal.claim_callbacks that takes up to `free` rows."""
        return Plan(self, free)

    def started(self, row):
        """A claimed row (its "receiver" set by a Plan) is being delivered."""
        with self._lock:
            row["started"] = time.monotonic()
            self._in_flight.setdefault(row["receiver"], []).append(row["started"])

    def finished(self, row):
        with self._lock:
            starts = self._in_flight[row["receiver"]]
            starts.remove(row["started"])
            if not starts:
                del self._in_flight[row["receiver"]]

    def now(self):
        """(deliveries in flight per receiver, the receivers that are slow), as of now."""
        now = time.monotonic()
        with self._lock:
            counts = {receiver: len(starts) for receiver, starts in self._in_flight.items()}
            slow = {receiver for receiver, starts in self._in_flight.items()
                    if len(starts) >= self.share and now - max(starts) >= SLOW_AFTER}
        return counts, slow


class Plan:
    """One claim's choice among due rows. It runs inside the claim's transaction, perhaps
    more than once if that is retried, so it only reads the shares; `put_off` counts the
    rows the last run put off."""

    def __init__(self, shares, free):
        self.shares = shares
        self.free = free
        self.put_off = 0

    def __call__(self, rows):
        counts, slow = self.shares.now()
        queues = {}  # receiver -> its rows; a dict keeps the receivers in order of first due
        for row in rows:
            row["receiver"] = receiver_of(row["url"])
            queues.setdefault(row["receiver"], []).append(row)
        take = []
        while queues and len(take) < self.free:
            for receiver in list(queues):
                if len(take) == self.free:
                    break
                if counts.get(receiver, 0) >= self.shares.share:
                    del queues[receiver]
                    continue
                take.append(queues[receiver].pop(0))
                counts[receiver] = counts.get(receiver, 0) + 1
                if not queues[receiver]:
                    del queues[receiver]
        later = [row for row in rows if row["receiver"] in slow]  # at their share: none taken
        self.put_off = len(later)
        return take, later, self.shares.put_off_ms
