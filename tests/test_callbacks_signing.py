"""Signing and verifying per Standard Webhooks, checked against the `standardwebhooks` package;
the secret's life; the retry schedule and Retry-After."""
import base64
import time
from datetime import UTC, datetime
from email.utils import format_datetime

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from jobserver.callbacks import (
    DEFAULT_SCHEDULE,
    MAX_RETRY_AFTER,
    InvalidSignature,
    Schedule,
    generate_secret,
    parse_retry_after,
    secret_key,
    signing_secret,
    verify,
    webhook_headers,
)
from jobserver.config import Config
from jobserver.journal import open_journal
from jobserver.server import JobServer
from jobserver.tasks import Registry

BODY = b'{"id":"0193","state":"succeeded","result":{"x":"\\u00e9"}}'


def test_our_signature_verifies_with_standardwebhooks():
    secret = generate_secret()
    headers = webhook_headers(secret, "msg_abc", BODY)
    assert Webhook(secret).verify(BODY, headers)["state"] == "succeeded"
    headers["webhook-id"] = "msg_other"
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(BODY, headers)


def test_we_verify_a_standardwebhooks_signature():
    secret = generate_secret()
    now = datetime.now(tz=UTC)
    signature = Webhook(secret).sign("msg_x", now, BODY.decode())
    headers = {"Webhook-Id": "msg_x", "Webhook-Timestamp": str(int(now.timestamp())),
               "Webhook-Signature": signature}
    verify(secret, headers, BODY)
    verify(secret, headers, BODY.decode())
    with pytest.raises(InvalidSignature):
        verify(secret, headers, BODY + b" ")
    with pytest.raises(InvalidSignature):
        verify(generate_secret(), headers, BODY)


def test_verify_refuses_stale_and_future_timestamps_and_accepts_any_of_several_signatures():
    secret = generate_secret()
    old = webhook_headers(secret, "msg_1", BODY, now=time.time() - 301)
    ahead = webhook_headers(secret, "msg_1", BODY, now=time.time() + 301)
    for headers in (old, ahead):
        with pytest.raises(InvalidSignature):
            verify(secret, headers, BODY)
    verify(secret, old, BODY, tolerance=600)
    good = webhook_headers(secret, "msg_1", BODY)
    other = webhook_headers(generate_secret(), "msg_1", BODY)["webhook-signature"]
    several = dict(good, **{"webhook-signature": f"v2,abc {other} v1,!!notbase64 {good['webhook-signature']}"})
    verify(secret, several, BODY)
    with pytest.raises(InvalidSignature):
        verify(secret, dict(good, **{"webhook-signature": other}), BODY)
    with pytest.raises(InvalidSignature):
        verify(secret, {"webhook-id": "msg_1"}, BODY)
    with pytest.raises(InvalidSignature):
        verify(secret, dict(good, **{"webhook-timestamp": "12.5"}), BODY)


def test_secret_format_is_checked():
    key = secret_key(generate_secret())
    assert len(key) == 32
    unpadded = "whsec_" + base64.b64encode(b"k" * 20).decode().rstrip("=")
    assert secret_key(unpadded) == b"k" * 20
    for bad in ("", "abc", "whsec_", "whsec_!!!!", "whsec_" + base64.b64encode(b"short").decode(), None):
        with pytest.raises(ValueError):
            secret_key(bad)


def test_signing_secret_is_made_once_and_kept_in_the_journal(sqlite_url):
    journal = open_journal(sqlite_url)
    try:
        first = signing_secret(journal, Config())
        assert first.startswith("whsec_") and signing_secret(journal, Config()) == first
        mine = generate_secret()
        assert signing_secret(journal, Config(callback_secret=mine)) == mine
    finally:
        journal.close()
    server = JobServer(sqlite_url, tasks=Registry())
    try:
        assert server.deliverer.secret == first  # a restart signs with the same secret
    finally:
        server.stop()


def test_a_malformed_configured_secret_refuses_to_start(sqlite_url):
    with pytest.raises(ValueError):
        JobServer(sqlite_url, tasks=Registry(), callback_secret="not-a-secret")


def test_default_schedule_has_jitter_of_ten_percent():
    schedule = Schedule()
    assert schedule.attempts == len(DEFAULT_SCHEDULE) == 10
    for made, base in enumerate(DEFAULT_SCHEDULE[1:], start=1):
        delay = schedule.next_delay(made)
        assert base * 0.9 <= delay <= base * 1.1
    assert schedule.next_delay(10) is None


def test_configured_attempts_and_backoff():
    assert Schedule(attempts=3, backoff=2).delays == (0.0, 2.0, 2.0)
    assert Schedule(attempts=12).delays[-3:] == (86400.0,) * 3
    assert Schedule(backoff=1).attempts == 10
    assert Schedule(attempts=1).next_delay(1) is None
    assert Schedule(attempts=3, backoff=2).next_delay(1, retry_after=7) == 7.0
    assert Schedule(attempts=3, backoff=2).next_delay(1, retry_after=10 ** 9) == MAX_RETRY_AFTER
    with pytest.raises(ValueError):
        Schedule(attempts=0)


def test_retry_after_in_seconds_or_as_an_http_date():
    now = time.time()
    assert parse_retry_after("120") == 120
    assert parse_retry_after(" 5 ") == 5
    assert parse_retry_after("99999999") == MAX_RETRY_AFTER
    date = format_datetime(datetime.fromtimestamp(now + 60, tz=UTC), usegmt=True)
    assert 58 <= parse_retry_after(date, now=now) <= 61
    past = format_datetime(datetime.fromtimestamp(now - 60, tz=UTC), usegmt=True)
    assert parse_retry_after(past, now=now) == 0
    for odd in (None, "", "-5", "soon", "1.5"):
        assert parse_retry_after(odd) is None
