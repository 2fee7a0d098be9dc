"""Time-sortable job ids (UUIDv7, RFC 9562) and timestamp formatting."""
import os
import threading
import time
import uuid
from datetime import datetime, timezone

_lock = threading.Lock()
_last_ms = 0
_seq = 0


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
    rand = int.from_bytes(os.urandom(8), "big") & ((1 << 62) - 1)
    value = (now << 80) | (0x7 << 76) | (seq << 64) | (0b10 << 62) | rand
    return str(uuid.UUID(int=value))


def format_ms(ms):
    """Milliseconds since the epoch as RFC 3339 UTC with milliseconds, or None."""
    if ms is None:
        return None
    dt = datetime.fromtimestamp(ms / 1000, tz=timezone.utc)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{int(ms) % 1000:03d}Z"
