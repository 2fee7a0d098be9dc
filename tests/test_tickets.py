"""Stream tickets: a short-lived signed stand-in for a token that only the event streams take."""
import base64
import json
import time
from datetime import UTC, datetime

import pytest
from http_fixtures import assert_problem, launch
from sse_reader import SseStream

from jobserver.auth import Principal, create_token
from jobserver.tickets import TICKET_SECONDS, Tickets

DEMO = ["jobserver.demo"]


@pytest.fixture
def guarded(db_url):
    """A server with tokens: alice's, bob's, and a job of each."""
    with launch(db_url, tasks=DEMO, stream_ping=0.3) as live:
        tokens = {name: create_token(live.server.journal, name) for name in ("alice", "bob")}
        time.sleep(1.1)  # past the authenticator's open-mode cache
        jobs = {name: live.post("/jobs", json={"task": "demo.sleep", "params": {"seconds": 30}},
                                token=token).json()["id"] for name, token in tokens.items()}
        yield live, tokens, jobs


def ticket_of(live, token):
    answer = live.post("/tickets", token=token)
    assert answer.status_code == 201, answer.text
    return answer.json()


def test_a_ticket_opens_the_streams_of_its_caller_and_lasts_minutes(guarded):
    live, tokens, jobs = guarded
    body = ticket_of(live, tokens["alice"])
    assert set(body) == {"ticket", "expires_at"}
    expires = datetime.strptime(body["expires_at"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    assert abs(expires.timestamp() - time.time() - TICKET_SECONDS) < 30
    ticket = body["ticket"]
    assert tokens["alice"] not in ticket
    with SseStream(live.url(f"/jobs/{jobs['alice']}/events"), params={"ticket": ticket}) as stream:
        assert stream.status == 200 and stream.block()["data"]["id"] == jobs["alice"]
    with SseStream(live.url("/events"), params={"ticket": ticket}) as stream:
        assert stream.status == 200
        assert {job["id"] for job in stream.block()["data"]["jobs"]} == {jobs["alice"]}
    # bound to its caller: another owner's job is absent
    other = live.get(f"/jobs/{jobs['bob']}/events", params={"ticket": ticket})
    assert_problem(other, 404)


def test_a_ticket_is_no_credential_anywhere_but_the_streams(guarded):
    live, tokens, jobs = guarded
    ticket = ticket_of(live, tokens["alice"])["ticket"]
    for method, path in (("GET", "/jobs"), ("GET", f"/jobs/{jobs['alice']}"), ("POST", "/tickets"),
                         ("POST", f"/jobs/{jobs['alice']}/cancel"), ("GET", "/tasks")):
        answer = live.request(method, path, params={"ticket": ticket})
        assert_problem(answer, 401)
    # and a token never goes into a URL: no route reads one there
    assert_problem(live.get("/events", params={"token": tokens["alice"]}), 401)
    assert_problem(live.get("/jobs", params={"access_token": tokens["alice"]}), 401)
    # the streams take the header too (curl, the Python client)
    with SseStream(live.url("/events"), headers={"Authorization": f"Bearer {tokens['bob']}"}) as stream:
        assert stream.status == 200
    assert_problem(live.get("/events"), 401)
    assert_problem(live.post("/tickets"), 401)


def test_a_forged_or_expired_ticket_is_401(guarded):
    live, tokens, jobs = guarded
    ticket = ticket_of(live, tokens["alice"])["ticket"]
    version, payload, signature = ticket.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    admin = dict(claims, adm=True)
    as_admin = base64.urlsafe_b64encode(json.dumps(admin).encode()).rstrip(b"=").decode()
    flipped = signature[:-2] + ("AA" if signature[-2:] != "AA" else "BB")
    expired, _ = Tickets(live.server.journal, ttl=-1).issue(Principal("alice"))
    foreign, _ = Tickets(_OtherSecret()).issue(Principal("alice"))
    for bad in (f"{version}.{as_admin}.{signature}", f"{version}.{payload}.{flipped}",
                f"v2.{payload}.{signature}", "garbage", "", "a" * 5000, expired, foreign):
        for path in (f"/jobs/{jobs['alice']}/events", "/events"):
            body = assert_problem(live.get(path, params={"ticket": bad}), 401)
            assert live.server.journal.setting("stream_ticket_secret") not in body["detail"]
    assert "expired" in live.get("/events", params={"ticket": expired}).json()["detail"]


class _OtherSecret:
    """A journal stand-in with a settings table of its own: another deployment's secret."""

    def setting(self, name, default_factory=None):
        return "another-secret"


def test_every_process_sharing_the_journal_accepts_the_others_tickets(db_url):
    with launch(db_url, tasks=DEMO, stream_ping=0.3) as first, \
            launch(db_url, tasks=DEMO, stream_ping=0.3) as second:
        token = create_token(first.server.journal, "alice")
        time.sleep(1.1)
        ticket = ticket_of(first, token)["ticket"]
        with SseStream(second.url("/events"), params={"ticket": ticket}) as stream:
            assert stream.status == 200


def test_in_open_mode_tickets_need_no_token(sqlite_url):
    with launch(sqlite_url, tasks=DEMO, stream_ping=0.3) as live:
        ticket = ticket_of(live, None)["ticket"]
        job_id = live.post("/jobs", json={"task": "demo.echo"}).json()["id"]
        with SseStream(live.url(f"/jobs/{job_id}/events"), params={"ticket": ticket}) as stream:
            assert stream.status == 200 and stream.block()["data"]["owner"] == "anonymous"
        assert_problem(live.get("/events", params={"ticket": "v1.forged.x"}), 401)
