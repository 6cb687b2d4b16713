"""Paged attention against a dense reference: ragged batches, MHA/GQA and MLA, bf16/FP8/int8 caches, TP 1-4."""

import functools

import chex
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from cachegen import as_bytes, random_buffer, tp_mesh

from jaxkv import KVCacheBuffer, KVCacheParams, KVCacheQuantConfig, allocate_buffer, paged_attention
from jaxkv.attention.xla import dequantize, quantize

PAGE_SIZE, LAYERS, LAYER = 4, 2, 1
T = 8  # tokens per sequence in a batch, padded
# Three sequences: a fresh prefill, a decode step, a chunk crossing pages. A first
# call writes their prefixes (sequence 0 brings no token), a second the new tokens.
PREFIX = np.array([0, 6, 8], np.int32)
NEW = np.array([8, 1, 5], np.int32)
PAGE_TABLE = np.array([[3, 7, 0, 0], [9, 2, 0, 0], [5, 1, 8, 4]], np.int32)  # shuffled, null-padded
NUM_PAGES = 10
N_HEADS = {"mha": 8, "mla": 4}
HEAD_DIM = {"mha": 16, "mla": 24}  # MLA: latent 16 + rope 8
MLA_VALUE_DIM = 16
SCALE = 0.3
QUANT = KVCacheQuantConfig(granularity=8)
DTYPES = ("bfloat16", "float8_e4m3fn", "int8")


def cache_params(kind: str, dtype: str) -> KVCacheParams:
    quant = None if dtype == "bfloat16" else QUANT
    if kind == "mla":
        return KVCacheParams(dtype, 1, HEAD_DIM["mla"], LAYERS, PAGE_SIZE, is_mla=True, quant=quant)
    return KVCacheParams(dtype, 4, HEAD_DIM["mha"], LAYERS, PAGE_SIZE, quant=quant)


@functools.cache
def attention_step(params: KVCacheParams, tp: int, impl: str = "xla"):
    """One jitted, donating program per layout and implementation; both calls of a test share it."""
    value_dim = MLA_VALUE_DIM if params.is_mla else None
    step = functools.partial(paged_attention, mesh=tp_mesh(tp), softmax_scale=SCALE, value_dim=value_dim, impl=impl)
    return jax.jit(step, donate_argnums=0)


def inputs(params: KVCacheParams, seed: int = 0):
    """Queries and per-position K/V for every sequence: q [B, 16, H, d], k/v [B, 16, h, d] float32."""
    rng = np.random.default_rng(seed)
    b, n = len(PREFIX), 16
    heads = N_HEADS["mla" if params.is_mla else "mha"]
    q = rng.standard_normal((b, n, heads, params.head_dim), np.float32)
    k = rng.standard_normal((b, n, params.n_kv_heads, params.head_dim), np.float32)
    v = None if params.is_mla else rng.standard_normal(k.shape, np.float32)
    return q, k, v


def window(x, start, lens):
    """x[b, start[b] : start[b] + lens[b]] padded to T with NaN: padded tokens must be dropped."""
    out = np.full((x.shape[0], T, *x.shape[2:]), np.nan, np.float32)
    for b, (s, n) in enumerate(zip(start, lens, strict=True)):
        out[b, :n] = x[b, s : s + n]
    return out


def run_both_calls(step, cache, q, k, v):
    """Write the prefixes, then the new tokens; returns (out of the second call, cache)."""
    zero = np.zeros_like(PREFIX)
    for start, lens in ((zero, PREFIX), (PREFIX, NEW)):
        kv = (window(k, start, lens), None if v is None else window(v, start, lens))
        out, cache = step(cache, LAYER, window(q, start, lens), *kv, PAGE_TABLE, start, lens)
    return out, cache


def fake_quant(x: np.ndarray, params: KVCacheParams) -> np.ndarray:
    """What the cache keeps of x, written independently of jaxkv: round to the cache dtype per scale group."""
    dtype = np.dtype(params.dtype)
    if params.quant is None:
        return x.astype(dtype).astype(np.float32)
    groups = x.reshape(*x.shape[:-1], -1, params.quant.granularity)
    qmax = np.float32(127 if dtype == np.int8 else float(ml_dtypes.finfo(dtype).max))
    scale = np.abs(groups).max(-1) / qmax
    scale = np.where(scale > 0, scale, np.float32(1))
    scaled = groups / scale[..., None]
    if dtype == np.int8:
        scaled = np.round(scaled)
    scaled = np.clip(scaled, -qmax, qmax).astype(dtype).astype(np.float32)
    return (scaled * scale[..., None]).reshape(x.shape)


def dense_attention(q, k, v, value_dim=None):
    """Plain causal attention of one sequence over all its K/V. q [n, H, d] at the last n of
    k/v's positions; k [s, h, d]; v [s, h, dv] (MLA: v = k[..., :value_dim])."""
    if v is None:
        v = k[..., :value_dim]
    n, heads, s = q.shape[0], q.shape[1], k.shape[0]
    group = heads // k.shape[1]
    k, v = np.repeat(k, group, axis=1).astype(np.float64), np.repeat(v, group, axis=1).astype(np.float64)
    scores = np.einsum("thd,shd->hts", q.astype(np.float64), k) * SCALE
    causal = np.arange(s)[None, :] <= (s - n + np.arange(n))[:, None]
    scores = np.where(causal, scores, -np.inf)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("hts,shd->thd", p, v)


def written_slots() -> set[tuple[int, int]]:
    """(page, slot) of every position the two calls write."""
    return {
        (int(PAGE_TABLE[b, pos // PAGE_SIZE]), pos % PAGE_SIZE)
        for b in range(len(PREFIX))
        for pos in range(PREFIX[b] + NEW[b])
    }


def host_copies(array: jax.Array) -> np.ndarray:
    """The global array on the host; a replicated array's shards must be identical."""
    shards = [np.asarray(s.data) for s in array.addressable_shards]
    if array.sharding.is_fully_replicated and len(shards) > 1:
        for s in shards[1:]:
            np.testing.assert_array_equal(as_bytes(s), as_bytes(shards[0]))
    return np.asarray(array)


@pytest.mark.parametrize("impl", ["xla", "pallas"])
@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["mha", "mla"])
def test_matches_dense_reference(kind, dtype, tp, impl):
    params = cache_params(kind, dtype)
    step = attention_step(params, tp, impl)
    q, k, v = inputs(params)
    # Start from random bit patterns (NaN, Inf) everywhere, the null page included.
    garbage, values0, scales0 = random_buffer(params, tp, NUM_PAGES, seed=1)
    out, cache = run_both_calls(step, garbage, q, k, v)
    out = np.asarray(out)
    chex.assert_shape(out, (3, T, N_HEADS[kind], MLA_VALUE_DIM if v is None else params.head_dim))

    kq = fake_quant(k, params)
    vq = None if v is None else fake_quant(v, params)
    tol = {"bfloat16": 1e-5, "float8_e4m3fn": 1e-4, "int8": 1e-4}[dtype]
    for b, (start, n) in enumerate(zip(PREFIX, NEW, strict=True)):
        end = start + n
        want = dense_attention(q[b, start:end], kq[b, :end], None if v is None else vq[b, :end], MLA_VALUE_DIM)
        np.testing.assert_allclose(out[b, :n], want, atol=tol, rtol=tol, err_msg=f"sequence {b}")
        # Quantization error itself stays small: compare with attention on exact K/V.
        exact = dense_attention(q[b, start:end], k[b, :end], None if v is None else v[b, :end], MLA_VALUE_DIM)
        np.testing.assert_allclose(out[b, :n], exact, atol=0.15)

    # Layout: K (and V) of position pos of sequence b sit at [page, kv, LAYER, slot, heads, :].
    values = host_copies(cache.values)
    stored = values.astype(np.float32)
    if params.quant is not None:
        stored = np.asarray(dequantize(jnp.asarray(values), jnp.asarray(host_copies(cache.scales))))
    new = np.stack([kq] if v is None else [kq, vq], axis=2)  # [B, 16, kv, h, d]
    for b in range(3):
        for pos in range(PREFIX[b] + NEW[b]):
            page, slot = PAGE_TABLE[b, pos // PAGE_SIZE], pos % PAGE_SIZE
            np.testing.assert_allclose(stored[page, :, LAYER, slot], new[b, pos], rtol=1e-6, atol=0)

    # Every other byte, padded tokens' targets and the null page included, is untouched.
    untouched = np.ones(values.shape[:4], bool)
    for page, slot in written_slots():
        untouched[page, :, LAYER, slot] = False
    chex.assert_trees_all_equal(as_bytes(values[untouched]), as_bytes(values0[untouched]))
    if params.quant is not None:
        chex.assert_trees_all_equal(as_bytes(host_copies(cache.scales)[untouched]), as_bytes(scales0[untouched]))

    # Garbage in unwritten slots changes nothing: a zeroed cache gives the same bits.
    out_zeroed, zeroed = run_both_calls(step, allocate_buffer(params, tp_mesh(tp), NUM_PAGES), q, k, v)
    valid = np.arange(T)[None, :] < NEW[:, None]
    chex.assert_trees_all_equal(np.asarray(out_zeroed)[valid], out[valid])
    written = ~untouched
    chex.assert_trees_all_equal(as_bytes(np.asarray(zeroed.values)[written]), as_bytes(values[written]))


@pytest.mark.parametrize("impl", ["xla", "pallas"])
@pytest.mark.parametrize(
    ("kind", "dtype", "tp"), [("mha", "bfloat16", 2), ("mha", "int8", 4), ("mla", "float8_e4m3fn", 2)]
)
def test_written_bytes_are_deterministic(kind, dtype, tp, impl):
    params = cache_params(kind, dtype)
    step = attention_step(params, tp, impl)
    runs = []
    for _ in range(2):
        out, cache = run_both_calls(step, allocate_buffer(params, tp_mesh(tp), NUM_PAGES), *inputs(params))
        runs.append((as_bytes(out), as_bytes(cache.values), None if cache.scales is None else as_bytes(cache.scales)))
    chex.assert_trees_all_equal(runs[0], runs[1])


@pytest.mark.parametrize("impl", ["xla", "pallas"])
@pytest.mark.parametrize(("kind", "dtype"), [("mha", "float8_e4m3fn"), ("mla", "bfloat16")])
def test_cache_is_donated(kind, dtype, impl):
    params = cache_params(kind, dtype)
    step = attention_step(params, 2, impl)
    cache = allocate_buffer(params, tp_mesh(2), NUM_PAGES)
    q, k, v = inputs(params)
    start, lens = np.zeros_like(PREFIX), NEW
    new_cache = step(cache, 0, q[:, :T], k[:, :T], None if v is None else v[:, :T], PAGE_TABLE, start, lens)[1]
    assert cache.values.is_deleted()
    assert cache.scales is None or cache.scales.is_deleted()
    assert new_cache.values.sharding.is_equivalent_to(allocate_buffer(params, tp_mesh(2), 1).values.sharding, 6)


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_traced_layer_index(impl):
    """The layer may be a traced scalar (a lax.scan / fori_loop over layers)."""
    params = cache_params("mha", "bfloat16")
    step = attention_step(params, 1, impl)
    q, k, v = inputs(params)
    cache = allocate_buffer(params, tp_mesh(1), NUM_PAGES)
    outs = []
    for layer in (0, 1):  # the same K/V in both layers: the same output, read from the traced layer's slots
        out, cache = step(cache, jnp.int32(layer), q[:, :T], k[:, :T], v[:, :T], PAGE_TABLE, np.zeros(3, np.int32), NEW)
        outs.append(np.asarray(out)[np.arange(T)[None, :] < NEW[:, None]])
        values = np.asarray(cache.values)
        assert values[:, :, layer].any() and (layer == 1 or not values[:, :, 1].any())
    chex.assert_trees_all_equal(outs[0], outs[1])


def test_pallas_and_xla_agree_and_impl_is_checked():
    """The two implementations give the same outputs within float32 rounding; a bad impl names the choices."""
    params = cache_params("mha", "int8")
    q, k, v = inputs(params)
    outs = [
        np.asarray(
            run_both_calls(attention_step(params, 2, impl), allocate_buffer(params, tp_mesh(2), NUM_PAGES), q, k, v)[0]
        )
        for impl in ("xla", "pallas")
    ]
    valid = np.arange(T)[None, :] < NEW[:, None]
    np.testing.assert_allclose(outs[1][valid], outs[0][valid], rtol=2e-6, atol=2e-6)
    with pytest.raises(ValueError, match=r"impl must be one of \('auto', 'xla', 'pallas'\), got 'triton'"):
        paged_attention(
            allocate_buffer(params, tp_mesh(1), 2),
            0,
            q[:, :T],
            k[:, :T],
            v[:, :T],
            PAGE_TABLE,
            np.zeros(3, np.int32),
            NEW,
            impl="triton",
        )


@pytest.mark.parametrize("scale_dtype", ["float32", "float16", "float8_e8m0fnu"])
@pytest.mark.parametrize("dtype", ["float8_e4m3fn", "float8_e5m2", "int8"])
def test_quantize_round_trip(dtype, scale_dtype):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 32), np.float32) * np.float32(30)
    x[0] = 0  # all-zero groups: scale 1, no NaN
    x[1, :8] = 1e-3
    values, scales = quantize(jnp.asarray(x), dtype, scale_dtype, granularity=8)
    chex.assert_type(values, jnp.dtype(dtype))
    chex.assert_type(scales, jnp.dtype(scale_dtype))
    chex.assert_shape(scales, (5, 4))
    back = np.asarray(dequantize(values, scales))
    assert np.isfinite(back).all()
    assert not back[0].any()
    amax = np.abs(x.reshape(5, 4, 8)).max(-1, keepdims=True)
    rel = {"float8_e4m3fn": 2**-3, "float8_e5m2": 2**-2, "int8": 1 / 127}[dtype]  # one step of the value grid
    # A tiny group's scale is clipped up to the smallest normal scale, which then sets the step.
    step = np.maximum(rel * amax, np.asarray(scales, np.float32)[..., None])
    err = np.abs(back - x).reshape(5, 4, 8)
    assert (err <= step * 1.01).all(), float((err / step).max())


def test_rejects_bad_shapes():
    params = cache_params("mha", "bfloat16")
    mesh = tp_mesh(2)
    cache = allocate_buffer(params, mesh, NUM_PAGES)
    q, k, v = (x[:, :T] for x in inputs(params))
    start, lens = np.zeros(3, np.int32), NEW
    call = functools.partial(paged_attention, cache, 0, mesh=mesh)
    with pytest.raises(ValueError, match=r"k has shape \(3, 8, 2, 16\), expected \(3, 8, 4, 16\)"):
        call(q, k[:, :, :2], v[:, :, :2], PAGE_TABLE, start, lens)
    with pytest.raises(ValueError, match=r"q heads \(6\) must be a multiple of KV heads \(4\)"):
        call(q[:, :, :6], k, v, PAGE_TABLE, start, lens)
    with pytest.raises(ValueError, match=r"page_table must be \[batch=3, pages\]"):
        call(q, k, v, PAGE_TABLE[0], start, lens)
    with pytest.raises(ValueError, match=r"q_lens must have shape \(3,\)"):
        call(q, k, v, PAGE_TABLE, start, lens[:2])
    with pytest.raises(ValueError, match=r"value_dim \(8\) applies to MLA"):
        call(q, k, v, PAGE_TABLE, start, lens, value_dim=8)
    with pytest.raises(ValueError, match="tp_axis 'x' is not an axis"):
        call(q, k, v, PAGE_TABLE, start, lens, tp_axis="x")
    mla = cache_params("mla", "bfloat16")
    q, k, _ = inputs(mla)
    q, k = q[:, :T], k[:, :T]
    with pytest.raises(ValueError, match=r"value_dim must be in \[1, 24\] for an MLA cache, got None"):
        paged_attention(allocate_buffer(mla, mesh, 2), 0, q, k, None, PAGE_TABLE, start, lens, mesh=mesh)


@pytest.mark.parametrize(("kind", "dtype"), [("mha", "float8_e4m3fn"), ("mla", "bfloat16")])
def test_mesh_defaults_to_the_caches(kind, dtype):
    """Without `mesh=`, eagerly and inside a donating jit, the result is bit-identical to passing it."""
    params = cache_params(kind, dtype)
    value_dim = MLA_VALUE_DIM if params.is_mla else None
    q, k, v = inputs(params)
    runs = []
    for step in (
        attention_step(params, 2),
        jax.jit(functools.partial(paged_attention, softmax_scale=SCALE, value_dim=value_dim), donate_argnums=0),
        functools.partial(paged_attention, softmax_scale=SCALE, value_dim=value_dim),
    ):
        out, cache = run_both_calls(step, allocate_buffer(params, tp_mesh(2), NUM_PAGES), q, k, v)
        assert cache.mesh.shape == {"tp": 2}
        runs.append((np.asarray(out), as_bytes(cache.values)))
    chex.assert_trees_all_equal(runs[0], runs[1])
    chex.assert_trees_all_equal(runs[0], runs[2])


@pytest.mark.parametrize(
    ("kv_heads", "head_dim", "n_heads", "tokens", "dtype", "mla"),
    [
        (8, 128, 32, 1, "bfloat16", False),  # GQA decode
        (8, 128, 32, 24, "float8_e4m3fn", False),  # ragged prefill, FP8 with scales
        (1, 576, 16, 3, "bfloat16", True),  # DeepSeek-style latent: 512 + 64 RoPE dims
    ],
)
def test_pallas_kernel_lowers_for_gpu(kv_heads, head_dim, n_heads, tokens, dtype, mla):
    """Without a GPU, lower the kernel for CUDA (JAX cross-platform lowering): Pallas' Triton lowering must
    accept it (power-of-two blocks, >= 16 matmul rows) and emit one Triton kernel. Compiling it and its speed
    need a GPU (bench/attention.py)."""
    from jaxkv.attention import pallas

    quant = None if dtype == "bfloat16" else KVCacheQuantConfig(granularity=64)
    params = KVCacheParams(dtype, kv_heads, head_dim, 2, 16, is_mla=mla, quant=quant)
    shape = (33, params.kv_dim, 2, 16, kv_heads)
    values = jax.ShapeDtypeStruct((*shape, head_dim), params.dtype)
    scales = None if quant is None else jax.ShapeDtypeStruct((*shape, head_dim // 64), jnp.float32)
    q = jax.ShapeDtypeStruct((3, tokens, n_heads, head_dim), jnp.bfloat16)
    table, ints = jax.ShapeDtypeStruct((3, 6), jnp.int32), jax.ShapeDtypeStruct((3,), jnp.int32)

    def attend(values, scales, q, table, start, lens):
        cache = KVCacheBuffer.tree_unflatten(mla, (values, scales))
        dv = 512 if mla else head_dim
        return pallas.attend(cache, 0, q, table, start, lens, softmax_scale=0.1, value_dim=dv, backend="gpu")

    lowered = jax.jit(attend).trace(values, scales, q, table, ints, ints).lower(lowering_platforms=("cuda",))
    assert lowered.as_text().count("__gpu$xla.gpu.triton") == 1


def test_pallas_rejects_shapes_it_cannot_load():
    from jaxkv.attention import pallas

    params = KVCacheParams("bfloat16", 4, 16, 2, 6)  # 6-token pages
    cache = allocate_buffer(params, tp_mesh(1), 4)
    q = jnp.zeros((1, 1, 8, 16), jnp.bfloat16)
    ints = jnp.zeros((1,), jnp.int32)
    with pytest.raises(ValueError, match="impl='pallas' needs page_size to be a power of two, got 6"):
        pallas.attend(
            cache, 0, q, jnp.zeros((1, 2), jnp.int32), ints, ints, softmax_scale=1.0, value_dim=16, backend="interpret"
        )


@pytest.mark.parametrize(
    ("kind", "dtype", "tp"),
    [("mha", "bfloat16", 1), ("mha", "int8", 2), ("mla", "float8_e4m3fn", 2), ("mla", "bfloat16", 1)],
)
def test_tpu_kernel_matches_dense_reference_in_tpu_interpret_mode(kind, dtype, tp, monkeypatch, deadline):
    """The TPU variant (table as scalar prefetch, each page's blocks DMA'd from HBM into VMEM, double-buffered)
    run in Pallas' TPU interpret mode, which simulates its DMAs (landing as soon as they start: a buffer
    overwritten in use shows), semaphores and VMEM buffers on CPU; garbage (NaN) in unwritten slots included."""
    from jaxkv.attention import pallas

    monkeypatch.setattr(pallas, "backend_for", lambda platform: "tpu_interpret")
    params = cache_params(kind, dtype)
    value_dim = MLA_VALUE_DIM if params.is_mla else None
    step = functools.partial(paged_attention, mesh=tp_mesh(tp), softmax_scale=SCALE, value_dim=value_dim, impl="pallas")
    garbage, _, _ = random_buffer(params, tp, NUM_PAGES, seed=1)
    q, k, v = inputs(params)
    out, _ = run_both_calls(jax.jit(step, donate_argnums=0), garbage, q, k, v)
    out = np.asarray(out)
    kq, vq = fake_quant(k, params), None if v is None else fake_quant(v, params)
    tol = {"bfloat16": 1e-5, "float8_e4m3fn": 1e-4, "int8": 1e-4}[dtype]
    for b, (start, n) in enumerate(zip(PREFIX, NEW, strict=True)):
        end = start + n
        want = dense_attention(q[b, start:end], kq[b, :end], None if v is None else vq[b, :end], MLA_VALUE_DIM)
        np.testing.assert_allclose(out[b, :n], want, atol=tol, rtol=tol, err_msg=f"sequence {b}")


@pytest.mark.parametrize(
    ("kind", "dtype", "tp"), [("mha", "bfloat16", 2), ("mha", "int8", 1), ("mla", "float8_e4m3fn", 2)]
)
def test_native_token_write_is_the_word_scatter_bit_for_bit(kind, dtype, tp, monkeypatch):
    """On CPU the K/V write goes through the native in-place kernel; the portable word scatter (what GPUs/TPUs
    and a CPU without the library run) writes exactly the same bytes, NaN garbage around them untouched."""
    from jaxkv import _native as native

    if not native.available():
        pytest.skip("native CPU kernels unavailable")
    params = cache_params(kind, dtype)
    value_dim = MLA_VALUE_DIM if params.is_mla else None
    q, k, v = inputs(params)
    runs = []
    for available in (True, False):
        monkeypatch.setattr(native, "available", lambda available=available: available)
        step = functools.partial(paged_attention, mesh=tp_mesh(tp), softmax_scale=SCALE, value_dim=value_dim)
        garbage, _, _ = random_buffer(params, tp, NUM_PAGES, seed=1)
        jitted = jax.jit(step, donate_argnums=0)
        args = (LAYER, q[:, :T], k[:, :T], None if v is None else v[:, :T], PAGE_TABLE, PREFIX, NEW)
        hlo = jitted.lower(garbage, *args).as_text()
        assert ("jaxkv_token_scatter" in hlo) == available  # the path under test is the one that ran
        out, cache = run_both_calls(jitted, garbage, q, k, v)
        scales = None if cache.scales is None else as_bytes(host_copies(cache.scales))
        runs.append((as_bytes(host_copies(cache.values)), scales, as_bytes(out)))
    chex.assert_trees_all_equal(runs[0], runs[1])


@pytest.mark.parametrize(("dtype", "backend"), [("bfloat16", "interpret"), ("float8_e4m3fn", "tpu_interpret")])
def test_pallas_loads_a_value_dim_that_is_not_a_power_of_two(dtype, backend, monkeypatch):
    """The demo's MLA latent is 96 + 32 wide with value_dim 96: the kernel loads the values as 64 + 32 and matches
    the XLA path (issue 24 item 1; it used to refuse value_dim 96)."""
    from jaxkv.attention import pallas

    monkeypatch.setattr(pallas, "backend_for", lambda platform: backend)
    quant = None if dtype == "bfloat16" else KVCacheQuantConfig(granularity=4)
    params = KVCacheParams(dtype, 1, 24, LAYERS, PAGE_SIZE, is_mla=True, quant=quant)  # latent 12 + rope 12
    q, k, _ = inputs(params)
    outs = []
    for impl in ("xla", "pallas"):
        step = functools.partial(paged_attention, mesh=tp_mesh(1), softmax_scale=SCALE, value_dim=12, impl=impl)
        out, _ = run_both_calls(jax.jit(step), allocate_buffer(params, tp_mesh(1), NUM_PAGES), q, k, None)
        outs.append(np.asarray(out))
    chex.assert_shape(outs[1], (3, T, N_HEADS["mla"], 12))
    valid = np.arange(T)[None, :] < NEW[:, None]
    np.testing.assert_allclose(outs[1][valid], outs[0][valid], rtol=2e-6, atol=2e-6)


def test_pallas_kernel_with_value_dim_96_lowers_for_gpu():
    """value_dim 96 (the demo's MLA) lowers for Triton: every loaded and stored block a power of two."""
    from jaxkv.attention import pallas

    values = jax.ShapeDtypeStruct((33, 1, 2, 16, 1, 128), jnp.bfloat16)
    q = jax.ShapeDtypeStruct((2, 3, 16, 128), jnp.bfloat16)
    table, ints = jax.ShapeDtypeStruct((2, 4), jnp.int32), jax.ShapeDtypeStruct((2,), jnp.int32)

    def attend(values, q, table, start, lens):
        cache = KVCacheBuffer.tree_unflatten(True, (values, None))
        return pallas.attend(cache, 0, q, table, start, lens, softmax_scale=0.1, value_dim=96, backend="gpu")

    lowered = jax.jit(attend).trace(values, q, table, ints, ints).lower(lowering_platforms=("cuda",))
    assert lowered.as_text().count("__gpu$xla.gpu.triton") == 1
    assert lowered.out_info.shape == (2, 3, 16, 96)


def test_pallas_names_a_scale_group_that_straddles_pieces():
    from jaxkv.attention import pallas

    assert pallas.unsupported(page_size=16, head_dim=128, groups=4, value_dim=96, granularity=32) is None
    problem = pallas.unsupported(page_size=16, head_dim=128, groups=4, value_dim=96, granularity=64)
    assert problem == (
        "impl='pallas' loads value_dim 96 in power-of-two pieces (the smallest 32); the scale granularity (64) "
        "must divide it, but 32 % 64 = 32"
    )
    assert pallas.unsupported(page_size=16, head_dim=128, groups=3, value_dim=96, granularity=None) == (
        "impl='pallas' needs query heads per KV head to be a power of two, got 3"
    )


def test_rejects_out_of_range_values_known_at_the_call():
    """Concrete (not traced) arguments are range-checked before anything runs: a bad layer, page id, start
    position, token count or a donated cache is a ValueError naming it (issue 24 item 5: they were silent or
    lost the cache)."""
    params = cache_params("mha", "bfloat16")
    mesh = tp_mesh(1)
    cache = allocate_buffer(params, mesh, NUM_PAGES)
    before = as_bytes(np.array(cache.values))  # a copy: a numpy view of the cache would disable donation
    q, k, v = (x[:, :T] for x in inputs(params))
    start, lens = np.zeros(3, np.int32), NEW
    call = functools.partial(paged_attention, cache, mesh=mesh, softmax_scale=SCALE)
    for layer in (LAYERS, -1):
        with pytest.raises(ValueError, match=rf"layer \({layer}\) must be in \[0, {LAYERS}\)"):
            call(layer, q, k, v, PAGE_TABLE, start, lens)
    with pytest.raises(ValueError, match=r"layer must be an int, got 0.5"):
        call(0.5, q, k, v, PAGE_TABLE, start, lens)
    table = PAGE_TABLE.copy()
    table[1, 1] = 99
    with pytest.raises(ValueError, match=rf"page_table\[1, 1\] is 99, outside the cache's pages \[0, {NUM_PAGES}\)"):
        call(0, q, k, v, table, start, lens)
    with pytest.raises(ValueError, match=r"start_pos\[2\] is -4; positions start at 0"):
        call(0, q, k, v, PAGE_TABLE, np.array([0, 0, -4], np.int32), lens)
    with pytest.raises(ValueError, match=rf"q_lens\[0\] is 9, outside \[0, {T}\]"):
        call(0, q, k, v, PAGE_TABLE, start, np.array([9, 1, 1], np.int32))
    with pytest.raises(ValueError, match=r"sequence 1 writes positions up to start_pos \+ q_lens = 12 \+ 5 = 17, but"):
        call(0, q, k, v, PAGE_TABLE, np.array([0, 12, 0], np.int32), np.array([1, 5, 1], np.int32))
    chex.assert_trees_all_equal(as_bytes(np.array(cache.values)), before)  # nothing ran

    donate = jax.jit(functools.partial(paged_attention, mesh=mesh, softmax_scale=SCALE), donate_argnums=0)
    _, new_cache = donate(cache, 0, q, k, v, PAGE_TABLE, start, lens)
    assert cache.values.is_deleted()
    with pytest.raises(ValueError, match="cache has been donated"):
        paged_attention(cache, 0, q, k, v, PAGE_TABLE, start, lens, mesh=mesh)
    assert not new_cache.values.is_deleted()


@pytest.mark.parametrize("native_kernel", [True, False])
def test_a_traced_layer_out_of_range_writes_nothing_on_every_path(native_kernel, monkeypatch):
    """A traced layer cannot be checked at the call: on both kernel paths it writes nothing and the cache stays
    usable (the native kernel used to fail the program and lose the cache; the word scatter wrote layer 1 for
    -1)."""
    from jaxkv import _native as native

    if native_kernel and not native.available():
        pytest.skip("native CPU kernels unavailable")
    monkeypatch.setattr(native, "available", lambda: native_kernel)
    params = cache_params("mha", "bfloat16")
    garbage, values0, _ = random_buffer(params, 1, NUM_PAGES, seed=1)
    q, k, v = (x[:, :T] for x in inputs(params))
    step = jax.jit(functools.partial(paged_attention, mesh=tp_mesh(1), softmax_scale=SCALE), donate_argnums=0)
    cache = garbage
    for layer in (LAYERS, -1):
        _, cache = step(cache, jnp.int32(layer), q, k, v, PAGE_TABLE, np.zeros(3, np.int32), NEW)
        chex.assert_trees_all_equal(as_bytes(np.asarray(cache.values)), as_bytes(values0))


@pytest.mark.parametrize("impl", ["xla", "pallas"])
@pytest.mark.parametrize("kind", ["mha", "mla"])
def test_default_softmax_scale_is_one_over_sqrt_head_dim(kind, impl):
    """Without softmax_scale the scores are scaled by 1/sqrt(head_dim) (MLA: of the latent row it attends
    with), as the dense reference computes it (issue 24 item 6(d): every other test passes the scale)."""
    params = cache_params(kind, "bfloat16")
    value_dim = MLA_VALUE_DIM if params.is_mla else None
    step = jax.jit(functools.partial(paged_attention, mesh=tp_mesh(1), value_dim=value_dim, impl=impl))
    q, k, v = inputs(params)
    start, lens = np.zeros(3, np.int32), NEW
    out, _ = step(allocate_buffer(params, tp_mesh(1), NUM_PAGES), 0, q[:, :T], k[:, :T],
                  None if v is None else v[:, :T], PAGE_TABLE, start, lens)  # fmt: skip
    out = np.asarray(out)
    kq, vq = fake_quant(k, params), None if v is None else fake_quant(v, params)
    global SCALE
    saved, SCALE = SCALE, 1 / np.sqrt(params.head_dim)
    try:
        for b, n in enumerate(NEW):
            want = dense_attention(q[b, :n], kq[b, :n], None if v is None else vq[b, :n], MLA_VALUE_DIM)
            np.testing.assert_allclose(out[b, :n], want, atol=1e-5, rtol=1e-5, err_msg=f"sequence {b}")
    finally:
        SCALE = saved


@pytest.mark.parametrize("native_kernel", [True, False])
def test_checked_mode_reports_traced_values_out_of_range_and_writes_nothing(native_kernel, monkeypatch):
    """checked=True checks traced values with checkify: the error names the argument and its range, nothing is
    written, and the donated cache comes back as it was (issue 24 item 5)."""
    from jax.experimental import checkify

    from jaxkv import _native as native

    if native_kernel and not native.available():
        pytest.skip("native CPU kernels unavailable")
    monkeypatch.setattr(native, "available", lambda: native_kernel)
    params = cache_params("mha", "bfloat16")
    q, k, v = (x[:, :T] for x in inputs(params))
    step = functools.partial(paged_attention, mesh=tp_mesh(1), softmax_scale=SCALE, checked=True)
    checked = jax.jit(checkify.checkify(step), donate_argnums=0)
    start = np.zeros(3, np.int32)
    bad_table = PAGE_TABLE.copy()
    bad_table[1, 1] = 99
    cases = [
        ((LAYERS, PAGE_TABLE, start, NEW), f"layer ({LAYERS}) must be in [0, {LAYERS})"),
        ((0, bad_table, start, NEW), f"page_table holds 99, outside the cache's pages [0, {NUM_PAGES})"),
        ((0, PAGE_TABLE, np.array([0, -4, 0], np.int32), NEW), "start_pos holds -4; positions start at 0"),
        ((0, PAGE_TABLE, start, np.array([1, 9, 1], np.int32)), f"q_lens holds 9, outside [0, {T}]"),
    ]
    garbage, values0, _ = random_buffer(params, 1, NUM_PAGES, seed=1)
    cache = garbage
    for (layer, table, starts, lens), message in cases:
        err, (_, cache) = checked(cache, jnp.int32(layer), q, k, v, table, starts, lens)
        assert err.get() is not None and message in err.get(), err.get()
        chex.assert_trees_all_equal(as_bytes(np.array(cache.values)), as_bytes(values0))
    err, (_, cache) = checked(cache, jnp.int32(0), q, k, v, PAGE_TABLE, start, NEW)
    assert err.get() is None
    assert not np.array_equal(as_bytes(np.array(cache.values)), as_bytes(values0))  # in range: written
    with pytest.raises(ValueError, match="checkify"):  # a checked call needs checkify.checkify around it
        jax.jit(step)(cache, jnp.int32(0), q, k, v, PAGE_TABLE, start, NEW)
