"""jaxkv.hf's DeepSeek-V2/V3 (MLA) models against Hugging Face `transformers` (PyTorch, CPU, float32).

As test_reference.py does for the GQA families: a small random-initialised model from `DeepseekV2Config` /
`DeepseekV3Config` (2 dense layers: `first_k_dense_replace` = `num_hidden_layers`, since jaxkv refuses MoE
layers), saved with `save_pretrained` and loaded into jaxkv's absorbed MLA over the latent cache. Checked:
prefill logits within float32 1e-4 relative, 32 greedy tokens identical to `generate(do_sample=False)` at TP 1,
2 and 4 (XLA) and TP 2 (Pallas, interpret mode), and a second request sharing a two-page prefix, served from
device, host memory, disk and Redis, token-identical; and an FP8 latent cache's logit error (measured 0.061-0.076
relative, 11-16x bfloat16's 0.0042-0.0062: e4m3's 3 mantissa bits against bfloat16's 7).
"""

import dataclasses
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from test_reference import (
    FP8_BOUND,
    FP8_OVER_BF16,
    NEW_TOKENS,
    PAGE_SIZE,
    PROMPT_TOKENS,
    RTOL,
    SHARED_TOKENS,
    TABLE_PAGES,
    VOCAB,
    Reference,
    check_generation,
    greedy,
    mesh,
    relative_error,
    run_private,
)

import jaxkv
import jaxkv.hf


@dataclasses.dataclass(frozen=True)
class Arch:
    name: str
    config_class: str
    fields: dict


ARCHS = {
    a.name: a
    for a in (
        # Queries projected directly (q_lora_rank None, as DeepSeek-V2-Lite); v_head_dim 24 unlike qk_nope 32.
        Arch("deepseek-v2", "DeepseekV2Config", dict(
            hidden_size=128, intermediate_size=256, num_attention_heads=8, num_key_value_heads=8, kv_lora_rank=64,
            q_lora_rank=None, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=24,
        )),
        # Query LoRA (q_a_proj + q_a_layernorm + q_b_proj, as DeepSeek-V2).
        Arch("deepseek-v2-qlora", "DeepseekV2Config", dict(
            hidden_size=256, intermediate_size=384, num_attention_heads=8, num_key_value_heads=8, kv_lora_rank=128,
            q_lora_rank=96, qk_nope_head_dim=32, qk_rope_head_dim=32, v_head_dim=32,
        )),
        # DeepSeek-V3's attention (rope_interleave true: the same interleaved pairs, another code path).
        Arch("deepseek-v3", "DeepseekV3Config", dict(
            hidden_size=128, intermediate_size=256, num_attention_heads=8, num_key_value_heads=8, kv_lora_rank=64,
            q_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
        )),
        # DeepSeek-V3's yarn RoPE: factor 8 = max_position_embeddings / an original context of 32 tokens, so the
        # frequency ramp falls within the test's positions; mscale != mscale_all_dim, so both the softmax mscale and
        # cos/sin's attention_factor differ from 1.
        Arch("deepseek-v3-yarn", "DeepseekV3Config", dict(
            hidden_size=128, intermediate_size=256, num_attention_heads=8, num_key_value_heads=8, kv_lora_rank=64,
            q_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
            rope_parameters={"rope_type": "yarn", "rope_theta": 10_000.0, "factor": 8.0, "beta_fast": 32,
                             "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 0.8,
                             "original_max_position_embeddings": 32},
        )),
    )
}  # fmt: skip

_references: dict[str, Reference] = {}
_scratch = tempfile.TemporaryDirectory(prefix="jaxkv-hf-deepseek-")


def reference(name: str) -> Reference:
    """Build (once per run) the architecture's random model in torch, save it, and run it."""
    if name in _references:
        return _references[name]
    arch = ARCHS[name]
    torch.manual_seed(0)
    config = getattr(transformers, arch.config_class)(
        vocab_size=VOCAB, num_hidden_layers=2, first_k_dense_replace=2, max_position_embeddings=256,
        initializer_range=0.1, bos_token_id=None, eos_token_id=None, pad_token_id=0, **arch.fields,
    )  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    directory = Path(_scratch.name) / name
    model.save_pretrained(directory, safe_serialization=True)
    rng = np.random.default_rng(1)
    first = rng.integers(1, VOCAB, PROMPT_TOKENS)
    second = np.concatenate([first[:SHARED_TOKENS], rng.integers(1, VOCAB, 9)])
    generated = []
    with torch.no_grad():
        logits = model(torch.as_tensor(first[None])).logits[0].numpy()
        for prompt in (first, second):
            ids = torch.as_tensor(prompt[None])
            out = model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                do_sample=False,
            )  # fmt: skip
            generated.append(out[0, len(prompt) :].numpy())
    _references[name] = Reference(directory, [first, second], logits, generated)
    return _references[name]


CASES = [(a, tp, "xla") for a in ARCHS for tp in (1, 2, 4)] + [(a, 2, "pallas") for a in ARCHS]


@pytest.mark.parametrize(("arch", "tp", "impl"), CASES, ids=[f"{a}-tp{tp}-{impl}" for a, tp, impl in CASES])
def test_matches_transformers(arch, tp, impl):
    ref = reference(arch)
    model = jaxkv.hf.load_checkpoint(
        ref.directory, mesh(tp), page_size=PAGE_SIZE, cache_dtype="float32", attention=impl
    )
    assert model.cache_params.is_mla and model.cache_params.n_kv_heads == 1
    logits, tokens = run_private(model, ref.prompts[0])
    err = relative_error(logits, ref.logits)
    print(f"\n{arch} TP {tp} {impl}: prefill logits max relative error {err:.2e}")
    assert err < RTOL, f"{arch} TP {tp} {impl}: prefill logits max |diff| / max |ref| = {err:.3e} > {RTOL:g}"
    check_generation(ref, tokens, 0, f"{arch} TP {tp} {impl}")


@pytest.mark.parametrize("arch", list(ARCHS))
def test_prefix_from_every_tier(arch, tmp_path, redis_server):
    """A second request sharing two pages with the first: its prefix from device, host memory, disk after a
    restart, then Redis on a second instance, each time followed by 32 greedy tokens identical to transformers'
    on the second prompt."""
    from jaxkv.tiers.remote import RemoteTier

    ref = reference(arch)
    model = jaxkv.hf.load_checkpoint(ref.directory, mesh(2), page_size=PAGE_SIZE, cache_dtype="float32")
    first, second = ref.prompts
    num_pages = 2 * TABLE_PAGES + 1
    row = jaxkv.RowLayout.of(model.cache_params, tp=2).row_bytes
    disk = tmp_path / "disk"

    def stack(*, with_disk, with_remote):
        cache = model.allocate_cache(num_pages)
        tiers = [RemoteTier(redis_server.url, prefix=f"hf-{arch}:", socket_timeout=5)] if with_remote else []
        kw = dict(disk_directory=disk, disk_capacity_bytes=64 * row) if with_disk else {}
        store, worker = jaxkv.open_tiers(cache, 8 * row, tiers=tiers, **kw)
        return cache, store, worker, jaxkv.PagedKVCacheManager(model.cache_params, store, num_pages=num_pages, tp=2)

    def serve(state, rid, prompt):
        cache, store, worker, manager = state
        req = manager.add_request(rid, prompt)
        if req.load is not None:
            cache, handle = worker.load(cache, req.load)
            req = manager.complete_load(handle.result())
        _, tokens, cache = greedy(
            model, cache, prompt, req.num_cached_tokens, lambda: manager.page_table(rid, width=TABLE_PAGES),
            grow=lambda t: manager.append_tokens(rid, [t]),
        )  # fmt: skip
        plan = manager.commit(rid, len(prompt))
        if plan is not None:
            manager.complete_store(worker.store(cache, plan).result())
        manager.finish(rid)
        return (cache, store, worker, manager), req, tokens

    # The first request stores its two full pages in host memory, on disk and in Redis.
    state, req, tokens = serve(stack(with_disk=True, with_remote=True), "first", first)
    assert req.num_cached_tokens == 0
    check_generation(ref, tokens, 0, f"{arch} first request")
    sources = {}
    state, req, tokens = serve(state, "device", second)
    sources["device"] = (req, tokens)
    # A fresh device cache over the same store: the prefix comes back from host memory.
    state = (model.allocate_cache(num_pages), *state[1:3], jaxkv.PagedKVCacheManager(
        model.cache_params, state[1], num_pages=num_pages, tp=2))  # fmt: skip
    state, req, tokens = serve(state, "host", second)
    sources["host"] = (req, tokens)
    state[2].close()
    # A restart on the same disk directory, without Redis: from disk.
    state, req, tokens = serve(stack(with_disk=True, with_remote=False), "disk", second)
    sources["disk"] = (req, tokens)
    state[2].close()
    # A second instance with Redis only: from the remote tier.
    state, req, tokens = serve(stack(with_disk=False, with_remote=True), "remote", second)
    sources["remote"] = (req, tokens)
    state[2].close()
    for source, (req, tokens) in sources.items():
        assert req.num_cached_tokens == SHARED_TOKENS, f"{source}: {req}"
        assert req.tokens_from.get(source, 0) == SHARED_TOKENS, f"{source}: prefix came from {req.tokens_from}"
        check_generation(ref, tokens, 1, f"{arch} prefix from {source}")


@pytest.mark.parametrize("arch", list(ARCHS))
def test_fp8_cache_error(arch):
    """The FP8 latent cache's prefill logit error against transformers' float32, bounded as test_reference.py's
    GQA models are (`FP8_BOUND`) and relative to a bfloat16 cache's (`FP8_OVER_BF16`)."""
    ref = reference(arch)
    errors = {}
    for dtype in ("bfloat16", "float8_e4m3fn"):
        model = jaxkv.hf.load_checkpoint(ref.directory, mesh(1), page_size=PAGE_SIZE, cache_dtype=dtype)
        cache = model.allocate_cache(TABLE_PAGES + 1)
        logits, _ = model.prefill(cache, ref.prompts[0], 0, np.arange(1, TABLE_PAGES + 1, dtype=np.int32))
        errors[dtype] = relative_error(np.asarray(logits), ref.logits)
    fp8, bf16 = errors["float8_e4m3fn"], errors["bfloat16"]
    print(f"\n{arch}: prefill logits max relative error, FP8 cache {fp8:.2e}, bfloat16 cache {bf16:.2e}")
    assert fp8 < FP8_BOUND, f"{arch} FP8 cache: max |diff| / max |ref| = {fp8:.3e} >= {FP8_BOUND}"
    assert fp8 < FP8_OVER_BF16 * bf16, f"{arch}: FP8 error {fp8:.3e} > {FP8_OVER_BF16} x bfloat16's {bf16:.3e}"
