"""Two worker processes share one journal (one SQLite file; one MariaDB database): every
job runs exactly once, and no job ever has two overlapping runs."""
import collections
import signal

import proc_worker
from conftest import wait_for

JOBS = 200


def overlapping(runs):
    """Pairs of runs of one job whose [start, end] intervals overlap."""
    by_job = collections.defaultdict(list)
    for job_id, pid, start, end in runs:
        by_job[job_id].append((int(start), int(end), pid))
    clashes = []
    for job_id, spans in by_job.items():
        spans.sort()
        clashes += [(job_id, a, b) for a, b in zip(spans, spans[1:]) if b[0] < a[1]]
    return clashes


def test_two_processes_share_the_jobs_and_run_each_once(client, workers):
    procs = [workers.spawn(workers=4, lease=2), workers.spawn(workers=4, lease=2)]
    ids = [job["id"] for job, _ in client.submit_many(
        [{"task": "proc.record", "params": {"seconds": 0.01}} for _ in range(JOBS)])]
    wait_for(lambda: len(client.list(state="succeeded", limit=JOBS + 1)[0]) == JOBS, timeout=90,
             interval=0.2, message=f"{JOBS} jobs to succeed")
    for proc in procs:
        assert workers.terminate(proc) == 0  # a graceful stop with nothing left to give back

    runs = proc_worker.read_lines(workers.workdir, "runs-*.log")
    assert overlapping(runs) == []
    counts = collections.Counter(job_id for job_id, *_ in runs)
    assert set(counts) == set(ids) and set(counts.values()) == {1}
    by_pid = collections.Counter(pid for _job, pid, *_ in runs)
    assert set(by_pid) == {str(p.pid) for p in procs}, f"both processes should take work: {by_pid}"
    jobs, _ = client.list(limit=JOBS + 1)
    assert {job["attempts"] for job in jobs} == {1}
    assert {str(job["result"]) for job in jobs} == set(by_pid)


def test_heartbeats_keep_long_jobs_with_one_owner(client, workers):
    """Jobs three times longer than the lease: renewals keep the other process off them."""
    procs = [workers.spawn(workers=2, lease=1.5), workers.spawn(workers=2, lease=1.5)]
    ids = [job["id"] for job, _ in client.submit_many(
        [{"task": "proc.record", "params": {"seconds": 4}} for _ in range(4)])]
    wait_for(lambda: all(client.get(i)["state"] == "succeeded" for i in ids), timeout=40,
             interval=0.2, message="the long jobs to succeed")
    for proc in procs:
        assert workers.terminate(proc) == 0
    runs = proc_worker.read_lines(workers.workdir, "runs-*.log")
    assert sorted(job_id for job_id, *_ in runs) == sorted(ids)
    assert {client.get(i)["attempts"] for i in ids} == {1}


def test_cancel_reaches_a_job_running_in_another_process(client, workers):
    workers.spawn(workers=1, lease=1)
    job_id = client.submit("proc.wait", {"seconds": 30})
    wait_for(lambda: client.get(job_id)["state"] == "running", timeout=20, message="the job to start")
    client.cancel(job_id)
    job = wait_for(lambda: (lambda j: j if j["state"] != "running" else None)(client.get(job_id)),
                   timeout=10, message="the cancel to land")
    assert job["state"] == "cancelled" and job["cancel_requested"] is True


def test_a_frozen_process_loses_its_job_and_its_late_outcome_is_fenced_out(client, workers):
    """SIGSTOP past the lease: another process takes the job over; after SIGCONT the first
    run ends too, but only the owner of the live lease records an outcome."""
    frozen = workers.spawn(workers=1, lease=1)
    job_id = client.submit("proc.record", {"seconds": 2})
    wait_for(lambda: client.get(job_id)["state"] == "running", timeout=20, message="the job to start")
    frozen.send_signal(signal.SIGSTOP)
    try:
        taker = workers.spawn(workers=1, lease=1)
        job = wait_for(lambda: (lambda j: j if j["state"] == "succeeded" else None)(client.get(job_id)),
                       timeout=30, message="the other process to finish the job")
    finally:
        frozen.send_signal(signal.SIGCONT)
    assert (job["result"], job["attempts"]) == (taker.pid, 2)
    wait_for(lambda: len(proc_worker.read_lines(workers.workdir, "runs-*.log")) == 2, timeout=20,
             message="the thawed run to end")
    assert workers.terminate(frozen) == 0
    after = client.get(job_id)
    assert (after["state"], after["result"], after["attempts"]) == ("succeeded", taker.pid, 2)
