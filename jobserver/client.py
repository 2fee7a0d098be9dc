"""The Python HTTP client, with a handle that mirrors Celery's AsyncResult.

    client = Client("http://127.0.0.1:8080", token="...")
    job = client.submit("demo.sleep", seconds=2)
    job.get(timeout=30)      # the result, or raises RemoteJobError / TimeoutError

It speaks only the HTTP API of docs/api.md (requests + stdlib), so it knows nothing of
the server's internals. Every request carries a timeout.

    for event in job.events():   # GET /jobs/{id}/events, resumed after a dropped connection
        print(event.kind, event.data)
"""
import json
import time
from collections.abc import Iterator
from typing import NamedTuple
from urllib.parse import quote, urlsplit

import requests

from .redact import mask_url

TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
#: longest single ?wait= long-poll; get() loops until its own deadline
LONG_POLL = 30.0
SUBMIT_OPTIONS = frozenset({"priority", "delay", "max_retries", "timeout", "idempotency_key",
                            "callback_url"})
#: seconds without a byte after which a stream counts as dropped (the server pings every 15)
STREAM_READ_TIMEOUT = 60.0
#: seconds a stream keeps trying to reconnect before it gives up (a restart takes a few)
STREAM_RECONNECT_FOR = 60.0
MAX_EVENT_LINE = 1024 * 1024 + 4096  # bytes: a snapshot holds the job's documents


class StreamEvent(NamedTuple):
    """One Server-Sent Event of a job's stream: `kind` (snapshot, state, progress, step,
    callback), its `id` (what a resume sends back; None for some snapshots) and `data`
    (the job, for a snapshot; else {"job_id", "seq", ...} as docs/events.md lists)."""
    kind: str
    id: str | None
    data: dict


class ClientError(Exception):
    """The request did not succeed: the server answered with an error, or could not be reached."""


class ProblemError(ClientError):
    """The server answered with an error (`application/problem+json`): status, title, detail."""

    def __init__(self, status, title, detail=None, type="about:blank", retry_after=None, problem=None):
        super().__init__(f"{status} {title}: {detail}" if detail else f"{status} {title}")
        self.status = status
        self.title = title
        self.detail = detail
        self.type = type
        self.retry_after = retry_after
        self.problem = problem or {}


class ConnectionFailed(ClientError):
    """The server could not be reached or did not answer in time."""


class RemoteJobError(Exception):
    """The job ended `failed` or `cancelled`; carries the remote error's type, message, traceback."""

    def __init__(self, job):
        error = job.get("error") or {}
        self.job = job
        self.state = job.get("state")
        self.type = error.get("type") or ("JobCancelled" if self.state == "cancelled" else "Error")
        self.message = error.get("message") or self.state
        self.traceback = error.get("traceback")
        super().__init__(f"job {job.get('id')} {self.state}: {self.type}: {self.message}")


class JobHandle:
    """One job on the server, as last seen (`refresh()` looks again)."""

    def __init__(self, client, job):
        self.client = client
        self.job = job

    def __repr__(self):
        return f"<JobHandle {self.id} {self.state}>"

    @property
    def id(self):
        return self.job["id"]

    @property
    def state(self):
        """The state as last seen; a handle that is not finished looks again first."""
        if self.job.get("state") not in TERMINAL:
            self.refresh()
        return self.job["state"]

    @property
    def result(self):
        """The result once succeeded (else None), without waiting."""
        return self.job.get("result") if self.state == "succeeded" else None

    @property
    def error(self):
        return self.job.get("error") if self.state in TERMINAL else None

    @property
    def traceback(self):
        """The remote traceback of a failed job (else None)."""
        return (self.error or {}).get("traceback")

    def ready(self):
        """True once the job is terminal (succeeded, failed or cancelled)."""
        return self.state in TERMINAL

    def successful(self):
        return self.state == "succeeded"

    def failed(self):
        return self.state == "failed"

    def refresh(self, wait=None):
        """Fetch the job again (holding up to `wait` seconds for it to end); returns self."""
        self.job = self.client.get(self.id, wait=wait)
        return self

    def wait(self, timeout=None):
        """Long-poll until the job is terminal; TimeoutError after `timeout` seconds (None: forever)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.job.get("state") not in TERMINAL:
            remaining = LONG_POLL if deadline is None else deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"job {self.id} is still {self.job.get('state')} after {timeout} s")
            self.refresh(wait=min(remaining, LONG_POLL))
        return self

    def get(self, timeout=None, propagate=True):
        """The result once the job ends; raises RemoteJobError if it failed or was cancelled
        (with `propagate=False`, returns the error object instead), TimeoutError on timeout."""
        self.wait(timeout)
        if self.job["state"] == "succeeded":
            return self.job.get("result")
        if propagate:
            raise RemoteJobError(self.job)
        return self.job.get("error")

    def cancel(self):
        """Cancel a queued job, or ask a running one to stop; returns self."""
        self.job = self.client.cancel(self.id)
        return self

    def retry(self):
        """Queue a failed or cancelled job again under the same id; returns self."""
        self.job = self.client.retry(self.id)
        return self

    def events(self, after=None, timeout=None) -> Iterator[StreamEvent]:
        """The job's events as they happen (GET /jobs/{id}/events): a snapshot first (unless
        resuming `after` an event id), then state, progress, step and callback events.

        A dropped connection (or a server restart) is resumed with Last-Event-ID, so no
        event is lost or repeated; the iterator ends after the job's terminal state, or
        after `timeout` seconds (None: no limit). The handle's `job` follows the events."""
        for event in self.client.job_events(self.id, after=after, timeout=timeout):
            if event.kind == "snapshot":
                self.job = event.data
            elif event.kind == "state":
                self.job = dict(self.job, state=event.data["state"])
            elif event.kind == "progress":
                self.job = dict(self.job, progress=event.data["progress"])
            yield event


def base_url(url: str) -> str:
    """`url` as the client's base: `127.0.0.1:8080` or `localhost:8080` mean http://...;
    any other scheme than http or https is a ValueError that says what to write."""
    text = url.strip().rstrip("/")
    if "://" not in text:
        text = "http://" + text
    parts = urlsplit(text)
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise ValueError(f"a server URL looks like http://127.0.0.1:8080 (or https://...), not {url!r}")
    return text


class Client:
    """Talks to a jobserver at `url` (e.g. http://127.0.0.1:8080, or .../jobserver when mounted;
    without a scheme, http:// is meant).

    `token` is sent as `Authorization: Bearer`; `timeout` bounds every request (a long-poll
    gets its wait on top)."""

    def __init__(self, url, token=None, timeout=10.0, session=None):
        self.url = base_url(url)
        self.timeout = float(timeout)
        self.session = session or requests.Session()
        if token:
            self.session.headers["Authorization"] = f"Bearer {token}"

    def close(self):
        self.session.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    # --- jobs ---------------------------------------------------------------------------
    def submit(self, task, /, **params):
        """Submit `task` with `params` as keyword arguments; returns a JobHandle."""
        return self.submit_with(task, params)

    def submit_with(self, task, params=None, **options):
        """Submit with options: priority, delay (s), max_retries, timeout (s), idempotency_key,
        callback_url. Returns a JobHandle (an idempotent repeat returns the first job)."""
        unknown = set(options) - SUBMIT_OPTIONS
        if unknown:
            raise TypeError(f"unknown submit option(s): {', '.join(sorted(unknown))}")
        body = {k: v for k, v in options.items() if v is not None}
        body.update(task=task, params={} if params is None else params)
        return JobHandle(self, self._request("POST", "/jobs", body=body))

    def submit_many(self, specs):
        """Submit a batch in one transaction: specs are dicts as `POST /jobs` takes them."""
        return [JobHandle(self, job) for job in self._request("POST", "/jobs", body=list(specs))]

    def handle(self, job_id):
        """A JobHandle for an existing job id (fetched now, so a wrong id raises at once)."""
        return JobHandle(self, self.get(job_id))

    def get(self, job_id, wait=None):
        """The job as a dict; `wait` holds the request up to that many seconds for it to end."""
        query = {}
        extra = 0.0
        if wait is not None and wait > 0:
            query["wait"] = f"{wait:.3f}"
            extra = float(wait)
        return self._request("GET", self._job_path(job_id), query=query, extra_timeout=extra)

    def list(self, state=None, task=None, limit=None, cursor=None):
        """(jobs newest first, next cursor or None)."""
        query = {k: v for k, v in (("state", state), ("task", task), ("limit", limit),
                                   ("cursor", cursor)) if v is not None}
        page = self._request("GET", "/jobs", query=query)
        return page["jobs"], page.get("next")

    def cancel(self, job_id):
        return self._request("POST", self._job_path(job_id) + "/cancel")

    def retry(self, job_id):
        return self._request("POST", self._job_path(job_id) + "/retry")

    def tasks(self):
        return self._request("GET", "/tasks")

    def job_events(self, job_id, after=None, timeout=None, *, read_timeout=STREAM_READ_TIMEOUT,
                   reconnect_for=STREAM_RECONNECT_FOR) -> Iterator[StreamEvent]:
        """The events of a job's stream (see JobHandle.events): resumed after a dropped
        connection with Last-Event-ID, waiting the server's `retry:` between tries, for up
        to `reconnect_for` seconds of failures in a row (then ConnectionFailed); ends after
        the terminal state, on 204 (nothing more to come) or after `timeout` seconds."""
        url = self.url + self._job_path(job_id) + "/events"
        deadline = None if timeout is None else time.monotonic() + timeout
        last_id = None if after is None else str(after)
        retry_s, failing_since = 3.0, None
        while True:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return
            headers = {"Accept": "text/event-stream"}
            if last_id is not None:
                headers["Last-Event-ID"] = last_id
            read_for = read_timeout if remaining is None else min(read_timeout, max(remaining, 0.05))
            try:
                with self.session.get(url, headers=headers, stream=True, allow_redirects=False,
                                      timeout=(self.timeout, read_for)) as response:
                    if response.status_code == 204:
                        return
                    if response.status_code >= 300:
                        if response.status_code < 500:
                            raise _problem(response)
                        raise ConnectionFailed(f"GET {url}: HTTP {response.status_code}")
                    failing_since = None
                    for event, event_id, retry in _sse(response):
                        if retry is not None:
                            retry_s = retry / 1000
                        if event_id is not None:
                            last_id = event_id
                        if event is None:
                            continue
                        yield event
                        if event.kind in ("state", "snapshot") and event.data.get("state") in TERMINAL:
                            return  # the stream ends after the terminal state
            except (requests.RequestException, ConnectionFailed) as exc:
                if deadline is not None and time.monotonic() >= deadline:
                    return
                now = time.monotonic()
                failing_since = failing_since or now
                if now - failing_since > reconnect_for:
                    raise ConnectionFailed(f"GET {url}: {exc}") from exc
            # closed (its lifetime) or dropped: come back as an EventSource would, after `retry:`
            pause = retry_s if deadline is None else min(retry_s, max(0.0, deadline - time.monotonic()))
            time.sleep(pause)

    def health(self):
        return self._request("GET", "/healthz")

    # --- transport ----------------------------------------------------------------------
    @staticmethod
    def _job_path(job_id):
        if not isinstance(job_id, str) or not job_id:
            raise TypeError("a job id is a non-empty string")
        return "/jobs/" + quote(job_id, safe="")

    def _request(self, method, path, body=None, query=None, extra_timeout=0.0):
        """One HTTP exchange: the decoded JSON answer, or ProblemError / ConnectionFailed."""
        try:
            response = self.session.request(method, self.url + path, json=body, params=query,
                                            timeout=(self.timeout, self.timeout + extra_timeout),
                                            allow_redirects=False)
        except requests.RequestException as exc:
            raise ConnectionFailed(f"{method} {mask_url(self.url)}{path}: {exc}") from exc
        if response.status_code >= 300:
            raise _problem(response)
        try:
            return response.json()
        except ValueError as exc:
            raise ProblemError(response.status_code, "Bad response",
                               "the server did not answer with JSON") from exc


def _sse(response):
    """(StreamEvent or None, its id, retry ms or None) for each block of a text/event-stream
    body (the WHATWG framing: `field: value` lines, a blank line ends a block, `:` a comment).
    A block with no data (a ping with an id) gives None with the id."""
    kind, data, event_id, retry = "message", [], None, None
    buffer = b""
    for chunk in response.iter_content(chunk_size=None):
        buffer += chunk
        if len(buffer) > MAX_EVENT_LINE and b"\n" not in buffer:
            raise ConnectionFailed("the event stream sent a line too long to be an event")
        *lines, buffer = buffer.split(b"\n")
        for raw in lines:
            line = raw.rstrip(b"\r").decode("utf-8")
            if not line:
                if data:
                    yield StreamEvent(kind, event_id, json.loads("\n".join(data))), event_id, retry
                elif retry is not None or event_id is not None:
                    yield None, event_id, retry
                kind, data, retry = "message", [], None
                continue
            if line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "event":
                kind = value
            elif name == "data":
                data.append(value)
            elif name == "id":
                event_id = value
            elif name == "retry" and value.isdigit():
                retry = int(value)


def _problem(response):
    """A ProblemError from an error response, problem+json or not."""
    try:
        problem = response.json()
    except ValueError:
        problem = None
    if not isinstance(problem, dict):
        problem = {"title": response.reason or "Error", "detail": response.text[:500] or None}
    retry_after = response.headers.get("Retry-After")
    if retry_after is not None and retry_after.isdigit():
        retry_after = int(retry_after)
    return ProblemError(response.status_code,
                        problem.get("title") or response.reason or "Error",
                        problem.get("detail"), problem.get("type", "about:blank"),
                        retry_after=retry_after, problem=problem)
