"""One thread that runs short callables at given times.

The journal uses it for the trailing edge of its progress events (a note held back by
the rate limit is journaled when the limit allows, even if the task reports nothing
more). A thread per delay (threading.Timer) would cost a thread per running job.
"""
import heapq
import itertools
import logging
import threading
import time

log = logging.getLogger(__name__)


class Timer:
    """`at(when, fn)` runs `fn()` on this timer's thread at monotonic time `when` (or soon
    after). Callables must be quick and must not wait: they share one thread. The thread
    starts at the first `at` and ends at `close()`."""

    def __init__(self, name: str = "jobserver-timer"):
        self._name = name
        self._heap = []
        self._order = itertools.count()  # ties run in the order they were asked for
        self._cond = threading.Condition()
        self._thread = None
        self._closed = False

    def at(self, when: float, fn) -> bool:
        """Run `fn` at `when`; False (and nothing runs) once the timer is closed."""
        with self._cond:
            if self._closed:
                return False
            heapq.heappush(self._heap, (when, next(self._order), fn))
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
                self._thread.start()
            elif self._heap[0][2] is fn:
                self._cond.notify()  # sooner than what the thread sleeps for
        return True

    def close(self, run_pending: bool = True, timeout: float = 5.0):
        """Stop the thread; with `run_pending`, run what is still waiting now, in order."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            pending = [fn for _when, _n, fn in sorted(self._heap)] if run_pending else []
            self._heap.clear()
            self._cond.notify()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)
        for fn in pending:
            self._run(fn)

    def _loop(self):
        while True:
            with self._cond:
                while not self._closed:
                    if self._heap:
                        delay = self._heap[0][0] - time.monotonic()
                        if delay <= 0:
                            break
                        self._cond.wait(delay)
                    else:
                        self._cond.wait()
                if self._closed:
                    return
                _when, _n, fn = heapq.heappop(self._heap)
            self._run(fn)

    @staticmethod
    def _run(fn):
        try:
            fn()
        except Exception:  # one callable's bug must not stop the others
            log.exception("timer callable failed")
