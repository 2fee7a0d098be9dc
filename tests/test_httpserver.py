"""jobserver's waitress channel: the main loop leaves a connection alone while a request
thread sends on it, and still delivers every byte a request thread left behind."""
import socket
import time

from flask import Flask, Response
from http_fixtures import serving
from waitress.adjustments import Adjustments

from jobserver.httpserver import QuietChannel

BIG = 12 * 1024 * 1024  # well past what the kernel's socket buffers take at once


def _channel(**state):
    channel = QuietChannel.__new__(QuietChannel)  # the rule reads only these attributes
    channel.adj = Adjustments()
    channel.will_close = channel.close_when_flushed = False
    channel.total_outbufs_len = 0
    for name, value in state.items():
        setattr(channel, name, value)
    return channel


def test_a_buffer_that_its_request_thread_is_sending_is_not_offered_to_select():
    assert not _channel(_sending=True, total_outbufs_len=500).writable()
    # outside write_soon, waitress's rule: bytes waiting are flushed by the main loop
    assert _channel(_sending=False, total_outbufs_len=500).writable()
    assert not _channel(_sending=False, total_outbufs_len=0).writable()


def test_the_main_loop_still_flushes_when_the_sender_waits_for_it_or_the_channel_closes():
    high = Adjustments().outbuf_high_watermark
    # past the high watermark the sender blocks until the main loop drains the buffer, and
    # waitress wakes it only below the mark: at the mark exactly the loop must flush too
    assert _channel(_sending=True, total_outbufs_len=high + 1).writable()
    assert _channel(_sending=True, total_outbufs_len=high).writable()
    assert not _channel(_sending=True, total_outbufs_len=high - 1).writable()
    assert _channel(_sending=True, total_outbufs_len=500, will_close=True).writable()
    assert _channel(_sending=True, total_outbufs_len=500, close_when_flushed=True).writable()


def _slow_get(base, path, pause=0.5):
    """GET `path` with a small receive buffer, reading nothing for `pause` seconds first,
    so that the server's sends stop short and leave bytes in its buffers."""
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        time.sleep(pause)
        data = bytearray()
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    return head, body


def test_a_large_answer_to_a_slow_reader_arrives_whole():
    app = Flask("big")
    payload = bytes(range(256)) * (BIG // 256)
    app.add_url_rule("/big", "big", lambda: Response(payload, mimetype="application/octet-stream"))
    with serving(app) as base:
        head, body = _slow_get(base, "/big")
    assert head.startswith(b"HTTP/1.1 200") and body == payload


def test_a_streamed_answer_to_a_slow_reader_arrives_whole():
    chunks = [bytes([i]) * (512 * 1024) for i in range(12)]

    def stream():
        for chunk in chunks:
            yield chunk
            time.sleep(0.02)  # the request thread is out of write_soon between chunks

    app = Flask("stream")
    app.add_url_rule("/stream", "stream", lambda: Response(stream(), mimetype="text/plain"))
    with serving(app) as base:
        head, body = _slow_get(base, "/stream")
    assert head.startswith(b"HTTP/1.1 200")
    # chunked transfer encoding: strip the framing and compare the bytes
    decoded, rest = bytearray(), body
    while rest:
        size_text, _, rest = rest.partition(b"\r\n")
        size = int(size_text, 16)
        if size == 0:
            break
        decoded += rest[:size]
        rest = rest[size + 2:]
    assert bytes(decoded) == b"".join(chunks)
