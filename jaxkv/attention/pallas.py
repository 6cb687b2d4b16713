"""Paged attention as a Pallas kernel that reads pages where they lie in jaxkv's layout.

The cache is `[num_pages, kv_dim, num_layers, page_size, heads, head_dim]`:
for one (page, K or V, layer) and one KV head the `[page_size, head_dim]`
block is strided by `heads * head_dim` elements. The kernel runs one program
per (sequence, KV head): it walks the sequence's pages through the page
table, loads that block of K (and V) straight from the cache (dequantizing
FP8/int8 with its scales), and keeps a running (online) softmax over the
pages for the query heads of that KV head (GQA: `n_heads / heads` of them,
every query token at once). Nothing is gathered into a dense copy first,
which is what the XLA path (`jaxkv.attention.xla`) does.

The new tokens' K/V are written by the XLA path's scatter (`_write`), then
read back from the cache like every other slot, so both implementations see
the same (rounded) keys. Masking is the XLA path's: slots past the end of a
sequence (a page's tail, the null page behind table padding) may hold any
bits, NaN included; they are masked out of the scores and zeroed in the
values. Scores and softmax in float32.

MLA: one latent head (`kv_dim` 1); the keys are the latent and the values its
first `value_dim` elements. On CPU the kernel runs in Pallas' interpret mode
(correctness, not speed): `paged_attention(..., impl="xla")` is CPU's default.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jaxkv.layout.buffer import KVCacheBuffer

_F32 = jnp.float32


def _kernel(
    # scalars (refs of shape [1] / [B, P])
    layer_ref,
    table_ref,
    start_ref,
    lens_ref,
    # arrays
    q_ref,  # [1, T, G, d]: this sequence's queries for this KV head's G query heads
    values_ref,  # [num_pages, kv, layers, page_size, heads, d]: the whole cache shard, read through the table
    scales_ref,  # like values with ceil(d / granularity) last, or None
    out_ref,  # [1, T, G, dv]
    *,
    softmax_scale: float,
    value_dim: int,
):
    b = pl.program_id(0)
    g = pl.program_id(1)
    layer = layer_ref[0]
    start, n = start_ref[b], lens_ref[b]
    seq_end = start + n  # slots [0, seq_end) of this sequence hold K/V
    page_size, d = values_ref.shape[3], values_ref.shape[5]
    kv_dim = values_ref.shape[1]
    _, t, groups, _ = q_ref.shape
    q = q_ref[0].astype(_F32).reshape(t * groups, d) * softmax_scale  # rows: (token, query head)
    pos = start + lax.broadcasted_iota(jnp.int32, (t, groups), 0).reshape(t * groups)  # each row's position

    def block(page, kv):
        """[page_size, d] float32 of K (kv=0) or V (kv=1) of this KV head in `page`."""
        x = _head_block(values_ref, page, kv, layer, g).astype(_F32)
        if scales_ref is None:
            return x
        s = _head_block(scales_ref, page, kv, layer, g).astype(_F32)  # [page_size, d / granularity]
        n_groups = s.shape[-1]
        return (x.reshape(page_size, n_groups, d // n_groups) * s[:, :, None]).reshape(page_size, d)

    def step(j, carry):
        top, total, acc = carry
        page = table_ref[b, j]
        keys = block(page, 0)
        vals = block(page, 1)[:, :value_dim] if kv_dim == 2 else keys[:, :value_dim]
        slot = j * page_size + lax.broadcasted_iota(jnp.int32, (page_size,), 0)
        live = slot < seq_end
        vals = jnp.where(live[:, None], vals, 0.0)  # 0 * NaN would poison p @ v
        keys = jnp.where(live[:, None], keys, 0.0)
        scores = jnp.dot(q, keys.T, precision=lax.Precision.HIGHEST, preferred_element_type=_F32)
        visible = live[None, :] & (slot[None, :] <= pos[:, None])
        scores = jnp.where(visible, scores, -jnp.inf)
        new_top = jnp.maximum(top, jnp.max(scores, axis=1))
        safe = jnp.where(jnp.isfinite(new_top), new_top, 0.0)  # a row that has seen no slot yet
        p = jnp.exp(scores - safe[:, None])
        rescale = jnp.exp(top - safe)
        total = rescale * total + jnp.sum(p, axis=1)
        acc = rescale[:, None] * acc + jnp.dot(p, vals, precision=lax.Precision.HIGHEST, preferred_element_type=_F32)
        return new_top, total, acc

    rows = t * groups
    init = (jnp.full((rows,), -jnp.inf, _F32), jnp.zeros((rows,), _F32), jnp.zeros((rows, value_dim), _F32))
    pages = (seq_end + page_size - 1) // page_size
    _, total, acc = lax.fori_loop(0, pages, step, init)
    out = acc / jnp.where(total > 0, total, 1.0)[:, None]  # a padded query of an empty sequence: 0
    out_ref[0] = out.reshape(t, groups, value_dim).astype(out_ref.dtype)


def _head_block(ref, page, kv, layer, head):
    """`ref[page, kv, layer, :, head, :]`: one head's `[page_size, d]` block, read in place (slices only:
    a ref of a sharded array takes no integer index)."""
    one = functools.partial(pl.ds, size=1)
    block = ref[one(page), one(kv), one(layer), :, one(head), :]
    return block.reshape(ref.shape[3], ref.shape[5])


@functools.partial(jax.jit, static_argnames=("softmax_scale", "value_dim", "interpret"))
def attend(
    cache: KVCacheBuffer,
    layer,
    q: jax.Array,
    page_table: jax.Array,
    start_pos: jax.Array,
    q_lens: jax.Array,
    *,
    softmax_scale: float,
    value_dim: int,
    interpret: bool,
) -> jax.Array:
    """Attend `q` [B, T, H, d] over one shard's cache through the page table; [B, T, H, value_dim] float32.

    The pages must already hold the new tokens' K/V (`paged_attention_shard` writes them first).
    """
    values, scales = cache.values, cache.scales
    b, t, n_heads, d = q.shape
    heads = values.shape[4]
    groups = n_heads // heads
    q = q.reshape(b, t, heads, groups, d)
    layer = jnp.asarray(layer, jnp.int32).reshape(1)

    def spec_all(x):
        return None if x is None else pl.BlockSpec(x.shape, lambda i, j, n=x.ndim: (0,) * n)

    in_specs = [
        spec_all(layer),
        spec_all(page_table),
        spec_all(start_pos),
        spec_all(q_lens),
        pl.BlockSpec((1, t, None, groups, d), lambda i, j: (i, 0, j, 0, 0)),
        spec_all(values),  # whole: the kernel reads the pages the table names, where they lie
        spec_all(scales),
    ]
    kernel = functools.partial(_kernel, softmax_scale=softmax_scale, value_dim=value_dim)
    if scales is None:
        kernel = _without_scales(kernel)
        in_specs = in_specs[:-1]
    out = pl.pallas_call(
        kernel,
        grid=(b, heads),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((1, t, None, groups, value_dim), lambda i, j: (i, 0, j, 0, 0)),
        out_shape=jax.ShapeDtypeStruct((b, t, heads, groups, value_dim), _F32),
        interpret=interpret,
    )(layer, page_table, start_pos, q_lens, q, values, *(() if scales is None else (scales,)))
    return out.reshape(b, t, n_heads, value_dim)


def _without_scales(kernel):
    """The kernel's signature with the scales ref absent (pallas_call passes no ref for it)."""

    def run(layer_ref, table_ref, start_ref, lens_ref, q_ref, values_ref, out_ref):
        kernel(layer_ref, table_ref, start_ref, lens_ref, q_ref, values_ref, None, out_ref)

    return run
