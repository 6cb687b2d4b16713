"""`HostTier`: rows in host memory, LRU-evicted; the first tier of every composition.

Its rows live in one `[num_slots, row_bytes]` uint8 pool, aligned so that
XLA:CPU places it on a device without a copy; the offload engine reads and
writes the pool rows directly (D2H lands in them, H2D reads them), and every
other tier reads from and writes into them. A *host slot* is one row.

A slot is in one of three states:

- **free**;
- **held**: indexed under a block hash, in LRU order; *pinned* while a load
  reads it (a pinned slot is never evicted);
- **reserved**: handed out for bytes in flight (a store's D2H, a promotion
  from a lower tier). It joins the index only when the bytes are there.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from jaxkv.layout.fingerprint import RowLayout
from jaxkv.tiers.base import check_row
from jaxkv.transfer.engine import aligned_rows


class HostTierFull(Exception):
    """No free slot and every held slot is pinned or reserved."""


class HostTier:
    """Host memory for `capacity_bytes` of rows. Implements `Tier`."""

    def __init__(self, capacity_bytes: int, *, name: str = "host"):
        if isinstance(capacity_bytes, bool) or not isinstance(capacity_bytes, int) or capacity_bytes < 1:
            raise ValueError(f"host capacity_bytes must be a positive int, got {capacity_bytes!r}")
        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be a non-empty str, got {name!r}")
        self.name = name
        self.capacity_bytes = capacity_bytes
        self.evictions = 0
        self.corrupt = 0  # memory is not verified: nothing is ever found corrupt here
        self.row_bytes = 0
        self.pool: np.ndarray | None = None
        """[num_slots, row_bytes] uint8, allocated by `open` (untouched rows cost no memory)."""
        self._index: OrderedDict[bytes, int] = OrderedDict()  # hash -> slot, oldest first
        self._pins: dict[int, int] = {}
        self._reserved: set[int] = set()
        self._free: list[int] = []

    # -- Tier protocol -----------------------------------------------------
    def open(self, layout: RowLayout) -> None:
        """Allocate the pool: as many rows of `layout.row_bytes` as fit in `capacity_bytes`."""
        if self.pool is not None:
            raise ValueError(f"host tier {self.name!r} is already open")
        slots = self.capacity_bytes // layout.row_bytes
        if slots < 1:
            raise ValueError(
                f"host capacity_bytes ({self.capacity_bytes}) holds no page: one host row is {layout.row_bytes} bytes"
            )
        self.row_bytes = layout.row_bytes
        self.pool = aligned_rows(slots, layout.row_bytes)
        self._free = list(range(slots - 1, -1, -1))

    @property
    def num_slots(self) -> int:
        """Rows the pool holds."""
        return 0 if self.pool is None else self.pool.shape[0]

    @property
    def used_bytes(self) -> int:
        """Bytes of held rows (reserved rows are counted once their bytes arrive)."""
        return len(self._index) * self.row_bytes

    def __contains__(self, block_hash: bytes) -> bool:
        return block_hash in self._index

    def __len__(self) -> int:
        return len(self._index)

    def touch(self, block_hashes) -> None:
        """Refresh the recency of the held ones among `block_hashes`."""
        for h in block_hashes:
            if h in self._index:
                self._index.move_to_end(h)

    def put_many(self, items: list[tuple[bytes, np.ndarray]]) -> list[bool | Exception]:
        """Copy rows into slots (evicting LRU rows); per block True, False (already held) or HostTierFull."""
        out: list[bool | Exception] = []
        for h, row in items:
            check_row(np.asarray(row), self.row_bytes, name="row")
            if h in self._index:
                self._index.move_to_end(h)
                out.append(False)
                continue
            slot = self.reserve()
            if slot is None:
                out.append(HostTierFull(f"host tier {self.name!r}: every slot is pinned or in flight"))
                continue
            self.pool[slot] = row
            self.commit(h, slot)
            out.append(True)
        return out

    def get_many(self, items: list[tuple[bytes, np.ndarray]]) -> list[Exception | None]:
        """Copy held rows out; KeyError for a block not held."""
        out: list[Exception | None] = []
        for h, row in items:
            check_row(row, self.row_bytes)
            slot = self._index.get(h)
            if slot is None:
                out.append(KeyError(f"block {h.hex()[:16]} is not in host tier {self.name!r}"))
                continue
            row[:] = self.pool[slot]
            self._index.move_to_end(h)
            out.append(None)
        return out

    def close(self) -> None:
        """Nothing to release: the pool is freed with the tier."""

    # -- slots (the composition's side) -------------------------------------
    def slot_of(self, block_hash: bytes) -> int | None:
        """The slot holding `block_hash`, or None."""
        return self._index.get(block_hash)

    def reserve(self, protect=()) -> int | None:
        """A slot for bytes about to arrive: a free one, else the LRU held one not pinned or in `protect`.

        None when there is none. The slot is reserved until `commit` or `release`.
        """
        got = self.reserve_evicting(protect)
        return None if got is None else got[0]

    def reserve_evicting(self, protect=()) -> tuple[int, bytes | None] | None:
        """`reserve`, also saying which block it evicted to free the slot: (slot, its hash or None).

        The evicted block's bytes stay in the slot until new bytes arrive, so a
        write-back can still hand them down.
        """
        evicted = None
        if self._free:
            slot = self._free.pop()
        else:
            slot = None
            for h, s in self._index.items():
                if s not in protect and not self._pins.get(s):
                    slot, evicted = s, h
                    del self._index[h]
                    self.evictions += 1
                    break
            if slot is None:
                return None
        self._reserved.add(slot)
        return slot, evicted

    def commit(self, block_hash: bytes, slot: int) -> bool:
        """A reserved slot now holds `block_hash`'s bytes: index it (most recent). False if already held elsewhere."""
        self._reserved.discard(slot)
        if block_hash in self._index:
            self._index.move_to_end(block_hash)
            self._free.append(slot)
            return False
        self._index[block_hash] = slot
        return True

    def release(self, slot: int) -> None:
        """A reserved slot whose bytes never arrived goes back to the free list."""
        if slot in self._reserved:
            self._reserved.remove(slot)
            self._free.append(slot)

    def pin(self, slot: int) -> None:
        """Keep a held slot from eviction while a load reads it."""
        self._pins[slot] = self._pins.get(slot, 0) + 1

    def unpin(self, slot: int) -> None:
        """Drop one `pin` of `slot`."""
        n = self._pins.get(slot, 0) - 1
        if n > 0:
            self._pins[slot] = n
        else:
            self._pins.pop(slot, None)

    def available(self) -> int:
        """Slots `reserve` could hand out now."""
        return len(self._free) + sum(1 for s in self._index.values() if not self._pins.get(s))

    def clear(self) -> None:
        """Forget every held block not pinned by a load in flight (reserved slots stay as they are)."""
        for h, slot in list(self._index.items()):
            if not self._pins.get(slot):
                del self._index[h]
                self._free.append(slot)

    def __repr__(self) -> str:
        return f"HostTier({self.name!r}, {len(self._index)}/{self.num_slots} rows of {self.row_bytes} B)"
