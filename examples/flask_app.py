"""An existing Flask app that hands its slow work to an in-process jobserver.

    .venv/bin/python examples/flask_app.py    # PORT (5000) and JOBS_DB (sqlite:///example.db)
    curl -d '{"projname": "demo"}' http://127.0.0.1:5000/projects

POST /projects answers at once with the app's own envelope and a status URL; the job
runs in this process; GET /projects/<id> reads its state from the journal, so it is
right after a restart too; jobserver POSTs the outcome, signed, to /hooks/jobserver."""
import logging
import os
import signal

from flask import Flask, jsonify, request, url_for
from waitress import serve

from jobserver import JobNotFound, JobServer, JobserverError, callbacks
from jobserver.http import init_app

log = logging.getLogger("flask_app")
PENDING = ("queued", "running")


def create_app(server, public_url):
    """The app: its own routes, plus the jobserver API mounted under /jobserver."""
    app = Flask(__name__)
    init_app(app, server, url_prefix="/jobserver")
    secret = callbacks.signing_secret(server.journal, server.config)

    @app.post("/projects")
    def create_project():
        body = request.get_json(force=True, silent=True) or {}
        if not isinstance(body.get("projname"), str) or not body["projname"].strip():
            return jsonify(status=1, msg="projname is required", data=None), 400
        params = {"projname": body["projname"], "prodesc": body.get("prodesc")}
        try:
            job_id = server.submit("demo.create_project", params,
                                   callback_url=f"{public_url}/hooks/jobserver")
        except JobserverError as exc:
            return jsonify(status=1, msg=str(exc), data=None), 503
        status_url = url_for("jobserver.get_job", job_id=job_id, _external=True)
        return jsonify(status=2, msg="pending", data={"job_id": job_id, "status_url": status_url}), 202

    @app.get("/projects/<job_id>")
    def project_status(job_id):
        """The project's job as the journal has it: no copy of job state lives in the app."""
        try:
            job = server.get(job_id)
        except JobNotFound:
            return jsonify(status=1, msg="no such project", data={"job_id": job_id}), 404
        except JobserverError as exc:
            return jsonify(status=1, msg=str(exc), data=None), 503
        if job["state"] in PENDING:
            return jsonify(status=2, msg="pending", data={"job_id": job_id, "state": job["state"]})
        return jsonify(status=0 if job["state"] == "succeeded" else 1, msg=job["state"],
                       data={"job_id": job_id, "state": job["state"], "result": job["result"],
                             "error": job["error"]})

    @app.post("/hooks/jobserver")
    def jobserver_hook():
        """Where jobserver says a job ended: the moment to notify a user or mark a row of
        the app's own (here: a log line). The state stays the journal's to tell."""
        try:  # Standard Webhooks: the `standardwebhooks` package verifies these too
            callbacks.verify(secret, request.headers, request.get_data())
        except callbacks.InvalidSignature:
            return jsonify(status=1, msg="bad signature", data=None), 401
        job = request.get_json(force=True)
        log.info("verified callback for job %s: %s (webhook-id %s)", job["id"], job["state"],
                 request.headers.get("webhook-id"))
        return "", 204  # any 2xx: delivered (a repeat with the same webhook-id is harmless here)

    return app


def _interrupt(_signum, _frame):
    raise KeyboardInterrupt  # SIGTERM as Ctrl-C: waitress returns and the pool stops gracefully


def main():
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGTERM, _interrupt)
    port = int(os.environ.get("PORT", "5000"))
    public_url = f"http://127.0.0.1:{port}"
    # the callback goes to this very app on loopback, which the SSRF guard refuses unless allowed
    server = JobServer(os.environ.get("JOBS_DB", "sqlite:///example.db"), tasks=["jobserver.demo"],
                       workers=4, callback_allow=("127.0.0.0/8",))
    app = create_app(server, public_url)
    with server:  # start the pool; stop it (running jobs get a grace period) when serve returns
        serve(app, host="127.0.0.1", port=port, threads=8)


if __name__ == "__main__":
    main()
