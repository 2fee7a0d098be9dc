"""Fuzzing the live API: whatever a client sends, never a 500, and every error is a problem.

Hypothesis builds job-shaped and garbage bodies, then mutates their text (duplicate keys,
NaN, deep nesting, huge numbers, truncation, flipped bytes); a seeded random loop adds
raw bytes. The server runs once per test (per backend) and the examples share it; its
pool is not started, so no job runs (and no pool thread touches `random`) mid-example."""
import json
import random
from urllib.parse import quote

from http_fixtures import assert_problem, launch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jobserver.errors import InvalidCallback

ALLOWED = {200, 202, 400, 404, 405, 409, 413, 422, 429, 501}  # 501: no callbacks layer yet
SETTINGS = settings(max_examples=120, deadline=None, database=None, derandomize=True,
                    suppress_health_check=list(HealthCheck))

leaf = (st.none() | st.booleans() | st.integers() | st.integers(min_value=-2**70, max_value=2**70)
        | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20))
value = st.recursive(leaf, lambda inner: st.lists(inner, max_size=4)
                     | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=15)
job = st.fixed_dictionaries(
    {"task": st.sampled_from(["t.echo", "t.fail", "no.such", ""]) | value},
    optional={"params": st.dictionaries(st.text(max_size=8), value, max_size=3) | value,
              "priority": st.integers() | value, "delay": st.floats(0, 5) | value,
              "max_retries": st.integers(-3, 200) | value, "timeout": st.floats(-1, 5) | value,
              "idempotency_key": st.text(max_size=200) | value,
              "callback_url": st.text(max_size=40) | value, "extra": value})
documents = job | st.lists(job, max_size=4) | value


MUTATIONS = ["none", "duplicate", "nan", "deep", "number", "truncate", "flip"]


def _mutate(text, how, data):
    """Text-level damage a JSON encoder would never produce."""
    if how == "duplicate" and text.startswith("{") and len(text) > 2:
        return '{"task": "t.echo", ' + text[1:]
    if how == "nan":
        return text.replace("0", data.draw(st.sampled_from(["NaN", "Infinity", "-Infinity"])), 1)
    if how == "deep":
        depth = data.draw(st.integers(60, 3000))
        return "[" * depth + text + "]" * depth
    if how == "number":
        huge = data.draw(st.sampled_from(["1e999", "-1e400", "9" * 5000, "1" * 4000]))
        return text.replace("0", huge, 1)
    if how == "truncate":
        return text[:data.draw(st.integers(0, len(text)))]
    return text


def _body(data):
    if data.draw(st.integers(0, 9)) == 0:
        return data.draw(st.binary(max_size=200))
    text = json.dumps(data.draw(documents))
    how = data.draw(st.sampled_from(MUTATIONS))
    raw = _mutate(text, how, data).encode("utf-8", "surrogatepass")
    if how == "flip" and raw:
        i = data.draw(st.integers(0, len(raw) - 1))
        raw = raw[:i] + bytes([data.draw(st.integers(0, 255))]) + raw[i + 1:]
    return raw


def _check(response):
    assert response.status_code in ALLOWED, (response.status_code, response.text)
    if response.status_code >= 400:
        assert_problem(response, response.status_code)


def _refuse_callbacks(url):
    """No DNS lookups from fuzzed URLs: every callback URL is refused (422)."""
    raise InvalidCallback(f"callback {url!r} refused in this test")


header_text = st.text(st.characters(min_codepoint=33, max_codepoint=126)
                      | st.characters(min_codepoint=161, max_codepoint=255),
                      min_size=1, max_size=250)


def test_fuzzed_submits_never_500(db_url):
    with launch(db_url, start=False) as live:
        live.server.callback_guard = _refuse_callbacks

        @SETTINGS
        @given(data=st.data())
        def check(data):
            headers = {}
            if data.draw(st.booleans()):
                headers["Idempotency-Key"] = data.draw(header_text)
            if data.draw(st.booleans()):
                headers["Content-Type"] = data.draw(st.sampled_from(
                    ["application/json", "text/plain", "application/x-www-form-urlencoded",
                     "multipart/form-data; boundary=x", "application/json; charset=latin-1"]))
            _check(live.post("/jobs", data=_body(data), headers=headers))
        check()
        assert live.get("/healthz").status_code == 200


def test_fuzzed_reads_never_500(db_url):
    with launch(db_url, start=False) as live:
        job_id = live.post("/jobs", json={"task": "t.echo"}).json()["id"]
        anything = st.text(max_size=80)

        @SETTINGS
        @given(target=st.sampled_from([job_id, "x"]) | anything, state=anything, task=anything,
               limit=anything, cursor=st.sampled_from([job_id]) | anything,
               wait=st.sampled_from(["", "0", "0.01", "1e309", "-0"]) | anything,
               action=st.sampled_from(["", "/cancel", "/retry", "/callback/retry", "/x"]))
        def check(target, state, task, limit, cursor, wait, action):
            _check(live.get("/jobs", params={"state": state, "task": task, "limit": limit,
                                             "cursor": cursor}))
            path = "/jobs/" + quote(target, safe="")
            if action:
                _check(live.post(path + action))
            else:
                _check(live.get(path, params={"wait": wait[:3] if wait[:1].isdigit() else wait}))
        check()


def test_seeded_random_garbage_never_500(sqlite_url):
    rng = random.Random(20261128)
    with launch(sqlite_url, start=False) as live:
        for _ in range(200):
            size = rng.choice([0, 1, 2, 10, 100, 1000])
            body = bytes(rng.getrandbits(8) for _ in range(size))
            path = rng.choice(["/jobs", "/jobs/abc/cancel", "/jobs/abc/retry", "/tasks",
                               "/healthz"])
            method = rng.choice(["POST", "GET", "PUT", "PATCH", "DELETE"])
            _check(live.request(method, path, data=body))
