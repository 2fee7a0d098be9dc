"""The pool through an in-process JobServer, on both journals: runs, retries, limits, shutdown."""
import collections
import threading
import time

import pytest
from conftest import wait_for
from http_fixtures import FAST

from jobserver import InvalidJob, JobServer, Registry
from jobserver.client import TERMINAL

# a short lease, so that tests of lapsed leases wait a second, not half a minute
OPTIONS = dict(FAST, lease_seconds=1, shutdown_grace=2)


class Custom(BaseException):
    """A BaseException that is neither Exception nor a request to exit."""


@pytest.fixture
def servers():
    """Build started JobServers with `servers(url, registry, **options)`; all stopped at the end."""
    made = []

    def make(url, registry, start=True, **options):
        server = JobServer(url, tasks=registry, **dict(OPTIONS, **options))
        made.append(server)
        return server.start() if start else server
    yield make
    for server in made:
        server.stop(grace=0.5)


def finished(server, job_id, timeout=20):
    """Wait until the job is terminal and return it (fail the test otherwise)."""
    return wait_for(lambda: (lambda job: job if job["state"] in TERMINAL else None)(server.get(job_id)),
                    timeout=timeout, interval=0.02, message=f"job {job_id} to finish")


def test_many_jobs_over_few_workers_each_run_exactly_once(db_url, servers):
    registry, runs, lock = Registry(), collections.Counter(), threading.Lock()

    @registry.task("t.count")
    def count(ctx, n):
        with lock:
            runs[ctx.job_id] += 1
        return n * 2

    server = servers(db_url, registry, workers=4)
    ids = []
    for start in range(0, 300, 100):
        ids += [job["id"] for job, _ in server.submit_many(
            [{"task": "t.count", "params": {"n": n}} for n in range(start, start + 100)])]
    wait_for(lambda: len(server.list(state="succeeded", limit=1000)[0]) == 300, timeout=60,
             message="300 jobs to succeed")
    assert server.pool.join(5)
    assert set(runs) == set(ids) and set(runs.values()) == {1}
    jobs, _ = server.list(limit=1000)
    assert sorted(job["result"] for job in jobs) == [n * 2 for n in range(300)]
    assert {job["attempts"] for job in jobs} == {1}


def test_retries_land_on_the_right_attempt(db_url, servers):
    registry, seen = Registry(), collections.defaultdict(list)

    @registry.task("t.flaky", max_retries=3, retry_backoff=0)
    def flaky(ctx):
        seen["flaky"].append(ctx.attempt)
        if ctx.attempt < 3:
            raise RuntimeError(f"attempt {ctx.attempt} fails")
        return "third time"

    @registry.task("t.broken", max_retries=2, retry_backoff=0)
    def broken(ctx):
        seen["broken"].append(ctx.attempt)
        raise ValueError("always")

    server = servers(db_url, registry, workers=2)
    flaky_id, broken_id = server.submit("t.flaky"), server.submit("t.broken")
    ok, bad = finished(server, flaky_id), finished(server, broken_id)
    assert (ok["state"], ok["attempts"], ok["result"]) == ("succeeded", 3, "third time")
    assert (bad["state"], bad["attempts"]) == ("failed", 3)
    assert bad["error"]["type"] == "ValueError" and "always" in bad["error"]["message"]
    assert "Traceback" in bad["error"]["traceback"]
    assert seen == {"flaky": [1, 2, 3], "broken": [1, 2, 3]}


def test_time_limit_fails_the_job_and_the_task_sees_cancelled(db_url, servers):
    registry, saw_cancel = Registry(), threading.Event()

    @registry.task("t.slow", timeout=0.3, max_retries=2, retry_backoff=0)
    def slow(ctx):
        deadline = time.monotonic() + 10
        while not ctx.cancelled and time.monotonic() < deadline:
            ctx.wait(0.05)
        if ctx.cancelled:
            saw_cancel.set()

    server = servers(db_url, registry, workers=1)
    job = finished(server, server.submit("t.slow"))
    assert job["state"] == "failed" and job["attempts"] == 1
    assert job["error"]["type"] == "TimeoutError"
    wait_for(saw_cancel.is_set, timeout=5, message="the task to see ctx.cancelled")


def test_cancel_queued_and_running(db_url, servers):
    registry, started = Registry(), threading.Event()

    @registry.task("t.wait")
    def wait(ctx):
        started.set()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            ctx.check_cancelled()
            ctx.wait(0.05)
        return "not cancelled"

    server = servers(db_url, registry, workers=1)
    queued = server.submit("t.wait", delay=60)
    job = server.cancel(queued)
    assert job["state"] == "cancelled" and job["attempts"] == 0
    running = server.submit("t.wait")
    wait_for(started.is_set, timeout=10, message="the job to start")
    server.cancel(running)
    job = finished(server, running)
    assert job["state"] == "cancelled" and job["cancel_requested"] is True and job["result"] is None


def test_higher_priority_runs_first(db_url, servers):
    registry, order, gate, blocking = Registry(), [], threading.Event(), threading.Event()

    @registry.task("t.block")
    def block(ctx):
        blocking.set()
        gate.wait(20)

    @registry.task("t.record")
    def record(ctx, name):
        order.append(name)

    server = servers(db_url, registry, workers=1)
    blocker = server.submit("t.block")
    wait_for(blocking.is_set, timeout=10, message="the worker to be busy")
    ids = [server.submit("t.record", {"name": name}, priority=priority)
           for name, priority in (("zero", 0), ("five-a", 5), ("minus", -1), ("ten", 10), ("five-b", 5))]
    gate.set()
    for job_id in [blocker] + ids:
        assert finished(server, job_id)["state"] == "succeeded"
    assert order == ["ten", "five-a", "five-b", "zero", "minus"]


def test_delayed_job_does_not_run_before_its_delay(db_url, servers):
    registry, ran_at = Registry(), []

    @registry.task("t.stamp")
    def stamp(ctx):
        ran_at.append(time.monotonic())

    server = servers(db_url, registry, workers=1)
    submitted = time.monotonic()
    job_id = server.submit("t.stamp", delay=0.8)
    assert finished(server, job_id)["state"] == "succeeded"
    assert ran_at[0] - submitted >= 0.75  # the database clock counts whole milliseconds


@pytest.mark.parametrize("honours_cancel", [False, True], ids=["stubborn", "cooperative"])
def test_shutdown_gives_the_job_back_and_a_new_server_finishes_it(db_url, servers, honours_cancel):
    registry, gate, started = Registry(), threading.Event(), threading.Event()

    @registry.task("t.stubborn")
    def stubborn(ctx):
        started.set()
        deadline = time.monotonic() + 20
        while not gate.is_set() and time.monotonic() < deadline:
            if honours_cancel:
                ctx.check_cancelled()  # the shutdown's stop request must not become 'cancelled'
                ctx.wait(0.02)
            else:
                gate.wait(0.02)
        return "done"

    first = servers(db_url, registry, workers=1)
    job_id = first.submit("t.stubborn")
    wait_for(started.is_set, timeout=10, message="the job to start")
    began = time.monotonic()
    first.stop(grace=0.3)
    assert time.monotonic() - began < 5
    second = servers(db_url, registry, start=False, workers=1)
    job = second.get(job_id)
    assert (job["state"], job["attempts"]) == ("queued", 0)
    gate.set()  # the abandoned thread ends; its late outcome must be fenced out
    second.start()
    job = finished(second, job_id)
    assert (job["state"], job["attempts"], job["result"]) == ("succeeded", 1, "done")


def test_unknown_task_at_run_time_fails_the_job(db_url, servers):
    submitting, running = Registry(), Registry()

    @submitting.task("t.ghost", max_retries=3)
    def ghost(ctx):
        return "never here"

    @running.task("t.other")
    def other(ctx):
        return "other"

    submitter = servers(db_url, submitting, start=False)
    job_id = submitter.submit("t.ghost")
    submitter.stop()
    server = servers(db_url, running, workers=1)
    job = finished(server, job_id)
    assert (job["state"], job["attempts"]) == ("failed", 1)
    assert job["error"]["type"] == "UnknownTask" and "t.ghost" in job["error"]["message"]


@pytest.mark.parametrize("value", [object(), {"x": float("nan")}, {1: 2, "1": 3}], ids=["object", "nan", "keys"])
def test_a_result_that_is_not_json_fails_the_job(db_url, servers, value):
    registry = Registry()

    @registry.task("t.bad_result", max_retries=2, retry_backoff=0)
    def bad_result(ctx):
        return value

    server = servers(db_url, registry, workers=1)
    job = finished(server, server.submit("t.bad_result"))
    assert (job["state"], job["attempts"]) == ("failed", 1)
    assert "JSON" in job["error"]["message"]
    assert server.pool.join(5) and server.list(state="running")[0] == []


@pytest.mark.parametrize("exc_type", [GeneratorExit, Custom, SystemExit, KeyboardInterrupt])
def test_a_task_raising_base_exception_fails_and_the_worker_lives_on(db_url, servers, exc_type):
    registry, threads = Registry(), set()

    @registry.task("t.raise")
    def raise_it(ctx):
        threads.add(threading.get_ident())
        raise exc_type("from the task")

    @registry.task("t.ok")
    def ok(ctx, n):
        threads.add(threading.get_ident())
        return n

    server = servers(db_url, registry, workers=1)
    bad = finished(server, server.submit("t.raise"))
    assert (bad["state"], bad["error"]["type"]) == ("failed", exc_type.__name__)
    for n in range(3):
        assert finished(server, server.submit("t.ok", {"n": n}))["result"] == n
    assert len(threads) == 1  # the one worker thread survived and ran the rest


@pytest.mark.parametrize("params", [{"x": object()}, {"x": float("nan")}, {"x": float("inf")}, ["a"]])
def test_params_that_are_not_a_json_object_are_refused_at_submit(db_url, servers, params):
    registry = Registry()

    @registry.task("t.echo")
    def echo(ctx, **kw):
        return kw

    server = servers(db_url, registry, start=False)
    with pytest.raises(InvalidJob):
        server.submit("t.echo", params)
    assert server.list()[0] == []


def test_progress_is_visible_while_the_job_runs(db_url, servers):
    registry, gate = Registry(), threading.Event()

    @registry.task("t.progress")
    def progress(ctx):
        ctx.progress(2, 5, "copying")
        gate.wait(20)
        ctx.progress(5, 5, "done")

    server = servers(db_url, registry, workers=1)
    job_id = server.submit("t.progress")
    wait_for(lambda: server.get(job_id)["progress"] == {"done": 2, "total": 5, "message": "copying"},
             timeout=10, message="progress 2/5")
    assert server.get(job_id)["state"] == "running"
    gate.set()
    job = finished(server, job_id)
    assert job["state"] == "succeeded"
    assert job["progress"] == {"done": 5, "total": 5, "message": "done"}


def test_a_result_too_big_for_the_journal_fails_the_job_instead_of_sticking(db_url, servers):
    """MariaDB refuses a document over its packet size on every retry: never send one."""
    registry, big = Registry(), "x" * (17 * 1024 * 1024)

    @registry.task("t.big_result", max_retries=2, retry_backoff=0)
    def big_result(ctx):
        return big

    @registry.task("t.big_step")
    def big_step(ctx):
        return ctx.step("huge", lambda: big)

    server = servers(db_url, registry, workers=2)
    result_job = finished(server, server.submit("t.big_result"))
    step_job = finished(server, server.submit("t.big_step"))
    assert (result_job["state"], result_job["attempts"]) == ("failed", 1)
    assert "over the limit" in result_job["error"]["message"]
    assert step_job["state"] == "failed" and "over the limit" in step_job["error"]["message"]
    assert step_job["steps"][0]["state"] == "failed"
    with pytest.raises(InvalidJob):
        server.submit("t.big_result", {"blob": big})
    assert server.pool.join(5)


def test_leases_are_renewed_while_shutdown_waits_for_running_jobs(db_url, servers):
    """A grace longer than the lease: the stopping server still holds its job, no one else runs it."""
    registry, runs, started = Registry(), collections.Counter(), threading.Event()

    @registry.task("t.finish_in_grace")
    def finish_in_grace(ctx):
        runs[ctx.job_id] += 1
        started.set()
        time.sleep(2.5)  # ignores the stop request: it finishes within the grace
        return "finished"

    stopping = servers(db_url, registry, workers=1, lease_seconds=1)
    job_id = stopping.submit("t.finish_in_grace")
    wait_for(started.is_set, timeout=10, message="the job to start")
    other = servers(db_url, registry, workers=1, lease_seconds=1)
    stopping.stop(grace=5)
    job = finished(other, job_id)
    assert (job["state"], job["attempts"], job["result"]) == ("succeeded", 1, "finished")
    assert runs[job_id] == 1


def test_a_retry_waits_for_its_backoff(db_url, servers):
    registry, times = Registry(), []

    @registry.task("t.once_more", max_retries=1, retry_backoff=0.6)
    def once_more(ctx):
        times.append(time.monotonic())
        if ctx.attempt == 1:
            raise RuntimeError("first attempt fails")
        return ctx.attempt

    server = servers(db_url, registry, workers=1)
    job_id = server.submit("t.once_more")
    wait_for(lambda: server.get(job_id)["error"] is not None, timeout=10, message="the first failure")
    queued = server.get(job_id)
    assert queued["state"] in ("queued", "running") and queued["error"]["type"] == "RuntimeError"
    job = finished(server, job_id)
    assert (job["state"], job["result"], job["attempts"], job["error"]) == ("succeeded", 2, 2, None)
    assert times[1] - times[0] >= 0.29  # equal jitter: at least half of the 0.6 s base


def test_a_step_name_the_journal_cannot_hold_is_refused_on_both_engines(db_url, servers):
    """MariaDB would drop the step's row (VARCHAR(190)) and the step would run again after a crash."""
    registry, calls = Registry(), []

    @registry.task("t.long_step_name")
    def long_step_name(ctx):
        return ctx.step("s" * 191, lambda: calls.append(1) or "ran")

    @registry.task("t.longest_step_name")
    def longest_step_name(ctx):
        return ctx.step("s" * 190, lambda: "ran")

    server = servers(db_url, registry, workers=1)
    refused = finished(server, server.submit("t.long_step_name"))
    assert refused["state"] == "failed" and refused["error"]["type"] == "ValueError"
    assert calls == [] and refused["steps"] == []
    kept = finished(server, server.submit("t.longest_step_name"))
    assert kept["state"] == "succeeded" and kept["steps"][0]["state"] == "succeeded"


def test_a_node_id_the_journal_cannot_hold_is_refused_at_once(db_url):
    registry = Registry()
    with pytest.raises(ValueError):
        JobServer(db_url, tasks=registry, node_id="n" * 121)
    server = JobServer(db_url, tasks=registry, node_id="n" * 120, **OPTIONS).start()
    server.stop()


def test_an_outcome_is_kept_and_written_once_the_journal_is_back(mysql_url):
    """The network to MariaDB is cut (a real TCP relay) while a job runs: its result waits
    in the pool, retried with backoff, and lands when the journal is reachable again."""
    from urllib.parse import urlparse, urlunparse

    from http_fixtures import TcpProxy

    registry, release = Registry(), threading.Event()

    @registry.task("t.gate")
    def gate(ctx):
        release.wait(30)
        return "done"

    url = urlparse(mysql_url)
    proxy = TcpProxy((url.hostname, url.port or 3306))
    auth = url.username + (f":{url.password}" if url.password else "")
    server = JobServer(urlunparse(url._replace(netloc=f"{auth}@127.0.0.1:{proxy.port}")),
                       tasks=registry, workers=1, lease_seconds=60, poll_interval=0.05)
    try:
        server.start()
        job_id = server.submit("t.gate")
        wait_for(lambda: server.get(job_id)["state"] == "running", message="the job to start")
        proxy.cut()
        release.set()
        assert not server.pool.join(timeout=1.5)  # finished, but its outcome is not committed
        proxy.resume()
        assert server.pool.join(timeout=30)
        job = server.get(job_id)
        assert (job["state"], job["result"], job["attempts"]) == ("succeeded", "done", 1)
    finally:
        release.set()
        server.stop(grace=1)
        proxy.close()


def test_a_retry_beside_an_abandoned_run_keeps_the_two_runs_apart(db_url, servers):
    """A run past its time limit keeps its thread; the job is retried and runs again beside it.
    When the old thread ends it must not take the new run's place: the new run keeps its
    heartbeat (it outlives the 1 s lease) and ends once, without a crash recovery."""
    registry, calls, release = Registry(), [], threading.Event()

    @registry.task("t.zombie", timeout=2)
    def zombie(ctx):
        calls.append(ctx.attempt)
        if len(calls) == 1:
            release.wait(10)  # ignores the cancel: outlives its time limit
            return "late"
        time.sleep(1.6)  # past the 1 s lease, within the 2 s limit: heartbeats keep the job
        return "ok"

    server = servers(db_url, registry, workers=2)
    job_id = server.submit("t.zombie")
    assert finished(server, job_id)["error"]["type"] == "TimeoutError"
    server.retry(job_id)
    wait_for(lambda: len(calls) == 2, message="the second run to start")
    release.set()  # the first run's thread ends while the second one runs
    job = finished(server, job_id)
    assert (job["state"], job["result"], job["attempts"]) == ("succeeded", "ok", 1)
    assert len(calls) == 2


def test_a_list_page_stops_early_when_its_results_are_large(db_url, servers):
    """500 jobs of 1 MB results would make a 500 MB page: the page ends at ~8 MiB with a cursor,
    and following the cursors still lists every job once."""
    registry = Registry()

    @registry.task("t.big")
    def big(ctx):
        return "x" * 1_000_000

    server = servers(db_url, registry, workers=4)
    ids = [server.submit("t.big") for _ in range(12)]
    for job_id in ids:
        finished(server, job_id)
    first, cursor = server.list(limit=500)
    assert 1 <= len(first) < 12 and cursor == first[-1]["id"]
    seen, pages = [j["id"] for j in first], 1
    while cursor:
        page, cursor = server.list(limit=500, cursor=cursor)
        seen += [j["id"] for j in page]
        pages += 1
    assert seen == sorted(ids, reverse=True) and pages >= 2
