"""Killed processes (real SIGKILL) on both journals: no job is lost, finished steps are kept,
and a job that kills its own process cannot crash-loop."""
import collections
import time

import proc_worker
from conftest import wait_for

from jobserver.client import TERMINAL


def states(client, ids):
    """job id -> state."""
    return {job_id: client.get(job_id)["state"] for job_id in ids}


def test_a_killed_process_loses_nothing_and_restart_recovers_at_once(client, workers):
    # A 60 s lease: only the recovery of a dead local process can hand the jobs back quickly.
    first = workers.spawn(workers=4, lease=60)
    ids = [job["id"] for job, _ in client.submit_many(
        [{"task": "proc.record", "params": {"seconds": 0.4}} for _ in range(20)])]
    wait_for(lambda: "succeeded" in states(client, ids).values(), timeout=20, message="some jobs done")
    workers.kill(first)
    # nothing changes a dead process's jobs now: those still 'running' were cut off mid-run
    running_at_kill = [i for i, s in states(client, ids).items() if s == "running"]
    assert running_at_kill, "the kill should land while jobs run"

    restarted = time.monotonic()
    workers.spawn(workers=4, lease=60)
    wait_for(lambda: set(states(client, ids).values()) == {"succeeded"}, timeout=15,
             message="every job to succeed after the restart")
    assert time.monotonic() - restarted < 15  # far sooner than the 60 s lease
    runs = collections.Counter(job_id for job_id, *_ in proc_worker.read_lines(workers.workdir, "runs-*.log"))
    assert set(runs) == set(ids)
    assert all(runs[job_id] == 1 for job_id in ids if job_id not in running_at_kill)
    for job_id in running_at_kill:
        assert client.get(job_id)["attempts"] == 2


def test_a_live_neighbour_takes_over_a_dead_process_jobs_without_a_restart(client, workers):
    """Two processes on one host, long leases: when one dies, the other's periodic sweep sees
    the dead pid and requeues its jobs long before the 60 s lease would run out."""
    doomed = workers.spawn(workers=2, lease=60)
    ids = [client.submit("proc.wait", {"seconds": 3}) for _ in range(2)]
    wait_for(lambda: set(states(client, ids).values()) == {"running"}, timeout=20,
             message="both jobs running in the first process")
    survivor = workers.spawn(workers=2, lease=60)  # idle: nothing was queued when it started
    workers.kill(doomed)
    killed = time.monotonic()
    wait_for(lambda: set(states(client, ids).values()) == {"succeeded"}, timeout=20,
             message="the survivor to finish the dead process's jobs")
    assert time.monotonic() - killed < 20  # a sweep (every 5 s at most), not the 60 s lease
    assert {client.get(job_id)["attempts"] for job_id in ids} == {2}
    assert survivor.poll() is None


def test_a_killed_job_resumes_after_its_last_finished_step(client, workers):
    first = workers.spawn(workers=1, lease=60)
    job_id = client.submit("proc.steps", {"n": 6, "pause_before": 4})

    def three_steps_done():
        steps = client.get(job_id)["steps"]
        return [s["name"] for s in steps if s["state"] == "succeeded"] == ["s1", "s2", "s3"] and steps
    before = wait_for(three_steps_done, timeout=20, message="steps 1-3 recorded")
    workers.kill(first)  # the task is waiting for 'go' before step 4: the kill lands after step 3
    (workers.workdir / "go").touch()
    second = workers.spawn(workers=1, lease=60)

    job = wait_for(lambda: (lambda j: j if j["state"] in TERMINAL else None)(client.get(job_id)),
                   timeout=20, message="the job to finish")
    assert (job["state"], job["result"], job["attempts"]) == ("succeeded", 6, 2)
    executed = proc_worker.read_lines(workers.workdir, f"steps-{job_id}.log")
    assert executed == [["1", str(first.pid)], ["2", str(first.pid)], ["3", str(first.pid)],
                        ["4", str(second.pid)], ["5", str(second.pid)], ["6", str(second.pid)]]
    assert job["steps"][:3] == before[:3]  # the first three were not run (or rewritten) again
    assert [s["name"] for s in job["steps"]] == ["s1", "s2", "s3", "s4", "s5", "s6"]


def test_a_job_that_kills_its_process_fails_with_worker_lost(client, workers):
    job_id = client.submit("proc.suicide")
    deaths = 0
    deadline = time.monotonic() + 60
    while client.get(job_id)["state"] not in TERMINAL and time.monotonic() < deadline:
        # the job may kill the process before it reports ready: do not wait for that
        proc = workers.spawn(workers=1, lease=60, max_crashes=3, wait_ready=False)
        wait_for(lambda: proc.poll() is not None or client.get(job_id)["state"] in TERMINAL,
                 timeout=20, message="the job to kill its process or end")
        if proc.poll() is not None:
            deaths += 1
    job = client.get(job_id)
    assert job["state"] == "failed" and job["error"]["type"] == "WorkerLost"
    assert deaths == 3
    attempts = proc_worker.read_lines(workers.workdir, f"suicide-{job_id}.log")
    assert [a for a, _pid in attempts] == ["1", "2", "3"]
    assert len({pid for _a, pid in attempts}) == 3


def test_a_restart_under_a_stable_node_id_takes_back_its_jobs_at_once(client, workers):
    """With a configured node id the pid test cannot apply; the node's own name can."""
    first = workers.spawn(workers=1, lease=60, node_id="stable-node")
    job_id = client.submit("proc.record", {"seconds": 1})
    wait_for(lambda: client.get(job_id)["state"] == "running", timeout=20, message="the job to start")
    workers.kill(first)
    restarted = time.monotonic()
    workers.spawn(workers=1, lease=60, node_id="stable-node")
    job = wait_for(lambda: (lambda j: j if j["state"] in TERMINAL else None)(client.get(job_id)),
                   timeout=15, message="the job to finish after the restart")
    assert (job["state"], job["attempts"]) == ("succeeded", 2)
    assert time.monotonic() - restarted < 15


def test_every_submit_that_returned_survives_a_kill(client, workers):
    """Durable submit: an id is logged only after submit() returned; all are in the journal."""
    submitter = workers.spawn(extra=["--submit-forever"])
    log = workers.workdir / "submitted.log"
    wait_for(lambda: log.exists() and len(log.read_text().split()) >= 300, timeout=30,
             message="300 submits")
    workers.kill(submitter)
    ids = log.read_text().split()
    assert len(ids) == len(set(ids)) >= 300
    jobs, _ = client.list(limit=len(ids) + 1000)
    assert set(ids) <= {job["id"] for job in jobs}
