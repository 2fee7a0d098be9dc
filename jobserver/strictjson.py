"""Strict JSON for request bodies: what API.md refuses, refused before any view sees it.

Python's json module accepts duplicate keys (the last wins), NaN and Infinity, numbers
that overflow to inf, and lone surrogates (which MySQL's utf8mb4 cannot store). Here
each of those, invalid UTF-8 and nesting deeper than MAX_DEPTH raise StrictJsonError.
"""
import json
import math
import re

MAX_DEPTH = 64
_SURROGATE = re.compile("[\ud800-\udfff]")


class StrictJsonError(ValueError):
    """The text is not JSON this server accepts; the message says why."""


def parse_strict(data):
    """The value of UTF-8 JSON `data` (bytes), or StrictJsonError."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise StrictJsonError("the body is not UTF-8") from None
    text = text.removeprefix("\ufeff")  # a byte order mark, as some Windows tools send
    if not text.strip():
        raise StrictJsonError("the body is empty; send a JSON document")
    try:
        value = json.loads(text, object_pairs_hook=_object, parse_constant=_constant,
                           parse_float=_float)
    except RecursionError:
        raise StrictJsonError(f"JSON nesting is deeper than {MAX_DEPTH}") from None
    except ValueError as exc:  # JSONDecodeError, our hooks, int digit limits
        raise StrictJsonError(f"malformed JSON: {exc}") from None
    _check(value)
    return value


def _object(pairs):
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen = set()
        for key, _value in pairs:
            if key in seen:
                raise ValueError(f"duplicate key {key!r}")
            seen.add(key)
    return obj


def _constant(name):
    raise ValueError(f"{name} is not JSON")


def _float(text):
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]} is out of range")
    return value


def _check(value):
    """Refuse nesting over MAX_DEPTH and strings holding lone surrogates (iteratively)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                raise StrictJsonError("a string holds a lone surrogate (\\ud800-\\udfff)")
        elif isinstance(item, (dict, list)):
            if depth > MAX_DEPTH:
                raise StrictJsonError(f"JSON nesting is deeper than {MAX_DEPTH}")
            if isinstance(item, dict):
                stack.extend((key, depth) for key in item)
                stack.extend((child, depth + 1) for child in item.values())
            else:
                stack.extend((child, depth + 1) for child in item)
