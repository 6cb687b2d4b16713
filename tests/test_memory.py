import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cachegen import TP_DEGREES, as_bytes, random_buffer

from jaxkv import KVCacheMemory, KVCacheParams, KVCacheQuantConfig, allocate_buffer

# value dtype, scale dtype (None: unquantized)
DTYPES = [
    ("bfloat16", None),
    ("float16", None),
    ("float32", None),
    ("float8_e4m3fn", "float32"),
    ("int8", "float16"),
    ("float8_e5m2", "float8_e8m0fnu"),
]


def make_params(dtype, scale_dtype, mla):
    quant = None if scale_dtype is None else KVCacheQuantConfig(scale_dtype=scale_dtype, granularity=8)
    heads = 1 if mla else 8
    return KVCacheParams(dtype, n_kv_heads=heads, head_dim=16, num_layers=2, page_size=4, is_mla=mla, quant=quant)


def expected_page_bytes(global_array, unit, tp, replicated, page_ids):
    """The bytes a unit must return, computed from the global numpy array."""
    h = global_array.shape[4] // (1 if replicated else tp)
    i = unit.shard_index
    shard = global_array[..., i * h : (i + 1) * h, :]
    return np.stack([as_bytes(shard[p]) for p in page_ids])


@pytest.mark.parametrize("mla", [False, True], ids=["mha", "mla"])
@pytest.mark.parametrize("tp", TP_DEGREES)
@pytest.mark.parametrize(("dtype", "scale_dtype"), DTYPES)
def test_read_write_round_trip_is_bit_exact(dtype, scale_dtype, tp, mla, kernels):
    params = make_params(dtype, scale_dtype, mla)
    num_pages = 9
    buf, values, scales = random_buffer(params, tp, num_pages, seed=tp)
    page_ids = np.array([0, 7, 3, 8], np.int32)
    units = buf.to_memory()
    kinds = {"values": values, "scales": scales}

    rows = [u.read_pages(page_ids) for u in units]
    for unit, r in zip(units, rows, strict=True):
        chex.assert_shape(r, (4, unit.bytes_per_page))
        chex.assert_type(r, jnp.uint8)
        assert r.devices() == {unit.device}
        want = expected_page_bytes(kinds[unit.kind], unit, tp, buf.replicates_kv_across_tp, page_ids)
        chex.assert_trees_all_equal(np.asarray(r), want)

    # Inverse: write the rows into a zeroed cache and rebuild it from the units.
    empty = allocate_buffer(params, jax.make_mesh((tp,), ("tp",), devices=jax.devices()[:tp]), num_pages)
    written = [u.write_pages(page_ids, r) for u, r in zip(empty.to_memory(), rows, strict=True)]
    rebuilt = empty.with_memory(written)
    for array, original in ((rebuilt.values, values), (rebuilt.scales, scales)):
        if original is None:
            continue
        got = np.asarray(array).view(np.uint8)
        want = np.zeros_like(original).view(np.uint8)
        want[page_ids] = original.view(np.uint8)[page_ids]
        chex.assert_trees_all_equal(got, want)
        # Every replica of a replicated cache holds the same bytes.
        for shard in array.addressable_shards:
            expect = want if buf.replicates_kv_across_tp else None
            if expect is not None:
                chex.assert_trees_all_equal(as_bytes(shard.data), expect.reshape(-1))
    # The source units were not modified by writing into the others.
    chex.assert_trees_all_equal(np.asarray(buf.values).view(np.uint8), values.view(np.uint8))


@pytest.mark.parametrize(("dtype", "scale_dtype"), DTYPES)
def test_nan_payloads_survive(dtype, scale_dtype, kernels):
    """Signalling NaNs with payloads (e.g. bf16 0x7f81) come back with the same bits."""
    params = make_params(dtype, scale_dtype, mla=False)
    buf, values, _ = random_buffer(params, 2, 3)
    unit = buf.to_memory()[0]
    page0 = np.asarray(unit.read_pages([0]))[0]
    h = params.n_kv_heads // 2
    chex.assert_trees_all_equal(page0, as_bytes(values[0, ..., :h, :]))
    back = unit.write_pages([1], page0[None]).shard
    chex.assert_trees_all_equal(as_bytes(np.asarray(back)[1]), as_bytes(values[0, ..., :h, :]))


def test_buffer_materializes_all_pages():
    params = make_params("bfloat16", None, mla=False)
    buf, values, _ = random_buffer(params, 4, 5)
    unit = buf.to_memory()[2]
    full = unit.buffer
    chex.assert_shape(full, (5, unit.bytes_per_page))
    chex.assert_trees_all_equal(np.asarray(full), expected_page_bytes(values, unit, 4, False, range(5)))


def test_read_pages_compiles_once_per_batch_shape(kernels, monkeypatch):
    from jaxkv.layout import pages as _pages

    params = make_params("bfloat16", None, mla=False)
    buf, _, _ = random_buffer(params, 2, 16)
    unit = buf.to_memory()[0]
    # The gather kernel jitted afresh (as `_pages._jitted` holds it) and traced at most once:
    # every batch of 3 pages must reach it with the same shapes and dtypes.
    gather = _pages.kernels(unit.devices)[0]
    chex.clear_trace_counter()
    monkeypatch.setitem(_pages._jitted, gather, jax.jit(chex.assert_max_traces(gather, n=1)))
    for start in range(5):
        unit.read_pages(np.arange(start, start + 3))


@pytest.mark.parametrize(
    ("page_ids", "message"),
    [
        ([0, 9], r"page_ids contains 9, outside the valid range \[0, 9\)"),
        ([-1], r"page_ids contains -1, outside the valid range \[0, 9\)"),
        (np.zeros((2, 2), np.int32), r"page_ids must have rank 1, got shape \(2, 2\)"),
        (np.array([0.0, 1.0]), "page_ids must have an integer dtype, got float64"),
        (5, "page_ids must be a rank-1 sequence of ints, got int"),
    ],
)
def test_bad_page_ids(page_ids, message):
    buf, _, _ = random_buffer(make_params("bfloat16", None, mla=False), 2, 9)
    unit = buf.to_memory()[0]
    with pytest.raises(ValueError, match=message):
        unit.read_pages(page_ids)
    with pytest.raises(ValueError, match=message):
        unit.write_pages(page_ids, np.zeros((2, unit.bytes_per_page), np.uint8))


def test_bad_writes_leave_the_unit_unchanged():
    buf, values, _ = random_buffer(make_params("bfloat16", None, mla=True), 2, 4)
    unit = buf.to_memory()[0]
    before = np.asarray(unit.buffer)
    n = unit.bytes_per_page
    with pytest.raises(ValueError, match="page_ids repeats 1: ids in one batch must be unique"):
        unit.write_pages([1, 1], np.zeros((2, n), np.uint8))
    with pytest.raises(
        ValueError, match=rf"page_bytes must be uint8 of shape \(2, {n}\) .* got uint8 of shape \(2, 5\)"
    ):
        unit.write_pages([0, 1], np.zeros((2, 5), np.uint8))
    with pytest.raises(ValueError, match=rf"page_bytes must be uint8 of shape \(1, {n}\) .* got int16"):
        unit.write_pages([0], np.zeros((1, n), np.int16))
    with pytest.raises(ValueError, match="page_bytes must be a jax.Array or numpy array, got list"):
        unit.write_pages([0], [[0] * n])
    chex.assert_trees_all_equal(np.asarray(unit.buffer), before)
    chex.assert_trees_all_equal(np.asarray(buf.values).view(np.uint8), values.view(np.uint8))


def test_with_memory_rejects_foreign_units():
    a, _, _ = random_buffer(make_params("bfloat16", None, mla=False), 2, 4)
    b, _, _ = random_buffer(make_params("bfloat16", None, mla=False), 4, 4)
    with pytest.raises(ValueError, match="units has 4 entries, expected 2"):
        a.with_memory(b.to_memory())
    with pytest.raises(ValueError, match=r"units\[0\] is .* expected a unit laid out like"):
        a.with_memory(b.to_memory()[:2])


@pytest.mark.parametrize("tp", [2, 4])
def test_replicated_peers_are_byte_page_units(tp):
    """Root and peers alike are `[num_pages, bytes_per_page]` uint8 units over their own shard, copying nothing."""
    params = make_params("float8_e4m3fn", "float32", mla=True)
    num_pages = 5
    buf, _, _ = random_buffer(params, tp, num_pages, seed=3)
    units = buf.to_memory()
    arrays = {"values": buf.values, "scales": buf.scales}
    for unit in units:
        assert len(unit.peers) == tp - 1
        assert unit.devices == [unit.device, *(p.device for p in unit.peers)] == jax.devices()[:tp]
        pointers = {s.device: s.data.unsafe_buffer_pointer() for s in arrays[unit.kind].addressable_shards}
        for i, peer in enumerate(unit.peers, start=1):
            assert type(peer) is KVCacheMemory
            assert (peer.kind, peer.shard_index, peer.device) == (unit.kind, i, jax.devices()[i])
            assert (peer.total_num_pages, peer.bytes_per_page) == (unit.total_num_pages, unit.bytes_per_page)
            assert peer.shard.unsafe_buffer_pointer() == pointers[peer.device]
            full = peer.buffer
            chex.assert_shape(full, (num_pages, unit.bytes_per_page))
            chex.assert_type(full, jnp.uint8)
            chex.assert_trees_all_equal(np.asarray(full), np.asarray(unit.buffer))
            rows = peer.read_pages([4, 0])
            assert rows.devices() == {peer.device}
            chex.assert_trees_all_equal(np.asarray(rows), np.asarray(unit.read_pages([4, 0])))

    # A write through the root reaches every peer; the written units rebuild the cache.
    rng = np.random.default_rng(0)
    new_rows = [rng.integers(0, 256, (1, u.bytes_per_page), np.uint8) for u in units]
    written = [u.write_pages([2], r) for u, r in zip(units, new_rows, strict=True)]
    for unit, r in zip(written, new_rows, strict=True):
        assert [type(p) for p in unit.peers] == [KVCacheMemory] * (tp - 1)
        assert [p.shard_index for p in unit.peers] == list(range(1, tp))
        for peer in unit.peers:
            chex.assert_trees_all_equal(np.asarray(peer.read_pages([2])), r)
    rebuilt = buf.with_memory(written)
    for shard in rebuilt.values.addressable_shards:
        chex.assert_trees_all_equal(as_bytes(np.asarray(shard.data)[2]), new_rows[0][0])
