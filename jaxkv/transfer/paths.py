"""Transfer paths: one small object per (source medium, destination medium), chosen once per engine.

An `OffloadEngine` checks its arguments and orders transfers; how bytes move
is a path's business. Each path is registered under the pair of media it
moves between, as a serving stack registers one handler per pair:

```
medium pair                         path                  where
device -> host pool                 D2HFromHostMemory     CPU: the device's memory *is* host memory; memcpy per page
device -> host pool                 D2HGather             any backend: jitted gather into pinned_host, then the pool
device -> host row arrays           D2HToRowArrays        GPU/TPU default: the gather's outputs *are* the rows
host pool -> device                 H2DFromPool           CPU with the native kernels: the scatter reads the pool
host pool -> device                 H2DStaged             elsewhere: rows staged per device, then scattered
host row arrays -> device           H2DFromRowArrays      GPU/TPU default: the rows feed the donated scatter
```

`choose_d2h` / `choose_h2d` pick a path from the media and the devices;
`D2H_PATHS` / `H2D_PATHS` name every path a user may ask for.

Every path sees the engine only through a `RowsContext`: where host rows
live and how a row is laid out. H2D paths share one program builder
(`build_h2d`): a jitted, donated `shard_map` per cache array whose body the
path supplies.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar, cast

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

from jaxkv import _native as native
from jaxkv.layout import pages as _pages
from jaxkv.layout.pages import bucket
from jaxkv.transfer.handle import Transfer, completed

_LOOP_MIN_PAGE_BYTES = 16 * 1024
"""Without the native kernels: pages at least this wide are copied one by one in a Python loop, narrower
ones by one vectorized gather (docs/benchmarks.md, "Measurements behind the rules", "Engine and worker")."""

ALIGN_BYTES = 64
"""XLA:CPU places a host array on a device without copying only when its data is aligned to this many bytes
(a 64-byte-aligned numpy array keeps its pointer through jax.device_put, a 16-byte-aligned one is copied)."""

HOST_POOL = "host pool"
"""Medium: one `[slots, row_bytes]` uint8 numpy array (the "numpy" host tier)."""
ROW_ARRAYS = "host row arrays"
"""Medium: per slot, one `[1, bytes_per_page]` pinned_host JAX array per unit (the "arrays" host tier)."""
DEVICE = "device"


@dataclasses.dataclass
class RowsContext:
    """What a path needs of its engine: where host rows live and how a row is laid out."""

    num_device_pages: int
    row_bytes: int
    unit_offsets: list[int]
    """Column where each unit's bytes start in a row."""
    unit_widths: list[int]
    host_memory_kind: str
    on_cpu: bool
    pool: Any = None
    """The numpy pool, `[slots, row_bytes]` uint8 (`HOST_POOL`), or None."""
    rows: Any = None
    """The "arrays" `HostTier` (`ROW_ARRAYS`), or None."""


def _mesh(array: jax.Array) -> Mesh:
    """The mesh of a cache array (always a `NamedSharding`: the buffer checks it at construction)."""
    return cast(Mesh, cast(NamedSharding, array.sharding).mesh)


def _spec(array: jax.Array) -> P:
    return cast(NamedSharding, array.sharding).spec


# -- device to host ------------------------------------------------------------------------------------------------


class D2HPath:
    """Copies pages of a cache into host rows. `reads_shards`: takes shard arrays (a checked layout suffices)."""

    name: ClassVar[str]
    reads_shards: ClassVar[bool] = False
    tracked: ClassVar[bool] = False
    """Its transfer writes host rows after it returns: the engine waits for it before the rows are reused."""

    def __init__(self, ctx: RowsContext):
        self.ctx = ctx

    def copy(self, units, shards, ids: np.ndarray, slots: np.ndarray, nbytes: int) -> Transfer:
        raise NotImplementedError


class D2HFromHostMemory(D2HPath):
    """CPU: a device's memory is host memory, so pages are copied straight from a view of the shard, memcpy each."""

    name = "host"
    reads_shards = True

    def copy(self, units, shards, ids, slots, nbytes) -> Transfer:
        ctx = self.ctx
        # Transient, zero-copy views; each blocks until its shard's producer
        # finished, and all are dropped before returning (a live numpy view
        # would disable donation of the cache).
        views = [np.asarray(shard).reshape(ctx.num_device_pages, -1).view(np.uint8) for shard in shards]
        rows = [
            ctx.pool[:, offset : offset + width]
            for offset, width in zip(ctx.unit_offsets, ctx.unit_widths, strict=True)
        ]
        # Every shard's pages in one batch: the copy policy sees the whole transfer.
        if not native.copy_pages([(r, slots) for r in rows], [(v, ids) for v in views]):
            for row, view in zip(rows, views, strict=True):
                copy_rows(row, slots, view, ids, on_cpu=True)
        del views
        return completed("d2h", ids.size, nbytes)


class D2HGather(D2HPath):
    """One jitted gather per unit, the bitcast to bytes fused in, its output in host memory; rows land in the pool
    when the transfer completes."""

    name = "xla"
    tracked = True

    def __init__(self, ctx: RowsContext):
        super().__init__(ctx)
        self.programs: dict[jax.Device, Callable[..., Any]] = {}  # pyright: ignore[reportInvalidTypeForm]
        """The jitted gather of each device (each compiles once per page-count bucket)."""

    def _fn(self, device: jax.Device):  # pyright: ignore[reportInvalidTypeForm]
        fn = self.programs.get(device)
        if fn is None:
            host = SingleDeviceSharding(device, memory_kind=self.ctx.host_memory_kind)
            gather, _ = _pages.kernels([device])
            fn = self.programs[device] = jax.jit(gather, out_shardings=host)
        return fn

    def copy(self, units, shards, ids, slots, nbytes) -> Transfer:
        kb = bucket(ids.size)
        padded = np.concatenate([ids, np.full(kb - ids.size, ids[0], np.int32)])
        outs = [self._fn(u.device)(u.shard, padded) for u in units]
        pool, offsets = self.ctx.pool, self.ctx.unit_offsets

        def place():
            for out, unit, offset in zip(outs, units, offsets, strict=True):
                pool[slots, offset : offset + unit.bytes_per_page] = np.asarray(out)[: ids.size]

        return Transfer("d2h", ids.size, nbytes, arrays=outs, on_complete=place)


class D2HToRowArrays(D2HPath):
    """Gather pages into fresh pinned_host arrays, one per (page, unit); they become the slots' rows as they are."""

    name = "arrays"

    def __init__(self, ctx: RowsContext):
        super().__init__(ctx)
        self.programs: dict[tuple[jax.Device, int], Callable[..., Any]] = {}  # pyright: ignore[reportInvalidTypeForm]
        """The jitted gather of each (device, page-count bucket)."""

    def copy(self, units, shards, ids, slots, nbytes) -> Transfer:
        kb = bucket(ids.size)
        padded = np.concatenate([ids, np.full(kb - ids.size, ids[0], np.int32)])
        outs = []
        for u in units:
            key = (u.device, kb)
            fn = self.programs.get(key)
            if fn is None:
                fn = self.programs[key] = _build_arrays_gather(u.device, kb, self.ctx.host_memory_kind)
            outs.append(fn(u.shard, padded)[: ids.size])  # the padding's outputs are dropped at once
        for i, slot in enumerate(slots.tolist()):
            self.ctx.rows.set_arrays(slot, tuple(out[i] for out in outs))
        return Transfer("d2h", ids.size, nbytes, arrays=[a for out in outs for a in out])


# -- host to device ------------------------------------------------------------------------------------------------


class H2DPath:
    """Writes host rows into device pages of a cache, in one jitted, donated program (`build_h2d`)."""

    name: ClassVar[str]
    tracked: ClassVar[bool] = True
    """The program reads host rows until it ends: the engine waits for it before the rows are reused."""

    def __init__(self, ctx: RowsContext):
        self.ctx = ctx
        self.program = None
        """The jitted program, built on the first write (one per path: a cache layout never changes)."""

    def write(self, cache, leaves, groups, units, ids, slots, padded_ids, padded_slots):
        """Returns (the new cache arrays, done markers, bytes written)."""
        if self.program is None:
            self.program = build_h2d(leaves, self)
        sources = self.sources(leaves, groups, units, padded_slots)
        nbytes = ids.size * sum(u.bytes_per_page * len(u.devices) for u in units)
        new_arrays, done = self.program([a for _, a in leaves], sources, padded_ids)
        return new_arrays, done, nbytes

    def sources(self, leaves, groups, units, padded_slots) -> list:
        """Per cache array, what its body reads the rows from."""
        raise NotImplementedError

    def body(self, cache, array, scatter):
        """(write(shard, ids, src) -> new shard, in_specs of the shard_map) for one cache array."""
        raise NotImplementedError

    def before(self, cache, array) -> Callable[[Any], Any] | None:
        """A function applied to the array's sources in the program, before the shard_map; None for none."""
        return None


class H2DFromPool(H2DPath):
    """CPU with the native kernels: the pool is placed on every device without a copy; the scatter reads its rows."""

    name = "pool"

    def __init__(self, ctx: RowsContext):
        super().__init__(ctx)
        self._pool_arrays = None

    def body(self, cache, array, scatter):
        rows_spec = P() if cache.replicates_kv_across_tp else P(cache.tp_axis, None)
        off_spec = P() if cache.replicates_kv_across_tp else P(cache.tp_axis)

        group = len(array.sharding.addressable_devices)  # the shards this process writes, one kernel each

        def write(shard, ids, src):
            pool, offsets, slots = src
            return _pages.scatter_page_bytes_from_pool(shard, ids, pool, slots, offsets, group=group)

        return write, (_spec(array), P(), (rows_spec, off_spec, _slots_spec(array)))

    def sources(self, leaves, groups, units, padded_slots) -> list:
        return [
            (*src, _slots_arg(a, padded_slots))
            for src, (_, a) in zip(self._pool_sources(leaves, groups), leaves, strict=True)
        ]

    def _pool_sources(self, leaves, groups) -> list[tuple[jax.Array, jax.Array]]:
        """Per cache array: (the pool on every device, each shard's row offset), zero-copy.

        On CPU an aligned numpy array is placed on a device without a copy, so
        the native scatter reads page bytes straight out of the pool rows.
        Built once; the arrays alias the pool. Global arrays over the TP
        group assembled from this process's devices only (the global shape
        counts every shard of the group).
        """
        if self._pool_arrays is None:
            pool_np = self.ctx.pool
            self._pool_arrays = []
            for (cache, array), group in zip(leaves, groups, strict=True):
                mesh = _mesh(array)
                devices = [d for unit, _ in group for d in unit.devices]
                pools = [jax.device_put(pool_np, d) for d in devices]
                if any(p.unsafe_buffer_pointer() != pool_np.ctypes.data for p in pools):
                    raise RuntimeError("host pool was copied onto a device; the 'pool' h2d path needs zero-copy")
                offsets = [np.array([off], np.int32) for unit, off in group for _ in unit.devices]
                offsets = [jax.device_put(o, d) for o, d in zip(offsets, devices, strict=True)]
                n = 1 if cache.replicates_kv_across_tp else cache.tp_degree
                spec = P() if cache.replicates_kv_across_tp else P(cache.tp_axis, None)
                off_spec = P() if cache.replicates_kv_across_tp else P(cache.tp_axis)
                pool = jax.make_array_from_single_device_arrays(
                    (n * len(pool_np), self.ctx.row_bytes), NamedSharding(mesh, spec), pools
                )
                off = jax.make_array_from_single_device_arrays((n,), NamedSharding(mesh, off_spec), offsets)
                self._pool_arrays.append((pool, off))
        return self._pool_arrays


class H2DStaged(H2DPath):
    """Rows copied out of the pool into one staging array per device, then scattered by the backend's kernel."""

    name = "staged"

    def body(self, cache, array, scatter):
        rows_spec = P() if cache.replicates_kv_across_tp else P(cache.tp_axis, None)
        return scatter, (_spec(array), P(), rows_spec)

    def sources(self, leaves, groups, units, padded_slots) -> list:
        return [self._stage_rows(c, a, g, padded_slots) for (c, a), g in zip(leaves, groups, strict=True)]

    def _stage_rows(self, cache, array: jax.Array, group, slots) -> jax.Array:
        """Rows of `group` ((unit, offset) pairs) for host `slots`, as one global array.

        Sharded: [tp_degree * k, bytes_per_page] split over the TP axis, shard
        i's rows on device i. Replicated: [k, bytes_per_page] on every device,
        staged once. Only this process's pieces are staged: `group` holds its
        units, the global shape counts the whole group.
        """
        pieces = []
        for unit, offset in group:
            staged = aligned((slots.size, unit.bytes_per_page))
            copy_rows(
                staged,
                np.arange(slots.size, dtype=np.int32),
                self.ctx.pool[:, offset : offset + unit.bytes_per_page],
                slots,
                on_cpu=self.ctx.on_cpu,
            )
            pieces.extend(jax.device_put(staged, d) for d in unit.devices)
        width = group[0][0].bytes_per_page
        if cache.replicates_kv_across_tp:
            sharding = NamedSharding(_mesh(array), P())
            return jax.make_array_from_single_device_arrays((slots.size, width), sharding, pieces)
        sharding = NamedSharding(_mesh(array), P(cache.tp_axis, None))
        return jax.make_array_from_single_device_arrays((slots.size * cache.tp_degree, width), sharding, pieces)


class H2DFromRowArrays(H2DPath):
    """Feed the slots' pinned_host row arrays to the jitted, donated scatter (no numpy copy of page bytes).

    Sharded array: per page, its units' `[1, w]` arrays are the shards of
    one `[tp, w]` pinned_host global array (no copy). Replicated: the root
    unit's array is broadcast to every device first (the bytes must reach
    each of them anyway). Row arrays are never written, and the program holds
    its inputs until it ends: nothing to wait for before rows are reused.
    """

    name = "arrays"
    tracked = False

    def body(self, cache, array, scatter):
        rows_spec = P() if cache.replicates_kv_across_tp else P(cache.tp_axis, None)

        def write(shard, ids, src):
            return scatter(shard, ids, jax.numpy.concatenate(src, axis=0))

        return write, (_spec(array), P(), rows_spec)

    def before(self, cache, array) -> Callable[[Any], Any] | None:
        # Rows arrive in pinned_host memory: move them to the device inside the program.
        rows_spec = P() if cache.replicates_kv_across_tp else P(cache.tp_axis, None)
        on_device = NamedSharding(_mesh(array), rows_spec, memory_kind="device")
        return lambda src: [jax.device_put(r, on_device) for r in src]

    def sources(self, leaves, groups, units, padded_slots) -> list:
        rows = [self.ctx.rows.arrays(int(s)) for s in padded_slots]
        index = {id(u): i for i, u in enumerate(units)}
        sources = []
        for (c, a), group in zip(leaves, groups, strict=True):
            mesh = _mesh(a)
            width = group[0][0].bytes_per_page
            if c.replicates_kv_across_tp:
                i = index[id(group[0][0])]
                sharding = NamedSharding(mesh, P(), memory_kind="device")
                sources.append(jax.device_put([r[i] for r in rows], [sharding] * len(rows)))
                continue
            sharding = NamedSharding(mesh, P(c.tp_axis, None), memory_kind=self.ctx.host_memory_kind)
            cols = [index[id(u)] for u, _ in group]
            sources.append(
                [
                    jax.make_array_from_single_device_arrays((len(cols), width), sharding, [r[i] for i in cols])
                    for r in rows
                ]
            )
        return sources


# -- the registry --------------------------------------------------------------------------------------------------

D2H_BY_MEDIA: dict[tuple[str, str], tuple[type[D2HPath], ...]] = {
    (DEVICE, HOST_POOL): (D2HFromHostMemory, D2HGather),
    (DEVICE, ROW_ARRAYS): (D2HToRowArrays,),
}
"""Device-to-host paths per (source, destination) medium, the preferred one first where it applies."""
H2D_BY_MEDIA: dict[tuple[str, str], tuple[type[H2DPath], ...]] = {
    (HOST_POOL, DEVICE): (H2DFromPool, H2DStaged),
    (ROW_ARRAYS, DEVICE): (H2DFromRowArrays,),
}
"""Host-to-device paths per (source, destination) medium, the preferred one first where it applies."""

D2H_PATHS = ("auto", "xla", "host")
"""What a user may ask of `OffloadEngine(d2h_path=)` for a numpy pool ("auto": host on CPU, xla elsewhere)."""


def choose_d2h(medium: str, requested: str, *, on_cpu: bool) -> type[D2HPath]:
    """The D2H path from the device into `medium`: the one `requested`, else the preferred one that applies."""
    if medium == ROW_ARRAYS:
        return D2HToRowArrays
    if requested == "auto":
        return D2HFromHostMemory if on_cpu else D2HGather
    return {p.name: p for p in D2H_BY_MEDIA[(DEVICE, HOST_POOL)]}[requested]


def choose_h2d(medium: str, *, native_kernels: bool) -> type[H2DPath]:
    """The H2D path from `medium` to the device: the native pool scatter where the kernels run, else staged."""
    if medium == ROW_ARRAYS:
        return H2DFromRowArrays
    return H2DFromPool if native_kernels else H2DStaged


# -- shared pieces -------------------------------------------------------------------------------------------------


def aligned_rows(num_rows: int, row_bytes: int) -> np.ndarray:
    """A zeroed `[num_rows, row_bytes]` uint8 pool that XLA:CPU can place on a device without a copy.

    Untouched pages are mapped lazily: a pool costs memory as it fills.
    """
    return aligned((num_rows, row_bytes), np.zeros)


def aligned(shape, alloc=np.empty) -> np.ndarray:
    """A uint8 array of `shape` whose data starts on an `ALIGN_BYTES`-byte boundary.

    With `alloc=np.zeros` untouched pages are mapped lazily: a pool costs
    memory as it fills.
    """
    n = int(np.prod(shape))
    raw = alloc(n + ALIGN_BYTES, np.uint8)
    start = (-raw.ctypes.data) % ALIGN_BYTES
    return raw[start : start + n].reshape(shape)


def copy_rows(dst: np.ndarray, dst_rows: np.ndarray, src: np.ndarray, src_rows: np.ndarray, *, on_cpu: bool) -> None:
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


def _slots_spec(array: jax.Array) -> P:
    """How host slots enter the h2d program for `array`.

    Host slots are per-process state (each process has its own pool), so when
    the cache spans processes each device gets its process's slots as its own
    block; JAX would take a replicated argument to be the same everywhere. In
    one process a replicated numpy argument is cheaper (docs/benchmarks.md,
    "Measurements behind the rules", "Engine and worker").
    """
    return P() if array.is_fully_addressable else P(tuple(_mesh(array).axis_names))


def _slots_arg(array: jax.Array, slots: np.ndarray):
    """`slots` laid out as `_slots_spec(array)` says."""
    spec = _slots_spec(array)
    if spec == P():
        return slots
    mesh = _mesh(array)
    # The callback runs for this process's devices only and returns their block.
    return jax.make_array_from_callback((mesh.size * slots.size,), NamedSharding(mesh, spec), lambda _: slots)


def _build_arrays_gather(device: jax.Device, kb: int, memory_kind: str):  # pyright: ignore[reportInvalidTypeForm]
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


def _with_done(shard: jax.Array, native_kernels: bool) -> tuple[jax.Array, jax.Array]:
    """`shard` and a marker that exists only after the write that produced `shard` (`_pages.done_marker`)."""
    return shard, _pages.done_marker(shard, native_kernels=native_kernels)


def build_h2d(leaves, path: H2DPath):
    """One jitted, donated computation that writes page bytes into every cache array, with `path`'s bodies.

    Page ids are replicated: the group writes the same pages everywhere.
    Returns (new arrays, done): `done` holds, per array, one element of every
    shard it wrote, computed from the written shard. It is ready on a device
    only once that device's writes (and so its reads of the host rows) ended,
    and nobody donates it, unlike the new cache.
    """
    devices = [d for _, a in leaves for d in a.sharding.device_set]
    _, scatter = _pages.kernels(devices)
    native_kernels = _pages.native_enabled(devices)
    bodies = []
    for cache, array in leaves:
        write, in_specs = path.body(cache, array, scatter)
        off_spec = P() if cache.replicates_kv_across_tp else P(cache.tp_axis)
        body = jax.shard_map(
            lambda shard, ids, src, write=write: _with_done(write(shard, ids, src), native_kernels),
            mesh=_mesh(array),
            in_specs=in_specs,
            out_specs=(_spec(array), off_spec),
            check_vma=False,
        )
        before = path.before(cache, array)
        if before is not None:
            body = lambda a, ids, src, body=body, before=before: body(a, ids, before(src))  # noqa: E731
        bodies.append(body)

    def write_all(arrays, sources, ids):
        outs = [body(a, ids, src) for body, a, src in zip(bodies, arrays, sources, strict=True)]
        return [new for new, _ in outs], [done for _, done in outs]

    return jax.jit(write_all, donate_argnums=0)
