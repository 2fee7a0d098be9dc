"""What a new user meets first: the `jobserver` command's messages, a read-only journal,
task modules in the current directory, the list cursor, client URLs, tokens, the docs.

CLI tests run the real `jobserver` command (liveserver.run_cli / ServeProcess)."""
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import pytest
from conftest import MYSQL_URL
from liveserver import clean_env, free_port, run_cli

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


# --- d. the suite's shape ---------------------------------------------------------------
@pytest.mark.parametrize("command", [["pytest"], [sys.executable, "-m", "pytest"]])
def test_plain_pytest_and_python_dash_m_pytest_collect_from_the_repo_root(command):
    if command == ["pytest"]:
        command = [str(Path(sys.executable).parent / "pytest")]
    done = subprocess.run(command + ["--collect-only", "-q", "-p", "no:cacheprovider"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, env=clean_env())
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "error" not in done.stdout.splitlines()[-1], done.stdout[-3000:]
