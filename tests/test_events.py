"""The event streams (GET /jobs/{id}/events, GET /events) on real waitress servers and real
`jobserver serve` processes: framing, order, resume, other processes' events, bounds."""
import select
import socket
import subprocess
import threading
import time
from contextlib import contextmanager
from urllib.parse import urlparse

import requests
from conftest import wait_for
from http_fixtures import FAST as FAST_IN_PROCESS
from http_fixtures import launch, serving
from liveserver import FAST_FLAGS as FAST
from liveserver import JOBSERVER, ServeProcess, clean_env, free_port
from sse_reader import SseStream

from jobserver import JobServer, Registry
from jobserver.auth import create_token
from jobserver.client import Client
from jobserver.http import create_app
from jobserver.httpserver import QuietChannel

DEMO = ["jobserver.demo"]
#: quick pings so that a client gone is noticed within a test's patience
STREAMS = dict(stream_ping=0.3)


def submit(live, task, params=None, token=None, **options):
    answer = live.post("/jobs", json={"task": task, "params": params or {}, **options}, token=token)
    assert answer.status_code == 202, answer.text
    return answer.json()["id"]


def kinds(events):
    return [(e["event"], e["data"].get("state") or e["data"].get("step_state")) for e in events]


def is_end(block):
    return block["event"] == "state" and block["data"]["state"] in ("succeeded", "failed", "cancelled")


@contextmanager
def serve_api(db_url, tasks, **overrides):
    """A started JobServer behind waitress, with its Api at hand; the JobServer stops
    first, so that its open streams end before waitress waits for its threads."""
    server = JobServer(db_url, tasks=tasks, **dict(FAST_IN_PROCESS, **overrides)).start()
    app = create_app(server)
    try:
        with serving(app) as base:
            try:
                yield server, app.extensions["jobserver"], base
            finally:
                server.stop()
    finally:
        server.stop()


def raw_stream(base, path):
    """A socket with a GET of `path` sent: for reading a stream without a client's buffers."""
    url = urlparse(base)
    sock = socket.create_connection((url.hostname, url.port), timeout=10)
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {url.netloc}\r\nAccept: text/event-stream\r\n\r\n"
                 .encode())
    return sock


def read_until(sock, marker, timeout=10.0):
    data, deadline = b"", time.monotonic() + timeout
    while marker not in data:
        left = deadline - time.monotonic()
        assert left > 0, f"no {marker!r} within {timeout} s: {data[-300:]!r}"
        if select.select([sock], [], [], left)[0]:
            chunk = sock.recv(65536)
            assert chunk, f"closed before {marker!r}: {data[-300:]!r}"
            data += chunk
    return data


# --- one job's stream -------------------------------------------------------------------------
def test_the_stream_of_demo_steps_tells_everything_in_order_and_ends(db_url):
    with launch(db_url, tasks=DEMO, **STREAMS) as live:
        job_id = submit(live, "demo.steps", {"n": 2, "seconds": 0.3}, delay=0.5)
        with SseStream(live.url(f"/jobs/{job_id}/events")) as stream:
            assert stream.status == 200
            headers = stream.response.headers
            assert headers["Content-Type"] == "text/event-stream"
            assert headers["Cache-Control"] == "no-store" and headers["X-Accel-Buffering"] == "no"
            first = stream.block()
            assert 2000 <= first["retry"] <= 5000
            assert first["event"] == "snapshot" and first["data"]["id"] == job_id
            assert first["data"]["state"] == "queued" and first["id"] == "1"
            events = stream.events(stop=is_end)
            assert stream.block() is None and stream.ended  # the server closed after the end
    assert kinds(events) == [
        ("state", "running"), ("progress", None),
        ("step", "running"), ("step", "succeeded"), ("progress", None),
        ("step", "running"), ("step", "succeeded"), ("progress", None),
        ("state", "succeeded")]
    assert [int(e["id"]) for e in events] == list(range(2, 11))  # after the snapshot's seq 1
    assert all(e["data"]["job_id"] == job_id and e["data"]["seq"] == int(e["id"]) for e in events)
    assert events[0]["data"]["attempt"] == 1
    assert [e["data"]["progress"]["done"] for e in events if e["event"] == "progress"] == [0, 1, 2]
    assert [e["data"]["step"] for e in events if e["event"] == "step"] == ["step-1"] * 2 + ["step-2"] * 2


def test_a_reconnect_with_last_event_id_skips_what_was_seen_and_past_the_end_is_204(sqlite_url):
    with launch(sqlite_url, tasks=DEMO, **STREAMS) as live:
        job_id = submit(live, "demo.steps", {"n": 3, "seconds": 0.3})
        with SseStream(live.url(f"/jobs/{job_id}/events")) as stream:
            stream.block()  # the snapshot
            seen = stream.events(stop=lambda b: b["event"] == "step")
        last = seen[-1]["id"]
        with SseStream(live.url(f"/jobs/{job_id}/events"), headers={"Last-Event-ID": last}) as again:
            opening = again.block()
            assert "retry" in opening and "event" not in opening  # a resume has no snapshot
            rest = again.events(stop=is_end)
        assert [int(e["id"]) for e in rest] == list(range(int(last) + 1, int(rest[-1]["id"]) + 1))
        assert rest[-1]["data"]["state"] == "succeeded"
        # ?after= does the same for a client that cannot set a header
        with SseStream(live.url(f"/jobs/{job_id}/events?after={int(last) + 1}")) as third:
            third.block()
            assert int(third.events(limit=1)[0]["id"]) == int(last) + 2
        end = rest[-1]["id"]
        for resume in ({"headers": {"Last-Event-ID": end}}, {"params": {"after": int(end) + 5}}):
            done = live.get(f"/jobs/{job_id}/events", **resume)
            assert done.status_code == 204 and done.content == b""
        assert live.get(f"/jobs/{job_id}/events", params={"after": "x1"}).status_code == 400
        assert live.get("/jobs/no-such-job/events").status_code == 404


def test_a_fresh_stream_of_an_ended_job_is_its_snapshot_then_the_end(sqlite_url):
    with launch(sqlite_url, tasks=DEMO, **STREAMS) as live:
        job_id = submit(live, "demo.echo", {"a": 1})
        wait_for(lambda: live.get(f"/jobs/{job_id}").json()["state"] == "succeeded")
        with SseStream(live.url(f"/jobs/{job_id}/events")) as stream:
            snapshot = stream.block()
            assert snapshot["data"]["result"] == {"a": 1} and snapshot["id"] == "3"
            assert stream.block() is None
        assert live.get(f"/jobs/{job_id}/events", headers={"Last-Event-ID": "3"}).status_code == 204


def test_a_job_run_by_another_process_streams_through_this_one(db_url, tmp_path):
    """This server runs nothing (start=False); a `jobserver worker` process on the same
    journal runs the job: its events arrive by the table, at the poll interval."""
    with launch(db_url, tasks=DEMO, start=False, **STREAMS) as live:
        job_id = submit(live, "demo.steps", {"n": 2, "seconds": 0.2})
        with SseStream(live.url(f"/jobs/{job_id}/events")) as stream:
            assert stream.block()["data"]["state"] == "queued"
            with open(tmp_path / "worker.log", "wb") as log:
                worker = subprocess.Popen([JOBSERVER, "worker", "--db", db_url, "--tasks", "jobserver.demo",
                                           *FAST], stdout=log, stderr=subprocess.STDOUT, env=clean_env())
            try:
                events = stream.events(stop=is_end)
            finally:
                worker.terminate()
                worker.wait(30)
    assert kinds(events)[0] == ("state", "running") and kinds(events)[-1] == ("state", "succeeded")
    assert [e["event"] for e in events].count("step") == 4
    assert [int(e["id"]) for e in events] == list(range(2, 2 + len(events)))


def test_a_stream_resumes_across_a_server_restart(sqlite_url, tmp_path):
    port = free_port()
    args = ["--db", sqlite_url, "--port", str(port), "--tasks", "jobserver.demo", *FAST,
            "--stream-ping", "0.5"]
    srv = ServeProcess(tmp_path / "serve.log", args=args, port=port)
    with srv:
        job_id = requests.post(srv.url + "/jobs", json={"task": "demo.steps", "params": {"n": 6, "seconds": 0.4}},
                               timeout=10).json()["id"]
        with SseStream(f"{srv.url}/jobs/{job_id}/events") as stream:
            stream.block()
            before = stream.events(stop=lambda b: b["event"] == "step" and b["data"]["step"] == "step-2")
            assert srv.stop() == 0  # the job is given back: it resumes at its next step
            before += stream.events()  # what the server sent before it closed
    last = before[-1]["id"]
    again = ServeProcess(tmp_path / "serve2.log", args=args, port=port)
    with again:
        with SseStream(f"{again.url}/jobs/{job_id}/events", headers={"Last-Event-ID": last}) as stream:
            stream.block()
            after = stream.events(stop=is_end)
    seqs = [int(e["id"]) for e in before + after]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))  # nothing lost, nothing twice
    assert after[-1]["data"]["state"] == "succeeded"
    assert ("state", "queued") in kinds(before + after)  # given back at the stop
    steps_run = [e["data"]["step"] for e in before + after if e["event"] == "step"
                 and e["data"]["step_state"] == "succeeded"]
    assert sorted(steps_run) == [f"step-{i}" for i in range(1, 7)]  # each step once: checkpointed


def test_client_events_resume_across_a_server_restart(sqlite_url, tmp_path):
    port = free_port()
    args = ["--db", sqlite_url, "--port", str(port), "--tasks", "jobserver.demo", *FAST]
    first = ServeProcess(tmp_path / "serve.log", args=args, port=port).start()
    second = ServeProcess(tmp_path / "serve2.log", args=args, port=port)
    try:
        with Client(first.url) as client:
            handle = client.submit("demo.steps", n=5, seconds=0.4)
            seen, restart = [], threading.Thread(target=lambda: (first.stop(), second.start()))
            for event in handle.events():
                seen.append(event)
                if event.kind == "step" and event.data["step"] == "step-2" and not restart.is_alive():
                    if first.proc.poll() is None:
                        restart.start()  # the server goes away mid-stream and comes back
            restart.join(60)
    finally:
        first.stop()
        second.stop()
        second.kill()
    assert seen[0].kind == "snapshot" and seen[-1].kind == "state"
    assert seen[-1].data["state"] == "succeeded" and handle.job["state"] == "succeeded"
    seqs = [event.data["seq"] for event in seen[1:]]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    assert [e.data["state"] for e in seen if e.kind == "state"].count("queued") >= 1


# --- all jobs' stream -------------------------------------------------------------------------
def test_the_stream_of_all_jobs_is_owner_scoped_and_filtered(db_url):
    with launch(db_url, tasks=DEMO, **STREAMS) as live:
        tokens = {name: create_token(live.server.journal, name, admin=name == "root")
                  for name in ("alice", "bob", "root")}
        time.sleep(1.1)  # the open-mode cache
        streams = {name: SseStream(live.url("/events"), headers={"Authorization": f"Bearer {token}"})
                   for name, token in tokens.items()}
        echo_only = SseStream(live.url("/events?task=demo.echo&state=succeeded"),
                              headers={"Authorization": f"Bearer {tokens['alice']}"})
        try:
            for stream in (*streams.values(), echo_only):
                assert stream.status == 200
                snapshot = stream.block()
                assert snapshot["event"] == "snapshot" and snapshot["data"]["jobs"] == []
            alice = submit(live, "demo.steps", {"n": 1, "seconds": 0.1}, token=tokens["alice"])
            alice_echo = submit(live, "demo.echo", {}, token=tokens["alice"])
            bob = submit(live, "demo.echo", {"who": "bob"}, token=tokens["bob"])
            expected = {"alice": {alice, alice_echo}, "bob": {bob}, "root": {alice, alice_echo, bob}}
            mine = {name: stream.events(stop=_all_ended(expected[name]))
                    for name, stream in streams.items()}
            filtered = echo_only.events(stop=lambda b: True)
        finally:
            for stream in (*streams.values(), echo_only):
                stream.close()
    assert {e["data"]["job_id"] for e in mine["alice"]} == {alice, alice_echo}
    assert {e["data"]["job_id"] for e in mine["bob"]} == {bob}
    assert {e["data"]["job_id"] for e in mine["root"]} == {alice, alice_echo, bob}
    assert [(e["event"], e["data"]["job_id"], e["data"]["state"]) for e in filtered] == [
        ("state", alice_echo, "succeeded")]
    for events in mine.values():  # each job's events in their order
        by_job = {}
        for e in events:
            by_job.setdefault(e["data"]["job_id"], []).append(e["data"]["seq"])
        assert all(seqs == list(range(1, len(seqs) + 1)) for seqs in by_job.values())
        assert [int(e["id"]) for e in events] == sorted(int(e["id"]) for e in events)


def _all_ended(job_ids):
    """A stop test: true once the stream told the end of each of `job_ids`."""
    ended = set()

    def stop(block):
        if is_end(block):
            ended.add(block["data"]["job_id"])
        return ended >= job_ids
    return stop


def test_the_stream_of_all_jobs_resumes_from_its_last_id(sqlite_url):
    with launch(sqlite_url, tasks=DEMO, **STREAMS) as live:
        with SseStream(live.url("/events")) as stream:
            stream.block()
            first = submit(live, "demo.echo", {"n": 1})
            got = stream.events(stop=lambda b: b["event"] == "state" and b["data"]["state"] == "succeeded")
        last = got[-1]["id"]
        second = submit(live, "demo.echo", {"n": 2})
        wait_for(lambda: live.get(f"/jobs/{second}").json()["state"] == "succeeded")
        with SseStream(live.url("/events"), headers={"Last-Event-ID": last}) as again:
            assert "event" not in again.block()
            rest = again.events(stop=lambda b: b["event"] == "state" and b["data"]["state"] == "succeeded")
    assert {e["data"]["job_id"] for e in got} == {first}
    assert {e["data"]["job_id"] for e in rest} == {second}
    assert [e["data"]["seq"] for e in rest] == [1, 2, 3]


# --- bounds ------------------------------------------------------------------------------------
def test_past_the_slot_bound_a_stream_gets_a_snapshot_and_a_long_retry(sqlite_url, tmp_path):
    port = free_port()
    args = ["--db", sqlite_url, "--port", str(port), "--tasks", "jobserver.demo", *FAST,
            "--stream-slots", "2", "--threads", "4", "--stream-ping", "0.3"]
    with ServeProcess(tmp_path / "serve.log", args=args, port=port) as srv:
        job_id = requests.post(srv.url + "/jobs", json={"task": "demo.sleep", "params": {"seconds": 60}},
                               timeout=10).json()["id"]
        url = f"{srv.url}/jobs/{job_id}/events"
        held = [SseStream(url), SseStream(url)]
        try:
            for stream in held:
                assert stream.block()["event"] == "snapshot"
            started = time.monotonic()
            with SseStream(url) as third:
                assert third.status == 200  # not a 503: an EventSource would give up for good
                block = third.block()
                assert block["retry"] >= 30_000
                assert block["event"] == "snapshot" and block["data"]["id"] == job_id and "id" not in block
                assert third.block() is None  # closed at once
            assert time.monotonic() - started < 5
            # the API is not starved: it has its own threads
            assert requests.get(f"{srv.url}/jobs/{job_id}", timeout=5).status_code == 200
            held.pop().close()  # a client that goes away frees its slot, seen at the next ping
            assert wait_for(lambda: _gets_a_slot(url), timeout=10, message="a freed slot")
        finally:
            for stream in held:
                stream.close()


def _gets_a_slot(url):
    with SseStream(url) as stream:
        block = stream.block()
        return block.get("retry", 0) < 30_000


def test_a_stream_closes_at_its_lifetime_and_the_client_resumes(sqlite_url):
    with launch(sqlite_url, tasks=DEMO, stream_lifetime=1.0, stream_ping=0.3) as live:
        job_id = submit(live, "demo.sleep", {"seconds": 30})
        started = time.monotonic()
        with SseStream(live.url(f"/jobs/{job_id}/events")) as stream:
            blocks = []
            while (block := stream.block()) is not None:
                blocks.append(block)
        assert 0.8 <= time.monotonic() - started < 5
        assert blocks[0]["event"] == "snapshot"
        assert ["ping"] in [b["comments"] for b in blocks]  # silence is broken by pings
        assert live.server.events.subscribers == 0 or wait_for(lambda: live.server.events.subscribers == 0)


def test_a_waiting_stream_holds_no_admission_turn(sqlite_url):
    """The API runs one request's Python at a time (admission.py): a stream that held its
    turn while it waits would stop every other request."""
    with serve_api(sqlite_url, DEMO, stream_ping=30) as (server, _api, base):
        job_id = server.submit("demo.sleep", {"seconds": 30})
        streams = [SseStream(f"{base}/jobs/{job_id}/events") for _ in range(4)]
        try:
            for stream in streams:
                stream.block()
            started = time.monotonic()
            for _ in range(20):
                assert requests.get(f"{base}/jobs/{job_id}", timeout=5).status_code == 200
            assert time.monotonic() - started < 5
        finally:
            for stream in streams:
                stream.close()


def test_a_stream_renders_under_the_admission_turn(sqlite_url):
    """While another thread holds the API's only turn, a stream sends nothing (it renders
    under the turn); once the turn is free, the event comes."""
    registry = Registry()
    go = threading.Event()

    @registry.task("t.report")
    def report(ctx):
        go.wait(20)
        ctx.progress(1, 2)
        ctx.wait(10)
        return "done"

    with serve_api(sqlite_url, registry, stream_ping=30) as (server, api, base):
        job_id = server.submit("t.report")
        wait_for(lambda: server.get(job_id)["state"] == "running", message="running")
        sock = raw_stream(base, f"/jobs/{job_id}/events")
        try:
            read_until(sock, b"event: snapshot")
            time.sleep(1.0)  # the stream reads its backlog (under the turn), then waits
            api.gate.enter()  # this test's thread takes the one turn
            try:
                go.set()
                wait_for(lambda: server.journal.last_seq(job_id) >= 3, message="progress journaled")
                assert not select.select([sock], [], [], 1.0)[0], "the stream wrote outside the turn"
            finally:
                api.gate.leave()
            assert b'"done":1' in read_until(sock, b"event: progress", timeout=5)
        finally:
            sock.close()


def test_an_open_stream_costs_the_loop_no_call_at_each_turn(sqlite_url, monkeypatch):
    """waitress's loop asks every connection readable() and writable() at every turn; a
    connection serving a stream answers no for minutes, and 200 of them cost single-job
    POSTs a quarter of their throughput. The loop skips them at the cost of one test."""
    asked = []
    readable = QuietChannel.readable
    monkeypatch.setattr(QuietChannel, "readable", lambda self: asked.append(bool(self.requests))
                        or readable(self))
    with launch(sqlite_url, tasks=DEMO, stream_ping=30) as live:
        job_id = submit(live, "demo.sleep", {"seconds": 30})
        streams = [SseStream(live.url(f"/jobs/{job_id}/events")) for _ in range(6)]  # of the 8 threads
        try:
            for stream in streams:
                stream.block()
            time.sleep(0.3)
            asked.clear()
            time.sleep(1.0)  # the test loop turns every 0.05 s: ~20 turns
            assert sum(asked) == 0, "a connection serving a stream was asked at each turn"
            assert live.get(f"/jobs/{job_id}").status_code == 200  # the others are served
        finally:
            for stream in streams:
                stream.close()
