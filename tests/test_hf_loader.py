"""jaxkv.hf.load_checkpoint on tiny checkpoints written here (no torch): TinyModel's weights in Hugging Face's
layout load into the same logits at TP 1, 2 and 4; mismatched checkpoints are refused before any device write."""

import hf_checkpoints
import ml_dtypes
import numpy as np
import pytest
from hf_checkpoints import PAGE_SIZE, VOCAB, run, tp_mesh, write

import jaxkv.hf
from jaxkv.models import TinyConfig, TinyModel

TINY = TinyConfig(kind="mha", vocab=VOCAB, d_model=64, n_layers=2, n_heads=8, n_kv_heads=4, head_dim=16,
                  page_size=PAGE_SIZE, cache_dtype="float32")  # fmt: skip


def hf_config(c: TinyConfig = TINY, **overrides) -> dict:
    """config.json of a Llama checkpoint shaped like `c` (TinyModel's RoPE base and RMSNorm epsilon)."""
    fields = {"num_key_value_heads": c.n_kv_heads, "head_dim": c.head_dim, "rope_theta": 10_000.0}
    return hf_checkpoints.decoder_config(c, "llama", **fields) | overrides


def hf_tensors(model: TinyModel) -> dict[str, np.ndarray]:
    """TinyModel's weights in Hugging Face's layout: q/k/v projections [heads * head_dim, d]."""
    d = model.config.d_model
    return hf_checkpoints.decoder_tensors(
        model,
        lambda lw: {
            "q_proj.weight": lw["wq"].reshape(d, -1).T,
            "k_proj.weight": lw["wk"].reshape(d, -1).T,
            "v_proj.weight": lw["wv"].reshape(d, -1).T,
        },
    )


@pytest.fixture(scope="module")
def reference():
    """TinyModel at TP 1, its weights in HF layout, and its logits over PROMPT."""
    model = TinyModel(TINY, tp_mesh(1))
    return hf_tensors(model), run(model)


def test_tiny_model_weights_load_at_every_tp_degree(tmp_path, reference):
    tensors, expected = reference
    ckpt = write(tmp_path, hf_config(), tensors, shards=3)
    logits = {}
    for tp in (1, 2, 4):
        model = jaxkv.hf.load_checkpoint(ckpt, tp_mesh(tp), page_size=PAGE_SIZE, cache_dtype="float32")
        # Each device holds its heads only: a quarter of wq's heads at TP 4, never the whole weight.
        shard_shapes = {s.data.shape for s in model.weights["layers"]["wq"].addressable_shards}
        assert shard_shapes == {(TINY.n_layers, TINY.d_model, TINY.n_heads // tp, TINY.head_dim)}
        assert (model.config.page_size, model.config.vocab) == (PAGE_SIZE, TINY.vocab)
        logits[tp] = run(model)
    # TP 1 is the same program as TinyModel on the same weights: equal bits. Across TP degrees the psum adds
    # the shards' partial sums in another order: float32 rounding, well under 1e-5.
    np.testing.assert_array_equal(logits[1], expected)
    for tp in (2, 4):
        np.testing.assert_allclose(logits[tp], logits[1], rtol=1e-5, atol=1e-5, err_msg=f"TP {tp}")


def test_bfloat16_weights_widen_exactly(tmp_path, reference):
    """A bf16 checkpoint's words become float32 weights bit for bit (no float round trip on the way)."""
    tensors, _ = reference
    bf16 = {k: v.astype(ml_dtypes.bfloat16) for k, v in tensors.items()}
    model = jaxkv.hf.load_checkpoint(write(tmp_path, hf_config(), bf16), tp_mesh(2), cache_dtype="float32")
    got = np.asarray(model.weights["layers"]["w_down"][1])
    np.testing.assert_array_equal(got, bf16["model.layers.1.mlp.down_proj.weight"].astype(np.float32).T)


def refusal_cases():
    """(name, how the checkpoint is spoiled, tp, the message's start)."""
    return [
        ("unknown model_type", {"config": {"model_type": "gpt2"}}, 1,
         "config.json: model_type 'gpt2' is not supported; expected one of ['deepseek_v2', 'deepseek_v3', 'llama', 'qwen2', 'qwen3']"),
        ("missing tensor", {"drop": "model.layers.1.mlp.up_proj.weight"}, 1,
         "checkpoint: tensor 'model.layers.1.mlp.up_proj.weight' is missing; expected shape [128, 64]"),
        ("wrong shape", {"reshape": ("model.layers.0.self_attn.k_proj.weight", (32, 64))}, 1,
         "checkpoint: tensor 'model.layers.0.self_attn.k_proj.weight' has shape [32, 64], but config.json implies [64, 64]"),
        ("kv heads vs tp", {"config": {"num_key_value_heads": 2}}, 4,
         "num_key_value_heads (2) must be divisible by the TP degree (4) of mesh axis 'tp', but 2 % 4 = 2"),
        ("rope type", {"config": {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}}, 1,
         "config.json: rope_type 'yarn' is not supported; expected one of ('default', 'linear', 'llama3')"),
        ("activation", {"config": {"hidden_act": "gelu"}}, 1,
         "config.json: hidden_act 'gelu' is not supported; expected 'silu' (SwiGLU)"),
        ("missing field", {"config": {"hidden_size": None}}, 1,
         "config.json: field 'hidden_size' is missing; expected a int"),
        ("dtype", {"retype": ("model.norm.weight", np.int32)}, 1,
         "checkpoint: tensor 'model.norm.weight' has dtype I32; expected one of ('F32', 'BF16', 'F16', 'F64')"),
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("spoil", "tp", "message"), [c[1:] for c in refusal_cases()], ids=[c[0] for c in refusal_cases()]
)
def test_refusals_before_any_device_write(tmp_path, reference, monkeypatch, spoil, tp, message):
    config = hf_config(**spoil.get("config", {}))
    config = {k: v for k, v in config.items() if v is not None}  # {"field": None}: the field is missing
    checkpoint = write(tmp_path, config, hf_checkpoints.spoiled(reference[0], spoil))
    hf_checkpoints.assert_refused_before_placing(monkeypatch, checkpoint, tp_mesh(tp), message)


def test_rope_scaling_llama3():
    """llama3 scaling keeps short wavelengths, slows long ones by `factor`, interpolates the band between."""
    from jaxkv.hf.llama import scaled_inv_freq

    rope = {"rope_type": "llama3", "rope_theta": 500_000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}  # fmt: skip
    plain = scaled_inv_freq({"rope_theta": 500_000.0}, 16)
    scaled = scaled_inv_freq({"rope_parameters": rope}, 16)
    wavelen = 2 * np.pi / np.asarray(plain)
    short, long = wavelen < 64 / 4, wavelen > 64 / 1
    assert short.any() and long.any() and (~short & ~long).any()
    np.testing.assert_allclose(np.asarray(scaled)[short], np.asarray(plain)[short])
    np.testing.assert_allclose(np.asarray(scaled)[long], np.asarray(plain)[long] / 8)
    mid = ~short & ~long
    assert (np.asarray(scaled)[mid] < np.asarray(plain)[mid]).all()
    assert (np.asarray(scaled)[mid] > np.asarray(plain)[mid] / 8).all()
