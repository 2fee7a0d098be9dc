"""Admission of request threads to the interpreter: a few run at once, the rest wait their turn.

Only one thread runs Python at a time anyway (the GIL), but every runnable request
thread still competes for it: each time the running one lets go of the GIL inside a
C call (the sqlite3 module does about eight times per query) a waiting thread is woken,
finds the GIL taken back, and sleeps again. With 16 waitress threads serving polls
that churn cost ~80,000 context switches a second and a fifth of the throughput. A
`Gate` lets `turns` request threads in; the others wait on a plain lock, which costs
nothing while they wait. A thread gives its turn away while it blocks on something
slow (a group commit, a long-poll, a MySQL round trip, DNS): `with waiting(): ...`
marks such a wait, and is a no-op on threads that hold no turn (the pool's, tests').
"""
import queue
import threading

__all__ = ["Gate", "waiting"]

_local = threading.local()  # .gate: the Gate whose turn this thread holds, or None


class Gate:
    """At most `turns` threads between enter() and leave() at once."""

    def __init__(self, turns=1):
        if turns < 1:
            raise ValueError("a gate has at least one turn")
        # turns are tokens in a C-level queue: taking and giving one back run no Python code,
        # as a threading.Semaphore's Condition would
        self._turns = queue.SimpleQueue()
        for _ in range(turns):
            self._turns.put(None)

    def enter(self):
        """Wait for a turn (a no-op if this thread holds one already)."""
        if getattr(_local, "gate", None) is None:
            self._turns.get()
            _local.gate = self

    def leave(self):
        """Give this thread's turn back, if it holds one of this gate."""
        if getattr(_local, "gate", None) is self:
            _local.gate = None
            self._turns.put(None)

    def turn(self):
        """`with gate.turn():` this thread holds a turn inside the block, taken at its start
        and given back at its end (if the thread held none before): a streamed response
        renders under it and waits for its next event outside it."""
        return _Turn(self)


class _Turn:
    __slots__ = ("_gate", "_took")

    def __init__(self, gate):
        self._gate = gate
        self._took = False

    def __enter__(self):
        self._took = getattr(_local, "gate", None) is None
        if self._took:
            self._gate.enter()
        return self

    def __exit__(self, *exc_info):
        if self._took:
            self._gate.leave()
        return False


class waiting:
    """`with waiting():` around a blocking wait: the thread's turn goes to another meanwhile."""

    __slots__ = ("_gate",)

    def __enter__(self):
        self._gate = getattr(_local, "gate", None)
        if self._gate is not None:
            self._gate.leave()
        return self

    def __exit__(self, *exc_info):
        if self._gate is not None:
            self._gate.enter()
        return False
