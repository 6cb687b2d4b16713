"""DeepSeek-V2 / V3 checkpoints: multi-head latent attention (MLA) on jaxkv's latent cache, dense MLP layers.

Attention is `jaxkv._decoder.mla`, the absorbed form TinyModel's MLA runs: the cache holds `[c_kv | k_rope]`
(kv_lora_rank + qk_rope_head_dim wide, one vector per token, replicated over TP), each head's key and value
up-projections are split out of `kv_b_proj` and applied to the query and the attention output, never to the
cache. Queries come from `q_proj`, or with `q_lora_rank` from `q_a_proj` + `q_a_layernorm` + `q_b_proj`.

RoPE: DeepSeek rotates interleaved pairs (x0, x1), (x2, x3), ... of the RoPE dims (transformers'
`DeepseekV2Attention` through complex numbers; `DeepseekV3Attention` when `rope_interleave` is true, its
default); jaxkv's `rope` rotates halves (x_i, x_{i + r/2}). The loader permutes the RoPE rows of `q_proj` /
`q_b_proj` and `kv_a_proj_with_mqa` to evens-then-odds, so rotating halves of the permuted vector is the
interleaved rotation of the original; scores are dot products over the same permutation of q and k, hence
unchanged. The softmax scale is (qk_nope_head_dim + qk_rope_head_dim) ** -0.5. RoPE scalings: default,
linear, llama3 and yarn (DeepSeek-V2/V3's own: its frequencies as transformers computes them; its mscale on the
softmax and attention_factor on cos/sin are folded into the query weights at load).

Refused with one line: mixture-of-experts layers (`first_k_dense_replace` < `num_hidden_layers` with
`n_routed_experts` set: only dense MLPs are implemented), other RoPE scalings, `attention_bias`, activations
other than SiLU.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from jaxkv._decoder import mla, paged_cache_params
from jaxkv.hf._common import check_attention, check_pallas, decoder_layer, decoder_weights, refuse_non_swiglu
from jaxkv.hf._plan import ARCHITECTURES, ModelPlan, SafeSlice, Weight, as_is, config_field, heads_in, transposed
from jaxkv.hf.llama import _rope_parameters, scaled_inv_freq

MODEL_TYPES = ("deepseek_v2", "deepseek_v3")


@dataclasses.dataclass(frozen=True)
class DeepseekConfig:
    """A DeepSeek-V2/V3 checkpoint's shape, as `jaxkv._decoder.mla` and the shared forward pass read it."""

    model_type: str
    """config.json's `model_type`."""
    vocab: int
    """`vocab_size`."""
    d_model: int
    """`hidden_size`."""
    n_layers: int
    """`num_hidden_layers`."""
    n_heads: int
    """`num_attention_heads`: query heads, split over TP."""
    head_dim: int
    """`qk_nope_head_dim`: the no-RoPE part of each head's query and key."""
    rope_dim: int
    """`qk_rope_head_dim`: the RoPE part of each head's query, and of the one key all heads share."""
    kv_lora_rank: int
    """`kv_lora_rank`: width of the cached latent c_kv."""
    v_head_dim: int
    """`v_head_dim`: each head's value width."""
    q_lora_rank: int | None
    """`q_lora_rank`: width of the query latent, or None (queries projected directly by `q_proj`)."""
    mlp_dim: int
    """`intermediate_size`: SwiGLU hidden width of the dense MLP."""
    norm_eps: float
    """`rms_norm_eps` (the layer and final norms; the latent norms use 1e-6 as transformers does)."""
    rope_inv_freq: tuple[float, ...]
    """RoPE's inverse frequencies over qk_rope_head_dim, scaled as config.json says."""
    interleaved: bool
    """Whether the checkpoint's RoPE dims are interleaved pairs (permuted to halves at load)."""
    query_scale: tuple[float, float]
    """(no-RoPE, RoPE) factors folded into the query weights at load: yarn's softmax mscale squared on both, times
    yarn's cos/sin amplitude (`attention_factor`) squared on the RoPE part; (1, 1) for plain RoPE."""
    page_size: int
    """Tokens per cache page."""
    cache_dtype: str
    """The cache's dtype; weights and activations are float32."""
    attention: str
    """`paged_attention`'s implementation: "auto", "xla" or "pallas"."""


def _refuse_unsupported(hf: dict, n_layers: int) -> None:
    refuse_non_swiglu(hf)
    if hf.get("attention_bias"):
        raise ValueError("config.json: attention_bias true is not supported; expected false")
    dense = hf.get("first_k_dense_replace", 0)
    experts = hf.get("n_routed_experts")
    if experts is not None and (not isinstance(dense, int) or dense < n_layers):
        raise ValueError(
            f"config.json: first_k_dense_replace ({dense}) < num_hidden_layers ({n_layers}) makes layers "
            f"{dense}..{n_layers - 1} mixture-of-experts (n_routed_experts {experts}), which is not supported; "
            f"expected first_k_dense_replace >= num_hidden_layers (dense MLP layers only)"
        )
    heads, kv_heads = hf.get("num_attention_heads"), hf.get("num_key_value_heads")
    if kv_heads is not None and kv_heads != heads:
        raise ValueError(
            f"config.json: num_key_value_heads ({kv_heads}) must equal num_attention_heads ({heads}): MLA expands "
            f"the latent to every head"
        )


def build(hf: dict, *, page_size: int = 16, cache_dtype: str = "bfloat16", attention: str = "auto") -> ModelPlan:
    """The plan of a `deepseek_v2` or `deepseek_v3` checkpoint (see the module docstring)."""
    model_type = hf["model_type"]
    check_attention(attention)
    n_layers = config_field(hf, "num_hidden_layers")
    _refuse_unsupported(hf, n_layers)
    rope_dim = config_field(hf, "qk_rope_head_dim")
    if rope_dim % 2:
        raise ValueError(f"config.json: qk_rope_head_dim ({rope_dim}) must be even: RoPE rotates pairs of dimensions")
    n_heads = config_field(hf, "num_attention_heads")
    q_lora = hf.get("q_lora_rank")
    config = DeepseekConfig(
        model_type=model_type,
        vocab=config_field(hf, "vocab_size"),
        d_model=config_field(hf, "hidden_size"),
        n_layers=n_layers,
        n_heads=n_heads,
        head_dim=config_field(hf, "qk_nope_head_dim"),
        rope_dim=rope_dim,
        kv_lora_rank=config_field(hf, "kv_lora_rank"),
        v_head_dim=config_field(hf, "v_head_dim"),
        q_lora_rank=None if q_lora is None else config_field(hf, "q_lora_rank"),
        mlp_dim=config_field(hf, "intermediate_size"),
        norm_eps=config_field(hf, "rms_norm_eps", float, default=1e-6),
        rope_inv_freq=_inv_freq(hf, rope_dim),
        interleaved=model_type == "deepseek_v2" or config_field(hf, "rope_interleave", bool, default=True),
        query_scale=_query_scale(hf),
        page_size=page_size,
        cache_dtype=cache_dtype,
        attention=attention,
    )
    latent_width = config.kv_lora_rank + rope_dim
    params = paged_cache_params(
        cache_dtype,
        n_kv_heads=1,
        head_dim=latent_width,
        num_layers=n_layers,
        page_size=page_size,
        is_mla=True,
        widths=(config.kv_lora_rank, rope_dim),
    )
    check_pallas(
        attention, params, page_size=page_size, head_dim=latent_width, groups=n_heads, value_dim=config.kv_lora_rank
    )
    return ModelPlan(
        config=config,
        cache_params=params,
        attention=mla,
        weights=_weights(hf, config),
        tp_split={"num_attention_heads": n_heads, "intermediate_size": config.mlp_dim},
    )


# -- RoPE: transformers' yarn (`_compute_yarn_parameters`, `yarn_apply_mscale`), else llama.py's scalings --------


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _inv_freq(hf: dict, rope_dim: int) -> tuple[float, ...]:
    """RoPE's inverse frequencies over the RoPE dims: yarn as transformers computes it (the DeepSeek-V3 scaling),
    else `jaxkv.hf.llama.scaled_inv_freq` (default, linear, llama3; others refused)."""
    p = _rope_parameters(hf)
    if p["rope_type"] != "yarn":
        return scaled_inv_freq(hf, rope_dim)
    base, factor = config_field(p, "rope_theta", float), config_field(p, "factor", float)
    context = config_field(p, "original_max_position_embeddings", float)
    beta_fast, beta_slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:  # the dim whose wavelength fits `rotations` times in `context`
        return rope_dim * math.log(context / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rope_dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    out = []
    for i in range(rope_dim // 2):
        extrapolated = base ** (-2 * i / rope_dim)
        keep = 1 - min(max((i - low) / (high - low), 0.0), 1.0)  # 1: original frequency, 0: slowed by `factor`
        out.append(extrapolated / factor * (1 - keep) + extrapolated * keep)
    return tuple(out)


def _query_scale(hf: dict) -> tuple[float, float]:
    """See `DeepseekConfig.query_scale`. transformers multiplies the softmax scale by mscale(factor,
    mscale_all_dim) ** 2 for any non-default RoPE with `mscale_all_dim`, and yarn's cos/sin by its
    `attention_factor`: both scale the scores linearly, so they fold into the query (the cache keeps plain keys)."""
    p = _rope_parameters(hf)
    softmax = 1.0
    if p["rope_type"] != "default" and p.get("mscale_all_dim"):
        softmax = _yarn_mscale(config_field(p, "factor", float), p["mscale_all_dim"]) ** 2
    amplitude = 1.0
    if p["rope_type"] == "yarn":
        amplitude = p.get("attention_factor")
        if amplitude is None:
            factor, mscale, mscale_all_dim = config_field(p, "factor", float), p.get("mscale"), p.get("mscale_all_dim")
            if mscale and mscale_all_dim:
                amplitude = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
            else:
                amplitude = _yarn_mscale(factor)
    return softmax, softmax * amplitude**2


# -- readers ------------------------------------------------------------------------------------------------


def _rope_order(c: DeepseekConfig) -> np.ndarray:
    """The order jaxkv keeps the RoPE dims in: evens then odds for interleaved checkpoints, else as is."""
    r = c.rope_dim
    return np.concatenate([np.arange(0, r, 2), np.arange(1, r, 2)]) if c.interleaved else np.arange(r)


def _query_heads(source: str, c: DeepseekConfig, width: int) -> Weight:
    """q_proj / q_b_proj [H * (k + r), width] -> [width, H, k + r], column-parallel over heads, RoPE dims
    reordered (`_rope_order`)."""
    per_head = c.head_dim + c.rope_dim
    order = np.concatenate([np.arange(c.head_dim), c.head_dim + _rope_order(c)])
    nope_scale, rope_scale = c.query_scale
    scale = np.repeat(np.asarray([nope_scale, rope_scale], np.float32), [c.head_dim, c.rope_dim])[:, None]

    def read(t: SafeSlice, part: slice) -> np.ndarray:
        start, stop, _ = part.indices(c.n_heads)
        rows = np.asarray(t[start * per_head : stop * per_head], np.float32).reshape(-1, per_head, width)
        rows = rows[:, order] if c.query_scale == (1.0, 1.0) else rows[:, order] * scale
        return rows.transpose(2, 0, 1)

    return Weight(source, (c.n_heads * per_head, width), (width, c.n_heads, per_head), 1, read)


def _latent_down(source: str, c: DeepseekConfig) -> Weight:
    """kv_a_proj_with_mqa [kv_lora_rank + r, d] -> [d, kv_lora_rank + r], replicated, RoPE rows reordered."""
    order = np.concatenate([np.arange(c.kv_lora_rank), c.kv_lora_rank + _rope_order(c)])
    rows = c.kv_lora_rank + c.rope_dim
    return Weight(source, (rows, c.d_model), (c.d_model, rows), None, lambda t, part: t[:][order].T)


def _latent_up(source: str, c: DeepseekConfig, which: str) -> Weight:
    """One half of kv_b_proj [H * (k + v), kv_lora_rank], split over heads: "uk" -> [H, k, kv_lora_rank] (absorbed
    into the query), "uv" -> [H, kv_lora_rank, v] (applied to the attention-weighted latent)."""
    k, v, rank = c.head_dim, c.v_head_dim, c.kv_lora_rank

    def read(t: SafeSlice, part: slice) -> np.ndarray:
        start, stop, _ = part.indices(c.n_heads)
        heads = t[start * (k + v) : stop * (k + v)].reshape(-1, k + v, rank)
        return heads[:, :k] if which == "uk" else heads[:, k:].transpose(0, 2, 1)

    shape = (c.n_heads, k, rank) if which == "uk" else (c.n_heads, rank, v)
    return Weight(source, (c.n_heads * (k + v), rank), shape, 0, read)


def _weights(hf: dict, c: DeepseekConfig) -> dict:
    d = c.d_model
    attn = "model.layers.{layer}.self_attn."
    layers = decoder_layer(
        d,
        c.mlp_dim,
        {
            "w_dkv": _latent_down(attn + "kv_a_proj_with_mqa.weight", c),
            "kv_norm": as_is(attn + "kv_a_layernorm.weight", (c.kv_lora_rank,)),
            "w_uk": _latent_up(attn + "kv_b_proj.weight", c, "uk"),
            "w_uv": _latent_up(attn + "kv_b_proj.weight", c, "uv"),
            "wo": heads_in(attn + "o_proj.weight", c.n_heads, c.v_head_dim, d),
        },
    )
    if c.q_lora_rank is None:
        layers["wq"] = _query_heads(attn + "q_proj.weight", c, d)
    else:
        layers["wq_a"] = transposed(attn + "q_a_proj.weight", c.q_lora_rank, d)
        layers["q_a_norm"] = as_is(attn + "q_a_layernorm.weight", (c.q_lora_rank,))
        layers["wq_b"] = _query_heads(attn + "q_b_proj.weight", c, c.q_lora_rank)
    return decoder_weights(hf, c.vocab, d, layers)


for _model_type in MODEL_TYPES:
    ARCHITECTURES[_model_type] = build
