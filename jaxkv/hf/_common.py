"""What every architecture under jaxkv/hf shares: the checks of config.json's SwiGLU MLP and of the attention
implementation asked for, and the weights of a Llama-style decoder around its attention (the two RMSNorms and
the SwiGLU MLP of each layer, the embedding, the final norm, the unembedding)."""

from __future__ import annotations

from jaxkv.attention.xla import IMPLS
from jaxkv.hf._plan import Weight, as_is, transposed
from jaxkv.layout.params import KVCacheParams


def check_attention(attention: str) -> None:
    """ValueError unless `attention` names an implementation of `paged_attention`."""
    if attention not in IMPLS:
        raise ValueError(f"attention must be one of {IMPLS}, got {attention!r}")


def refuse_non_swiglu(hf: dict) -> None:
    """ValueError unless config.json's MLP is the bias-free SwiGLU the forward pass runs."""
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"config.json: hidden_act {act!r} is not supported; expected 'silu' (SwiGLU)")
    if hf.get("mlp_bias"):
        raise ValueError("config.json: mlp_bias true is not supported; expected false")


def check_pallas(
    attention: str, params: KVCacheParams, *, page_size: int, head_dim: int, groups: int, value_dim: int
) -> None:
    """With attention="pallas": ValueError (`jaxkv.attention.pallas.unsupported`'s line) when the Pallas kernel
    cannot attend over this cache; any other implementation takes every layout."""
    if attention != "pallas":
        return
    from jaxkv.attention import pallas

    granularity = None if params.quant is None else params.quant.granularity
    problem = pallas.unsupported(
        page_size=page_size, head_dim=head_dim, groups=groups, value_dim=value_dim, granularity=granularity
    )
    if problem is not None:
        raise ValueError(problem)


def decoder_layer(d_model: int, mlp_dim: int, attention: dict[str, Weight]) -> dict[str, Weight]:
    """One layer's weights: the attention and MLP norms, `attention` (the architecture's own projections), the
    SwiGLU MLP (gate/up column-parallel, down row-parallel). The loader checks and places them in this order."""
    d, f = d_model, mlp_dim
    mlp = "model.layers.{layer}.mlp."
    return {
        "attn_norm": as_is("model.layers.{layer}.input_layernorm.weight", (d,)),
        "mlp_norm": as_is("model.layers.{layer}.post_attention_layernorm.weight", (d,)),
        **attention,
        "w_gate": transposed(mlp + "gate_proj.weight", f, d, split=1),
        "w_up": transposed(mlp + "up_proj.weight", f, d, split=1),
        "w_down": transposed(mlp + "down_proj.weight", d, f, split=0),
    }


def decoder_weights(hf: dict, vocab: int, d_model: int, layers: dict[str, Weight]) -> dict:
    """The whole weight tree around `layers`: the embedding, the final norm, and the unembedding (the
    embedding itself when config.json says `tie_word_embeddings`, else `lm_head`)."""
    tied = bool(hf.get("tie_word_embeddings", False))
    return {
        "embed": as_is("model.embed_tokens.weight", (vocab, d_model)),
        "final_norm": as_is("model.norm.weight", (d_model,)),
        "unembed": transposed("model.embed_tokens.weight" if tied else "lm_head.weight", vocab, d_model),
        "layers": layers,
    }
