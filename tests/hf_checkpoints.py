"""Tiny Hugging Face checkpoints written here (no torch), for test_hf_loader.py and test_hf_deepseek.py: a
TinyModel's weights in Hugging Face's layout, config.json, the safetensors files, a spoiled copy, and the
check that a spoiled checkpoint is refused before any device write."""

import json
from collections.abc import Callable

import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

import jaxkv.hf
from jaxkv.models import TinyConfig, TinyModel

PAGE_SIZE = 16
VOCAB = 128
"""Both tiny models' vocabulary: PROMPT's token ids are below it."""
PROMPT = np.random.default_rng(1).integers(0, VOCAB, 40)
PAGES = np.arange(1, 4, dtype=np.int32)


def tp_mesh(tp):
    return jax.make_mesh((tp,), ("tp",), devices=jax.devices()[:tp])


def run(model):
    """The logits over PROMPT, prefilled in two chunks."""
    first, cache = model.prefill(model.allocate_cache(4), PROMPT[:24], 0, PAGES)
    rest, _ = model.prefill(cache, PROMPT[24:], 24, PAGES)  # the second chunk attends to the first's pages
    return np.concatenate([np.asarray(first), np.asarray(rest)])


def decoder_config(c: TinyConfig, model_type: str, **fields) -> dict:
    """config.json of a `model_type` checkpoint shaped like `c`: the fields every architecture reads, then
    `fields` (the architecture's own)."""
    return {
        "model_type": model_type,
        "vocab_size": c.vocab,
        "hidden_size": c.d_model,
        "num_hidden_layers": c.n_layers,
        "num_attention_heads": c.n_heads,
        "intermediate_size": c.mlp_dim,
        "rms_norm_eps": 1e-6,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
    } | fields


def decoder_tensors(model: TinyModel, attention: Callable[[dict], dict]) -> dict[str, np.ndarray]:
    """TinyModel's weights in Hugging Face's layout (linear weights [out, in], heads flattened): the embedding,
    the norms, the output projection and the MLP here; each layer's other attention tensors are
    `attention(that layer's jaxkv weights)`, {name under "self_attn.": array}."""
    w = jax.tree.map(np.asarray, model.weights)
    d = model.config.d_model
    out = {
        "model.embed_tokens.weight": w["embed"],
        "model.norm.weight": w["final_norm"],
        "lm_head.weight": w["unembed"].T,
    }
    for i in range(model.config.n_layers):
        lw = {name: a[i] for name, a in w["layers"].items()}
        p = f"model.layers.{i}."
        out |= {p + "self_attn." + name: a for name, a in attention(lw).items()}
        out |= {
            p + "input_layernorm.weight": lw["attn_norm"],
            p + "post_attention_layernorm.weight": lw["mlp_norm"],
            p + "self_attn.o_proj.weight": lw["wo"].reshape(-1, d).T,
            p + "mlp.gate_proj.weight": lw["w_gate"].T,
            p + "mlp.up_proj.weight": lw["w_up"].T,
            p + "mlp.down_proj.weight": lw["w_down"].T,
        }
    return {name: np.ascontiguousarray(a) for name, a in out.items()}


def write(directory, config: dict, tensors: dict, shards: int = 1):
    """A checkpoint directory: config.json and the tensors in `shards` files (an index file when more than one)."""
    (directory / "config.json").write_text(json.dumps(config))
    names = sorted(tensors)
    if shards == 1:
        save_file(tensors, str(directory / "model.safetensors"))
        return directory
    weight_map = {}
    for s in range(shards):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[s::shards]}
        save_file(part, str(directory / file))
        weight_map |= dict.fromkeys(part, file)
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return directory


def spoiled(tensors: dict, spoil: dict) -> dict:
    """A copy of `tensors` spoiled as `spoil` says: {"drop": name}, {"reshape": (name, shape)} (zeros of that
    shape), {"retype": (name, dtype)}; other keys of `spoil` (a test's "config") are left to the test."""
    tensors = dict(tensors)
    if "drop" in spoil:
        del tensors[spoil["drop"]]
    if "reshape" in spoil:
        name, shape = spoil["reshape"]
        tensors[name] = np.zeros(shape, np.float32)
    if "retype" in spoil:
        name, dtype = spoil["retype"]
        tensors[name] = tensors[name].astype(dtype)
    return tensors


def assert_refused_before_placing(monkeypatch, checkpoint, mesh, message: str) -> None:
    """load_checkpoint(checkpoint, mesh) raises one line of ValueError that starts with `message`, before it
    places a single weight on a device."""
    placed = []
    real = jax.make_array_from_callback
    monkeypatch.setattr(jax, "make_array_from_callback", lambda *a, **k: placed.append(a) or real(*a, **k))
    with pytest.raises(ValueError) as e:
        jaxkv.hf.load_checkpoint(checkpoint, mesh)
    assert str(e.value).startswith(message), str(e.value)
    assert "\n" not in str(e.value), str(e.value)
    # Nothing half-loaded: the refusal came before the first weight was placed.
    assert placed == [], f"{len(placed)} weights placed before the refusal: {e.value}"
