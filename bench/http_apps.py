"""The HTTP apps bench/http_throughput.py measures, each served by waitress in its own process.

    python -m bench.http_apps hello --port P
        # bare Flask: GET /, GET /jobs/<id> and POST /jobs answer "hello"
    python -m bench.http_apps floor --port P --db PATH --ids FILE
        # bare Flask doing the least SQLite work a durable job API does: GET /jobs/<id> reads
        # one row by primary key, POST /jobs inserts one row and commits (synchronous=FULL)
    python -m bench.http_apps celery --port P         # Flask + Celery .delay() + Redis: POST /jobs
    python -m bench.http_apps jobserver --port P --db URL
        # jobserver's create_app in-process (fallback when `jobserver serve` does not start)
"""
import argparse
import json
import sqlite3
import threading
import uuid

from flask import Flask, Response, jsonify, request
from waitress import serve


def hello_app():
    app = Flask("hello")

    @app.get("/")
    def hello():
        return "hello"

    @app.get("/jobs/<job_id>")
    def hello_job(job_id):  # the same URL shape (and wrk script) as jobserver's GET
        return "hello"

    @app.post("/jobs")
    def hello_post():  # the same request as jobserver's POST; the body is read, nothing kept
        request.get_data()
        return "hello", 202

    return app


def floor_app(db, ids_file):
    """What any Flask endpoint over a SQLite WAL journal pays, with nothing of jobserver:
    one connection per thread, a primary-key SELECT per poll, an INSERT + COMMIT per submit."""
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("CREATE TABLE IF NOT EXISTS jobs (id TEXT PRIMARY KEY, task TEXT NOT NULL, "
                     "params TEXT NOT NULL, state TEXT NOT NULL, created_at INTEGER NOT NULL)")
        with open(ids_file) as f:
            conn.executemany("INSERT OR IGNORE INTO jobs VALUES (?, 'bench.noop', '{}', 'succeeded', 0)",
                             [(line.strip(),) for line in f if line.strip()])
    local = threading.local()

    def connection():
        conn = getattr(local, "conn", None)
        if conn is None:
            conn = local.conn = sqlite3.connect(db, isolation_level=None, timeout=10)
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = FULL")
        return conn

    app = Flask("floor")

    @app.get("/")
    def hello():
        return "hello"

    @app.get("/jobs/<job_id>")
    def get_job(job_id):
        row = connection().execute("SELECT id, task, params, state, created_at FROM jobs WHERE id = ?",
                                   (job_id,)).fetchone()
        if row is None:
            return Response("{}", status=404, mimetype="application/json")
        body = {"id": row[0], "task": row[1], "params": json.loads(row[2]), "state": row[3],
                "created_at": row[4]}
        return Response(json.dumps(body), mimetype="application/json")

    @app.post("/jobs")
    def submit():
        spec = json.loads(request.get_data())
        job_id = str(uuid.uuid4())
        conn = connection()
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT INTO jobs VALUES (?, ?, ?, 'queued', 0)",
                     (job_id, spec["task"], json.dumps(spec.get("params", {}))))
        conn.execute("COMMIT")
        return Response(json.dumps({"id": job_id, "state": "queued"}), status=202,
                        mimetype="application/json", headers={"Location": f"/jobs/{job_id}"})

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
    p.add_argument("app", choices=("hello", "floor", "celery", "jobserver"))
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--db", default="sqlite:////tmp/jsbench-http.db")
    p.add_argument("--ids", help="floor: a file of job ids (one a line) to have in the table")
    p.add_argument("--workers", type=int, default=8)
    args = p.parse_args()
    if args.app == "jobserver":  # served as `jobserver serve` serves it
        from jobserver.httpserver import create_http_server
        create_http_server(jobserver_app(args.db, args.workers), host="127.0.0.1", port=args.port,
                           threads=args.threads, _quiet=True).run()
        return
    app = {"hello": hello_app, "celery": celery_app,
           "floor": lambda: floor_app(args.db, args.ids)}[args.app]()
    serve(app, host="127.0.0.1", port=args.port, threads=args.threads, _quiet=True)


if __name__ == "__main__":
    main()
