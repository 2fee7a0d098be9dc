"""A real `jobserver serve` subprocess on a free 127.0.0.1 port, for the CLI and client tests."""
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from http_fixtures import FAST

BIN = Path(sys.executable).parent
JOBSERVER = str(BIN / "jobserver")
# the suite's short intervals as serve flags (a shorter lease: a killed serve's jobs return sooner)
FAST_FLAGS = [word for name, value in dict(FAST, lease_seconds=3).items()
              for word in (f"--{name.replace('_', '-')}", str(value))]


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def clean_env(**extra):
    """This process's environment without JOBSERVER_* (tests set what they mean), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOBSERVER_")}
    env.update(extra)
    return env


def run_cli(*args, env=None, timeout=60):
    """`jobserver ARGS` to completion: CompletedProcess with text stdout/stderr."""
    return subprocess.run([JOBSERVER, *args], capture_output=True, text=True, timeout=timeout,
                          env=env if env is not None else clean_env())


class ServeProcess:
    """`jobserver serve` with the demo tasks; `args` replace the default flags when given,
    `cwd` is where it runs (default: here)."""

    def __init__(self, log_path, db=None, port=None, args=None, env=None, cwd=None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_path)
        cmd = [JOBSERVER, "serve"]
        if args is None:
            args = ["--db", db, "--port", str(self.port), "--tasks", "jobserver.demo", *FAST_FLAGS]
        self.cmd = cmd + list(args)
        self.env = env if env is not None else clean_env()
        self.cwd = cwd
        self.proc = None

    def start(self, timeout=30):
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                         cwd=self.cwd)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"serve exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if requests.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.05)
        self.kill()
        pytest.fail(f"serve did not become healthy:\n{self.log()}")

    def log(self):
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, sig=signal.SIGTERM, timeout=30):
        """Send `sig` and return the exit status."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"serve did not stop within {timeout} s:\n{self.log()}")

    def kill(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.stop()
        self.kill()
