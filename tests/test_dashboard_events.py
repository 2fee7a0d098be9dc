"""The dashboard on its event stream, in headless Chromium: one GET /events per tab (with a
ticket, never the token, in its URL), and the list updating through it, well before the
slow safety poll that a live stream leaves."""
from http_fixtures import launch
from test_dashboard import TASKS, browser, expect, row, submit, tabs  # noqa: F401 -- fixtures

SAFETY_POLL_S = 15  # app.js: with a live stream the page polls this rarely


def test_the_list_updates_through_the_event_stream(sqlite_url, tabs):  # noqa: F811 -- fixture
    with launch(sqlite_url, tasks=TASKS, stream_ping=1) as live:
        tab = tabs(live)
        page = tab.page
        streams = []
        page.on("request", lambda r: "/events" in r.url and streams.append(r.url))
        expect()(page.locator("#live")).to_have_attribute("data-mode", "live")
        assert live.server.events.subscribers == 1  # one stream for the whole tab
        assert all("ticket=" in url and "token" not in url for url in streams)
        page.wait_for_timeout(500)  # the page's first look is done: only the stream is left
        job_id = submit(live, "ui.progress", {"parts": 6, "seconds": 0.6})  # as curl would
        expect()(row(page, job_id)).to_be_visible(timeout=SAFETY_POLL_S * 1000 // 3)
        counts = set()
        count = row(page, job_id).locator("td").filter(has_text="/6")
        for _ in range(80):  # the row's progress, moved by progress events (~4 s)
            if count.count():
                counts.add(count.first.inner_text())
            if len(counts) >= 3:
                break
            page.wait_for_timeout(100)
        assert len(counts) >= 3, counts
        badge = row(page, job_id).locator(".badge")
        expect()(badge).to_have_attribute("data-state", "succeeded", timeout=SAFETY_POLL_S * 1000 // 2)
        expect()(page.locator("#live")).to_have_attribute("data-mode", "live")
