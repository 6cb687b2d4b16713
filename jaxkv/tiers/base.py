"""The `Tier` protocol: one storage medium for pages outside the device.

A tier stores *rows*: one page of every unit of the cache, laid out as a
`RowLayout` says, keyed by a 32-byte block hash (the prefix-caching manager's
SHA-256 digests). Tiers below host memory (disk, a remote store, one a user
writes) implement this protocol. They belong to the worker side
(`OffloadWorker`), which opens them, moves rows between them and host memory
as plans say, and closes them; the scheduler side (`TieredStore`) never
touches a tier: it keeps an index of what each holds, from the worker's
`spec()` and from what each plan's result reports.

What each call guarantees (the worker relies on nothing else):

- `open(layout)`: called once, before anything else, by the worker:
  the tier learns the row width and the layout fingerprint. A tier that
  persists rows must never return a row written under another fingerprint.
  A tier that outlives the instance (jaxkv's disk and remote tiers) keeps
  rows in `layout.stored`'s TP-independent form under
  `layout.stored.fingerprint`, so an instance at another TP degree reads
  them (`OpensOnce` does both); `put_many` and `get_many` still take and
  return host rows.
- `block_hash in tier`: advisory. True means "held when asked"; a later
  `get_many` may still find it gone (evicted, corrupt) and say so.
- `contains_many(block_hashes)` (optional): `[h in tier for h in
  block_hashes]` in one call, for a tier where each `in` is a round trip (a
  remote store). `OffloadWorker.probe` uses it when a tier has it, and `in`
  otherwise.
- `touch(block_hashes)`: a hint that these blocks are hot (LRU recency).
- `put_many([(hash, row), ...])`: per block `True` (stored: `in` is true
  from now on), `False` (already held, refreshed) or an `Exception` (not
  stored; nothing already held was lost). Never keeps a partial row.
- `get_many([(hash, out), ...])`: per block `None` (`out` holds exactly the
  row stored under that hash, verified) or an `Exception` (`out` is
  undefined; a block found corrupt is dropped, an I/O error keeps it).
  Never a short or foreign row.
- `used_bytes <= capacity_bytes` always: the byte budget is exact; a tier
  evicts (least recently used first) to stay inside it.
- `take_evicted()`: the blocks the tier dropped to make room (or, for a
  remote store, saw gone) since the last call; the scheduler's index drops
  them. A block the tier loses unannounced is found by a read (`KeyError`
  or a failed verification: the index drops it then).
- `evictions`, `corrupt`: counters the composition reports under the tier's
  `name`, which must be unique within a composition.
- Optional, for the scheduler's index (`OffloadWorker.spec()`):
  `held_blocks()` (blocks held at open, least recently used first: a disk
  tier's warm restart), `block_bytes` (bytes one block occupies; default the
  row width), `shared` (True when other instances write the tier too: the
  scheduler then asks the worker's `probe` rather than its index).
- `close()`: release threads, files, connections; later calls may raise.

`DictTier` in tests/dict_tier.py shows that a tier is a page of code.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol, runtime_checkable

import numpy as np

from jaxkv._checks import check_positive_int
from jaxkv.layout.fingerprint import RowLayout, StoredLayout
from jaxkv.prefix.hashing import BLOCK_HASH_BYTES


@runtime_checkable
class Tier(Protocol):
    """A store of host rows keyed by block hash. See the module docstring for the guarantees."""

    name: str
    """Unique within a composition; the key of this tier's metrics everywhere."""
    capacity_bytes: int
    """The byte budget: `used_bytes` never exceeds it."""
    evictions: int
    """Blocks dropped to make room, since the tier was opened."""
    corrupt: int
    """Stored blocks that failed verification and were dropped."""

    @property
    def used_bytes(self) -> int:
        """Bytes the held blocks occupy, counted as the budget counts them."""
        ...

    def open(self, layout: RowLayout) -> None:
        """Bind the tier to the rows it will store; called once by the composition."""
        ...

    def __contains__(self, block_hash: bytes) -> bool:
        """Whether the block is held now (advisory)."""
        ...

    def touch(self, block_hashes: list[bytes]) -> None:
        """Refresh the recency of the held ones among `block_hashes`."""
        ...

    def put_many(self, items: list[tuple[bytes, np.ndarray]]) -> list[bool | Exception]:
        """Store rows; per block True (stored), False (already held) or the error."""
        ...

    def get_many(self, items: list[tuple[bytes, np.ndarray]]) -> list[Exception | None]:
        """Read rows into the `out` arrays; per block None (exact, verified) or the error."""
        ...

    def take_evicted(self) -> list[bytes]:
        """Blocks dropped to make room since the last call."""
        ...

    def close(self) -> None:
        """Release the tier's resources."""
        ...


@dataclasses.dataclass
class TierMetrics:
    """One tier's counters, since the composition was built or reset."""

    hits: int = 0
    """Blocks a lookup found first in this tier."""
    blocks_loaded: int = 0
    """Blocks this tier served to the device."""
    blocks_stored: int = 0
    """Blocks newly stored in this tier."""
    bytes_read: int = 0
    """Row bytes read out of this tier (into host memory, or to the device for the host tier)."""
    read_seconds: float = 0.0
    bytes_written: int = 0
    """Row bytes written into this tier."""
    write_seconds: float = 0.0
    evictions: int = 0
    """Blocks the tier dropped to make room."""
    corrupt: int = 0
    """Blocks that failed verification and were dropped (they count as misses)."""
    errors: int = 0
    """Reads or writes that failed (I/O errors, a full disk, a lost server): blocks not served or not stored."""


def check_block_hashes(block_hashes, *, name: str = "block_hashes") -> list[bytes]:
    """Validate hashes: a sequence of `bytes` of length 32; returns them as a list."""
    if isinstance(block_hashes, (bytes, str)) or not hasattr(block_hashes, "__iter__"):
        raise ValueError(
            f"{name} must be a sequence of {BLOCK_HASH_BYTES}-byte hashes, got {type(block_hashes).__name__}"
        )
    hashes = list(block_hashes)
    for i, h in enumerate(hashes):
        if not isinstance(h, bytes):
            raise ValueError(f"{name}[{i}] must be bytes, got {type(h).__name__}")
        if len(h) != BLOCK_HASH_BYTES:
            raise ValueError(f"{name}[{i}] must be {BLOCK_HASH_BYTES} bytes (a SHA-256 digest), got {len(h)}")
    return hashes


def check_row(out, row_bytes: int, *, name: str = "out") -> None:
    """`out` must be a contiguous uint8 row of `row_bytes`."""
    if (
        not isinstance(out, np.ndarray)
        or out.dtype != np.uint8
        or out.shape != (row_bytes,)
        or not out.flags.c_contiguous
    ):
        got = f"{out.dtype} {out.shape}" if isinstance(out, np.ndarray) else type(out).__name__
        raise ValueError(f"{name} must be a contiguous uint8 array of shape ({row_bytes},), got {got}")


class OpensOnce:
    """Mixin for a tier that outlives an instance, opened once: by a composition (`open`) or at construction.

    Opened by a composition, it stores rows in the layout's TP-independent
    form (`RowLayout.stored`) under the stored fingerprint: `to_stored` /
    `from_stored` convert at the tier boundary. Opened at construction with a
    fingerprint and row width, it stores rows as given.

    Subclasses call `_open_at_construction(fingerprint, row_bytes)` at the end of `__init__`
    and implement `_opened()`, which runs once the fingerprint and row width are set.
    """

    name: str
    _open = False
    stored: StoredLayout | None = None
    """How rows are stored: the layout's TP-independent form, or None (as given)."""

    def _open_at_construction(self, fingerprint, row_bytes) -> None:
        if fingerprint is not None or row_bytes is not None:
            self._open_with(fingerprint, row_bytes)

    def open(self, layout: RowLayout) -> None:
        """Bind to `layout`'s rows (width, stored form and its fingerprint); called once by the composition."""
        self._open_with(layout.stored.fingerprint, layout.row_bytes, layout.stored)

    def _open_with(self, fingerprint, row_bytes, stored: StoredLayout | None = None) -> None:
        """Open with a 32-byte `fingerprint` and a positive `row_bytes` (checked here: a user may pass anything)."""
        if self._open:
            raise ValueError(f"{type(self).__name__} {self.name!r} is already open")
        row_bytes = check_row_layout(fingerprint, row_bytes)
        self.fingerprint = fingerprint
        self.row_bytes = row_bytes
        self.stored = None if stored is None or stored.identity else stored
        self._opened()
        self._open = True

    @property
    def converts(self) -> bool:
        """Whether stored bytes differ from host rows (MHA at a TP degree below the head count)."""
        return self.stored is not None

    def to_stored(self, row: np.ndarray, out: np.ndarray | None) -> np.ndarray:
        """The stored bytes of host `row`: `out` filled, or `row` itself when nothing converts (`out` may be None)."""
        if self.stored is None:
            return row
        if out is None:
            raise ValueError("to_stored needs an out row when the stored form differs from host rows")
        self.stored.to_stored(row, out)
        return out

    def from_stored(self, stored: np.ndarray, out: np.ndarray) -> None:
        """Write the host row of `stored` bytes into `out` (a copy when nothing converts)."""
        if self.stored is None:
            if stored is not out:
                out[...] = stored
            return
        self.stored.from_stored(stored, out)

    def _opened(self) -> None:
        raise NotImplementedError


def check_row_layout(fingerprint, row_bytes) -> int:
    """What a persistent tier is opened with: a 32-byte layout fingerprint and a positive row width (returned)."""
    if not isinstance(fingerprint, bytes) or len(fingerprint) != 32:
        raise ValueError(f"fingerprint must be 32 bytes, got {fingerprint!r}")
    return check_positive_int("row_bytes", row_bytes)
