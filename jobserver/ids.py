"""Time-sortable job ids (UUIDv7, RFC 9562) and timestamp formatting."""
import os
import random
import threading
import time

_lock = threading.Lock()
_random = random.Random(os.urandom(32))  # seeded by the OS; far cheaper per id than os.urandom
_last_ms = 0
_seq = 0
# a forked child (gunicorn, multiprocessing) must not repeat its parent's random stream
os.register_at_fork(after_in_child=lambda: _random.seed(os.urandom(32)))


def new_id():
    """A UUIDv7 string: 48-bit millisecond time, then a 12-bit counter and random bits.

    Ids from one process are strictly increasing, so ordering by id is ordering by
    submission, which cursor pagination relies on.
    """
    global _last_ms, _seq
    with _lock:
        now = time.time_ns() // 1_000_000
        if now <= _last_ms:
            _seq += 1
            if _seq > 0xFFF:  # counter exhausted in this millisecond: borrow the next one
                _last_ms += 1
                _seq = 0
            now = _last_ms
        else:
            _seq = int.from_bytes(os.urandom(2), "big") & 0x3FF  # leave room to count up
        _last_ms = now
        seq = _seq
    rand = _random.getrandbits(62)
    value = (now << 80) | (0x7 << 76) | (seq << 64) | (0b10 << 62) | rand
    h = f"{value:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def format_ms(ms):
    """Milliseconds since the epoch as RFC 3339 UTC with milliseconds, or None."""
    if ms is None:
        return None
    seconds, millis = divmod(int(ms), 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"
