"""Paged attention on jaxkv's cache layout: write the new tokens' K/V into their pages, then attend through the page table.

One function serves prefill, chunked prefill and decode: every sequence of a
ragged batch brings `q_lens[b]` new tokens (padded to `T`) at positions
`[start_pos[b], start_pos[b] + q_lens[b])`. For one layer it

1. writes their K/V (MLA: their latent) into page `page_table[b, pos // page_size]`,
   slot `pos % page_size`, quantizing on the way for FP8/int8 caches;
   padded tokens are dropped, never written (not even to the null page);
2. reads every slot the page table names back from the cache, dequantized,
   and attends causally: the query at `pos` sees positions `[0, pos]`.

Reading the new tokens back from the cache, instead of using the fresh K/V,
means a prompt prefilled at once and the same prompt prefilled in chunks see
the same (rounded) keys. Slots past the end of a sequence (a page's unused
tail, the null page behind table padding) may hold anything, NaN bit patterns
included: they are masked out of the scores *and* zeroed in the values, since
`0 * NaN` would otherwise poison `p @ v`.

Sharding: `paged_attention` runs `paged_attention_shard` under `jax.shard_map`.
MHA/GQA shards hold `n_kv_heads / tp` KV heads and the matching
`n_heads / tp` query heads (query head j uses KV head j // group); an MLA
latent cache is replicated and each shard attends with its `n_heads / tp`
query heads (every shard writes the same latent into its replica).

Portable XLA throughout (gather, einsum, scatter), float32 scores and softmax.
`impl="pallas"` replaces the gather and `_attend` by a kernel that reads the
pages where they lie (`jaxkv.attention.pallas`); the write is the same.
"""

from __future__ import annotations

import math

import jax
import jax.core
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from jax.typing import DTypeLike

from jaxkv import _native
from jaxkv.layout.buffer import HEADS_AXIS, KVCacheBuffer
from jaxkv.layout.pages import word_dtype

_F32 = jnp.float32
_HIGHEST = lax.Precision.HIGHEST  # full float32 matmuls: no TF32 on GPUs, same numbers on every backend


# -- quantization -------------------------------------------------------------


def _max_value(dtype) -> float:
    """Largest finite magnitude a quantized value may take (symmetric: int8 uses ±127)."""
    dtype = jnp.dtype(dtype)
    if jnp.issubdtype(dtype, jnp.integer):
        return float(jnp.iinfo(dtype).max)
    return float(jnp.finfo(dtype).max)


def _saturate(x: jax.Array, dtype) -> jax.Array:
    """Cast float32 `x` to `dtype`, rounding to nearest and clipping to the finite range.

    float8_e4m3fn has no infinity: an unclipped overflow would become NaN.
    """
    dtype = jnp.dtype(dtype)
    limit = _max_value(dtype)
    if jnp.issubdtype(dtype, jnp.integer):
        x = jnp.round(x)
    return jnp.clip(x, -limit, limit).astype(dtype)


def _pow2_ceil(x: jax.Array) -> jax.Array:
    """The smallest power of two >= x (x > 0): float8_e8m0fnu stores exponents only,
    and rounding a scale down would push values past the dtype's range."""
    mantissa, exponent = jnp.frexp(x)  # x = mantissa * 2**exponent, mantissa in [0.5, 1)
    return jnp.ldexp(jnp.ones_like(x), jnp.where(mantissa == 0.5, exponent - 1, exponent))


def quantize(x: jax.Array, dtype: DTypeLike, scale_dtype: DTypeLike, granularity: int) -> tuple[jax.Array, jax.Array]:
    """Quantize `x` [..., D] in groups of `granularity` consecutive elements.

    scale = amax(|group|) / max(dtype), stored in `scale_dtype`: an all-zero
    group gets scale 1, and scales are clipped to the normal range of
    `scale_dtype` (float8_e8m0fnu: rounded up to a power of two). The values
    are divided by the *stored* scale, so `dequantize` inverts exactly what was
    kept. Returns (values [..., D] dtype, scales [..., D // granularity] scale_dtype).
    """
    x = x.astype(_F32)
    groups = x.reshape(*x.shape[:-1], x.shape[-1] // granularity, granularity)
    scale = jnp.max(jnp.abs(groups), axis=-1) / _max_value(dtype)
    scale = jnp.where(scale > 0, scale, 1.0)
    # Keep the scale a normal number of its dtype: a float16 scale of a tiny group would underflow to 0.
    limits = jnp.finfo(scale_dtype)
    scale = jnp.clip(scale, float(limits.tiny), float(limits.max))
    if jnp.dtype(scale_dtype) == jnp.float8_e8m0fnu:
        scale = _pow2_ceil(scale)
    stored = scale.astype(scale_dtype)
    return _saturate(groups / stored.astype(_F32)[..., None], dtype).reshape(x.shape), stored


def dequantize(values: jax.Array, scales: jax.Array) -> jax.Array:
    """float32 `values * scale`, the inverse of `quantize` (scales: [..., D // granularity])."""
    n = scales.shape[-1]
    groups = values.astype(_F32).reshape(*values.shape[:-1], n, values.shape[-1] // n)
    return (groups * scales.astype(_F32)[..., None]).reshape(values.shape)


# -- cache writes and reads (one shard) ------------------------------------------


def _set_tokens(array: jax.Array, pages, layer, slots, tokens: jax.Array) -> jax.Array:
    """`array` [pages, kv, layers, page_size, heads, d] with tokens[i] ([kv, heads, d]) at
    (pages[i], :, layer, slots[i]). Page ids past the end are dropped.

    Scatters words, not floats: XLA:CPU computes a bfloat16/float8 scatter
    through float32, which would rewrite NaN payloads in every other page. On
    XLA:CPU with jaxkv's native library the bytes go through a native kernel
    instead, in place in a donated cache: XLA:CPU's word scatter copies the
    whole cache twice (the bitcasts), so a decode step cost O(cache).
    """

    def words(array, pages, layer, slots, tokens):
        word = word_dtype(array.dtype)
        w = lax.bitcast_convert_type(array, word)
        w = w.at[pages, :, layer, slots].set(lax.bitcast_convert_type(tokens, word), mode="drop")
        return lax.bitcast_convert_type(w, array.dtype)

    def native(array, pages, layer, slots, tokens):
        n, kv = tokens.shape[:2]
        raw = lax.bitcast_convert_type(tokens, jnp.uint8).reshape(n, kv, -1)  # O(tokens)
        call = jax.ffi.ffi_call(
            "jaxkv_token_scatter", jax.ShapeDtypeStruct(array.shape, array.dtype), input_output_aliases={0: 0}
        )
        return call(
            array, pages.astype(jnp.int32), slots.astype(jnp.int32), jnp.reshape(layer, (1,)).astype(jnp.int32), raw
        )

    # A (traced) layer outside [0, layers) writes nothing on every path: the word scatter would wrap a negative
    # layer and the native kernel would fail the whole program (and lose the donated cache). Dropping every page
    # makes both paths the same; the clipped layer keeps the native kernel's range check satisfied.
    layers = array.shape[2]
    layer = jnp.asarray(layer, jnp.int32)
    pages = jnp.where((layer >= 0) & (layer < layers), pages, array.shape[0])
    args = (array, pages, jnp.clip(layer, 0, layers - 1), slots, tokens)
    if not _native.available():
        return words(*args)
    return lax.platform_dependent(*args, cpu=native, default=words)


def _write(cache: KVCacheBuffer, layer, new: jax.Array, page_table, start_pos, q_lens) -> KVCacheBuffer:
    """Store `new` [B, T, kv, heads, d] at the positions its sequences own; padding is dropped."""
    values, scales = cache.values, cache.scales
    num_pages, page_size = values.shape[0], values.shape[3]
    b, t = new.shape[:2]
    pos = start_pos[:, None] + jnp.arange(t)  # [B, T]
    blocks = jnp.minimum(pos // page_size, page_table.shape[1] - 1)  # padding may run past the table
    pages = jnp.take_along_axis(page_table, blocks, axis=1)
    pages = jnp.where(jnp.arange(t) < q_lens[:, None], pages, num_pages)  # padding: past the end, dropped
    pages, slots = pages.reshape(-1), (pos % page_size).reshape(-1)
    new = new.reshape(b * t, *new.shape[2:])
    if scales is None:
        # bf16/f16/f32 round; an unscaled int8/fp8 cache saturates rather than wrap or turn NaN.
        stored = _saturate(new.astype(_F32), values.dtype) if values.dtype.itemsize == 1 else new.astype(values.dtype)
        return _with_arrays(cache, _set_tokens(values, pages, layer, slots, stored), None)
    granularity = values.shape[-1] // scales.shape[-1]
    stored, stored_scales = quantize(new, values.dtype, scales.dtype, granularity)
    return _with_arrays(
        cache,
        _set_tokens(values, pages, layer, slots, stored),
        _set_tokens(scales, pages, layer, slots, stored_scales),
    )


def _with_arrays(cache: KVCacheBuffer, values, scales) -> KVCacheBuffer:
    # The constructor validates shardings, which traced arrays do not carry.
    return KVCacheBuffer.tree_unflatten(cache.replicates_kv_across_tp, (values, scales))


def _read(cache: KVCacheBuffer, layer, page_table) -> jax.Array:
    """Every slot the page table names, dequantized: [B, kv, pages * page_size, heads, d] float32."""
    x = cache.values[page_table, :, layer]  # [B, pages, kv, page_size, heads, d]
    x = x.astype(_F32) if cache.scales is None else dequantize(x, cache.scales[page_table, :, layer])
    b, n, kv, page_size, heads, d = x.shape
    return jnp.moveaxis(x, 2, 1).reshape(b, kv, n * page_size, heads, d)


def _attend(q, keys, vals, pos, seq_end, softmax_scale: float) -> jax.Array:
    """Causal attention over cache slots. q [B, T, H, d]; keys [B, S, h, d]; vals [B, S, h, dv];
    pos [B, T] query positions; seq_end [B] = slots a sequence has written. Returns [B, T, H, dv] float32."""
    b, t, n_heads, d = q.shape
    s, h = keys.shape[1:3]
    slot = jnp.arange(s)
    live = slot[None, :] < seq_end[:, None]  # [B, S]
    vals = jnp.where(live[:, :, None, None], vals, 0.0)
    mask = live[:, None, :] & (slot[None, None, :] <= pos[:, :, None])  # [B, T, S]
    q = q.astype(_F32).reshape(b, t, h, n_heads // h, d)
    scores = jnp.einsum("bthgd,bshd->bhgts", q, keys, precision=_HIGHEST) * softmax_scale
    scores = jnp.where(mask[:, None, None], scores, -jnp.inf)
    top = jnp.max(scores, axis=-1, keepdims=True)
    top = jnp.where(jnp.isfinite(top), top, 0.0)  # a padded query of an empty sequence sees no key
    p = jnp.exp(scores - top)
    total = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(total > 0, total, 1.0)
    out = jnp.einsum("bhgts,bshd->bthgd", p, vals, precision=_HIGHEST)
    return out.reshape(b, t, n_heads, -1)


def paged_attention_shard(
    cache: KVCacheBuffer,  # this shard's values/scales
    layer: int | jax.Array,  # int or traced int32 scalar
    q: jax.Array,  # [B, T, query heads of this shard, head_dim]
    k: jax.Array,  # [B, T, KV heads of this shard, head_dim]; MLA: [B, T, latent]
    v: jax.Array | None,  # like k; None for MLA
    page_table: jax.Array,  # [B, pages] int32, the same on every shard
    start_pos: jax.Array,  # [B] int32
    q_lens: jax.Array,  # [B] int32
    *,
    softmax_scale: float | None = None,
    value_dim: int | None = None,
    impl: str = "auto",
) -> tuple[jax.Array, KVCacheBuffer]:
    """`paged_attention` on one shard: local arrays, no collectives.

    For models that already run inside `jax.shard_map`: `cache` holds this
    shard's values/scales, `q` its query heads, `k`/`v` its KV heads (MLA: the
    full latent, `v=None`). Returns (out [B, T, heads, dv] in q's dtype, new cache).
    `impl`: as for `paged_attention`.
    """
    impl = resolve_impl(impl)
    page_table = jnp.asarray(page_table, jnp.int32)
    start_pos, q_lens = jnp.asarray(start_pos, jnp.int32), jnp.asarray(q_lens, jnp.int32)
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(q.shape[-1])
    new = k[:, :, None] if v is None else jnp.stack([k, v], axis=2)  # [B, T, kv, heads, d]
    cache = _write(cache, layer, new, page_table, start_pos, q_lens)
    if impl == "pallas":
        from jaxkv.attention import pallas

        dv = value_dim if v is None else q.shape[-1]
        out = pallas.attend(
            cache, layer, q, page_table, start_pos, q_lens,
            softmax_scale=float(softmax_scale), value_dim=dv, backend=pallas.backend_for(jax.default_backend()),
        )  # fmt: skip
        return out.astype(q.dtype), cache
    kv = _read(cache, layer, page_table)
    keys = kv[:, 0]
    vals = keys[..., :value_dim] if v is None else kv[:, 1]
    pos = start_pos[:, None] + jnp.arange(q.shape[1])
    out = _attend(q, keys, vals, pos, start_pos + q_lens, softmax_scale)
    return out.astype(q.dtype), cache


# -- the sharded entry point ------------------------------------------------------

IMPLS = ("auto", "xla", "pallas")


def resolve_impl(impl: str) -> str:
    """ "xla" or "pallas" for `impl`; "auto" is "xla" (see `paged_attention`)."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    return "xla" if impl == "auto" else impl


def _check(cache: KVCacheBuffer, q, k, v, page_table, start_pos, q_lens, value_dim, tp: int) -> None:
    """Shape checks, at trace time; raise ValueError naming what disagrees."""
    kv_dim, heads, head_dim = cache.values.shape[1], cache.values.shape[HEADS_AXIS], cache.values.shape[-1]
    if q.ndim != 4 or k.ndim != 4:
        raise ValueError(
            f"q and k must be [batch, tokens, heads, head_dim], got shapes {tuple(q.shape)} and {tuple(k.shape)}"
        )
    b, t, n_heads, _ = q.shape
    if k.shape != (b, t, heads, head_dim):
        raise ValueError(
            f"k has shape {tuple(k.shape)}, expected {(b, t, heads, head_dim)} (batch, tokens of q; cache heads, head_dim)"
        )
    if q.shape[-1] != head_dim:
        raise ValueError(f"q head_dim ({q.shape[-1]}) must equal the cache head_dim ({head_dim})")
    if kv_dim == 2:
        if v is None or v.shape != k.shape:
            raise ValueError(
                f"v must have k's shape {tuple(k.shape)} for a K/V cache, got {None if v is None else tuple(v.shape)}"
            )
        if value_dim is not None:
            raise ValueError(f"value_dim ({value_dim}) applies to MLA latent caches only; this cache has kv_dim 2")
    else:
        if v is not None:
            raise ValueError("v must be None for an MLA cache (kv_dim 1): the value is read from the latent")
        if value_dim is None or not 0 < value_dim <= head_dim:
            raise ValueError(f"value_dim must be in [1, {head_dim}] for an MLA cache, got {value_dim!r}")
    if n_heads % heads:
        raise ValueError(
            f"q heads ({n_heads}) must be a multiple of KV heads ({heads}), but {n_heads} % {heads} = {n_heads % heads}"
        )
    if n_heads % tp:
        raise ValueError(
            f"q heads ({n_heads}) must be divisible by the TP degree ({tp}), but {n_heads} % {tp} = {n_heads % tp}"
        )
    if len(jnp.shape(page_table)) != 2 or jnp.shape(page_table)[0] != b:
        raise ValueError(f"page_table must be [batch={b}, pages], got shape {jnp.shape(page_table)}")
    for name, x in (("start_pos", start_pos), ("q_lens", q_lens)):
        if jnp.shape(x) != (b,):
            raise ValueError(f"{name} must have shape ({b},) (one per sequence), got {jnp.shape(x)}")


def _concrete(x) -> np.ndarray | None:
    """`x` as a host array when its value is known now (not a tracer), else None."""
    if isinstance(x, jax.core.Tracer):
        return None
    return np.asarray(x)


def _check_values(cache: KVCacheBuffer, layer, page_table, start_pos, q_lens, *, tokens: int) -> None:
    """Range checks of the arguments whose values are known at the call (not traced); ValueError naming the
    argument, the value and the range. Inside `jit` the traced ones cannot be checked: a traced layer outside
    the cache writes nothing (every path), other traced values out of range are clamped or dropped."""
    arrays = [cache.values] + ([] if cache.scales is None else [cache.scales])
    if any(not isinstance(a, jax.core.Tracer) and a.is_deleted() for a in arrays):
        # Passing a deleted (donated) array on to a compiled donating program crashes some jaxlib versions
        # (jax 0.10.2 segfaults): refuse it here.
        raise ValueError(
            "cache has been donated (its arrays are deleted); pass the cache the last call that donated it returned"
        )
    num_pages, num_layers, page_size = cache.values.shape[0], cache.values.shape[2], cache.values.shape[3]
    layer_value = _concrete(layer)
    if layer_value is not None:
        if layer_value.shape != () or not np.issubdtype(layer_value.dtype, np.integer):
            raise ValueError(f"layer must be an int, got {layer!r}")
        if not 0 <= int(layer_value) < num_layers:
            raise ValueError(
                f"layer ({int(layer_value)}) must be in [0, {num_layers}): the cache has {num_layers} layers"
            )
    table = _concrete(page_table)
    if table is not None and table.size:
        bad = (table < 0) | (table >= num_pages)
        if bad.any():
            b, p = (int(i) for i in np.argwhere(bad)[0])
            raise ValueError(f"page_table[{b}, {p}] is {int(table[b, p])}, outside the cache's pages [0, {num_pages})")
    starts, lens = _concrete(start_pos), _concrete(q_lens)
    if starts is not None and (starts < 0).any():
        b = int(np.argmax(starts < 0))
        raise ValueError(f"start_pos[{b}] is {int(starts[b])}; positions start at 0")
    if lens is not None and ((lens < 0) | (lens > tokens)).any():
        b = int(np.argmax((lens < 0) | (lens > tokens)))
        raise ValueError(f"q_lens[{b}] is {int(lens[b])}, outside [0, {tokens}] (T, the tokens q brings)")
    if starts is not None and lens is not None:
        width = jnp.shape(page_table)[1]
        ends = starts.astype(np.int64) + lens
        if (ends > width * page_size).any():
            b = int(np.argmax(ends > width * page_size))
            raise ValueError(
                f"sequence {b} writes positions up to start_pos + q_lens = {int(starts[b])} + {int(lens[b])} = "
                f"{int(ends[b])}, but its page_table row of {width} pages covers {width} * {page_size} = "
                f"{width * page_size}"
            )


def _checkify_values(cache: KVCacheBuffer, layer, page_table, start_pos, q_lens, *, tokens: int) -> jax.Array:
    """`_check_values`' ranges as `checkify.check`s, for traced values; returns q_lens, all 0 (nothing written)
    when a check fails."""
    from jax.experimental import checkify

    num_pages, num_layers, page_size = cache.values.shape[0], cache.values.shape[2], cache.values.shape[3]
    layer = jnp.asarray(layer, jnp.int32)
    table = jnp.asarray(page_table, jnp.int32)
    starts, lens = jnp.asarray(start_pos, jnp.int32), jnp.asarray(q_lens, jnp.int32)
    width = table.shape[1]

    def first_bad(x, good):  # the first value outside its range (any value when there is none)
        return x.reshape(-1)[jnp.argmin(good.reshape(-1))]

    pages_ok, lens_ok = (table >= 0) & (table < num_pages), (lens >= 0) & (lens <= tokens)
    checks = [
        ((layer >= 0) & (layer < num_layers), f"layer ({{}}) must be in [0, {num_layers})", layer),
        (jnp.all(pages_ok), f"page_table holds {{}}, outside the cache's pages [0, {num_pages})",
         first_bad(table, pages_ok)),
        (jnp.all(starts >= 0), "start_pos holds {}; positions start at 0", jnp.min(starts)),
        (jnp.all(lens_ok), f"q_lens holds {{}}, outside [0, {tokens}]", first_bad(lens, lens_ok)),
        (jnp.all(starts + lens <= width * page_size),
         f"start_pos + q_lens reaches {{}}, past the {width} * {page_size} positions of a page_table row",
         jnp.max(starts + lens)),
    ]  # fmt: skip
    ok = jnp.bool_(True)
    for good, message, value in checks:
        checkify.check(good, message, value)
        ok = ok & good
    return jnp.where(ok, lens, 0)


def _cache_mesh(cache: KVCacheBuffer) -> Mesh | AbstractMesh:
    """The mesh `cache` lives on: its `Mesh`, or, inside `jit`, the abstract mesh of its traced arrays' type."""
    try:
        return cache.mesh
    except AttributeError:  # a tracer has no `.sharding`; its type still names the mesh
        return jax.typeof(cache.values).sharding.mesh


def paged_attention(
    cache: KVCacheBuffer,
    layer: int | jax.Array,
    q: jax.Array,
    k: jax.Array,
    v: jax.Array | None,
    page_table: jax.Array,
    start_pos: jax.Array,
    q_lens: jax.Array,
    *,
    mesh: Mesh | AbstractMesh | None = None,
    tp_axis: str = "tp",
    softmax_scale: float | None = None,
    value_dim: int | None = None,
    impl: str = "auto",
    checked: bool = False,
) -> tuple[jax.Array, KVCacheBuffer]:
    """Write one layer's new K/V into the paged cache and attend through the page table.

    Args:
      cache: the cache, laid out by `allocate_buffer(params, mesh, ...)` on
        `mesh` / `tp_axis`. Call this inside a `jax.jit` that donates it: the
        returned cache then reuses its memory.
      layer: int (or traced int32 scalar) layer index in [0, num_layers).
      q: [B, T, n_heads, head_dim] queries, RoPE applied. MLA: absorbed
        queries `[q_nope @ W_UK | q_rope]`, head_dim = the latent width.
      k, v: [B, T, n_kv_heads, head_dim] new keys/values. MLA: k is the latent
        `[c_kv | k_rope]` [B, T, 1, head_dim] and v is None.
      page_table: [B, pages] int32; page `page_table[b, p]` holds positions
        `[p * page_size, (p + 1) * page_size)` of sequence b. Pad with 0 (the null page).
      start_pos, q_lens: [B] int32; sequence b brings `q_lens[b]` tokens
        (q_lens[b] <= T) at positions `start_pos[b] + i`.
      softmax_scale: defaults to 1/sqrt(head_dim).
      value_dim: MLA only: the value is the first `value_dim` elements of
        the latent (`kv_lora_rank`).
      mesh: the mesh to run on; default: the cache's own (`cache.mesh`, or
        inside `jit` the abstract mesh its traced arrays carry).
      impl: "xla" (gather the pages, then attend: portable XLA), "pallas"
        (`jaxkv.attention.pallas`: a kernel that reads each page where it
        lies through the page table; on CPU in Pallas' interpret mode), or
        "auto": "xla" on every backend until the kernel is measured faster on
        one (bench/attention.py; no GPU/TPU measurement yet).

    Returns:
      (out [B, T, n_heads, head_dim or value_dim] in q's dtype, new cache).
      Rows of padded tokens (i >= q_lens[b]) are unspecified.

    Raises:
      ValueError, at the call, for shapes that disagree and for every argument
      whose value is known there (not traced): a layer outside [0, num_layers),
      a page id outside the cache, a negative start_pos, q_lens outside [0, T],
      tokens past the end of their page_table row, a cache already donated.
      Traced values are not checked by default: a traced layer out of range
      writes nothing (on every kernel path) and its output is unspecified;
      traced page ids out of range are dropped on write and clamped on read.

    checked: also check the traced values, with `jax.experimental.checkify`
      (the same ranges): run the jitted step under `checkify.checkify`, which
      returns the error beside the outputs. A failed check writes nothing, so
      the returned cache is the one passed in. Without `checkify.checkify`
      around it, tracing a checked call fails.
    """
    if mesh is None:
        mesh = _cache_mesh(cache)
        if tp_axis not in mesh.axis_names:
            raise ValueError(
                f"tp_axis {tp_axis!r} is not an axis of the cache's mesh, whose axes are {mesh.axis_names}; "
                f"pass mesh= the cache was allocated on"
            )
    if tp_axis not in mesh.axis_names:
        raise ValueError(f"tp_axis {tp_axis!r} is not an axis of the mesh, whose axes are {mesh.axis_names}")
    tp = mesh.shape[tp_axis]
    impl = resolve_impl(impl)
    _check(cache, q, k, v, page_table, start_pos, q_lens, value_dim, tp)
    _check_values(cache, layer, page_table, start_pos, q_lens, tokens=q.shape[1])
    if checked:
        q_lens = _checkify_values(cache, layer, page_table, start_pos, q_lens, tokens=q.shape[1])
    cache_spec = P() if cache.replicates_kv_across_tp else P(None, None, None, None, tp_axis, None)
    cache_specs = jax.tree.map(lambda _: cache_spec, cache)
    heads = P(None, None, tp_axis, None)
    kv_spec = P() if cache.replicates_kv_across_tp else heads
    scalars = (P(), P(), P(), P())  # layer, page_table, start_pos, q_lens

    def body(cache, layer, page_table, start_pos, q_lens, q, *kv):
        k, v = kv if len(kv) == 2 else (kv[0], None)
        return paged_attention_shard(
            cache, layer, q, k, v, page_table, start_pos, q_lens,
            softmax_scale=softmax_scale, value_dim=value_dim, impl=impl,
        )  # fmt: skip

    kvs = (k,) if v is None else (k, v)
    specs = (cache_specs, *scalars, heads, *(kv_spec for _ in kvs))
    sharded = jax.shard_map(
        body,
        mesh=mesh,
        in_specs=specs,
        out_specs=(heads, cache_specs),
        check_vma=False,
    )
    args = (cache, jnp.asarray(layer, jnp.int32), page_table, start_pos, q_lens, q, *kvs)
    if dict(zip(mesh.axis_names, mesh.axis_types, strict=True))[tp_axis] == AxisType.Explicit:
        # shard_map over Explicit axes takes inputs only as already laid out like in_specs.
        args = jax.tree.map(lambda x, spec: jax.reshard(x, NamedSharding(mesh, spec)), args, specs)
    return sharded(*args)
