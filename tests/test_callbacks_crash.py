"""Deliveries are journaled: a server killed with -9 while its receiver is down delivers after a restart."""
import os
import signal
import subprocess
import sys
import textwrap

from callback_receiver import Receiver
from conftest import wait_for
from http_fixtures import TASKS
from liveserver import free_port
from standardwebhooks.webhooks import Webhook

from jobserver.journal import open_journal
from jobserver.server import JobServer

CHILD = textwrap.dedent("""
    import sys, time
    from jobserver.server import JobServer
    from jobserver.tasks import Registry

    tasks = Registry()

    @tasks.task("t.echo")
    def echo(ctx, **params):
        return params

    db, url = sys.argv[1], sys.argv[2]
    server = JobServer(db, tasks=tasks, poll_interval=0.05, callback_allow=("127.0.0.0/8",),
                       callback_attempts=100, callback_backoff=0.2, callback_timeout=1.0)
    server.deliverer.lease_ms = 1500  # a dead deliverer's claims come back soon in this test
    server.start()
    ids = [server.submit("t.echo", {"n": n}, callback_url=url) for n in range(3)]
    for job_id in ids:
        server.wait(job_id, 10)
    print(" ".join(ids), flush=True)
    time.sleep(120)
""")

def test_pending_deliveries_survive_kill_9(db_url, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}/hook"
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    child = subprocess.Popen([sys.executable, str(script), db_url, url], stdout=subprocess.PIPE,
                             text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    try:
        ids = child.stdout.readline().split()
        assert len(ids) == 3, "the child did not start"
        journal = open_journal(db_url)
        try:
            wait_for(lambda: all((journal.latest_callback(i) or {}).get("attempts", 0) >= 1 for i in ids),
                     message="a failed attempt for each job")
            first = {i: journal.latest_callback(i) for i in ids}
        finally:
            journal.close()
        assert all(cb["state"] == "pending" and cb["last_error"] == "ConnectionError" for cb in first.values())
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(10)
        child.stdout.close()

    receiver = Receiver(port)
    server = JobServer(db_url, tasks=TASKS, poll_interval=0.05, callback_allow=("127.0.0.0/8",),
                       callback_attempts=100, callback_backoff=0.05).start()
    try:
        for job_id in ids:
            wait_for(lambda: server.get(job_id)["callback"]["state"] == "delivered", timeout=15,
                     message=f"delivery of {job_id}")
        assert receiver.count() == 3
        webhook = Webhook(server.deliverer.secret)  # the secret the dead process made, from the journal
        bodies = {webhook.verify(r["body"], r["headers"])["id"]: r["headers"]["webhook-id"]
                  for r in receiver.requests}
        assert bodies == {i: first[i]["id"] for i in ids}  # one delivery per job, same webhook-id
    finally:
        server.stop()
        receiver.close()
