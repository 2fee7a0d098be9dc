"""examples/flask_app.py run as a real process: submit, poll, and the signed callback."""
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests
from conftest import wait_for
from liveserver import clean_env, free_port

from jobserver.ids import new_id

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "flask_app.py"
INJECTION = "x'); DROP TABLE projects;--"


@contextmanager
def running_example(tmp_path, port, log_name="example.log"):
    """The example app on `port` with its journal in `tmp_path`; stopped (exit 0) afterwards."""
    env = clean_env(PORT=str(port), JOBS_DB=f"sqlite:///{tmp_path / 'example.db'}")
    with open(tmp_path / log_name, "wb") as log:
        proc = subprocess.Popen([sys.executable, str(EXAMPLE)], stdout=log, stderr=subprocess.STDOUT,
                                env=env, cwd=tmp_path)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _up(url, proc), timeout=30, message="example app")
        yield url
    finally:
        proc.terminate()
        code = proc.wait(30)
    assert code == 0, (tmp_path / log_name).read_text()


@pytest.fixture
def example_app(tmp_path):
    with running_example(tmp_path, free_port()) as url:
        yield url


def _up(url, proc):
    if proc.poll() is not None:
        pytest.fail(f"example exited with {proc.returncode}")
    try:
        return requests.get(url + "/jobserver/healthz", timeout=1).status_code == 200
    except requests.RequestException:
        return False


def test_example_files_a_job_and_records_the_signed_callback(example_app, tmp_path):
    answer = requests.post(example_app + "/projects", json={"projname": INJECTION, "prodesc": "d"},
                           timeout=10)
    assert answer.status_code == 202
    body = answer.json()
    assert body["status"] == 2 and body["msg"] == "pending"
    job_id, status_url = body["data"]["job_id"], body["data"]["status_url"]
    assert status_url == f"{example_app}/jobserver/jobs/{job_id}"
    deadline = time.monotonic() + 20
    job = requests.get(status_url, params={"wait": 5}, timeout=10).json()
    while job["state"] not in ("succeeded", "failed") and time.monotonic() < deadline:
        job = requests.get(status_url, params={"wait": 5}, timeout=10).json()
    assert job["state"] == "succeeded" and job["result"]["projname"] == INJECTION
    outcome = wait_for(lambda: _outcome(example_app, job_id), timeout=20, message="callback recorded")
    assert outcome["status"] == 0 and outcome["msg"] == "succeeded"
    assert outcome["data"]["result"]["projname"] == INJECTION
    wait_for(lambda: f"verified callback for job {job_id}: succeeded" in (tmp_path / "example.log").read_text(),
             timeout=20, message="the signed callback")


def _outcome(url, job_id):
    """The app's envelope for the project once its job ended (else None)."""
    answer = requests.get(f"{url}/projects/{job_id}", timeout=5).json()
    return None if answer["status"] == 2 else answer


def test_example_rejects_a_bad_body_in_its_own_envelope(example_app):
    answer = requests.post(example_app + "/projects", data="not json", timeout=10)
    assert answer.status_code == 400 and answer.json()["status"] == 1
    forged = requests.post(example_app + "/hooks/jobserver", json={"id": "x", "state": "succeeded"},
                           timeout=10)
    assert forged.status_code == 401


def test_after_a_restart_a_project_shows_its_state_from_the_journal(tmp_path):
    """The app keeps no job state of its own: a project that ended before a restart shows
    its outcome after it, and an id that was never a project is 404 in the app's envelope."""
    port = free_port()
    with running_example(tmp_path, port) as url:
        body = requests.post(url + "/projects", json={"projname": "apollo"}, timeout=10).json()
        job_id = body["data"]["job_id"]
        done = wait_for(lambda: _outcome(url, job_id), timeout=20, message="project done")
        assert done["status"] == 0 and done["msg"] == "succeeded"
        wait_for(lambda: f"verified callback for job {job_id}" in (tmp_path / "example.log").read_text(),
                 timeout=20, message="the signed callback")
    with running_example(tmp_path, port, "again.log") as url:
        again = requests.get(f"{url}/projects/{job_id}", timeout=5)
        assert again.status_code == 200
        assert again.json()["status"] == 0 and again.json()["msg"] == "succeeded"
        assert again.json()["data"]["result"]["projname"] == "apollo"
        for unknown in (new_id(), "no-such-project"):
            missing = requests.get(f"{url}/projects/{unknown}", timeout=5)
            assert missing.status_code == 404 and missing.json()["status"] == 1
