"""The HTTP apps bench/http_throughput.py measures, each served by waitress in its own process.

    python -m bench.http_apps hello --port P          # bare Flask: GET / -> "hello"
    python -m bench.http_apps celery --port P         # Flask + Celery .delay() + Redis: POST /jobs
    python -m bench.http_apps jobserver --port P --db URL
        # jobserver's create_app in-process (fallback when `jobserver serve` does not start)
"""
import argparse

from flask import Flask, jsonify
from waitress import serve


def hello_app():
    app = Flask("hello")

    @app.get("/")
    def hello():
        return "hello"

    return app


def celery_app():
    """The seed stack: a Flask route that hands the job to Celery through Redis."""
    from bench.celery_app import noop

    app = Flask("celery_stack")

    @app.post("/jobs")
    def submit():
        result = noop.delay()
        return jsonify({"id": result.id, "state": "queued"}), 202, {"Location": f"/jobs/{result.id}"}

    @app.get("/")
    def hello():
        return "hello"

    return app


def jobserver_app(db, workers):
    import bench.bench_tasks  # noqa: F401  registers bench.noop
    from jobserver import JobServer
    from jobserver.http import create_app

    server = JobServer(db, workers=workers).start()
    return create_app(server)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("app", choices=("hello", "celery", "jobserver"))
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--db", default="sqlite:////tmp/jsbench-http.db")
    p.add_argument("--workers", type=int, default=8)
    args = p.parse_args()
    app = {"hello": hello_app, "celery": celery_app,
           "jobserver": lambda: jobserver_app(args.db, args.workers)}[args.app]()
    serve(app, host="127.0.0.1", port=args.port, threads=args.threads, _quiet=True)


if __name__ == "__main__":
    main()
