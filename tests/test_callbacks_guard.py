"""The SSRF guard: callback URLs that could reach the server's own network are refused at submit."""
import ipaddress

import pytest
from callback_receiver import fake_dns
from http_fixtures import TASKS

from jobserver.errors import InvalidCallback
from jobserver.server import JobServer
from jobserver.urlguard import ForbiddenAddress, UrlGuard, is_public, normalise

REFUSED = [
    "http://10.1.2.3/hook", "http://172.16.0.1/hook", "http://172.31.255.255/", "http://192.168.1.1/",
    "http://127.0.0.1/hook", "http://127.8.9.10:8080/", "http://169.254.169.254/latest/meta-data/",
    "http://[::1]/", "http://0.0.0.0/", "http://[::]/", "http://[::ffff:127.0.0.1]/",
    "http://[::ffff:7f00:1]/", "http://[::ffff:10.0.0.1]/", "http://[64:ff9b::7f00:1]/",
    "http://[64:ff9b::a9fe:a9fe]/", "http://[2002:7f00:1::1]/", "http://[fe80::1]/", "http://[fc00::1]/",
    "http://[fd12:3456::1]/", "http://100.64.0.1/", "http://100.127.255.254/", "http://224.0.0.1/",
    "http://240.0.0.1/", "http://255.255.255.255/", "http://192.0.2.1/", "http://198.18.0.1/",
    "http://[ff02::1]/", "http://localhost/", "http://localhost.:8000/", "http://2130706433/",
    "http://0x7f.1/", "http://017700000001/", "http://127.1/", "http://0/",
    "http://user:pass@example.com/", "http://user@example.com/", "https://:pw@example.com/",
    "ftp://example.com/file", "file:///etc/passwd", "gopher://example.com/", "javascript:alert(1)",
    "http:///nohost", "http://", "//example.com/", "http://exa mple.com/", "http://example.com/\r\nX: y",
    "http://example.com:99999/", "http://example.com:port/",
]


@pytest.fixture
def server(sqlite_url):
    server = JobServer(sqlite_url, tasks=TASKS)  # no callback_allow: nothing private is allowed
    yield server
    server.stop()


@pytest.mark.parametrize("url", REFUSED)
def test_refused_at_submit(server, url):
    with pytest.raises(InvalidCallback):
        server.submit("t.echo", callback_url=url)
    assert server.list()[0] == []  # nothing was journaled


def test_allow_lists_cidrs(sqlite_url):
    server = JobServer(sqlite_url, tasks=TASKS, callback_allow=("127.0.0.0/8",))
    try:
        job_id = server.submit("t.echo", callback_url="http://127.0.0.1:9/hook")
        assert server.get(job_id)["callback"]["url"] == "http://127.0.0.1:9/hook"
        server.submit("t.echo", callback_url="http://2130706433:9/")  # the same address, spelt oddly
        server.submit("t.echo", callback_url="http://[::ffff:127.0.0.1]:9/")  # judged as 127.0.0.1
        for url in ("http://10.0.0.1/", "http://[::1]/", "http://169.254.169.254/"):
            with pytest.raises(InvalidCallback):
                server.submit("t.echo", callback_url=url)
    finally:
        server.stop()


def test_every_dns_answer_is_judged():
    guard = UrlGuard(resolver=fake_dns({"public.test": ["93.184.215.14", "2606:2800:21f:cb07::1"],
                                        "mixed.test": ["93.184.215.14", "10.0.0.5"],
                                        "meta.test": ["169.254.169.254"]}))
    assert guard.check("https://public.test/hook") == "https://public.test/hook"
    target = guard.target("https://public.test:8443/hook")
    assert (target.address, target.port, target.host_header) == ("93.184.215.14", 8443, "public.test:8443")
    for url in ("http://mixed.test/", "http://meta.test/"):
        with pytest.raises(ForbiddenAddress):
            guard.check(url)
    with pytest.raises(InvalidCallback):
        guard.check("http://nowhere.test/")


@pytest.mark.parametrize("address, public", [
    ("8.8.8.8", True), ("1.1.1.1", True), ("2001:4860:4860::8888", True),
    ("64:ff9b::808:808", True), ("2002:808:808::1", True), ("::ffff:8.8.8.8", True),
    ("127.0.0.1", False), ("10.0.0.1", False), ("100.64.0.1", False), ("169.254.169.254", False),
    ("224.0.0.251", False), ("0.0.0.0", False), ("::", False), ("::1", False), ("::127.0.0.1", False),
    ("fe80::1", False), ("fc00::1", False), ("2001:db8::1", False), ("ff02::1", False),
    ("64:ff9b::a00:1", False), ("2002:a00:1::", False), ("::ffff:192.168.0.1", False),
])
def test_address_verdicts(address, public):
    assert is_public(normalise(ipaddress.ip_address(address))) is public
