"""Admission: one request thread runs the API at a time, and a thread that waits (a commit,
a long-poll) lets the others in meanwhile."""
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from http_fixtures import launch

from jobserver.admission import Gate, waiting


def test_a_gate_admits_its_slots_and_a_waiting_thread_gives_its_turn_away():
    gate = Gate(1)
    inside = threading.Event()
    second_in = threading.Event()
    release = threading.Event()

    def first():
        gate.enter()
        inside.set()
        with waiting():  # blocked on something slow: the turn is free meanwhile
            release.wait(10)
        gate.leave()

    def second():
        inside.wait(10)
        gate.enter()
        second_in.set()
        gate.leave()

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    assert second_in.wait(5), "the waiting thread kept its turn"
    release.set()
    for t in threads:
        t.join(10)


def test_a_turn_is_held_exclusively_and_reentry_is_harmless():
    gate = Gate(1)
    gate.enter()
    gate.enter()  # the same thread again: no second turn taken, no deadlock
    got = []
    t = threading.Thread(target=lambda: (gate.enter(), got.append(1), gate.leave()))
    t.start()
    time.sleep(0.2)
    assert got == []  # held
    gate.leave()
    t.join(5)
    assert got == [1]
    with waiting():  # no turn held: a no-op
        pass
    with pytest.raises(ValueError):
        Gate(0)


def test_a_long_poll_does_not_keep_other_requests_out(sqlite_url):
    with launch(sqlite_url) as live:
        job_id = live.post("/jobs", json={"task": "t.sleep", "params": {"seconds": 3}}).json()["id"]
        with ThreadPoolExecutor(2) as pool:
            poll = pool.submit(live.get, f"/jobs/{job_id}", params={"wait": 20})
            time.sleep(0.3)  # the long-poll is in and waiting
            started = time.monotonic()
            assert live.get("/tasks").status_code == 200
            assert live.post("/jobs", json={"task": "t.echo"}).status_code == 202
            assert time.monotonic() - started < 2.5  # answered while the poll still waits
            assert poll.result(30).json()["state"] == "succeeded"


def test_concurrent_submits_share_commits_while_each_waits_without_its_turn(sqlite_url):
    # were the turn kept through the commit wait, submits would pass one at a time and
    # every transaction would carry a single job
    with launch(sqlite_url, start=False) as live:
        driver = live.server.journal.driver
        commits = []
        real = driver.write_transaction
        driver.write_transaction = lambda fn: (commits.append(1), real(fn))[1]
        with ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(lambda i: live.post("/jobs", json={"task": "t.echo"}).status_code,
                                  range(200)))
        assert codes == [202] * 200
        assert len(live.server.list(limit=500)[0]) == 200
        assert len(commits) < 150, f"{len(commits)} commits for 200 submits"
