import jax.numpy as jnp
import pytest

from jaxkv import KVCacheParams, KVCacheQuantConfig


def mha(**kw):
    base = dict(dtype=jnp.bfloat16, n_kv_heads=8, head_dim=128, num_layers=4, page_size=16)
    return KVCacheParams(**(base | kw))


def test_mha_geometry():
    p = mha()
    assert p.kv_dim == 2
    assert p.shape_per_page(4) == (2, 4, 16, 2, 128)
    assert p.shape_per_scale_page(4) is None
    # 2 * 4 * 16 * 8 heads * 128 * 2 bytes over the whole group
    assert p.bytes_per_page(4) == 2 * 4 * 16 * 8 * 128 * 2
    assert p.bytes_per_page(1) == p.bytes_per_page(8)
    assert p.host_bytes_per_page(4) == p.bytes_per_page(4)


def test_quantized_geometry():
    p = mha(dtype=jnp.float8_e4m3fn, quant=KVCacheQuantConfig(scale_dtype=jnp.float32, granularity=64))
    assert p.shape_per_scale_page(2) == (2, 4, 16, 4, 2)
    values = 2 * 4 * 16 * 8 * 128
    scales = 2 * 4 * 16 * 8 * 2 * 4
    assert p.bytes_per_page(2) == values + scales
    assert p.shard_bytes_per_page(2) == (values + scales) // 2


def test_mla_geometry_counts_replicas_on_device_once_on_host():
    p = KVCacheParams(jnp.bfloat16, n_kv_heads=1, head_dim=576, num_layers=3, page_size=8, is_mla=True)
    assert p.kv_dim == 1
    assert p.shape_per_page(4) == (1, 3, 8, 1, 576)
    one = 3 * 8 * 576 * 2
    assert p.bytes_per_page(4) == 4 * one
    assert p.host_bytes_per_page(4) == one
    assert p.replicated(4) and not p.replicated(1)
    assert p.host_bytes_per_page(1) == p.bytes_per_page(1) == one


@pytest.mark.parametrize(
    ("value", "scale"),
    [(v, s) for v in ("float8_e4m3fn", "float8_e5m2", "int8") for s in ("float32", "float16", "float8_e8m0fnu")],
)
def test_supported_quant_pairs(value, scale):
    p = mha(dtype=value, quant=KVCacheQuantConfig(scale_dtype=scale))
    assert p.scales_per_head == 1


def test_num_pages_for():
    p = mha()
    per_page = p.bytes_per_page(4)
    assert p.num_pages_for(10 * per_page + per_page - 1, 4) == 10
    with pytest.raises(ValueError, match=r"memory_bytes \(100\) holds no page: one page needs 262144 bytes"):
        p.num_pages_for(100, 4)
    with pytest.raises(ValueError, match="memory_bytes must be an int"):
        p.num_pages_for(1.5e9, 4)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        (dict(n_kv_heads=0), "n_kv_heads must be a positive int, got 0"),
        (dict(page_size=2.0), "page_size must be a positive int, got 2.0"),
        (dict(dtype="float64"), "dtype must be one of .*, got float64"),
        (dict(dtype="nope"), "dtype 'nope' is not a dtype"),
        (dict(is_mla=True), r"n_kv_heads must be 1 for MLA .* got n_kv_heads=8"),
        (
            dict(dtype=jnp.bfloat16, quant=KVCacheQuantConfig()),
            r"unsupported value/scale dtype pair \(bfloat16, float32\)",
        ),
        (
            dict(dtype=jnp.int8, quant=KVCacheQuantConfig(granularity=48)),
            r"quant.granularity \(48\) must divide head_dim \(128\), but 128 % 48 = 32",
        ),
        (dict(quant="fp8"), "quant must be a KVCacheQuantConfig or None, got str"),
    ],
)
def test_invalid_params(kw, message):
    with pytest.raises(ValueError, match=message):
        mha(**kw)


def test_invalid_quant_config():
    with pytest.raises(ValueError, match="scale_dtype must be one of float32, float16, float8_e8m0fnu, got bfloat16"):
        KVCacheQuantConfig(scale_dtype=jnp.bfloat16)
    with pytest.raises(ValueError, match="granularity must be a positive int, got -1"):
        KVCacheQuantConfig(granularity=-1)


def test_heads_not_divisible_by_tp():
    with pytest.raises(ValueError, match=r"n_kv_heads \(8\) must be divisible by the TP degree \(3\), but 8 % 3 = 2"):
        mha().shape_per_page(3)
