"""JSON as the journal stores it: strict (no NaN, no Infinity) and canonical; and which text it can store."""
import json

#: The largest document (params, result, step result, progress) the journal stores. MySQL's
#: MEDIUMTEXT column and its default 16 MiB packet hold it with room to spare; a bigger one
#: would be refused by the server on every retry and leave the job running for ever.
MAX_DOCUMENT = 8 * 1024 * 1024

# one encoder for every call: json.dumps with options builds a new JSONEncoder each time
_encode = json.JSONEncoder(separators=(",", ":"), allow_nan=False, sort_keys=True).encode


def dumps(value, max_bytes=None):
    """Canonical JSON text; raises TypeError or ValueError for what JSON cannot hold, and
    with `max_bytes` ValueError for a longer text (ASCII: its length is its size)."""
    text = _encode(value)
    if max_bytes is not None and len(text) > max_bytes:
        raise ValueError(f"the JSON text is {len(text)} bytes, over the limit of {max_bytes}")
    return text


def loads(text):
    """The value of JSON text, with None for SQL NULL."""
    return None if text is None else json.loads(text)


def storable(text):
    """True if the journal can store `text` as a column: it goes to the database as UTF-8, which
    a Python string holding a lone surrogate cannot be (strict JSON over HTTP never gives one;
    in JSON text, dumps escapes it)."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
