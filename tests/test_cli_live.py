"""`jobserver submit --wait` and `status --wait`: a live progress line on a terminal (a pty),
plain lines on stderr when piped, and the final job's JSON on stdout either way."""
import json
import os
import pty
import select
import subprocess
import time

import pytest
from liveserver import JOBSERVER, ServeProcess, clean_env, run_cli


@pytest.fixture
def srv(sqlite_url, tmp_path):
    with ServeProcess(tmp_path / "serve.log", db=sqlite_url) as server:
        yield server


def run_in_pty(args, timeout=60):
    """`jobserver ARGS` with its stdout on a pseudo-terminal: (exit status, what it wrote)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([JOBSERVER, *args], stdout=slave, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, env=clean_env())
    os.close(slave)
    out, deadline = b"", time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if select.select([master], [], [], 0.2)[0]:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: the child closed its end
                    break
                if not chunk:
                    break
                out += chunk
            elif proc.poll() is not None:
                break
        code = proc.wait(10)
        err = proc.stderr.read().decode()
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
    return code, out.decode(), err


def _final_json(text):
    """The JSON document printed after the live line (a pty turns \\n into \\r\\n)."""
    return json.loads(text[text.index("\n{"):].replace("\r\n", "\n"))


def test_submit_wait_on_a_terminal_rewrites_one_line_in_place(srv):
    code, out, err = run_in_pty(["submit", "demo.steps", "n=3", "seconds=0.4", "--wait", "--url", srv.url])
    assert code == 0, err
    line, _, rest = out.partition("\n{")
    frames = [f.replace("\x1b[K", "") for f in line.split("\r") if f.strip()]
    assert any(f.startswith("running 1/3 [step-2]") for f in frames), frames
    assert frames[-1].startswith("succeeded 3/3"), frames
    assert "\n" not in line.strip("\r\n")  # one line, rewritten: no line feed until the end
    job = _final_json(out)
    assert job["state"] == "succeeded" and job["result"] == {"steps": 3}
    assert err == ""


def test_status_wait_on_a_terminal_follows_a_running_job(srv):
    job = json.loads(run_cli("submit", "demo.steps", "n=2", "seconds=0.5", "--url", srv.url).stdout)
    code, out, _err = run_in_pty(["status", job["id"], "--wait", "30", "--url", srv.url])
    assert code == 0
    assert "\rsucceeded 2/2" in out and _final_json(out)["state"] == "succeeded"


def test_submit_wait_piped_prints_plain_lines_and_the_job(srv):
    done = run_cli("submit", "demo.steps", "n=2", "seconds=0.3", "--wait", "--url", srv.url)
    assert done.returncode == 0, done.stderr
    job = json.loads(done.stdout)  # stdout holds the job only: pipes keep working
    assert job["state"] == "succeeded"
    lines = done.stderr.splitlines()
    assert "\r" not in done.stderr and "\x1b" not in done.stderr
    assert lines[-1].startswith("succeeded 2/2")
    assert any(line.startswith("running 1/2 [step-2]") for line in lines), lines


def test_submit_wait_for_a_failure_still_exits_1_and_times_out_as_before(srv):
    failed = run_cli("submit", "demo.fail", "--max-retries", "0", "--wait", "--url", srv.url)
    assert failed.returncode == 1 and json.loads(failed.stdout)["state"] == "failed"
    slow = run_cli("submit", "demo.sleep", "seconds=30", "--wait", "1", "--url", srv.url)
    assert slow.returncode == 1 and "still running" in slow.stderr
