"""The demo tasks, run by a real in-process JobServer on each journal backend."""
import pytest
from conftest import wait_for

from jobserver import JobServer, Registry, demo

INJECTION = "x'); DROP TABLE projects;--"


@pytest.fixture
def server(db_url):
    with JobServer(db_url, tasks=["jobserver.demo"], workers=2, poll_interval=0.05,
                   lease_seconds=3.0, shutdown_grace=2.0) as srv:
        yield srv


def run(server, task, params=None, **options):
    job_id = server.submit(task, params or {}, **options)
    job = server.wait(job_id, 20)
    assert job["state"] in ("succeeded", "failed", "cancelled"), job
    return job


def test_echo_returns_params(server):
    params = {"a": 1, "b": [True, None], "c": {"d": "é"}}
    job = run(server, "demo.echo", params)
    assert job["state"] == "succeeded"
    assert job["result"] == params


def test_sleep_finishes_and_is_cancellable(server):
    assert run(server, "demo.sleep", {"seconds": 0.05})["state"] == "succeeded"
    job_id = server.submit("demo.sleep", {"seconds": 60})
    wait_for(lambda: server.get(job_id)["state"] == "running", message="sleep running")
    server.cancel(job_id)
    job = server.wait(job_id, 10)
    assert job["state"] == "cancelled"
    assert job["error"]["type"] == "JobCancelled"


def test_sleep_rejects_bad_seconds(server):
    job = run(server, "demo.sleep", {"seconds": "ten"})
    assert job["state"] == "failed"
    assert job["error"]["type"] == "TypeError"
    assert "seconds must be a number" in job["error"]["message"]


def test_steps_checkpoint_with_progress(server):
    job = run(server, "demo.steps", {"n": 3, "seconds": 0.01})
    assert job["state"] == "succeeded"
    assert job["result"] == {"steps": 3}
    assert [s["name"] for s in job["steps"]] == ["step-1", "step-2", "step-3"]
    assert all(s["state"] == "succeeded" for s in job["steps"])
    assert job["progress"]["done"] == 3 and job["progress"]["total"] == 3


def test_fail_always_and_fail_then_succeed(server):
    job = run(server, "demo.fail", {"message": "boom"}, max_retries=0)
    assert job["state"] == "failed"
    assert job["error"]["type"] == "RuntimeError" and job["error"]["message"] == "boom"
    assert "Traceback" in job["error"]["traceback"]
    job = run(server, "demo.fail", {"message": "flaky", "times": 1}, max_retries=2)
    assert job["state"] == "succeeded"
    assert job["attempts"] == 2
    assert job["result"] == {"attempt": 2, "failed_before": 1}


def test_create_project_stores_injection_literally(server):
    job = run(server, "demo.create_project", {"projname": INJECTION, "prodesc": "it's \"quoted\""})
    assert job["state"] == "succeeded", job["error"]
    rows = demo.projects_for(server.journal, job["id"])
    assert [(r["projname"], r["prodesc"]) for r in rows] == [(INJECTION, "it's \"quoted\"")]
    # the table is still there and takes more rows
    job2 = run(server, "demo.create_project", {"projname": "second"})
    assert [r["projname"] for r in demo.projects_for(server.journal, job2["id"])] == ["second"]


def test_create_project_rerun_does_not_insert_twice(db_url):
    """A job that runs create_project and then fails once: the retry skips the insert."""
    registry = Registry()

    @registry.task(name="test.project_then_flaky", max_retries=1, retry_backoff=0)
    def project_then_flaky(ctx, projname):
        demo.create_project(ctx, projname)
        if ctx.attempt == 1:
            raise RuntimeError("crash after the insert")
        # and a crash between the insert and its checkpoint: the insert looks first
        demo._insert_project(ctx, projname, None)
        return "ok"

    with JobServer(db_url, tasks=registry, workers=1, poll_interval=0.05) as srv:
        job = run(srv, "test.project_then_flaky", {"projname": "once"})
        assert job["state"] == "succeeded" and job["attempts"] == 2, job
        assert [r["projname"] for r in demo.projects_for(srv.journal, job["id"])] == ["once"]


def test_create_project_validates(server):
    job = run(server, "demo.create_project", {"projname": 42}, max_retries=0)
    assert job["state"] == "failed"
    assert "projname must be a non-empty string" in job["error"]["message"]
