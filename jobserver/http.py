"""The HTTP API of API.md as Flask views over a JobServer.

    app = create_app(server)                         # a whole app, for waitress
    init_app(existing_app, server, url_prefix="/q")  # or mounted into your own app

Each view parses and validates, calls one JobServer method, and serialises. The state
lives in `app.extensions["jobserver"]` (an `Api`); nothing here reads the environment.

Errors are `application/problem+json` (RFC 9457): `{"type", "title", "status",
"detail"}`, plus `task`, `job_id` or `request_id` where useful. `type` is `about:blank`
for plain HTTP errors (404 of an unknown path, 405, 413, 400 for bad JSON) and
`urn:jobserver:problem:<name>` for the server's own (unknown-task, job-not-found,
idempotency-conflict, invalid-transition, queue-full, unavailable, unauthorized, ...).
An unexpected exception answers 500 without a traceback and is logged with the request
id that the response carries in `X-Request-Id`.

Long-poll: `GET /jobs/{id}?wait=S` holds its waitress thread until the job ends (it is
woken at once when this process ends the job) or S seconds pass. A server therefore
holds at most `threads` (waitress threads, Config.threads, default 16) waiters at a
time, and further requests queue behind them: raise `threads` for many long-pollers,
or have clients poll without `wait`.
"""
import logging
import re

from flask import Blueprint, Flask, current_app, g, jsonify, request, url_for
from werkzeug.exceptions import BadRequest, HTTPException, RequestEntityTooLarge

from .auth import Authenticator, Unauthorized
from .errors import (IdempotencyConflict, InvalidCallback, InvalidJob, InvalidTransition,
                     JobNotFound, JobserverError, JournalUnavailable, QueueFull, ServerClosed,
                     UnknownTask)
from .ids import new_request_id
from .strictjson import StrictJsonError, parse_strict

log = logging.getLogger(__name__)

PROBLEM_TYPE = "application/problem+json"
RETRY_AFTER_UNAVAILABLE = 5
MAX_LIMIT = 500
DEFAULT_LIMIT = 50
_ID = re.compile(r"[A-Za-z0-9_-]{1,64}\Z")
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}\Z")

# exception class -> (status, problem name, title); the first match in this order wins
_PROBLEMS = (
    (JobNotFound, 404, "job-not-found", "Job not found"),
    (UnknownTask, 422, "unknown-task", "Unknown task"),
    (InvalidCallback, 422, "invalid-callback", "Callback URL refused"),
    (InvalidJob, 400, "invalid-job", "Invalid job"),
    (IdempotencyConflict, 409, "idempotency-conflict", "Idempotency key already used"),
    (InvalidTransition, 409, "invalid-transition", "Not allowed in this state"),
    (QueueFull, 429, "queue-full", "Queue full"),
    (JournalUnavailable, 503, "unavailable", "Journal unavailable"),
    (ServerClosed, 503, "unavailable", "Server shutting down"),
    (Unauthorized, 401, "unauthorized", "Unauthorized"),
)


class Api:
    """What the views need: the JobServer, the authenticator, the limits."""

    def __init__(self, server, authenticator=None):
        self.server = server
        self.config = server.config
        self.auth = authenticator or Authenticator(server.journal)


def create_app(server, *, url_prefix=""):
    """A Flask app serving the API of `server` under `url_prefix` (no trailing slash)."""
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = server.config.max_body
    _install_common(app)
    init_app(app, server, url_prefix)
    return app


def init_app(app, server, url_prefix=""):
    """Mount the API of `server` into an existing Flask app under `url_prefix`.

    Errors of the API's routes are problem+json; the host app keeps its own handlers for
    its paths (and for 404/405 of paths that match no route at all)."""
    app.register_blueprint(api_blueprint(server), url_prefix=url_prefix or None)
    return app


def api_blueprint(server, name="jobserver"):
    """A Blueprint with every route; registering it puts an Api in app.extensions["jobserver"]."""
    api = Api(server)
    bp = Blueprint(name, __name__)
    bp.record_once(lambda setup: _register(setup.app, api))
    _install_common(bp)
    bp.before_request(_authenticate)
    bp.add_url_rule("/jobs", "submit", submit, methods=["POST"])
    bp.add_url_rule("/jobs", "list_jobs", list_jobs, methods=["GET"])
    bp.add_url_rule("/jobs/<job_id>", "get_job", get_job, methods=["GET"])
    bp.add_url_rule("/jobs/<job_id>/cancel", "cancel", cancel, methods=["POST"])
    bp.add_url_rule("/jobs/<job_id>/retry", "retry", retry, methods=["POST"])
    bp.add_url_rule("/jobs/<job_id>/callback/retry", "callback_retry", callback_retry,
                    methods=["POST"])
    bp.add_url_rule("/tasks", "tasks", tasks, methods=["GET"])
    bp.add_url_rule("/healthz", "healthz", healthz, methods=["GET"])
    return bp


def _install_common(target):
    """Request ids and problem+json error handlers on an app or a blueprint."""
    target.before_request(_begin_request)
    target.after_request(_end_request)
    target.register_error_handler(HTTPException, _http_error)
    target.register_error_handler(JobserverError, _jobserver_error)
    target.register_error_handler(Exception, _unexpected_error)


def _register(app, api):
    existing = app.extensions.setdefault("jobserver", api)
    if existing.server is not api.server:
        raise ValueError("this Flask app serves another JobServer already")


def _api():
    return current_app.extensions["jobserver"]


# --- request plumbing -----------------------------------------------------------------
def _begin_request():
    if "request_id" not in g:
        given = request.headers.get("X-Request-Id", "")
        g.request_id = given if _REQUEST_ID.match(given) else new_request_id()


def _end_request(response):
    response.headers["X-Request-Id"] = _request_id()
    return response


def _request_id():
    if "request_id" not in g:
        _begin_request()
    return g.request_id


def _authenticate():
    if request.endpoint and request.endpoint.endswith(".healthz"):
        return
    if not _api().server.accepting:  # draining: send clients elsewhere or back later
        raise ServerClosed("the server is shutting down")
    g.principal = _api().auth.identify(request.headers.get("Authorization"))


def _owner_scope():
    return g.principal.scope


def _json_body():
    """The request body as strict JSON, read at most max_body + 1 bytes (chunked or not)."""
    limit = _api().config.max_body
    if request.content_length is not None and request.content_length > limit:
        raise RequestEntityTooLarge(f"the body is over {limit} bytes")
    chunks, size = [], 0
    while size <= limit:
        chunk = request.stream.read(limit + 1 - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    if size > limit:
        raise RequestEntityTooLarge(f"the body is over {limit} bytes")
    try:
        return parse_strict(b"".join(chunks))
    except StrictJsonError as exc:
        raise BadRequest(str(exc)) from None


# --- problems -------------------------------------------------------------------------
def problem(status, title, detail, type_="about:blank", headers=None, **extra):
    """An application/problem+json response."""
    body = {"type": type_, "title": title, "status": status, "detail": detail, **extra}
    response = current_app.response_class(current_app.json.dumps(body) + "\n", status=status,
                                          mimetype=PROBLEM_TYPE)
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def _http_error(exc):
    if exc.code is None or exc.code < 400:
        return exc
    headers = {k: v for k, v in exc.get_headers() if k.lower() != "content-type"}
    return problem(exc.code, exc.name, exc.description or exc.name, headers=headers)


def _jobserver_error(exc):
    for cls, status, name, title in _PROBLEMS:
        if isinstance(exc, cls):
            return problem(status, title, str(exc), f"urn:jobserver:problem:{name}",
                           headers=_error_headers(exc, status), **_error_extra(exc))
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
    request_id = _request_id()
    if not _api().server.accepting:  # e.g. a read racing the journal's close at shutdown
        log.warning("request %s: %s %s failed while stopping: %r", request_id, request.method,
                    request.path, exc)
        return _jobserver_error(ServerClosed("the server is shutting down"))
    log.error("request %s: %s %s failed", request_id, request.method, request.path,
              exc_info=exc)
    return problem(500, "Internal Server Error",
                   f"the server failed; quote request id {request_id} to its operator",
                   request_id=request_id)


# --- views ----------------------------------------------------------------------------
def submit():
    """POST /jobs: one job (an object) or a batch (an array) in one transaction."""
    body = _json_body()
    key = request.headers.get("Idempotency-Key")
    owner = g.principal.name
    if isinstance(body, list):
        if key is not None:
            raise BadRequest("Idempotency-Key applies to one job; give each job of a batch "
                             "its own idempotency_key field")
        if not body:
            raise BadRequest("a batch holds at least one job")
        results = _api().server.submit_many(body, owner)
        status = 202 if any(created for _job, created in results) else 200
        return jsonify([job for job, _created in results]), status
    if not isinstance(body, dict):
        raise BadRequest("a job is a JSON object (or a batch: an array of them)")
    if key is not None:
        if body.get("idempotency_key") not in (None, key):
            raise BadRequest("the Idempotency-Key header and the idempotency_key field differ")
        body = dict(body, idempotency_key=key)
    [(job, created)] = _api().server.submit_many([body], owner)
    if not created:
        return jsonify(job), 200
    return jsonify(job), 202, {"Location": url_for(".get_job", job_id=job["id"])}


def get_job(job_id):
    """GET /jobs/<id>, with ?wait=S holding the request until the job ends or S passes."""
    _check_id(job_id)
    server = _api().server
    wait = _wait_seconds()
    if wait:
        return jsonify(server.wait(job_id, wait, owner=_owner_scope()))
    return jsonify(server.get(job_id, owner=_owner_scope()))


def list_jobs():
    """GET /jobs: the caller's jobs (an admin's: everyone's), newest first, a page at a time."""
    args = request.args
    cursor = args.get("cursor") or None
    if cursor is not None and not _ID.match(cursor):
        raise BadRequest("'cursor' is not a cursor this server gave out")
    task = args.get("task") or None
    if task is not None and len(task) > 200:
        raise BadRequest("'task' is at most 200 characters")
    limit = _int_arg("limit", DEFAULT_LIMIT, 1, MAX_LIMIT)
    jobs, next_cursor = _api().server.list(owner=_owner_scope(), state=args.get("state") or None,
                                           task=task, cursor=cursor, limit=limit)
    return jsonify({"jobs": jobs, "next": next_cursor})


def cancel(job_id):
    """POST /jobs/<id>/cancel: 202 with the job; 409 if it already ended."""
    _check_id(job_id)
    return jsonify(_api().server.cancel(job_id, owner=_owner_scope())), 202


def retry(job_id):
    """POST /jobs/<id>/retry: a failed or cancelled job queued again; 409 otherwise."""
    _check_id(job_id)
    return jsonify(_api().server.retry(job_id, owner=_owner_scope())), 202


def callback_retry(job_id):
    """POST /jobs/<id>/callback/retry: deliver a failed callback again; 409 if none failed."""
    _check_id(job_id)
    retry_callback = getattr(_api().server, "retry_callback", None)
    if retry_callback is None:  # callbacks layer not present in this build
        return problem(501, "Not Implemented", "callback delivery is not available on this server")
    return jsonify(retry_callback(job_id, owner=_owner_scope())), 202


def tasks():
    """GET /tasks: {"tasks": [{"name", "max_retries", "timeout", ...}]}."""
    return jsonify({"tasks": _api().server.tasks()})


def healthz():
    """GET /healthz: 200 while accepting work and the journal answers; else 503. No token."""
    server = _api().server
    if not server.accepting:
        raise ServerClosed("the server is shutting down")
    return jsonify(server.health())


# --- argument parsing -----------------------------------------------------------------
def _check_id(job_id):
    if not _ID.match(job_id):
        raise JobNotFound(job_id)


def _wait_seconds():
    text = request.args.get("wait")
    if text is None or text == "":
        return 0.0
    limit = _api().config.max_wait
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= limit:  # also refuses nan
        raise BadRequest(f"'wait' is a number of seconds from 0 to {limit:g}")
    return value


def _int_arg(name, default, low, high):
    text = request.args.get(name)
    if text is None or text == "":
        return default
    if not re.fullmatch(r"[0-9]{1,6}", text) or not low <= int(text) <= high:
        raise BadRequest(f"'{name}' is an integer from {low} to {high}")
    return int(text)
