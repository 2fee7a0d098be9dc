"""The dashboard's routes over real HTTP: DELETE /jobs/{id}, POST /jobs/bulk and GET /stats.

Each runs on SQLite and on MariaDB (the `live` fixtures); the query-plan test shows the
overview and the filtered lists read index ranges, not the table."""
import sqlite3
import time

import pytest
from callback_receiver import Receiver
from conftest import wait_for
from http_fixtures import assert_problem, echo, fail, launch, sleep

from jobserver.auth import create_token
from jobserver.ids import lowest_id_at, new_id
from jobserver.journal_drivers import SqliteDialect
from jobserver.journal_sql import Sql
from jobserver.tasks import Registry

# the fixtures' tasks and this module's, in a registry of its own (others assert theirs)
TASKS = Registry()
for _name, _fn in (("t.echo", echo), ("t.sleep", sleep), ("t.fail", fail)):
    TASKS.task(_name)(_fn)


@TASKS.task("t.stepped")
def stepped(ctx, n=2):
    for i in range(n):
        ctx.step(f"s{i}", lambda: i)
    return n


def submit(live, task, token=None, **params):
    response = live.post("/jobs", json={"task": task, "params": params}, token=token)
    assert response.status_code == 202, response.text
    return response.json()["id"]


def wait_state(live, job_id, state, token=None):
    return wait_for(lambda: (job := live.get(f"/jobs/{job_id}", token=token).json())["state"] == state
                    and job, message=f"job {job_id} {state}")


def bulk(live, body, token=None):
    response = live.post("/jobs/bulk", json=body, token=token)
    assert response.status_code == 200, response.text
    return response.json()


@pytest.fixture
def idle(db_url):
    """A server whose jobs are journaled and never run (they stay queued)."""
    with launch(db_url, start=False, tasks=TASKS) as live:
        yield live


@pytest.fixture
def live(db_url):
    with launch(db_url, tasks=TASKS) as server:
        yield server


@pytest.fixture
def live_sqlite(sqlite_url):
    with launch(sqlite_url, tasks=TASKS) as server:
        yield server


# --- DELETE /jobs/{id} ------------------------------------------------------------------
def test_delete_forgets_a_finished_job_with_its_steps_and_deliveries(db_url):
    receiver = Receiver()
    try:
        with launch(db_url, callback_allow=("127.0.0.0/8",), tasks=TASKS) as live:
            response = live.post("/jobs", json={"task": "t.stepped", "callback_url": receiver.url()})
            job_id = response.json()["id"]
            job = wait_state(live, job_id, "succeeded")
            assert [s["name"] for s in job["steps"]] == ["s0", "s1"]
            wait_for(lambda: live.get(f"/jobs/{job_id}").json()["callback"]["state"] == "delivered")
            journal = live.server.journal
            response = live.request("DELETE", f"/jobs/{job_id}")
            assert response.status_code == 204 and response.content == b""
            assert response.headers["X-Request-Id"]
            assert_problem(live.get(f"/jobs/{job_id}"), 404)
            assert journal.get_steps(job_id) == [] and journal.latest_callback(job_id) is None
            assert_problem(live.request("DELETE", f"/jobs/{job_id}"), 404)  # gone: as if never there
    finally:
        receiver.close()


def test_delete_refuses_an_unfinished_job(idle):
    job_id = submit(idle, "t.echo")
    body = assert_problem(idle.request("DELETE", f"/jobs/{job_id}"), 409)
    assert "queued" in body["detail"]
    assert idle.get(f"/jobs/{job_id}").json()["state"] == "queued"
    assert_problem(idle.request("DELETE", "/jobs/not-a-job"), 404)
    assert_problem(idle.request("DELETE", "/jobs/bad%20id"), 404)


def test_delete_is_owner_scoped(live):
    journal = live.server.journal
    alice, bob = create_token(journal, "alice"), create_token(journal, "bob")
    root = create_token(journal, "root", admin=True)
    mine = submit(live, "t.echo", token=alice)
    wait_state(live, mine, "succeeded", token=alice)
    assert_problem(live.request("DELETE", f"/jobs/{mine}", token=bob), 404)
    assert_problem(live.request("DELETE", f"/jobs/{mine}"), 401)
    assert live.request("DELETE", f"/jobs/{mine}", token=root).status_code == 204


# --- POST /jobs/bulk ----------------------------------------------------------------------
def test_bulk_cancel_by_filter_pages_through_with_the_cursor(idle):
    response = idle.post("/jobs", json=[{"task": "t.echo"}] * 1000)
    assert response.status_code == 202
    idle.post("/jobs", json=[{"task": "t.echo"}] * 5 + [{"task": "t.sleep"}] * 3)
    first = bulk(idle, {"action": "cancel", "filter": {"task": "t.echo"}})
    assert first["matched"] == 1000 and first["changed"] == 1000 and first["next"]
    second = bulk(idle, {"action": "cancel", "filter": {"task": "t.echo"}, "cursor": first["next"]})
    assert second == {"matched": 5, "changed": 5, "next": None}
    states = [j["state"] for j in idle.get("/jobs?limit=500").json()["jobs"]]
    assert states[:3] == ["queued"] * 3 and set(states[3:]) == {"cancelled"}
    # cancelled already: matched by the filter, changed by nothing
    assert bulk(idle, {"action": "cancel", "filter": {"state": "cancelled", "task": "t.sleep"}}) == {
        "matched": 0, "changed": 0, "next": None}
    again = bulk(idle, {"action": "cancel", "filter": {"state": "cancelled"}})
    assert again["matched"] == 1000 and again["changed"] == 0


def test_bulk_retry_and_delete_by_state_and_ids(live):
    failed = [submit(live, "t.fail") for _ in range(3)]
    ok = submit(live, "t.echo")
    for job_id in failed:
        wait_state(live, job_id, "failed")
    wait_state(live, ok, "succeeded")
    result = bulk(live, {"action": "retry", "filter": {"state": "failed"}})
    assert result == {"matched": 3, "changed": 3, "next": None}
    for job_id in failed:  # queued again, same id, run again (and failed again)
        wait_for(lambda: live.get(f"/jobs/{job_id}").json()["attempts"] >= 1
                 and live.get(f"/jobs/{job_id}").json()["state"] == "failed")
    result = bulk(live, {"action": "delete", "filter": {"ids": [failed[0], ok, "0" * 36]}})
    assert result == {"matched": 2, "changed": 2, "next": None}
    assert_problem(live.get(f"/jobs/{failed[0]}"), 404)
    assert_problem(live.get(f"/jobs/{ok}"), 404)
    assert live.get(f"/jobs/{failed[1]}").status_code == 200


def test_bulk_acts_on_the_callers_jobs_only(idle):
    journal = idle.server.journal
    alice, bob = create_token(journal, "alice"), create_token(journal, "bob")
    root = create_token(journal, "root", admin=True)
    alices = [submit(idle, "t.echo", token=alice) for _ in range(2)]
    bobs = submit(idle, "t.echo", token=bob)
    assert bulk(idle, {"action": "cancel", "filter": {"ids": alices + [bobs]}}, token=bob) == {
        "matched": 1, "changed": 1, "next": None}
    assert bulk(idle, {"action": "cancel"}, token=alice) == {"matched": 2, "changed": 2, "next": None}
    assert bulk(idle, {"action": "delete", "filter": {"state": "cancelled"}}, token=root)["changed"] == 3
    assert_problem(idle.post("/jobs/bulk", json={"action": "cancel"}), 401)


def test_bulk_queue_filter(idle):
    job_id = submit(idle, "t.echo")
    assert bulk(idle, {"action": "cancel", "filter": {"queue": "mail"}}) == {
        "matched": 0, "changed": 0, "next": None}
    assert bulk(idle, {"action": "cancel", "filter": {"queue": "default"}})["changed"] == 1
    assert idle.get(f"/jobs/{job_id}").json()["state"] == "cancelled"


@pytest.mark.parametrize("body", [
    [], "cancel", {}, {"action": "explode"}, {"action": 1}, {"action": "cancel", "extra": 1},
    {"action": "cancel", "filter": []}, {"action": "cancel", "filter": {"owner": "x"}},
    {"action": "cancel", "filter": {"state": "nope"}}, {"action": "cancel", "filter": {"state": 3}},
    {"action": "cancel", "filter": {"task": ""}}, {"action": "cancel", "filter": {"ids": "a"}},
    {"action": "cancel", "filter": {"ids": ["a b"]}}, {"action": "cancel", "filter": {"ids": ["a"] * 1001}},
    {"action": "cancel", "cursor": "not a cursor"}, {"action": "cancel", "cursor": 5},
])
def test_bulk_refuses_malformed_requests(live_sqlite, body):
    assert_problem(live_sqlite.post("/jobs/bulk", json=body), 400)


def test_bulk_is_not_a_job_id(live_sqlite):
    assert_problem(live_sqlite.get("/jobs/bulk"), 404)


# --- GET /stats ----------------------------------------------------------------------------
def test_stats_counts_series_and_percentiles_owner_scoped(live):
    journal = live.server.journal
    alice, root = create_token(journal, "alice"), create_token(journal, "root", admin=True)
    mine = [submit(live, "t.echo", token=alice) for _ in range(3)] + [submit(live, "t.fail", token=alice)]
    theirs = submit(live, "t.echo", token=root)
    for job_id, state in zip(mine, ["succeeded"] * 3 + ["failed"]):
        wait_state(live, job_id, state, token=alice)
    wait_state(live, theirs, "succeeded", token=root)
    waiting = live.post("/jobs", json={"task": "t.sleep", "params": {"seconds": 30}}, token=alice).json()
    wait_state(live, waiting["id"], "running", token=alice)

    stats = live.get("/stats", token=alice).json()
    assert stats["viewer"] == {"name": "alice", "admin": False}
    assert stats["features"] == {"events": True}  # the streams are served beside it
    assert stats["states"] == {"queued": 0, "running": 1, "waiting": 0}
    assert stats["last_hour"] == {"succeeded": 3, "failed": 1, "cancelled": 0, "submitted": 5}
    assert stats["last_day"] == {"succeeded": 3, "failed": 1, "cancelled": 0}
    assert stats["queues"] == [{"name": "default", "queued": 0, "running": 1, "waiting": 0}]
    minutes = stats["minutes"]
    assert len(minutes["succeeded"]) == 60 and minutes["step_seconds"] == 60
    assert sum(minutes["succeeded"]) == 3 and sum(minutes["failed"]) == 1
    assert minutes["succeeded"][-1] + minutes["succeeded"][-2] == 3  # this minute (or the one before)
    tasks = {t["task"]: t for t in stats["tasks"]}
    assert tasks["t.echo"]["runs"] == 3 and tasks["t.fail"]["failed"] == 1
    assert 0 <= tasks["t.echo"]["run_p50"] <= tasks["t.echo"]["run_p95"] < 5
    assert stats["sample"] == {"runs": 4, "limit": 2000, "complete": True}

    everyone = live.get("/stats", token=root).json()
    assert everyone["viewer"] == {"name": "root", "admin": True}
    assert everyone["last_hour"]["succeeded"] == 4 and everyone["last_hour"]["submitted"] == 6
    assert_problem(live.get("/stats"), 401)
    live.post(f"/jobs/{waiting['id']}/cancel", token=alice)


def test_lowest_id_at_sorts_below_every_later_id():
    now = time.time_ns() // 1_000_000
    made = new_id()
    assert lowest_id_at(now - 1) <= made
    assert lowest_id_at(now + 1000) > made


OVERVIEW = ("stats_unfinished", "stats_unfinished_owner", "stats_finished", "stats_finished_owner",
            "stats_minutes", "stats_minutes_owner", "stats_runs", "stats_runs_owner",
            "stats_submitted", "stats_submitted_owner")


def test_the_overview_and_filtered_lists_read_index_ranges_not_the_table(sqlite_url):
    """What keeps them fast at 10^6 jobs (bench/dashboard_scale.py measures it)."""
    with launch(sqlite_url, start=False, tasks=TASKS):
        pass  # creates and migrates the journal
    conn = sqlite3.connect(sqlite_url.removeprefix("sqlite:///"))
    sql = Sql(SqliteDialect)
    statements = [getattr(sql, name) for name in OVERVIEW]
    # a list or a bulk page filtered by task, with or without owner, state and cursor
    statements += [text for key, text in {**sql.list_sizes, **sql.bulk_page}.items() if key[2]]
    for statement in statements:
        plan = " ".join(row[3] for row in conn.execute(
            "EXPLAIN QUERY PLAN " + statement, [1] * statement.count("?")))
        assert "SCAN jobs" not in plan and "TEMP B-TREE FOR ORDER BY" not in plan, (statement, plan)
    conn.close()
