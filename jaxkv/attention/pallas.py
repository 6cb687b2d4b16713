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
first `value_dim` elements.

Backends (`attend(..., backend=)`): on GPUs a Triton kernel that loads each
block from the cache in global memory (every loaded block a power of two: a
head dim like MLA's 576 goes as 512 + 64, a value dim of 96 as 64 + 32); on TPUs a Mosaic kernel that takes
the page table as scalar prefetch and DMAs each page's blocks from HBM into
VMEM, double-buffered; on CPU Pallas' interpret mode (correctness, not speed), where the TPU
kernel also runs in Pallas' TPU interpret mode for tests. The online softmax
is one function for all of them (`_attend_pages`).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from jaxkv.layout.buffer import KVCacheBuffer
from jaxkv.layout.pages import bucket

_F32 = jnp.float32


def _pieces(width: int) -> tuple[tuple[int, int], ...]:
    """`width` as (start, size) pieces of powers of two, largest first: 576 -> (0, 512), (512, 64).

    Triton (the GPU backend) only handles blocks whose sizes are powers of
    two; an MLA latent row (512 + 64 RoPE) is loaded and multiplied piece by piece.
    """
    out, at = [], 0
    for bit in reversed(range(width.bit_length())):
        if width >> bit & 1:
            out.append((at, 1 << bit))
            at += 1 << bit
    return tuple(out)


def _kernel(
    # scalars (refs of shape [1] / [B, P])
    layer_ref,
    table_ref,
    start_ref,
    lens_ref,
    # arrays
    q_ref,  # [1, T, G, d]: this sequence's queries for this KV head's G query heads
    values_ref,  # [num_pages, kv, layers, page_size, heads, d]: the whole cache shard, read through the table
    scales_ref,  # like values with d / granularity last, or None
    out_ref,  # [1, T, G, dv]
    *,
    softmax_scale: float,
    value_dim: int,
):
    """The GPU (Triton) and interpret-mode kernel: blocks are loaded straight from the cache refs."""
    layer, g = layer_ref[0], pl.program_id(1)

    b = pl.program_id(0)

    def fetch(j, pages):
        page = table_ref[b, j]

        def load(kv, a, w, scales):
            ref = scales_ref if scales else values_ref
            return _head_block(ref, page, kv, layer, g, a, w)

        return load

    _attend_pages(table_ref, start_ref, lens_ref, q_ref, out_ref, values_ref.shape, scales_ref, fetch,
                  softmax_scale=softmax_scale, value_dim=value_dim)  # fmt: skip


def _tpu_kernel(
    layer_ref, table_ref, start_ref, lens_ref,  # scalar prefetch (SMEM)
    q_ref, values_hbm, *rest,  # q: a VMEM block; values (and scales): the whole cache in HBM
    softmax_scale: float, value_dim: int, quantized: bool,
):  # fmt: skip
    """The TPU (Mosaic) kernel: each page's K/V blocks are DMA'd from HBM into VMEM, double-buffered: the
    copies of page j + 1 run while page j is attended."""
    scales_hbm: Any = None
    sbuf: Any = None
    if quantized:
        scales_hbm, out_ref, kbuf, sbuf, sem = rest
    else:
        out_ref, kbuf, sem = rest
    b, g = pl.program_id(0), pl.program_id(1)
    layer = layer_ref[0]
    kv_dim = values_hbm.shape[1]

    def copies(j, buf):
        """The DMAs that bring page j's blocks into buffer `buf` (0 or 1)."""
        page = table_ref[b, j]
        out = [pltpu.make_async_copy(values_hbm.at[page, kv, layer, :, g, :], kbuf.at[buf, kv], sem.at[buf, kv])
               for kv in range(kv_dim)]  # fmt: skip
        if scales_hbm is not None:
            out += [pltpu.make_async_copy(scales_hbm.at[page, kv, layer, :, g, :], sbuf.at[buf, kv],
                                          sem.at[buf, kv_dim + kv]) for kv in range(kv_dim)]  # fmt: skip
        return out

    def start(j, buf):
        for c in copies(j, buf):
            c.start()

    pages = (start_ref[b] + lens_ref[b] + values_hbm.shape[3] - 1) // values_hbm.shape[3]

    @pl.when(pages > 0)
    def _():
        start(0, 0)

    def fetch(j, pages):
        buf = j % 2
        for c in copies(j, buf):
            c.wait()

        @pl.when(j + 1 < pages)
        def _():
            start(j + 1, 1 - buf)

        def load(kv, a, w, scales):
            return (sbuf if scales else kbuf)[buf, kv, :, pl.ds(a, w)]

        return load

    _attend_pages(table_ref, start_ref, lens_ref, q_ref, out_ref, values_hbm.shape, scales_hbm, fetch,
                  softmax_scale=softmax_scale, value_dim=value_dim)  # fmt: skip


def _attend_pages(table_ref, start_ref, lens_ref, q_ref, out_ref, cache_shape, scales_ref, fetch, *,
                  softmax_scale: float, value_dim: int):  # fmt: skip
    """Online softmax over this sequence's pages for one KV head's query rows; `fetch(j, pages)` gives a
    loader `load(kv, start, width, scales) -> [page_size, width]` of page j's K (kv=0) / V (kv=1) block."""
    b = pl.program_id(0)
    start, n = start_ref[b], lens_ref[b]
    seq_end = start + n  # slots [0, seq_end) of this sequence hold K/V
    kv_dim, page_size, d = cache_shape[1], cache_shape[3], cache_shape[5]
    _, t, groups, _ = q_ref.shape
    rows = t * groups
    pieces = _pieces(d)
    # Rows: (token, query head). Loaded per piece of the head dim.
    qs = [q_ref[0, :, :, pl.ds(a, w)].astype(_F32).reshape(rows, w) * softmax_scale for a, w in pieces]
    pos = start + lax.broadcasted_iota(jnp.int32, (t, groups), 0).reshape(rows)  # each row's position
    granularity = None if scales_ref is None else d // scales_ref.shape[5]

    def dequantized(load, kv, a, w):
        """[page_size, w] float32: columns [a, a + w) of the K (kv=0) or V (kv=1) block, dequantized."""
        x = load(kv, a, w, False).astype(_F32)
        if scales_ref is None:
            return x
        s = load(kv, a // granularity, w // granularity, True).astype(_F32)
        return (x.reshape(page_size, w // granularity, granularity) * s[:, :, None]).reshape(page_size, w)

    def step(j, carry):
        top, total, acc = carry
        load = fetch(j, pages)
        slot = j * page_size + lax.broadcasted_iota(jnp.int32, (page_size,), 0)
        live = slot < seq_end
        scores = jnp.zeros((rows, page_size), _F32)
        for (a, w), q in zip(pieces, qs, strict=True):
            keys = jnp.where(live[:, None], dequantized(load, 0, a, w), 0.0)  # 0 * NaN would poison the sums
            scores += jnp.dot(q, keys.T, precision=lax.Precision.HIGHEST, preferred_element_type=_F32)
        visible = live[None, :] & (slot[None, :] <= pos[:, None])
        scores = jnp.where(visible, scores, -jnp.inf)
        new_top = jnp.maximum(top, jnp.max(scores, axis=1))
        safe = jnp.where(jnp.isfinite(new_top), new_top, 0.0)  # a row that has seen no slot yet
        p = jnp.exp(scores - safe[:, None])
        rescale = jnp.exp(top - safe)
        total = rescale * total + jnp.sum(p, axis=1)
        # The values (MLA: the latent's first value_dim columns) in power-of-two pieces, one accumulator each.
        acc = tuple(
            rescale[:, None] * a_acc
            + jnp.dot(
                p,
                jnp.where(live[:, None], dequantized(load, kv_dim - 1, a, w), 0.0),  # 0 * NaN would poison p @ v
                precision=lax.Precision.HIGHEST,
                preferred_element_type=_F32,
            )
            for (a, w), a_acc in zip(value_pieces, acc, strict=True)
        )
        return new_top, total, acc

    value_pieces = _pieces(value_dim)
    accs = tuple(jnp.zeros((rows, w), _F32) for _, w in value_pieces)
    init = (jnp.full((rows,), -jnp.inf, _F32), jnp.zeros((rows,), _F32), accs)
    pages = (seq_end + page_size - 1) // page_size
    _, total, acc = lax.fori_loop(0, pages, step, init)
    norm = jnp.where(total > 0, total, 1.0)[:, None]  # a padded query of an empty sequence: 0
    for (a, w), a_acc in zip(value_pieces, acc, strict=True):
        out_ref[0, :, :, pl.ds(a, w)] = (a_acc / norm).reshape(t, groups, w).astype(out_ref.dtype)


def _head_block(ref, page, kv, layer, head, a, w):
    """`ref[page, kv, layer, :, head, a:a + w]`: columns of one head's `[page_size, d]` block, read in place
    (slices only: a ref of a sharded array takes no integer index)."""
    one = functools.partial(pl.ds, size=1)
    block = ref[one(page), one(kv), one(layer), :, one(head), pl.ds(a, w)]
    return block.reshape(ref.shape[3], w)


BACKENDS = ("interpret", "gpu", "tpu", "tpu_interpret")
"""How `attend` runs the kernel: Pallas' generic interpreter (CPU), Triton (GPU), Mosaic (TPU), or the TPU
kernel in Pallas' TPU interpret mode (on CPU: the DMAs and VMEM buffers of the TPU kernel, simulated)."""


def backend_for(platform: str) -> str:
    """The `attend` backend for a JAX platform name ("cpu", "gpu"/"cuda"/"rocm", "tpu")."""
    return {"cpu": "interpret", "tpu": "tpu"}.get(platform, "gpu")


@functools.partial(jax.jit, static_argnames=("softmax_scale", "value_dim", "backend"))
def attend(
    cache: KVCacheBuffer,
    layer: int | jax.Array,  # int or traced int32 scalar
    q: jax.Array,
    page_table: jax.Array,
    start_pos: jax.Array,
    q_lens: jax.Array,
    *,
    softmax_scale: float,
    value_dim: int,
    backend: str,
) -> jax.Array:
    """Attend `q` [B, T, H, d] over one shard's cache through the page table; [B, T, H, value_dim] float32.

    The pages must already hold the new tokens' K/V (`paged_attention_shard` writes them first).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    values, scales = cache.values, cache.scales
    b0, t0, n_heads, d = q.shape
    heads = values.shape[4]
    groups = n_heads // heads
    _check_shapes(values, scales, groups, value_dim)
    # Powers of two everywhere a block is loaded (Triton), and at least 16 rows per matmul: padded tokens,
    # sequences (no tokens: nothing read) and table columns (the null page, never reached) are sliced off.
    t, b = max(bucket(t0), bucket(-(-16 // groups))), bucket(b0)
    q = jnp.pad(q, ((0, b - b0), (0, t - t0), (0, 0), (0, 0))).reshape(b, t, heads, groups, d)
    page_table = jnp.pad(page_table, ((0, b - b0), (0, bucket(page_table.shape[1]) - page_table.shape[1])))
    start_pos, q_lens = jnp.pad(start_pos, (0, b - b0)), jnp.pad(q_lens, (0, b - b0))
    layer = jnp.asarray(layer, jnp.int32).reshape(1)
    call = _tpu_call if backend in ("tpu", "tpu_interpret") else _triton_call
    out = call(q, values, scales, layer, page_table, start_pos, q_lens, softmax_scale, value_dim, backend)
    return out.reshape(b, t, n_heads, -1)[:b0, :t0, :, :value_dim]


def _triton_call(q, values, scales, layer, page_table, start_pos, q_lens, softmax_scale, value_dim, backend):
    """The GPU kernel (Triton), or the same kernel in Pallas' interpret mode: every input a whole-array block,
    the pages read from the cache refs where they lie."""
    b, t, heads, groups, d = q.shape

    def spec_all(x):
        return pl.BlockSpec(x.shape, lambda i, j, n=x.ndim: (0,) * n)

    arrays = (layer, page_table, start_pos, q_lens, q, values) + (() if scales is None else (scales,))
    in_specs = [spec_all(x) for x in arrays]
    in_specs[4] = pl.BlockSpec((1, t, None, groups, d), lambda i, j: (i, 0, j, 0, 0))  # this (sequence, KV head)
    kernel = functools.partial(_kernel, softmax_scale=softmax_scale, value_dim=value_dim)
    if scales is None:
        kernel = _without_scales(kernel)
    interpret = backend == "interpret"
    return pl.pallas_call(
        kernel,
        grid=(b, heads),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((1, t, None, groups, bucket(value_dim)), lambda i, j: (i, 0, j, 0, 0)),
        out_shape=jax.ShapeDtypeStruct((b, t, heads, groups, bucket(value_dim)), _F32),
        interpret=interpret,
        # On GPUs the Triton backend: the cache stays in global memory and each page's block is loaded where it
        # lies (Mosaic GPU, the default, would stage every input in shared memory).
        compiler_params=None if interpret else pltriton.CompilerParams(num_warps=4, num_stages=2),
    )(*arrays)


def _tpu_call(q, values, scales, layer, page_table, start_pos, q_lens, softmax_scale, value_dim, backend):
    """The TPU kernel: the table, positions and layer as scalar prefetch, the cache left in HBM, each page's
    K/V (and scales) blocks DMA'd into VMEM, double-buffered."""
    b, t, heads, groups, d = q.shape
    kv_dim, page_size = values.shape[1], values.shape[3]
    anywhere = pl.BlockSpec(memory_space=pl.ANY)
    in_specs = [pl.BlockSpec((1, t, None, groups, d), lambda i, j, *_: (i, 0, j, 0, 0)), anywhere]
    scratch = [pltpu.VMEM((2, kv_dim, page_size, d), values.dtype)]  # two buffers: one in use, one filling
    if scales is not None:
        in_specs.append(anywhere)
        scratch.append(pltpu.VMEM((2, kv_dim, page_size, scales.shape[5]), scales.dtype))
    scratch.append(pltpu.SemaphoreType.DMA((2, 2 * kv_dim)))
    kernel = functools.partial(
        _tpu_kernel, softmax_scale=softmax_scale, value_dim=value_dim, quantized=scales is not None
    )
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=4,
        grid=(b, heads),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((1, t, None, groups, bucket(value_dim)), lambda i, j, *_: (i, 0, j, 0, 0)),
        scratch_shapes=scratch,
    )
    return pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct((b, t, heads, groups, bucket(value_dim)), _F32),
        # Interpreted, DMAs land as soon as they start (a buffer overwritten while in use shows in the
        # results) and the race detector watches the buffers.
        interpret=pltpu.InterpretParams(dma_execution_mode="eager", detect_races=True)
        if backend == "tpu_interpret"
        else False,
    )(layer, page_table, start_pos, q_lens, q, values, *(() if scales is None else (scales,)))


def _check_shapes(values, scales, groups: int, value_dim: int) -> None:
    """`unsupported` for the arrays the kernel is given, as a ValueError."""
    page_size, d = values.shape[3], values.shape[5]
    granularity = None if scales is None else d // scales.shape[5]
    problem = unsupported(page_size=page_size, head_dim=d, groups=groups, value_dim=value_dim, granularity=granularity)
    if problem is not None:
        raise ValueError(problem)


def unsupported(*, page_size: int, head_dim: int, groups: int, value_dim: int, granularity: int | None) -> str | None:
    """Why the kernel cannot attend over this layout (None: it can), naming the field and its value.

    `page_size` and the query heads per KV head (`groups`) must be powers of two
    (they are loaded whole); `head_dim` and `value_dim` may be any width, loaded
    in power-of-two pieces (`_pieces`: 96 = 64 + 32), but a scale group
    (`granularity`, quantized caches) must not straddle two pieces. Callers that
    run the kernel later (the CLI) ask this first.
    """
    for name, v in (("page_size", page_size), ("query heads per KV head", groups)):
        if v & (v - 1):
            return f"impl='pallas' needs {name} to be a power of two, got {v}"
    if granularity is not None:
        for name, width in (("head_dim", head_dim), ("value_dim", value_dim)):
            smallest = min(w for _, w in _pieces(width))
            if smallest % granularity:
                return (
                    f"impl='pallas' loads {name} {width} in power-of-two pieces (the smallest {smallest}); "
                    f"the scale granularity ({granularity}) must divide it, but {smallest} % {granularity} = "
                    f"{smallest % granularity}"
                )
    return None


def _without_scales(kernel):
    """The kernel's signature with the scales ref absent (pallas_call passes no ref for it)."""

    def run(layer_ref, table_ref, start_ref, lens_ref, q_ref, values_ref, out_ref):
        kernel(layer_ref, table_ref, start_ref, lens_ref, q_ref, values_ref, None, out_ref)

    return run
