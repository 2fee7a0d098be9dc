"""The dashboard in a real headless Chromium (Debian's), driven by Playwright, against a real
server (JobServer + waitress on a free port). One browser for the module; each test has its
own server and a fresh browser context (so a fresh sessionStorage), and fails on any console
error or uncaught exception in the page."""
import os
import re
import shutil
import threading

import pytest
import requests
from http_fixtures import echo, fail, launch, sleep

from jobserver.auth import create_token
from jobserver.dashboard import CSP
from jobserver.tasks import Registry

CHROMIUM = os.environ.get("JOBSERVER_TEST_CHROMIUM", "/usr/bin/chromium")
INSTALL = "apt-get update && apt-get install -y chromium && pip install -e '.[test]'"

# the fixtures' tasks and this module's, in a registry of its own (others assert theirs)
TASKS = Registry()
for _name, _fn in (("t.echo", echo), ("t.sleep", sleep), ("t.fail", fail)):
    TASKS.task(_name)(_fn)
_flaky_runs = {}
_flaky_lock = threading.Lock()


@TASKS.task("ui.progress")
def progress_task(ctx, parts=6, seconds=0.4):
    """Reports progress over parts * seconds, one checkpointed step per part."""
    ctx.progress(0, parts, "starting")
    for i in range(1, parts + 1):
        ctx.step(f"part-{i}", ctx.wait, seconds)
        ctx.progress(i, parts, f"part {i} of {parts}")
    return {"parts": parts}


@TASKS.task("ui.flaky")
def flaky(ctx, message="first run fails"):
    """Fails its first run, succeeds when run again (a retry request resets attempts, so
    the runs are counted here)."""
    with _flaky_lock:
        runs = _flaky_runs[ctx.job_id] = _flaky_runs.get(ctx.job_id, 0) + 1
    if runs == 1:
        raise RuntimeError(message)
    return {"runs": runs}


def _playwright():
    """sync_playwright, or a skip (a failure under CI) naming the install command."""
    reason = None
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        reason = "Playwright for Python is not installed"
    if reason is None and not (os.path.exists(CHROMIUM) or shutil.which("chromium")):
        reason = f"no Chromium at {CHROMIUM}"
    if reason is not None:
        message = f"{reason}: {INSTALL}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return sync_playwright


@pytest.fixture(scope="module")
def browser():
    sync_playwright = _playwright()
    path = CHROMIUM if os.path.exists(CHROMIUM) else shutil.which("chromium")
    with sync_playwright() as p:
        instance = p.chromium.launch(executable_path=path, args=["--no-sandbox"])
        yield instance
        instance.close()


class Page:
    """A browser tab on a live server's dashboard that records console errors."""

    def __init__(self, browser, live, token=None, width=1280, height=900):
        self.live = live
        self.context = browser.new_context(viewport={"width": width, "height": height})
        if token is not None:  # as if typed into the token field earlier in this tab
            self.context.add_init_script(f"sessionStorage.setItem('jobserver.token', {token!r})")
        self.page = self.context.new_page()
        self.page.set_default_timeout(10_000)
        self.errors = []
        self.dialogs = []
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        self.page.on("pageerror", lambda exc: self.errors.append(f"pageerror: {exc}"))
        self.page.on("dialog", lambda d: (self.dialogs.append(d.message), d.dismiss()))
        self.page.goto(live.url("/"))

    def close(self):
        self.context.close()


@pytest.fixture
def tabs(browser):
    """Open dashboard tabs with `tabs(live, token=None)`; each must end with no console error."""
    opened = []

    def open_tab(live, token=None, **kwargs):
        tab = Page(browser, live, token, **kwargs)
        opened.append(tab)
        return tab
    yield open_tab
    errors = [e for tab in opened for e in tab.errors]
    for tab in opened:
        tab.close()
    assert errors == [], f"console errors: {errors}"


def submit(live, task, params=None, token=None):
    response = live.post("/jobs", json={"task": task, "params": params or {}}, token=token)
    assert response.status_code == 202, response.text
    return response.json()["id"]


def state_of(live, job_id, token=None):
    return live.get(f"/jobs/{job_id}", token=token).json()["state"]


def row(page, job_id):
    return page.locator(f'#job-rows tr[data-id="{job_id}"]')


def expect():
    from playwright.sync_api import expect as playwright_expect
    return playwright_expect


# --- the page itself -----------------------------------------------------------------------
def test_page_and_files_carry_a_strict_policy_and_revalidate(sqlite_url):
    with launch(sqlite_url, url_prefix="/q", start=False, tasks=TASKS) as live:
        page = requests.get(live.url("/"), timeout=10)
        assert page.status_code == 200 and page.headers["Content-Type"] == "text/html; charset=utf-8"
        assert page.headers["Content-Security-Policy"] == CSP
        assert "script-src 'self';" in CSP and "unsafe-inline" not in CSP
        assert page.headers["X-Content-Type-Options"] == "nosniff"
        assert page.headers["Cache-Control"] == "no-cache" and page.headers["ETag"]
        assert "<script src=\"ui/app.js\" defer></script>" in page.text and " style=" not in page.text
        again = requests.get(live.url("/"), headers={"If-None-Match": page.headers["ETag"]}, timeout=10)
        assert again.status_code == 304
        for name, kind in (("app.js", "text/javascript"), ("app.css", "text/css"),
                           ("favicon.svg", "image/svg+xml")):
            asset = requests.get(live.url("/ui/" + name), timeout=10)
            assert asset.status_code == 200 and asset.headers["Content-Type"].startswith(kind)
            assert asset.headers["X-Content-Type-Options"] == "nosniff"
        assert requests.get(live.url("/ui/secret.py"), timeout=10).status_code == 404
        assert requests.get(live.url("/ui/../journal.py"), timeout=10).status_code == 404
        assert requests.get(live.base + "/static/app.js", timeout=10).status_code == 404
        script = requests.get(live.url("/ui/app.js"), timeout=10).text
        assert "innerHTML" not in script and "localStorage" not in script and "eval(" not in script


def test_no_token_needed_for_the_page_but_for_the_api(sqlite_url):
    with launch(sqlite_url, start=False, tasks=TASKS) as live:
        create_token(live.server.journal, "alice")
        assert requests.get(live.url("/"), timeout=10).status_code == 200
        assert requests.get(live.url("/stats"), timeout=10).status_code == 401


# --- in the browser ------------------------------------------------------------------------
def test_a_submitted_job_appears_its_progress_moves_and_its_steps_show(sqlite_url, tabs):
    # no stream slot: the page is refused its event stream and polls (test_dashboard_events.py
    # has the page on its stream)
    with launch(sqlite_url, tasks=TASKS, stream_slots=0) as live:
        tab = tabs(live)
        page = tab.page
        expect()(page.locator("#live")).to_have_attribute("data-mode", "polling")
        first = submit(live, "ui.progress", {"parts": 8, "seconds": 0.5})  # as curl would
        expect()(row(page, first)).to_be_visible()  # no reload: the list polls
        row(page, first).locator("a.task-name").click()
        expect()(page.locator("#job-task")).to_have_text("ui.progress")
        widths = set()
        bar = page.locator("#job-progress .bar > span")
        for _ in range(60):  # the bar while the job runs (~4 s)
            widths.add(float(bar.evaluate("el => el.style.width").rstrip("%") or 0))
            if page.locator("#job-state .badge").get_attribute("data-state") == "succeeded":
                break
            page.wait_for_timeout(100)
        expect()(page.locator("#job-state .badge")).to_have_attribute("data-state", "succeeded")
        assert len([w for w in widths if 0 < w < 100]) >= 2, widths  # seen moving, not just 0 and 100
        assert float(bar.evaluate("el => el.style.width").rstrip("%")) == 100
        timeline = page.locator("#timeline")
        for i in range(1, 9):
            expect()(timeline).to_contain_text(f"Step part-{i}")
        expect()(page.locator("#job-result")).to_contain_text('"parts": 8')
        # back on the list, a new job is announced, not pushed under the reader's cursor
        page.locator("a.back").click()
        expect()(row(page, first)).to_be_visible()
        second = submit(live, "t.echo", {"n": 2})
        banner = page.locator("#new-banner")
        expect()(banner).to_have_text("1 new job — show")
        assert page.locator("#job-rows tr").first.get_attribute("data-id") == first
        banner.click()
        expect()(page.locator("#job-rows tr").first).to_have_attribute("data-id", second)
        expect()(banner).to_be_hidden()


def test_the_cancel_button_cancels_a_running_job_under_a_url_prefix(sqlite_url, tabs):
    with launch(sqlite_url, url_prefix="/q", tasks=TASKS) as live:
        job_id = submit(live, "t.sleep", {"seconds": 30})
        tab = tabs(live)
        page = tab.page
        page.goto(live.url(f"/#/jobs/{job_id}"))
        expect()(page.locator("#job-state .badge")).to_have_attribute("data-state", "running")
        page.locator("#act-cancel").click()
        expect()(page.locator("#job-state .badge")).to_have_attribute("data-state", "cancelled")
        assert state_of(live, job_id) == "cancelled"
        expect()(page.locator("#act-retry")).to_be_enabled()
        expect()(page.locator("#act-cancel")).to_be_disabled()


def test_a_failed_jobs_traceback_shows_and_retry_runs_it_again(sqlite_url, tabs):
    with launch(sqlite_url, tasks=TASKS) as live:
        job_id = submit(live, "ui.flaky", {"message": "<b>not bold</b> first run fails"})
        tab = tabs(live)
        page = tab.page
        page.goto(live.url(f"/#/jobs/{job_id}"))
        expect()(page.locator("#job-state .badge")).to_have_attribute("data-state", "failed")
        expect()(page.locator("#error-summary")).to_have_text("RuntimeError: <b>not bold</b> first run fails")
        trace = page.locator("#error-trace")
        expect()(trace).to_contain_text("Traceback (most recent call last)")
        expect()(trace).to_contain_text("RuntimeError")
        assert page.locator("#error-summary b").count() == 0  # text, not markup
        page.locator("#act-retry").click()
        expect()(page.locator("#job-state .badge")).to_have_attribute("data-state", "succeeded")
        expect()(page.locator("#job-result")).to_contain_text('"runs": 2')
        expect()(page.locator("#error-panel")).to_be_hidden()


def test_params_holding_html_render_as_text(sqlite_url, tabs):
    payload = "<img src=x onerror=alert(1)>"
    with launch(sqlite_url, tasks=TASKS) as live:
        job_id = submit(live, "t.echo", {payload: payload, "nested": [payload]})
        tab = tabs(live)
        page = tab.page
        expect()(row(page, job_id)).to_be_visible()
        page.goto(live.url(f"/#/jobs/{job_id}"))
        expect()(page.locator("#job-state .badge")).to_have_attribute("data-state", "succeeded")
        expect()(page.locator("#job-params")).to_contain_text(payload)
        expect()(page.locator("#job-result")).to_contain_text(payload)
        assert page.locator("img").count() == 0
        page.wait_for_timeout(300)
        assert tab.dialogs == []


def test_delete_and_bulk_actions_from_the_page(sqlite_url, tabs):
    with launch(sqlite_url, workers=1, tasks=TASKS) as live:
        done = [submit(live, "t.echo", {"i": i}) for i in range(3)]
        blocker = submit(live, "t.sleep", {"seconds": 30})
        queued = [submit(live, "t.sleep", {"seconds": 30}) for _ in range(2)]
        tab = tabs(live)
        page = tab.page
        expect()(row(page, blocker).locator(".badge")).to_have_attribute("data-state", "running")
        # the two queued ones, picked by hand: cancel them
        for job_id in queued:
            row(page, job_id).locator("input[type=checkbox]").check()
        expect()(page.locator("#bulk-scope")).to_have_text("Act on 2 selected jobs")
        page.locator("[data-bulk=cancel]").click()
        expect()(page.locator("#confirm")).to_be_visible()
        expect()(page.locator("#confirm-title")).to_have_text("Cancel 2 selected jobs?")
        page.locator("#confirm-yes").click()
        expect()(page.locator("#notice")).to_have_text("2 of 2 matching jobs cancelled.")
        assert [state_of(live, j) for j in queued] == ["cancelled", "cancelled"]
        assert state_of(live, blocker) == "running"
        # every succeeded job, by filter: delete them
        page.locator("#f-state").select_option("succeeded")
        expect()(page.locator("#job-rows tr")).to_have_count(3)
        page.locator("[data-bulk=delete]").click()
        expect()(page.locator("#confirm-title")).to_have_text("Delete every job matching state succeeded?")
        page.locator("#confirm-yes").click()
        expect()(page.locator("#notice")).to_have_text("3 of 3 matching jobs deleted.")
        expect()(page.locator("#jobs-empty")).to_be_visible()
        assert all(live.get(f"/jobs/{j}").status_code == 404 for j in done)
        # one job, from its page: delete a cancelled one
        page.goto(live.url(f"/#/jobs/{queued[0]}"))
        expect()(page.locator("#job-state .badge")).to_have_attribute("data-state", "cancelled")
        page.locator("#act-delete").click()
        page.locator("#confirm-yes").click()
        expect()(page.locator("#notice")).to_have_text(f"Job {queued[0]} deleted.")
        assert live.get(f"/jobs/{queued[0]}").status_code == 404
        assert re.search(r"#/$", page.url)
        live.post(f"/jobs/{blocker}/cancel")


def test_an_owner_sees_only_its_jobs_and_an_admin_sees_all(sqlite_url, tabs):
    with launch(sqlite_url, tasks=TASKS) as live:
        journal = live.server.journal
        alice, bob = create_token(journal, "alice"), create_token(journal, "bob")
        root = create_token(journal, "root", admin=True)
        alices = submit(live, "t.echo", {"who": "alice"}, token=alice)
        bobs = submit(live, "t.echo", {"who": "bob"}, token=bob)
        # alice's tab holds her token already; then root's is typed into the field
        tab = tabs(live, token=alice)
        page = tab.page
        expect()(row(page, alices)).to_be_visible()
        expect()(page.locator("#viewer")).to_have_text("alice")
        assert row(page, bobs).count() == 0
        expect()(page.locator("#job-rows tr")).to_have_count(1)
        expect()(page.locator("th.c-owner")).to_be_hidden()
        stored = page.evaluate("[sessionStorage.getItem('jobserver.token'), localStorage.length, location.href]")
        assert stored[0] == alice and stored[1] == 0 and alice not in stored[2]
        page.locator("#token-toggle").click()
        page.locator("#token-input").fill(root)
        page.locator("#token-form button[type=submit]").click()
        expect()(row(page, bobs)).to_be_visible()
        expect()(row(page, alices)).to_be_visible()
        expect()(page.locator("#viewer")).to_contain_text("root")
        expect()(row(page, bobs).locator(".c-owner")).to_have_text("bob")
        assert page.evaluate("sessionStorage.getItem('jobserver.token')") == root


def test_narrow_screen_keeps_the_essentials(sqlite_url, tabs):
    with launch(sqlite_url, tasks=TASKS) as live:
        job_id = submit(live, "t.echo", {"small": True})
        tab = tabs(live, width=420, height=860)
        page = tab.page
        expect()(row(page, job_id)).to_be_visible()
        assert page.evaluate("document.documentElement.scrollWidth") <= 420
        expect()(row(page, job_id).locator(".c-created")).to_be_hidden()
        page.goto(live.url(f"/#/jobs/{job_id}"))
        expect()(page.locator("#job-state .badge")).to_have_attribute("data-state", "succeeded")
        assert page.evaluate("document.documentElement.scrollWidth") <= 420
