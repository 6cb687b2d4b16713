"""The decoder runtime every jaxkv model shares: the per-shard forward pass and `PagedDecoder`.

`jaxkv.models.TinyModel` (random weights) and `jaxkv.hf`'s checkpoint models
(weights read from disk) are the same program: RMSNorm + RoPE + SwiGLU
decoder layers run Megatron-style inside one `jax.shard_map`, attention
through `paged_attention_shard` on this shard's part of the paged cache. They
differ in where the weights come from and in a few per-architecture details
the forward pass reads from the weights themselves (optional q/k/v biases,
optional per-head q/k RMSNorm) and from the config (`DecoderConfig`).

Weights are a dict: "embed" [vocab, d], "final_norm" [d], "unembed" [d, vocab]
and "layers", each entry stacked on a leading layer axis. GQA layers hold
"attn_norm", "mlp_norm" [L, d]; "wq" [L, d, H, k], "wk"/"wv" [L, d, KV, k]
(column-parallel over heads); "wo" [L, H, k, d] (row-parallel, psum after);
"w_gate"/"w_up" [L, d, F] and "w_down" [L, F, d]; optionally "bq" [L, H, k],
"bk"/"bv" [L, KV, k] (Qwen2), "bo" [L, d] (Llama's attention_bias) and "q_norm"/"k_norm" [L, k] (Qwen3's QK-norm).
MLA layers (`mla`: TinyModel's "mla" kind, DeepSeek-V2/V3 checkpoints) hold the latent projections instead of
"wq"/"wk"/"wv" (see `mla`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxkv._checks import check_non_negative_int
from jaxkv.attention.xla import paged_attention_shard
from jaxkv.layout.buffer import KVCacheBuffer, allocate_buffer, check_tp_mesh
from jaxkv.layout.pages import PageIds, bucket, check_page_ids, check_unique
from jaxkv.layout.params import KVCacheParams, KVCacheQuantConfig
from jaxkv.prefix.pool import NULL_PAGE

MIN_PREFILL_TOKENS = 16
"""Smallest token bucket of a multi-token step. Buckets 2, 4 and 8 would each compile a program of their
own for a few tokens (seconds each: docs/benchmarks.md, "Measurements behind the rules", "Toy model");
padding them to 16 costs a tiny model nothing measurable."""

UNQUANTIZED_CACHE_DTYPES = ("bfloat16", "float16", "float32")
QUANTIZED_CACHE_DTYPES = ("float8_e4m3fn", "float8_e5m2", "int8")

QUANT_GROUP = 32
"""Largest scale group of a quantized cache; the granularity used is its gcd
with the cached widths, so an MLA group never straddles latent and RoPE key."""

_HIGHEST = lax.Precision.HIGHEST  # full float32 matmuls on every backend

einsum = functools.partial(jnp.einsum, precision=_HIGHEST)
matmul = functools.partial(jnp.matmul, precision=_HIGHEST)


class DecoderConfig(Protocol):
    """What the shared forward pass and `PagedDecoder` read from a model's config."""

    @property
    def vocab(self) -> int: ...  # token ids are in [0, vocab)
    @property
    def n_layers(self) -> int: ...
    @property
    def head_dim(self) -> int: ...  # per-head width of q, k, v (GQA)
    @property
    def page_size(self) -> int: ...  # tokens per cache page
    @property
    def attention(self) -> str: ...  # paged_attention's impl: "auto", "xla", "pallas"
    @property
    def norm_eps(self) -> float: ...  # RMSNorm's epsilon
    @property
    def rope_inv_freq(self) -> tuple[float, ...]: ...  # RoPE's inverse frequencies, one per rotated pair


def paged_cache_params(
    cache_dtype: str,
    *,
    n_kv_heads: int,
    head_dim: int,
    num_layers: int,
    page_size: int,
    is_mla: bool = False,
    widths: Sequence[int] = (),
) -> KVCacheParams:
    """The cache layout of a decoder: `cache_dtype` one of `UNQUANTIZED_CACHE_DTYPES` or `QUANTIZED_CACHE_DTYPES`
    (float32 scales, in groups of gcd(`QUANT_GROUP`, *`widths`): `widths` are the parts of a cached vector a
    group must not straddle)."""
    dtypes = UNQUANTIZED_CACHE_DTYPES + QUANTIZED_CACHE_DTYPES
    if cache_dtype not in dtypes:
        raise ValueError(f"cache_dtype must be one of {', '.join(dtypes)}, got {cache_dtype!r}")
    quant = None
    if cache_dtype in QUANTIZED_CACHE_DTYPES:
        quant = KVCacheQuantConfig(jnp.float32, granularity=math.gcd(QUANT_GROUP, *(widths or (head_dim,))))
    return KVCacheParams(
        dtype=jnp.dtype(cache_dtype),
        n_kv_heads=n_kv_heads,
        head_dim=head_dim,
        num_layers=num_layers,
        page_size=page_size,
        is_mla=is_mla,
        quant=quant,
    )


def rope_inv_freq(theta: float, dim: int) -> tuple[float, ...]:
    """Plain RoPE's inverse frequencies for a rotated width `dim`: theta ** (-2i / dim), i < dim / 2."""
    return tuple(float(theta ** (-2 * i / dim)) for i in range(dim // 2))


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm over the last axis, scaled by `weight`."""
    return x * lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def rope(x: jax.Array, pos: jax.Array, inv_freq: Sequence[float]) -> jax.Array:
    """Rotate x [T, heads, d] by its positions pos [T] (rotate-half convention: pairs (i, i + d/2))."""
    half = x.shape[-1] // 2
    angles = pos.astype(jnp.float32)[:, None] * jnp.asarray(inv_freq, jnp.float32)  # [T, half]
    cos, sin = jnp.cos(angles)[:, None], jnp.sin(angles)[:, None]
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def gqa(c: DecoderConfig, w: dict, h: jax.Array, pos, cache, attend) -> tuple[jax.Array, KVCacheBuffer]:
    """This shard's heads of Llama-style attention; returns its partial output [T, d] and the cache.

    Optional weights: "bq"/"bk"/"bv" (biases, Qwen2) and "q_norm"/"k_norm" (RMSNorm per head before RoPE, Qwen3).
    """

    def project(name: str) -> jax.Array:
        x = einsum("td,dhk->thk", h, w["w" + name])
        if "b" + name in w:
            x = x + w["b" + name]
        if name + "_norm" in w:
            x = rms_norm(x, w[name + "_norm"], c.norm_eps)
        return x

    q = rope(project("q"), pos, c.rope_inv_freq)
    k = rope(project("k"), pos, c.rope_inv_freq)
    out, cache = attend(cache, q, k, project("v"), softmax_scale=1 / math.sqrt(c.head_dim), value_dim=None)
    return einsum("thk,hkd->td", out, w["wo"]), cache


MLA_LATENT_NORM_EPS = 1e-6
"""Epsilon of MLA's latent RMSNorms (of c_kv, and of the query latent): DeepSeek-V2/V3 build them as
`DeepseekV2RMSNorm(kv_lora_rank)` with the class default 1e-6, not config.json's `rms_norm_eps`."""


class MLAConfig(DecoderConfig, Protocol):
    """What `mla` reads beyond `DecoderConfig`; `head_dim` is the width of the no-RoPE query/key part."""

    @property
    def kv_lora_rank(self) -> int: ...  # width of the cached latent c_kv
    @property
    def rope_dim(self) -> int: ...  # width of the decoupled RoPE query/key part


def mla(c: MLAConfig, w: dict, h: jax.Array, pos, cache, attend) -> tuple[jax.Array, KVCacheBuffer]:
    """This shard's heads of absorbed multi-head latent attention; the latent is computed on every shard.

    The cache holds `[c_kv | k_rope]` per token (one vector, replicated over TP). Each head's no-RoPE query is
    multiplied by its key up-projection `w_uk` into latent space, so scores are `[q_nope W_UK | q_rope] .
    [c_kv | k_rope]` against the cache as is, and the attention-weighted latent is up-projected by `w_uv`
    afterwards. Weights: "wq" [d, H, k + r] (or a query LoRA: "wq_a" [d, q_rank], "q_a_norm" [q_rank], "wq_b"
    [q_rank, H, k + r]), "w_dkv" [d, kv_lora_rank + r], "kv_norm" [kv_lora_rank], "w_uk" [H, k, kv_lora_rank],
    "w_uv" [H, kv_lora_rank, v], "wo" [H, v, d]; k = `head_dim`, r = `rope_dim`.
    """
    if "wq_a" in w:  # DeepSeek's q_lora_rank: down-project, normalise, up-project per head
        q_latent = rms_norm(matmul(h, w["wq_a"]), w["q_a_norm"], MLA_LATENT_NORM_EPS)
        q = einsum("tr,rhk->thk", q_latent, w["wq_b"])
    else:
        q = einsum("td,dhk->thk", h, w["wq"])
    q_nope, q_rope = q[..., : c.head_dim], rope(q[..., c.head_dim :], pos, c.rope_inv_freq)
    latent = matmul(h, w["w_dkv"])  # replicated weights: every shard computes the same latent
    c_kv = rms_norm(latent[:, : c.kv_lora_rank], w["kv_norm"], MLA_LATENT_NORM_EPS)
    k_rope = rope(latent[:, None, c.kv_lora_rank :], pos, c.rope_inv_freq)  # one RoPE key shared by all heads
    cached = jnp.concatenate([c_kv[:, None], k_rope], axis=-1)  # [T, 1, kv_lora_rank + rope_dim]
    q_absorbed = jnp.concatenate([einsum("thk,hkr->thr", q_nope, w["w_uk"]), q_rope], axis=-1)
    scale = 1 / math.sqrt(c.head_dim + c.rope_dim)  # of the un-absorbed query/key width
    out, cache = attend(cache, q_absorbed, cached, None, softmax_scale=scale, value_dim=c.kv_lora_rank)
    return einsum("thk,hkd->td", einsum("thr,hrk->thk", out, w["w_uv"]), w["wo"]), cache


Attention = Callable[..., tuple[jax.Array, KVCacheBuffer]]
"""One layer's attention on one shard: (config, layer weights, normed hidden [T, d], positions, cache, attend)
-> (partial output [T, d], cache)."""


def _attend_one(cache, q, k, v, *, layer: int, page_table, start_pos, q_len, **kw):
    """`paged_attention_shard` for one sequence: a batch of 1 in, [T, heads, dv] out."""
    v = None if v is None else v[None]
    out, cache = paged_attention_shard(
        cache, layer, q[None], k[None], v, page_table[None], start_pos[None], q_len[None], **kw
    )
    return out[0], cache


def forward(c: DecoderConfig, tp_axis: str, attention: Attention, weights, cache, tokens, start_pos, q_len, page_table):
    """One sequence on one shard: tokens [T] (padded) at start_pos..; returns (logits [T, vocab], cache)."""
    pos = start_pos + jnp.arange(tokens.shape[0])
    x = weights["embed"][tokens]
    for layer in range(c.n_layers):
        w = {name: a[layer] for name, a in weights["layers"].items()}
        attend = functools.partial(
            _attend_one, layer=layer, page_table=page_table, start_pos=start_pos, q_len=q_len, impl=c.attention
        )
        out, cache = attention(c, w, rms_norm(x, w["attn_norm"], c.norm_eps), pos, cache, attend)
        x = x + lax.psum(out, tp_axis)
        if "bo" in w:  # the output projection's bias (Llama's attention_bias), once: after the sum over shards
            x = x + w["bo"]
        h = rms_norm(x, w["mlp_norm"], c.norm_eps)
        mlp = jax.nn.silu(matmul(h, w["w_gate"])) * matmul(h, w["w_up"])
        x = x + lax.psum(matmul(mlp, w["w_down"]), tp_axis)
    return matmul(rms_norm(x, weights["final_norm"], c.norm_eps), weights["unembed"]), cache


def check_tp_split(split: dict[str, int], mesh: Mesh, tp_axis: str) -> int:
    """The TP degree of `mesh`'s `tp_axis`, once every size in `split` ({field: size}) is divisible by it."""
    tp = check_tp_mesh(mesh, tp_axis)
    for field, n in split.items():
        if n % tp:
            raise ValueError(
                f"{field} ({n}) must be divisible by the TP degree ({tp}) of mesh axis {tp_axis!r}, "
                f"but {n} % {tp} = {n % tp}"
            )
    return tp


class PagedDecoder:
    """A decoder sharded over `mesh`'s `tp_axis` that reads and writes a paged cache laid out by `cache_params`.

    Subclasses place the weights (global arrays, sharded by `specs`) and pass
    the per-shard step, `step(weights, cache, tokens, start_pos, q_len,
    page_table) -> (logits, cache)`; this class jits it and offers what the
    prefix-caching manager and the demo use: `allocate_cache`, `prefill`.
    """

    config: DecoderConfig
    """The model's shape."""
    mesh: Mesh
    """The devices the model runs on."""
    tp_axis: str
    """The mesh axis tensor parallelism splits heads and MLP units over."""
    cache_params: KVCacheParams
    """Layout of the cache this model reads and writes."""
    weights: dict
    """Global float32 weights, sharded as Megatron-style TP."""

    def _build(self, step, specs, tp: int) -> None:
        replicated = self.cache_params.replicated(tp)
        cache_spec = P() if replicated else P(None, None, None, None, self.tp_axis, None)
        self._cache_sharding = NamedSharding(self.mesh, cache_spec)
        scale_spec = cache_spec if self.cache_params.quant is not None else None
        cache_specs = KVCacheBuffer.tree_unflatten(replicated, (cache_spec, scale_spec))
        sharded = jax.shard_map(
            step,
            mesh=self.mesh,
            in_specs=(specs, cache_specs, P(), P(), P(), P()),
            out_specs=(P(), cache_specs),
            check_vma=False,
        )
        # Pin the returned cache to allocate_buffer's sharding: shard_map would spell a replicated
        # spec P() as P(None, ...), a different jit cache key on the next call.
        cache_shardings = jax.tree.map(lambda spec: NamedSharding(self.mesh, spec), cache_specs)
        self._step = jax.jit(sharded, donate_argnums=1, out_shardings=(NamedSharding(self.mesh, P()), cache_shardings))

    def allocate_cache(self, num_pages: int) -> KVCacheBuffer:
        """A zeroed cache of `num_pages` pages (page 0 is the null page) for this model."""
        return allocate_buffer(self.cache_params, self.mesh, num_pages, tp_axis=self.tp_axis)

    def prefill(
        self,
        cache: KVCacheBuffer,
        token_ids: Sequence[int] | np.ndarray | jax.Array,
        start_pos: int,
        page_table: PageIds,
    ) -> tuple[jax.Array, KVCacheBuffer]:
        """Run token_ids (1-D ints, length T >= 1) at positions [start_pos, start_pos+T) for ONE sequence,
        attending to the cached positions [0, start_pos) through page_table (1-D int32 page ids covering at least
        ceil((start_pos+T)/page_size) pages; may be longer/padded with 0). Writes their K/V into the pages, cache
        donated. Returns (logits float32 [T, vocab] as a jax.Array, new cache).

        Internally T is padded to a power-of-two bucket (at least
        `MIN_PREFILL_TOKENS` when T > 1: decode steps stay at T = 1) and the page table to
        the power-of-two width >= its length (entries past the pages in use
        become the null page): one compiled program per (token bucket, table
        width bucket). A server that passes tables of one fixed width compiles
        one program per token bucket, and attention then spans that width.
        Returns once the step has run: the logits are cut to T on the host.
        """
        tokens = self._check_tokens(token_ids)
        start_pos = check_non_negative_int("start_pos", start_pos)
        self._check_cache(cache)
        table = check_page_ids(page_table, cache.total_num_pages, name="page_table")
        n, page_size = tokens.size, self.config.page_size
        end = start_pos + n
        used = -(-end // page_size)
        if table.size < used:
            raise ValueError(
                f"page_table has {table.size} pages but positions [0, {end}) need ceil({end} / {page_size}) = {used}"
            )
        in_use = table[:used]
        if (in_use == NULL_PAGE).any():
            i = int(np.argmax(in_use == NULL_PAGE))
            raise ValueError(
                f"page_table[{i}] is the null page {NULL_PAGE}, but positions [{i * page_size}, "
                f"{(i + 1) * page_size}) need a real page: pad with {NULL_PAGE} only past entry {used - 1}"
            )
        check_unique(in_use, name="page_table")
        padded_tokens = np.zeros(bucket(n) if n == 1 else max(bucket(n), MIN_PREFILL_TOKENS), np.int32)
        padded_tokens[:n] = tokens
        padded_table = np.full(bucket(table.size), NULL_PAGE, np.int32)
        padded_table[:used] = in_use
        logits, cache = self._step(self.weights, cache, padded_tokens, np.int32(start_pos), np.int32(n), padded_table)
        # Cut the padding on the host: slicing on device compiles one program per distinct T
        # (docs/benchmarks.md, "Toy model"). The copy waits for the step, so prefill returns when it is done.
        return jax.device_put(np.asarray(logits)[:n], self.mesh.devices.flat[0]), cache

    def _check_tokens(self, token_ids) -> np.ndarray:
        tokens = np.asarray(token_ids)
        if tokens.ndim != 1 or tokens.size == 0 or not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(
                f"token_ids must be a non-empty 1-D sequence of ints, got shape {tokens.shape} dtype {tokens.dtype}"
            )
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= self.config.vocab:
            raise ValueError(f"token_ids contains {lo if lo < 0 else hi}, outside [0, vocab={self.config.vocab})")
        return tokens.astype(np.int32)

    def _check_cache(self, cache) -> None:
        if not isinstance(cache, KVCacheBuffer):
            raise ValueError(f"cache must be a KVCacheBuffer, got {type(cache).__name__}")
        arrays = [cache.values] + ([] if cache.scales is None else [cache.scales])
        if any(a.is_deleted() for a in arrays):
            raise ValueError(
                "cache has been donated (its arrays are deleted); pass the cache the last prefill returned"
            )
        p = self.cache_params
        want = (p.kv_dim, p.num_layers, p.page_size, p.n_kv_heads, p.head_dim)
        got = tuple(cache.values.shape[1:])
        if got != want or cache.values.dtype != p.dtype or (cache.scales is None) != (p.quant is None):
            raise ValueError(
                f"cache {cache!r} does not match this model's cache_params: expected values "
                f"{p.dtype.name}[pages, {', '.join(map(str, want))}]"
                f"{'' if p.quant is None else ' with scales'}; allocate it with model.allocate_cache(num_pages)"
            )
        if not all(a.sharding.is_equivalent_to(self._cache_sharding, a.ndim) for a in arrays):
            raise ValueError(
                f"cache is placed as {cache.values.sharding}, but this model runs on {self._cache_sharding}; "
                f"allocate it with model.allocate_cache(num_pages)"
            )
