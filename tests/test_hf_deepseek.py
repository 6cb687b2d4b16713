"""jaxkv.hf's DeepSeek-V2/V3 loader on tiny checkpoints written here (no torch): TinyModel's MLA weights in
DeepSeek's layout (interleaved RoPE pairs, kv_b_proj holding both up-projections) load into the same logits at
TP 1, 2 and 4; a query-LoRA checkpoint runs alike at TP 1 and 4; MoE layers and unsupported RoPE are refused.
The comparison against transformers itself is integration/hf/test_deepseek_reference.py."""

import hf_checkpoints
import numpy as np
import pytest
from hf_checkpoints import PAGE_SIZE, VOCAB, run, tp_mesh, write

import jaxkv.hf
from jaxkv.models import TinyConfig, TinyModel

TINY = TinyConfig(kind="mla", vocab=VOCAB, d_model=64, n_layers=2, n_heads=8, head_dim=16, kv_lora_rank=32,
                  rope_dim=16, page_size=PAGE_SIZE, cache_dtype="float32")  # fmt: skip


def hf_config(c: TinyConfig = TINY, **overrides) -> dict:
    """config.json of a dense DeepSeek-V2 checkpoint shaped like `c` (as transformers 5 writes it)."""
    fields = {
        "num_key_value_heads": c.n_heads,
        "qk_nope_head_dim": c.head_dim,
        "qk_rope_head_dim": c.rope_dim,
        "v_head_dim": c.head_dim,
        "kv_lora_rank": c.kv_lora_rank,
        "q_lora_rank": None,
        "first_k_dense_replace": c.n_layers,
        "n_routed_experts": 64,
        "rope_parameters": {"rope_theta": 10_000.0, "rope_type": "default"},
    }
    return hf_checkpoints.decoder_config(c, "deepseek_v2", **fields) | overrides


def interleaved(rope_dim: int) -> np.ndarray:
    """Where DeepSeek keeps each of jaxkv's RoPE dims: jaxkv's halves (i, i + r/2) are its pairs (2i, 2i + 1)."""
    return np.argsort(np.concatenate([np.arange(0, rope_dim, 2), np.arange(1, rope_dim, 2)]))


def hf_tensors(model: TinyModel) -> dict[str, np.ndarray]:
    """TinyModel's MLA weights in DeepSeek's layout: linear weights [out, in], RoPE dims as interleaved pairs,
    kv_b_proj holding each head's key and value up-projections."""
    c = model.config
    d, k, rank = c.d_model, c.head_dim, c.kv_lora_rank
    assert isinstance(c, TinyConfig)
    back = interleaved(c.rope_dim)

    def attention(lw: dict) -> dict:
        q = np.concatenate([lw["wq"][..., :k], lw["wq"][..., k:][..., back]], axis=-1)  # [d, H, k + r]
        dkv = np.concatenate([lw["w_dkv"][:, :rank], lw["w_dkv"][:, rank:][:, back]], axis=-1)
        kv_b = np.concatenate([lw["w_uk"], lw["w_uv"].transpose(0, 2, 1)], axis=1)  # [H, k + v, rank]
        return {
            "q_proj.weight": q.reshape(d, -1).T,
            "kv_a_proj_with_mqa.weight": dkv.T,
            "kv_a_layernorm.weight": lw["kv_norm"],
            "kv_b_proj.weight": kv_b.reshape(-1, rank),
        }

    return hf_checkpoints.decoder_tensors(model, attention)


@pytest.fixture(scope="module")
def reference():
    """TinyModel's MLA at TP 1, its weights in DeepSeek's layout, and its logits over PROMPT (two chunks)."""
    model = TinyModel(TINY, tp_mesh(1))
    return hf_tensors(model), run(model)


def test_tiny_mla_weights_load_at_every_tp_degree(tmp_path, reference):
    tensors, expected = reference
    ckpt = write(tmp_path, hf_config(), tensors, shards=2)
    logits = {}
    for tp in (1, 2, 4):
        model = jaxkv.hf.load_checkpoint(ckpt, tp_mesh(tp), page_size=PAGE_SIZE, cache_dtype="float32")
        p = model.cache_params
        assert (p.is_mla, p.n_kv_heads, p.head_dim, p.kv_dim) == (True, 1, TINY.kv_lora_rank + TINY.rope_dim, 1)
        assert model.allocate_cache(2).replicates_kv_across_tp == (tp > 1)  # the latent is the same on every shard
        shard_shapes = {s.data.shape for s in model.weights["layers"]["w_uk"].addressable_shards}
        assert shard_shapes == {(TINY.n_layers, TINY.n_heads // tp, TINY.head_dim, TINY.kv_lora_rank)}
        logits[tp] = run(model)
    # TP 1 runs TinyModel's program on the same weights, the RoPE permutation undone by the loader.
    np.testing.assert_allclose(logits[1], expected, rtol=1e-6, atol=1e-6)
    for tp in (2, 4):
        np.testing.assert_allclose(logits[tp], logits[1], rtol=1e-5, atol=1e-5, err_msg=f"TP {tp}")


def test_query_lora_same_logits_at_every_tp_degree(tmp_path, reference):
    """q_lora_rank: q_a_proj + q_a_layernorm + q_b_proj replace q_proj; the query latent is replicated, q_b_proj
    split over heads."""
    tensors, _ = reference
    rng = np.random.default_rng(2)
    q_rank, d, width = 24, TINY.d_model, TINY.n_heads * (TINY.head_dim + TINY.rope_dim)
    tensors = {name: a for name, a in tensors.items() if not name.endswith("q_proj.weight")}
    for i in range(TINY.n_layers):
        p = f"model.layers.{i}.self_attn."
        tensors[p + "q_a_proj.weight"] = rng.standard_normal((q_rank, d), np.float32) / np.sqrt(d)
        tensors[p + "q_a_layernorm.weight"] = 1 + 0.1 * rng.standard_normal(q_rank, np.float32)
        tensors[p + "q_b_proj.weight"] = rng.standard_normal((width, q_rank), np.float32) / np.sqrt(q_rank)
    ckpt = write(tmp_path, hf_config(q_lora_rank=q_rank), tensors)
    logits = {}
    for tp in (1, 4):  # TP 2 adds nothing TP 4 does not check (and 2 s)
        model = jaxkv.hf.load_checkpoint(ckpt, tp_mesh(tp), page_size=PAGE_SIZE, cache_dtype="float32")
        logits[tp] = run(model)
    assert np.abs(logits[1]).max() > 1  # not a degenerate model
    np.testing.assert_allclose(logits[4], logits[1], rtol=1e-5, atol=1e-5, err_msg="TP 4")


def refusal_cases():
    """(name, how the checkpoint is spoiled, tp, the message's start)."""
    return [
        ("moe layers", {"config": {"first_k_dense_replace": 1}}, 1,
         "config.json: first_k_dense_replace (1) < num_hidden_layers (2) makes layers 1..1 mixture-of-experts "
         "(n_routed_experts 64), which is not supported"),
        ("rope type", {"config": {"rope_parameters": {"rope_type": "dynamic", "rope_theta": 10_000.0, "factor": 4.0}}},
         1, "config.json: rope_type 'dynamic' is not supported; expected one of ('default', 'linear', 'llama3')"),
        ("heads vs tp", {"config": {"num_attention_heads": 6, "num_key_value_heads": 6}}, 4,
         "num_attention_heads (6) must be divisible by the TP degree (4) of mesh axis 'tp', but 6 % 4 = 2"),
        ("missing tensor", {"drop": "model.layers.1.self_attn.kv_b_proj.weight"}, 2,
         "checkpoint: tensor 'model.layers.1.self_attn.kv_b_proj.weight' is missing; expected shape [256, 32]"),
        ("wrong shape", {"reshape": ("model.layers.0.self_attn.kv_a_proj_with_mqa.weight", (32, 64))}, 2,
         "checkpoint: tensor 'model.layers.0.self_attn.kv_a_proj_with_mqa.weight' has shape [32, 64], but "
         "config.json implies [48, 64]"),
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("spoil", "tp", "message"), [c[1:] for c in refusal_cases()], ids=[c[0] for c in refusal_cases()]
)
def test_refusals_before_any_device_write(tmp_path, reference, monkeypatch, spoil, tp, message):
    checkpoint = write(tmp_path, hf_config(**spoil.get("config", {})), hf_checkpoints.spoiled(reference[0], spoil))
    hf_checkpoints.assert_refused_before_placing(monkeypatch, checkpoint, tp_mesh(tp), message)
