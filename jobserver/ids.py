"""Time-sortable job ids (UUIDv7, RFC 9562), request ids, and timestamp formatting."""
import itertools
import os
import random
import threading
import time

_random = random.Random(os.urandom(32))  # seeded by the OS; far cheaper per id than os.urandom
_local = threading.local()  # per thread: (last millisecond, counter)
_request_prefix = os.urandom(4).hex()
_request_numbers = itertools.count(1)


def _after_fork():
    """A forked child (gunicorn, multiprocessing) must not repeat its parent's ids."""
    global _request_prefix
    _random.seed(os.urandom(32))
    _request_prefix = os.urandom(4).hex()


os.register_at_fork(after_in_child=_after_fork)


def new_id():
    """A UUIDv7 string: 48-bit millisecond time, a 12-bit counter, 62 random bits.

    Ids made by one thread are strictly increasing (a batch lists in submission order);
    across threads they order by millisecond. No lock: a lock here, taken on every submit
    by every request thread, made waitress threads queue behind each other."""
    now = time.time_ns() // 1_000_000
    last, seq = getattr(_local, "state", (0, 0))
    if now <= last:
        seq += 1
        if seq > 0xFFF:  # counter exhausted in this millisecond: borrow the next one
            last, seq = last + 1, 0
        now = last
    else:
        seq = _random.getrandbits(10)  # start low, leaving room to count up
    _local.state = (now, seq)
    value = (now << 80) | (0x7 << 76) | (seq << 64) | (0b10 << 62) | _random.getrandbits(62)
    h = f"{value:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def new_callback_id():
    """A callback delivery's id (its `webhook-id`): `msg_` and a UUIDv7's 32 hex digits."""
    return "msg_" + new_id().replace("-", "")


def new_request_id():
    """A short id for one HTTP request's log lines: a per-process prefix and a count."""
    return f"{_request_prefix}-{next(_request_numbers)}"


def format_ms(ms):
    """Milliseconds since the epoch as RFC 3339 UTC with milliseconds, or None.

    The text of each second is made once and kept (a few thousand at most): a job
    shows five timestamps, and most answers name the same recent seconds."""
    if ms is None:
        return None
    seconds, millis = divmod(int(ms), 1000)
    text = _second_texts.get(seconds)
    if text is None:
        if len(_second_texts) >= 4096:
            _second_texts.clear()
        text = _second_texts[seconds] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
    return f"{text}.{millis:03d}Z"


_second_texts = {}


def lowest_id_at(ms):
    """The smallest id text of millisecond `ms` (a UUIDv7 of counter and random bits 0):
    every id new_id() made at or after `ms` sorts at or above it."""
    h = f"{int(ms):012x}"
    return f"{h[:8]}-{h[8:]}-0000-0000-000000000000"
