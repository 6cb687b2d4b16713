"""`HostTier`: the bytes of host memory's rows, held by the worker; the first tier of every composition.

Two backends hold the rows (`backend=`):

- ``"numpy"`` (the default on CPU): one `[num_slots, row_bytes]` uint8 pool,
  aligned so that XLA:CPU places it on a device without a copy; the offload
  engine reads and writes the pool rows directly with its native kernels.
- ``"arrays"`` (the default on GPU/TPU): a held row is one `[1, bytes_per_page]`
  uint8 JAX array per unit, in that unit's device's `pinned_host` memory. The
  arrays *are* the outputs of the engine's jitted gather (D2H) and the inputs
  of its jitted, donated scatter (H2D): no numpy copy of page bytes on either
  path. A row's arrays exist only while its slot holds bytes: a slot the
  scheduler freed is released when the next plan names it in `drops`, so
  the byte budget is exact (`live_bytes <= num_slots * row_bytes`). One slab updated in place is not
  an option on GPU: a dynamic scatter into a `pinned_host` array inside jit
  fails there (openxla/xla#34565).

A *host slot* is one row. Which block a slot holds, and which slots are
free, pinned or reserved, is the scheduler side's (`jaxkv.tiers.index.HostIndex`):
this class only holds the bytes, at the slots the plans name. It is the
worker's; the scheduler never sees it.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import SingleDeviceSharding

from jaxkv._checks import check_positive_int
from jaxkv.layout.fingerprint import RowLayout
from jaxkv.transfer.engine import aligned_rows

BACKENDS = ("auto", "numpy", "arrays")

HOST_MEMORY_KIND = "pinned_host"
"""Memory kind of the "arrays" backend's rows: page-locked, so the DMA engines read and write them directly."""

GPU_HOST_LIMIT_VAR = "XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB"
"""XLA's cap on a GPU client's pinned host memory, in GB (its host memory allocator refuses more)."""
_GPU_HOST_LIMIT_DEFAULT_GB = 64  # XLA's default for the variable above (xla/pjrt/gpu/se_gpu_pjrt_client.cc)


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
    """Host memory for `capacity_bytes` of rows: the bytes of the host tier, held by the worker."""

    def __init__(self, capacity_bytes: int, *, name: str = "host", backend: str = "auto"):
        """`backend`: "numpy", "arrays" or "auto" (arrays off CPU, numpy on CPU; see the module docstring)."""
        capacity_bytes = check_positive_int("host capacity_bytes", capacity_bytes)
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
        self.row_bytes = 0
        self.pool: np.ndarray | None = None
        """[num_slots, row_bytes] uint8, allocated by `open` (untouched rows cost no memory); None for "arrays"."""
        self.rows: list[tuple[jax.Array, ...] | None] = []
        """"arrays" backend: per slot, its row's `[1, bytes_per_page]` pinned_host array per unit, or None."""
        self._slots = 0
        # (device, offset, width) per unit
        self._units: list[tuple[jax.Device, int, int]] | None = None  # pyright: ignore[reportInvalidTypeForm]

    def open(self, layout: RowLayout) -> None:
        """Allocate the rows: as many of `layout.row_bytes` as fit in `capacity_bytes`."""
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

    def place_units(self, units: list[tuple[jax.Device, int, int]]) -> None:  # pyright: ignore[reportInvalidTypeForm]
        """ "arrays": where each unit's bytes live, (device, row offset, width): rows given as bytes are placed so."""
        if sum(w for _, _, w in units) != self.row_bytes:
            raise ValueError(f"units cover {sum(w for _, _, w in units)} bytes of a {self.row_bytes}-byte row")
        self._units = list(units)

    def row(self, slot: int) -> np.ndarray:
        """A slot's bytes as one `[row_bytes]` uint8 numpy row, for lower tiers to read.

        numpy: a view of the pool row. arrays: zero-copy when the row has one
        unit and the platform maps pinned_host into numpy (CPU); else one copy.
        """
        if self.pool is not None:
            return self.pool[slot]
        arrays = self.rows[slot]
        if arrays is None:
            raise KeyError(f"host slot {slot} of {self.name!r} holds no bytes")
        views = [np.asarray(a).reshape(-1) for a in arrays]
        return views[0] if len(views) == 1 else np.concatenate(views)

    def row_buffer(self, slot: int) -> np.ndarray:
        """Where a lower tier writes a row promoted into `slot`: the pool row, or a fresh aligned buffer."""
        if self.pool is not None:
            return self.pool[slot]
        return aligned_rows(1, self.row_bytes)[0]

    def fill(self, slot: int, row: np.ndarray) -> None:
        """Place `row` (`[row_bytes]` uint8) in `slot`. arrays: zero-copy on CPU when `row` is 64-byte aligned."""
        if self.pool is not None:
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

    def holds(self, slot: int) -> bool:
        """Whether `slot` has bytes (always, for the numpy pool)."""
        return self.pool is not None or self.rows[slot] is not None

    def drop(self, slot: int) -> None:
        """Release a slot's row memory ("arrays"; the numpy pool keeps its rows)."""
        if self.pool is None:
            self.rows[slot] = None

    def close(self) -> None:
        """Release every row ("arrays"; the numpy pool is freed with the tier)."""
        if self.pool is None:
            self.rows = [None] * self._slots

    def __repr__(self) -> str:
        held = self._slots if self.pool is not None else sum(r is not None for r in self.rows)
        return f"HostTier({self.name!r}, {self.backend}, {held}/{self._slots} rows of {self.row_bytes} B)"
