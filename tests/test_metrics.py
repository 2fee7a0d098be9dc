"""GET /metrics: parsed with prometheus_client's own parsers, against real servers on both
journals. Counters move by exactly the jobs run, every series exists from the start, labels
stay bounded, the gauges come from one covering range of jobs_claim (the plans are checked
on each engine), and only a loopback caller or an admin token may read them."""
import sqlite3
import threading
import time
from urllib.parse import urlparse

import pymysql
import pytest
from callback_receiver import Receiver
from conftest import wait_for
from http_fixtures import PROBLEM, assert_problem, launch
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families

from jobserver import JobServer
from jobserver.auth import create_token
from jobserver.http import create_app
from jobserver.metrics import RUN_BUCKETS, UNKNOWN_TASK
from jobserver.tasks import Registry

TASKS = Registry()
RELEASE = threading.Event()


@TASKS.task("m.ok")
def ok(ctx):
    return 1


@TASKS.task("m.fail", max_retries=1, retry_backoff=0.01, retry_backoff_max=0.01)
def fail(ctx):
    raise RuntimeError("fails every run")


@TASKS.task("m.slow")
def slow(ctx, seconds=5.0):
    ctx.wait(seconds)
    ctx.check_cancelled()
    return seconds


@TASKS.task("m.block")
def block(ctx):
    RELEASE.wait(30)
    return "released"


ENDED = ("succeeded", "failed", "cancelled")
FORBIDDEN_LABELS = {"id", "job_id", "owner", "host", "hostname", "pid", "node", "node_id", "instance"}
PROMETHEUS_ACCEPT = ("application/openmetrics-text;version=1.0.0;q=0.5,application/openmetrics-text;"
                     "version=0.0.1;q=0.4,text/plain;version=0.0.4;q=0.3,*/*;q=0.2")


class Scrape:
    """One /metrics answer, parsed: value(name, **labels) of a sample, 0 never assumed."""

    def __init__(self, text):
        self.text = text
        self.families = {f.name: f for f in text_string_to_metric_families(text)}
        self.samples = [s for f in self.families.values() for s in f.samples]

    def value(self, name, **labels):
        found = [s.value for s in self.samples if s.name == name and s.labels == labels]
        assert len(found) == 1, f"{name}{labels}: {len(found)} samples"
        return found[0]

    def series(self, name):
        return {tuple(sorted(s.labels.items())): s.value for s in self.samples if s.name == name}


def scrape(live, **kwargs):
    response = live.get("/metrics", **kwargs)
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    assert response.headers["Cache-Control"] == "no-store"
    return Scrape(response.text)


def _submit(live, task, **spec):
    response = live.post("/jobs", json=dict(spec, task=task))
    assert response.status_code == 202, response.text
    return response.json()["id"]


# --- counters ---------------------------------------------------------------------------
def test_every_series_exists_from_the_start(sqlite_url):
    with launch(sqlite_url, tasks=TASKS) as live:
        first = scrape(live)
    for task in [spec.name for spec in TASKS] + [UNKNOWN_TASK]:
        for name in ("jobserver_jobs_submitted_total", "jobserver_jobs_started_total",
                     "jobserver_jobs_retried_total"):
            assert first.value(name, task=task) == 0
        for state in ENDED:
            assert first.value("jobserver_jobs_finished_total", task=task, state=state) == 0
        for name in ("jobserver_job_run_seconds", "jobserver_job_queue_wait_seconds"):
            assert first.value(name + "_count", task=task) == 0
            buckets = {s.labels["le"] for s in first.samples if s.name == name + "_bucket"
                       and s.labels["task"] == task}
            assert float(max(buckets - {"+Inf"}, key=float)) == RUN_BUCKETS[-1] == 3600
    for outcome in ("requeued", "failed"):
        assert first.value("jobserver_jobs_recovered_total", outcome=outcome) == 0
    for outcome in ("delivered", "retrying", "failed"):
        assert first.value("jobserver_callback_deliveries_total", outcome=outcome) == 0
    for state in ("queued", "running"):
        assert first.value("jobserver_jobs", queue="default", state=state) == 0
    assert first.value("jobserver_oldest_queued_job_age_seconds", queue="default") == 0
    assert first.value("jobserver_event_streams_open") == 0
    assert first.value("jobserver_worker_threads") == 2
    assert first.value("jobserver_worker_threads_busy") == 0


def test_counters_move_by_exactly_the_jobs_run(db_url):
    """7 succeed, 2 fail (each after one retry), 1 is cancelled before it starts."""
    with launch(db_url, tasks=TASKS) as live:
        before = scrape(live)
        ids = [_submit(live, "m.ok") for _ in range(7)] + [_submit(live, "m.fail") for _ in range(2)]
        cancelled = _submit(live, "m.slow", delay=600)
        assert live.post(f"/jobs/{cancelled}/cancel").status_code == 202
        ids.append(cancelled)

        def ended():
            now = scrape(live)
            return now if sum(now.value("jobserver_jobs_finished_total", task=t, state=s)
                              for t in ("m.ok", "m.fail", "m.slow") for s in ENDED) == 10 else None
        after = wait_for(ended, timeout=30, message="10 jobs finished in the metrics")
        time.sleep(0.2)  # nothing more may come: the counts are exact, not at least
        after = scrape(live)

    def moved(name, **labels):
        return after.value(name, **labels) - before.value(name, **labels)

    expected_finished = {("m.ok", "succeeded"): 7, ("m.fail", "failed"): 2, ("m.slow", "cancelled"): 1}
    for task in ("m.ok", "m.fail", "m.slow", "m.block", UNKNOWN_TASK):
        for state in ENDED:
            assert moved("jobserver_jobs_finished_total", task=task, state=state) == \
                expected_finished.get((task, state), 0), (task, state)
    submitted = {"m.ok": 7, "m.fail": 2, "m.slow": 1}
    started = {"m.ok": 7, "m.fail": 4}  # each failing job ran twice
    for task in ("m.ok", "m.fail", "m.slow", "m.block", UNKNOWN_TASK):
        assert moved("jobserver_jobs_submitted_total", task=task) == submitted.get(task, 0)
        assert moved("jobserver_jobs_started_total", task=task) == started.get(task, 0)
        assert moved("jobserver_jobs_retried_total", task=task) == (2 if task == "m.fail" else 0)
        # one run-time and one queue-wait observation per run, each in its +Inf bucket
        for histogram in ("jobserver_job_run_seconds", "jobserver_job_queue_wait_seconds"):
            assert moved(histogram + "_count", task=task) == started.get(task, 0)
            assert moved(histogram + "_bucket", task=task, le="+Inf") == started.get(task, 0)
    assert after.value("jobserver_job_run_seconds_sum", task="m.ok") < 7 * 5  # seconds, not ms
    for outcome in ("requeued", "failed"):
        assert moved("jobserver_jobs_recovered_total", outcome=outcome) == 0
    assert after.value("jobserver_http_requests_total", route="/jobs", method="POST", status="202") == 10
    assert after.value("jobserver_http_requests_total", route="/jobs/<job_id>/cancel", method="POST",
                       status="202") == 1
    # group commit: batches observed, and at least one write per submit, claim and finish
    assert moved("jobserver_journal_commit_seconds_count") >= 1
    assert moved("jobserver_journal_operations_total") >= 10
    _assert_bounded_labels(after, ids)


def _assert_bounded_labels(scraped, job_ids):
    known = {spec.name for spec in TASKS} | {UNKNOWN_TASK}
    values = set()
    for sample in scraped.samples:
        assert not FORBIDDEN_LABELS & set(sample.labels), sample
        values |= set(sample.labels.values())
        if "task" in sample.labels:
            assert sample.labels["task"] in known, sample
    assert not values & set(job_ids)
    assert not any(job_id in scraped.text for job_id in job_ids)


def test_a_task_this_server_does_not_know_is_no_label(sqlite_url):
    """Another process submitted it (its registry has the task); this one claims the job,
    fails it as an unknown task, and counts it under the unknown task's label."""
    other = Registry()
    other.task("secret.report")(lambda ctx: None)
    submitter = JobServer(sqlite_url, tasks=other)  # never started: it only journals
    try:
        job_id = submitter.submit("secret.report")
    finally:
        submitter.stop()
    with launch(sqlite_url, tasks=TASKS) as live:
        wait_for(lambda: live.get(f"/jobs/{job_id}").json()["state"] == "failed")
        after = wait_for(lambda: (s := scrape(live)).value(
            "jobserver_jobs_finished_total", task=UNKNOWN_TASK, state="failed") == 1 and s)
    assert "secret.report" not in after.text
    assert after.value("jobserver_jobs_started_total", task=UNKNOWN_TASK) == 1
    _assert_bounded_labels(after, [job_id])


def test_a_task_registered_after_the_start_gets_its_series(sqlite_url):
    tasks = Registry()
    tasks.task("late.first")(lambda ctx: 1)
    with launch(sqlite_url, tasks=tasks) as live:
        tasks.task("late.second")(lambda ctx: 2)
        job_id = _submit(live, "late.second")
        assert live.get(f"/jobs/{job_id}?wait=10").json()["state"] == "succeeded"
        after = wait_for(lambda: (s := scrape(live)).value(
            "jobserver_jobs_finished_total", task="late.second", state="succeeded") == 1 and s)
    assert after.value("jobserver_jobs_submitted_total", task="late.second") == 1


@pytest.mark.parametrize("max_crashes, outcome", [(3, "requeued"), (1, "failed")])
def test_recovered_jobs_are_counted(sqlite_url, max_crashes, outcome):
    """A job whose lease expired under a process that is gone is recovered at start."""
    with launch(sqlite_url, tasks=TASKS, start=False) as live:
        job_id = _submit(live, "m.ok")
        [claimed] = live.server.journal.claim("a-node-that-died", 1, lease_ms=1)
        assert claimed.id == job_id
    time.sleep(0.05)
    with launch(sqlite_url, tasks=TASKS, max_crashes=max_crashes) as live:
        final = "succeeded" if outcome == "requeued" else "failed"
        wait_for(lambda: live.get(f"/jobs/{job_id}").json()["state"] == final)
        after = wait_for(lambda: (s := scrape(live)).value(
            "jobserver_jobs_recovered_total", outcome=outcome) == 1 and s)
        assert after.value("jobserver_jobs_recovered_total",
                           outcome={"requeued": "failed", "failed": "requeued"}[outcome]) == 0


def test_callback_deliveries_by_outcome(sqlite_url):
    receiver = Receiver()
    receiver.respond((500,), (200,), (410,))
    try:
        with launch(sqlite_url, tasks=TASKS, callback_allow=("127.0.0.0/8",), callback_attempts=3,
                    callback_backoff=0.05) as live:
            first = _submit(live, "m.ok", callback_url=receiver.url())
            wait_for(lambda: live.get(f"/jobs/{first}").json()["callback"]["state"] == "delivered")
            second = _submit(live, "m.ok", callback_url=receiver.url())
            wait_for(lambda: live.get(f"/jobs/{second}").json()["callback"]["state"] == "failed")
            after = wait_for(lambda: (s := scrape(live)).value(
                "jobserver_callback_deliveries_total", outcome="failed") == 1 and s)
    finally:
        receiver.close()
    assert after.value("jobserver_callback_deliveries_total", outcome="retrying") == 1
    assert after.value("jobserver_callback_deliveries_total", outcome="delivered") == 1


# --- HTTP requests --------------------------------------------------------------------------
def test_requests_are_counted_by_rule_never_by_path(sqlite_url):
    with launch(sqlite_url, tasks=TASKS, start=False) as live:
        asked = [f"0190aaaa-0000-7000-8000-00000000000{i}" for i in range(3)]
        for job_id in asked:
            assert live.get(f"/jobs/{job_id}").status_code == 404
        assert live.get("/no/such/path/4711").status_code == 404
        assert live.request("BREW", "/jobs").status_code == 405
        after = scrape(live)
    assert after.value("jobserver_http_requests_total", route="/jobs/<job_id>", method="GET",
                       status="404") == 3
    assert after.value("jobserver_http_requests_total", route="unmatched", method="unmatched",
                       status="404") == 1
    assert after.value("jobserver_http_requests_total", route="unmatched", method="unmatched",
                       status="405") == 1
    assert "4711" not in after.text and "BREW" not in after.text
    _assert_bounded_labels(after, asked)


# --- gauges -----------------------------------------------------------------------------
def test_gauges_count_queued_jobs_and_the_oldest_due(db_url):
    with launch(db_url, tasks=TASKS, start=False) as live:
        live.server.metrics.live.ttl = 0  # read the journal at every scrape
        _submit(live, "m.ok", delay=3600)  # queued but not due: no age
        idle = scrape(live)
        assert idle.value("jobserver_jobs", queue="default", state="queued") == 1
        assert idle.value("jobserver_oldest_queued_job_age_seconds", queue="default") == 0
        _submit(live, "m.ok")
        _submit(live, "m.ok")
        first = scrape(live)
        time.sleep(0.5)
        later = scrape(live)
    assert first.value("jobserver_jobs", queue="default", state="queued") == 3
    assert first.value("jobserver_jobs", queue="default", state="running") == 0
    young = first.value("jobserver_oldest_queued_job_age_seconds", queue="default")
    old = later.value("jobserver_oldest_queued_job_age_seconds", queue="default")
    assert 0 <= young < 30
    assert old - young >= 0.4  # seconds of the journal's clock


def test_gauges_count_running_jobs_and_busy_threads(db_url):
    RELEASE.clear()
    try:
        with launch(db_url, tasks=TASKS) as live:
            live.server.metrics.live.ttl = 0
            job_id = _submit(live, "m.block")
            # the journal holds the claim a moment before the pool's thread takes the job
            busy = wait_for(lambda: (s := scrape(live)).value(
                "jobserver_jobs", queue="default", state="running") == 1
                and s.value("jobserver_worker_threads_busy") == 1 and s)
            assert busy.value("jobserver_jobs", queue="default", state="queued") == 0
            RELEASE.set()
            assert live.get(f"/jobs/{job_id}?wait=10").json()["state"] == "succeeded"
            wait_for(lambda: scrape(live).value("jobserver_worker_threads_busy") == 0)
    finally:
        RELEASE.set()


def test_gauges_are_kept_between_scrapes(sqlite_url):
    with launch(sqlite_url, tasks=TASKS, start=False) as live:
        live.server.metrics.live.ttl = 3600
        assert scrape(live).value("jobserver_jobs", queue="default", state="queued") == 0
        _submit(live, "m.ok")
        assert scrape(live).value("jobserver_jobs", queue="default", state="queued") == 0  # cached
        live.server.metrics.live.ttl = 0
        assert scrape(live).value("jobserver_jobs", queue="default", state="queued") == 1


def test_a_journal_that_cannot_answer_leaves_its_gauges_out(sqlite_url):
    server = JobServer(sqlite_url, tasks=TASKS, workers=1)
    client = create_app(server).test_client()
    server.metrics.live.ttl = 0
    server.stop()  # the journal is closed: its counts cannot be read
    response = client.get("/metrics")
    assert response.status_code == 200
    scraped = Scrape(response.get_data(as_text=True))
    assert "jobserver_jobs" in scraped.families  # described, without a stale number
    assert not scraped.series("jobserver_jobs")
    assert not scraped.series("jobserver_oldest_queued_job_age_seconds")
    assert scraped.value("jobserver_jobs_submitted_total", task="m.ok") == 0


def _fill(server, db_url, finished=3000, queued=40, running=5):
    """A journal holding mostly finished jobs (as in production) and a few unfinished."""
    specs = [{"task": "m.ok"}] * 1000
    for _ in range((finished + queued + running) // 1000 + 1):
        server.submit_many(specs)
    with server.journal.transaction() as tx:
        tx.cursor.execute("UPDATE jobs SET state = 'succeeded', finished_at = created_at")
    with server.journal.transaction() as tx:
        tx.cursor.execute(f"UPDATE jobs SET state = 'queued', finished_at = NULL WHERE id IN "
                   f"(SELECT id FROM (SELECT id FROM jobs ORDER BY id LIMIT {queued + running}) AS few)")
        tx.cursor.execute(f"UPDATE jobs SET state = 'running' WHERE id IN "
                   f"(SELECT id FROM (SELECT id FROM jobs ORDER BY id LIMIT {running}) AS few)")
    if db_url.startswith("sqlite"):
        _sqlite(db_url).execute("ANALYZE")
    else:
        with _mysql(db_url).cursor() as cur:
            cur.execute("ANALYZE TABLE jobs")
            cur.fetchall()


def _sqlite(db_url):
    return sqlite3.connect(db_url[len("sqlite:///"):])


def _mysql(db_url):
    p = urlparse(db_url)
    return pymysql.connect(host=p.hostname, port=p.port or 3306, user=p.username,
                           password=p.password or "", database=p.path.lstrip("/"), autocommit=True)


def test_the_gauges_read_one_range_of_the_claim_index(db_url):
    """No COUNT(*) over the table: the plan is a range of jobs_claim, covering (no row read)."""
    server = JobServer(db_url, tasks=TASKS)
    try:
        _fill(server, db_url)
        counts = server.journal.job_gauges()
        sql = server.journal.sql.job_gauges
    finally:
        server.stop()
    assert {state.value: count for state, (count, _age) in counts.items()} == {"queued": 40, "running": 5}
    if db_url.startswith("sqlite"):
        plan = [row[-1] for row in _sqlite(db_url).execute("EXPLAIN QUERY PLAN " + sql)]
        assert plan == ["SEARCH jobs USING COVERING INDEX jobs_claim (state=?)"], plan
    else:
        with _mysql(db_url).cursor(pymysql.cursors.DictCursor) as cur:
            cur.execute("EXPLAIN " + sql)
            [plan] = cur.fetchall()
        assert plan["key"] == "jobs_claim", plan
        assert plan["type"] == "range", plan
        # covering: the rows are not read (the estimate of `rows` counts index entries that
        # purge has not removed yet, so it says little right after the UPDATEs above)
        assert "Using index" in (plan["Extra"] or ""), plan


# --- streams hook -----------------------------------------------------------------------
def test_the_event_streams_gauge_follows_the_hook(sqlite_url):
    with launch(sqlite_url, tasks=TASKS, start=False) as live:
        metrics = live.server.metrics
        metrics.stream_opened()
        assert scrape(live).value("jobserver_event_streams_open") == 1
        with metrics.streaming():
            assert scrape(live).value("jobserver_event_streams_open") == 2
        metrics.stream_closed()
        assert scrape(live).value("jobserver_event_streams_open") == 0
        slots = [3]
        metrics.add_open_streams(lambda: slots[0])  # read at the scrape: an Api's slots in use
        assert scrape(live).value("jobserver_event_streams_open") == 3
        slots[0] = 1
        with metrics.streaming():
            assert scrape(live).value("jobserver_event_streams_open") == 2


# --- formats ----------------------------------------------------------------------------
def test_openmetrics_when_accept_asks_for_it(sqlite_url):
    with launch(sqlite_url, tasks=TASKS) as live:
        _submit(live, "m.ok")
        response = live.get("/metrics", headers={"Accept": PROMETHEUS_ACCEPT})
        plain = live.get("/metrics", headers={"Accept": "text/plain"})
        odd = live.get("/metrics", headers={"Accept": "application/openmetrics-text; version=x.y"})
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("application/openmetrics-text; version=1.0.0")
    assert response.text.endswith("# EOF\n")
    families = {f.name: f for f in parse_openmetrics(response.text)}
    assert families["jobserver_jobs_submitted"].type == "counter"
    assert families["jobserver_job_run_seconds"].type == "histogram"
    assert families["jobserver_jobs"].type == "gauge"
    assert plain.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    assert "# EOF" not in plain.text
    # prometheus_client 0.26 raises on a version it cannot compare: the plain format, no 500
    assert odd.status_code == 200 and odd.headers["Content-Type"].startswith("text/plain")


# --- who may read -----------------------------------------------------------------------
def _get(client, remote, token=None, **headers):
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return client.get("/metrics", headers=headers, environ_base={"REMOTE_ADDR": remote})


class _Answer:
    """A Flask test response as http_fixtures.assert_problem reads a requests one."""

    def __init__(self, response):
        self.status_code = response.status_code
        self.headers = response.headers
        self.text = response.get_data(as_text=True)
        self.json = response.get_json

    def __repr__(self):
        return f"<{self.status_code} {self.text}>"


def test_a_remote_caller_needs_an_admin_token(sqlite_url):
    server = JobServer(sqlite_url, tasks=TASKS, workers=1)
    try:
        admin = create_token(server.journal, "ops", admin=True)
        user = create_token(server.journal, "alice")
        client = create_app(server).test_client()
        for loopback in ("127.0.0.1", "::1", "::ffff:127.0.0.1", "127.0.0.2"):
            assert _get(client, loopback).status_code == 200, loopback
        refused = _Answer(_get(client, "10.1.2.3"))
        assert_problem(refused, 401)
        assert refused.headers["WWW-Authenticate"].startswith("Bearer")
        assert_problem(_Answer(_get(client, "10.1.2.3", "not-a-token")), 401)
        body = assert_problem(_Answer(_get(client, "10.1.2.3", user)), 403)
        assert "admin" in body["detail"]
        assert _get(client, "10.1.2.3", admin).status_code == 200
        assert _get(client, "192.168.1.5", admin).headers["Content-Type"].startswith("text/plain")
        # a proxy on this machine makes every caller loopback: forwarded means remote
        assert_problem(_Answer(_get(client, "127.0.0.1", **{"X-Forwarded-For": "203.0.113.9"})), 401)
        assert_problem(_Answer(_get(client, "127.0.0.1", Forwarded="for=203.0.113.9")), 401)
        assert _get(client, "127.0.0.1", admin, **{"X-Forwarded-For": "203.0.113.9"}).status_code == 200
    finally:
        server.stop()


def test_in_open_mode_only_loopback_callers_read_metrics(sqlite_url):
    server = JobServer(sqlite_url, tasks=TASKS, workers=1)
    try:
        client = create_app(server).test_client()
        assert _get(client, "127.0.0.1").status_code == 200
        refused = _get(client, "10.1.2.3")
        assert refused.status_code == 403
        assert refused.headers["Content-Type"] == PROBLEM
    finally:
        server.stop()


def test_metrics_over_a_real_socket_from_loopback(sqlite_url):
    with launch(sqlite_url, tasks=TASKS) as live:
        create_token(live.server.journal, "ops", admin=True)  # token mode: loopback still reads
        time.sleep(1.1)  # the authenticator's open-mode cache
        assert live.get("/jobs").status_code == 401
        assert scrape(live).value("jobserver_worker_threads") == 2
