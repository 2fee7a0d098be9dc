"""The HTTP API of API.md as Flask views over a JobServer.

    app = create_app(server)                         # a whole app, for waitress
    init_app(existing_app, server, url_prefix="/q")  # or mounted into your own app

Each view parses and validates, calls one JobServer method, and serialises. The views
are methods of an `Api`, which the blueprint puts in `app.extensions["jobserver"]`;
nothing here reads the environment.

Errors are `application/problem+json` (RFC 9457): `{"type", "title", "status",
"detail"}`, plus `task`, `job_id` or `request_id` where useful. `type` is `about:blank`
for plain HTTP errors (404 of an unknown path, 405, 413, 400 for bad JSON) and
`urn:jobserver:problem:<name>` for the server's own (unknown-task, job-not-found,
idempotency-conflict, invalid-transition, queue-full, unavailable, unauthorized, ...).
An unexpected exception answers 500 without a traceback and is logged with the request
id that the response carries in `X-Request-Id`.

Long-poll: `GET /jobs/{id}?wait=S` holds its waitress thread until the job ends (it is
woken at once when this process ends the job) or S seconds pass. A server therefore
holds at most `threads` (waitress threads, Config.threads, default 32) waiters at a
time, and further requests queue behind them: raise `threads` for many long-pollers,
or have clients poll without `wait`. A waiting request does not hold its turn
(admission.py): one request thread runs the API's Python at a time, and threads that
wait for a commit or a job cost nothing meanwhile, so threads are cheap to add.

The request path is kept short on purpose (one before-, one after- and one teardown
hook, responses encoded once with the C JSON encoder, no URL building): every
microsecond here is paid on each poll of every frontend.
"""
import ipaddress
import json
import logging
import re

from flask import Blueprint, Flask, current_app, g, request
from prometheus_client.exposition import choose_encoder
from werkzeug.exceptions import BadRequest, Forbidden, HTTPException, RequestEntityTooLarge

from . import dashboard
from .admission import Gate
from .auth import Authenticator, Unauthorized
from .cors import CorsPolicy
from .errors import (
    IdempotencyConflict,
    InvalidCallback,
    InvalidJob,
    InvalidTransition,
    JobNotFound,
    JobserverError,
    JournalRefusesWrites,
    JournalUnavailable,
    QueueFull,
    ServerClosed,
    UnknownTask,
    WriteRefused,
)
from .ids import format_ms, new_request_id
from .metrics import UNMATCHED
from .streams import Streams
from .strictjson import StrictJsonError, parse_strict
from .tickets import Tickets

log = logging.getLogger(__name__)

JSON_TYPE = "application/json"
PROBLEM_TYPE = "application/problem+json"
RETRY_AFTER_UNAVAILABLE = 5
MAX_LIMIT = 500
DEFAULT_LIMIT = 50
TURNS = 1  # request threads running the API's Python at once (see admission.py)
_ID = re.compile(r"[A-Za-z0-9_-]{1,64}\Z")
# a list cursor is the id of a page's last job: a UUIDv7 as ids.new_id() writes it, nothing else
_CURSOR = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}\Z")
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}\Z")
_READ_CHUNK = 64 * 1024
_REQUEST_ID_KEY = "jobserver.request_id"  # where a request's id lives in its WSGI environ
_OWN_ACCESS = frozenset({"healthz", "metrics"})  # endpoints that check their callers themselves
_STREAMS = (".job_events", ".all_events")  # endpoints that take ?ticket= (and stay open)
_SSE_HEADERS = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
_EVENT_ID = re.compile(r"[0-9]{1,18}\Z")
_encode = json.JSONEncoder(ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode

# exception class -> (status, problem name, title, detail); the first match in this order
# wins. A detail of None is the exception's message: these echo the caller's own input (an
# id, a task name, a field) or the server's own fixed words. A text replaces a message
# that may hold the server's insides (a database address, a driver's error): the client
# gets the text and a request id, and the log gets the message under that id.
_PROBLEMS = (
    (JobNotFound, 404, "job-not-found", "Job not found", None),
    (UnknownTask, 422, "unknown-task", "Unknown task", None),
    (InvalidCallback, 422, "invalid-callback", "Callback URL refused", None),
    (InvalidJob, 400, "invalid-job", "Invalid job", None),
    (IdempotencyConflict, 409, "idempotency-conflict", "Idempotency key already used", None),
    (InvalidTransition, 409, "invalid-transition", "Not allowed in this state", None),
    (QueueFull, 429, "queue-full", "Queue full", None),
    (JournalRefusesWrites, 503, "unavailable", "Journal refuses writes", None),
    # refused for good (too large once escaped, malformed): a retry cannot help, so not a 503
    (WriteRefused, 422, "write-refused", "The journal cannot store this",
     "the journal refused to store this request; it would refuse it again"),
    (JournalUnavailable, 503, "unavailable", "Journal unavailable",
     "the journal is unavailable; try again later"),
    (ServerClosed, 503, "unavailable", "Server shutting down", None),
    (Unauthorized, 401, "unauthorized", "Unauthorized", None),
)


def create_app(server, *, url_prefix=""):
    """A Flask app serving the API of `server` under `url_prefix` (no trailing slash)."""
    app = Flask(__name__, static_folder=None)  # the dashboard serves its own files (dashboard.py)
    app.config["MAX_CONTENT_LENGTH"] = server.config.max_body
    _install_error_handlers(app)  # for paths outside the blueprint: 404, 405
    app.register_blueprint(api_blueprint(server, request_ids=False), url_prefix=url_prefix or None)
    app.after_request(app.extensions["jobserver"].end_response)  # every answer of the app
    return app


def init_app(app, server, url_prefix=""):
    """Mount the API of `server` into an existing Flask app under `url_prefix`.

    Errors of the API's routes are problem+json; the host app keeps its own handlers for
    its paths (and for 404/405 of paths that match no route at all)."""
    app.register_blueprint(api_blueprint(server), url_prefix=url_prefix or None)
    return app


def api_blueprint(server, name="jobserver", *, request_ids=True):
    """A Blueprint with every route; registering it puts its Api in app.extensions["jobserver"].

    `request_ids=False` leaves the end of Flask's own answers (their X-Request-Id, their
    count, their CORS headers: Api.end_response) to the app: create_app does it for all of
    them at once, in one hook; a host app's own routes keep theirs."""
    api = Api(server)
    bp = Blueprint(name, __name__)
    bp.record_once(lambda setup: _register(setup.app, api))
    _install_error_handlers(bp)
    bp.before_request(api.begin_request)
    if request_ids:
        bp.after_request(api.end_response)
    bp.teardown_request(api.end_request)
    bp.add_url_rule("/jobs", "submit", api.submit, methods=["POST"])
    bp.add_url_rule("/jobs", "list_jobs", api.list_jobs, methods=["GET"])
    bp.add_url_rule("/jobs/<job_id>", "get_job", api.get_job, methods=["GET"])
    bp.add_url_rule("/jobs/<job_id>/cancel", "cancel", api.cancel, methods=["POST"])
    bp.add_url_rule("/jobs/<job_id>/retry", "retry", api.retry, methods=["POST"])
    bp.add_url_rule("/jobs/<job_id>/callback/retry", "callback_retry", api.callback_retry,
                    methods=["POST"])
    bp.add_url_rule("/tasks", "tasks", api.tasks, methods=["GET"])
    bp.add_url_rule("/healthz", "healthz", api.healthz, methods=["GET"])
    bp.add_url_rule("/metrics", "metrics", api.metrics, methods=["GET"])
    bp.add_url_rule("/tickets", "tickets", api.create_ticket, methods=["POST"])
    bp.add_url_rule("/jobs/<job_id>/events", "job_events", api.job_events, methods=["GET"])
    bp.add_url_rule("/events", "all_events", api.all_events, methods=["GET"])
    _dashboard_routes(bp, api)
    return bp


def _install_error_handlers(target):
    """problem+json for every error of an app or a blueprint."""
    target.register_error_handler(HTTPException, _http_error)
    target.register_error_handler(JobserverError, _jobserver_error)
    target.register_error_handler(Exception, _unexpected_error)


def _register(app, api):
    existing = app.extensions.setdefault("jobserver", api)
    if existing.server is not api.server:
        raise ValueError("this Flask app serves another JobServer already")


# --- responses ------------------------------------------------------------------------
def json_response(body, status=200, headers=None, mimetype=JSON_TYPE):
    """`body` as compact JSON (ASCII, a newline at the end), with this request's id."""
    response = current_app.response_class(_encode(body) + "\n", status=status, mimetype=mimetype)
    response.headers["X-Request-Id"] = request_id()
    if headers:
        response.headers.update(headers)
    return response


def problem(status, title, detail, type_="about:blank", headers=None, **extra):
    """An application/problem+json response."""
    body = {"type": type_, "title": title, "status": status, "detail": detail, **extra}
    return json_response(body, status, headers, PROBLEM_TYPE)


def request_id():
    """This request's id: the client's X-Request-Id if it is a sane one, else a new one."""
    environ = request.environ
    rid = environ.get(_REQUEST_ID_KEY)
    if rid is None:
        given = environ.get("HTTP_X_REQUEST_ID", "")
        rid = environ[_REQUEST_ID_KEY] = given if _REQUEST_ID.match(given) else new_request_id()
    return rid


# --- problems -------------------------------------------------------------------------
def _http_error(exc):
    if exc.code is None or exc.code < 400:
        return exc
    headers = {k: v for k, v in exc.get_headers() if k.lower() != "content-type"}
    return problem(exc.code, exc.name, exc.description or exc.name, headers=headers)


def _jobserver_error(exc):
    for cls, status, name, title, detail in _PROBLEMS:
        if isinstance(exc, cls):
            extra = _error_extra(exc)
            if detail is not None:  # the message stays in the log, under the request id
                rid = extra["request_id"] = request_id()
                log.warning("request %s: %s %s: %s", rid, request.method, request.path, exc)
            return problem(status, title, str(exc) if detail is None else detail,
                           f"urn:jobserver:problem:{name}", headers=_error_headers(exc, status),
                           **extra)
    return _unexpected_error(exc)


def _error_headers(exc, status):
    if status == 429:
        return {"Retry-After": str(max(1, int(exc.retry_after)))}
    if status == 503:
        return {"Retry-After": str(RETRY_AFTER_UNAVAILABLE)}
    if status == 401:
        return {"WWW-Authenticate": 'Bearer realm="jobserver"'}
    return {}


def _error_extra(exc):
    if isinstance(exc, UnknownTask):
        return {"task": exc.task}
    if isinstance(exc, IdempotencyConflict):
        return {"job_id": exc.job_id}
    return {}


def _unexpected_error(exc):
    if isinstance(exc, HTTPException):
        return _http_error(exc)
    rid = request_id()
    api = current_app.extensions.get("jobserver")
    if api is not None and not api.server.accepting:  # e.g. a read racing the journal's close
        log.warning("request %s: %s %s failed while stopping: %r", rid, request.method,
                    request.path, exc)
        return _jobserver_error(ServerClosed("the server is shutting down"))
    log.error("request %s: %s %s failed", rid, request.method, request.path, exc_info=exc)
    return problem(500, "Internal Server Error",
                   f"the server failed; quote request id {rid} to its operator",
                   request_id=rid)


# --- the views ------------------------------------------------------------------------
class Api:
    """The views of one JobServer, with what they need: the authenticator and the limits."""

    def __init__(self, server, authenticator=None, turns=TURNS):
        self.server = server
        self.config = server.config
        self.auth = authenticator or Authenticator(server.journal)
        self.gate = Gate(turns)
        self._metrics = server.metrics
        # None unless --cors-origin names origins: then the hooks below cost nothing
        self.cors = CorsPolicy(self.config.cors_origin) or None
        self.tickets = Tickets(server.journal)
        self.streams = Streams(server, self.gate, _encode)

    def begin_request(self):
        """Answer a CORS preflight at once (no token: a browser sends none with it); else
        wait for a turn, then, on every route but /healthz and /metrics (which check their
        callers themselves), refuse while draining and identify the caller (on the event
        streams by a ?ticket= too, and a draining server's streams answer themselves: an
        EventSource gives up for good on a 503)."""
        if self.cors is not None and request.method == "OPTIONS":
            preflight = self._preflight()
            if preflight is not None:
                return preflight
        self.gate.enter()
        endpoint = request.endpoint
        if endpoint.rpartition(".")[2] in _OWN_ACCESS:
            return None
        if endpoint.endswith(_STREAMS):
            g.principal = self._stream_caller()
            return None
        if not self.server.accepting:  # draining: send clients elsewhere or back later
            raise ServerClosed("the server is shutting down")
        g.principal = self.auth.identify(request.environ.get("HTTP_AUTHORIZATION"))
        return None

    def _stream_caller(self):
        """A stream's caller: the one its ?ticket= names, else its Authorization header's.
        (No other route reads a ticket: there it is no credential.)"""
        ticket = request.args.get("ticket")
        if ticket is not None:
            return self.tickets.verify(ticket)
        return self.auth.identify(request.environ.get("HTTP_AUTHORIZATION"))

    def end_request(self, _exc=None):
        """Give the turn back (teardown: runs whatever happened to the request)."""
        self.gate.leave()

    def end_response(self, response):
        """Every answer, errors included (one hook: each costs its call on every request):
        its X-Request-Id, its count for /metrics, the CORS headers its Origin may have."""
        # views and errors answer through json_response, which sets the id; this covers
        # Flask's own answers (an automatic OPTIONS, a slash redirect)
        if "X-Request-Id" not in response.headers:
            response.headers["X-Request-Id"] = request_id()
        current = request._get_current_object()  # noqa: SLF001 (werkzeug's LocalProxy API)
        rule = current.url_rule
        if rule is None:  # the path and the method are whatever the client sent
            self._metrics.count_request(UNMATCHED, UNMATCHED, response.status_code)
        else:  # a matched rule's method is one of its own (another is a 405: no rule)
            self._metrics.count_request(rule.rule, current.environ["REQUEST_METHOD"],
                                        response.status_code)
        if self.cors is not None:
            self._cors_headers(response, current.environ.get("HTTP_ORIGIN"))
        return response

    # --- CORS (cors.py decides; these put its headers on Flask's answers) --------------
    def _preflight(self):
        """The answer to a CORS preflight, or None for another OPTIONS request. An origin
        that is not allowed gets the answer without allow headers: its browser stops there."""
        environ = request.environ
        origin = environ.get("HTTP_ORIGIN")
        if not self.cors.is_preflight(origin, environ.get("HTTP_ACCESS_CONTROL_REQUEST_METHOD")):
            return None
        response = current_app.response_class(status=204)
        del response.headers["Content-Type"]
        response.headers.update(self.cors.preflight_headers(origin))
        response.headers["X-Request-Id"] = request_id()
        return response

    def _cors_headers(self, response, origin):
        # the answer differs by Origin (allowed or not): a cache must keep them apart,
        # including the answers to requests that sent none
        response.vary.add("Origin")
        response.headers.update(self.cors.answer_headers(origin))

    # --- GET /metrics ---------------------------------------------------------------------
    def metrics(self):
        """GET /metrics: the Prometheus text format (OpenMetrics when Accept asks for it),
        for a loopback caller or an admin token (docs/metrics.md)."""
        self._check_metrics_caller()
        try:
            encode, content_type = choose_encoder(request.environ.get("HTTP_ACCEPT", ""))
        except (TypeError, ValueError):  # a version the library cannot read (0.26 raises): plain text
            encode, content_type = choose_encoder("")
        response = current_app.response_class(encode(self._metrics.registry), status=200,
                                              content_type=content_type)
        response.headers["X-Request-Id"] = request_id()
        response.headers["Cache-Control"] = "no-store"
        return response

    def _check_metrics_caller(self):
        """A loopback caller needs no token; anyone else an admin token (401 without a valid
        one, 403 with another)."""
        if _direct_loopback(request.environ):
            return
        principal = self.auth.identify(request.environ.get("HTTP_AUTHORIZATION"))
        if not principal.admin:
            raise Forbidden("metrics are for a caller on this machine or an admin token")

    def submit(self):
        """POST /jobs: one job (an object) or a batch (an array) in one transaction."""
        body = self._json_body()
        key = request.environ.get("HTTP_IDEMPOTENCY_KEY")
        owner = g.principal.name
        if isinstance(body, list):
            if key is not None:
                raise BadRequest("Idempotency-Key applies to one job; give each job of a batch "
                                 "its own idempotency_key field")
            if not body:
                raise BadRequest("a batch holds at least one job")
            results = self.server.submit_many(body, owner)
            status = 202 if any(created for _job, created in results) else 200
            return json_response([job for job, _created in results], status)
        if not isinstance(body, dict):
            raise BadRequest("a job is a JSON object (or a batch: an array of them)")
        if key is not None:
            if body.get("idempotency_key") not in (None, key):
                raise BadRequest("the Idempotency-Key header and the idempotency_key field differ")
            body = dict(body, idempotency_key=key)
        [(job, created)] = self.server.submit_many([body], owner)
        if not created:
            return json_response(job)
        # the route is .../jobs, so the job's own URL is this path and its id
        location = f"{request.script_root}{request.path}/{job['id']}"
        return json_response(job, 202, {"Location": location})

    def get_job(self, job_id):
        """GET /jobs/<id>, with ?wait=S holding the request until the job ends or S passes."""
        _check_id(job_id)
        wait = self._wait_seconds()
        if wait:
            return json_response(self.server.wait(job_id, wait, owner=g.principal.scope))
        return json_response(self.server.get(job_id, owner=g.principal.scope))

    def list_jobs(self):
        """GET /jobs: the caller's jobs (an admin's: everyone's), newest first, a page at a time."""
        args = request.args
        cursor = args.get("cursor") or None
        if cursor is not None and not _CURSOR.match(cursor):
            raise BadRequest("'cursor' is not a cursor this server gave out")
        task = args.get("task") or None
        if task is not None and len(task) > 200:
            raise BadRequest("'task' is at most 200 characters")
        limit = _int_arg(args, "limit", DEFAULT_LIMIT, 1, MAX_LIMIT)
        jobs, next_cursor = self.server.list(owner=g.principal.scope,
                                             state=args.get("state") or None,
                                             task=task, cursor=cursor, limit=limit)
        return json_response({"jobs": jobs, "next": next_cursor})

    def cancel(self, job_id):
        """POST /jobs/<id>/cancel: 202 with the job; 409 if it already ended."""
        _check_id(job_id)
        return json_response(self.server.cancel(job_id, owner=g.principal.scope), 202)

    def retry(self, job_id):
        """POST /jobs/<id>/retry: a failed or cancelled job queued again; 409 otherwise."""
        _check_id(job_id)
        return json_response(self.server.retry(job_id, owner=g.principal.scope), 202)

    def callback_retry(self, job_id):
        """POST /jobs/<id>/callback/retry: deliver a failed callback again; 409 if none failed."""
        _check_id(job_id)
        return json_response(self.server.retry_callback(job_id, owner=g.principal.scope), 202)

    def create_ticket(self):
        """POST /tickets: 201 {"ticket", "expires_at"}, a short-lived stand-in for the
        caller's token that only the event streams accept, as ?ticket= (tickets.py)."""
        ticket, expires_ms = self.tickets.issue(g.principal)
        return json_response({"ticket": ticket, "expires_at": format_ms(expires_ms)}, 201)

    def job_events(self, job_id):
        """GET /jobs/<id>/events: the job's events as Server-Sent Events (streams.py);
        204 for a resume at or past the end of a job that has ended."""
        _check_id(job_id)
        if not self.server.accepting:
            return self._event_stream(200, self.streams.come_back_later())
        status, body = self.streams.job_stream(job_id, g.principal.scope, self._resume_point(),
                                               request.environ.get("waitress.client_disconnected"))
        return self._event_stream(status, body)

    def all_events(self):
        """GET /events: the events of the caller's jobs (an admin's: everyone's), filtered
        by task, state and queue, as Server-Sent Events (streams.py)."""
        if not self.server.accepting:
            return self._event_stream(200, self.streams.come_back_later())
        args = request.args
        filters = {name: args.get(name) or None for name in ("task", "state", "queue")}
        for name, value in filters.items():
            if value is not None and len(value) > 200:
                raise BadRequest(f"'{name}' is at most 200 characters")
        try:
            status, body = self.streams.all_stream(
                g.principal.scope, after=self._resume_point(),
                disconnected=request.environ.get("waitress.client_disconnected"), **filters)
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        return self._event_stream(status, body)

    @staticmethod
    def _resume_point():
        """Where a stream resumes: Last-Event-ID (what a browser sends back), else ?after=;
        None: afresh. A bad ?after= is 400; a Last-Event-ID this server did not send is
        ignored (an EventSource would stop for good on a 400)."""
        given = request.args.get("after")
        if given is not None and given != "":
            if not _EVENT_ID.match(given):
                raise BadRequest("'after' is an event id: digits")
            return int(given)
        header = request.environ.get("HTTP_LAST_EVENT_ID", "").strip()
        return int(header) if _EVENT_ID.match(header) else None

    @staticmethod
    def _event_stream(status, body):
        if status == 204:
            response = current_app.response_class(status=204)
            del response.headers["Content-Type"]  # no body, no type
        else:
            response = current_app.response_class(body, status=status, content_type="text/event-stream")
            response.headers.update(_SSE_HEADERS)
        response.headers["X-Request-Id"] = request_id()
        return response

    def tasks(self):
        """GET /tasks: {"tasks": [{"name", "max_retries", "timeout", ...}]}."""
        return json_response({"tasks": self.server.tasks()})

    def healthz(self):
        """GET /healthz: 200 while accepting work and the journal answers; else 503. No token:
        anyone sees the status; the node id only an admin (a bad token is no error here)."""
        if not self.server.accepting:
            raise ServerClosed("the server is shutting down")
        return json_response(self.server.health(details=self._caller_is_admin()))

    def _caller_is_admin(self):
        """True if the request carries an admin token (not a loopback test: behind a proxy
        on the same box every caller would come from loopback)."""
        authorization = request.environ.get("HTTP_AUTHORIZATION")
        if not authorization:
            return False
        try:
            return self.auth.identify(authorization).admin
        except Unauthorized:
            return False

    # --- request parsing --------------------------------------------------------------
    def _json_body(self):
        """The request body as strict JSON, read at most max_body + 1 bytes (chunked or not)."""
        limit = self.config.max_body
        length = request.content_length
        if length is not None and length > limit:
            raise RequestEntityTooLarge(f"the body is over {limit} bytes")
        # read() allocates (and zeroes) as many bytes as it is asked for: ask for what the
        # body holds, or for modest chunks of a chunked body, never for the whole limit
        want = _READ_CHUNK if length is None else max(length, 1)
        stream = request.stream
        chunks, size = [], 0
        while size <= limit:
            chunk = stream.read(min(want, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > limit:
            raise RequestEntityTooLarge(f"the body is over {limit} bytes")
        try:
            return parse_strict(chunks[0] if len(chunks) == 1 else b"".join(chunks))
        except StrictJsonError as exc:
            raise BadRequest(str(exc)) from None

    def _wait_seconds(self):
        if not request.environ.get("QUERY_STRING"):
            return 0.0
        text = request.args.get("wait")
        if text is None or text == "":
            return 0.0
        limit = self.config.max_wait
        try:
            value = float(text)
        except ValueError:
            value = -1.0
        if not 0 <= value <= limit:  # also refuses nan
            raise BadRequest(f"'wait' is a number of seconds from 0 to {limit:g}")
        return value

    # --- the dashboard's routes: overview, delete, bulk ------------------------------
    def stats(self):
        """GET /stats: the caller's overview (docs/dashboard.md), and who the caller is."""
        body = self.server.stats(owner=g.principal.scope)
        body["viewer"] = {"name": g.principal.name, "admin": g.principal.admin}
        body["features"] = {"events": self._has_event_streams()}
        return json_response(body)

    def delete_job(self, job_id):
        """DELETE /jobs/<id>: 204 once a terminal job is forgotten; 409 if it has not ended."""
        _check_id(job_id)
        self.server.delete(job_id, owner=g.principal.scope)
        response = current_app.response_class(status=204)
        response.headers["X-Request-Id"] = request_id()
        return response

    def bulk(self):
        """POST /jobs/bulk: cancel, retry or delete up to 1,000 of the caller's jobs that a
        filter names; {"matched", "changed", "next"}, `next` to send back as `cursor`."""
        body = self._json_body()
        if not isinstance(body, dict) or not _BULK_FIELDS.issuperset(body):
            raise BadRequest("a bulk request is {\"action\", \"filter\"?, \"cursor\"?}")
        action = body.get("action")
        if not isinstance(action, str):
            raise BadRequest("'action' is one of cancel, retry, delete")
        cursor = body.get("cursor")
        if cursor is not None and not (isinstance(cursor, str) and _ID.match(cursor)):
            raise BadRequest("'cursor' is not a cursor this server gave out")
        filters = _bulk_filter(body.get("filter"))
        matched, changed, next_cursor = self.server.bulk(action, owner=g.principal.scope,
                                                         cursor=cursor, **filters)
        return json_response({"matched": matched, "changed": changed, "next": next_cursor})

    def _has_event_streams(self):
        """True once this app serves POST /tickets and GET /events beside this route: the
        dashboard then streams instead of polling (looked up once, the URL map is fixed)."""
        found = getattr(self, "_streams", None)
        if found is None:
            prefix = request.url_rule.rule[:-len("/stats")]
            rules = {(rule.rule, method) for rule in current_app.url_map.iter_rules()
                     for method in rule.methods or ()}
            found = self._streams = ((prefix + "/tickets", "POST") in rules
                                     and (prefix + "/events", "GET") in rules)
        return found


def _direct_loopback(environ):
    """True for a caller on this machine that no proxy forwarded: a proxy on the same box
    makes every caller loopback, and says so with Forwarded or X-Forwarded-For."""
    if "HTTP_FORWARDED" in environ or "HTTP_X_FORWARDED_FOR" in environ:
        return False
    try:
        address = ipaddress.ip_address(environ.get("REMOTE_ADDR") or "")
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1 on a dual-stack socket
    return (mapped or address).is_loopback


def _check_id(job_id):
    if not _ID.match(job_id):
        raise JobNotFound(job_id)


def _int_arg(args, name, default, low, high):
    text = args.get(name)
    if text is None or text == "":
        return default
    if not re.fullmatch(r"[0-9]{1,6}", text) or not low <= int(text) <= high:
        raise BadRequest(f"'{name}' is an integer from {low} to {high}")
    return int(text)


_BULK_FIELDS = frozenset({"action", "filter", "cursor"})
_BULK_FILTERS = frozenset({"state", "task", "queue", "ids"})
MAX_BULK_IDS = 1000


def _bulk_filter(spec):
    """A bulk request's filter as JobServer.bulk's keyword arguments; BadRequest if malformed."""
    if spec is None:
        return {}
    if not isinstance(spec, dict) or not _BULK_FILTERS.issuperset(spec):
        raise BadRequest("'filter' is an object of state, task, queue and ids")
    out = {}
    for name in ("state", "task", "queue"):
        value = spec.get(name)
        if value is None:
            continue
        if not isinstance(value, str) or not value or len(value) > 200:
            raise BadRequest(f"'filter.{name}' is a string of 1 to 200 characters")
        out[name] = value
    ids = spec.get("ids")
    if ids is not None:
        if (not isinstance(ids, list) or len(ids) > MAX_BULK_IDS
                or not all(isinstance(i, str) and _ID.match(i) for i in ids)):
            raise BadRequest(f"'filter.ids' is a list of at most {MAX_BULK_IDS} job ids")
        out["ids"] = sorted(set(ids), reverse=True)
    return out


def _dashboard_routes(bp, api):
    """The routes the dashboard needs besides the job API's, and the page itself."""
    bp.add_url_rule("/stats", "stats", api.stats, methods=["GET"])
    bp.add_url_rule("/jobs/<job_id>", "delete_job", api.delete_job, methods=["DELETE"])
    bp.add_url_rule("/jobs/bulk", "bulk", api.bulk, methods=["POST"])
    dashboard.attach(bp)
