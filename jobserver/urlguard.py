"""The SSRF guard for callback URLs: only http(s) to globally routable addresses.

A callback URL is chosen by whoever submits a job, and the server POSTs to it from
inside the network it runs in. So the guard refuses URLs whose host resolves to any
address the public internet could not reach (loopback, private, link-local with the
cloud metadata service, shared, multicast, reserved ...), judging every address the
resolver gives and the IPv4 address hidden in IPv4-mapped, NAT64 and 6to4 spellings.
Numeric oddities (`http://2130706433/`, `http://0x7f.1/`) need no parser of our own:
the resolver turns them into an address, and the address is what is judged.

The check runs at submit (a clear 422 for the caller) and again at every delivery,
whose connection then goes to the address just checked (see `Target`), so a DNS
answer that changed to a forbidden address in between is refused, not followed.
"""
import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

from .admission import waiting
from .errors import InvalidCallback

SCHEMES = {"http": 80, "https": 443}

# Python's is_global has changed between patch releases; this list makes the verdict ours.
_FORBIDDEN = tuple(ipaddress.ip_network(n) for n in (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
    "192.0.0.0/24", "192.0.2.0/24", "192.88.99.0/24", "192.168.0.0/16", "198.18.0.0/15",
    "198.51.100.0/24", "203.0.113.0/24", "224.0.0.0/4", "240.0.0.0/4",
    "::/96", "::ffff:0:0/96", "64:ff9b:1::/48", "100::/64", "2001::/23", "2001:db8::/32",
    "fc00::/7", "fe80::/10", "fec0::/10", "ff00::/8",
))
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class ForbiddenAddress(InvalidCallback):
    """The callback host resolves to an address callbacks may not reach."""


class Unresolvable(InvalidCallback):
    """The callback host does not resolve (now: at delivery this may be passing)."""


@dataclass(frozen=True)
class Target:
    """A checked URL and the address to connect to instead of resolving its host again."""
    url: str
    scheme: str
    host: str       # the hostname as written (Host header, TLS SNI and certificate check)
    port: int
    address: str    # the checked IP address, as a string without brackets

    @property
    def host_header(self):
        """The Host header for the name as written (the connection goes to `address`)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == SCHEMES[self.scheme] else f"{host}:{self.port}"


def normalise(ip):
    """The IPv4 address an IPv6 spelling stands for (mapped, NAT64, 6to4), else `ip`."""
    if ip.version == 4:
        return ip
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip.sixtofour is not None:
        return ip.sixtofour
    return ip


def is_public(ip):
    """True if `ip` (already normalised) is globally routable and unicast."""
    if any(ip in net for net in _FORBIDDEN if net.version == ip.version):
        return False
    return ip.is_global and not (ip.is_multicast or ip.is_private or ip.is_reserved
                                 or ip.is_loopback or ip.is_link_local or ip.is_unspecified)


class UrlGuard:
    """Checks callback URLs; `allow` is CIDR strings that may be reached although not public."""

    def __init__(self, allow=(), resolver=socket.getaddrinfo):
        try:
            self.allow = tuple(ipaddress.ip_network(cidr, strict=False) for cidr in allow)
        except ValueError as exc:
            raise ValueError(f"callback_allow: {exc}") from None
        self._resolve = resolver

    def check(self, url):
        """The URL unchanged if a callback may go there; InvalidCallback otherwise."""
        self.target(url)
        return url

    def target(self, url):
        """Parse, resolve and judge `url`; the Target to connect to. Raises InvalidCallback."""
        scheme, host, port = self._parse(url)
        addresses = self._addresses(host, port)
        for ip in addresses:
            if not self.allowed(ip):
                # the address stays out of the message: it would tell a caller what a name
                # resolves to inside the server's network
                raise ForbiddenAddress(f"callback host {host} resolves to an address that is not "
                                       "public (an operator may allow it with --callback-allow)")
        return Target(url, scheme, host, port, str(addresses[0]))

    def allowed(self, ip):
        """True if `ip` is public, or it (or the IPv4 address it embeds) is in an allowed CIDR."""
        plain = normalise(ip)
        for candidate in {ip, plain}:
            if any(candidate in net for net in self.allow if net.version == candidate.version):
                return True
        return is_public(plain)

    @staticmethod
    def _parse(url):
        if not isinstance(url, str) or any(ord(c) <= 0x20 or ord(c) == 0x7F for c in url):
            raise InvalidCallback("callback_url must be a URL without spaces or control characters")
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise InvalidCallback(f"callback_url is not a valid URL: {exc}") from None
        scheme = parts.scheme.lower()
        if scheme not in SCHEMES:
            raise InvalidCallback("callback_url must be an http or https URL")
        if "@" in parts.netloc:
            raise InvalidCallback("callback_url must not carry a user name or password")
        if not parts.hostname:
            raise InvalidCallback("callback_url has no host")
        return scheme, parts.hostname, port or SCHEMES[scheme]

    def _addresses(self, host, port):
        """Every address the resolver gives for `host` (the first is the one to connect to)."""
        try:
            with waiting():  # DNS may take seconds
                answers = self._resolve(host, port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError):  # gaierror is an OSError; its text is the resolver's
            raise Unresolvable(f"callback host {host} does not resolve") from None
        addresses = []
        for _family, _type, _proto, _name, sockaddr in answers:
            try:
                ip = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
            except ValueError:
                raise ForbiddenAddress(f"callback host {host} resolves to an odd address") from None
            if ip not in addresses:
                addresses.append(ip)
        if not addresses:
            raise Unresolvable(f"callback host {host} does not resolve")
        return addresses
