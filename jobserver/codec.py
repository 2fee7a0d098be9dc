"""JSON as the journal stores it: strict (no NaN, no Infinity) and canonical."""
import json


def dumps(value):
    """Canonical JSON text; raises TypeError or ValueError for what JSON cannot hold."""
    return json.dumps(value, separators=(",", ":"), allow_nan=False, sort_keys=True)


def loads(text):
    """The value of JSON text, with None for SQL NULL."""
    return None if text is None else json.loads(text)
