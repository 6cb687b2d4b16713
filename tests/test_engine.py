import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cachegen import TP_DEGREES, as_bytes, random_buffer, tp_mesh
from test_memory import DTYPES, make_params

from jaxkv import MultiKVCacheBuffer, OffloadEngine, Transfer, allocate_buffer
from jaxkv.transfer.engine import bucket

PATHS = ("host", "xla")


def cache_bytes(buffer) -> list[np.ndarray]:
    """Every shard of every array of a cache, as bytes."""
    return [as_bytes(s.data) for a in jax.tree.leaves(buffer) for s in a.addressable_shards]


def page_bytes(array: jax.Array, page: int) -> np.ndarray:
    return np.asarray(array)[page].reshape(-1).view(np.uint8)


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
    from jaxkv.transfer import native

    monkeypatch.setattr(native, "available", lambda: False)
    engine = check_round_trip(dtype, scale_dtype, tp, mla, "xla")
    assert engine.h2d_path == "staged"


def check_round_trip(dtype, scale_dtype, tp, mla, path) -> OffloadEngine:
    params = make_params(dtype, scale_dtype, mla)
    src, values, scales = random_buffer(params, tp, num_pages=8, seed=tp)
    engine = OffloadEngine(src, num_host_pages=6, d2h_path=path)
    ids, slots = [5, 0, 7], [4, 1, 2]
    engine.d2h(ids, slots).synchronize()
    # The host row holds one page of every unit, a replicated unit once.
    assert engine.row_bytes == params.host_bytes_per_page(tp)
    chex.assert_trees_all_equal(
        engine.read_host([4])[0], np.concatenate([np.asarray(u.read_pages([5]))[0] for u in src.to_memory()])
    )

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


@pytest.mark.parametrize("path", PATHS)
def test_h2d_donates_and_updates_in_place(path, kernels):
    params = make_params("bfloat16", None, mla=False)
    src, _, _ = random_buffer(params, 4, 8)
    engine = OffloadEngine(src, 4, d2h_path=path)
    assert engine.h2d_path == ("pool" if kernels == "native" else "staged")
    engine.d2h([1, 2], [0, 3]).synchronize()
    dst = allocate_buffer(params, tp_mesh(4), 8)
    pointers = [s.data.unsafe_buffer_pointer() for s in dst.values.addressable_shards]
    out, t = engine.h2d(dst, [0, 3], [6, 7])
    t.synchronize()
    assert dst.values.is_deleted()
    assert [s.data.unsafe_buffer_pointer() for s in out.values.addressable_shards] == pointers
    with pytest.raises(ValueError, match=r"buffer has been donated \(its arrays are deleted\)"):
        engine.h2d(dst, [0], [0])


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
        engine.d2h(np.arange(32), np.arange(32), buffer=cache).synchronize()
        rows = engine.read_host(np.arange(32))
        expected = as_bytes(jnp.full(cache.values.shape[1:], value * 3, jnp.bfloat16)[..., :4, :])
        for r in rows:
            chex.assert_trees_all_equal(r, np.concatenate([expected, expected]))


def test_d2h_needs_the_current_cache_after_donation():
    params = make_params("bfloat16", None, mla=False)
    cache, _, _ = random_buffer(params, 2, 4)
    engine = OffloadEngine(cache, 4)
    jax.jit(lambda c: c, donate_argnums=0)(cache)
    with pytest.raises(ValueError, match=r"has been donated to another computation; pass the current cache"):
        engine.d2h([0], [0])


def test_bucketed_batches_compile_at_most_1_plus_log2_n_times(kernels):
    params = make_params("bfloat16", None, mla=False)
    cache, _, _ = random_buffer(params, 2, 32)
    engine = OffloadEngine(cache, 32, d2h_path="xla")
    n = 16
    sizes = None
    for k in range(1, n + 1):
        engine.d2h(np.arange(k), np.arange(k)).synchronize()
        if sizes is None:  # jit caches are shared across engines: count from the first call on
            sizes = {d: fn._cache_size() - 1 for d, fn in engine._gather_fns.items()}
        cache, t = engine.h2d(cache, np.arange(k), np.arange(k)[::-1] + 3)
        t.synchronize()
    limit = 1 + int(np.log2(n))
    assert len(engine._gather_fns) == 2
    for device, fn in engine._gather_fns.items():
        assert fn._cache_size() - sizes[device] <= limit
    assert engine._h2d_fn._cache_size() <= limit
    assert [bucket(k) for k in (1, 2, 3, 5, 16, 17)] == [1, 2, 4, 8, 16, 32]


def test_transfer_handles():
    params = make_params("bfloat16", None, mla=False)
    cache, _, _ = random_buffer(params, 2, 8)
    engine = OffloadEngine(cache, 8, d2h_path="xla")
    t = engine.d2h([1, 2, 3], [0, 1, 2])
    assert isinstance(t, Transfer) and t.direction == "d2h" and t.num_pages == 3
    assert t.nbytes == 3 * engine.row_bytes
    assert isinstance(t.is_complete(), bool)
    # Reading the pool completes pending offloads first.
    rows = engine.read_host([0, 1, 2])
    assert t.is_complete()
    chex.assert_trees_all_equal(rows[1], np.concatenate([np.asarray(u.read_pages([2]))[0] for u in cache.to_memory()]))
    empty = engine.d2h([], [])
    assert empty.is_complete() and empty.num_pages == 0


def test_multi_buffer_round_trip(kernels):
    target, tv, _ = random_buffer(make_params("float8_e4m3fn", "float32", mla=False), 2, 6)
    draft, dv, _ = random_buffer(make_params("bfloat16", None, mla=True), 2, 6, seed=3)
    multi = MultiKVCacheBuffer({"target": target, "draft": draft})
    engine = OffloadEngine(multi, 4)
    engine.d2h([2, 4], [0, 1]).synchronize()
    fresh = MultiKVCacheBuffer(
        {
            "target": allocate_buffer(make_params("float8_e4m3fn", "float32", mla=False), tp_mesh(2), 6),
            "draft": allocate_buffer(make_params("bfloat16", None, mla=True), tp_mesh(2), 6),
        }
    )
    out, t = engine.h2d(fresh, [1, 0], [5, 0])
    t.synchronize()
    chex.assert_trees_all_equal(page_bytes(out.children["target"].values, 5), as_bytes(tv[4]))
    chex.assert_trees_all_equal(page_bytes(out.children["draft"].values, 0), as_bytes(dv[2]))


# -- bad input: ValueError before any byte moves ------------------------------


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda e, c: e.d2h([0, 8], [0, 1]), r"device_page_ids contains 8, outside the valid range \[0, 8\)"),
        (lambda e, c: e.d2h([0, 1], [0, 4]), r"host_slots contains 4, outside the valid range \[0, 4\)"),
        (lambda e, c: e.d2h([1, 1], [0, 2]), "device_page_ids repeats 1: ids in one batch must be unique"),
        (lambda e, c: e.d2h([1, 2], [3, 3]), "host_slots repeats 3"),
        (lambda e, c: e.d2h([1, 2, 3], [0, 1]), "device_page_ids has 3 entries but host_slots has 2"),
        (lambda e, c: e.h2d(c, [0, 1], [2, 9]), r"device_page_ids contains 9, outside the valid range \[0, 8\)"),
        (lambda e, c: e.h2d(c, [0, 0], [2, 3]), "host_slots repeats 0"),
        (lambda e, c: e.h2d(c, [0], [2, 3]), "device_page_ids has 2 entries but host_slots has 1"),
        (lambda e, c: e.h2d(c, [-1], [2]), r"host_slots contains -1"),
        (lambda e, c: e.h2d(c.values, [0], [2]), "buffer must be a KVCacheBuffer or MultiKVCacheBuffer, got ArrayImpl"),
        (
            lambda e, c: e.h2d(allocate_buffer(make_params("bfloat16", None, False), tp_mesh(4), 8), [0], [0]),
            "buffer layout differs from the engine's at unit 0",
        ),
        (
            lambda e, c: e.h2d(allocate_buffer(make_params("float16", None, False), tp_mesh(2), 8), [0], [0]),
            r"buffer layout differs from the engine's at unit 0: got .*float16",
        ),
        (lambda e, c: e.write_host([0], np.zeros((1, 3), np.uint8)), r"rows must be uint8 of shape \(1, 4096\)"),
    ],
)
def test_bad_input_moves_nothing(call, message):
    params = make_params("bfloat16", None, mla=False)
    cache, values, _ = random_buffer(params, 2, 8)
    engine = OffloadEngine(cache, 4)
    engine.d2h([3, 4, 5, 6], [0, 1, 2, 3]).synchronize()
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
    with pytest.raises(ValueError, match="d2h_path must be one of"):
        OffloadEngine(a, 4, d2h_path="dma")
    with pytest.raises(ValueError, match="host_memory_kind 'hbm' is not a memory of these devices"):
        OffloadEngine(a, 4, host_memory_kind="hbm")
    with pytest.raises(ValueError, match="source must be a KVCacheBuffer"):
        OffloadEngine([], 4)


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


def test_engine_from_units_and_unpinned_host():
    params = make_params("int8", "float16", mla=True)
    cache, values, _ = random_buffer(params, 4, 5)
    engine = OffloadEngine(cache.to_memory(), 3, host_memory_kind="unpinned_host", d2h_path="xla")
    engine.d2h([4], [2]).synchronize()
    out, t = engine.h2d(allocate_buffer(params, tp_mesh(4), 5), [2], [0])
    t.synchronize()
    for shard in out.values.addressable_shards:
        chex.assert_trees_all_equal(as_bytes(np.asarray(shard.data)[0]), as_bytes(values[4]))
