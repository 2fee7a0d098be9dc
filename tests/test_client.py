"""The Python client against a real `jobserver serve` subprocess."""
import pytest
from conftest import wait_for
from liveserver import ServeProcess, free_port

from jobserver.client import Client, ConnectionFailed, ProblemError, RemoteJobError


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("client")
    with ServeProcess(tmp / "serve.log", db=f"sqlite:///{tmp / 'journal.db'}") as proc:
        yield proc


@pytest.fixture
def client(live):
    with Client(live.url, timeout=5) as c:
        yield c


def test_submit_and_get_result(client):
    handle = client.submit("demo.echo", a=1, task="not the task", nested={"x": [1, 2]})
    assert handle.id and handle.job["task"] == "demo.echo"
    assert handle.get(timeout=15) == {"a": 1, "task": "not the task", "nested": {"x": [1, 2]}}
    assert handle.ready() and handle.successful() and not handle.failed()
    assert handle.state == "succeeded"
    assert handle.result == {"a": 1, "task": "not the task", "nested": {"x": [1, 2]}}
    assert handle.traceback is None
    assert client.get(handle.id)["state"] == "succeeded"
    assert client.handle(handle.id).result == handle.result


def test_remote_error_is_raised_with_traceback(client):
    handle = client.submit_with("demo.fail", {"message": "boom"}, max_retries=0)
    with pytest.raises(RemoteJobError) as caught:
        handle.get(timeout=15)
    err = caught.value
    assert err.type == "RuntimeError" and err.message == "boom" and err.state == "failed"
    assert "RuntimeError: boom" in err.traceback
    assert handle.ready() and not handle.successful() and handle.failed()
    assert handle.result is None
    assert "RuntimeError: boom" in handle.traceback
    assert handle.get(propagate=False)["type"] == "RuntimeError"


def test_timeout_cancel_and_retry(client):
    handle = client.submit("demo.sleep", seconds=60)
    with pytest.raises(TimeoutError):
        handle.get(timeout=0.3)
    assert not handle.ready()
    wait_for(lambda: handle.state == "running", message="sleep running")
    handle.cancel()
    with pytest.raises(RemoteJobError) as caught:
        handle.get(timeout=15)
    assert caught.value.state == "cancelled" and caught.value.type == "JobCancelled"
    handle.retry()
    assert handle.job["state"] in ("queued", "running")
    handle.cancel()
    assert handle.wait(timeout=15).job["state"] == "cancelled"


def test_options_idempotency_and_list(client):
    first = client.submit_with("demo.echo", {"k": 1}, idempotency_key="client-key-1", priority=5)
    again = client.submit_with("demo.echo", {"k": 1}, idempotency_key="client-key-1")
    assert again.id == first.id
    delayed = client.submit_with("demo.echo", {"k": 2}, delay=3600)
    jobs, _next = client.list(state="queued", task="demo.echo")
    assert delayed.id in [job["id"] for job in jobs]
    page, cursor = client.list(limit=1)
    assert len(page) == 1 and cursor is not None
    client.cancel(delayed.id)
    with pytest.raises(TypeError):
        client.submit_with("demo.echo", {}, colour="red")


def test_http_errors_carry_the_problem(client):
    with pytest.raises(ProblemError) as caught:
        client.get("no-such-job")
    assert caught.value.status == 404 and caught.value.title
    with pytest.raises(ProblemError) as caught:
        client.submit("no.such.task")
    assert caught.value.status == 422 and "no.such.task" in caught.value.detail
    done = client.submit("demo.echo")
    done.get(timeout=15)
    with pytest.raises(ProblemError) as caught:
        done.cancel()
    assert caught.value.status == 409


def test_unreachable_server_raises_connection_failed():
    with Client(f"http://127.0.0.1:{free_port()}", timeout=2) as client:
        with pytest.raises(ConnectionFailed):
            client.get("anything")
