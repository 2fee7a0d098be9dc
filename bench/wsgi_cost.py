"""Instructions per request of jobserver's WSGI app against bare Flask, without sockets.

wrk on this 2-core VM moves ±20 % from one minute to the next; an instruction count
does not. This calls the apps in-process, one request at a time, under valgrind's
callgrind twice (with a few and with many requests) and prints the difference per
request, so a change to the request path can be judged on its own:

    .venv/bin/python -m bench.wsgi_cost                 # hello, get, tasks, post, post-run
    .venv/bin/python -m bench.wsgi_cost get post --requests 1000

`post-run` also starts the pool, so its count includes claiming, running and finishing
each job. Kernel time (fsync) and waiting are not counted: this measures work, not
contention. Needs valgrind (apt-get install valgrind).
"""
import argparse
import io
import json
import random
import re
import shutil
import subprocess
import sys
import tempfile

KINDS = ("hello", "get", "tasks", "post", "post-run")
BODY = b'{"task": "bench.noop"}'


def _environ(method, path, body=b""):
    return {"REQUEST_METHOD": method, "PATH_INFO": path, "QUERY_STRING": "", "SERVER_NAME": "127.0.0.1",
            "SERVER_PORT": "8080", "SERVER_PROTOCOL": "HTTP/1.1", "wsgi.url_scheme": "http",
            "wsgi.input": io.BytesIO(body), "wsgi.errors": sys.stderr, "wsgi.multithread": True,
            "wsgi.multiprocess": False, "wsgi.run_once": False, "CONTENT_LENGTH": str(len(body)),
            "CONTENT_TYPE": "application/json", "HTTP_HOST": "127.0.0.1:8080", "REMOTE_ADDR": "127.0.0.1"}


def _call(app, environ):
    out = app(environ, lambda status, headers, exc_info=None: None)
    body = b"".join(out)
    if hasattr(out, "close"):
        out.close()
    return body


def run(kind, requests):
    """Make the app for `kind` and put `requests` requests to it (the measured part)."""
    random.seed(1)
    if kind == "hello":
        from bench.http_apps import hello_app
        app, server = hello_app(), None
        make = lambda: _environ("GET", "/")  # noqa: E731
    else:
        import bench.bench_tasks  # noqa: F401  registers bench.noop
        from jobserver import JobServer
        from jobserver.http import create_app
        server = JobServer(f"sqlite:///{tempfile.mkdtemp()}/j.db", workers=8, poll_interval=5)
        if kind == "post-run":
            server.start()
        app = create_app(server)
        ids = [job["id"] for job, _ in server.submit_many([{"task": "bench.noop"}] * 200)]
        make = {"get": lambda: _environ("GET", "/jobs/" + random.choice(ids)),
                "tasks": lambda: _environ("GET", "/tasks"),
                "post": lambda: _environ("POST", "/jobs", BODY),
                "post-run": lambda: _environ("POST", "/jobs", BODY)}[kind]
    for _ in range(requests):
        _call(app, make())
    if server is not None:
        if kind == "post-run":  # count the running of every job too
            last = json.loads(_call(app, _environ("POST", "/jobs", BODY)))["id"]
            server.wait(last, 600)
        server.stop()


def _instructions(kind, requests):
    argv = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable,
            "-m", "bench.wsgi_cost", "--inner", kind, "--requests", str(requests)]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=3600).stderr
    match = re.search(r"Collected : (\d+)", out)
    if match is None:
        raise RuntimeError(f"callgrind printed no count for {kind}: {out[-400:]}")
    return int(match.group(1))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("kinds", nargs="*", default=list(KINDS), help=", ".join(KINDS))
    p.add_argument("--requests", type=int, default=500, help="requests in the long run (default 500)")
    p.add_argument("--inner", help=argparse.SUPPRESS)  # one run, under callgrind
    args = p.parse_args()
    if args.inner:
        return run(args.inner, args.requests)
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind not found: apt-get install -y valgrind")
    for kind in args.kinds:
        if kind not in KINDS:
            raise SystemExit(f"unknown kind {kind}; choose from {', '.join(KINDS)}")
    counts = {}
    for kind in args.kinds:
        short, long = _instructions(kind, 100), _instructions(kind, 100 + args.requests)
        counts[kind] = (long - short) / args.requests
        print(f"{kind}: {counts[kind]:,.0f} instructions/request", flush=True)
    if "hello" in counts:
        print("÷ hello: " + ", ".join(f"{k} {v / counts['hello']:.2f}" for k, v in counts.items()))
    return None


if __name__ == "__main__":
    main()
