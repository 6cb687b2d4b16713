"""The scheduler side's indexes: which block is where. Plain data: no arrays, files or sockets.

`HostIndex` decides host slots: which block each slot holds, in LRU order,
which are pinned by a load, reserved for bytes in flight or free. The bytes
themselves are the worker's (`HostTier`); the index tells it which slot to
fill or read through the plans.

`TierIndex` remembers which blocks a lower tier (disk, a remote store) holds,
as the worker last reported: what it found at start-up (`TierSpec.held`),
what it stored since, minus what it reported evicted or lost. A tier that
other instances also write (`TierSpec.shared`) holds more than its index
knows; `TieredStore` asks its `probe` about those, when it has one.

Everything here pickles, so the scheduler side can live in another process
than the worker: the spec goes from the worker to the scheduler, plans from
the scheduler to the worker, results back.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict

from jaxkv.layout.fingerprint import RowLayout


@dataclasses.dataclass(frozen=True)
class TierSpec:
    """What the scheduler side knows of one lower tier: reported by the worker that owns it."""

    name: str
    """Unique within a composition; the key of the tier's metrics everywhere."""
    capacity_bytes: int
    """The tier's byte budget."""
    block_bytes: int
    """Bytes one block occupies in the tier (a disk file: header and row)."""
    shared: bool = False
    """Other instances write the tier too (a remote store): it may hold blocks its index does not know."""
    held: tuple[bytes, ...] = ()
    """Blocks the tier held when the worker opened it (a warm restart), oldest first."""
    corrupt: int = 0
    """Blocks found corrupt (and dropped) when the worker opened it."""


@dataclasses.dataclass(frozen=True)
class StoreSpec:
    """What a `TieredStore` is built from: the row layout, the host slots and the lower tiers, in order.

    `OffloadWorker.spec()` makes one; it is plain data, so it can be sent to
    a scheduler in another process.
    """

    layout: RowLayout
    """What a host row holds (its width and fingerprint)."""
    host_name: str
    """Name of the host tier."""
    host_slots: int
    """Rows host memory holds."""
    host_capacity_bytes: int
    """The host tier's byte budget (`host_slots` rows of `layout.row_bytes` fit in it)."""
    lower: tuple[TierSpec, ...] = ()
    """Lower tiers, in the order blocks are looked up."""
    num_device_pages: int | None = None
    """Pages of the cache on the device (plans naming a page past them are refused); None: unchecked."""

    def __post_init__(self):
        if not isinstance(self.layout, RowLayout):
            raise ValueError(f"layout must be a RowLayout (RowLayout.of(cache)), got {type(self.layout).__name__}")
        names = [self.host_name, *(t.name for t in self.lower)]
        if len(set(names)) != len(names) or "device" in names:
            raise ValueError(f"tier names must be unique and not 'device', got {names}")

    @property
    def tier_names(self) -> list[str]:
        """Host first, then the lower tiers."""
        return [self.host_name, *(t.name for t in self.lower)]


class HostIndex:
    """Host slots: held (indexed under a block hash, LRU), pinned, reserved or free.

    - **free**;
    - **held**: indexed under a block hash, in LRU order; *pinned* while a
      load reads it (a pinned slot is never evicted);
    - **reserved**: handed out for bytes in flight (a store's D2H, a
      promotion from a lower tier). It joins the index only when the bytes
      are there (`commit`), or goes back to the free list (`release`).

    Slots whose bytes are no longer wanted (released, evicted and not
    reused, cleared) are listed for the worker in `take_dropped`, so a
    worker holding a row's memory per slot frees it.
    """

    def __init__(self, num_slots: int, row_bytes: int, *, name: str = "host"):
        self.name = name
        self.num_slots = num_slots
        """Rows the host tier holds."""
        self.row_bytes = row_bytes
        self.evictions = 0
        """Held blocks dropped to make room."""
        self._index: OrderedDict[bytes, int] = OrderedDict()  # hash -> slot, oldest first
        self._pins: dict[int, int] = {}
        self._reserved: set[int] = set()
        self._free: list[int] = list(range(num_slots - 1, -1, -1))
        self._dropped: list[int] = []

    @property
    def used_bytes(self) -> int:
        """Bytes of held rows (reserved rows count once their bytes arrive)."""
        return len(self._index) * self.row_bytes

    def __contains__(self, block_hash: bytes) -> bool:
        return block_hash in self._index

    def __len__(self) -> int:
        return len(self._index)

    def slot_of(self, block_hash: bytes) -> int | None:
        """The slot holding `block_hash`, or None."""
        return self._index.get(block_hash)

    def touch(self, block_hashes) -> None:
        """Refresh the recency of the held ones among `block_hashes`."""
        for h in block_hashes:
            if h in self._index:
                self._index.move_to_end(h)

    def reserve(self, protect=()) -> int | None:
        """A slot for bytes about to arrive: a free one, else the LRU held one not pinned or in `protect`.

        None when there is none. The slot is reserved until `commit` or `release`.
        """
        got = self.reserve_evicting(protect)
        return None if got is None else got[0]

    def reserve_evicting(self, protect=()) -> tuple[int, bytes | None] | None:
        """`reserve`, also saying which block it evicted to free the slot: (slot, its hash or None)."""
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
            self._free_slot(slot)
            return False
        self._index[block_hash] = slot
        return True

    def release(self, slot: int) -> None:
        """A reserved slot whose bytes never arrived (or are not kept) goes back to the free list."""
        if slot in self._reserved:
            self._reserved.remove(slot)
            self._free_slot(slot)

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

    def is_pinned(self, slot: int) -> bool:
        """Whether a load in flight reads `slot`."""
        return bool(self._pins.get(slot))

    def is_reserved(self, slot: int) -> bool:
        """Whether `slot` waits for bytes in flight."""
        return slot in self._reserved

    @property
    def busy(self) -> bool:
        """Whether any slot is pinned or reserved (a plan has not completed)."""
        return bool(self._pins) or bool(self._reserved)

    def available(self) -> int:
        """Slots `reserve` could hand out now."""
        return len(self._free) + sum(1 for s in self._index.values() if not self._pins.get(s))

    def clear(self) -> None:
        """Forget every held block not pinned by a load in flight (reserved slots stay as they are)."""
        for h, slot in list(self._index.items()):
            if not self._pins.get(slot):
                del self._index[h]
                self._free_slot(slot)

    def held(self) -> list[tuple[bytes, int]]:
        """(block hash, slot) of every held block, least recently used first."""
        return list(self._index.items())

    def take_dropped(self) -> tuple[int, ...]:
        """Slots freed since the last call and still free: the worker may release their rows' memory.

        A slot reserved again since it was freed is left out: new bytes will replace the old ones.
        """
        if not self._dropped:
            return ()
        dropped, self._dropped = self._dropped, []
        free = set(self._free)
        return tuple(s for s in dict.fromkeys(dropped) if s in free)

    def _free_slot(self, slot: int) -> None:
        self._free.append(slot)
        self._dropped.append(slot)

    def __repr__(self) -> str:
        return f"HostIndex({self.name!r}, {len(self._index)}/{self.num_slots} slots held)"


class TierIndex:
    """The blocks a lower tier holds, as its worker reported them (see the module docstring)."""

    def __init__(self, spec: TierSpec):
        self.spec = spec
        self.name = spec.name
        self._held: dict[bytes, None] = dict.fromkeys(spec.held)

    @property
    def shared(self) -> bool:
        """Other instances write this tier too: `in` answers only for blocks this index learned of."""
        return self.spec.shared

    @property
    def used_bytes(self) -> int:
        """Bytes of the blocks the index knows held."""
        return len(self._held) * self.spec.block_bytes

    def __contains__(self, block_hash: bytes) -> bool:
        return block_hash in self._held

    def __len__(self) -> int:
        return len(self._held)

    def add(self, block_hashes) -> None:
        """The tier holds these now (stored, or found held)."""
        for h in block_hashes:
            self._held[h] = None

    def discard(self, block_hashes) -> None:
        """The tier no longer holds these (evicted, corrupt, gone)."""
        for h in block_hashes:
            self._held.pop(h, None)

    def __repr__(self) -> str:
        return f"TierIndex({self.name!r}, {len(self._held)} blocks{', shared' if self.shared else ''})"
