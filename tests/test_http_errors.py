"""Every error status of API.md, as application/problem+json, over real waitress."""
from urllib.parse import urlparse, urlunparse

import pytest
from conftest import wait_for
from http_fixtures import TcpProxy, assert_problem, launch

from jobserver.errors import InvalidCallback

JOB = b'{"task": "t.echo", "params": {}}'


@pytest.mark.parametrize("body, why", [
    (b'{"task": "t.echo"', "malformed"),
    (b'', "empty"),
    (b'{"task": "t.echo", "task": "t.fail"}', "duplicate"),
    (b'{"task": "t.echo", "params": {"a": 1, "a": 1}}', "duplicate"),
    (b'{"task": "t.echo", "params": {"x": NaN}}', "NaN"),
    (b'{"task": "t.echo", "params": {"x": Infinity}}', "Infinity"),
    (b'{"task": "t.echo", "params": {"x": -Infinity}}', "Infinity"),
    (b'{"task": "t.echo", "params": {"x": 1e999}}', "range"),
    (b'{"task": "t.echo", "params": {"x": ' + b"9" * 5000 + b'}}', "digits"),
    (b'{"task": "t.echo", "params": {"x": ' + b"[" * 70 + b"]" * 70 + b'}}', "deeper"),
    (b"[" * 100_000 + b"]" * 100_000, "deeper"),
    (b'{"task": "t.echo", "params": {"x": "\xff\xfe"}}', "UTF-8"),
    (b'{"task": "t.echo", "params": {"x": "\\ud800"}}', "surrogate"),
    (b'{"task": "t.echo", "params": []}', "params"),
    (b'{"task": "t.echo", "params": "a=1"}', "params"),
    (b'{"task": 7}', "task"),
    (b'{"params": {}}', "task"),
    (b'{"task": "t.echo", "priority": "high"}', "priority"),
    (b'{"task": "t.echo", "priority": 1.5}', "priority"),
    (b'{"task": "t.echo", "priority": true}', "priority"),
    (b'{"task": "t.echo", "delay": -1}', "delay"),
    (b'{"task": "t.echo", "max_retries": 1e300}', "max_retries"),
    (b'{"task": "t.echo", "timeout": "10"}', "timeout"),
    (b'{"task": "t.echo", "idempotency_key": 5}', "idempotency_key"),
    (b'{"task": "t.echo", "surprise": 1}', "unknown field"),
    (b'42', "object"),
    (b'"t.echo"', "object"),
    (b'null', "object"),
    (b'[]', "at least one"),
    (b'[1, 2]', "object"),
])
def test_bad_bodies_are_400(live, body, why):
    r = live.post("/jobs", data=body, headers={"Content-Type": "application/json"})
    assert why.lower() in assert_problem(r, 400)["detail"].lower()


def test_json_is_parsed_whatever_the_content_type(live_sqlite):
    for content_type in ("application/x-www-form-urlencoded", "text/plain", None):
        headers = {"Content-Type": content_type} if content_type else {}
        assert live_sqlite.post("/jobs", data=JOB, headers=headers).status_code == 202
    assert live_sqlite.post("/jobs", data=b"\xef\xbb\xbf" + JOB).status_code == 202  # a BOM


def test_nesting_of_64_is_accepted(live_sqlite):
    params = b'{"x": ' + b"[" * 62 + b"]" * 62 + b"}"  # body object + params + 62 = 64
    r = live_sqlite.post("/jobs", data=b'{"task": "t.echo", "params": ' + params + b"}")
    assert r.status_code == 202


def test_unknown_task_is_422_naming_it(live):
    body = assert_problem(live.post("/jobs", json={"task": "no.such.task"}), 422)
    assert body["task"] == "no.such.task" and "no.such.task" in body["detail"]


def test_refused_callback_url_is_422(live_sqlite):
    def refuse(url):
        raise InvalidCallback(f"{url} resolves to a private address")
    live_sqlite.server.callback_guard = refuse
    body = assert_problem(live_sqlite.post("/jobs", json={"task": "t.echo",
                                                          "callback_url": "http://10.0.0.1/"}), 422)
    assert "private" in body["detail"]


def test_unknown_job_and_unknown_paths_are_404(live):
    assert_problem(live.get("/jobs/01a2cc5b-0000-7000-8000-000000000000"), 404)
    assert_problem(live.get("/jobs/" + "x" * 65), 404)
    assert_problem(live.get("/jobs/%E2%98%83"), 404)
    assert_problem(live.post("/jobs/nope/cancel"), 404)
    assert_problem(live.post("/jobs/nope/retry"), 404)
    assert_problem(live.get("/nothing/here"), 404)


def test_wrong_method_is_405_with_allow(live_sqlite):
    r = live_sqlite.request("DELETE", "/jobs")
    assert_problem(r, 405)
    assert set(r.headers["Allow"].replace(" ", "").split(",")) >= {"GET", "POST"}
    assert_problem(live_sqlite.get("/jobs/x/cancel"), 405)
    assert_problem(live_sqlite.request("PUT", "/healthz"), 405)


@pytest.mark.parametrize("query", [
    {"wait": "soon"}, {"wait": "-1"}, {"wait": "61"}, {"wait": "nan"}, {"wait": "inf"},
])
def test_bad_wait_is_400(live_sqlite, query):
    job_id = live_sqlite.post("/jobs", data=JOB).json()["id"]
    assert_problem(live_sqlite.get(f"/jobs/{job_id}", params=query), 400)


@pytest.mark.parametrize("query", [
    {"limit": "0"}, {"limit": "501"}, {"limit": "ten"}, {"limit": "-5"}, {"limit": "9" * 40},
    {"state": "sleeping"}, {"cursor": "not a cursor!"}, {"task": "t" * 201},
])
def test_bad_list_arguments_are_400(live, query):
    assert_problem(live.get("/jobs", params=query), 400)


def test_body_over_the_limit_is_413(sqlite_url):
    with launch(sqlite_url, max_body=1000) as live:
        big = b'{"task": "t.echo", "params": {"x": "' + b"a" * 2000 + b'"}}'
        assert_problem(live.post("/jobs", data=big), 413)

        def chunked():  # no Content-Length: the read itself must stop at the limit
            for _ in range(100):
                yield b" " * 100
            yield JOB
        assert_problem(live.post("/jobs", data=chunked()), 413)
        small = (part for part in [b'{"task": ', b'"t.echo"}'])
        assert live.post("/jobs", data=small).status_code == 202


def test_queue_over_its_bound_is_429_with_retry_after(sqlite_url):
    with launch(sqlite_url, max_queued=2) as live:
        for _ in range(2):
            assert live.post("/jobs", json={"task": "t.echo", "delay": 60}).status_code == 202
        r = live.post("/jobs", json={"task": "t.echo", "delay": 60})
        assert_problem(r, 429)
        assert int(r.headers["Retry-After"]) >= 1
        batch = [{"task": "t.echo"}] * 3
        assert_problem(live.post("/jobs", json=batch), 429)


def test_batch_over_max_batch_is_400(sqlite_url):
    with launch(sqlite_url, max_batch=3) as live:
        assert_problem(live.post("/jobs", json=[{"task": "t.echo"}] * 4), 400)


def test_conflicts_are_409(live):
    spec = {"task": "t.echo", "idempotency_key": "k"}
    live.post("/jobs", json=spec)
    assert_problem(live.post("/jobs", json=dict(spec, task="t.fail")), 409)
    done = live.post("/jobs", json={"task": "t.echo"}).json()["id"]
    wait_for(lambda: live.get(f"/jobs/{done}").json()["state"] == "succeeded")
    assert_problem(live.post(f"/jobs/{done}/cancel"), 409)
    assert_problem(live.post(f"/jobs/{done}/retry"), 409)


def test_idempotency_header_misuse_is_400(live_sqlite):
    head = {"Idempotency-Key": "h"}
    assert_problem(live_sqlite.post("/jobs", json=[{"task": "t.echo"}], headers=head), 400)
    body = {"task": "t.echo", "idempotency_key": "other"}
    assert_problem(live_sqlite.post("/jobs", json=body, headers=head), 400)
    agree = live_sqlite.post("/jobs", json=dict(body, idempotency_key="h"), headers=head)
    assert agree.status_code == 202
    same = live_sqlite.post("/jobs", json=dict(body, idempotency_key=None), headers=head)
    assert same.status_code == 200  # a null field is no field: the header's key applies


def test_stopping_server_answers_503_with_retry_after(sqlite_url):
    with launch(sqlite_url) as live:
        job_id = live.post("/jobs", data=JOB).json()["id"]
        live.server.stop()
        for r in (live.post("/jobs", data=JOB), live.get("/healthz"), live.get(f"/jobs/{job_id}"),
                  live.get("/jobs"), live.post(f"/jobs/{job_id}/cancel")):
            assert_problem(r, 503)
            assert int(r.headers["Retry-After"]) >= 1


@pytest.mark.mysql
def test_unreachable_journal_answers_503_then_recovers(mysql_url):
    url = urlparse(mysql_url)
    proxy = TcpProxy((url.hostname, url.port or 3306))
    auth = url.username + (f":{url.password}" if url.password else "")
    try:
        with launch(urlunparse(url._replace(netloc=f"{auth}@127.0.0.1:{proxy.port}"))) as live:
            job_id = live.post("/jobs", data=JOB).json()["id"]
            proxy.cut()
            for r in (live.get("/healthz"), live.get(f"/jobs/{job_id}"), live.get("/jobs"),
                      live.post("/jobs", data=JOB), live.post(f"/jobs/{job_id}/cancel")):
                assert_problem(r, 503)
                assert int(r.headers["Retry-After"]) >= 1
            proxy.resume()
            wait_for(lambda: live.get("/healthz").status_code == 200, timeout=30,
                     message="the journal to be reachable again")
            assert live.post("/jobs", data=JOB).status_code == 202
    finally:
        proxy.close()


def test_unexpected_failure_is_500_problem_with_request_id(live_sqlite, monkeypatch, caplog):
    def broken():
        raise RuntimeError("secret internals")
    monkeypatch.setattr(live_sqlite.server, "tasks", broken)
    r = live_sqlite.get("/tasks")
    body = assert_problem(r, 500)
    assert "secret internals" not in r.text
    assert body["request_id"] == r.headers["X-Request-Id"]
    assert any(body["request_id"] in rec.getMessage() and rec.exc_info for rec in caplog.records)


def test_request_id_is_echoed_or_made(live_sqlite):
    echoed = live_sqlite.get("/tasks", headers={"X-Request-Id": "abc-123"})
    assert echoed.headers["X-Request-Id"] == "abc-123"
    for bad in ("has spaces", "x" * 65, "<script>"):
        made = live_sqlite.get("/tasks", headers={"X-Request-Id": bad}).headers["X-Request-Id"]
        assert made and made != bad
    assert live_sqlite.get("/nothing").headers["X-Request-Id"]
    # answers Flask itself makes carry one too: an automatic OPTIONS, a slash redirect
    assert live_sqlite.request("OPTIONS", "/tasks").headers["X-Request-Id"]


def test_a_redirect_outside_the_api_routes_carries_a_request_id(sqlite_url):
    with launch(sqlite_url, url_prefix="/q") as live:
        redirect = live.session.get(live.base + "/q//tasks", allow_redirects=False, timeout=30)
        assert redirect.status_code in (301, 308) and redirect.headers["X-Request-Id"]
