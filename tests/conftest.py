"""Shared fixtures: a fresh journal URL per test on SQLite always, and on MariaDB/MySQL
when JOBSERVER_TEST_MYSQL names a server (then an unreachable server fails the test),
and the live servers built on them.

Fixtures are composed here, so a test names them as arguments and imports nothing for
them; plain helpers live in modules beside this one: http_fixtures (an in-process
server behind real waitress: launch, TASKS, FAST, assert_problem, TcpProxy),
liveserver (`jobserver` subprocesses: ServeProcess, run_cli, free_port) and
proc_worker (worker processes)."""
import os
import time
import uuid
from urllib.parse import urlparse, urlunparse

import proc_worker
import pymysql
import pytest
from http_fixtures import launch

from jobserver import JobServer

MYSQL_URL = os.environ.get("JOBSERVER_TEST_MYSQL")
BACKENDS = ["sqlite", pytest.param("mysql", marks=pytest.mark.mysql)]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for name in list(os.environ):
        if name.startswith("JOBSERVER_") and name != "JOBSERVER_TEST_MYSQL":
            monkeypatch.delenv(name)


def _mysql_admin(url):
    p = urlparse(url)
    return pymysql.connect(host=p.hostname or "127.0.0.1", port=p.port or 3306,
                           user=p.username or "root", password=p.password or "",
                           autocommit=True, connect_timeout=5)


@pytest.fixture
def mysql_url():
    """A fresh, empty MySQL database for one test, dropped afterwards."""
    if not MYSQL_URL:
        pytest.skip("JOBSERVER_TEST_MYSQL is not set")
    name = "jst_" + uuid.uuid4().hex[:12]
    conn = _mysql_admin(MYSQL_URL)  # fails the test if the server is unreachable
    with conn.cursor() as cur:
        cur.execute("CREATE DATABASE " + name)  # name is made above from hex digits only
    p = urlparse(MYSQL_URL)
    yield urlunparse(p._replace(path="/" + name))
    with conn.cursor() as cur:
        cur.execute("DROP DATABASE IF EXISTS " + name)
    conn.close()


@pytest.fixture
def sqlite_url(tmp_path):
    return f"sqlite:///{tmp_path / 'journal.db'}"


@pytest.fixture(params=BACKENDS)
def db_url(request, tmp_path):
    """A fresh journal URL on each backend."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'journal.db'}"
    return request.getfixturevalue("mysql_url")


def wait_for(predicate, timeout=10.0, interval=0.02, message="condition"):
    """Poll `predicate` until it is truthy or `timeout` passes (then fail)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {message}")
        time.sleep(interval)


@pytest.fixture
def workers(db_url, tmp_path):
    """Worker processes (tests/proc_worker.py) on the test's journal; all reaped after."""
    pool = proc_worker.Workers(db_url, tmp_path)
    yield pool
    pool.close()


@pytest.fixture
def client(db_url):
    """A JobServer that only submits and reads; the worker processes run the jobs."""
    server = JobServer(db_url, tasks=proc_worker.registry)
    yield server
    server.stop()


@pytest.fixture
def live(db_url):
    """A live server (http_fixtures.launch) on each journal backend."""
    with launch(db_url) as server:
        yield server


@pytest.fixture
def live_sqlite(sqlite_url):
    """A live server on SQLite only."""
    with launch(sqlite_url) as server:
        yield server
