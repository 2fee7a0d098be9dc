"""waitress as jobserver serves the API: `create_http_server(app, host=..., port=..., threads=...)`.

Two things differ from a plain `waitress.create_server`: how connections are bounded,
and the channel class.

Connections: waitress accepts 100 at most by default and closes one only after 120 s
without a byte, so 100 clients that connect and send nothing, or that send a request
head a byte at a time, shut everyone else out. Here the limit is high (`max_connections`,
lowered to fit the process's open-file limit), the main loop uses poll() (select()
cannot watch a descriptor numbered 1024 or more), and a sweep once a second closes
every connection that is not being served and has sent no complete request head within
`header_timeout` (counted from the connect for the first request, from its first byte
for later ones), no complete request within `body_timeout`, or nothing at all for
`idle_timeout` between requests. The sweep costs one pass over the connections a
second; the loop itself does nothing more per connection than waitress does. A request
that is being served (a long poll) is never swept. And the loop accepts up to
ACCEPT_BURST waiting connections a turn instead of one, so a new client is not queued
behind a flood of connects.

The channel class: waitress's main loop offers a connection to select() for writing
whenever its output buffer holds bytes. A request thread fills that buffer and then sends it itself (`write_soon`),
releasing the GIL inside send(); in that moment the main loop sees a non-empty buffer,
select() answers at once (the socket is writable), the flush finds the buffer locked by
the sender, and the loop goes round again, over every connection, without ever blocking.
The sender needs the GIL back to finish, and the spinning loop holds it, so each
response could cost milliseconds of spinning. Under wrk with 50 connections a jobserver
process spent a whole core there (about 6,000 idle loops a second for 250 POSTs) and
single-job POST throughput rose 2.6x once the loop stopped offering connections whose
buffer a request thread is flushing right now. Everything else stays waitress's own:
the loop still flushes what a request thread left behind (a slow client, a full buffer
past the high watermark) as soon as that thread is out of write_soon.

And the loop's poll: at every turn waitress asks each connection readable() and
writable(), two Python calls. A connection whose request is being served with nothing
left to send answers no to both (waitress reads nothing while it serves a request), and
an open event stream is such a connection for minutes: with 200 of them open, those
calls cost more than the requests themselves (single-job POSTs dropped by a quarter).
The loop here skips such a connection after one test of its attributes (QuietLoop).
"""
import errno
import logging
import math
import select
import socket
import time

from waitress import wasyncore
from waitress.channel import HTTPChannel
from waitress.parser import HTTPRequestParser
from waitress.server import create_server

try:
    import resource
except ImportError:  # not on Windows: no limit to read or raise there
    resource = None

__all__ = ["create_http_server", "QuietChannel", "QuietLoop", "connection_limit", "raise_open_file_limit"]

log = logging.getLogger(__name__)

#: open files kept for everything but client connections: journal connections, callback
#: sockets, log files, waitress's own trigger pipe and the temporary files of large bodies
FD_RESERVE = 256
#: seconds between sweeps (waitress's cleanup_interval, a whole number)
SWEEP_INTERVAL = 1
#: where the open-file limit is "unlimited", what to raise the soft limit to
UNLIMITED_FILES = 1 << 20
#: connections accepted per turn of the main loop (waitress takes one, and a turn visits
#: every connection: a flood of 1,000 connects kept a new client waiting 0.4 s)
ACCEPT_BURST = 64


class TimedRequest(HTTPRequestParser):
    """waitress's request parser, remembering when the request's first byte arrived."""

    def __init__(self, adj):
        super().__init__(adj)
        self.started = time.time()  # waitress's clock (channel times are time.time() too)


class QuietChannel(HTTPChannel):
    """An HTTPChannel that the main loop leaves alone while a request thread is sending,
    and that keeps what the sweep needs: when its request began, whether it answered one."""

    parser_class = TimedRequest
    _sending = False  # True while a request thread is inside write_soon (it flushes itself)
    answered = False  # once a response began, a later request's clock starts at its first byte

    def write_soon(self, data):
        self._sending = self.answered = True
        try:
            return super().write_soon(data)
        finally:
            self._sending = False

    def check_client_disconnected(self):
        """True once the client has gone: waitress's own answer, or the end of the socket
        seen without reading it (waitress reads nothing while a request is served, so a
        long response, an event stream, would notice a close only when a write failed)."""
        if not self.connected:
            return True
        try:
            return self.socket.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except (BlockingIOError, InterruptedError):
            return False  # open, nothing sent: the usual case
        except OSError:
            return True

    def writable(self):
        if (self._sending and not (self.will_close or self.close_when_flushed)
                and self.total_outbufs_len < self.adj.outbuf_high_watermark):
            # at or above the watermark the sender may be waiting for the main loop to
            # flush, and waitress wakes it only once the buffer is below: flush then
            return False
        return super().writable()


class QuietLoop:
    """Stands in for the `wasyncore` module as a server's loop (`server.asyncore`): its
    `loop` polls as wasyncore.poll2 does, but a QuietChannel serving a request with nothing
    to send or close is left out at the cost of one test (see the module)."""

    dispatcher = wasyncore.dispatcher

    @staticmethod
    def loop(timeout=30.0, use_poll=True, map=None, count=None):
        if map is None:
            map = wasyncore.socket_map
        turns = None if count is None else int(count)
        while map and (turns is None or turns > 0):
            QuietLoop.poll(timeout, map)
            if turns is not None:
                turns -= 1

    @staticmethod
    def poll(timeout, map):
        pollster = select.poll()
        for fd, obj in list(map.items()):
            if (obj.__class__ is QuietChannel and obj.requests and not obj.total_outbufs_len
                    and not obj.will_close and not obj.close_when_flushed):
                continue  # serving, nothing to send: readable() and writable() would say no
            flags = 0
            if obj.readable():
                flags |= select.POLLIN | select.POLLPRI
            if obj.writable() and not obj.accepting:  # a listener is never writable
                flags |= select.POLLOUT
            if flags:
                pollster.register(fd, flags)
        try:
            ready = pollster.poll(None if timeout is None else int(timeout * 1000))
        except OSError as exc:
            if exc.args[0] != errno.EINTR:
                raise
            ready = []
        for fd, flags in ready:
            obj = map.get(fd)
            if obj is not None:
                wasyncore.readwrite(obj, flags)


class Sweep:
    """A listener's `maintenance(now)`: close the connections that overstay (see the module)."""

    def __init__(self, listener, idle_timeout, header_timeout, body_timeout):
        self.listener = listener
        self.idle_timeout = idle_timeout
        self.header_timeout = header_timeout
        self.body_timeout = body_timeout

    def __call__(self, now):
        dropped = 0
        for channel in list(self.listener.active_channels.values()):
            if channel.requests or channel.will_close:
                continue  # being served, or closing already
            if self.overstays(channel, now):
                channel.will_close = True  # the main loop closes it (writable() says so)
                dropped += 1
        if dropped:
            log.info("closed %d connections that sent no complete request in time (head %gs, "
                     "request %gs, idle %gs)", dropped, self.header_timeout, self.body_timeout,
                     self.idle_timeout)

    def overstays(self, channel, now):
        request = channel.request  # the request being received, or None between requests
        if request is None:
            if not channel.answered and channel.last_activity == channel.creation_time:
                return now - channel.creation_time > self.header_timeout  # not a byte yet
            return now - channel.last_activity > self.idle_timeout
        began = request.started if channel.answered else channel.creation_time
        limit = self.body_timeout if request.headers_finished else self.header_timeout
        return now - began > limit


def connection_limit(wanted):
    """`wanted`, lowered so that the connections fit the open-file limit with FD_RESERVE to
    spare (past it accept() would fail, and waitress's loop would spin on the listener)."""
    if resource is None:
        return wanted
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return wanted
    return max(1, min(wanted, soft - FD_RESERVE))


def raise_open_file_limit():
    """Raise this process's soft open-file limit to its hard limit; the soft limit now.

    A process starts with 1,024 on most systems, too few for thousands of connections."""
    if resource is None:
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = UNLIMITED_FILES if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:  # e.g. above the kernel's nr_open
            log.warning("cannot raise the open-file limit from %s to %s: %s", soft, target, exc)
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def create_http_server(app, *, max_connections=10_000, idle_timeout=60.0, header_timeout=10.0,
                       body_timeout=60.0, **options):
    """`waitress.create_server(app, **options)` with bounded connections (see the module)
    whose connections are QuietChannels. Times are seconds; each must be positive."""
    for name, value in (("max_connections", max_connections), ("idle_timeout", idle_timeout),
                        ("header_timeout", header_timeout), ("body_timeout", body_timeout)):
        if not value > 0:
            raise ValueError(f"{name} must be positive, not {value!r}")
    options.setdefault("connection_limit", connection_limit(max_connections))
    options.setdefault("asyncore_use_poll", True)
    # the sweep replaces waitress's idle check; channel_timeout says the same for the record
    server = create_server(app, cleanup_interval=SWEEP_INTERVAL,
                           channel_timeout=max(1, math.ceil(idle_timeout)), **options)
    # one listener is the server itself; several (a name with IPv4 and IPv6) share a map
    listeners = [server] if hasattr(server, "channel_class") else list(server.map.values())
    if server.adj.channel_request_lookahead == 0 and hasattr(select, "poll"):  # else keep waitress's
        server.asyncore = QuietLoop
    for listener in listeners:
        if hasattr(listener, "channel_class"):
            listener.channel_class = QuietChannel
            listener.maintenance = Sweep(listener, idle_timeout, header_timeout, body_timeout)
            listener.handle_accept = _accept_burst(listener)
    return server


def _accept_burst(listener):
    """The listener's handle_accept, run until the queue is empty, ACCEPT_BURST connections
    are taken or the connection limit is reached (waitress's own takes one connection)."""
    accept_one = listener.handle_accept

    def handle_accept():
        for _ in range(ACCEPT_BURST):
            count = len(listener._map)
            if count >= listener.adj.connection_limit:
                return
            accept_one()
            if len(listener._map) == count:  # nothing was waiting (or accept() failed)
                return
    return handle_accept
