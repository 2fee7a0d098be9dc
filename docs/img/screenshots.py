"""Make docs/img/dashboard-*.png: a journal with a day of history, a few live jobs, Chromium.

    .venv/bin/python docs/img/screenshots.py [--out docs/img] [--width 1280]

Needs Playwright for Python and /usr/bin/chromium (as the browser tests do)."""
import argparse
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

from http_fixtures import launch  # noqa: E402
from playwright.sync_api import sync_playwright  # noqa: E402

from bench.dashboard_scale import fill  # noqa: E402
from jobserver.auth import create_token  # noqa: E402
from jobserver.tasks import Registry  # noqa: E402

TASKS = Registry()


@TASKS.task("reports.build", max_retries=2)
def build(ctx, month, rows=1200):
    for name, seconds in (("load", 0.6), ("aggregate", 1.4), ("render", 9.0), ("upload", 2.0)):
        ctx.step(name, ctx.wait, seconds)
        ctx.progress({"load": 300, "aggregate": 700, "render": 900, "upload": rows}[name], rows, f"{name} done")
    return {"month": month, "rows": rows, "url": "s3://reports/2026-11.pdf"}


@TASKS.task("mail.send")
def send(ctx, to, template="welcome"):
    return {"to": to, "queued": True}


@TASKS.task("billing.sync")
def sync(ctx, account):
    ctx.wait(0.2)
    raise ConnectionError(f"billing API refused account {account}: 503 Service Unavailable")


@TASKS.task("images.resize")
def resize(ctx, key, sizes=(64, 256)):
    ctx.wait(30)
    ctx.check_cancelled()
    return {"key": key}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.path.join(ROOT, "docs", "img"))
    parser.add_argument("--width", type=int, default=1280)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, launch(f"sqlite:///{tmp}/j.db", tasks=TASKS, workers=4) as live:
        fill(live.server.journal, 40_000, days=1.0, unfinished=0)
        admin = create_token(live.server.journal, "ops", admin=True)
        post = lambda body: live.post("/jobs", json=body, token=admin).json()  # noqa: E731
        report = post({"task": "reports.build", "params": {"month": "2026-11"}})
        post({"task": "billing.sync", "params": {"account": "acme-eu"}})
        for i in range(3):
            post({"task": "images.resize", "params": {"key": f"uploads/{i}.png"}})
        for to in ("ana@example.com", "li@example.com"):
            post({"task": "mail.send", "params": {"to": to}})
        time.sleep(6.5)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium")
            for width, height, suffix in ((args.width, 1280, ""), (420, 900, "-narrow")):
                context = browser.new_context(viewport={"width": width, "height": height})
                context.add_init_script(f"sessionStorage.setItem('jobserver.token', {admin!r})")
                page = context.new_page()
                page.goto(live.url("/"))
                page.wait_for_selector("#job-rows tr")
                page.wait_for_timeout(2500)
                page.screenshot(path=os.path.join(args.out, f"dashboard-overview{suffix}.png"))
                page.goto(live.url(f"/#/jobs/{report['id']}"))
                page.wait_for_selector("#timeline .tl-row")
                page.wait_for_timeout(1200)
                page.screenshot(path=os.path.join(args.out, f"dashboard-job{suffix}.png"), full_page=True)
                context.close()
            browser.close()


if __name__ == "__main__":
    main()
