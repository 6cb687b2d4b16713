"""Llama 3, Qwen2 and Qwen3 checkpoints: one GQA decoder family with per-architecture details.

- `llama`: GQA; RoPE scaled as config.json says (none/"default", "linear", "llama3");
  `attention_bias` adds biases to q/k/v and the output projection; `tie_word_embeddings`.
- `qwen2`: biases on q/k/v (not on the output projection).
- `qwen3`: QK-norm (an RMSNorm per head on q and k, before RoPE); `head_dim` independent of hidden/heads.

RoPE parameters are read from transformers 5's `rope_parameters` or, in checkpoints written before it,
from `rope_theta` and `rope_scaling`.
"""

from __future__ import annotations

import dataclasses
import math

from jaxkv._decoder import gqa, paged_cache_params, rope_inv_freq
from jaxkv.hf._common import check_attention, check_pallas, decoder_layer, decoder_weights, refuse_non_swiglu
from jaxkv.hf._plan import ARCHITECTURES, ModelPlan, as_is, config_field, heads_bias, heads_in, heads_out

ROPE_TYPES = ("default", "linear", "llama3")
"""RoPE scalings this loader implements; others ("dynamic", "yarn", "longrope", ...) are refused."""


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """A Llama-family checkpoint's shape, as jaxkv's forward pass reads it (`jaxkv._decoder.DecoderConfig`)."""

    model_type: str
    """config.json's `model_type`."""
    vocab: int
    """`vocab_size`: token ids are in [0, vocab)."""
    d_model: int
    """`hidden_size`: width of the residual stream."""
    n_layers: int
    """`num_hidden_layers`."""
    n_heads: int
    """`num_attention_heads`: query heads."""
    n_kv_heads: int
    """`num_key_value_heads`."""
    head_dim: int
    """`head_dim`, or hidden_size / num_attention_heads when config.json has none."""
    mlp_dim: int
    """`intermediate_size`: SwiGLU hidden width."""
    norm_eps: float
    """`rms_norm_eps`."""
    rope_inv_freq: tuple[float, ...]
    """RoPE's inverse frequencies (head_dim / 2), scaled as config.json says."""
    page_size: int
    """Tokens per cache page."""
    cache_dtype: str
    """The cache's dtype; weights and activations are float32."""
    attention: str
    """`paged_attention`'s implementation: "auto", "xla" or "pallas"."""


def _rope_parameters(hf: dict) -> dict:
    """{"rope_type", "rope_theta", ...} from either spelling of config.json."""
    if isinstance(hf.get("rope_parameters"), dict):
        params = dict(hf["rope_parameters"])
    else:
        params = dict(hf.get("rope_scaling") or {})
        params.setdefault("rope_theta", hf.get("rope_theta", 10_000.0))
    params["rope_type"] = params.get("rope_type", params.get("type", "default"))
    return params


def scaled_inv_freq(hf: dict, head_dim: int) -> tuple[float, ...]:
    """RoPE's inverse frequencies for config.json's RoPE parameters; ValueError for a scaling not implemented."""
    p = _rope_parameters(hf)
    kind = p["rope_type"]
    if kind not in ROPE_TYPES:
        raise ValueError(f"config.json: rope_type {kind!r} is not supported; expected one of {ROPE_TYPES}")
    theta = config_field(p, "rope_theta", float)
    inv = rope_inv_freq(theta, head_dim)
    if kind == "default":
        return inv
    factor = config_field(p, "factor", float)
    if kind == "linear":
        return tuple(f / factor for f in inv)
    # llama3: long wavelengths slowed by `factor`, short ones kept, the band between interpolated.
    low, high = config_field(p, "low_freq_factor", float), config_field(p, "high_freq_factor", float)
    context = config_field(p, "original_max_position_embeddings", float)
    if high <= low:
        raise ValueError(f"config.json: llama3 high_freq_factor ({high}) must exceed low_freq_factor ({low})")
    out = []
    for f in inv:
        wavelen = 2 * math.pi / f
        if wavelen < context / high:
            out.append(f)
        elif wavelen > context / low:
            out.append(f / factor)
        else:
            smooth = (context / wavelen - low) / (high - low)
            out.append((1 - smooth) * f / factor + smooth * f)
    return tuple(out)


def _refuse_unsupported(hf: dict, model_type: str) -> None:
    refuse_non_swiglu(hf)
    if hf.get("use_sliding_window"):
        raise ValueError("config.json: use_sliding_window true is not supported; expected false (full attention)")
    kinds = set(hf.get("layer_types") or ["full_attention"])
    if kinds != {"full_attention"}:
        raise ValueError(f"config.json: layer_types {sorted(kinds)} are not supported; expected 'full_attention'")


def build(hf: dict, *, page_size: int = 16, cache_dtype: str = "bfloat16", attention: str = "auto") -> ModelPlan:
    """The plan of a `llama`, `qwen2` or `qwen3` checkpoint (see the module docstring)."""
    model_type = hf["model_type"]
    _refuse_unsupported(hf, model_type)
    check_attention(attention)
    d = config_field(hf, "hidden_size")
    n_heads = config_field(hf, "num_attention_heads")
    n_kv = config_field(hf, "num_key_value_heads", default=n_heads)
    if n_heads % n_kv:
        raise ValueError(
            f"config.json: num_attention_heads ({n_heads}) must be a multiple of num_key_value_heads ({n_kv}), "
            f"but {n_heads} % {n_kv} = {n_heads % n_kv}"
        )
    head_dim = config_field(hf, "head_dim", default=d // n_heads)
    if head_dim % 2:
        raise ValueError(f"config.json: head_dim ({head_dim}) must be even: RoPE rotates pairs of dimensions")
    config = CheckpointConfig(
        model_type=model_type,
        vocab=config_field(hf, "vocab_size"),
        d_model=d,
        n_layers=config_field(hf, "num_hidden_layers"),
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=head_dim,
        mlp_dim=config_field(hf, "intermediate_size"),
        norm_eps=config_field(hf, "rms_norm_eps", float, default=1e-6),
        rope_inv_freq=scaled_inv_freq(hf, head_dim),
        page_size=page_size,
        cache_dtype=cache_dtype,
        attention=attention,
    )
    params = paged_cache_params(
        cache_dtype, n_kv_heads=n_kv, head_dim=head_dim, num_layers=config.n_layers, page_size=page_size
    )
    check_pallas(attention, params, page_size=page_size, head_dim=head_dim, groups=n_heads // n_kv, value_dim=head_dim)
    return ModelPlan(
        config=config,
        cache_params=params,
        attention=gqa,
        weights=_weights(hf, config),
        tp_split={"num_attention_heads": n_heads, "num_key_value_heads": n_kv, "intermediate_size": config.mlp_dim},
    )


def _weights(hf: dict, c: CheckpointConfig) -> dict:
    d, hd = c.d_model, c.head_dim
    attn = "model.layers.{layer}.self_attn."
    layers = decoder_layer(
        d,
        c.mlp_dim,
        {
            "wq": heads_out(attn + "q_proj.weight", c.n_heads, hd, d),
            "wk": heads_out(attn + "k_proj.weight", c.n_kv_heads, hd, d),
            "wv": heads_out(attn + "v_proj.weight", c.n_kv_heads, hd, d),
            "wo": heads_in(attn + "o_proj.weight", c.n_heads, hd, d),
        },
    )
    qkv_bias = c.model_type == "qwen2" or bool(hf.get("attention_bias"))
    if qkv_bias:
        for name, heads in (("q", c.n_heads), ("k", c.n_kv_heads), ("v", c.n_kv_heads)):
            layers["b" + name] = heads_bias(attn + f"{name}_proj.bias", heads, hd)
    if c.model_type != "qwen2" and hf.get("attention_bias"):
        layers["bo"] = as_is(attn + "o_proj.bias", (d,))
    if c.model_type == "qwen3":
        layers["q_norm"] = as_is(attn + "q_norm.weight", (hd,))
        layers["k_norm"] = as_is(attn + "k_norm.weight", (hd,))
    return decoder_weights(hf, c.vocab, d, layers)


for _model_type in ("llama", "qwen2", "qwen3"):
    ARCHITECTURES[_model_type] = build
