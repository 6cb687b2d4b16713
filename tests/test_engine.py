import gc
import weakref

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cachegen import TP_DEGREES, as_bytes, random_buffer, tp_mesh
from test_memory import DTYPES, make_params

from jaxkv import (
    KVCacheParams,
    MultiKVCacheBuffer,
    OffloadEngine,
    RowLayout,
    Transfer,
    allocate_buffer,
    layout_fingerprint,
)
from jaxkv.transfer.engine import aligned_rows, bucket

PATHS = ("host", "xla")
DONATED = r"cache has been donated \(its arrays are deleted\); pass the cache the last call returned"


def page_bytes(array: jax.Array, page: int) -> np.ndarray:
    return np.asarray(array)[page].reshape(-1).view(np.uint8)


def host_row(cache, page: int) -> np.ndarray:
    """What a host row of `page` must hold: the page of every unit, side by side."""
    return np.concatenate([np.asarray(u.read_pages([page]))[0] for u in cache.to_memory()])


def cache_arrays(cache) -> list[jax.Array]:
    return [a for a in jax.tree.leaves(cache)]


def assert_cache_holds(cache, arrays: list[np.ndarray]) -> None:
    """Every array of `cache` holds exactly `arrays` (numpy, same order), compared as bytes."""
    got = cache_arrays(cache)
    assert len(got) == len(arrays)
    for a, want in zip(got, arrays, strict=True):
        chex.assert_trees_all_equal(np.asarray(a).view(np.uint8), np.asarray(want).view(np.uint8))


# -- round trips ----------------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("mla", [False, True], ids=["mha", "mla"])
@pytest.mark.parametrize("tp", TP_DEGREES)
@pytest.mark.parametrize(("dtype", "scale_dtype"), DTYPES)
def test_round_trip_is_bit_exact(dtype, scale_dtype, tp, mla, path):
    check_round_trip(dtype, scale_dtype, tp, mla, path)


@pytest.mark.parametrize("mla", [False, True], ids=["mha", "mla"])
@pytest.mark.parametrize("tp", [1, 4])
@pytest.mark.parametrize(("dtype", "scale_dtype"), DTYPES)
def test_round_trip_is_bit_exact_with_xla_kernels(dtype, scale_dtype, tp, mla, monkeypatch):
    """The pure-XLA kernels (GPU/TPU) keep every bit too, NaN payloads included."""
    from jaxkv import _native as native

    monkeypatch.setattr(native, "available", lambda: False)
    engine = check_round_trip(dtype, scale_dtype, tp, mla, "xla")
    assert engine.h2d_path == "staged"


def check_round_trip(dtype, scale_dtype, tp, mla, path) -> OffloadEngine:
    params = make_params(dtype, scale_dtype, mla)
    src, values, scales = random_buffer(params, tp, num_pages=8, seed=tp)
    engine = OffloadEngine(src, num_host_pages=6, d2h_path=path)
    ids, slots = [5, 0, 7], [4, 1, 2]
    engine.d2h(src, ids, slots).synchronize()
    # The host row holds one page of every unit, a replicated unit once.
    assert engine.row_bytes == params.host_bytes_per_page(tp)
    chex.assert_trees_all_equal(engine.read_host([4])[0], host_row(src, 5))
    assert_cache_holds(src, [a for a in (values, scales) if a is not None])  # d2h reads, never writes

    # The same engine loads into another cache of the same layout: it keeps none of them.
    dst = allocate_buffer(params, tp_mesh(tp), num_pages=8)
    out, transfer = engine.h2d(dst, slots, [1, 6, 3])
    transfer.synchronize()
    assert transfer.is_complete()
    for array, original in ((out.values, values), (out.scales, scales)):
        if original is None:
            continue
        want = np.zeros_like(original).view(np.uint8)
        want[[1, 6, 3]] = original.view(np.uint8)[ids]
        chex.assert_trees_all_equal(np.asarray(array).view(np.uint8), want)
        # Every shard holds exactly its part; an MLA page lands identical on every shard.
        for shard in array.addressable_shards:
            chex.assert_trees_all_equal(as_bytes(shard.data), as_bytes(want[shard.index]))
    return engine


def test_multi_buffer_round_trip(kernels):
    target, tv, ts = random_buffer(make_params("float8_e4m3fn", "float32", mla=False), 2, 6)
    draft, dv, _ = random_buffer(make_params("bfloat16", None, mla=True), 2, 6, seed=3)
    multi = MultiKVCacheBuffer({"target": target, "draft": draft})
    engine = OffloadEngine(multi, 4)
    engine.d2h(multi, [2, 4], [0, 1]).synchronize()
    chex.assert_trees_all_equal(engine.read_host([1])[0], host_row(multi, 4))
    fresh = MultiKVCacheBuffer(
        {
            "target": allocate_buffer(make_params("float8_e4m3fn", "float32", mla=False), tp_mesh(2), 6),
            "draft": allocate_buffer(make_params("bfloat16", None, mla=True), tp_mesh(2), 6),
        }
    )
    out, t = engine.h2d(fresh, [1, 0], [5, 0])
    t.synchronize()
    assert isinstance(out, MultiKVCacheBuffer) and set(out.children) == {"target", "draft"}
    chex.assert_trees_all_equal(page_bytes(out.children["target"].values, 5), as_bytes(tv[4]))
    chex.assert_trees_all_equal(page_bytes(out.children["target"].scales, 0), as_bytes(ts[2]))
    chex.assert_trees_all_equal(page_bytes(out.children["draft"].values, 0), as_bytes(dv[2]))
    chex.assert_trees_all_equal(page_bytes(out.children["draft"].values, 5), as_bytes(dv[4]))
    chex.assert_trees_all_equal(page_bytes(out.children["draft"].values, 1), np.zeros_like(as_bytes(dv[1])))


def test_engine_from_units_and_unpinned_host():
    params = make_params("int8", "float16", mla=True)
    cache, values, _ = random_buffer(params, 4, 5)
    engine = OffloadEngine(cache.to_memory(), 3, host_memory_kind="unpinned_host", d2h_path="xla")
    assert engine.layout_fingerprint == layout_fingerprint(cache)
    engine.d2h(cache.to_memory(), [4], [2]).synchronize()  # units are accepted as the cache too
    out, t = engine.h2d(allocate_buffer(params, tp_mesh(4), 5), [2], [0])
    t.synchronize()
    for shard in out.values.addressable_shards:
        chex.assert_trees_all_equal(as_bytes(np.asarray(shard.data)[0]), as_bytes(values[4]))


def test_layout_and_fingerprint():
    params = make_params("float8_e4m3fn", "float32", mla=False)
    cache, _, _ = random_buffer(params, 4, 8)
    engine = OffloadEngine(cache, 2)
    assert isinstance(engine.layout, RowLayout)
    assert engine.layout == RowLayout.of(cache)
    assert engine.row_bytes == engine.layout.row_bytes == params.host_bytes_per_page(4)
    assert engine.unit_offsets == list(engine.layout.unit_offsets)
    assert engine.layout_fingerprint == layout_fingerprint(cache) == layout_fingerprint(params, tp=4)
    assert engine.layout_fingerprint != layout_fingerprint(params, tp=2)
    chex.assert_shape(engine.host_pool, (2, engine.row_bytes))
    chex.assert_type(engine.host_pool, np.uint8)


# -- the cache is a value: taken by every call, returned by every donation -------


@pytest.mark.parametrize("path", PATHS)
def test_h2d_donates_and_updates_in_place(path, kernels):
    params = make_params("bfloat16", None, mla=False)
    src, _, _ = random_buffer(params, 4, 8)
    engine = OffloadEngine(src, 4, d2h_path=path)
    assert engine.h2d_path == ("pool" if kernels == "native" else "staged")
    engine.d2h(src, [1, 2], [0, 3]).synchronize()
    dst = allocate_buffer(params, tp_mesh(4), 8)
    pointers = [s.data.unsafe_buffer_pointer() for s in dst.values.addressable_shards]
    out, t = engine.h2d(dst, [0, 3], [6, 7])
    t.synchronize()
    assert dst.values.is_deleted()
    assert [s.data.unsafe_buffer_pointer() for s in out.values.addressable_shards] == pointers
    chex.assert_trees_all_equal(page_bytes(out.values, 7), page_bytes(src.values, 2))
    with pytest.raises(ValueError, match=DONATED):
        engine.h2d(dst, [0], [0])


@pytest.mark.parametrize("path", PATHS)
def test_h2d_and_d2h_right_after_the_users_donated_step(path, kernels):
    """The issue's rule: a caller's own jitted, donating step composes with the engine, no bind needed.

    step -> h2d -> step -> d2h, each taking the cache the previous call
    returned; every page ends up with exactly the bytes expected.
    """
    params = make_params("float8_e4m3fn", "float32", mla=False)
    cache, values, scales = random_buffer(params, 2, 8, seed=7)
    engine = OffloadEngine(cache, 4, d2h_path=path)
    rng = np.random.default_rng(11)
    rows = rng.integers(0, 256, (4, engine.row_bytes), dtype=np.uint8)
    engine.write_host([0, 1, 2, 3], rows)

    @jax.jit
    def add_page(c, page, fill):
        # What an attention step does: write new K/V into a page, return the new cache.
        def write(x):
            return x.at[page].set(jnp.broadcast_to(fill, x.shape[1:]).astype(x.dtype))

        return jax.tree.map(write, c)

    step = jax.jit(add_page, donate_argnums=0)
    want = [values.copy(), scales.copy()]

    def expect_fill(page, fill):
        for w in want:
            w[page] = np.broadcast_to(np.asarray(fill, np.float32), w.shape[1:]).astype(w.dtype)

    def expect_row(page, row):
        # A host row is [values shard 0 | values shard 1 | scales shard 0 | scales shard 1].
        units = cache.to_memory()
        offsets = engine.unit_offsets
        for k, w in enumerate(want):
            h = w.shape[4] // 2
            for s in range(2):
                u = units[2 * k + s]
                part = row[offsets[2 * k + s] : offsets[2 * k + s] + u.bytes_per_page]
                w[page, :, :, :, s * h : (s + 1) * h] = part.view(w.dtype).reshape(u.page_shape)

    old = cache
    cache = step(cache, 3, jnp.float32(2.0))
    expect_fill(3, 2.0)
    assert old.values.is_deleted()
    cache, t = engine.h2d(cache, [2, 0], [3, 5])  # straight after the step, on the cache it returned
    expect_row(3, rows[2])
    expect_row(5, rows[0])
    cache = step(cache, 6, jnp.float32(-3.0))  # donated again before the load is waited on
    expect_fill(6, -3.0)
    t.synchronize()
    engine.d2h(cache, [3, 5, 6, 0], [0, 1, 2, 3]).synchronize()
    assert_cache_holds(cache, want)
    for slot, page in enumerate([3, 5, 6, 0]):
        chex.assert_trees_all_equal(engine.read_host([slot])[0], host_row(cache, page))
    chex.assert_trees_all_equal(engine.read_host([0, 1]), rows[[2, 0]])


@pytest.mark.parametrize("path", PATHS)
def test_d2h_is_ordered_after_the_write_that_produced_the_pages(path):
    """A donated write followed at once by an offload sees the written bytes.

    The offload consumes the arrays the write returned, so JAX runs it after
    the write (data dependency), and the host path's numpy view waits for the
    buffer to be ready.
    """
    params = make_params("bfloat16", None, mla=False)
    cache, _, _ = random_buffer(params, 2, 64)
    engine = OffloadEngine(cache, 64, d2h_path=path)

    def overwrite(c, value):
        # Half the pages get `value * 3`: enough work that the offload could overtake it.
        def write(x):
            half = x.shape[0] // 2
            return x.at[:half].set(jnp.broadcast_to(value * 3, (half, *x.shape[1:])).astype(x.dtype))

        return jax.tree.map(write, c)

    overwrite = jax.jit(overwrite, donate_argnums=0)
    for value in (1.0, 2.0, 7.0):
        cache = overwrite(cache, jnp.float32(value))
        engine.d2h(cache, np.arange(32), np.arange(32)).synchronize()
        rows = engine.read_host(np.arange(32))
        expected = as_bytes(jnp.full(cache.values.shape[1:], value * 3, jnp.bfloat16)[..., :4, :])
        for r in rows:
            chex.assert_trees_all_equal(r, np.concatenate([expected, expected]))


def test_host_rows_are_not_changed_under_a_load_whose_cache_was_donated_on(kernels):
    """A load still reading the pool must finish before its rows change, even once its cache is donated.

    The caller donates the cache `h2d` returned to its next step at once; the
    engine must still know when the load ends (it used to wait on the
    returned arrays, which the donation deletes, and skipped the wait).
    """
    # 1 MiB rows, 64 of them: a load long enough for the caller to get ahead of it.
    params = KVCacheParams(jnp.bfloat16, n_kv_heads=8, head_dim=128, num_layers=16, page_size=16)
    n = 64
    cache = allocate_buffer(params, tp_mesh(2), n + 1)
    engine = OffloadEngine(cache, n)
    rng = np.random.default_rng(3)
    rows = rng.integers(0, 256, (n, engine.row_bytes), dtype=np.uint8)
    zeros = np.zeros_like(rows)

    def touch_last_page(x):
        # The caller's next step writes only its own page (the last), past the loaded ones. As
        # words: XLA:CPU runs a bfloat16 update through float32, which rewrites NaN payloads.
        words = jax.lax.bitcast_convert_type(x, jnp.uint16)
        return jax.lax.bitcast_convert_type(words.at[n].set(1), x.dtype)

    step = jax.jit(lambda c: jax.tree.map(touch_last_page, c), donate_argnums=0)
    for _ in range(3):
        engine.write_host(np.arange(n), rows)
        cache, t = engine.h2d(cache, np.arange(n), np.arange(n))
        cache = step(cache)
        engine.write_host(np.arange(n)[::-1], zeros)  # must wait for the load reading these rows
        loaded = np.concatenate([np.asarray(u.read_pages(np.arange(n))) for u in cache.to_memory()], axis=1)
        chex.assert_trees_all_equal(loaded, rows)
        t.synchronize()
        assert t.is_complete()


@pytest.mark.parametrize("path", PATHS)
def test_engine_keeps_no_cache(path):
    """Nothing the engine holds keeps a cache alive: not the one it read, not the one it returned."""
    params = make_params("int8", "float16", mla=False)
    cache, _, _ = random_buffer(params, 2, 8)
    engine = OffloadEngine(cache, 4, d2h_path=path)
    for name in ("bind", "buffer", "units"):
        assert not hasattr(engine, name)

    read = [weakref.ref(a) for a in cache_arrays(cache)]
    engine.d2h(cache, [1, 2], [0, 1])  # not waited on: an offload in flight
    cache, t = engine.h2d(cache, [0, 1], [5, 6])  # nor is this load
    returned = [weakref.ref(a) for a in cache_arrays(cache)]
    assert not any(isinstance(v, jax.Array) for v in vars(engine).values())
    del cache
    gc.collect()
    assert [r() for r in read] == [None, None]
    assert [r() for r in returned] == [None, None]
    t.synchronize()
    assert t.is_complete()


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    "call",
    [
        lambda e, c, units: e.d2h(c, [0, 1], [2, 3]),
        lambda e, c, units: e.d2h(units, [0, 1], [2, 3]),  # units taken before the donation
        lambda e, c, units: e.h2d(c, [0, 1], [2, 3]),
    ],
    ids=["d2h", "d2h_units", "h2d"],
)
@pytest.mark.parametrize("donor", ["user", "engine"])
def test_a_donated_cache_is_refused_and_moves_nothing(call, donor, path):
    params = make_params("float8_e5m2", "float8_e8m0fnu", mla=False)
    cache, _, _ = random_buffer(params, 2, 8)
    engine = OffloadEngine(cache, 4, d2h_path=path)
    engine.write_host([0, 1, 2, 3], np.random.default_rng(0).integers(0, 256, (4, engine.row_bytes), np.uint8))
    stale, stale_units = cache, cache.to_memory()
    if donor == "user":
        cache = jax.jit(lambda c: c, donate_argnums=0)(cache)
    else:
        cache, t = engine.h2d(cache, [3], [7])
        t.synchronize()
    assert stale.values.is_deleted()
    live = [np.asarray(a).copy() for a in cache_arrays(cache)]
    pool = engine.host_pool.copy()
    with pytest.raises(ValueError, match=DONATED):
        call(engine, stale, stale_units)
    chex.assert_trees_all_equal(engine.host_pool, pool)
    assert_cache_holds(cache, live)
    # The cache the last call returned works.
    engine.d2h(cache, [7], [0]).synchronize()
    chex.assert_trees_all_equal(engine.read_host([0])[0], host_row(cache, 7))


# -- buckets and handles ------------------------------------------------------


def test_bucketed_batches_compile_at_most_1_plus_log2_n_times(kernels, monkeypatch):
    """Batches of 1..n pages reach the page kernels in 1 + log2(n) shapes, so each of the
    engine's programs (a gather per device, one h2d) traces its kernel that often at most."""
    from jaxkv.layout import pages as _pages

    params = make_params("bfloat16", None, mla=False)
    cache, _, _ = random_buffer(params, 2, 32)
    n = 16
    limit = 1 + int(np.log2(n))
    devices = len(cache.values.sharding.device_set)
    # The kernels the engine's programs trace, each wrapped in chex.assert_max_traces. The
    # per-device gathers share one counter (jax 0.10 traces the gather once for both; the bound
    # lets each trace it on its own). The h2d traces the scatter (staged rows) or the pool
    # scatter (native): one cache array here, so once per program.
    chex.clear_trace_counter()
    real_kernels, wrapped = _pages.kernels, {}

    def kernels_traced_at_most(devices_):
        gather, scatter = real_kernels(devices_)
        if gather not in wrapped:
            wrapped[gather] = chex.assert_max_traces(gather, n=limit * devices)
            wrapped[scatter] = chex.assert_max_traces(scatter, n=limit)
        return wrapped[gather], wrapped[scatter]

    monkeypatch.setattr(_pages, "kernels", kernels_traced_at_most)
    from_pool = chex.assert_max_traces(_pages.scatter_page_bytes_from_pool, n=limit)
    monkeypatch.setattr(_pages, "scatter_page_bytes_from_pool", from_pool)
    engine = OffloadEngine(cache, 32, d2h_path="xla")
    for k in range(1, n + 1):
        engine.d2h(cache, np.arange(k), np.arange(k)).synchronize()
        cache, t = engine.h2d(cache, np.arange(k), np.arange(k)[::-1] + 3)
        t.synchronize()
    assert len(engine.d2h_transfer.programs) == devices == 2
    assert [bucket(k) for k in (1, 2, 3, 5, 16, 17)] == [1, 2, 4, 8, 16, 32]


def test_transfer_handles():
    params = make_params("bfloat16", None, mla=True)
    cache, _, _ = random_buffer(params, 2, 8)
    engine = OffloadEngine(cache, 8, d2h_path="xla")
    t = engine.d2h(cache, [1, 2, 3], [0, 1, 2])
    assert isinstance(t, Transfer) and t.direction == "d2h" and t.num_pages == 3
    assert t.nbytes == 3 * engine.row_bytes
    assert isinstance(t.is_complete(), bool)
    # Reading the pool completes pending offloads first.
    rows = engine.read_host([0, 1, 2])
    assert t.is_complete()
    chex.assert_trees_all_equal(rows[1], host_row(cache, 2))
    empty = engine.d2h(cache, [], [])
    assert empty.is_complete() and empty.num_pages == 0

    cache, t = engine.h2d(cache, [0, 1], [6, 7])
    # An MLA row is written to both TP replicas: counted once per device written.
    assert isinstance(t, Transfer) and t.direction == "h2d" and t.num_pages == 2
    assert t.nbytes == 2 * engine.row_bytes * 2
    assert t.synchronize() is t and t.is_complete()
    chex.assert_trees_all_equal(host_row(cache, 6), host_row(cache, 1))
    chex.assert_trees_all_equal(host_row(cache, 7), host_row(cache, 2))
    same, empty = engine.h2d(cache, [], [])
    assert same is cache and empty.is_complete() and empty.num_pages == 0


def test_load_sees_host_rows_written_after_earlier_loads():
    """The pool is shared with in-flight loads (zero-copy on CPU): later writes must not leak into them."""
    params = make_params("bfloat16", None, mla=True)
    cache, _, _ = random_buffer(params, 2, 4)
    engine = OffloadEngine(cache, 2)
    rng = np.random.default_rng(5)
    for _ in range(3):
        rows = rng.integers(0, 256, (2, engine.row_bytes), dtype=np.uint8)
        engine.write_host([0, 1], rows)
        cache, t = engine.h2d(cache, [1, 0], [2, 3])
        engine.write_host([0, 1], np.zeros_like(rows))  # waits for the load first
        t.synchronize()
        for shard in cache.values.addressable_shards:
            chex.assert_trees_all_equal(as_bytes(np.asarray(shard.data)[2]), rows[1])
            chex.assert_trees_all_equal(as_bytes(np.asarray(shard.data)[3]), rows[0])


def test_a_given_host_pool_is_used_in_place():
    params = make_params("bfloat16", None, mla=False)
    cache, _, _ = random_buffer(params, 2, 8)
    pool = aligned_rows(3, params.host_bytes_per_page(2))
    engine = OffloadEngine(cache, host_pool=pool)
    assert engine.host_pool is pool and engine.num_host_pages == 3
    engine.d2h(cache, [6], [1]).synchronize()
    chex.assert_trees_all_equal(pool[1], host_row(cache, 6))
    pool[2] = 9
    cache, t = engine.h2d(cache, [2], [0])
    t.synchronize()
    chex.assert_trees_all_equal(host_row(cache, 0), np.full(engine.row_bytes, 9, np.uint8))


# -- bad input: ValueError before any byte moves ------------------------------


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda e, c: e.d2h(c, [0, 8], [0, 1]), r"device_page_ids contains 8, outside the valid range \[0, 8\)"),
        (lambda e, c: e.d2h(c, [0, 1], [0, 4]), r"host_slots contains 4, outside the valid range \[0, 4\)"),
        (lambda e, c: e.d2h(c, [1, 1], [0, 2]), "device_page_ids repeats 1: ids in one batch must be unique"),
        (lambda e, c: e.d2h(c, [1, 2], [3, 3]), "host_slots repeats 3"),
        (lambda e, c: e.d2h(c, [1, 2, 3], [0, 1]), "device_page_ids has 3 entries but host_slots has 2"),
        (
            lambda e, c: e.d2h(c.values, [0], [0]),
            "cache must be a KVCacheBuffer, MultiKVCacheBuffer or a list of its KVCacheMemory units, got ArrayImpl",
        ),
        (
            lambda e, c: e.d2h(allocate_buffer(make_params("bfloat16", None, False), tp_mesh(4), 8), [0], [0]),
            "cache layout differs from the engine's at unit 0",
        ),
        (
            lambda e, c: e.d2h(c.to_memory()[:1], [0], [0]),
            "cache has 1 units, the engine was built for 2",
        ),
        (lambda e, c: e.h2d(c, [0, 1], [2, 9]), r"device_page_ids contains 9, outside the valid range \[0, 8\)"),
        (lambda e, c: e.h2d(c, [0, 0], [2, 3]), "host_slots repeats 0"),
        (lambda e, c: e.h2d(c, [0], [2, 3]), "device_page_ids has 2 entries but host_slots has 1"),
        (lambda e, c: e.h2d(c, [-1], [2]), r"host_slots contains -1"),
        (lambda e, c: e.h2d(c.values, [0], [2]), "cache must be a KVCacheBuffer or MultiKVCacheBuffer, got ArrayImpl"),
        (
            lambda e, c: e.h2d(allocate_buffer(make_params("bfloat16", None, False), tp_mesh(4), 8), [0], [0]),
            "cache layout differs from the engine's at unit 0",
        ),
        (
            lambda e, c: e.h2d(allocate_buffer(make_params("float16", None, False), tp_mesh(2), 8), [0], [0]),
            r"cache layout differs from the engine's at unit 0 \(values\): dtype 'float16'",
        ),
        (lambda e, c: e.write_host([0], np.zeros((1, 3), np.uint8)), r"rows must be uint8 of shape \(1, 4096\)"),
        (lambda e, c: e.read_host([4]), r"host_slots contains 4, outside the valid range \[0, 4\)"),
    ],
)
def test_bad_input_moves_nothing(call, message):
    params = make_params("bfloat16", None, mla=False)
    cache, values, _ = random_buffer(params, 2, 8)
    engine = OffloadEngine(cache, 4)
    engine.d2h(cache, [3, 4, 5, 6], [0, 1, 2, 3]).synchronize()
    pool = engine.host_pool.copy()
    with pytest.raises(ValueError, match=message):
        call(engine, cache)
    assert not cache.values.is_deleted()
    chex.assert_trees_all_equal(np.asarray(cache.values).view(np.uint8), values.view(np.uint8))
    chex.assert_trees_all_equal(engine.host_pool, pool)


def test_engine_construction_errors():
    params = make_params("bfloat16", None, mla=False)
    a, _, _ = random_buffer(params, 2, 8)
    b, _, _ = random_buffer(params, 2, 6)
    with pytest.raises(ValueError, match=r"units must all have the same total_num_pages, got \[8, 8, 6, 6\]"):
        OffloadEngine(a.to_memory() + b.to_memory(), 4)
    with pytest.raises(ValueError, match="num_host_pages must be a positive int, got 0"):
        OffloadEngine(a, 0)
    with pytest.raises(ValueError, match="num_host_pages must be a positive int, got None"):
        OffloadEngine(a)
    with pytest.raises(ValueError, match="d2h_path must be one of"):
        OffloadEngine(a, 4, d2h_path="dma")
    with pytest.raises(ValueError, match="host_memory_kind 'hbm' is not a memory of these devices"):
        OffloadEngine(a, 4, host_memory_kind="hbm")
    with pytest.raises(ValueError, match="source must be a KVCacheBuffer"):
        OffloadEngine([], 4)


ROW = make_params("bfloat16", None, mla=False).host_bytes_per_page(2)  # 4096


def _misaligned(rows: int, width: int) -> np.ndarray:
    raw = aligned_rows(1, rows * width + 64).reshape(-1)
    return raw[8 : 8 + rows * width].reshape(rows, width)


@pytest.mark.parametrize(
    ("make_pool", "message"),
    [
        (lambda: aligned_rows(4, ROW).view(np.int8), r"host_pool must have dtype uint8, got int8; build it with"),
        (
            lambda: aligned_rows(4, ROW * 4).view(np.float32),
            r"host_pool must have dtype uint8, got float32",
        ),
        (
            lambda: aligned_rows(4, ROW - 1),
            r"host_pool must have shape \(num_host_pages, row_bytes\) = \(4, 4096\), got \(4, 4095\)",
        ),
        (lambda: aligned_rows(4 * ROW, 1).reshape(-1), r"host_pool must be a 2-D numpy array .* got shape \(16384,\)"),
        (lambda: [[0] * ROW] * 4, "host_pool must be a 2-D numpy array .* got list"),
        (lambda: aligned_rows(4, 2 * ROW)[:, ::2], r"host_pool must be C-contiguous, got strides \(8192, 2\)"),
        (
            lambda: _misaligned(4, ROW),
            r"host_pool data must start on a 64-byte boundary .* got address % 64 = 8; "
            r"build it with aligned_rows\(4, 4096\)",
        ),
    ],
    ids=["int8", "float32", "width", "1d", "list", "strided", "misaligned"],
)
def test_bad_host_pool_names_the_field(make_pool, message):
    params = make_params("bfloat16", None, mla=False)
    cache, values, _ = random_buffer(params, 2, 8)
    pool = make_pool()
    before = np.array(pool, copy=True)
    with pytest.raises(ValueError, match=message):
        OffloadEngine(cache, host_pool=pool)
    chex.assert_trees_all_equal(np.asarray(pool), before)
    chex.assert_trees_all_equal(np.asarray(cache.values).view(np.uint8), values.view(np.uint8))


def test_host_pool_and_num_host_pages_must_agree():
    params = make_params("bfloat16", None, mla=False)
    cache, _, _ = random_buffer(params, 2, 8)
    with pytest.raises(ValueError, match="num_host_pages \\(3\\) disagrees with host_pool's 4 rows"):
        OffloadEngine(cache, 3, host_pool=aligned_rows(4, ROW))
    assert OffloadEngine(cache, 4, host_pool=aligned_rows(4, ROW)).num_host_pages == 4
