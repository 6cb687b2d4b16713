import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cachegen import TP_DEGREES, as_bytes, random_buffer, tp_mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxkv import (
    KVCacheBuffer,
    KVCacheMemory,
    KVCacheParams,
    KVCacheQuantConfig,
    MultiKVCacheBuffer,
    ReplicatedKVCacheMemory,
    allocate_buffer,
)

MHA = KVCacheParams(jnp.bfloat16, n_kv_heads=8, head_dim=16, num_layers=2, page_size=4)
FP8 = KVCacheParams(
    jnp.float8_e4m3fn,
    n_kv_heads=8,
    head_dim=16,
    num_layers=2,
    page_size=4,
    quant=KVCacheQuantConfig(granularity=8),
)
MLA = KVCacheParams(jnp.bfloat16, n_kv_heads=1, head_dim=24, num_layers=2, page_size=4, is_mla=True)
HEADS = P(None, None, None, None, "tp", None)


@pytest.mark.parametrize("tp", TP_DEGREES)
@pytest.mark.parametrize("params", [MHA, FP8, MLA], ids=["mha", "fp8", "mla"])
def test_allocate_layout(params, tp):
    buf = allocate_buffer(params, tp_mesh(tp), num_pages=6)
    chex.assert_shape(buf.values, (6, params.kv_dim, 2, 4, params.n_kv_heads, params.head_dim))
    chex.assert_type(buf.values, params.dtype)
    assert buf.tp_degree == tp
    assert buf.total_num_pages == 6
    assert buf.replicates_kv_across_tp == (params.is_mla and tp > 1)
    assert buf.values.sharding.memory_kind == "device"
    if params.quant:
        chex.assert_shape(buf.scales, (6, 2, 2, 4, 8, 2))
        chex.assert_type(buf.scales, jnp.float32)
    else:
        assert buf.scales is None
    shards = buf.values.addressable_shards
    assert len(shards) == tp
    for s in shards:
        chex.assert_shape(s.data, (6, *params.shape_per_page(tp)))
    assert not np.asarray(buf.values).view(np.uint8).any()


@pytest.mark.parametrize("tp", TP_DEGREES)
@pytest.mark.parametrize("params", [MHA, FP8], ids=["mha", "fp8"])
def test_shard_bytes_equal_max_per_device_buffer(params, tp):
    """Shard i, row-major, is exactly MAX's per-device buffer for heads [i*h, (i+1)*h)."""
    buf, values, scales = random_buffer(params, tp, num_pages=5)
    h = params.n_kv_heads // tp
    n_shards = tp * (2 if scales is not None else 1)
    bufs = buf.all_buffers
    assert len(bufs) == n_shards
    for i in range(tp):
        chex.assert_trees_all_equal(as_bytes(bufs[i]), as_bytes(values[..., i * h : (i + 1) * h, :]))
        assert bufs[i].devices() == {jax.devices()[i]}
        if scales is not None:
            chex.assert_trees_all_equal(as_bytes(bufs[tp + i]), as_bytes(scales[..., i * h : (i + 1) * h, :]))


@pytest.mark.parametrize("tp", TP_DEGREES)
@pytest.mark.parametrize("params", [MHA, FP8, MLA], ids=["mha", "fp8", "mla"])
def test_to_memory_units(params, tp):
    buf, _, _ = random_buffer(params, tp, num_pages=7)
    units = buf.to_memory()
    kinds = ["values"] + (["scales"] if params.quant else [])
    if buf.replicates_kv_across_tp:
        assert [type(u) for u in units] == [ReplicatedKVCacheMemory] * len(kinds)
        for u in units:
            assert u.device == jax.devices()[0]
            assert len(u.peers) == tp - 1
            assert u.devices == jax.devices()[:tp]
    else:
        assert [type(u) for u in units] == [KVCacheMemory] * (tp * len(kinds))
        assert [u.shard_index for u in units] == list(range(tp)) * len(kinds)
        assert [u.device for u in units] == jax.devices()[:tp] * len(kinds)
    assert [u.kind for u in units] == sorted((k for k in kinds for _ in range(len(units) // len(kinds))), reverse=True)
    assert all(u.total_num_pages == 7 for u in units)
    per_kind = len(units) // len(kinds)
    values_bytes = np.prod(params.shape_per_page(tp)) * params.dtype.itemsize
    assert all(u.bytes_per_page == values_bytes for u in units[:per_kind])
    if params.quant:
        scale_bytes = np.prod(params.shape_per_scale_page(tp)) * params.quant.scale_dtype.itemsize
        assert all(u.bytes_per_page == scale_bytes for u in units[per_kind:])
    host_row = sum(u.bytes_per_page for u in units)
    assert host_row == params.host_bytes_per_page(tp)


def test_to_memory_copies_nothing():
    """A unit wraps the very buffer of the global array's shard."""
    buf, _, _ = random_buffer(FP8, 4, num_pages=3)
    ptrs = {s.data.unsafe_buffer_pointer() for a in (buf.values, buf.scales) for s in a.addressable_shards}
    assert {u.shard.unsafe_buffer_pointer() for u in buf.to_memory()} == ptrs


def test_buffer_is_a_pytree_through_jit():
    buf, values, _ = random_buffer(FP8, 2, num_pages=3)

    @jax.jit
    def bump(b):
        return jax.tree.map(lambda x: jax.lax.bitcast_convert_type(x, jnp.uint8) ^ 1, b)

    out = bump(buf)
    assert isinstance(out, KVCacheBuffer)
    assert out.replicates_kv_across_tp is False
    chex.assert_trees_all_equal(np.asarray(out.values), values.view(np.uint8) ^ 1)


def test_multi_buffer_concatenates_children():
    target, _, _ = random_buffer(FP8, 2, num_pages=3)
    draft, _, _ = random_buffer(MLA, 2, num_pages=5, seed=1)
    multi = MultiKVCacheBuffer({"target": target, "draft": draft})
    assert len(multi.all_buffers) == len(target.all_buffers) + len(draft.all_buffers)
    for a, b in zip(multi.all_buffers, target.all_buffers + draft.all_buffers, strict=True):
        assert a is b or a.unsafe_buffer_pointer() == b.unsafe_buffer_pointer()
    units = multi.to_memory()
    assert [u.total_num_pages for u in units] == [3] * 4 + [5]
    leaves = jax.tree.leaves(multi)
    assert len(leaves) == 3
    again = jax.tree.unflatten(jax.tree.structure(multi), leaves)
    assert list(again.children) == ["target", "draft"]
    with pytest.raises(ValueError, match=r"children\['x'\] must be a KVCacheBuffer, got int"):
        MultiKVCacheBuffer({"x": 1})


# -- bad input ---------------------------------------------------------------


def _sharded(x, tp, spec=HEADS, axis="tp"):
    return jax.device_put(x, NamedSharding(tp_mesh(tp, axis), spec))


def test_values_must_be_named_sharded_jax_array():
    with pytest.raises(ValueError, match="values must be a jax.Array, got ndarray"):
        KVCacheBuffer(False, np.zeros((2, 2, 1, 4, 8, 16), np.float32))
    single = jax.device_put(jnp.zeros((2, 2, 1, 4, 8, 16)), jax.devices()[0])
    with pytest.raises(ValueError, match="values must have a NamedSharding .* got SingleDeviceSharding"):
        KVCacheBuffer(False, single)
    with pytest.raises(ValueError, match=r"values must have rank 6 .* got shape \(2, 8, 16\)"):
        KVCacheBuffer(False, _sharded(jnp.zeros((2, 8, 16)), 2, P(None, "tp")))


def test_sharding_errors():
    x = jnp.zeros((2, 2, 1, 4, 8, 16), jnp.bfloat16)
    with pytest.raises(ValueError, match=r"only on n_kv_heads \(axis 4\), but axis 0 \(num_pages\) is sharded on 'tp'"):
        KVCacheBuffer(False, _sharded(x, 2, P("tp")))
    with pytest.raises(ValueError, match="must shard n_kv_heads over one TP mesh axis, got PartitionSpec entry None"):
        KVCacheBuffer(False, _sharded(x, 2, P()))
    with pytest.raises(ValueError, match="must be fully replicated when replicates_kv_across_tp=True"):
        KVCacheBuffer(True, _sharded(x, 2))
    with pytest.raises(ValueError, match="replicates_kv_across_tp=True needs a TP degree > 1, got 1 device"):
        KVCacheBuffer(True, _sharded(x, 1, P()))
    mesh = jax.make_mesh((2, 2), ("dp", "tp"), devices=jax.devices()[:4])
    with pytest.raises(ValueError, match="spans 4 devices but its TP axis 'tp' has 2"):
        KVCacheBuffer(False, jax.device_put(x, NamedSharding(mesh, HEADS)))
    with pytest.raises(ValueError, match="values dtype must be one of .*, got float64|values dtype must be one of"):
        KVCacheBuffer(False, _sharded(jnp.zeros((2, 2, 1, 4, 8, 16), jnp.int32), 2))
    with pytest.raises(ValueError, match="kv_dim \\(axis 1\\) must be 2 \\(K and V\\) or 1 \\(MLA\\), got 3"):
        KVCacheBuffer(False, _sharded(jnp.zeros((2, 3, 1, 4, 8, 16), jnp.bfloat16), 2))


def test_scales_errors():
    v = _sharded(jnp.zeros((2, 2, 1, 4, 8, 16), jnp.float8_e4m3fn), 2)
    s = jnp.zeros((2, 2, 1, 4, 8, 2), jnp.float32)
    KVCacheBuffer(False, v, _sharded(s, 2))  # valid
    with pytest.raises(ValueError, match="scales must be a jax.Array, got ndarray"):
        KVCacheBuffer(False, v, np.asarray(s))
    with pytest.raises(ValueError, match=r"unsupported value/scale dtype pair \(float8_e4m3fn, bfloat16\)"):
        KVCacheBuffer(False, v, _sharded(s.astype(jnp.bfloat16), 2))
    bf16 = _sharded(jnp.zeros((2, 2, 1, 4, 8, 16), jnp.bfloat16), 2)
    with pytest.raises(ValueError, match=r"unsupported value/scale dtype pair \(bfloat16, float32\)"):
        KVCacheBuffer(False, bf16, _sharded(s, 2))
    with pytest.raises(ValueError, match="scales has 3 pages but values has 2: page counts must agree"):
        KVCacheBuffer(False, v, _sharded(jnp.zeros((3, 2, 1, 4, 8, 2)), 2))
    with pytest.raises(ValueError, match="must match values .* on every axis but head_dim"):
        KVCacheBuffer(False, v, _sharded(jnp.zeros((2, 2, 2, 4, 8, 2)), 2))
    other = jax.make_mesh((2,), ("tp",), devices=jax.devices()[2:4])
    with pytest.raises(ValueError, match=r"scales devices \[2, 3\] differ from values devices \[0, 1\]"):
        KVCacheBuffer(False, v, jax.device_put(s, NamedSharding(other, HEADS)))
    with pytest.raises(ValueError, match="heads axis must be sharded on the same mesh axis \\('tp'\\)"):
        KVCacheBuffer(False, v, jax.device_put(s, NamedSharding(tp_mesh(2), P(None, None, None, "tp"))))


def test_allocate_errors():
    mesh = tp_mesh(4)
    with pytest.raises(ValueError, match=r"tp_axis 'model' is not an axis of the mesh, whose axes are \('tp',\)"):
        allocate_buffer(MHA, mesh, 4, tp_axis="model")
    with pytest.raises(ValueError, match="num_pages must be a positive int, got 0"):
        allocate_buffer(MHA, mesh, 0)
    with pytest.raises(ValueError, match=r"n_kv_heads \(8\) must be divisible by the TP degree \(3\)"):
        allocate_buffer(MHA, jax.make_mesh((3,), ("tp",), devices=jax.devices()[:3]), 4)
    with pytest.raises(ValueError, match="params must be a KVCacheParams, got dict"):
        allocate_buffer({}, mesh, 4)
    mesh2 = jax.make_mesh((2, 2), ("dp", "tp"), devices=jax.devices()[:4])
    with pytest.raises(ValueError, match="every mesh axis other than TP must have size 1"):
        allocate_buffer(MHA, mesh2, 4)


def test_allocate_accepts_numpy_page_counts():
    buffer = allocate_buffer(MHA, tp_mesh(2), np.int64(4))
    assert buffer.total_num_pages == 4 and type(buffer.total_num_pages) is int


def test_allocate_refuses_a_cache_larger_than_the_devices_before_allocating(monkeypatch):
    """A page count that cannot fit fails at the call, not at the first use with RESOURCE_EXHAUSTED (issue 24
    item 5); the message says how many pages fit."""
    from jaxkv._cli import resources

    per_page = MHA.bytes_per_page(2)
    monkeypatch.setattr(resources, "device_budget", lambda devices: (10 * per_page + 1, "the test allows 10 pages"))
    assert allocate_buffer(MHA, tp_mesh(2), 10).total_num_pages == 10
    with pytest.raises(ValueError) as e:
        allocate_buffer(MHA, tp_mesh(2), 11)
    assert str(e.value) == (
        f"num_pages (11) needs {resources.fmt_bytes(11 * per_page)} ({per_page:,} B per page over TP 2) but the "
        "test allows 10 pages; num_pages must be at most 10"
    )
    monkeypatch.undo()
    with pytest.raises(ValueError, match=r"num_pages \(1,000,000,000,000\) needs .* but the 1 cpu devices share"):
        allocate_buffer(MHA, tp_mesh(1), 10**12)  # the real budget: the host's available memory
