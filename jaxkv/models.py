"""Tiny decoder models with random weights: something real to drive the paged cache with, no downloads.

Two kinds, both RMSNorm + RoPE + SwiGLU decoders with separate embedding and
unembedding matrices:

- `"mha"`: Llama-style grouped-query attention. The cache holds K and V per
  KV head (`kv_dim=2`), heads split over the TP axis.
- `"mla"`: DeepSeek-style multi-head latent attention. Each token's hidden
  state is projected down to a latent `c_kv` (`kv_lora_rank`, RMS-normed) and
  one decoupled RoPE key (`rope_dim`) shared by all heads; the cache stores
  `[c_kv | k_rope]` as one vector (`kv_dim=1`, `n_kv_heads=1`), replicated
  over TP. Attention runs in the *absorbed* form: each head's no-RoPE query
  is multiplied by its key up-projection `W_UK` into latent space, so scores
  are `[q_nope W_UK | q_rope] . [c_kv | k_rope]` against the cache as is,
  and the attention-weighted latent is up-projected by `W_UV` afterwards.
  Nothing is decompressed per cached token. Queries are projected directly
  (no query LoRA); `head_dim` is both the no-RoPE query/key width and the
  value width per head.

Numerics: weights and activations are float32 (XLA:CPU runs float32 matmuls
faster than bfloat16 ones, and the tests compare logits closely); only the
cache is bfloat16 / FP8 / int8. Attention reads the new tokens' K/V back from
the cache, so a prompt prefilled at once and in chunks sees the same rounded
keys.

Tensor parallelism is Megatron-style inside one `jax.shard_map`: query/KV
heads and the MLP hidden units are split over the TP axis, the attention
output and MLP down projections are summed with `psum`, everything else
(embeddings, norms, the MLA down projection) is replicated. Weights are drawn
from `config.seed` on the host as the same global arrays for every TP degree.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxkv._checks import check_non_negative_int, check_positive_int
from jaxkv._decoder import (
    MIN_PREFILL_TOKENS,
    QUANTIZED_CACHE_DTYPES,
    UNQUANTIZED_CACHE_DTYPES,
    PagedDecoder,
    check_tp_split,
    forward,
    gqa,
    mla,
    paged_cache_params,
    rope_inv_freq,
)
from jaxkv.attention.xla import IMPLS
from jaxkv.layout.params import KVCacheParams

__all__ = ["MIN_PREFILL_TOKENS", "TinyConfig", "TinyModel"]

KINDS = ("mha", "mla")

MLP_EXPANSION = 2
"""SwiGLU hidden width in units of d_model (Llama uses about 8/3; 2 keeps the
model tiny and the width divisible by small TP degrees)."""

ROPE_THETA = 10_000.0
"""RoPE base frequency (Llama 2)."""

NORM_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class TinyConfig:
    """Shape of a `TinyModel`. Validated once, in `__post_init__`."""

    kind: str = "mha"
    """"mha": Llama-style GQA decoder; "mla": DeepSeek-style MLA decoder."""

    vocab: int = 256
    """Token ids are in [0, vocab)."""

    d_model: int = 128
    """Width of the residual stream."""

    n_layers: int = 2
    """Decoder layers; every cache page holds all of them."""

    n_heads: int = 8
    """Query heads. Must be divisible by the TP degree."""

    n_kv_heads: int = 4
    """KV heads (mha only; MLA caches one latent). Must divide n_heads and be divisible by the TP degree."""

    head_dim: int = 32
    """Per-head width. mha: of q, k, v (even: RoPE rotates pairs). mla: of the no-RoPE query/key part and of v."""

    kv_lora_rank: int = 96
    """mla: latent width. The cached vector is kv_lora_rank + rope_dim wide."""

    rope_dim: int = 32
    """mla: width of the decoupled RoPE query/key part (even)."""

    page_size: int = 16
    """Tokens per cache page."""

    cache_dtype: str = "bfloat16"
    """bfloat16 / float16 / float32, or float8_e4m3fn / float8_e5m2 / int8: a quantized cache with float32 scales."""

    seed: int = 0
    """Seed of the random weights: the same config gives the same model."""
    attention: str = "auto"
    """`paged_attention`'s implementation: "auto", "xla" or "pallas"."""

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.attention not in IMPLS:
            raise ValueError(f"attention must be one of {IMPLS}, got {self.attention!r}")
        sizes = (
            "vocab",
            "d_model",
            "n_layers",
            "n_heads",
            "n_kv_heads",
            "head_dim",
            "kv_lora_rank",
            "rope_dim",
            "page_size",
        )
        for field in sizes:
            object.__setattr__(self, field, check_positive_int(field, getattr(self, field)))
        object.__setattr__(self, "seed", check_non_negative_int("seed", self.seed))
        if self.kind == "mha":
            if self.n_heads % self.n_kv_heads:
                raise ValueError(
                    f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads}), "
                    f"but {self.n_heads} % {self.n_kv_heads} = {self.n_heads % self.n_kv_heads}"
                )
            if self.head_dim % 2:
                raise ValueError(f"head_dim ({self.head_dim}) must be even: RoPE rotates pairs of dimensions")
        elif self.rope_dim % 2:
            raise ValueError(f"rope_dim ({self.rope_dim}) must be even: RoPE rotates pairs of dimensions")
        dtypes = UNQUANTIZED_CACHE_DTYPES + QUANTIZED_CACHE_DTYPES
        if self.cache_dtype not in dtypes:
            raise ValueError(f"cache_dtype must be one of {', '.join(dtypes)}, got {self.cache_dtype!r}")

    @property
    def cache_head_dim(self) -> int:
        """Width of one cached vector: head_dim (mha) or kv_lora_rank + rope_dim (mla)."""
        return self.head_dim if self.kind == "mha" else self.kv_lora_rank + self.rope_dim

    @property
    def norm_eps(self) -> float:
        """RMSNorm's epsilon (`NORM_EPS`)."""
        return NORM_EPS

    @property
    def rope_inv_freq(self) -> tuple[float, ...]:
        """RoPE's inverse frequencies over the rotated width: head_dim (mha) or rope_dim (mla), base `ROPE_THETA`."""
        return rope_inv_freq(ROPE_THETA, self.head_dim if self.kind == "mha" else self.rope_dim)

    @property
    def mlp_dim(self) -> int:
        """Hidden width of the SwiGLU MLP."""
        return MLP_EXPANSION * self.d_model

    def tp_split(self) -> dict[str, int]:
        """The sizes tensor parallelism splits over the shards, by field: each must be divisible by the TP degree."""
        split = {"n_heads": self.n_heads, "mlp_dim (MLP_EXPANSION * d_model)": self.mlp_dim}
        return {"n_kv_heads": self.n_kv_heads, **split} if self.kind == "mha" else split


def _cache_params(config: TinyConfig) -> KVCacheParams:
    mla = config.kind == "mla"
    return paged_cache_params(
        config.cache_dtype,
        n_kv_heads=1 if mla else config.n_kv_heads,
        head_dim=config.cache_head_dim,
        num_layers=config.n_layers,
        page_size=config.page_size,
        is_mla=mla,
        widths=(config.kv_lora_rank, config.rope_dim) if mla else (config.head_dim,),
    )


# -- weights ----------------------------------------------------------------------


def _weight_shapes(c: TinyConfig, tp_axis: str) -> dict:
    """{name: (global shape, PartitionSpec)}, the per-layer weights under "layers", stacked on a leading layer axis."""
    L, d, H = c.n_layers, c.d_model, c.n_heads
    heads_out = P(None, None, tp_axis, None)  # [L, d, heads, k]: column-parallel
    heads_in = P(None, tp_axis, None, None)  # [L, heads, k, ...]: row-parallel, psum after
    layers = {
        "attn_norm": ((L, d), P()),
        "mlp_norm": ((L, d), P()),
        "w_gate": ((L, d, c.mlp_dim), P(None, None, tp_axis)),
        "w_up": ((L, d, c.mlp_dim), P(None, None, tp_axis)),
        "w_down": ((L, c.mlp_dim, d), P(None, tp_axis, None)),
        "wo": ((L, H, c.head_dim, d), heads_in),
    }
    if c.kind == "mha":
        layers |= {
            "wq": ((L, d, H, c.head_dim), heads_out),
            "wk": ((L, d, c.n_kv_heads, c.head_dim), heads_out),
            "wv": ((L, d, c.n_kv_heads, c.head_dim), heads_out),
        }
    else:
        layers |= {
            "wq": ((L, d, H, c.head_dim + c.rope_dim), heads_out),
            "w_dkv": ((L, d, c.kv_lora_rank + c.rope_dim), P()),
            "kv_norm": ((L, c.kv_lora_rank), P()),
            "w_uk": ((L, H, c.head_dim, c.kv_lora_rank), heads_in),
            "w_uv": ((L, H, c.kv_lora_rank, c.head_dim), heads_in),
        }
    return {
        "embed": ((c.vocab, d), P()),
        "final_norm": ((d,), P()),
        "unembed": ((d, c.vocab), P()),
        "layers": layers,
    }


def _init_weights(c: TinyConfig, shapes: dict, rng: np.random.Generator) -> dict:
    """Random float32 weights shaped like `shapes`: norms 1, embeddings N(0, 1), matrices N(0, 1/fan_in)."""
    fan_in = {"wo": c.n_heads * c.head_dim, "w_down": c.mlp_dim, "w_uk": c.head_dim, "w_uv": c.kv_lora_rank}
    weights = {}
    for name, entry in shapes.items():
        if isinstance(entry, dict):
            weights[name] = _init_weights(c, entry, rng)
            continue
        shape = entry[0]
        if name.endswith("norm"):
            weights[name] = np.ones(shape, np.float32)
        elif name == "embed":
            weights[name] = rng.standard_normal(shape, np.float32)
        else:
            std = np.float32(1 / math.sqrt(fan_in.get(name, c.d_model)))
            weights[name] = rng.standard_normal(shape, np.float32) * std
    return weights


# -- the per-shard forward pass -------------------------------------------------------


def _forward(c: TinyConfig, tp_axis: str, weights, cache, tokens, start_pos, q_len, page_table):
    """One sequence on one shard: tokens [T] (padded) at start_pos..; returns (logits [T, vocab], cache)."""
    attention = mla if c.kind == "mla" else gqa
    return forward(c, tp_axis, attention, weights, cache, tokens, start_pos, q_len, page_table)


class TinyModel(PagedDecoder):
    """A `TinyConfig` decoder with random weights, sharded over `mesh`'s `tp_axis`.

    Reads and writes a paged cache laid out by `cache_params`; `prefill` runs
    any number of new tokens of one sequence (a prompt, a chunk of it, or one
    decode step).
    """

    def __init__(self, config: TinyConfig, mesh: Mesh, tp_axis: str = "tp"):
        if not isinstance(config, TinyConfig):
            raise ValueError(f"config must be a TinyConfig, got {type(config).__name__}")
        tp = check_tp_split(config.tp_split(), mesh, tp_axis)
        self.config = config
        """The model's shape and seed."""
        self.mesh = mesh
        self.tp_axis = tp_axis
        self.cache_params = _cache_params(config)
        """Layout of the cache this model reads and writes."""

        shapes = _weight_shapes(config, tp_axis)
        is_entry = lambda x: isinstance(x, tuple)  # noqa: E731
        specs = jax.tree.map(lambda entry: entry[1], shapes, is_leaf=is_entry)
        weights = _init_weights(config, shapes, np.random.default_rng(config.seed))
        self.weights = jax.tree.map(lambda w, spec: jax.device_put(w, NamedSharding(mesh, spec)), weights, specs)
        """Global float32 weights, sharded as Megatron-style TP."""

        self._build(functools.partial(_forward, config, tp_axis), specs, tp)

    def __repr__(self) -> str:
        return f"TinyModel({self.config}, TP {self.mesh.shape[self.tp_axis]} on {self.tp_axis!r})"
