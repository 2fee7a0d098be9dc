"""What a new user meets first: the `jobserver` command's messages, a read-only journal,
task modules in the current directory, the list cursor, client URLs, tokens, the docs.

CLI tests run the real `jobserver` command (liveserver.run_cli / ServeProcess)."""
import json
import re
import resource
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from urllib.parse import urlparse

import pytest
import requests
from conftest import MYSQL_URL, wait_for
from http_fixtures import assert_problem, launch
from liveserver import JOBSERVER, ServeProcess, clean_env, free_port, run_cli

from jobserver import JobServer, Registry
from jobserver.client import TERMINAL, Client
from jobserver.http import create_app
from jobserver.redact import mask_url

ROOT = Path(__file__).resolve().parent.parent
PASSWORD = "S3cretPW"


# --- a. no password in any output ------------------------------------------------------
def _bad_urls():
    """(case, URL, the secret parts that must never be printed)."""
    cases = [
        ("bad-scheme", f"mysq://root:{PASSWORD}@127.0.0.1:3306/test", [PASSWORD]),
        ("unreachable", f"mysql://root:{PASSWORD}@127.0.0.1:{free_port()}/test", [PASSWORD]),
        # an unencoded / ends the host part early: urllib then reads the password as a port
        ("slash-in-password", "mysql://root:Sekr1t/Pazz@127.0.0.1:3306/test", ["Sekr1t", "Pazz"]),
    ]
    if MYSQL_URL:
        server = urlparse(MYSQL_URL)
        cases.append(("wrong-password", f"mysql://root:{PASSWORD}@{server.hostname}:{server.port or 3306}"
                                        f"/test", [PASSWORD]))
    return cases


COMMANDS = {
    "serve": lambda: ["serve", "--port", str(free_port())],
    "worker": lambda: ["worker"],
    "token-create": lambda: ["token", "create", "alice"],
    "callback-secret": lambda: ["callback-secret"],
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_no_command_prints_the_journal_password(command):
    """Each command that opens the journal, with URLs that fail three ways (and a wrong
    password when a MariaDB is given), by flag and by JOBSERVER_DB: it fails, says why,
    and neither stdout nor stderr holds the password."""
    for case, url, secrets in _bad_urls():
        for args, env in ((COMMANDS[command]() + ["--db", url], clean_env()),
                          (COMMANDS[command](), clean_env(JOBSERVER_DB=url))):
            done = run_cli(*args, env=env, timeout=60)
            output = done.stdout + done.stderr
            assert done.returncode != 0, (case, output)
            assert "error" in done.stderr, (case, output)
            for secret in secrets:
                assert secret not in output, (case, output)


def test_mask_url_hides_every_form_of_password():
    assert mask_url("mysql://app:s3cret@db:3306/jobs") == "mysql://app:***@db:3306/jobs"
    assert mask_url("mysql://app:a/b@c@db/jobs") == "mysql://app:***@db/jobs"
    assert mask_url("app:s3cret@db/jobs") == "app:***@db/jobs"
    assert mask_url("mysql://app@db/jobs") == "mysql://app@db/jobs"
    assert mask_url("mysql://db:3306/jobs") == "mysql://db:3306/jobs"
    assert mask_url("sqlite:///jobserver.db") == "sqlite:///jobserver.db"
    assert mask_url("sqlite:////tmp/a:b@c.db") == "sqlite:////tmp/a:b@c.db"


# --- b. a journal that refuses writes ---------------------------------------------------
# Root ignores file permissions, so `chmod 444` cannot show the user's case when the tests
# run as root. A read-only bind mount does: made inside a private mount namespace of the
# server's own process (unshare --mount), it binds root as well, is gone when the process
# ends, and needs only the CAP_SYS_ADMIN that root has here and in CI (same kind of machine).
READ_ONLY = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && exec "$@"'


def _read_only_or_skip(tmp_path):
    target = tmp_path / "probe"
    target.write_text("")
    try:
        probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", READ_ONLY,
                                str(target), "sh", "-c", 'echo x > "$0"', str(target)],
                               capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        pytest.skip("no unshare(1) here")
    if "Read-only file system" not in probe.stderr:
        pytest.skip("cannot make a read-only bind mount here: " + probe.stderr[-300:])


def _prepared_journal(tmp_path):
    db = f"sqlite:///{tmp_path / 'journal' / 'journal.db'}"
    JobServer(db).stop()  # a journal as an earlier run left it (schema and callback secret made)
    return db


def _serve_with_read_only(target, db, tmp_path):
    """`jobserver serve` with `target` (a file or a directory) read-only; (exit status, log)."""
    _read_only_or_skip(tmp_path)
    port = free_port()
    with open(tmp_path / "serve.log", "wb") as log:
        proc = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c", READ_ONLY,
                                 str(target), JOBSERVER, "serve", "--db", db, "--port", str(port),
                                 "--tasks", "jobserver.demo"],
                                stdout=log, stderr=subprocess.STDOUT, env=clean_env())
    try:
        code = proc.wait(20)
    except subprocess.TimeoutExpired:
        healthz = requests.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
        proc.kill()
        proc.wait(10)
        pytest.fail(f"serve kept running (healthz {healthz.status_code}):\n"
                    + (tmp_path / "serve.log").read_text())
    return code, (tmp_path / "serve.log").read_text()


def test_serve_refuses_to_start_on_a_read_only_journal_file(tmp_path):
    """The journal's file read-only, its directory writable: as `chmod 444 journal.db` is for
    a user who is not root (see READ_ONLY above for how)."""
    db = _prepared_journal(tmp_path)
    code, log = _serve_with_read_only(tmp_path / "journal" / "journal.db", db, tmp_path)
    assert code == 1, log
    assert "refuses writes" in log and "serving" not in log, log


def test_serve_refuses_to_start_in_a_read_only_directory(tmp_path):
    """The journal's directory read-only (SQLite cannot make its -wal and -shm files there)."""
    db = _prepared_journal(tmp_path)
    code, log = _serve_with_read_only(tmp_path / "journal", db, tmp_path)
    assert code == 1, log
    assert "refuses writes" in log and "serving" not in log, log


def test_healthz_reports_a_journal_that_stopped_taking_writes(sqlite_url, tmp_path):
    """A file size limit of 0 on the serving process (prlimit RLIMIT_FSIZE, which binds root
    too and needs no privilege for one's own child) makes every write of its journal fail, as
    a full disk would: /healthz turns 503 within a few seconds, says why without a path or a
    secret, and turns 200 again once writes work."""
    with ServeProcess(tmp_path / "serve.log", db=sqlite_url) as srv:
        soft, hard = resource.prlimit(srv.proc.pid, resource.RLIMIT_FSIZE)
        resource.prlimit(srv.proc.pid, resource.RLIMIT_FSIZE, (0, hard))
        answers = []  # (a Response is falsy when its status is an error: keep it aside)
        try:
            wait_for(lambda: answers.append(requests.get(srv.url + "/healthz", timeout=10))
                     or answers[-1].status_code == 503, timeout=20, message="healthz 503")
        finally:
            resource.prlimit(srv.proc.pid, resource.RLIMIT_FSIZE, (soft, hard))
        problem = assert_problem(answers[-1], 503)
        assert "refuses writes" in problem["detail"]
        assert str(tmp_path) not in answers[-1].text
        wait_for(lambda: requests.get(srv.url + "/healthz", timeout=10).status_code == 200,
                 timeout=20, message="healthz 200 again")


def test_healthz_does_not_write_on_every_call(sqlite_url):
    """Fifty health checks in a row make a write probe or two between them, not fifty."""
    with launch(sqlite_url, start=False) as live:  # no pool: nothing else writes meanwhile
        wal = Path(urlparse(sqlite_url).path[1:] + "-wal")
        assert live.get("/healthz").status_code == 200
        size = wal.stat().st_size
        for _ in range(50):
            assert live.get("/healthz").status_code == 200
        assert wal.stat().st_size - size <= 4 * (4096 + 24)  # WAL frames of one or two probes


# --- c. task modules in the current directory -------------------------------------------
MYTASKS = textwrap.dedent('''
    from jobserver import task

    @task(name="my.hello")
    def hello(ctx, name="world"):
        return f"hello {name}"
''')


def test_serve_imports_tasks_from_the_current_directory(tmp_path):
    (tmp_path / "mytasks.py").write_text(MYTASKS)
    port = free_port()
    args = ["--tasks", "mytasks", "--port", str(port), "--db", "sqlite:///journal.db"]
    with ServeProcess(tmp_path / "serve.log", port=port, args=args, cwd=tmp_path) as srv:
        with Client(srv.url) as client:
            assert client.submit("my.hello", name="you").get(timeout=20) == "hello you"


def test_worker_imports_tasks_from_the_current_directory(tmp_path):
    (tmp_path / "mytasks.py").write_text(MYTASKS)
    db = f"sqlite:///{tmp_path / 'journal.db'}"
    with open(tmp_path / "worker.log", "wb") as log:
        proc = subprocess.Popen([JOBSERVER, "worker", "--tasks", "mytasks", "--db", db,
                                 "--poll-interval", "0.05"], stdout=log, stderr=subprocess.STDOUT,
                                env=clean_env(), cwd=tmp_path)
    try:
        known = Registry()  # this process only submits: it needs the name, not the module
        known.task("my.hello")(lambda ctx, name="world": None)
        submitter = JobServer(db, tasks=known)
        try:
            job_id = submitter.submit("my.hello")
            job = wait_for(lambda: (lambda j: j if j["state"] in TERMINAL else None)(submitter.get(job_id)),
                           timeout=30, message="the worker to run the job")
        finally:
            submitter.stop()
        assert job["state"] == "succeeded" and job["result"] == "hello world"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


# --- d. the suite's shape ---------------------------------------------------------------
@pytest.mark.parametrize("command", [["pytest"], [sys.executable, "-m", "pytest"]])
def test_plain_pytest_and_python_dash_m_pytest_collect_from_the_repo_root(command):
    if command == ["pytest"]:
        command = [str(Path(sys.executable).parent / "pytest")]
    done = subprocess.run(command + ["--collect-only", "-q", "-p", "no:cacheprovider"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, env=clean_env())
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "error" not in done.stdout.splitlines()[-1], done.stdout[-3000:]


# --- f. a cursor the server never gave --------------------------------------------------
def test_list_refuses_a_cursor_it_never_gave(sqlite_url):
    with launch(sqlite_url, start=False) as live:
        ids = [live.post("/jobs", json={"task": "t.echo"}).json()["id"] for _ in range(3)]
        for garbage in ("garbage", ids[0].upper(), ids[0][:-1], ids[0] + "0", "0" * 36,
                        ids[0].replace("-", "")):
            assert_problem(live.get("/jobs", params={"cursor": garbage}), 400)
        page = live.get("/jobs", params={"limit": 1}).json()
        assert page["next"] == ids[-1]
        rest = live.get("/jobs", params={"cursor": page["next"]}).json()
        assert [job["id"] for job in rest["jobs"]] == ids[-2::-1]


# --- g. serve without --tasks -----------------------------------------------------------
@pytest.mark.parametrize("command", ["serve", "worker"])
def test_starting_without_tasks_says_so(command, tmp_path):
    port = free_port()
    args = ["--db", f"sqlite:///{tmp_path / 'journal.db'}", "--poll-interval", "0.05"]
    if command == "serve":
        with ServeProcess(tmp_path / "serve.log", port=port, args=args + ["--port", str(port)]) as srv:
            log = srv.log()
    else:
        with open(tmp_path / "worker.log", "wb") as out:
            proc = subprocess.Popen([JOBSERVER, "worker", *args], stdout=out, stderr=subprocess.STDOUT,
                                    env=clean_env())
        try:
            wait_for(lambda: "jobserver worker" in (tmp_path / "worker.log").read_text(), timeout=30,
                     message="the worker to start")
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
        log = (tmp_path / "worker.log").read_text()
    warning = [line for line in log.splitlines() if "WARNING" in line and "--tasks" in line]
    assert warning and "jobserver.demo" in warning[0], log


# --- h. a server URL without http:// ----------------------------------------------------
def test_client_commands_accept_a_url_without_a_scheme(sqlite_url, tmp_path):
    with ServeProcess(tmp_path / "serve.log", db=sqlite_url) as srv:
        bare = srv.url.removeprefix("http://")
        done = run_cli("submit", "demo.echo", "a=1", "--wait", "20", "--url", bare)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["result"] == {"a": 1}
        listed = run_cli("list", env=clean_env(JOBSERVER_URL=f"localhost:{srv.port}"))
        assert listed.returncode == 0, listed.stderr
        with Client(bare) as client:
            assert client.health()["status"] == "ok"
    wrong = run_cli("list", "--url", f"ftp://127.0.0.1:{srv.port}")
    assert wrong.returncode == 1 and "http://" in wrong.stderr, wrong.stderr
    assert "connection adapters" not in wrong.stderr


# --- i. token create says where it wrote, and a clear duplicate -------------------------
def test_token_create_names_its_journal_and_a_duplicate_name(tmp_path):
    made = subprocess.run([JOBSERVER, "token", "create", "alice"], capture_output=True, text=True,
                          timeout=60, env=clean_env(), cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    assert re.fullmatch(r"[A-Za-z0-9_-]{32,}\n", made.stdout), made.stdout  # stdout: the token only
    assert "sqlite:///jobserver.db" in made.stderr and str(tmp_path / "jobserver.db") in made.stderr
    again = subprocess.run([JOBSERVER, "token", "create", "alice"], capture_output=True, text=True,
                           timeout=60, env=clean_env(), cwd=tmp_path)
    assert again.returncode == 1 and not again.stdout
    assert "a token named alice exists" in again.stderr, again.stderr
    assert "it is existing" not in again.stderr


@pytest.mark.mysql
def test_token_create_names_a_mysql_journal(mysql_url):
    """A MySQL journal is named by its URL, masked (the test server's root has no password,
    so here the mask changes nothing; test_mask_url_* show what it hides)."""
    done = run_cli("token", "create", "bob", "--db", mysql_url)
    assert done.returncode == 0, done.stderr
    assert mask_url(mysql_url) in done.stderr


# --- j, k. the docs -----------------------------------------------------------------------
def test_the_api_doc_names_every_route_and_the_readme_links_it(sqlite_url):
    readme = (ROOT / "README.md").read_text()
    assert "(docs/api.md)" in readme and "(docs/operations.md)" in readme
    api = (ROOT / "docs" / "api.md").read_text()
    server = JobServer(sqlite_url)
    try:
        rules = [rule for rule in create_app(server).url_map.iter_rules() if rule.endpoint != "static"]
    finally:
        server.stop()
    for rule in rules:
        path = re.sub(r"<(\w+)>", lambda m: "{" + ("id" if m.group(1) == "job_id" else m.group(1)) + "}",
                      rule.rule)
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            assert f"{method} {path}" in api, f"{method} {path} is not in docs/api.md"


def test_the_readme_says_to_activate_the_venv_before_bare_commands():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```sh\n(.*?)```", readme, re.S)
    lines = [line.lstrip("$ ") for block in blocks for line in block.splitlines()]
    activate = next((i for i, line in enumerate(lines) if ". .venv/bin/activate" in line), None)
    bare = [i for i, line in enumerate(lines) if re.match(r"jobserver\s", line)]
    assert bare and activate is not None and activate < bare[0], lines
