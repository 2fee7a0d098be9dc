"""CORS (--cors-origin): real preflights over real sockets against waitress, the origins
checked at start, and a real browser (headless Chromium) on a page of another origin that
calls the API with a bearer token: its allowed origin gets through, another is blocked."""
import os
import shutil
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests
from http_fixtures import TASKS, assert_problem, launch
from liveserver import ServeProcess, clean_env, run_cli

from jobserver import JobServer
from jobserver.auth import create_token
from jobserver.cors import CorsPolicy, normalize_origin
from jobserver.http import create_app

FRONTEND = "http://127.0.0.1:5173"
CORS_HEADERS = ("Access-Control-Allow-Origin", "Access-Control-Allow-Methods",
                "Access-Control-Allow-Headers", "Access-Control-Max-Age",
                "Access-Control-Expose-Headers", "Access-Control-Allow-Credentials")
CHROMIUM = os.environ.get("JOBSERVER_TEST_CHROMIUM", "/usr/bin/chromium")
INSTALL = "apt-get update && apt-get install -y chromium && pip install -e '.[test]'"


@contextmanager
def token_server(sqlite_url, **options):
    """A live server in token mode (a preflight carries no token: it must pass all the same)."""
    with launch(sqlite_url, **options) as live:
        yield live, create_token(live.server.journal, "alice")


def _preflight(live, path, origin=FRONTEND, method="POST",
               headers="authorization, content-type, idempotency-key"):
    return requests.options(live.url(path), timeout=10, headers={
        "Origin": origin, "Access-Control-Request-Method": method,
        "Access-Control-Request-Headers": headers})


def _vary(response):
    return {word.strip().lower() for word in response.headers.get("Vary", "").split(",")}


def _words(value):
    return {word.strip().lower() for word in value.split(",")}


def test_a_preflight_is_answered_without_a_token(sqlite_url):
    with token_server(sqlite_url, cors_origin=(FRONTEND,)) as (live, _token):
        for path, method in (("/jobs", "POST"), ("/jobs", "GET"), ("/jobs/0190aaaa-0000-7000-8000-000000000001", "DELETE"),
                             ("/jobs/x/cancel", "POST"), ("/healthz", "GET"), ("/tasks", "GET")):
            answer = _preflight(live, path, method=method)
            assert answer.status_code == 204, (path, answer.text)
            assert answer.headers["Access-Control-Allow-Origin"] == FRONTEND
            assert method.lower() in _words(answer.headers["Access-Control-Allow-Methods"])
            assert _words(answer.headers["Access-Control-Allow-Headers"]) >= {
                "authorization", "content-type", "idempotency-key", "last-event-id", "x-request-id"}
            assert int(answer.headers["Access-Control-Max-Age"]) > 0
            assert "origin" in _vary(answer)
            assert "Access-Control-Allow-Credentials" not in answer.headers  # tokens, not cookies
            assert answer.content == b""
        assert live.get("/jobs").status_code == 401  # the API itself still wants a token


def test_answers_to_an_allowed_origin_carry_the_headers_errors_included(sqlite_url):
    with token_server(sqlite_url, cors_origin=(FRONTEND, "https://app.example.com")) as (live, token):
        headers = {"Origin": FRONTEND}
        created = live.post("/jobs", token=token, json={"task": "t.echo"}, headers=headers)
        assert created.status_code == 202
        assert created.headers["Access-Control-Allow-Origin"] == FRONTEND
        assert _words(created.headers["Access-Control-Expose-Headers"]) >= {
            "location", "x-request-id", "retry-after"}
        assert "origin" in _vary(created)
        for answer, status in ((live.post("/jobs", json={"task": "t.echo"}, headers=headers), 401),
                               (live.get("/jobs/nope", token=token, headers=headers), 404),
                               (live.get("/no/such/path", headers=headers), 404),
                               (live.post("/jobs", token=token, data=b"{", headers=headers), 400)):
            assert_problem(answer, status)
            assert answer.headers["Access-Control-Allow-Origin"] == FRONTEND, status
            assert "Access-Control-Allow-Credentials" not in answer.headers
        other = live.get("/healthz", headers={"Origin": "https://app.example.com"})
        assert other.headers["Access-Control-Allow-Origin"] == "https://app.example.com"
        # no Origin: no CORS headers, but the answer still varies by Origin for caches
        plain = live.get("/healthz")
        assert "Access-Control-Allow-Origin" not in plain.headers
        assert "origin" in _vary(plain)


def test_another_origin_gets_no_cors_headers(sqlite_url):
    with token_server(sqlite_url, cors_origin=(FRONTEND,)) as (live, token):
        for origin in ("http://127.0.0.1:5174", "https://127.0.0.1:5173", "http://localhost:5173",
                       "null", FRONTEND + "/", FRONTEND.upper()):
            preflight = _preflight(live, "/jobs", origin=origin)
            assert not [h for h in CORS_HEADERS if h in preflight.headers], (origin, preflight.headers)
            answer = live.get("/jobs", token=token, headers={"Origin": origin})
            assert answer.status_code == 200
            assert not [h for h in CORS_HEADERS if h in answer.headers], origin


def test_without_cors_origins_nothing_changes(sqlite_url):
    with token_server(sqlite_url) as (live, token):
        preflight = _preflight(live, "/jobs")
        assert_problem(preflight, 401)  # as before: OPTIONS is a request like any other
        answer = live.get("/jobs", token=token, headers={"Origin": FRONTEND})
        for response in (preflight, answer):
            assert not [h for h in CORS_HEADERS if h in response.headers]
            assert "origin" not in _vary(response)


@pytest.mark.parametrize("given, expected", [
    ("https://App.Example.com", "https://app.example.com"),
    ("https://app.example.com:443", "https://app.example.com"),
    ("http://app.example.com:80", "http://app.example.com"),
    ("http://127.0.0.1:5173", "http://127.0.0.1:5173"),
    ("http://[::1]:3000", "http://[::1]:3000"),
    ("http://[0:0::1]:3000", "http://[::1]:3000"),
    ("https://xn--bcher-kva.example", "https://xn--bcher-kva.example"),
    ("http://web_app:8000", "http://web_app:8000"),
])
def test_origins_are_written_as_browsers_send_them(given, expected):
    assert normalize_origin(given) == expected


@pytest.mark.parametrize("given, says", [
    ("*", "'*' is not allowed"), ("null", "'null' is not allowed"),
    ("https://app.example.com/", "path"), ("https://app.example.com/app", "path"),
    ("https://app.example.com?x=1", "query"), ("app.example.com", "http:// or https://"),
    ("ftp://app.example.com", "http:// or https://"), ("https://u:p@app.example.com", "user"),
    ("http://app.example.com:99999", "not scheme://host[:port]"), ("https://bücher.example", "xn--"),
    ("", "scheme://host"),
])
def test_a_bad_origin_is_refused_at_start(sqlite_url, given, says):
    with pytest.raises(ValueError, match="--cors-origin") as refused:
        CorsPolicy([FRONTEND, given])
    assert says in str(refused.value)
    server = JobServer(sqlite_url, tasks=TASKS, cors_origin=(given,))
    try:
        with pytest.raises(ValueError, match="--cors-origin"):
            create_app(server)
    finally:
        server.stop()


def test_serve_refuses_a_wildcard_origin(tmp_path):
    result = run_cli("serve", "--db", f"sqlite:///{tmp_path / 'j.db'}", "--port", "0",
                     "--cors-origin", FRONTEND, "--cors-origin", "*")
    assert result.returncode == 2
    assert "jobserver: error: --cors-origin: '*' is not allowed" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_takes_origins_from_flags_and_from_the_environment(tmp_path):
    """`--cors-origin A --cors-origin B`, and JOBSERVER_CORS_ORIGIN with commas or spaces."""
    db = f"sqlite:///{tmp_path / 'j.db'}"
    for args, env in (
            (["--cors-origin", FRONTEND, "--cors-origin", "https://app.example.com"], clean_env()),
            ([], clean_env(JOBSERVER_CORS_ORIGIN=f"{FRONTEND}, https://app.example.com"))):
        proc = ServeProcess(tmp_path / "serve.log", db=db, env=env)
        proc.cmd += args
        proc.start()
        try:
            for origin in (FRONTEND, "https://app.example.com"):
                answer = requests.options(proc.url + "/jobs", timeout=10, headers={
                    "Origin": origin, "Access-Control-Request-Method": "POST"})
                assert answer.status_code == 204
                assert answer.headers["Access-Control-Allow-Origin"] == origin
            other = requests.options(proc.url + "/jobs", timeout=10, headers={
                "Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
            assert "Access-Control-Allow-Origin" not in other.headers
        finally:
            proc.stop()


# --- a real browser -----------------------------------------------------------------------
def _playwright():
    """sync_playwright, or a skip (a failure under CI) naming the install command."""
    reason = None
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        reason = "Playwright for Python is not installed"
    if reason is None and not (os.path.exists(CHROMIUM) or shutil.which("chromium")):
        reason = f"no Chromium at {CHROMIUM}"
    if reason is not None:
        message = f"{reason}: {INSTALL}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return sync_playwright


@contextmanager
def frontend():
    """A tiny static site on its own port of 127.0.0.1: another origin than the API's."""
    class Page(BaseHTTPRequestHandler):
        def do_GET(self):
            body = b"<!doctype html><title>frontend</title><p>another origin</p>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Page)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


# the page's own fetch(), as a frontend would write it: a JSON POST with a bearer token
SUBMIT = """async ([api, token]) => {
  try {
    const answer = await fetch(api + "/jobs", {method: "POST", headers: {
      "Authorization": "Bearer " + token, "Content-Type": "application/json",
      "Idempotency-Key": "browser-" + location.port}, body: JSON.stringify({task: "t.echo"})});
    return {status: answer.status, location: answer.headers.get("Location"),
            requestId: answer.headers.get("X-Request-Id"), job: await answer.json()};
  } catch (error) {
    return {blocked: String(error)};
  }
}"""


def test_a_browser_on_an_allowed_origin_calls_the_api_and_another_is_blocked(sqlite_url):
    sync_playwright = _playwright()
    path = CHROMIUM if os.path.exists(CHROMIUM) else shutil.which("chromium")
    with frontend() as allowed, frontend() as other, \
            token_server(sqlite_url, cors_origin=(allowed,)) as (live, token), sync_playwright() as p:
        browser = p.chromium.launch(executable_path=path, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            errors = []
            page.on("console", lambda message: errors.append(message.text)
                    if message.type == "error" else None)
            page.goto(allowed + "/")
            ok = page.evaluate(SUBMIT, [live.base, token])
            assert ok.get("status") == 202, ok
            assert ok["location"] == f"/jobs/{ok['job']['id']}"  # exposed to the page
            assert ok["requestId"]
            assert ok["job"]["owner"] == "alice"
            assert not errors, errors

            page = browser.new_page()
            errors = []
            page.on("console", lambda message: errors.append(message.text)
                    if message.type == "error" else None)
            page.goto(other + "/")
            refused = page.evaluate(SUBMIT, [live.base, token])
            assert "blocked" in refused, refused
            assert any("CORS" in text for text in errors), errors
        finally:
            browser.close()
        # the blocked page's POST never reached the server (its preflight failed)
        jobs = live.get("/jobs", token=token).json()["jobs"]
        assert [job["id"] for job in jobs] == [ok["job"]["id"]]

