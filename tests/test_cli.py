"""The `jobserver` command end to end: real serve processes, the client commands, tokens."""
import json
import signal
import subprocess
import sys

import pytest
import requests
from conftest import wait_for
from liveserver import JOBSERVER, ServeProcess, clean_env, free_port, run_cli

from jobserver import JobServer, cli, demo
from jobserver.client import TERMINAL, Client, ProblemError
from jobserver.journal import open_journal

INJECTION = "x'); DROP TABLE projects;--"


def cli_json(*args, url, expect_rc=0, **kw):
    done = run_cli(*args, "--url", url, **kw)
    assert done.returncode == expect_rc, done.stderr
    return json.loads(done.stdout)


def job_of(url, job_id):
    """A job over HTTP (cheaper than a CLI process, for polling)."""
    with Client(url) as client:
        return client.get(job_id)


def state_of(url, job_id):
    return job_of(url, job_id)["state"]


def test_serve_on_each_backend_stores_project_literally(db_url, tmp_path):
    with ServeProcess(tmp_path / "serve.log", db=db_url) as srv:
        project = cli_json("submit", "demo.create_project", f"projname={INJECTION}", "prodesc=null",
                           "--wait", url=srv.url)
        assert project["state"] == "succeeded" and project["result"]["projname"] == INJECTION
        assert srv.stop() == 0
    journal = open_journal(db_url)
    try:
        rows = demo.projects_for(journal, project["id"])
    finally:
        journal.close()
    assert [(r["projname"], r["prodesc"]) for r in rows] == [(INJECTION, None)]


def test_submit_status_list_cancel_retry(sqlite_url, tmp_path):
    with ServeProcess(tmp_path / "serve.log", db=sqlite_url) as srv:
        job = cli_json("submit", "demo.echo", "n=3", "flag=true", "word=hello", "--json",
                       '{"n": 1, "obj": {"a": [1]}}', "--wait", "20", url=srv.url)
        assert job["result"] == {"n": 3, "flag": True, "word": "hello", "obj": {"a": [1]}}
        sleeper = cli_json("submit", "demo.sleep", "seconds=60", url=srv.url)["id"]
        wait_for(lambda: state_of(srv.url, sleeper) == "running", message="sleep running")
        listed = cli_json("list", "--state", "running", "--task", "demo.sleep", url=srv.url)
        assert [j["id"] for j in listed["jobs"]] == [sleeper]
        cli_json("cancel", sleeper, url=srv.url)
        assert cli_json("status", sleeper, "--wait", "15", url=srv.url)["state"] == "cancelled"
        assert cli_json("retry", sleeper, url=srv.url)["state"] in ("queued", "running")
        failed = cli_json("submit", "demo.fail", "message=boom", "--max-retries", "0", "--wait",
                          url=srv.url, expect_rc=1)
        assert failed["state"] == "failed" and failed["error"]["message"] == "boom"
        missing = run_cli("status", "no-such-job", "--url", srv.url)
        assert missing.returncode == 1 and "no-such-job" in missing.stderr and not missing.stdout
        unknown = run_cli("submit", "no.such.task", "--url", srv.url)
        assert unknown.returncode == 1 and "no.such.task" in unknown.stderr


def test_sigterm_exits_zero_and_queued_jobs_survive_restart(sqlite_url, tmp_path):
    with ServeProcess(tmp_path / "a.log", db=sqlite_url) as srv:
        delayed = cli_json("submit", "demo.echo", "x=1", "--delay", "3600", url=srv.url)["id"]
        sleeper = cli_json("submit", "demo.sleep", "seconds=60", url=srv.url)["id"]
        wait_for(lambda: state_of(srv.url, sleeper) == "running", message="sleep running")
        assert srv.stop(signal.SIGTERM) == 0
    assert "serving http://127.0.0.1" in srv.log()
    with ServeProcess(tmp_path / "b.log", db=sqlite_url) as again:
        assert state_of(again.url, delayed) == "queued"
        assert state_of(again.url, sleeper) in ("queued", "running")
        cli_json("cancel", sleeper, url=again.url)
        assert again.stop(signal.SIGINT) == 0


def test_while_stopping_submits_get_503_and_a_second_signal_exits_at_once(sqlite_url, tmp_path):
    port = free_port()
    args = ["--db", sqlite_url, "--port", str(port), "--tasks", "jobserver.demo", "--workers", "1",
            "--poll-interval", "0.05", "--shutdown-grace", "60"]
    with ServeProcess(tmp_path / "a.log", port=port, args=args) as srv:
        sleeper = cli_json("submit", "demo.sleep", "seconds=60", url=srv.url)["id"]
        wait_for(lambda: state_of(srv.url, sleeper) == "running", message="sleep running")
        srv.proc.send_signal(signal.SIGTERM)
        refused = wait_for(lambda: _submit_status(srv.url) == 503, message="503 while stopping")
        assert refused and srv.proc.poll() is None  # still in its grace period, still answering
        srv.proc.send_signal(signal.SIGTERM)
        assert srv.proc.wait(10) == 128 + signal.SIGTERM
    with ServeProcess(tmp_path / "b.log", db=sqlite_url) as again:
        # the job of the process that exited at once is recovered and runs again
        wait_for(lambda: job_of(again.url, sleeper)["attempts"] == 2, message="sleep re-run")
        cli_json("cancel", sleeper, url=again.url)


def _submit_status(url):
    try:
        return requests.post(url + "/jobs", json={"task": "demo.echo"}, timeout=5).status_code
    except requests.RequestException:
        return None


def test_worker_runs_jobs_without_http(sqlite_url, tmp_path):
    with open(tmp_path / "worker.log", "wb") as log:
        proc = subprocess.Popen([JOBSERVER, "worker", "--tasks", "jobserver.demo", "--poll-interval",
                                 "0.05", "--workers", "2"], stdout=log, stderr=subprocess.STDOUT,
                                env=clean_env(JOBSERVER_DB=sqlite_url))
    try:
        submitter = JobServer(sqlite_url, tasks=["jobserver.demo"])  # journal only: never started
        try:
            job_id = submitter.submit("demo.echo", {"by": "worker"})
            job = wait_for(lambda: _finished(submitter, job_id), timeout=30, message="worker ran job")
        finally:
            submitter.stop()
        assert job["state"] == "succeeded" and job["result"] == {"by": "worker"}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def _finished(server, job_id):
    job = server.get(job_id)
    return job if job["state"] in TERMINAL else None


def test_env_twins_configure_serve_and_client(tmp_path):
    port = free_port()
    env = clean_env(JOBSERVER_DB=f"sqlite:///{tmp_path / 'env.db'}", JOBSERVER_PORT=str(port),
                    JOBSERVER_TASKS="jobserver.demo", JOBSERVER_WORKERS="3",
                    JOBSERVER_POLL_INTERVAL="0.05", JOBSERVER_SHUTDOWN_GRACE="1",
                    JOBSERVER_MAX_QUEUED="1")
    with ServeProcess(tmp_path / "env.log", port=port, args=[], env=env) as srv:
        client_env = clean_env(JOBSERVER_URL=srv.url)
        done = run_cli("submit", "demo.echo", "a=1", "--wait", env=client_env)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["result"] == {"a": 1}
        assert "workers 3" in srv.log() and (tmp_path / "env.db").exists()
        with Client(srv.url) as client:
            client.submit_with("demo.echo", {}, delay=3600)
            with pytest.raises(ProblemError) as full:
                client.submit_with("demo.echo", {}, delay=3600)
        assert full.value.status == 429 and full.value.retry_after >= 1


def test_flag_beats_env_beats_default():
    args = cli.build_parser().parse_args(["serve", "--port", "9001", "--tasks", "a", "b"])
    env = {"JOBSERVER_PORT": "9002", "JOBSERVER_WORKERS": "3", "JOBSERVER_TASKS": "c",
           "JOBSERVER_CALLBACK_ALLOW": "127.0.0.0/8, ::1/128", "JOBSERVER_INSECURE_OPEN": "yes",
           "JOBSERVER_MAX_QUEUED": "none"}
    config = cli.build_config(args, cli.POOL_FLAGS + cli.HTTP_FLAGS, env)
    assert config.port == 9001 and config.tasks == ("a", "b")
    assert config.workers == 3 and config.insecure_open is True and config.max_queued is None
    assert config.callback_allow == ("127.0.0.0/8", "::1/128")
    assert config.db == "sqlite:///jobserver.db" and config.threads == cli.Config().threads
    with pytest.raises(SystemExit):
        cli.build_config(args, cli.POOL_FLAGS, {"JOBSERVER_WORKERS": "many"})


def test_mask_url_hides_the_password():
    assert cli.mask_url("mysql://app:s3cret@db:3306/jobs") == "mysql://app:***@db:3306/jobs"
    assert cli.mask_url("sqlite:///jobserver.db") == "sqlite:///jobserver.db"


def test_refuses_public_host_in_open_mode(tmp_path):
    done = run_cli("serve", "--db", f"sqlite:///{tmp_path / 'open.db'}", "--host", "0.0.0.0",
                   "--port", str(free_port()), timeout=30)
    assert done.returncode == 2
    assert "open mode" in done.stderr and "--insecure-open" in done.stderr


def test_token_create_and_use(tmp_path):
    db = f"sqlite:///{tmp_path / 'auth.db'}"
    with ServeProcess(tmp_path / "auth.log", db=db) as srv:
        made = run_cli("token", "create", "alice", "--db", db)
        assert made.returncode == 0, made.stderr
        token = made.stdout.strip()
        assert len(token) >= 32
        again = run_cli("token", "create", "alice", env=clean_env(JOBSERVER_DB=db))
        assert again.returncode == 1 and again.stderr
        wait_for(lambda: run_cli("list", "--url", srv.url).returncode == 1, message="auth active")
        denied = run_cli("list", "--url", srv.url)
        assert "token" in denied.stderr.lower()
        env = clean_env(JOBSERVER_TOKEN=token, JOBSERVER_URL=srv.url)
        job = json.loads(run_cli("submit", "demo.echo", "--wait", env=env).stdout)
        assert job["owner"] == "alice" and job["state"] == "succeeded"


def test_callback_secret_command(tmp_path):
    db = f"sqlite:///{tmp_path / 'cb.db'}"
    first = run_cli("callback-secret", "--db", db)
    try:
        from jobserver.callbacks import signing_secret  # noqa: F401 (only asks whether it exists)
    except ImportError:
        assert first.returncode == 1 and "callbacks not available" in first.stderr
        return
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("whsec_")
    assert run_cli("callback-secret", env=clean_env(JOBSERVER_DB=db)).stdout == first.stdout


def test_python_dash_m_runs_the_cli(tmp_path):
    done = subprocess.run([sys.executable, "-m", "jobserver", "token", "create", "bob", "--admin",
                           "--db", f"sqlite:///{tmp_path / 'm.db'}"], capture_output=True, text=True,
                          timeout=60, env=clean_env())
    assert done.returncode == 0 and done.stdout.strip()


def test_two_serve_processes_share_one_sqlite_file(tmp_path):
    db = f"sqlite:///{tmp_path / 'shared.db'}"
    with ServeProcess(tmp_path / "one.log", db=db) as one, \
            ServeProcess(tmp_path / "two.log", db=db) as two:
        specs = [{"task": "demo.create_project", "params": {"projname": f"p{i}"}} for i in range(20)]
        ids = [job["id"] for job in _batch(one.url, specs[:10]) + _batch(two.url, specs[10:])]
        with Client(two.url) as client:
            assert all(client.handle(job_id).wait(30).successful() for job_id in ids)
        jobs = cli_json("list", "--task", "demo.create_project", "--limit", "100", url=one.url)["jobs"]
        assert sorted(j["id"] for j in jobs) == sorted(ids)
        assert all(j["attempts"] == 1 for j in jobs)
    journal = open_journal(db)
    try:
        names = [row["projname"] for job_id in ids for row in demo.projects_for(journal, job_id)]
    finally:
        journal.close()
    assert sorted(names) == sorted(f"p{i}" for i in range(20))


def _batch(url, specs):
    with Client(url) as client:
        return [handle.job for handle in client.submit_many(specs)]
