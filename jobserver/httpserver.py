"""waitress as jobserver serves the API: `create_http_server(app, host=..., port=..., threads=...)`.

One thing differs from a plain `waitress.create_server`: the channel class. waitress's
main loop offers a connection to select() for writing whenever its output buffer holds
bytes. A request thread fills that buffer and then sends it itself (`write_soon`),
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
"""
from waitress.channel import HTTPChannel
from waitress.server import create_server

__all__ = ["create_http_server", "QuietChannel"]


class QuietChannel(HTTPChannel):
    """An HTTPChannel that the main loop leaves alone while a request thread is sending."""

    _sending = False  # True while a request thread is inside write_soon (it flushes itself)

    def write_soon(self, data):
        self._sending = True
        try:
            return super().write_soon(data)
        finally:
            self._sending = False

    def writable(self):
        if (self._sending and not (self.will_close or self.close_when_flushed)
                and self.total_outbufs_len < self.adj.outbuf_high_watermark):
            # at or above the watermark the sender may be waiting for the main loop to
            # flush, and waitress wakes it only once the buffer is below: flush then
            return False
        return super().writable()


def create_http_server(app, **options):
    """`waitress.create_server(app, **options)` whose connections are QuietChannels."""
    server = create_server(app, **options)
    # one listener is the server itself; several (a name with IPv4 and IPv6) share a map
    listeners = [server] if hasattr(server, "channel_class") else list(server.map.values())
    for listener in listeners:
        if hasattr(listener, "channel_class"):
            listener.channel_class = QuietChannel
    return server
