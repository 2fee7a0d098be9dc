"""Group commit: many writers' small operations share one transaction and one fsync.

A durable commit costs an fsync (about 1 ms on this kind of disk), so committing each
submit, claim and finish alone caps the server near 1,000 operations a second. The
committer is one thread that takes every operation queued while the previous
transaction was committing and runs them all in the next one, so the cost of an
fsync is shared by everyone who was waiting for it. Each caller still returns only
after its own operation is committed.
"""
import logging
import queue
import threading
import time

from .admission import waiting
from .errors import JobserverError, ServerClosed

log = logging.getLogger(__name__)

_STOP = object()


class _Op:
    """One queued operation. `done` is a lock held from birth and released once the op's
    transaction ended: a waiter blocks in one C-level acquire, where an Event would run a
    Condition's Python code on both sides of every submit."""
    __slots__ = ("fn", "done", "result", "error", "on_done")

    def __init__(self, fn, wait, on_done=None):
        self.fn = fn
        self.done = None
        if wait:
            self.done = threading.Lock()
            self.done.acquire()
        self.on_done = on_done
        self.result = None
        self.error = None


class GroupCommitter:
    """Runs operations `fn(cursor) -> result` in shared write transactions.

    `run_batch(ops)` belongs to the journal: it opens a write transaction, calls each
    op, commits, and retries the whole batch when the database asks for it. An op's own
    failure (a domain error, a statement the database refuses, any other exception) is
    recorded on that op alone: the journal runs the batch again with each op under a
    savepoint. Operations must therefore be pure database work, safe to run again, and
    must raise a domain error only before their first write. What `run_batch` raises
    fails every op of the batch: it is kept for the transaction's own trouble (the
    database unreachable, busy for too long).
    """

    def __init__(self, run_batch, max_batch=500, name="jobserver-journal-writer", observer=None):
        self._run_batch = run_batch
        #: `observer(seconds, operations)` after each batch, on this thread (metrics): quick
        self.observer = observer
        self._max_batch = max_batch
        self._queue = queue.SimpleQueue()
        self._closed = False
        self._gate = threading.Lock()  # no op can be queued behind the stop marker
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def call(self, fn):
        """Run `fn` in the next transaction; return its result once committed."""
        if threading.get_ident() == self._thread.ident:
            # an on_done callback waiting for a commit that only this thread can make
            raise RuntimeError("a journal write callback must not wait for another write")
        op = self._enqueue(fn, wait=True)
        with waiting():  # a request thread's turn goes to another while the commit runs
            op.done.acquire()
        if op.error is not None:
            raise op.error
        return op.result

    def cast(self, fn, on_done=None):
        """Queue `fn` for the next transaction without waiting.

        `on_done(result, error)` is called on the committer thread once the transaction
        committed (error None) or failed; it must be quick and must not write."""
        self._enqueue(fn, wait=False, on_done=on_done)

    def close(self, timeout=10.0):
        """Commit what is queued, then stop the thread."""
        with self._gate:
            if self._closed:
                return
            self._closed = True
            self._queue.put(_STOP)
        self._thread.join(timeout)

    def _enqueue(self, fn, wait, on_done=None):
        op = _Op(fn, wait, on_done)
        with self._gate:
            if self._closed:
                raise ServerClosed("the journal is closed")
            self._queue.put(op)
        return op

    def _loop(self):
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is _STOP:
                break
            batch = [first]
            while len(batch) < self._max_batch:
                try:
                    op = self._queue.get_nowait()
                except queue.Empty:
                    break
                if op is _STOP:
                    stopping = True
                    break
                batch.append(op)
            self._execute(batch)
        self._refuse_leftovers()

    def _refuse_leftovers(self):
        """Fail anything still queued once the loop ends (it ends only at the stop marker,
        which the gate keeps last; this is the belt to those braces): never leave a caller
        waiting for a commit that will not come."""
        while True:
            try:
                op = self._queue.get_nowait()
            except queue.Empty:
                return
            if op is _STOP:
                continue
            op.error = ServerClosed("the journal is closed")
            self._finish_op(op)

    def _execute(self, batch):
        observer = self.observer
        started = time.perf_counter() if observer is not None else 0.0
        try:
            self._run_batch(batch)
        except JobserverError as exc:
            for op in batch:
                op.error = exc
        except Exception as exc:  # the writer thread must survive anything a batch raises
            log.exception("journal write batch failed")
            for op in batch:
                op.error = exc
        if observer is not None:
            try:
                observer(time.perf_counter() - started, len(batch))
            except Exception:  # an observer's bug must not kill the committer
                log.exception("journal commit observer failed")
        for op in batch:
            self._finish_op(op)

    @staticmethod
    def _finish_op(op):
        if op.done is not None:
            op.done.release()
        elif op.on_done is not None:
            try:
                op.on_done(op.result, op.error)
            except Exception:  # a caller's bug must not kill the committer
                log.exception("journal write callback failed")
        elif op.error is not None:
            log.warning("queued journal write failed: %s", op.error)
