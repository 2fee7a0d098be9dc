"""examples/flask_app.py run as a real process: submit, poll, and the signed callback."""
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from conftest import wait_for
from liveserver import clean_env, free_port

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "flask_app.py"
INJECTION = "x'); DROP TABLE projects;--"


@pytest.fixture
def example_app(tmp_path):
    port = free_port()
    env = clean_env(PORT=str(port), JOBS_DB=f"sqlite:///{tmp_path / 'example.db'}")
    with open(tmp_path / "example.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, str(EXAMPLE)], stdout=log, stderr=subprocess.STDOUT,
                                env=env, cwd=tmp_path)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _up(url, proc), timeout=30, message="example app")
        yield url
    finally:
        proc.terminate()
        code = proc.wait(30)
    assert code == 0, (tmp_path / "example.log").read_text()


def _up(url, proc):
    if proc.poll() is not None:
        pytest.fail(f"example exited with {proc.returncode}")
    try:
        return requests.get(url + "/jobserver/healthz", timeout=1).status_code == 200
    except requests.RequestException:
        return False


def test_example_files_a_job_and_records_the_signed_callback(example_app):
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


def _outcome(url, job_id):
    """The app's envelope for the project once the callback recorded it (else None)."""
    answer = requests.get(f"{url}/projects/{job_id}", timeout=5).json()
    return None if answer["status"] == 2 else answer


def test_example_rejects_a_bad_body_in_its_own_envelope(example_app):
    answer = requests.post(example_app + "/projects", data="not json", timeout=10)
    assert answer.status_code == 400 and answer.json()["status"] == 1
    forged = requests.post(example_app + "/hooks/jobserver", json={"id": "x", "state": "succeeded"},
                           timeout=10)
    assert forged.status_code == 401
