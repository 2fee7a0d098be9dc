"""Callback delivery against a real receiver on 127.0.0.1: signatures, retries, 410, Retry-After,
timeouts, redirects, re-delivery on request, and DNS answers that change after submit."""
import json
import shutil
import subprocess
import time

import pytest
from callback_receiver import Receiver, fake_dns
from conftest import wait_for
from http_fixtures import FAST, TASKS
from standardwebhooks.webhooks import Webhook

from jobserver.errors import InvalidTransition, JobNotFound
from jobserver.server import JobServer
from jobserver.urlguard import UrlGuard

# the receiver is on loopback; few, quick attempts
OPTIONS = dict(FAST, callback_allow=("127.0.0.0/8",), callback_attempts=3, callback_backoff=0.05,
               callback_timeout=2.0)


@pytest.fixture
def receiver():
    receiver = Receiver()
    yield receiver
    receiver.close()


@pytest.fixture
def make_server(sqlite_url):
    servers = []

    def make(db=None, **options):
        server = JobServer(db or sqlite_url, tasks=TASKS, **dict(OPTIONS, **options))
        servers.append(server.start())
        return server
    yield make
    for server in servers:
        server.stop()


def callback_of(server, job_id, state):
    """Wait until the job's callback is in `state`; return the callback object."""
    return wait_for(lambda: (lambda cb: cb if cb and cb["state"] == state else None)(
        server.get(job_id)["callback"]), message=f"callback {state}")


def verified(server, request):
    """The body of a received request, verified as a receiver would with standardwebhooks."""
    return Webhook(server.deliverer.secret).verify(request["body"], request["headers"])


def test_one_signed_delivery_per_ended_job(db_url, make_server, receiver):
    server = make_server(db_url)
    done = server.submit("t.echo", {"a": 1}, callback_url=receiver.url("/done"))
    failed = server.submit("t.fail", callback_url=receiver.url("/failed"))
    cancelled = server.submit("t.echo", callback_url=receiver.url("/cancelled"), delay=600)
    server.cancel(cancelled)
    for job_id in (done, failed, cancelled):
        callback = callback_of(server, job_id, "delivered")
        assert callback["attempts"] == 1 and callback["last_error"] is None and callback["delivered_at"]
    assert receiver.count() == 3
    by_path = {r["path"]: r for r in receiver.requests}
    states = {path: verified(server, r) for path, r in by_path.items()}
    assert states["/done"]["id"] == done and states["/done"]["state"] == "succeeded"
    assert states["/done"]["result"] == {"a": 1}
    assert states["/failed"]["state"] == "failed" and states["/failed"]["error"]["type"] == "RuntimeError"
    assert states["/cancelled"]["state"] == "cancelled"
    ids = {r["headers"]["webhook-id"] for r in receiver.requests}
    assert len(ids) == 3 and all(i.startswith("msg_") for i in ids)
    assert all(r["headers"]["content-type"] == "application/json" for r in receiver.requests)


def test_two_servers_on_one_journal_deliver_each_callback_once(db_url, make_server, receiver):
    first, second = make_server(db_url), make_server(db_url)
    ids = [(first if n % 2 else second).submit("t.echo", {"n": n}, callback_url=receiver.url())
           for n in range(12)]
    for job_id in ids:
        callback_of(first, job_id, "delivered")
    assert receiver.count() == 12
    assert sorted(verified(first, r)["id"] for r in receiver.requests) == sorted(ids)


def test_failures_then_success_keep_the_webhook_id(make_server, receiver):
    receiver.respond((503,), (500,), (200,))
    server = make_server()
    job_id = server.submit("t.echo", callback_url=receiver.url())
    callback = callback_of(server, job_id, "delivered")
    assert callback["attempts"] == 3 and callback["last_error"] is None  # cleared once delivered
    assert receiver.count() == 3
    assert len({r["headers"]["webhook-id"] for r in receiver.requests}) == 1
    for request in receiver.requests:
        assert verified(server, request)["id"] == job_id


def test_all_attempts_fail_then_a_retry_request_delivers(make_server, receiver):
    receiver.default = (500, {}, 0.0)
    server = make_server()
    job_id = server.submit("t.echo", callback_url=receiver.url())
    callback = callback_of(server, job_id, "failed")
    assert callback["attempts"] == 3 and callback["last_error"] == "HTTP 500"
    time.sleep(0.5)  # ten times the backoff: a failed delivery is never tried again by itself
    assert receiver.count() == 3
    with pytest.raises(JobNotFound):
        server.retry_callback("no-such-job")
    with pytest.raises(InvalidTransition):
        server.retry_callback(server.submit("t.echo"))  # a job without a callback
    receiver.default = (204, {}, 0.0)
    job = server.retry_callback(job_id)
    assert job["callback"]["state"] == "pending" and job["callback"]["attempts"] == 0
    callback = callback_of(server, job_id, "delivered")
    assert callback["attempts"] == 1
    assert len({r["headers"]["webhook-id"] for r in receiver.requests}) == 1
    with pytest.raises(InvalidTransition):
        server.retry_callback(job_id)  # delivered: nothing to retry


def test_gone_stops_at_once(make_server, receiver):
    receiver.respond((410,))
    server = make_server(callback_attempts=5)
    job_id = server.submit("t.echo", callback_url=receiver.url())
    callback = callback_of(server, job_id, "failed")
    assert (callback["attempts"], callback["last_error"]) == (1, "HTTP 410")
    assert receiver.count() == 1


def test_retry_after_is_honoured(make_server, receiver):
    receiver.respond((503, {"Retry-After": "1"}), (429, {"Retry-After": "0"}))
    server = make_server(callback_backoff=0.01, callback_attempts=3)
    job_id = server.submit("t.echo", callback_url=receiver.url())
    callback_of(server, job_id, "delivered")
    first, second, third = (r["at"] for r in receiver.requests)
    assert second - first >= 0.9
    assert third - second < 0.9


def test_a_slow_receiver_times_out_and_holds_no_job_worker(make_server, receiver):
    receiver.respond((200, {}, 1.5))
    server = make_server(callback_timeout=0.5, workers=1)
    job_id = server.submit("t.echo", callback_url=receiver.url())
    wait_for(lambda: receiver.count() == 1, message="first attempt")
    other = server.submit("t.echo", {"b": 2})  # the one job worker is free while the receiver sleeps
    assert server.wait(other, 5)["state"] == "succeeded"
    callback = callback_of(server, job_id, "delivered")
    assert callback["attempts"] == 2
    assert receiver.count() == 2


def test_stop_waits_no_longer_than_the_callback_timeout(make_server, receiver):
    receiver.respond((200, {}, 5.0))
    server = make_server(callback_timeout=0.5)
    server.submit("t.echo", callback_url=receiver.url())
    wait_for(lambda: receiver.count() == 1, message="delivery in flight")
    started = time.monotonic()
    server.stop()
    assert time.monotonic() - started < 2.5


def test_redirects_are_not_followed(make_server, receiver):
    receiver.default = (302, {"Location": receiver.url("/elsewhere")}, 0.0)
    server = make_server(callback_attempts=2)
    job_id = server.submit("t.echo", callback_url=receiver.url("/hook"))
    callback = callback_of(server, job_id, "failed")
    assert callback["last_error"] == "HTTP 302"
    assert [r["path"] for r in receiver.requests] == ["/hook", "/hook"]


def test_a_refused_connection_is_retried(make_server, receiver):
    port = receiver.port
    receiver.close()  # nobody listens now
    server = make_server(callback_attempts=2)
    job_id = server.submit("t.echo", callback_url=f"http://127.0.0.1:{port}/hook")
    callback = callback_of(server, job_id, "failed")
    assert (callback["attempts"], callback["last_error"]) == (2, "ConnectionError")


def test_connection_goes_to_the_checked_address_with_the_original_host(make_server, receiver):
    server = make_server()
    server.deliverer.guard = UrlGuard(("127.0.0.0/8",),
                                      resolver=fake_dns({"hooks.example.test": ["127.0.0.1"]}))
    server.callback_guard = server.deliverer.guard.check
    url = f"http://hooks.example.test:{receiver.port}/hook"
    job_id = server.submit("t.echo", callback_url=url)
    callback_of(server, job_id, "delivered")
    assert receiver.requests[0]["headers"]["host"] == f"hooks.example.test:{receiver.port}"


def test_dns_that_changes_to_a_forbidden_address_after_submit_is_refused(make_server, receiver):
    server = make_server(callback_allow=())
    answers = {"hooks.example.test": ["93.184.215.14"]}
    server.deliverer.guard = UrlGuard((), resolver=fake_dns(answers))
    server.callback_guard = server.deliverer.guard.check
    job_id = server.submit("t.echo", callback_url=f"http://hooks.example.test:{receiver.port}/hook",
                           delay=0.3)
    answers["hooks.example.test"] = ["127.0.0.1"]  # rebinding: now it points inside
    callback = callback_of(server, job_id, "failed")
    assert (callback["attempts"], callback["last_error"]) == (3, "ForbiddenAddress")
    assert receiver.count() == 0


def test_the_body_is_the_public_job_json(make_server, receiver):
    server = make_server()
    job_id = server.submit("t.echo", {"text": "h\u00e9llo"}, callback_url=receiver.url())
    callback_of(server, job_id, "delivered")
    body = json.loads(receiver.requests[0]["body"])
    public = server.get(job_id)
    assert set(body) == set(public)
    assert body["result"] == {"text": "h\u00e9llo"} and body["callback"]["url"] == receiver.url()


@pytest.fixture
def certificate(tmp_path):
    """A self-signed certificate for hooks.example.test (openssl), as (cert, key) paths."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", str(key), "-out", str(cert), "-subj", "/CN=hooks.example.test",
                    "-addext", "subjectAltName=DNS:hooks.example.test"],
                   check=True, capture_output=True, timeout=60)
    return str(cert), str(key)


def test_https_is_pinned_and_checks_the_certificate_for_the_hostname(make_server, certificate):
    receiver = Receiver(tls=certificate)
    try:
        server = make_server(callback_attempts=1)
        server.deliverer.verify_tls = certificate[0]  # trust the test certificate only
        server.deliverer.guard = UrlGuard(("127.0.0.0/8",), resolver=fake_dns({
            "hooks.example.test": ["127.0.0.1"], "other.example.test": ["127.0.0.1"]}))
        server.callback_guard = server.deliverer.guard.check
        good = server.submit("t.echo", callback_url=f"https://hooks.example.test:{receiver.port}/hook")
        assert callback_of(server, good, "delivered")["attempts"] == 1
        assert receiver.requests[0]["headers"]["host"] == f"hooks.example.test:{receiver.port}"
        # the same address under a name the certificate does not carry: refused by TLS
        bad = server.submit("t.echo", callback_url=f"https://other.example.test:{receiver.port}/hook")
        assert callback_of(server, bad, "failed")["last_error"] == "SSLError"
        assert receiver.count() == 1
    finally:
        receiver.close()
