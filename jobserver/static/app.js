/* jobserver dashboard: one small script, no dependencies, no build step.
 *
 * Safety: job data (params, results, errors, names) only ever reaches the page as
 * text (textContent, setAttribute of plain attributes); nothing here assigns HTML.
 * The API token lives in this tab's sessionStorage and travels only in the
 * Authorization header; an EventSource gets a short-lived ticket instead.
 *
 * Live updates: when the server offers event streams (GET /stats says so), one
 * EventSource on GET /events per tab tells the page that something changed; without
 * them, or whenever the stream is down, the page polls GET /jobs and GET /stats.
 */
(function () {
  "use strict";

  // The API lives where the page does: this script is <base>/ui/app.js.
  const BASE = new URL("..", document.currentScript.src);
  const TOKEN_KEY = "jobserver.token";
  const PAGE_SIZE = 50;
  const POLL_MS = 2000;          // list and overview, without a stream
  const JOB_POLL_MS = 1000;      // a job page whose job has not ended
  const SAFETY_POLL_MS = 15000;  // with a live stream: a slow look, in case an event was missed
  const HIDDEN_POLL_MS = 10000;  // a tab in the background
  const STATES = ["queued", "running", "succeeded", "failed", "cancelled"];
  const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
  const ID_RE = /^[A-Za-z0-9_-]{1,64}$/;
  const MAX_TIMELINE_STEPS = 40;

  const $ = (id) => document.getElementById(id);

  // --- the API ---------------------------------------------------------------------
  class ApiError extends Error {
    constructor(status, problem) {
      super((problem && (problem.detail || problem.title)) || ("HTTP " + status));
      this.status = status;
      this.problem = problem;
    }
  }

  function token() {
    try { return sessionStorage.getItem(TOKEN_KEY) || ""; } catch (e) { return ""; }
  }

  function apiUrl(path, query) {
    const url = new URL(path, BASE);
    if (query) {
      for (const [k, v] of Object.entries(query)) {
        if (v !== undefined && v !== null && v !== "") url.searchParams.set(k, v);
      }
    }
    return url;
  }

  async function call(method, path, { query, body } = {}) {
    const headers = { Accept: "application/json" };
    const t = token();
    if (t) headers.Authorization = "Bearer " + t;
    const init = { method, headers, cache: "no-store", credentials: "omit" };
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    let response;
    try {
      response = await fetch(apiUrl(path, query), init);
    } catch (e) {
      throw new ApiError(0, { detail: "the server cannot be reached" });
    }
    if (response.status === 204) return null;
    let data = null;
    try { data = await response.json(); } catch (e) { data = null; }
    if (!response.ok) {
      if (response.status === 401) locked();
      throw new ApiError(response.status, data);
    }
    return data;
  }

  // --- small DOM and formatting helpers ----------------------------------------------
  /** An element with attributes and children; strings become text nodes, never HTML. */
  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === undefined || v === null || v === false) continue;
      if (k === "text") el.textContent = v;
      else if (k === "class") el.className = v;
      else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
      else el.setAttribute(k, v === true ? "" : String(v));
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      el.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return el;
  }

  function svg(tag, attrs, ...children) {
    const el = document.createElementNS("http://www.w3.org/2000/svg", tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "text") el.textContent = v;
      else el.setAttribute(k, String(v));
    }
    for (const child of children) if (child) el.append(child);
    return el;
  }

  function clear(el) { while (el.firstChild) el.removeChild(el.firstChild); return el; }

  function badge(state, big) {
    return h("span", { class: "badge" + (big ? " badge-big" : ""), "data-state": state, text: state });
  }

  const numberFormat = new Intl.NumberFormat("en-US");
  const fmtNum = (n) => (n === null || n === undefined ? "—" : numberFormat.format(n));

  function fmtDuration(seconds) {
    if (seconds === null || seconds === undefined || !isFinite(seconds)) return "—";
    if (seconds < 0) seconds = 0;
    if (seconds < 1) return Math.round(seconds * 1000) + " ms";
    if (seconds < 10) return seconds.toFixed(1) + " s";
    if (seconds < 60) return Math.round(seconds) + " s";
    if (seconds < 3600) {
      const m = Math.floor(seconds / 60), s = Math.round(seconds % 60);
      return m + " min" + (s ? " " + s + " s" : "");
    }
    if (seconds < 86400) {
      const hh = Math.floor(seconds / 3600), m = Math.round((seconds % 3600) / 60);
      return hh + " h" + (m ? " " + m + " min" : "");
    }
    return (seconds / 86400).toFixed(1) + " d";
  }

  const ms = (text) => (text ? Date.parse(text) : null);

  function fmtAgo(text) {
    const t = ms(text);
    if (t === null) return "—";
    const s = (Date.now() - t) / 1000;
    if (s < 5) return "just now";
    if (s < 60) return Math.round(s) + " s ago";
    if (s < 3600) return Math.round(s / 60) + " min ago";
    if (s < 86400) return Math.round(s / 3600) + " h ago";
    return Math.round(s / 86400) + " d ago";
  }

  function fmtTime(text, withDate) {
    const t = ms(text);
    if (t === null) return "—";
    const d = new Date(t);
    const time = d.toLocaleTimeString("en-GB", { hour12: false }) + "." + String(d.getMilliseconds()).padStart(3, "0");
    const today = new Date().toDateString() === d.toDateString();
    return (withDate || !today ? d.toLocaleDateString("en-CA") + " " : "") + time;
  }

  const shortId = (id) => (id.length > 16 ? id.slice(0, 8) + "…" + id.slice(-6) : id);

  function runSeconds(job) {
    const start = ms(job.started_at);
    if (start === null) return null;
    const end = job.finished_at ? ms(job.finished_at) : Date.now();
    return (end - start) / 1000;
  }

  function pretty(value) {
    if (value === undefined) return "";
    return JSON.stringify(value, null, 2);
  }

  let noticeTimer = null;
  function notice(text, kind) {
    const el = $("notice");
    el.textContent = text;
    el.dataset.kind = kind || "info";
    el.hidden = false;
    clearTimeout(noticeTimer);
    noticeTimer = setTimeout(() => { el.hidden = true; }, kind === "error" ? 10000 : 6000);
  }

  function failed(e) {
    if (e instanceof ApiError && e.status === 401) return;  // the token form says it
    notice(e.message || String(e), "error");
  }

  // --- who is looking, and the token ---------------------------------------------------
  const session = { viewer: null, features: null, locked: false };

  function showViewer() {
    const el = clear($("viewer"));
    const v = session.viewer;
    if (!v) return;
    if (v.name === "anonymous" && !token()) {
      el.append("open mode");
    } else {
      el.append(h("b", { text: v.name }), v.admin ? " · admin, sees every owner" : "");
    }
    $("jobs").classList.toggle("no-owner", !v.admin);
  }

  function toggleTokenForm(open) {
    const form = $("token-form");
    form.hidden = open === undefined ? !form.hidden : !open;
    $("token-toggle").setAttribute("aria-expanded", String(!form.hidden));
    if (!form.hidden) $("token-input").focus();
  }

  function locked() {
    if (session.locked) return;
    session.locked = true;
    live.setMode("locked", token() ? "the token was refused" : "this server needs a token");
    live.stop();
    toggleTokenForm(true);
  }

  function useToken(value) {
    try {
      if (value) sessionStorage.setItem(TOKEN_KEY, value);
      else sessionStorage.removeItem(TOKEN_KEY);
    } catch (e) { /* storage disabled: the token lasts until reload */ }
    $("token-input").value = "";
    toggleTokenForm(false);
    session.locked = false;
    resetList();
    loadTasks();
    live.restart();
  }

  // --- live updates: an event stream when there is one, else polling ------------------
  const live = {
    timer: null, busy: false, again: false, source: null, streaming: false, streamRetry: null, renewTimer: null, debounce: null,

    setMode(mode, text) {
      const el = $("live");
      el.dataset.mode = mode;
      el.textContent = text;
    },

    stop() {
      clearTimeout(this.timer);
      this.timer = null;
      this.again = false;
      this.closeStream();
    },

    restart() {
      this.stop();
      this.tick();
    },

    /** One refresh of what the current view shows, then the next one is scheduled.
     *  One at a time: a tick asked for while one runs runs right after it. */
    async tick() {
      if (this.busy) { this.again = true; return; }
      this.busy = true;
      clearTimeout(this.timer);
      this.timer = null;
      let ok = true;
      try {
        if (session.locked) return;
        await refreshView();
      } catch (e) {
        ok = false;
        if (e instanceof ApiError && e.status === 0) this.setMode("offline", "server unreachable · retrying");
        else failed(e);
      } finally {
        this.busy = false;
      }
      if (session.locked) return;
      if (ok && !this.streaming) {
        this.setMode("polling", "updating every " + (this.interval() / 1000) + " s");
      }
      if (ok && session.features && session.features.events && !this.source && !this.streamRetry) {
        this.openStream();
      }
      clearTimeout(this.timer);
      const delay = this.again ? 0 : this.interval();
      this.again = false;
      this.timer = setTimeout(() => this.tick(), delay);
    },

    interval() {
      if (document.hidden) return HIDDEN_POLL_MS;
      if (this.streaming) return SAFETY_POLL_MS;
      return view.name === "job" && view.job && !TERMINAL.has(view.job.state) ? JOB_POLL_MS : POLL_MS;
    },

    /** Something changed: refresh soon, once for a burst of events. */
    nudge(delay) {
      if (this.debounce) return;
      this.debounce = setTimeout(() => { this.debounce = null; this.tick(); }, delay || 250);
    },

    async openStream() {
      let ticket;
      try {
        ticket = await call("POST", "tickets");
      } catch (e) {
        this.retryStreamLater();
        return;
      }
      const source = new EventSource(apiUrl("events", { ticket: ticket.ticket }));
      this.source = source;
      source.onopen = () => {
        this.streaming = true;
        this.setMode("live", "live");
      };
      source.onerror = () => {
        // a closed stream (refused, out of slots, expired ticket) or a reconnect under way:
        // poll meanwhile; a closed one is opened again later with a fresh ticket
        this.streaming = false;
        this.setMode("polling", "stream interrupted · polling");
        if (source.readyState === EventSource.CLOSED) {
          this.closeStream();
          this.retryStreamLater();
        }
        this.nudge(POLL_MS);
      };
      for (const kind of ["snapshot", "state", "progress", "step", "callback", "children"]) {
        source.addEventListener(kind, (event) => onStreamEvent(kind, event));
      }
      // a ticket lasts minutes: take a new one before it runs out
      const expires = ms(ticket.expires_at);
      const renewIn = expires ? Math.max(30000, expires - Date.now() - 60000) : 240000;
      this.renewTimer = setTimeout(() => { this.closeStream(); this.openStream(); }, renewIn);
    },

    closeStream() {
      clearTimeout(this.renewTimer);
      if (this.source) this.source.close();
      this.source = null;
      this.streaming = false;
    },

    retryStreamLater() {
      clearTimeout(this.streamRetry);
      this.streamRetry = setTimeout(() => { this.streamRetry = null; }, 30000);
    },
  };

  function onStreamEvent(kind, event) {
    let data = null;
    try { data = JSON.parse(event.data); } catch (e) { return; }
    const id = data && (data.job_id || (data.job && data.job.id) || data.id);
    if (id && kind === "state" && typeof data.state === "string") {
      // the row's badge at once; the refresh that follows brings the rest
      const row = list.rows.get(id);
      if (row && row.job.state !== data.state) { row.job.state = data.state; updateRow(row); }
    }
    const progress = data && (data.progress || (kind === "progress" ? data : null));
    if (id && progress && typeof progress.done === "number") {
      const row = list.rows.get(id);
      if (row) { row.job.progress = progress; updateRow(row); }
      if (view.name === "job" && view.job && view.job.id === id) {
        view.job.progress = progress;
        renderProgress(view.job);
      }
    }
    live.nudge(view.name === "job" ? 150 : 400);
  }

  async function refreshView() {
    if (view.name === "job") {
      if (!session.viewer) await refreshStats();  // who is looking, and whether streams exist
      await refreshJob();
    } else {
      await Promise.all([refreshStats(), refreshList()]);
    }
  }

  // --- overview ----------------------------------------------------------------------
  async function refreshStats() {
    const stats = await call("GET", "stats");
    session.viewer = stats.viewer;
    session.features = stats.features || {};
    showViewer();
    renderTiles(stats);
    renderChart(stats.minutes);
    renderQueues(stats.queues || []);
    renderRates(stats);
    renderTasks(stats);
    fillQueueFilter(stats.queues || []);
    return stats;
  }

  function renderTiles(stats) {
    const tiles = [
      ["queued", "Queued", stats.states.queued, "now"],
      ["running", "Running", stats.states.running, "now"],
      ["succeeded", "Succeeded", stats.last_hour.succeeded, "last hour · " + fmtNum(stats.last_day.succeeded) + " in 24 h"],
      ["failed", "Failed", stats.last_hour.failed, "last hour · " + fmtNum(stats.last_day.failed) + " in 24 h"],
      ["cancelled", "Cancelled", stats.last_hour.cancelled, "last hour · " + fmtNum(stats.last_day.cancelled) + " in 24 h"],
      ["submitted", "Submitted", stats.last_hour.submitted, "last hour"],
    ];
    const box = clear($("tiles"));
    for (const [state, label, value, sub] of tiles) {
      const link = state === "submitted" ? null : state;
      box.append(h("div", { class: "tile", "data-state": state },
        h("div", { class: "label" }, link ? badge(state) : h("span", { text: label })),
        h("div", { class: "value", text: fmtNum(value) }),
        h("div", { class: "sub", text: sub })));
    }
  }

  function renderChart(minutes) {
    const box = clear($("chart"));
    if (!minutes) return;
    const n = minutes.succeeded.length;
    const totals = minutes.succeeded.map((v, i) => v + minutes.failed[i] + minutes.cancelled[i]);
    const peak = Math.max(1, ...totals);
    const top = niceCeil(peak);
    // drawn at the box's own width, so the labels keep their shape on any screen
    const W = Math.max(280, Math.round(box.clientWidth || 720)), H = 150, left = 34, right = 6, bottom = 18, topPad = 8;
    const plotW = W - left - right, plotH = H - bottom - topPad;
    const slot = plotW / n, barW = Math.max(1, slot * 0.72);
    const y = (v) => topPad + plotH - (v / top) * plotH;
    const chart = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img",
      "aria-label": "jobs finished per minute over the last hour" });
    for (const frac of [0, 0.5, 1]) {
      const v = top * frac;
      chart.append(svg("line", { class: frac === 0 ? "baseline" : "gridline", x1: left, x2: W - right, y1: y(v), y2: y(v) }));
      chart.append(svg("text", { x: left - 6, y: y(v) + 3.5, "text-anchor": "end", text: fmtNum(Math.round(v)) }));
    }
    const start = ms(minutes.start);
    for (let i = 0; i < n; i++) {
      const x = left + i * slot + (slot - barW) / 2;
      let base = 0;
      const group = svg("g", {});
      for (const state of ["succeeded", "cancelled", "failed"]) {
        const v = minutes[state][i];
        if (!v) continue;
        group.append(svg("rect", { class: "bar-" + state, x, width: barW, y: y(base + v), height: Math.max(0.5, y(base) - y(base + v)) }));
        base += v;
      }
      const at = new Date(start + i * 60000).toLocaleTimeString("en-GB", { hour: "2-digit", minute: "2-digit" });
      const hover = svg("rect", { class: "bar-slot", x: left + i * slot, width: slot, y: topPad, height: plotH });
      hover.append(svg("title", { text: `${at} · ${minutes.succeeded[i]} succeeded, ${minutes.failed[i]} failed, ${minutes.cancelled[i]} cancelled` }));
      group.append(hover);
      chart.append(group);
    }
    for (const [i, label] of [[0, "60 min ago"], [30, "30 min"], [n - 1, "now"]]) {
      const anchor = i === 0 ? "start" : i === n - 1 ? "end" : "middle";
      chart.append(svg("text", { x: left + i * slot + (i === n - 1 ? slot : 0), y: H - 4, "text-anchor": anchor, text: label }));
    }
    box.append(chart);
    const legend = clear($("chart-legend"));
    const sum = (a) => a.reduce((s, v) => s + v, 0);
    for (const state of ["succeeded", "failed", "cancelled"]) {
      legend.append(h("span", { class: "key" }, h("span", { class: "swatch swatch-" + state }),
        state + " " + fmtNum(sum(minutes[state]))));
    }
  }

  function niceCeil(v) {
    const p = Math.pow(10, Math.floor(Math.log10(v)));
    for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= v) return Math.max(m * p, 4);
    return 10 * p;
  }

  function renderQueues(queues) {
    const table = clear($("queues"));
    table.append(h("thead", {}, h("tr", {}, h("th", { text: "Queue" }), h("th", { class: "num", text: "Queued" }),
      h("th", { class: "num", text: "Running" }), h("th", { class: "num", text: "Waiting" }))));
    const body = h("tbody");
    for (const q of queues) {
      body.append(h("tr", {}, h("td", { class: "mono", text: q.name }), h("td", { class: "num", text: fmtNum(q.queued) }),
        h("td", { class: "num", text: fmtNum(q.running) }), h("td", { class: "num", text: fmtNum(q.waiting || 0) })));
    }
    table.append(body);
  }

  function renderRates(stats) {
    const dl = clear($("rates"));
    const rate = (w) => {
      const ended = w.succeeded + w.failed;
      return ended ? (100 * w.failed) / ended : null;
    };
    for (const [label, window] of [["Failure rate, last hour", stats.last_hour], ["Failure rate, 24 h", stats.last_day]]) {
      const r = rate(window);
      dl.append(h("dt", { text: label }),
        h("dd", { class: r !== null && r >= 5 ? "bad" : "", text: r === null ? "—" : r.toFixed(1) + " %" }));
    }
  }

  function renderTasks(stats) {
    const table = clear($("tasks"));
    table.append(h("thead", {}, h("tr", {},
      h("th", { text: "Task" }), h("th", { class: "num", text: "Runs" }), h("th", { class: "num", text: "Failed" }),
      h("th", { class: "num", text: "Run p50" }), h("th", { class: "num", text: "Run p95" }),
      h("th", { class: "num", text: "Wait p50" }), h("th", { class: "num", text: "Wait p95" }))));
    const body = h("tbody");
    for (const t of stats.tasks) {
      body.append(h("tr", {},
        h("td", { class: "mono", text: t.task }), h("td", { class: "num", text: fmtNum(t.runs) }),
        h("td", { class: "num" + (t.failed ? " failed-count" : ""), text: fmtNum(t.failed) }),
        h("td", { class: "num", text: fmtDuration(t.run_p50) }), h("td", { class: "num", text: fmtDuration(t.run_p95) }),
        h("td", { class: "num", text: fmtDuration(t.wait_p50) }), h("td", { class: "num", text: fmtDuration(t.wait_p95) })));
    }
    if (!stats.tasks.length) body.append(h("tr", {}, h("td", { colspan: 7, class: "muted", text: "No runs finished in the last hour." })));
    table.append(body);
    const sample = stats.sample;
    $("tasks-note").textContent = sample && !sample.complete
      ? `Percentiles from the newest ${fmtNum(sample.runs)} runs of the hour. Run time: first start to finish; wait: submit to first start.`
      : "Run time: first start to finish; wait: submit to first start.";
  }

  // --- the job list ------------------------------------------------------------------
  const list = {
    rows: new Map(),   // id -> {job, tr, ...cells}
    order: [],         // ids as shown, newest first
    cursor: null,      // the page shown: null for the newest, else the cursor that gave it
    older: [],         // cursors of the pages before, for "Newest"
    next: null,        // the API's cursor for the page after this one
    pending: [],       // ids newer than the top row, announced in the banner
    selected: new Set(),
    shown: false,
  };

  function filters() {
    return { state: $("f-state").value, task: $("f-task").value, queue: $("f-queue").value };
  }

  function resetList() {
    list.rows.clear();
    list.order = [];
    list.cursor = null;
    list.older = [];
    list.next = null;
    list.pending = [];
    list.selected.clear();
    list.shown = false;
    clear($("job-rows"));
    updateBanner();
    updateBulkScope();
  }

  async function refreshList() {
    if (list.cursor !== null && list.shown) return refreshVisibleRows();
    const page = await call("GET", "jobs", { query: { ...filters(), limit: PAGE_SIZE, cursor: list.cursor } });
    if (!list.shown || list.order.length === 0) {
      showPage(page);
      return;
    }
    const top = list.order[0];
    const fresh = [];
    for (const job of page.jobs) {
      const row = list.rows.get(job.id);
      if (row) {
        row.job = job;
        updateRow(row);
      } else if (job.id > top) {
        fresh.push(job.id);
      }
    }
    list.pending = fresh;
    updateBanner(page.jobs.length >= PAGE_SIZE && fresh.length >= PAGE_SIZE);
    await refreshVisibleRows(page.jobs);
  }

  /** Rows on screen that have not ended and were not in the last answer: ask for each (few). */
  async function refreshVisibleRows(seenJobs) {
    const seen = new Set((seenJobs || []).map((j) => j.id));
    const stale = list.order.filter((id) => !seen.has(id) && !TERMINAL.has(list.rows.get(id).job.state)).slice(0, 20);
    await Promise.all(stale.map(async (id) => {
      try {
        const job = await call("GET", "jobs/" + encodeURIComponent(id));
        const row = list.rows.get(id);
        if (row) { row.job = job; updateRow(row); }
      } catch (e) {
        const row = list.rows.get(id);
        if (e instanceof ApiError && e.status === 404 && row) row.tr.classList.add("gone");
        else throw e;
      }
    }));
  }

  function showPage(page) {
    const body = clear($("job-rows"));
    list.rows.clear();
    list.order = [];
    for (const job of page.jobs) {
      const row = makeRow(job);
      list.rows.set(job.id, row);
      list.order.push(job.id);
      body.append(row.tr);
    }
    list.next = page.next;
    list.pending = [];
    list.shown = true;
    for (const id of [...list.selected]) if (!list.rows.has(id)) list.selected.delete(id);
    $("jobs-empty").hidden = page.jobs.length > 0;
    $("page-older").disabled = !page.next;
    $("page-newest").disabled = list.cursor === null;
    $("select-page").checked = false;
    updateBanner();
    updateBulkScope();
  }

  function makeRow(job) {
    const check = h("input", { type: "checkbox", "aria-label": "Select job " + job.id });
    check.checked = list.selected.has(job.id);
    check.addEventListener("click", (e) => e.stopPropagation());
    check.addEventListener("change", () => {
      if (check.checked) list.selected.add(job.id); else list.selected.delete(job.id);
      row.tr.classList.toggle("selected", check.checked);
      updateBulkScope();
    });
    const href = "#/jobs/" + encodeURIComponent(job.id);
    const row = {
      job, check,
      state: h("td", { class: "c-state" }),
      bar: h("span"),
      count: h("span", { class: "count" }),
      created: h("td", { class: "c-created" }),
      dur: h("td", { class: "c-dur num" }),
    };
    row.barBox = h("div", { class: "bar" }, row.bar);
    row.tr = h("tr", { "data-id": job.id },
      h("td", { class: "c-check" }, check),
      row.state,
      h("td", {}, h("a", { class: "task-name", href, text: job.task })),
      h("td", { class: "c-id" }, h("code", { title: job.id, text: shortId(job.id) })),
      h("td", { class: "c-owner", text: job.owner }),
      h("td", { class: "c-progress" }, h("div", { class: "progress-cell" }, row.barBox, row.count)),
      row.created, row.dur);
    row.tr.addEventListener("click", (e) => {
      if (e.target.closest("a, input, button")) return;
      location.hash = href;
    });
    row.tr.classList.toggle("selected", check.checked);
    updateRow(row);
    return row;
  }

  function progressFraction(job) {
    const p = job.progress;
    if (p && typeof p.done === "number" && typeof p.total === "number" && p.total > 0) {
      return Math.max(0, Math.min(1, p.done / p.total));
    }
    if (job.state === "succeeded") return 1;
    return null;
  }

  function updateRow(row) {
    const job = row.job;
    const current = row.state.firstChild;
    if (!current || current.dataset.state !== job.state) clear(row.state).append(badge(job.state));
    const fraction = progressFraction(job);
    row.barBox.dataset.state = job.state;
    row.bar.style.width = fraction === null ? "0%" : (fraction * 100).toFixed(1) + "%";
    const p = job.progress;
    row.count.textContent = p && typeof p.done === "number" ? (p.total ? `${p.done}/${p.total}` : String(p.done)) : "";
    row.barBox.title = p && p.message ? String(p.message) : "";
    row.created.textContent = fmtAgo(job.created_at);
    row.created.title = fmtTime(job.created_at, true);
    row.dur.textContent = job.started_at ? fmtDuration(runSeconds(job)) : "—";
  }

  function updateBanner(many) {
    const banner = $("new-banner");
    const n = list.pending.length;
    banner.hidden = n === 0;
    banner.textContent = n === 0 ? "" : `${many ? n + "+" : n} new job${n === 1 ? "" : "s"} — show`;
  }

  async function showNewest() {
    list.cursor = null;
    list.older = [];
    list.shown = false;
    await refreshList().catch(failed);
  }

  // --- filters, pages, jump -------------------------------------------------------------
  function fillSelect(select, options, keep) {
    const value = keep === undefined ? select.value : keep;
    clear(select);
    for (const [v, label] of options) select.append(h("option", { value: v, text: label }));
    select.value = options.some(([v]) => v === value) ? value : "";
  }

  function fillQueueFilter(queues) {
    const names = queues.map((q) => q.name);
    const select = $("f-queue");
    const now = [...select.options].map((o) => o.value).slice(1);
    if (now.join("\n") === names.join("\n")) return;
    fillSelect(select, [["", "any"], ...names.map((n) => [n, n])]);
  }

  async function loadTasks() {
    try {
      const { tasks } = await call("GET", "tasks");
      fillSelect($("f-task"), [["", "any"], ...tasks.map((t) => [t.name, t.name])], hashFilters().task || "");
    } catch (e) {
      failed(e);
    }
  }

  function hashFilters() {
    const q = location.hash.indexOf("?");
    const params = new URLSearchParams(q >= 0 ? location.hash.slice(q + 1) : "");
    return { state: params.get("state") || "", task: params.get("task") || "", queue: params.get("queue") || "" };
  }

  function writeHashFilters() {
    const params = new URLSearchParams();
    for (const [k, v] of Object.entries(filters())) if (v) params.set(k, v);
    const text = params.toString();
    const hash = "#/" + (text ? "?" + text : "");
    if (location.hash !== hash) history.replaceState(null, "", hash);
  }

  function onFiltersChanged() {
    writeHashFilters();
    resetList();
    live.restart();
  }

  async function goOlder() {
    if (!list.next) return;
    list.older.push(list.cursor);
    list.cursor = list.next;
    list.shown = false;
    try {
      const page = await call("GET", "jobs", { query: { ...filters(), limit: PAGE_SIZE, cursor: list.cursor } });
      showPage(page);
      $("jobs").scrollIntoView({ block: "start" });
    } catch (e) { failed(e); }
  }

  // --- bulk actions ----------------------------------------------------------------------
  function describeFilter() {
    const f = filters();
    const parts = [];
    if (f.state) parts.push("state " + f.state);
    if (f.task) parts.push("task " + f.task);
    if (f.queue) parts.push("queue " + f.queue);
    return parts.length ? parts.join(", ") : "no filter: every job you can see";
  }

  function updateBulkScope() {
    const el = clear($("bulk-scope"));
    const n = list.selected.size;
    if (n) el.append("Act on ", h("b", { text: fmtNum(n) + " selected" }), " job" + (n === 1 ? "" : "s"));
    else el.append("Act on every job matching ", h("b", { text: describeFilter() }));
    $("bulk-clear").hidden = n === 0;
    $("select-page").checked = n > 0 && list.order.length > 0 && list.order.every((id) => list.selected.has(id));
  }

  const VERBS = { cancel: ["Cancel", "cancelled"], retry: ["Retry", "queued again"], delete: ["Delete", "deleted"] };

  async function bulk(action) {
    const ids = [...list.selected];
    const f = filters();
    const filter = ids.length ? { ids } : Object.fromEntries(Object.entries(f).filter(([, v]) => v));
    const [verb, done] = VERBS[action];
    const what = ids.length ? `${fmtNum(ids.length)} selected job${ids.length === 1 ? "" : "s"}` : `every job matching ${describeFilter()}`;
    const detail = {
      cancel: "Queued jobs are cancelled at once; running ones are asked to stop.",
      retry: "Failed and cancelled jobs are queued again under the same id; others are left alone.",
      delete: "Finished jobs are forgotten with their steps and callback deliveries; unfinished ones are left alone. This cannot be undone.",
    }[action];
    const result = await confirmDialog({
      title: `${verb} ${what}?`, text: detail, yes: verb + " them", danger: action !== "retry",
      run: async (progress) => {
        let matched = 0, changed = 0, cursor = null;
        do {
          const answer = await call("POST", "jobs/bulk", { body: cursor ? { action, filter, cursor } : { action, filter } });
          matched += answer.matched;
          changed += answer.changed;
          cursor = answer.next;
          progress(`${fmtNum(matched)} matched, ${fmtNum(changed)} ${done} so far…`);
        } while (cursor);
        return { matched, changed };
      },
    });
    if (!result) return;
    notice(`${fmtNum(result.changed)} of ${fmtNum(result.matched)} matching job${result.matched === 1 ? "" : "s"} ${done}.`);
    list.selected.clear();
    resetList();
    live.restart();
  }

  // --- the confirm dialog -------------------------------------------------------------------
  /** Ask; on yes run `run(progress)` with the dialog open. Resolves to its result, or null. */
  function confirmDialog({ title, text, yes, danger, run }) {
    const dialog = $("confirm");
    $("confirm-title").textContent = title;
    $("confirm-text").textContent = text;
    $("confirm-progress").textContent = "";
    const yesButton = $("confirm-yes"), noButton = $("confirm-no");
    yesButton.textContent = yes;
    yesButton.className = "btn " + (danger ? "btn-danger" : "btn-primary");
    yesButton.disabled = noButton.disabled = false;
    return new Promise((resolve) => {
      const finish = (value) => {
        yesButton.onclick = noButton.onclick = dialog.oncancel = null;
        if (dialog.open) dialog.close();
        resolve(value);
      };
      noButton.onclick = () => finish(null);
      dialog.oncancel = (e) => { if (yesButton.disabled) e.preventDefault(); else finish(null); };
      yesButton.onclick = async () => {
        yesButton.disabled = noButton.disabled = true;
        try {
          finish(await run((msg) => { $("confirm-progress").textContent = msg; }));
        } catch (e) {
          finish(null);
          failed(e);
        }
      };
      dialog.showModal();
      noButton.focus();
    });
  }

  // --- the job page ---------------------------------------------------------------------
  const view = { name: "overview", jobId: null, job: null };

  async function refreshJob() {
    const id = view.jobId;
    try {
      const job = await call("GET", "jobs/" + encodeURIComponent(id));
      if (view.jobId === id) renderJob(job);
    } catch (e) {
      if (e instanceof ApiError && e.status === 404 && view.jobId === id) {
        renderMissing(id);
        return;
      }
      throw e;
    }
  }

  function renderMissing(id) {
    view.job = null;
    $("job-task").textContent = "No such job";
    clear($("job-state"));
    $("job-id").textContent = id;
    for (const b of ["act-cancel", "act-retry", "act-delete"]) $(b).disabled = true;
    clear($("job-progress")).append(h("span", { class: "muted", text: "There is no job with this id that you can see (or it was deleted)." }));
    for (const el of ["timeline", "job-details", "job-callback"]) clear($(el));
    $("job-params").textContent = "";
    $("job-result").textContent = "";
    $("error-panel").hidden = true;
  }

  function renderJob(job) {
    view.job = job;
    document.title = job.task + " · " + job.state + " · jobserver";
    $("job-task").textContent = job.task;
    const stateBox = $("job-state");
    const label = job.cancel_requested && job.state === "running" ? "running · cancel requested" : job.state;
    if (stateBox.dataset.label !== label) {
      stateBox.dataset.label = label;
      clear(stateBox).append(h("span", { class: "badge badge-big", "data-state": job.state, text: label }));
    }
    $("job-id").textContent = job.id;
    const active = job.state === "queued" || job.state === "running" || job.state === "waiting";
    $("act-cancel").disabled = !active || job.cancel_requested;
    $("act-retry").disabled = !(job.state === "failed" || job.state === "cancelled");
    $("act-delete").disabled = !TERMINAL.has(job.state);
    renderProgress(job);
    renderTimeline(job);
    const errorPanel = $("error-panel");
    errorPanel.hidden = !job.error;
    if (job.error) {
      $("error-summary").textContent = (job.error.type || "Error") + ": " + (job.error.message || "");
      $("error-trace").textContent = job.error.traceback || "(no traceback recorded)";
    }
    setCode($("job-params"), job.params, "{}");
    setCode($("job-result"), job.state === "succeeded" || job.result !== null ? job.result : undefined,
      active ? "not finished yet" : "no result");
    renderDetails(job);
    renderCallback(job);
  }

  function setCode(el, value, emptyText) {
    const text = value === undefined ? emptyText : pretty(value);
    if (el.textContent !== text) el.textContent = text;
    el.classList.toggle("empty-value", value === undefined);
  }

  function renderProgress(job) {
    const box = clear($("job-progress"));
    const p = job.progress;
    const fraction = progressFraction(job);
    let left, right = "";
    if (p && typeof p.done === "number") {
      left = (p.total ? `${fmtNum(p.done)} of ${fmtNum(p.total)}` : fmtNum(p.done)) + (p.message ? " · " + p.message : "");
      if (fraction !== null) right = Math.round(fraction * 100) + "%";
    } else if (job.state === "queued") {
      left = job.attempts ? "Waiting to run again" : "Waiting for a worker";
    } else if (job.state === "running") {
      left = "Running · this task reports no progress";
    } else {
      left = "Ended " + job.state + (job.finished_at ? " " + fmtAgo(job.finished_at) : "");
    }
    const bar = h("div", { class: "bar", "data-state": job.state }, h("span"));
    bar.firstChild.style.width = fraction === null ? "0%" : (fraction * 100).toFixed(1) + "%";
    box.append(h("div", { class: "progress-text" }, h("span", { class: "progress-message", text: left }), h("span", { class: "pct", text: right })), bar);
  }

  function renderTimeline(job) {
    const box = clear($("timeline"));
    const t0 = ms(job.created_at);
    const end = job.finished_at ? ms(job.finished_at) : Date.now();
    const span = Math.max(end - t0, 1);
    const pos = (t) => ((Math.max(t0, Math.min(end, t)) - t0) / span) * 100;
    const row = (label, sub, from, to, state, open) => {
      const bar = h("span", { class: "tl-span" + (open ? " open" : ""), "data-state": state, title: state });
      bar.style.left = pos(from).toFixed(2) + "%";
      bar.style.width = Math.max(0, pos(to) - pos(from)).toFixed(2) + "%";
      box.append(h("div", { class: "tl-row" },
        h("span", { class: "tl-label", title: label }, label, sub ? h("span", { class: "muted", text: " " + sub }) : null),
        h("span", { class: "tl-track" }, bar),
        h("span", { class: "tl-dur", text: fmtDuration((to - from) / 1000) })));
    };
    const started = ms(job.started_at);
    const queuedUntil = started !== null ? started : end;
    row("In queue", "", t0, queuedUntil, "queued", started === null && !job.finished_at);
    if (started !== null) {
      const attempts = job.attempts > 1 ? `attempts 1–${job.attempts}` : "attempt 1";
      const runState = job.state === "queued" ? "running" : job.state;
      row("Run", attempts, started, end, runState, !job.finished_at);
    }
    const steps = job.steps || [];
    const shown = steps.length > MAX_TIMELINE_STEPS
      ? [...steps.slice(0, MAX_TIMELINE_STEPS / 2), null, ...steps.slice(-MAX_TIMELINE_STEPS / 2)] : steps;
    for (const step of shown) {
      if (step === null) {
        box.append(h("div", { class: "tl-row muted" }, h("span", { class: "tl-label", text: `… ${fmtNum(steps.length - MAX_TIMELINE_STEPS)} more steps` })));
        continue;
      }
      const from = ms(step.started_at), to = step.finished_at ? ms(step.finished_at) : end;
      row("Step " + step.name, step.state === "succeeded" ? "" : step.state, from, to, step.state, !step.finished_at);
    }
    box.append(h("div", { class: "tl-axis" }, h("span"),
      h("span", { class: "ends" }, h("span", { text: fmtTime(job.created_at) }),
        h("span", { text: job.finished_at ? fmtTime(job.finished_at) : "now" })),
      h("span", { class: "tl-dur", text: fmtDuration(span / 1000) })));
    const moments = h("ul", { class: "moments" });
    const moment = (at, text) => moments.append(h("li", {}, h("time", { text: fmtTime(at) }), h("span", { text })));
    moment(job.created_at, "submitted");
    if (job.started_at) moment(job.started_at, "first started");
    if (job.state === "queued" && job.attempts > 0) {
      moment(job.run_at, `attempt ${job.attempts} failed; next try at this time`);
    }
    if (job.cancel_requested && !job.finished_at) moment(null, "cancel requested; the task stops at its next check");
    if (job.finished_at) {
      const how = job.state === "succeeded" ? "succeeded" : job.state === "failed" ? `failed after ${job.attempts} attempt${job.attempts === 1 ? "" : "s"}` : "cancelled";
      moment(job.finished_at, how);
    }
    box.append(moments);
  }

  function renderDetails(job) {
    const dl = clear($("job-details"));
    const item = (label, value) => dl.append(h("dt", { text: label }), h("dd", {}, value));
    item("Owner", job.owner);
    item("Queue", job.queue || "default");
    item("Attempts", `${job.attempts} of ${job.max_retries + 1}`);
    item("Priority", String(job.priority));
    item("Timeout", job.timeout ? fmtDuration(job.timeout) : "task default");
    item("Submitted", fmtTime(job.created_at, true));
    item("Started", fmtTime(job.started_at, true));
    item("Finished", fmtTime(job.finished_at, true));
    if (job.started_at) item("Run time", fmtDuration(runSeconds(job)));
    if (job.state === "queued") item("Runs at", fmtTime(job.run_at, true));
    if (job.parent_id) item("Parent", h("a", { href: "#/jobs/" + encodeURIComponent(job.parent_id), text: shortId(job.parent_id) }));
    if (job.children) {
      const c = job.children;
      item("Children", `${fmtNum(c.total)}: ` + STATES.filter((s) => c[s]).map((s) => `${fmtNum(c[s])} ${s}`).join(", "));
    }
  }

  function renderCallback(job) {
    const box = clear($("job-callback"));
    const cb = job.callback;
    if (!cb) {
      box.append(h("p", { class: "muted small", text: "No callback URL was given." }));
      return;
    }
    const dl = h("dl", { class: "details" });
    const item = (label, value) => dl.append(h("dt", { text: label }), h("dd", {}, value));
    item("URL", h("code", { class: "callback-url", text: cb.url }));
    item("Delivery", badge(cb.state));
    item("Attempts", String(cb.attempts));
    if (cb.delivered_at) item("Delivered", fmtTime(cb.delivered_at, true));
    if (cb.last_error) item("Last error", cb.last_error);
    box.append(dl);
    if (cb.state === "failed") {
      box.append(h("div", { class: "callback-row" },
        h("button", { class: "btn", type: "button", id: "act-redeliver", text: "Redeliver", onclick: () => act("callback/retry", "Callback queued for delivery again.") }),
        h("span", { class: "muted small", text: "Same webhook-id, a fresh retry schedule." })));
    }
  }

  async function act(path, message) {
    const id = view.jobId;
    try {
      const job = await call("POST", `jobs/${encodeURIComponent(id)}/${path}`);
      if (view.jobId === id) renderJob(job);
      notice(message);
      live.restart();
    } catch (e) { failed(e); }
  }

  async function deleteJob() {
    const id = view.jobId;
    const done = await confirmDialog({
      title: "Delete this job?",
      text: "Its row, steps and callback deliveries are forgotten. This cannot be undone.",
      yes: "Delete it", danger: true,
      run: () => call("DELETE", "jobs/" + encodeURIComponent(id)).then(() => true),
    });
    if (!done) return;
    list.rows.delete(id);
    location.hash = "#/";
    notice("Job " + id + " deleted.");
  }

  // --- routing and start ---------------------------------------------------------------
  function route() {
    const hash = location.hash || "#/";
    const match = /^#\/jobs\/([^?/]+)$/.exec(hash);
    if (match) {
      view.name = "job";
      view.jobId = decodeURIComponent(match[1]);
      view.job = null;
      $("overview-view").hidden = true;
      $("job-view").hidden = false;
      delete clear($("job-state")).dataset.label;
      window.scrollTo(0, 0);
    } else {
      const wasJob = view.name === "job";
      view.name = "overview";
      view.jobId = null;
      view.job = null;
      document.title = "jobserver";
      $("job-view").hidden = true;
      $("overview-view").hidden = false;
      const wanted = hashFilters();
      const f = filters();
      if (wanted.state !== f.state || wanted.task !== f.task || wanted.queue !== f.queue) {
        $("f-state").value = wanted.state;
        if ([...$("f-task").options].some((o) => o.value === wanted.task)) $("f-task").value = wanted.task;
        $("f-queue").value = wanted.queue;
        resetList();
      } else if (wasJob) {
        list.shown = false;  // back from a job: show the newest state of the list
        list.cursor = null;
      }
      updateBulkScope();
    }
    live.restart();
  }

  function wire() {
    fillSelect($("f-state"), [["", "any"], ...STATES.map((s) => [s, s])], hashFilters().state);
    fillSelect($("f-task"), [["", "any"]], "");
    fillSelect($("f-queue"), [["", "any"]], "");
    for (const id of ["f-state", "f-task", "f-queue"]) $(id).addEventListener("change", onFiltersChanged);
    $("filters").addEventListener("submit", (e) => {
      e.preventDefault();
      const id = $("jump-id").value.trim();
      if (!id) return;
      if (!ID_RE.test(id)) { notice("A job id is 1 to 64 letters, digits, - and _.", "error"); return; }
      $("jump-id").value = "";
      location.hash = "#/jobs/" + encodeURIComponent(id);
    });
    $("token-toggle").addEventListener("click", () => toggleTokenForm());
    $("token-form").addEventListener("submit", (e) => {
      e.preventDefault();
      const value = $("token-input").value.trim();
      if (value) useToken(value);
    });
    $("token-forget").addEventListener("click", () => useToken(""));
    $("new-banner").addEventListener("click", showNewest);
    $("page-older").addEventListener("click", goOlder);
    $("page-newest").addEventListener("click", showNewest);
    $("select-page").addEventListener("change", (e) => {
      for (const id of list.order) {
        const row = list.rows.get(id);
        if (e.target.checked) list.selected.add(id); else list.selected.delete(id);
        row.check.checked = e.target.checked;
        row.tr.classList.toggle("selected", e.target.checked);
      }
      updateBulkScope();
    });
    $("bulk-clear").addEventListener("click", () => {
      list.selected.clear();
      for (const row of list.rows.values()) { row.check.checked = false; row.tr.classList.remove("selected"); }
      updateBulkScope();
    });
    for (const button of document.querySelectorAll("[data-bulk]")) {
      button.addEventListener("click", () => bulk(button.dataset.bulk));
    }
    $("act-cancel").addEventListener("click", () => act("cancel", "Cancel requested."));
    $("act-retry").addEventListener("click", () => act("retry", "Job queued again."));
    $("act-delete").addEventListener("click", deleteJob);
    window.addEventListener("hashchange", route);
    document.addEventListener("visibilitychange", () => { if (!document.hidden) live.nudge(50); });
  }

  wire();
  loadTasks();
  route();
})();
