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

Device to host (`d2h`) reads the pages of every unit; there are two paths:

- ``"xla"`` (any backend; the default off CPU): one jitted gather per unit, the
  bitcast to bytes fused into it, its output placed in host memory
  (`memory_kind=host_memory_kind`) by XLA; the rows are copied into the pool
  when the transfer completes.
- ``"host"`` (CPU backend only; its default): a CPU device's memory *is* host
  memory, so the pages are copied straight from a transient numpy view of the
  shard into the pool rows, one `memcpy` per page. XLA:CPU's gather runs at a
  fraction of `memcpy` speed (docs/benchmarks.md).

With a `HostTier` of backend "arrays" as its rows (`host_rows=`, what a
worker builds off CPU) both directions skip numpy: `d2h` is one jitted
gather per unit whose outputs, one `[1, bytes_per_page]` array per page, are
placed in `pinned_host` memory by XLA and become the host rows as they are;
`h2d` feeds those arrays to one jitted, donated program that moves them to
device memory and scatters them into the cache.

Host to device (`h2d`) stages the rows per device and scatters them into the
cache in one jitted, donated computation (`jax.shard_map` over each cache
array): the cache is updated in place and the old buffer is dead afterwards.

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
from jax.sharding import NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

from jaxkv import _native as native
from jaxkv.layout import pages as _pages
from jaxkv.layout.buffer import KVCacheBuffer, MultiKVCacheBuffer
from jaxkv.layout.fingerprint import RowLayout, RowUnit
from jaxkv.layout.memory import KVCacheMemory
from jaxkv.transfer.handle import Transfer, completed

D2H_PATHS = ("auto", "xla", "host")

# Without the native kernels: below this page width a per-page Python loop
# costs more than a vectorized gather's extra pass (measured here: the loop
# wins at 16 KiB pages, fancy indexing at 4 KiB), so small pages use the latter.
_LOOP_MIN_PAGE_BYTES = 16 * 1024


def bucket(n: int) -> int:
    """The power-of-two batch size that `n` pages are padded to."""
    return 1 << max(0, n - 1).bit_length()


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
        if isinstance(num_host_pages, bool) or not isinstance(num_host_pages, int) or num_host_pages < 1:
            raise ValueError(f"num_host_pages must be a positive int, got {num_host_pages!r}")
        if d2h_path not in D2H_PATHS:
            raise ValueError(f"d2h_path must be one of {D2H_PATHS}, got {d2h_path!r}")
        on_cpu = all(d.platform == "cpu" for u in units for d in u.devices)
        if d2h_path == "host" and not on_cpu:
            raise ValueError("d2h_path='host' needs every unit on a CPU device; use 'xla' on GPU/TPU")
        kinds = {m.kind for u in units for d in u.devices for m in d.addressable_memories()}
        if host_memory_kind not in kinds:
            raise ValueError(f"host_memory_kind {host_memory_kind!r} is not a memory of these devices: {sorted(kinds)}")

        self._on_cpu = on_cpu
        self.d2h_path = ("host" if on_cpu else "xla") if d2h_path == "auto" else d2h_path
        """The device-to-host path in use: 'xla' or 'host'."""
        self.host_memory_kind = host_memory_kind
        self.num_device_pages = pages.pop()
        self.num_host_pages = num_host_pages
        self._layout = [_layout_key(u) for u in units]
        self._unit_widths = [u.bytes_per_page for u in units]
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
            host_rows.bind([(u.device, o, u.bytes_per_page) for u, o in zip(units, self.unit_offsets, strict=True)])
            self.d2h_path = "arrays"
        elif host_pool is None:
            host_pool = aligned_rows(num_host_pages, self.row_bytes)
        else:
            _check_host_pool(host_pool, self.row_bytes)
        self.host_pool = host_pool
        """[num_host_pages, row_bytes] uint8: the host page pool (a `HostTier`'s rows when built by a worker)."""
        self._pending: list[Transfer] = []
        if host_rows is not None:
            self.h2d_path = "arrays"
        else:
            self.h2d_path = "pool" if _pages.native_enabled([d for u in units for d in u.devices]) else "staged"
        """The host-to-device path: 'arrays' (pinned_host row arrays), 'pool' (native, from the pool) or 'staged'."""
        self._arrays_gather_fns: dict[tuple[jax.Device, int], object] = {}
        self._pool_arrays = None
        self._h2d_fn = None
        self._gather_fns: dict[jax.Device, object] = {}
        # The last cache layout that passed the full check (`_signature`), what an h2d needs of
        # its units (`_UnitShape`: no shard arrays, which would keep a dropped cache alive) and
        # where each unit's shard sits in its array's `addressable_shards`.
        self._known_signature: tuple | None = None
        self._unit_shapes: list[_UnitShape] = []
        self._shard_plan: list[tuple[int, int]] = []

    # -- public API --------------------------------------------------------
    @property
    def layout_fingerprint(self) -> bytes:
        """The host rows' layout fingerprint (`RowLayout.fingerprint`): stored with every block outside the device."""
        return self.layout.fingerprint

    def d2h(self, cache, device_page_ids, host_slots) -> Transfer:
        """Copy pages `device_page_ids` of `cache` into host rows `host_slots`.

        `cache` is read, not donated: a `KVCacheBuffer` / `MultiKVCacheBuffer`
        laid out as the one the engine was built for (or that buffer's
        `to_memory()` units). The copy is ordered after whatever computation
        produced the pages: it consumes the cache arrays, so JAX runs it after
        their producers, and a later donation of the cache waits for it.
        """
        if self.d2h_path == "host" and self._is_known(cache):
            # The layout passed the full check before: the shards are all this path needs.
            shards = self._known_shards(cache)
        else:
            units = self._check_units(cache)
            shards = [u.shard for u in units]
        ids, slots = self._check_batch(device_page_ids, host_slots)
        self.flush()
        nbytes = ids.size * self.row_bytes
        if ids.size == 0:
            return completed("d2h", 0, 0)
        if self.d2h_path == "host":
            self._d2h_host(shards, ids, slots)
            return completed("d2h", ids.size, nbytes)
        if self.d2h_path == "arrays":
            return self._d2h_arrays(units, ids, slots, nbytes)
        return self._d2h_xla(units, ids, slots, nbytes)

    def h2d(
        self, cache, host_slots, device_page_ids, *, _units: list[KVCacheMemory] | None = None
    ) -> tuple[KVCacheBuffer | MultiKVCacheBuffer, Transfer]:
        """Write host rows `host_slots` into device pages `device_page_ids` of `cache`.

        `cache` is donated: the update is in place and `cache` must not be
        used afterwards. Returns the new cache and the transfer. Replicated
        units are written to every shard. Bit-exact.

        When the cache spans processes this is one SPMD program: every
        process calls it with the same `device_page_ids` and its own
        `host_slots`, and writes only its own shards.
        """
        # `_units`: the worker checked this cache a moment ago (to_memory() and the layout cost ~20 µs).
        # A cache laid out as one that passed the full check needs only the units' shapes
        # (to_memory() alone cost 54 µs of a 16 MiB load on one CPU device, bench/max_pages.py).
        units = _units if _units is not None else self._h2d_units(cache)
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
        if self._h2d_fn is None:
            self._h2d_fn = _build_h2d(leaves, self.h2d_path)
        if self.h2d_path == "arrays":
            return self._h2d_arrays(cache, units, leaves, groups, ids, slots, padded_ids, padded_slots)
        if self.h2d_path == "pool":
            sources = [
                (*src, _slots_arg(a, padded_slots))
                for src, (_, a) in zip(self._pool_sources(leaves, groups), leaves, strict=True)
            ]
        else:
            sources = [self._stage_rows(c, a, g, padded_slots) for (c, a), g in zip(leaves, groups, strict=True)]
        nbytes = ids.size * sum(u.bytes_per_page * len(u.devices) for u in units)
        new_arrays, done = self._h2d_fn([a for _, a in leaves], sources, padded_ids)
        new_cache = jax.tree.unflatten(jax.tree.structure(cache), new_arrays)
        # The handle waits on `done`, not on the new cache: the caller may donate
        # the cache to its next step at once (deleting those arrays) while this
        # program still reads the pool rows, and the engine must not keep it.
        transfer = Transfer("h2d", ids.size, nbytes, arrays=done)
        self._pending.append(transfer)  # the pool rows it reads must not change before it ends
        return new_cache, transfer

    def flush(self) -> None:
        """Complete every pending transfer: offloads land in the pool, loads stop reading it."""
        pending, self._pending = self._pending, []
        for t in pending:
            t.synchronize()

    def read_host(self, host_slots) -> np.ndarray:
        """A copy of host rows `host_slots`: [len(host_slots), row_bytes] uint8."""
        slots = _pages.check_page_ids(host_slots, self.num_host_pages, name="host_slots")
        self.flush()
        if self.host_rows is not None:
            return np.stack([self.host_rows.row(int(s)) for s in slots]).reshape(slots.size, self.row_bytes)
        return self.host_pool[slots]

    def write_host(self, host_slots, rows) -> None:
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

    def _h2d_units(self, cache) -> list:
        """What an H2D needs of `cache`: its units' shapes if it is laid out as a checked one, else the full check."""
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
                    raise ValueError(f"cache layout differs from the engine's at unit {i}: got {got}, expected {want}")
            raise ValueError(f"cache has {len(layout)} units, the engine was built for {len(self._layout)}")

    def _check_units(self, cache) -> list[KVCacheMemory]:
        """The units of `cache` (a buffer or a list of units), checked against the engine's layout."""
        if isinstance(cache, (KVCacheBuffer, MultiKVCacheBuffer)):
            return self._check_buffer(cache)
        if isinstance(cache, (list, tuple)) and cache and all(isinstance(u, KVCacheMemory) for u in cache):
            units = list(cache)
            if any(s.is_deleted() for u in units for s in u._shards()):
                raise ValueError(
                    "cache has been donated (its arrays are deleted); pass the cache the last call returned"
                )
            self._check_layout([_layout_key(u) for u in units])
            return units
        raise ValueError(
            f"cache must be a KVCacheBuffer, MultiKVCacheBuffer or a list of its KVCacheMemory units, "
            f"got {type(cache).__name__}"
        )

    # -- device to host ----------------------------------------------------
    def _d2h_host(self, shards: list[jax.Array], ids, slots) -> None:
        for shard, offset, width in zip(shards, self.unit_offsets, self._unit_widths, strict=True):
            # A transient, zero-copy view; it blocks until the shard's producer
            # finished and is dropped before returning (a live numpy view would
            # disable donation of the cache).
            view = np.asarray(shard).reshape(self.num_device_pages, -1).view(np.uint8)
            _copy_rows(self.host_pool[:, offset : offset + width], slots, view, ids, on_cpu=True)
            del view

    def _gather_fn(self, device: jax.Device):
        fn = self._gather_fns.get(device)
        if fn is None:
            host = SingleDeviceSharding(device, memory_kind=self.host_memory_kind)
            gather, _ = _pages.kernels([device])
            fn = self._gather_fns[device] = jax.jit(gather, out_shardings=host)
        return fn

    def _d2h_xla(self, units, ids, slots, nbytes) -> Transfer:
        kb = bucket(ids.size)
        padded = np.concatenate([ids, np.full(kb - ids.size, ids[0], np.int32)])
        outs = [self._gather_fn(u.device)(u.shard, padded) for u in units]

        def place():
            for out, unit, offset in zip(outs, units, self.unit_offsets, strict=True):
                self.host_pool[slots, offset : offset + unit.bytes_per_page] = np.asarray(out)[: ids.size]

        transfer = Transfer("d2h", ids.size, nbytes, arrays=outs, on_complete=place)
        self._pending.append(transfer)
        return transfer

    def _d2h_arrays(self, units, ids, slots, nbytes) -> Transfer:
        """Gather pages into fresh pinned_host arrays, one per (page, unit); they become the slots' rows as they are."""
        kb = bucket(ids.size)
        padded = np.concatenate([ids, np.full(kb - ids.size, ids[0], np.int32)])
        outs = []
        for u in units:
            key = (u.device, kb)
            fn = self._arrays_gather_fns.get(key)
            if fn is None:
                fn = self._arrays_gather_fns[key] = _build_arrays_gather(u.device, kb, self.host_memory_kind)
            outs.append(fn(u.shard, padded)[: ids.size])  # the padding's outputs are dropped at once
        for i, slot in enumerate(slots.tolist()):
            self.host_rows.set_arrays(slot, tuple(out[i] for out in outs))
        return Transfer("d2h", ids.size, nbytes, arrays=[a for out in outs for a in out])

    # -- host to device ----------------------------------------------------
    def _h2d_arrays(self, cache, units, leaves, groups, ids, slots, padded_ids, padded_slots):
        """Feed the slots' pinned_host row arrays to the jitted, donated scatter (no numpy copy of page bytes).

        Sharded array: per page, its units' `[1, w]` arrays are the shards of
        one `[tp, w]` pinned_host global array (no copy). Replicated: the root
        unit's array is broadcast to every device first (the bytes must reach
        each of them anyway).
        """
        rows = [self.host_rows.arrays(int(s)) for s in padded_slots]
        index = {id(u): i for i, u in enumerate(units)}
        sources = []
        for (c, a), group in zip(leaves, groups, strict=True):
            mesh = a.sharding.mesh
            width = group[0][0].bytes_per_page
            if c.replicates_kv_across_tp:
                i = index[id(group[0][0])]
                sharding = NamedSharding(mesh, P(), memory_kind="device")
                sources.append(jax.device_put([r[i] for r in rows], [sharding] * len(rows)))
                continue
            sharding = NamedSharding(mesh, P(c.tp_axis, None), memory_kind=self.host_memory_kind)
            cols = [index[id(u)] for u, _ in group]
            sources.append(
                [
                    jax.make_array_from_single_device_arrays((len(cols), width), sharding, [r[i] for i in cols])
                    for r in rows
                ]
            )
        nbytes = ids.size * sum(u.bytes_per_page * len(u.devices) for u in units)
        new_arrays, done = self._h2d_fn([a for _, a in leaves], sources, padded_ids)
        new_cache = jax.tree.unflatten(jax.tree.structure(cache), new_arrays)
        # Nothing pending: row arrays are never written, and the program holds its inputs until it ends.
        return new_cache, Transfer("h2d", ids.size, nbytes, arrays=done)

    def _leaf_groups(self, units, leaves) -> list[list[tuple[KVCacheMemory, int]]]:
        """(unit, host-row offset) pairs of each cache array, in to_memory() order.

        A sharded array has one unit per shard this process holds, a replicated one unit.
        """
        pairs = iter(zip(units, self.unit_offsets, strict=True))
        counts = [1 if c.replicates_kv_across_tp else len(a.addressable_shards) for c, a in leaves]
        return [[next(pairs) for _ in range(n)] for n in counts]

    def _pool_sources(self, leaves, groups) -> list[tuple[jax.Array, jax.Array]]:
        """Per cache array: (the pool on every device, each shard's row offset), zero-copy.

        On CPU an aligned numpy array is placed on a device without a copy, so
        the native scatter reads page bytes straight out of the pool rows.
        Built once; the arrays alias `host_pool`. Global arrays over the TP
        group assembled from this process's devices only (the global shape
        counts every shard of the group).
        """
        if self._pool_arrays is None:
            self._pool_arrays = []
            for (cache, array), group in zip(leaves, groups, strict=True):
                mesh = array.sharding.mesh
                devices = [d for unit, _ in group for d in unit.devices]
                pools = [jax.device_put(self.host_pool, d) for d in devices]
                if any(p.unsafe_buffer_pointer() != self.host_pool.ctypes.data for p in pools):
                    raise RuntimeError("host pool was copied onto a device; the 'pool' h2d path needs zero-copy")
                offsets = [np.array([off], np.int32) for unit, off in group for _ in unit.devices]
                offsets = [jax.device_put(o, d) for o, d in zip(offsets, devices, strict=True)]
                n = 1 if cache.replicates_kv_across_tp else cache.tp_degree
                spec = P() if cache.replicates_kv_across_tp else P(cache.tp_axis, None)
                off_spec = P() if cache.replicates_kv_across_tp else P(cache.tp_axis)
                pool = jax.make_array_from_single_device_arrays(
                    (n * self.num_host_pages, self.row_bytes), NamedSharding(mesh, spec), pools
                )
                off = jax.make_array_from_single_device_arrays((n,), NamedSharding(mesh, off_spec), offsets)
                self._pool_arrays.append((pool, off))
        return self._pool_arrays

    def _stage_rows(self, cache: KVCacheBuffer, array: jax.Array, group, slots) -> jax.Array:
        """Rows of `group` ((unit, offset) pairs) for host `slots`, as one global array.

        Sharded: [tp_degree * k, bytes_per_page] split over the TP axis, shard
        i's rows on device i. Replicated: [k, bytes_per_page] on every device,
        staged once. Only this process's pieces are staged: `group` holds its
        units, the global shape counts the whole group.
        """
        pieces = []
        for unit, offset in group:
            staged = _aligned((slots.size, unit.bytes_per_page))
            _copy_rows(
                staged,
                np.arange(slots.size, dtype=np.int32),
                self.host_pool[:, offset : offset + unit.bytes_per_page],
                slots,
                on_cpu=self._on_cpu,
            )
            pieces.extend(jax.device_put(staged, d) for d in unit.devices)
        width = group[0][0].bytes_per_page
        if cache.replicates_kv_across_tp:
            sharding = NamedSharding(array.sharding.mesh, P())
            return jax.make_array_from_single_device_arrays((slots.size, width), sharding, pieces)
        sharding = NamedSharding(array.sharding.mesh, P(cache.tp_axis, None))
        return jax.make_array_from_single_device_arrays((slots.size * cache.tp_degree, width), sharding, pieces)


class _UnitShape:
    """What an h2d needs of a unit once its cache's layout is checked: widths and devices, no shard arrays."""

    __slots__ = ("bytes_per_page", "devices")

    def __init__(self, bytes_per_page: int, devices: list[jax.Device]):
        self.bytes_per_page = bytes_per_page
        self.devices = devices


# XLA:CPU places a host array on a device without copying only when its data
# is aligned to this many bytes (measured: a 64-byte-aligned numpy array keeps
# its pointer through jax.device_put, a 16-byte-aligned one is copied).
_ALIGN = 64


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
    if pool.ctypes.data % _ALIGN:
        raise ValueError(
            f"host_pool data must start on a {_ALIGN}-byte boundary (XLA:CPU copies a less aligned array), "
            f"got address % {_ALIGN} = {pool.ctypes.data % _ALIGN}; {fix}"
        )


def aligned_rows(num_rows: int, row_bytes: int) -> np.ndarray:
    """A zeroed `[num_rows, row_bytes]` uint8 pool that XLA:CPU can place on a device without a copy.

    Untouched pages are mapped lazily: a pool costs memory as it fills.
    """
    return _aligned((num_rows, row_bytes), np.zeros)


def _aligned(shape, alloc=np.empty) -> np.ndarray:
    """A uint8 array of `shape` whose data starts on an `_ALIGN`-byte boundary.

    With `alloc=np.zeros` untouched pages are mapped lazily: a pool costs
    memory as it fills.
    """
    n = int(np.prod(shape))
    raw = alloc(n + _ALIGN, np.uint8)
    start = (-raw.ctypes.data) % _ALIGN
    return raw[start : start + n].reshape(shape)


def _slots_spec(array: jax.Array) -> P:
    """How host slots enter the h2d program for `array`.

    Host slots are per-process state (each process has its own pool), so when
    the cache spans processes each device gets its process's slots as its own
    block; JAX would take a replicated argument to be the same everywhere. In
    one process a replicated numpy argument is cheaper (measured: the
    per-device layout added 20-60 µs to a 1-page h2d on 8 CPU devices).
    """
    return P() if array.is_fully_addressable else P(tuple(array.sharding.mesh.axis_names))


def _slots_arg(array: jax.Array, slots: np.ndarray):
    """`slots` laid out as `_slots_spec(array)` says."""
    spec = _slots_spec(array)
    if spec == P():
        return slots
    mesh = array.sharding.mesh
    # The callback runs for this process's devices only and returns their block.
    return jax.make_array_from_callback((mesh.size * slots.size,), NamedSharding(mesh, spec), lambda _: slots)


def _copy_rows(dst: np.ndarray, dst_rows: np.ndarray, src: np.ndarray, src_rows: np.ndarray, *, on_cpu: bool) -> None:
    """dst[dst_rows[i]] = src[src_rows[i]]: one memcpy per row, natively on a CPU engine when the kernels are built.

    `on_cpu` is False for an engine on GPU/TPU: its staging copies run in numpy
    and never load the native library.
    """
    if on_cpu and native.available():
        native.copy_rows(dst, dst_rows, src, src_rows)
    elif src.shape[1] >= _LOOP_MIN_PAGE_BYTES:
        for d, s in zip(dst_rows.tolist(), src_rows.tolist(), strict=True):
            dst[d] = src[s]
    else:
        dst[dst_rows] = src[src_rows]  # small rows: per-row Python overhead would dominate


def _build_arrays_gather(device: jax.Device, kb: int, memory_kind: str):
    """A jitted gather of `kb` pages of one shard into `kb` separate `[1, bytes_per_page]` arrays in `memory_kind`.

    Separate outputs, so each page's bytes are their own buffer: a row can be
    released (evicted) alone. The kernel is the backend's own (native memcpy
    on XLA:CPU, the word gather elsewhere).
    """
    gather, _ = _pages.kernels([device])
    host = SingleDeviceSharding(device, memory_kind=memory_kind)

    def pages(shard, ids):
        rows = gather(shard, ids)
        return tuple(rows[i : i + 1] for i in range(kb))

    return jax.jit(pages, out_shardings=host)


def _with_done(shard: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`shard` and its first element: a marker that exists only after the write that produced `shard`."""
    return shard, shard.reshape(-1)[:1]


def _build_h2d(leaves: list[tuple[KVCacheBuffer, jax.Array]], path: str):
    """One jitted, donated computation that writes page bytes into every cache array.

    path 'pool': sources are (host pool, row offsets, host slots per device)
    per array and the native kernel copies rows straight from the pool. path
    'staged': sources are staged rows per array and the backend's scatter
    kernel writes them. Page ids are replicated: the group writes the same
    pages everywhere.

    Returns (new arrays, done): `done` holds, per array, one element of every
    shard it wrote, computed from the written shard. It is ready on a device
    only once that device's writes (and so its reads of the host rows) ended,
    and nobody donates it, unlike the new cache.
    """
    devices = [d for _, a in leaves for d in a.sharding.device_set]
    _, scatter = _pages.kernels(devices)
    bodies = []
    for cache, array in leaves:
        spec = array.sharding.spec
        rows_spec = P() if cache.replicates_kv_across_tp else P(cache.tp_axis, None)
        off_spec = P() if cache.replicates_kv_across_tp else P(cache.tp_axis)
        if path == "arrays":
            rows_spec = P() if cache.replicates_kv_across_tp else P(cache.tp_axis, None)
            on_device = NamedSharding(array.sharding.mesh, rows_spec, memory_kind="device")

            def write(shard, ids, src):
                return scatter(shard, ids, jax.numpy.concatenate(src, axis=0))

            in_specs = (spec, P(), rows_spec)
        elif path == "pool":

            def write(shard, ids, src):
                pool, offsets, slots = src
                return _pages.scatter_page_bytes_from_pool(shard, ids, pool, slots, offsets)

            in_specs = (spec, P(), (rows_spec, off_spec, _slots_spec(array)))
        else:
            write = scatter
            in_specs = (spec, P(), rows_spec)
        body = jax.shard_map(
            lambda shard, ids, src, write=write: _with_done(write(shard, ids, src)),
            mesh=array.sharding.mesh,
            in_specs=in_specs,
            out_specs=(spec, off_spec),
            check_vma=False,
        )
        if path == "arrays":
            # Rows arrive in pinned_host memory: move them to the device inside the program.
            body = lambda a, ids, src, body=body, to=on_device: body(a, ids, [jax.device_put(r, to) for r in src])  # noqa: E731
        bodies.append(body)

    def write_all(arrays, sources, ids):
        outs = [body(a, ids, src) for body, a, src in zip(bodies, arrays, sources, strict=True)]
        return [new for new, _ in outs], [done for _, done in outs]

    return jax.jit(write_all, donate_argnums=0)
