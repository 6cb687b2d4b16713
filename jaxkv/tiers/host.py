"""`HostTier`: rows in host memory, LRU-evicted; the first tier of every composition.

Two backends hold the rows (`backend=`):

- ``"numpy"`` (the default on CPU): one `[num_slots, row_bytes]` uint8 pool,
  aligned so that XLA:CPU places it on a device without a copy; the offload
  engine reads and writes the pool rows directly with its native kernels.
- ``"arrays"`` (the default on GPU/TPU): a held row is one `[1, bytes_per_page]`
  uint8 JAX array per unit, in that unit's device's `pinned_host` memory. The
  arrays *are* the outputs of the engine's jitted gather (D2H) and the inputs
  of its jitted, donated scatter (H2D): no numpy copy of page bytes on either
  path. A row's arrays exist only while its slot holds bytes, so evicting a
  block releases its memory at once and the byte budget is exact
  (`live_bytes <= num_slots * row_bytes`). One slab updated in place is not
  an option on GPU: a dynamic scatter into a `pinned_host` array inside jit
  fails there (openxla/xla#34565).

A *host slot* is one row.

A slot is in one of three states:

- **free**;
- **held**: indexed under a block hash, in LRU order; *pinned* while a load
  reads it (a pinned slot is never evicted);
- **reserved**: handed out for bytes in flight (a store's D2H, a promotion
  from a lower tier). It joins the index only when the bytes are there.
"""

from __future__ import annotations

import os
from collections import OrderedDict

import jax
import numpy as np
from jax.sharding import SingleDeviceSharding

from jaxkv.layout.fingerprint import RowLayout
from jaxkv.tiers.base import check_row
from jaxkv.transfer.engine import aligned_rows

BACKENDS = ("auto", "numpy", "arrays")

HOST_MEMORY_KIND = "pinned_host"
"""Memory kind of the "arrays" backend's rows: page-locked, so the DMA engines read and write them directly."""

GPU_HOST_LIMIT_VAR = "XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB"
"""XLA's cap on a GPU client's pinned host memory, in GB (its host memory allocator refuses more)."""
_GPU_HOST_LIMIT_DEFAULT_GB = 64  # XLA's default for the variable above (xla/pjrt/gpu/se_gpu_pjrt_client.cc)


class HostTierFull(Exception):
    """No free slot and every held slot is pinned or reserved."""


def _platform() -> str:
    """The default JAX backend's platform ('cpu', 'gpu', 'tpu'); a function so tests can fake a GPU."""
    return jax.default_backend()


def _auto_backend() -> str:
    """What backend="auto" picks: arrays off CPU (the DMA reads them), numpy on CPU (arrays are ~0.3x a memcpy there).

    A function so tests can run the "arrays" path through the same checks as the default one.
    """
    return "numpy" if _platform() == "cpu" else "arrays"


def _gpu_host_limit_bytes() -> int:
    raw = os.environ.get(GPU_HOST_LIMIT_VAR)
    gb = float(raw) if raw else _GPU_HOST_LIMIT_DEFAULT_GB
    return int(gb * (1 << 30))


class HostTier:
    """Host memory for `capacity_bytes` of rows. Implements `Tier`."""

    def __init__(self, capacity_bytes: int, *, name: str = "host", backend: str = "auto"):
        """`backend`: "numpy", "arrays" or "auto" (arrays off CPU, numpy on CPU; see the module docstring)."""
        if isinstance(capacity_bytes, bool) or not isinstance(capacity_bytes, int) or capacity_bytes < 1:
            raise ValueError(f"host capacity_bytes must be a positive int, got {capacity_bytes!r}")
        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be a non-empty str, got {name!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        platform = _platform()
        if backend == "auto":
            backend = _auto_backend()
        if backend == "arrays" and platform == "gpu" and capacity_bytes > _gpu_host_limit_bytes():
            limit = _gpu_host_limit_bytes()
            raise ValueError(
                f"host capacity_bytes ({capacity_bytes}) exceeds XLA's pinned host memory limit on GPU "
                f"({limit} bytes = {limit / (1 << 30):g} GB); raise it with {GPU_HOST_LIMIT_VAR}="
                f"{-(-capacity_bytes // (1 << 30))} (in GB) before JAX starts, or lower capacity_bytes"
            )
        self.backend = backend
        """"numpy" or "arrays": how rows are held (module docstring)."""
        self.name = name
        self.capacity_bytes = capacity_bytes
        self.evictions = 0
        self.corrupt = 0  # memory is not verified: nothing is ever found corrupt here
        self.row_bytes = 0
        self.pool: np.ndarray | None = None
        """[num_slots, row_bytes] uint8, allocated by `open` (untouched rows cost no memory); None for "arrays"."""
        self.rows: list[tuple[jax.Array, ...] | None] = []
        """"arrays" backend: per slot, its row's `[1, bytes_per_page]` pinned_host array per unit, or None."""
        self._slots = 0
        self._units: list[tuple[jax.Device, int, int]] | None = None  # (device, offset, width) per unit
        self._index: OrderedDict[bytes, int] = OrderedDict()  # hash -> slot, oldest first
        self._pins: dict[int, int] = {}
        self._reserved: set[int] = set()
        self._free: list[int] = []

    # -- Tier protocol -----------------------------------------------------
    def open(self, layout: RowLayout) -> None:
        """Allocate the pool: as many rows of `layout.row_bytes` as fit in `capacity_bytes`."""
        slots = self.capacity_bytes // layout.row_bytes
        if slots < 1:
            raise ValueError(
                f"host capacity_bytes ({self.capacity_bytes}) holds no page: one host row is {layout.row_bytes} bytes"
            )
        if self._slots:
            raise ValueError(f"host tier {self.name!r} is already open")
        self.row_bytes = layout.row_bytes
        self._slots = slots
        if self.backend == "numpy":
            self.pool = aligned_rows(slots, layout.row_bytes)
        else:
            self.rows = [None] * slots
        self._free = list(range(slots - 1, -1, -1))

    @property
    def num_slots(self) -> int:
        """Rows the tier can hold."""
        return self._slots

    @property
    def live_bytes(self) -> int:
        """Host bytes the tier's rows occupy now: the pool, or the nbytes of every live row array."""
        if self.backend == "numpy":
            return 0 if self.pool is None else self.pool.nbytes
        return sum(a.nbytes for row in self.rows if row is not None for a in row)

    # -- rows (the worker's and engine's side) -------------------------------
    def bind(self, units: list[tuple[jax.Device, int, int]]) -> None:
        """ "arrays": the (device, row offset, width) of each unit, so rows given as bytes can be placed."""
        if sum(w for _, _, w in units) != self.row_bytes:
            raise ValueError(f"units cover {sum(w for _, _, w in units)} bytes of a {self.row_bytes}-byte row")
        self._units = list(units)

    def row(self, slot: int) -> np.ndarray:
        """A slot's bytes as one `[row_bytes]` uint8 numpy row, for lower tiers to read.

        numpy: a view of the pool row. arrays: zero-copy when the row has one
        unit and the platform maps pinned_host into numpy (CPU); else one copy.
        """
        if self.backend == "numpy":
            return self.pool[slot]
        arrays = self.rows[slot]
        if arrays is None:
            raise KeyError(f"host slot {slot} of {self.name!r} holds no bytes")
        views = [np.asarray(a).reshape(-1) for a in arrays]
        return views[0] if len(views) == 1 else np.concatenate(views)

    def row_buffer(self, slot: int) -> np.ndarray:
        """Where a lower tier writes a row promoted into `slot`: the pool row, or a fresh aligned buffer."""
        if self.backend == "numpy":
            return self.pool[slot]
        return aligned_rows(1, self.row_bytes)[0]

    def fill(self, slot: int, row: np.ndarray) -> None:
        """Place `row` (`[row_bytes]` uint8) in `slot`. arrays: zero-copy on CPU when `row` is 64-byte aligned."""
        if self.backend == "numpy":
            if row.ctypes.data != self.pool[slot].ctypes.data:  # a promotion wrote the pool row itself
                self.pool[slot] = row
            return
        if self._units is None:
            raise ValueError(f"host tier {self.name!r} holds arrays on the devices of a worker: build one first")
        pieces = [row[off : off + w].reshape(1, w) for _, off, w in self._units]
        shardings = [SingleDeviceSharding(d, memory_kind=HOST_MEMORY_KIND) for d, _, _ in self._units]
        self.rows[slot] = tuple(jax.device_put(pieces, shardings))

    def set_arrays(self, slot: int, arrays: tuple[jax.Array, ...]) -> None:
        """arrays: `slot` now holds these per-unit arrays (the outputs of a D2H)."""
        self.rows[slot] = tuple(arrays)

    def arrays(self, slot: int) -> tuple[jax.Array, ...]:
        """arrays: the per-unit arrays `slot` holds."""
        arrays = self.rows[slot]
        if arrays is None:
            raise KeyError(f"host slot {slot} of {self.name!r} holds no bytes")
        return arrays

    def _drop(self, slot: int) -> None:
        """Release a slot's row arrays (the numpy pool keeps its rows)."""
        if self.backend == "arrays":
            self.rows[slot] = None

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
            self.fill(slot, np.asarray(row))
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
            row[:] = self.row(slot)
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
        An evicted row's arrays are released at once.
        """
        got = self.reserve_evicting(protect)
        return None if got is None else got[0]

    def reserve_evicting(self, protect=(), *, keep_bytes: bool = False) -> tuple[int, bytes | None] | None:
        """`reserve`, also saying which block it evicted to free the slot: (slot, its hash or None).

        An evicted row's arrays are released at once unless `keep_bytes`: then the
        evicted block's bytes stay in the slot until new bytes arrive, so a
        write-back demotion can still hand them down.
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
                    if not keep_bytes:
                        self._drop(s)
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
            self._drop(slot)
            self._free.append(slot)
            return False
        self._index[block_hash] = slot
        return True

    def release(self, slot: int) -> None:
        """A reserved slot whose bytes never arrived goes back to the free list."""
        if slot in self._reserved:
            self._reserved.remove(slot)
            self._drop(slot)
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
                self._drop(slot)
                self._free.append(slot)

    def __repr__(self) -> str:
        return (
            f"HostTier({self.name!r}, {self.backend}, {len(self._index)}/{self.num_slots} rows of {self.row_bytes} B)"
        )
