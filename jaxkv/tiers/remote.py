"""`RemoteTier`: host rows in a Redis or Valkey server that several server instances share.

One key per block, holding the bytes a `DiskTier` block file holds
(`jaxkv.tiers.blockformat`): the 96-byte header (magic `JAXKVBLK`, format
version, header length, layout fingerprint, block hash, payload length,
xxh3-64 checksum of the payload), then the payload, one row in its stored
form (`RowLayout.stored`: the same bytes at every TP degree, so an instance
at TP 2 reads what one at TP 4 wrote). The key names the deployment, the stored layout and the block:

```
<prefix><first 16 bytes of the layout fingerprint, hex>:<block hash, 64 hex digits>
```

so instances of another model or layout never read each other's keys, and
a Redis Cluster spreads the blocks over its hash slots (no hash tags).

- **Write-once.** `SET key value NX`: a block is never overwritten, so a
  reader never sees a value change under it; a key another instance already
  wrote answers "already held".
- **Pipelined.** `put_many` / `get_many` / `contains_many` send their
  commands in batches (`batch_blocks`, `batch_bytes`), one round trip each.
- **Verified on every read.** Length first (a value of the wrong size is
  never copied), then header (magic, version, fingerprint, block hash,
  payload length), then checksum; only then are the payload bytes copied into
  the `out` row jaxkv owns. A value that fails is a miss, counted in
  `corrupt`, and its key is deleted.
- **Authenticated with a key.** Without one (`key=None` and no
  `$JAXKV_BLOCK_KEY`) the tier trusts everyone who can write to the server:
  another tenant or a compromised instance can compute a block's hash and plant
  a value with a valid header and checksum, and every instance then serves it.
  With a deployment secret (`key=`, or `$JAXKV_BLOCK_KEY`) every value carries
  a keyed BLAKE3 MAC over header (fingerprint, block hash, length) and
  payload (`jaxkv.tiers.blockformat`, version 2), checked instead of the
  checksum before any byte is copied: an unkeyed value, one written under
  another key or altered is a miss, counted in `corrupt` and in `forged`,
  and its key is deleted. A tier without a key meets a keyed value as a miss
  and leaves it (it cannot judge it). Give every instance of a deployment the
  same key; keyed and unkeyed deployments want different prefixes.
- **Namespaces hold.** A prefix may hold any character: where it reaches a
  `SCAN MATCH` pattern (`clear`) every glob character is escaped, so
  `clear()` under `team-?:` deletes `team-?:`'s keys and never `team-a:`'s.
- **Never blocks serving.** Every call runs under the client's socket and
  connect timeouts, with no retries. A server that cannot be reached, or does
  not answer in time, makes the tier *unavailable* for `retry_interval`
  seconds: calls answer at once (misses, `RemoteUnavailable` per block) without
  touching the network, and the outage is logged once, as is the recovery.
  A connection that failed is dropped, so a late reply is never read as the
  answer to a later command.

The server, not this tier, decides what to evict (configure `maxmemory` and
`maxmemory-policy allkeys-lru`): this instance cannot see what others store
or read. `used_bytes` is what *this instance* wrote and has not seen go;
`capacity_bytes` is the budget given, or the server's `maxmemory`.
"""

from __future__ import annotations

import concurrent.futures
import logging
import time
import urllib.parse
from collections import OrderedDict

import numpy as np

try:
    import redis
    from redis.backoff import NoBackoff
    from redis.exceptions import AuthenticationError, NoPermissionError
    from redis.retry import Retry
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("jaxkv.tiers.remote needs redis-py: pip install 'jaxkv[remote]'") from e

from jaxkv._checks import check_int, check_positive_int, check_positive_seconds
from jaxkv.tiers.base import OpensOnce, check_block_hashes, check_row
from jaxkv.tiers.blockformat import (
    HEADER_BYTES,
    BlockKey,
    CorruptBlockError,
    ForgedBlockError,
    KeyedBlockError,
    pack_header_into,
    trailer_bytes,
    verify_header,
    verify_payload,
)

log = logging.getLogger(__name__)

DEFAULT_URL = "redis://127.0.0.1:6379/0"
"""A server on this machine, database 0."""

UNLIMITED = 2**63 - 1
"""`capacity_bytes` when the server has no `maxmemory` (or will not say) and no budget was given."""

DEFAULT_BATCH_BLOCKS = 32
DEFAULT_BATCH_BYTES = 32 << 20
"""A batch is one round trip and its replies are held in memory at once: large enough that the round trip
(well under a millisecond in a data centre) is small beside the transfer (32 MiB at 10 Gb/s: about 27 ms),
small enough to bound that memory."""

_FINGERPRINT_KEY_BYTES = 16
"""Fingerprint bytes in a key: enough to keep layouts apart; the header carries all 32 and is checked."""

_NETWORK_ERRORS = (redis.RedisError, OSError)
"""What a failed round trip raises: connection refused or reset, a timeout, a server still loading."""


_REFUSED = (AuthenticationError, NoPermissionError)
"""What a server that answers but refuses this user raises: a configuration error, reported once at open."""


class RemoteUnavailable(Exception):
    """The server could not be reached or did not answer in time: nothing was stored or read."""


class RemoteWriteError(Exception):
    """The server refused to store a block (out of memory under `maxmemory-policy noeviction`, ...)."""


class RemoteAccessError(Exception):
    """The server refuses this user (wrong password, or an ACL without the prefix's keys): raised once, at open."""


class RemoteTier(OpensOnce):
    """Rows in a Redis/Valkey server, one verified key per block, shared by server instances. Implements `Tier`."""

    def __init__(
        self,
        url: str | None = None,
        *,
        name: str = "remote",
        prefix: str = "jaxkv:",
        capacity_bytes: int | None = None,
        socket_timeout: float = 0.5,
        connect_timeout: float = 0.5,
        retry_interval: float = 2.0,
        batch_blocks: int = DEFAULT_BATCH_BLOCKS,
        batch_bytes: int = DEFAULT_BATCH_BYTES,
        ttl_seconds: int | None = None,
        client=None,
        fingerprint: bytes | None = None,
        row_bytes: int | None = None,
        key: bytes | str | BlockKey | None = None,
    ):
        """A tier on the server at `url` (`redis://[user:password@]host:port/db`, `rediss://` for TLS;
        default `DEFAULT_URL`).

        `prefix` namespaces the keys of one deployment on a shared server.
        `socket_timeout` / `connect_timeout` (seconds) bound every round trip:
        past them a call fails, the tier is unavailable for `retry_interval`
        seconds, and reads are refused rather than waited for. `capacity_bytes`
        is reported as the budget; None asks the server for its `maxmemory`.
        `ttl_seconds` expires blocks (None: the server's eviction policy alone
        removes them). `client`: a redis-py client built by you (a
        `redis.cluster.RedisCluster`, Sentinel, custom TLS) instead of `url`;
        its own timeouts and retries apply, and `close()` leaves it open.
        A composition (`TieredStore`) opens the tier with its row layout; pass
        `fingerprint` and `row_bytes` to open it at once on its own.
        `key`: the deployment's secret (at least 16 bytes; a str is UTF-8),
        default `$JAXKV_BLOCK_KEY` when set: values are then sealed and
        checked with a MAC (the module docstring). None and no variable:
        unkeyed, trusting everyone who can write to the server.
        """
        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be a non-empty str, got {name!r}")
        self.block_key = BlockKey.resolve(key)
        """The MAC key of this tier's values, or None (unkeyed: trusts every writer of the server)."""
        if not isinstance(prefix, str):
            raise ValueError(f"prefix must be a str, got {type(prefix).__name__}")
        if capacity_bytes is not None:
            capacity_bytes = check_int(
                "remote capacity_bytes", capacity_bytes, minimum=0, expected="a non-negative int or None"
            )
        socket_timeout = check_positive_seconds("socket_timeout", socket_timeout)
        connect_timeout = check_positive_seconds("connect_timeout", connect_timeout)
        retry_interval = check_positive_seconds("retry_interval", retry_interval)
        batch_blocks = check_positive_int("batch_blocks", batch_blocks)
        batch_bytes = check_positive_int("batch_bytes", batch_bytes)
        if ttl_seconds is not None:
            ttl_seconds = check_int("ttl_seconds", ttl_seconds, minimum=1, expected="a positive int or None")
        self.name = name
        self.prefix = prefix
        self.retry_interval = retry_interval
        self.batch_blocks = batch_blocks
        self.batch_bytes = batch_bytes
        self.ttl_seconds = ttl_seconds
        if client is None:
            url = DEFAULT_URL if url is None else url
            if not isinstance(url, str):
                raise ValueError(f"url must be a str like 'redis://host:6379/0', got {url!r}")
            self.url = _redacted(url)
            """The server's URL, password removed (for logs and reprs)."""
            self._client = redis.Redis.from_url(
                url,
                socket_timeout=socket_timeout,
                socket_connect_timeout=connect_timeout,
                retry=Retry(NoBackoff(), 0),  # a retry doubles a timeout; the caller recomputes instead
                health_check_interval=0,
            )
            self._owns_client = True
        else:
            if url is not None:
                raise ValueError("pass either url or client, not both")
            self.url = repr(client)
            self._client = client
            self._owns_client = False
        if self._client.get_encoder().decode_responses:
            raise ValueError("the redis client must return bytes: build it with decode_responses=False")
        self._configured_capacity = capacity_bytes
        self.capacity_bytes = capacity_bytes if capacity_bytes is not None else UNLIMITED
        """The budget reported beside `used_bytes`: the one given, else the server's `maxmemory` (asked when
        the server is first reached), else `UNLIMITED`. The server enforces it, not this tier."""
        self.evictions = 0
        """Blocks this instance stored and no longer counts in `used_bytes`: found gone from the server (evicted,
        expired, lost in a restart), or past `capacity_bytes` (the server must have evicted as much by then)."""
        self.corrupt = 0
        """Values that failed verification (size, header, checksum, MAC); their keys were deleted."""
        self.forged = 0
        """Of `corrupt`, the values a keyed tier refused for their MAC: unkeyed, another key's, or altered."""
        self.keyed_values = 0
        """Keyed values an unkeyed tier met: misses, left on the server (another deployment's to judge)."""
        self.unavailable = 0
        """Round trips that failed (no server, a timeout, a lost connection): each started an outage."""
        self.fingerprint = b""
        self.row_bytes = 0
        self.value_bytes = HEADER_BYTES
        """Bytes of one value on the server: header + row (+ MAC when keyed)."""
        self._namespace = b""
        self._evicted: list[bytes] = []  # since the last take_evicted()
        self._held: OrderedDict[bytes, None] = OrderedDict()  # what this instance stored and believes there
        self._down_until = 0.0  # time.monotonic() before which the server is not tried
        self._down = False
        self._last_error: Exception | None = None
        self._asked_capacity = False
        self._staging: np.ndarray | None = None  # [2 x batch blocks, value_bytes]: put_many builds values here
        self._sealer: concurrent.futures.ThreadPoolExecutor | None = None  # keyed: MACs beside the network
        self._heap_pin = None  # one reply of the last batch read (see get_many)
        self._open_at_construction(fingerprint, row_bytes)

    # -- Tier protocol -----------------------------------------------------
    def _opened(self) -> None:
        """Key namespace for this layout; try the server once (an unreachable one is logged and served on as misses).

        A server that answers but refuses this user (a wrong password, an ACL
        that does not grant the prefix's keys or the commands the tier sends)
        raises `RemoteAccessError` here, once, rather than failing every request.
        """
        self.value_bytes = HEADER_BYTES + self.row_bytes + trailer_bytes(self.block_key)
        self._per_batch = max(1, min(self.batch_blocks, self.batch_bytes // self.value_bytes))
        if self.block_key is not None:
            self._sealer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"jaxkv-{self.name}-mac")
        self._namespace = f"{self.prefix}{self.fingerprint[:_FINGERPRINT_KEY_BYTES].hex()}:".encode()
        self._open = True  # _round_trip needs an open tier
        self._round_trip(self._check_access)  # learn now whether the server is there, and its maxmemory

    def _check_access(self) -> None:
        """Send every command the tier uses on a probe key of its namespace; `RemoteAccessError` if one is refused.

        The probe (`<namespace>access-probe`, never a block's key) is written
        NX with a one-second expiry and deleted in the same round trip.
        """
        probe = self._namespace + b"access-probe"
        try:
            pipe = self._client.pipeline(transaction=False)
            pipe.exists(probe)
            pipe.set(probe, b"", nx=True, px=1000)
            pipe.get(probe)
            pipe.delete(probe)
            replies = pipe.execute(raise_on_error=False)
        except _REFUSED as e:
            raise self._access_error(e) from None
        for reply in replies:
            if isinstance(reply, _REFUSED):
                raise self._access_error(reply)

    def _access_error(self, error: Exception) -> RemoteAccessError:
        return RemoteAccessError(
            f"remote tier {self.name!r}: {self.url} refuses this user ({type(error).__name__}: {error}); "
            f"check the password and grant its ACL the keys {self.prefix + '*'!r} and the commands "
            "PING EXISTS GET SET DEL SCAN (e.g. ACL SETUSER <user> on >pw ~<prefix>* +ping +exists +get +set +del "
            "+scan)"
        )

    def key(self, block_hash: bytes) -> bytes:
        """The server key of `block_hash` for this tier's prefix and layout."""
        return self._namespace + block_hash.hex().encode()

    shared = True
    """Other instances write the server too: the scheduler's index of this tier is completed by probing it."""

    @property
    def block_bytes(self) -> int:
        """Bytes one block's value occupies on the server (header and row)."""
        return self.value_bytes

    @property
    def used_bytes(self) -> int:
        """Bytes of values (header included) this instance stored and has not seen gone: at most `capacity_bytes`."""
        return len(self._held) * self.value_bytes

    @property
    def available(self) -> bool:
        """False during an outage (until `retry_interval` after the last failed round trip)."""
        return time.monotonic() >= self._down_until

    def __contains__(self, block_hash: bytes) -> bool:
        """Whether the server holds the block now (one `EXISTS`; False while unavailable)."""
        return self.contains_many([block_hash])[0]

    def __len__(self) -> int:
        """Blocks this instance stored and believes are still on the server."""
        return len(self._held)

    def contains_many(self, block_hashes) -> list[bool]:
        """Which of `block_hashes` the server holds now: pipelined `EXISTS`, one round trip per batch.

        An optional extension of the `Tier` protocol: `TieredStore` asks it once
        per lookup instead of one `in` per block. All False while unavailable.
        """
        self._check_open()
        hashes = check_block_hashes(block_hashes)
        answers = [False] * len(hashes)
        step = max(self.batch_blocks, 1024)  # EXISTS replies are small
        for start in range(0, len(hashes), step):
            part = hashes[start : start + step]

            def exists(part=part):
                pipe = self._client.pipeline(transaction=False)
                for h in part:
                    pipe.exists(self.key(h))
                return pipe.execute()

            replies = self._round_trip(exists)
            if replies is None:
                break
            for i, (h, n) in enumerate(zip(part, replies, strict=True)):
                answers[start + i] = bool(n)
                if not n:
                    self._gone(h)
        return answers

    def touch(self, block_hashes) -> None:
        """Refresh local recency only: the server's LRU sees every GET; a round trip per device hit is not worth it."""
        for h in [block_hashes] if isinstance(block_hashes, bytes) else block_hashes:
            if h in self._held:
                self._held.move_to_end(h)

    def put_many(self, items: list[tuple[bytes, np.ndarray]]) -> list[bool | Exception]:
        """Store rows (`SET NX`, pipelined); per block True (stored), False (already on the server) or the error.

        `RemoteUnavailable` for blocks of a batch whose round trip failed (some
        may have landed: whole values, which later reads verify);
        `RemoteWriteError` for one the server refused.
        """
        self._check_open()
        check_block_hashes([h for h, _ in items])
        for _, row in items:
            check_row(row, self.row_bytes, name="row")
        answers: list[bool | Exception] = []
        batches = list(self._batches(items))
        building = self._seal_later(batches, 0)
        for k, batch in enumerate(batches):
            values = self._values(batch, k) if building is None else building.result()
            # Keyed: the next batch's values (copy, MAC) are built on the sealing thread, in the other staging
            # half, while this one is on the wire and the server stores it.
            building = self._seal_later(batches, k + 1)

            def set_nx(values=values):
                pipe = self._client.pipeline(transaction=False)
                for key, value in values:
                    pipe.set(key, value, nx=True, ex=self.ttl_seconds)
                return pipe.execute(raise_on_error=False)

            replies = self._round_trip(set_nx)
            if replies is None:
                if building is not None:
                    building.result()  # never leave the thread writing a staging buffer after this call returns
                error = self._unavailable_error()
                answers += [error] * (len(items) - len(answers))
                break
            for (h, _), reply in zip(batch, replies, strict=True):
                if isinstance(reply, Exception):
                    answers.append(
                        RemoteWriteError(
                            f"block {h.hex()[:16]}: the server refused it: {type(reply).__name__}: {reply}"
                        )
                    )
                    continue
                answers.append(bool(reply))  # None: the key exists (written by us or another instance)
                self._held[h] = None
                self._held.move_to_end(h)
            self._trim()
            del values, set_nx  # before the next batch's values are built: they reuse this memory
        return answers

    def _values(self, batch: list, k: int) -> list[tuple[bytes, memoryview]]:
        """Batch number `k`'s (key, value) pairs, built in staging half `k % 2` (keyed) or the one buffer."""
        base = (k % 2) * self._per_batch if self._sealer is not None else 0
        return [(self.key(h), self._value(base + i, h, row)) for i, (h, row) in enumerate(batch)]

    def _seal_later(self, batches: list, k: int) -> concurrent.futures.Future | None:
        """Batch `k`'s values being built on the sealing thread; None when keyless, single-batch or past the end."""
        if self._sealer is None or len(batches) == 1 or k >= len(batches):
            return None
        return self._sealer.submit(self._values, batches[k], k)

    def get_many(self, items: list[tuple[bytes, np.ndarray]]) -> list[Exception | None]:
        """Read rows into their `out` arrays (pipelined `GET`); per block None (exact, verified) or the error.

        KeyError: not on the server (never stored, evicted, expired).
        CorruptBlockError: the value failed verification; its key was deleted.
        RemoteUnavailable: the round trip failed; the block may still be there.
        An `out` row is written only for a None answer.
        """
        self._check_open()
        check_block_hashes([h for h, _ in items])
        for _, out in items:
            check_row(out, self.row_bytes)
        answers: list[Exception | None] = []
        for batch in self._batches(items):

            def get(batch=batch):
                pipe = self._client.pipeline(transaction=False)
                for h, _ in batch:
                    pipe.get(self.key(h))
                return pipe.execute(raise_on_error=False)

            replies = self._round_trip(get)
            if replies is None:
                error = self._unavailable_error()
                answers += [error] * (len(items) - len(answers))
                break
            # Checked on this thread: checking on the sealing thread while the next batch arrived measured
            # slower (its GIL hand-offs with the reply parser; docs/benchmarks.md, "Remote tier: keyed blocks").
            self._settle_batch(batch, self._check_batch(batch, replies), answers)
            # Free the batch before the next one arrives, so the next one reuses its memory; but keep one reply:
            # glibc returns a freed block at the top of the heap to the system, and the next batch would
            # page-fault it all back in (docs/benchmarks.md, "Measurements behind the rules", "Remote tier").
            self._heap_pin = replies[-1]
            del replies
        return answers

    def _check_batch(self, batch, replies) -> list:
        """Verify one batch's replies and copy the good ones into their `out` rows (reads no tier state).

        Per block: None (copied), "missing", or the verification error.
        """
        verdicts: list = []
        for (h, out), reply in zip(batch, replies, strict=True):
            if reply is None:
                verdicts.append("missing")
                continue
            why = self._verify(h, reply)
            if why is None:
                self.from_stored(np.frombuffer(reply, np.uint8, count=self.row_bytes, offset=HEADER_BYTES), out)
            verdicts.append(why)
        return verdicts

    def _settle_batch(self, batch, verdicts: list, answers: list) -> None:
        """Count one checked batch, answer for it, and delete the keys of its bad values (calling thread)."""
        bad = []
        for (h, _), why in zip(batch, verdicts, strict=True):
            if why == "missing":
                self._gone(h)
                answers.append(KeyError(f"block {h.hex()[:16]} is not on the server of remote tier {self.name!r}"))
            elif isinstance(why, KeyedBlockError):  # another deployment's, which this tier cannot judge: keep it
                self.keyed_values += 1
                self._held.pop(h, None)
                answers.append(KeyedBlockError(f"block {h.hex()[:16]}: {why}; left on the server"))
            elif why is not None:
                self.corrupt += 1
                self.forged += isinstance(why, ForgedBlockError)
                self._held.pop(h, None)
                bad.append(self.key(h))
                answers.append(type(why)(f"block {h.hex()[:16]}: {why}; its key was deleted"))
            else:
                if h in self._held:
                    self._held.move_to_end(h)
                answers.append(None)
        if bad:
            self._round_trip(lambda: self._delete(bad))

    def close(self) -> None:
        """Drop the connections (a client passed in is left open: it is yours)."""
        self._staging = self._heap_pin = None
        if self._sealer is not None:
            self._sealer.shutdown()
            self._sealer = None
        if self._owns_client:
            self._client.close()

    # -- housekeeping ------------------------------------------------------
    def clear(self) -> int:
        """Delete every block of this prefix and layout from the server (every instance's); returns the count."""
        self._check_open()
        keys = list(self._client.scan_iter(match=glob_escape(self._namespace) + b"*", count=1000))
        if keys:
            self._delete(keys)
        self._held.clear()
        return len(keys)

    def _delete(self, keys: list[bytes]) -> None:
        pipe = self._client.pipeline(transaction=False)
        for key in keys:
            pipe.delete(key)  # one key per command: works on a cluster, whose keys live on many nodes
        pipe.execute(raise_on_error=False)

    # -- internals ---------------------------------------------------------
    def _value(self, i: int, block_hash: bytes, row: np.ndarray) -> memoryview:
        """Header + stored row in row `i` of the staging buffer, which the batch's SETs send; the row is copied once.

        One buffer for every batch, kept: values built in fresh memory would
        page-fault it in for every batch (glibc returns freed large blocks;
        docs/benchmarks.md, "Measurements behind the rules", "Remote tier").
        """
        if self._staging is None:  # keyed, two halves: one on the wire while the sealing thread fills the other
            halves = 1 if self._sealer is None else 2
            self._staging = np.empty((halves * self._per_batch, self.value_bytes), np.uint8)
        value = self._staging[i]
        end = HEADER_BYTES + self.row_bytes
        payload = value[HEADER_BYTES:end]
        if self.converts:
            self.to_stored(row, payload)  # the one copy, converting on the way
        else:
            payload[...] = row
        pack_header_into(value, self.fingerprint, block_hash, payload, self.block_key)
        if self.block_key is not None:
            value[end:] = np.frombuffer(self.block_key.mac(value[:HEADER_BYTES], payload), np.uint8)
        return memoryview(value)

    def _verify(self, block_hash: bytes, reply) -> CorruptBlockError | None:
        """Why `reply` is not this block's value for this layout, or None when it is.

        `ForgedBlockError`: a keyed tier's value without a valid MAC (wrong
        version, wrong key, altered); `KeyedBlockError`: a keyed value met by an
        unkeyed tier, and the size check waits for the header so that it is
        recognised. Never a copy before the length is right.
        """
        if not isinstance(reply, bytes):  # e.g. a WRONGTYPE error: something else under our key
            return CorruptBlockError(f"the server answered {type(reply).__name__}: {reply}")
        try:
            check = verify_header(
                reply,
                fingerprint=self.fingerprint,
                block_hash=block_hash,
                payload_bytes=self.row_bytes,
                key=self.block_key,
            )
        except KeyedBlockError as e:
            return e
        except CorruptBlockError as e:
            if len(reply) != self.value_bytes:  # the size says more than a header cut short
                return type(e)(f"value is {len(reply)} bytes, expected {self.value_bytes} ({e})")
            return e
        if len(reply) != self.value_bytes:  # before any copy: never a short row
            error = ForgedBlockError if self.block_key is not None else CorruptBlockError
            return error(f"value is {len(reply)} bytes, expected {self.value_bytes}")
        if check is None:  # under this layout's key, so not another layout's to keep: corrupt
            return CorruptBlockError("written for another layout")
        view = memoryview(reply)
        end = HEADER_BYTES + self.row_bytes
        why = verify_payload(self.block_key, view[:HEADER_BYTES], view[HEADER_BYTES:end], view[end:], check)
        if why is not None:
            return (ForgedBlockError if self.block_key is not None else CorruptBlockError)(why)
        return None

    def _batches(self, items):
        """Consecutive slices of `items` of at most `batch_blocks` blocks and `batch_bytes` bytes (at least one)."""
        for start in range(0, len(items), self._per_batch):
            yield items[start : start + self._per_batch]

    def _round_trip(self, call):
        """`call()`'s result, or None when the server is unavailable or the call failed (then it is for a while)."""
        if not self.available:
            return None
        try:
            result = call()
        except _NETWORK_ERRORS as e:
            self._fail(e)
            return None
        if self._down:
            self._down = False
            log.warning("remote tier %r: %s answers again", self.name, self.url)
        if self._configured_capacity is None and not self._asked_capacity:
            self._asked_capacity = True
            self._ask_capacity()
        return result

    def _ask_capacity(self) -> None:
        """capacity_bytes = the server's maxmemory, when it says (managed services may refuse CONFIG)."""
        try:
            reply = self._client.config_get("maxmemory")
            maxmemory = int(str(next(iter(reply.values())))) if reply else 0
        except (*_NETWORK_ERRORS, ValueError, TypeError, StopIteration, AttributeError):
            return
        if maxmemory > 0:
            self.capacity_bytes = maxmemory
            self._trim()

    def _fail(self, error: Exception) -> None:
        self.unavailable += 1
        self._down_until = time.monotonic() + self.retry_interval
        self._drop_connections()  # a late reply must never be read as the answer to a later command
        if not self._down:
            self._down = True
            log.warning(
                "remote tier %r: %s unavailable (%s: %s); serving on without it (misses), retrying every %g s",
                self.name,
                self.url,
                type(error).__name__,
                error,
                self.retry_interval,
            )
        self._last_error = error

    def _unavailable_error(self) -> RemoteUnavailable:
        why = self._last_error
        return RemoteUnavailable(
            f"remote tier {self.name!r}: {self.url} unavailable" + (f" ({type(why).__name__}: {why})" if why else "")
        )

    def _drop_connections(self) -> None:
        pool = getattr(self._client, "connection_pool", None)
        try:
            if pool is not None:
                pool.disconnect()
            elif hasattr(self._client, "disconnect_connection_pools"):  # RedisCluster
                getattr(self._client, "disconnect_connection_pools")()  # noqa: B009 (not on Redis' type)
        except Exception:  # dropping a broken connection may fail again; it is dropped either way
            pass

    def take_evicted(self) -> list[bytes]:
        """Blocks this instance stored and has since seen gone or trimmed from its count (`evictions`), since the
        last call. Other instances' blocks come and go unseen: the scheduler probes a shared tier instead."""
        evicted, self._evicted = self._evicted, []
        return evicted

    def _gone(self, block_hash: bytes) -> None:
        """A block this instance stored is no longer on the server: the server evicted it (or lost it)."""
        if block_hash in self._held:
            del self._held[block_hash]
            self._evicted.append(block_hash)
            self.evictions += 1

    def _trim(self) -> None:
        """Forget the oldest stored blocks beyond `capacity_bytes`: the server must have evicted some by then."""
        while self._held and self.used_bytes > self.capacity_bytes:
            self._evicted.append(self._held.popitem(last=False)[0])
            self.evictions += 1

    def _check_open(self) -> None:
        if not self._open:
            raise ValueError(
                f"remote tier {self.name!r} is not open: a TieredStore opens it, or pass fingerprint and row_bytes"
            )

    def __repr__(self) -> str:
        keyed = "" if self.block_key is None else f", key id {self.block_key.key_id}"
        return f"RemoteTier({self.name!r}, {self.url}, prefix={self.prefix!r}{keyed})"


GLOB_CHARACTERS = b"\\*?[]^-"
"""What a Redis `SCAN MATCH` / `KEYS` pattern treats as special (`^` and `-` inside brackets)."""


def glob_escape(literal: bytes) -> bytes:
    """`literal` as a Redis glob pattern matching exactly itself: every glob character backslash-escaped.

    Redis' matcher (`stringmatchlen`) takes a backslash outside brackets to
    mean "the next byte, literally", for any byte: escaping `^` and `-` too is
    harmless and keeps the rule one line.
    """
    return bytes(b for c in literal for b in ((0x5C, c) if c in GLOB_CHARACTERS else (c,)))


def _redacted(url: str) -> str:
    """`url` without its password."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urllib.parse.urlunsplit(parts._replace(netloc=user + netloc))
