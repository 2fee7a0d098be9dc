"""A test's reader of a text/event-stream response, block by block, as a browser parses it."""
import json

import requests


class SseStream:
    """GET `url` as an event stream; `block()` is the next block as a dict of its fields
    (`event`, `id`, `data` decoded from JSON, `retry` as int, `comments`), None at the end.
    A read that waits longer than `timeout` raises requests' ConnectionError/ReadTimeout."""

    def __init__(self, url, headers=None, timeout=15.0, params=None):
        self.response = requests.get(url, headers=headers or {}, params=params, stream=True,
                                     timeout=(5, timeout))
        self._chunks = self.response.iter_content(chunk_size=None)
        self._buffer = b""
        self.ended = False

    @property
    def status(self):
        return self.response.status_code

    def _line(self):
        while b"\n" not in self._buffer:
            try:
                chunk = next(self._chunks)
            except StopIteration:
                return None
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.rstrip(b"\r").decode("utf-8")

    def block(self):
        fields = {"comments": []}
        while True:
            line = self._line()
            if line is None:
                self.ended = True
                return None if len(fields) == 1 and not fields["comments"] else fields
            if not line:
                if len(fields) > 1 or fields["comments"]:
                    return fields
                continue
            if line.startswith(":"):
                fields["comments"].append(line[1:].strip())
                continue
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "data":
                fields["data"] = json.loads(value)
            elif name == "retry":
                fields["retry"] = int(value)
            else:
                fields[name] = value

    def events(self, stop=None, limit=500):
        """Blocks that carry an event, until the stream ends, `stop(block)` is true (that
        block included) or `limit` blocks were read."""
        out = []
        for _ in range(limit):
            block = self.block()
            if block is None:
                return out
            if "event" in block:
                out.append(block)
                if stop is not None and stop(block):
                    return out
        return out

    def close(self):
        self.response.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()
