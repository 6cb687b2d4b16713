"""`OffloadEngine`: batched page transfers between a device cache and a host page pool.

The host pool is one `[num_host_pages, row_bytes]` uint8 array. A row (a
*host slot*) holds one logical page: the bytes of that page in every unit
(every shard of values and scales), side by side. A replicated (MLA) unit
occupies its width once, not once per shard.

```
host row:  | values shard 0 | values shard 1 | ... | scales shard 0 | ... |
             ^ unit_offsets[0] ^ unit_offsets[1]
```

The engine keeps no cache: every call takes the cache it reads (`d2h`) or
donates and returns it (`h2d`), so it composes with the caller's own jitted,
donated steps. It remembers only the layout, to check that each cache it is
handed is laid out as the one it was built for.

How the bytes move is not the engine's: it holds one device-to-host and one
host-to-device path (`jaxkv.transfer.paths`), chosen once from the media
(a numpy pool or pinned_host row arrays) and the devices: on CPU the pages
are copied straight between a view of the shard and the pool (`"host"` D2H,
`"pool"` H2D through the native kernels); elsewhere a jitted gather places
pages in pinned_host memory (`"xla"`, or `"arrays"` when the rows are JAX
arrays) and one jitted, donated `shard_map` scatters rows into the cache. The
engine checks every argument, pads batches, and orders transfers: a path whose
transfer still reads or writes host rows after it returns is waited for
before the next one starts (`flush`).

Batches are padded to power-of-two buckets, so each cache layout compiles at
most 1 + log2(N) programs per direction for batches of 1..N pages.

Under `jax.distributed` (a mesh spanning processes) an engine moves only the
shards its process owns: its units, host rows and layout are this process's.
`d2h` is local. `h2d` is one program over the global mesh, so every process of
the group calls it with the same device page ids (SPMD); host slots are each
process's own and may differ. Neither moves a byte between processes.
"""

from __future__ import annotations

import jax
import numpy as np

from jaxkv._checks import check_positive_int
from jaxkv.layout import pages as _pages
from jaxkv.layout.buffer import Cache, KVCacheBuffer, MultiKVCacheBuffer
from jaxkv.layout.fingerprint import RowLayout, RowUnit
from jaxkv.layout.memory import KVCacheMemory
from jaxkv.layout.pages import PageIds, bucket
from jaxkv.transfer import paths
from jaxkv.transfer.handle import Transfer, completed
from jaxkv.transfer.paths import ALIGN_BYTES, D2H_PATHS, aligned_rows

__all__ = ["D2H_PATHS", "OffloadEngine", "aligned_rows", "bucket"]


def _layout_key(unit: KVCacheMemory) -> tuple:
    return (
        type(unit).__name__,
        unit.kind,
        unit.shard_index,
        tuple(d.id for d in unit.devices),
        unit.dtype.name,
        unit.page_shape,
        unit.total_num_pages,
    )


def _cache_leaves(buffer) -> list[tuple[KVCacheBuffer, jax.Array]]:
    """(owning cache, array) for every values/scales array, in to_memory() order."""
    children = buffer.children.values() if isinstance(buffer, MultiKVCacheBuffer) else [buffer]
    return [(c, a) for c in children for a in (c.values, c.scales) if a is not None]


class OffloadEngine:
    """Moves pages of one cache between its devices and a host page pool."""

    def __init__(
        self,
        source: KVCacheBuffer | MultiKVCacheBuffer | list[KVCacheMemory],
        num_host_pages: int | None = None,
        host_memory_kind: str = "pinned_host",
        d2h_path: str = "auto",
        *,
        host_pool: np.ndarray | None = None,
        host_rows=None,
    ):
        """`host_pool`: the numpy rows to use; `host_rows`: a `HostTier` of backend "arrays" instead (not both)."""
        units = source.to_memory() if isinstance(source, (KVCacheBuffer, MultiKVCacheBuffer)) else list(source)
        if not units or not all(isinstance(u, KVCacheMemory) for u in units):
            raise ValueError("source must be a KVCacheBuffer, MultiKVCacheBuffer or a non-empty list of KVCacheMemory")
        pages = {u.total_num_pages for u in units}
        if len(pages) != 1:
            counts = [u.total_num_pages for u in units]
            raise ValueError(f"units must all have the same total_num_pages, got {counts}")
        if host_rows is not None:
            if host_pool is not None or getattr(host_rows, "backend", None) != "arrays":
                raise ValueError("host_rows must be an open HostTier of backend 'arrays', and excludes host_pool")
            if num_host_pages is not None and num_host_pages != host_rows.num_slots:
                raise ValueError(f"num_host_pages ({num_host_pages}) disagrees with host_rows' {host_rows.num_slots}")
            num_host_pages = host_rows.num_slots
        if host_pool is not None:
            if not isinstance(host_pool, np.ndarray) or host_pool.ndim != 2:
                got = f"shape {host_pool.shape}" if isinstance(host_pool, np.ndarray) else type(host_pool).__name__
                raise ValueError(f"host_pool must be a 2-D numpy array [num_host_pages, row_bytes], got {got}")
            if num_host_pages is not None and num_host_pages != len(host_pool):
                raise ValueError(f"num_host_pages ({num_host_pages}) disagrees with host_pool's {len(host_pool)} rows")
            num_host_pages = len(host_pool)
        num_host_pages = check_positive_int("num_host_pages", num_host_pages)
        if d2h_path not in D2H_PATHS:
            raise ValueError(f"d2h_path must be one of {D2H_PATHS}, got {d2h_path!r}")
        on_cpu = all(d.platform == "cpu" for u in units for d in u.devices)
        if d2h_path == "host" and not on_cpu:
            raise ValueError("d2h_path='host' needs every unit on a CPU device; use 'xla' on GPU/TPU")
        kinds = {m.kind for u in units for d in u.devices for m in d.addressable_memories()}
        if host_memory_kind not in kinds:
            raise ValueError(f"host_memory_kind {host_memory_kind!r} is not a memory of these devices: {sorted(kinds)}")

        self.host_memory_kind = host_memory_kind
        self.num_device_pages = pages.pop()
        self.num_host_pages = num_host_pages
        self._layout = [_layout_key(u) for u in units]
        self.layout = (
            RowLayout.of(source)
            if isinstance(source, (KVCacheBuffer, MultiKVCacheBuffer))
            else RowLayout(tuple(RowUnit(u.kind, u.dtype.name, tuple(u.page_shape), u.bytes_per_page) for u in units))
        )
        """What a host row holds (`RowLayout`): its units, width and fingerprint."""
        self.unit_offsets = list(self.layout.unit_offsets)
        """Column where each unit's bytes start in a host row."""
        self.row_bytes = self.layout.row_bytes
        """Bytes of one host slot: one page of every unit."""
        self.host_rows = host_rows
        """The "arrays" `HostTier` whose rows this engine fills and reads, or None (numpy pool)."""
        if host_rows is not None:
            if host_rows.row_bytes != self.row_bytes:
                raise ValueError(f"host_rows hold {host_rows.row_bytes}-byte rows, this cache's are {self.row_bytes}")
            host_rows.place_units(
                [(u.device, o, u.bytes_per_page) for u, o in zip(units, self.unit_offsets, strict=True)]
            )
        elif host_pool is None:
            host_pool = aligned_rows(num_host_pages, self.row_bytes)
        else:
            _check_host_pool(host_pool, self.row_bytes)
        self.host_pool = host_pool
        """[num_host_pages, row_bytes] uint8: the host page pool (a `HostTier`'s rows when built by a worker)."""
        medium = paths.ROW_ARRAYS if host_rows is not None else paths.HOST_POOL
        ctx = paths.RowsContext(
            self.num_device_pages,
            self.row_bytes,
            self.unit_offsets,
            [u.bytes_per_page for u in units],
            host_memory_kind,
            on_cpu,
            host_pool,
            host_rows,
        )
        native_kernels = _pages.native_enabled([d for u in units for d in u.devices])
        self.d2h_transfer: paths.D2HPath = paths.choose_d2h(medium, d2h_path, on_cpu=on_cpu)(ctx)
        """How pages reach host rows (`jaxkv.transfer.paths`), chosen by the media and the devices."""
        self.h2d_transfer: paths.H2DPath = paths.choose_h2d(medium, native_kernels=native_kernels)(ctx)
        """How host rows reach device pages (`jaxkv.transfer.paths`)."""
        self._pending: list[Transfer] = []
        # The last cache layout that passed the full check (`_signature`), what an h2d needs of
        # its units (`_UnitShape`: no shard arrays, which would keep a dropped cache alive) and
        # where each unit's shard sits in its array's `addressable_shards`.
        self._known_signature: tuple | None = None
        self._unit_shapes: list[_UnitShape] = []
        self._shard_plan: list[tuple[int, int]] = []

    # -- public API --------------------------------------------------------
    @property
    def d2h_path(self) -> str:
        """The device-to-host path in use: 'host', 'xla' or 'arrays'."""
        return self.d2h_transfer.name

    @property
    def h2d_path(self) -> str:
        """The host-to-device path in use: 'pool', 'staged' or 'arrays'."""
        return self.h2d_transfer.name

    @property
    def layout_fingerprint(self) -> bytes:
        """The host rows' layout fingerprint (`RowLayout.fingerprint`): stored with every block outside the device."""
        return self.layout.fingerprint

    def d2h(self, cache: Cache | list[KVCacheMemory], device_page_ids: PageIds, host_slots: PageIds) -> Transfer:
        """Copy pages `device_page_ids` of `cache` into host rows `host_slots`.

        `cache` is read, not donated: a `KVCacheBuffer` / `MultiKVCacheBuffer`
        laid out as the one the engine was built for (or that buffer's
        `to_memory()` units). The copy is ordered after whatever computation
        produced the pages: it consumes the cache arrays, so JAX runs it after
        their producers, and a later donation of the cache waits for it.
        """
        path = self.d2h_transfer
        if path.reads_shards and self._is_known(cache):
            # The layout passed the full check before: the shards are all this path needs.
            units, shards = None, self._known_shards(cache)
        else:
            units = self._check_units(cache)
            shards = [u.shard for u in units]
        ids, slots = self._check_batch(device_page_ids, host_slots)
        self.flush()
        if ids.size == 0:
            return completed("d2h", 0, 0)
        transfer = path.copy(units, shards, ids, slots, ids.size * self.row_bytes)
        if path.tracked:
            self._pending.append(transfer)  # the rows it fills must not be read before it lands
        return transfer

    def h2d(
        self, cache: Cache, host_slots: PageIds, device_page_ids: PageIds, *, checked: list | None = None
    ) -> tuple[KVCacheBuffer | MultiKVCacheBuffer, Transfer]:
        """Write host rows `host_slots` into device pages `device_page_ids` of `cache`.

        `cache` is donated: the update is in place and `cache` must not be
        used afterwards. Returns the new cache and the transfer. Replicated
        units are written to every shard. Bit-exact.

        When the cache spans processes this is one SPMD program: every
        process calls it with the same `device_page_ids` and its own
        `host_slots`, and writes only its own shards.

        `checked`: what `check(cache)` returned for this very cache, when the
        caller checked it a moment ago (saves the check).
        """
        units = checked if checked is not None else self.check(cache)
        ids, slots = self._check_batch(device_page_ids, host_slots)
        self.flush()
        if ids.size == 0:
            return cache, completed("h2d", 0, 0)
        kb = bucket(ids.size)
        # Padding ids point past the cache, so the scatter drops them; all distinct.
        padded_ids = np.concatenate([ids, self.num_device_pages + np.arange(kb - ids.size, dtype=np.int32)])
        padded_slots = np.concatenate([slots, np.full(kb - ids.size, slots[0], np.int32)])
        leaves = _cache_leaves(cache)
        groups = self._leaf_groups(units, leaves)
        path = self.h2d_transfer
        new_arrays, done, nbytes = path.write(cache, leaves, groups, units, ids, slots, padded_ids, padded_slots)
        new_cache = jax.tree.unflatten(jax.tree.structure(cache), new_arrays)
        # The handle waits on `done`, not on the new cache: the caller may donate
        # the cache to its next step at once (deleting those arrays) while this
        # program still reads the host rows, and the engine must not keep it.
        transfer = Transfer("h2d", ids.size, nbytes, arrays=done)
        if path.tracked:
            self._pending.append(transfer)  # the rows it reads must not change before it ends
        return new_cache, transfer

    def flush(self) -> None:
        """Complete every pending transfer: offloads land in the pool, loads stop reading it."""
        pending, self._pending = self._pending, []
        for t in pending:
            t.synchronize()

    def read_host(self, host_slots: PageIds) -> np.ndarray:
        """A copy of host rows `host_slots`: [len(host_slots), row_bytes] uint8."""
        slots = _pages.check_page_ids(host_slots, self.num_host_pages, name="host_slots")
        self.flush()
        if self.host_rows is not None:
            return np.stack([self.host_rows.row(int(s)) for s in slots]).reshape(slots.size, self.row_bytes)
        assert self.host_pool is not None  # one of the two is set at construction
        return self.host_pool[slots]

    def write_host(self, host_slots: PageIds, rows: np.ndarray) -> None:
        """Fill host rows `host_slots` with `rows` ([len(host_slots), row_bytes] uint8)."""
        slots = _pages.check_page_ids(host_slots, self.num_host_pages, name="host_slots")
        _pages.check_unique(slots, name="host_slots")
        rows = np.asarray(rows)
        if rows.dtype != np.uint8 or rows.shape != (slots.size, self.row_bytes):
            raise ValueError(
                f"rows must be uint8 of shape {(slots.size, self.row_bytes)} (len(host_slots), row_bytes), "
                f"got {rows.dtype} of shape {rows.shape}"
            )
        self.flush()
        if self.host_rows is not None:
            for s, row in zip(slots.tolist(), rows, strict=True):
                self.host_rows.fill(s, np.array(row))  # its own buffer: the row arrays may alias it
            return
        assert self.host_pool is not None  # one of the two is set at construction
        self.host_pool[slots] = rows

    # -- validation --------------------------------------------------------
    def _check_batch(self, device_page_ids, host_slots) -> tuple[np.ndarray, np.ndarray]:
        ids = _pages.check_page_ids(device_page_ids, self.num_device_pages, name="device_page_ids")
        slots = _pages.check_page_ids(host_slots, self.num_host_pages, name="host_slots")
        if ids.size != slots.size:
            raise ValueError(
                f"device_page_ids has {ids.size} entries but host_slots has {slots.size}: "
                f"they pair up one to one and must have the same length"
            )
        _pages.check_unique(ids, name="device_page_ids")
        _pages.check_unique(slots, name="host_slots")
        return ids, slots

    def _check_buffer(self, cache) -> list[KVCacheMemory]:
        if not isinstance(cache, (KVCacheBuffer, MultiKVCacheBuffer)):
            raise ValueError(f"cache must be a KVCacheBuffer or MultiKVCacheBuffer, got {type(cache).__name__}")
        if any(a.is_deleted() for _, a in _cache_leaves(cache)):
            raise ValueError("cache has been donated (its arrays are deleted); pass the cache the last call returned")
        units = cache.to_memory()
        self._check_layout([_layout_key(u) for u in units])
        self._remember(cache, units)
        return units

    @staticmethod
    def _signature(cache) -> tuple:
        """What `to_memory()` and the layout keys of `cache` are a function of: arrays' kind, shape, dtype, sharding."""
        leaves = tuple(
            (c.replicates_kv_across_tp, a is c.values, a.shape, a.dtype, a.sharding) for c, a in _cache_leaves(cache)
        )
        return (type(cache), leaves)

    def _remember(self, cache, units: list[KVCacheMemory]) -> None:
        """Record a cache that passed the full check: its signature, its units' shapes, where their shards are."""
        plan = []
        for i, (_, array) in enumerate(_cache_leaves(cache)):
            devices = [s.device for s in array.addressable_shards]
            plan.append((i, devices))
        groups = self._leaf_groups(units, _cache_leaves(cache))
        self._shard_plan = [
            (i, devices.index(unit.device))
            for (i, devices), group in zip(plan, groups, strict=True)
            for unit, _ in group
        ]
        self._unit_shapes = [_UnitShape(u.bytes_per_page, list(u.devices)) for u in units]
        self._known_signature = self._signature(cache)

    def check(self, cache: Cache) -> list:
        """Check that `cache` is a live buffer laid out as the engine's; returns what an `h2d` of it needs.

        A cache laid out as the last one that passed the full check needs only
        a comparison of its arrays' shapes, dtypes and shardings (to_memory()
        and the full layout check cost tens of µs per call: docs/benchmarks.md,
        "Measurements behind the rules", "Engine and worker"). Raises ValueError naming what differs.
        """
        return self._unit_shapes if self._is_known(cache) else self._check_buffer(cache)

    def _is_known(self, cache) -> bool:
        """Whether `cache` is a live buffer laid out as one that passed `_check_buffer` (else run that check)."""
        if self._known_signature is None or not isinstance(cache, (KVCacheBuffer, MultiKVCacheBuffer)):
            return False
        if any(a.is_deleted() for _, a in _cache_leaves(cache)):
            return False  # `_check_buffer` raises the donated-cache error
        return self._signature(cache) == self._known_signature

    def _known_shards(self, cache) -> list[jax.Array]:
        """Each unit's shard of a cache `_is_known` accepted, in `to_memory()` order (zero-copy)."""
        leaves = _cache_leaves(cache)
        return [leaves[i][1].addressable_shards[pos].data for i, pos in self._shard_plan]

    def _check_layout(self, layout: list[tuple]) -> None:
        if layout != self._layout:
            for i, (got, want) in enumerate(zip(layout, self._layout, strict=False)):
                if got != want:
                    fields = ("unit type", "kind", "shard index", "device ids", "dtype", "page shape", "pages")
                    diff = "; ".join(
                        f"{name} {g!r} (the engine's: {w!r})"
                        for name, g, w in zip(fields, got, want, strict=True)
                        if g != w
                    )
                    raise ValueError(
                        f"cache layout differs from the engine's at unit {i} ({got[1]}): {diff}; the cache is laid "
                        f"out for another TP degree, model or device set: build a worker for it"
                    )
            raise ValueError(f"cache has {len(layout)} units, the engine was built for {len(self._layout)}")

    def _check_units(self, cache) -> list[KVCacheMemory]:
        """The units of `cache` (a buffer or a list of units), checked against the engine's layout."""
        if isinstance(cache, (KVCacheBuffer, MultiKVCacheBuffer)):
            return self._check_buffer(cache)
        if isinstance(cache, (list, tuple)) and cache and all(isinstance(u, KVCacheMemory) for u in cache):
            units = list(cache)
            if any(s.is_deleted() for u in units for s in u.shards()):
                raise ValueError(
                    "cache has been donated (its arrays are deleted); pass the cache the last call returned"
                )
            self._check_layout([_layout_key(u) for u in units])
            return units
        raise ValueError(
            f"cache must be a KVCacheBuffer, MultiKVCacheBuffer or a list of its KVCacheMemory units, "
            f"got {type(cache).__name__}"
        )

    def _leaf_groups(self, units, leaves) -> list[list[tuple[KVCacheMemory, int]]]:
        """(unit, host-row offset) pairs of each cache array, in to_memory() order.

        A sharded array has one unit per shard this process holds, a replicated one unit.
        """
        pairs = iter(zip(units, self.unit_offsets, strict=True))
        counts = [1 if c.replicates_kv_across_tp else len(a.addressable_shards) for c, a in leaves]
        return [[next(pairs) for _ in range(n)] for n in counts]

    def __repr__(self) -> str:
        units = len(self.unit_offsets)
        return (
            f"OffloadEngine({self.num_device_pages} device pages <-> {self.num_host_pages} host rows of "
            f"{self.row_bytes:,} B ({units} unit{'s' if units != 1 else ''}), d2h {self.d2h_path}, h2d {self.h2d_path})"
        )


class _UnitShape:
    """What an h2d needs of a unit once its cache's layout is checked: widths and devices, no shard arrays."""

    __slots__ = ("bytes_per_page", "devices")

    def __init__(self, bytes_per_page: int, devices: list[jax.Device]):  # pyright: ignore[reportInvalidTypeForm]
        self.bytes_per_page = bytes_per_page
        self.devices = devices


def _check_host_pool(pool: np.ndarray, row_bytes: int) -> None:
    """Raise ValueError naming what makes `pool` unusable as the engine's rows (see `aligned_rows`)."""
    fix = f"build it with aligned_rows({len(pool)}, {row_bytes})"
    if pool.dtype != np.uint8:
        raise ValueError(f"host_pool must have dtype uint8, got {pool.dtype}; {fix}")
    if pool.shape[1] != row_bytes:
        raise ValueError(
            f"host_pool must have shape (num_host_pages, row_bytes) = ({len(pool)}, {row_bytes}), got {pool.shape}"
        )
    if not pool.flags.c_contiguous:
        raise ValueError(f"host_pool must be C-contiguous, got strides {pool.strides}; {fix}")
    if pool.ctypes.data % ALIGN_BYTES:
        raise ValueError(
            f"host_pool data must start on a {ALIGN_BYTES}-byte boundary (XLA:CPU copies a less aligned array), "
            f"got address % {ALIGN_BYTES} = {pool.ctypes.data % ALIGN_BYTES}; {fix}"
        )
