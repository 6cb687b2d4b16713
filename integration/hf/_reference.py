"""What integration/hf's reference tests share: the small random models, transformers' greedy reference on them,
jaxkv's greedy decode on its paged cache, and the comparisons.

Each architecture is a small random-initialised model built from the real config class (`LlamaConfig`,
`Qwen2Config`, `Qwen3Config`, `DeepseekV2Config`, `DeepseekV3Config`), saved with `save_pretrained` and run in
torch (float32, CPU) once per test session. jaxkv models are loaded once per (architecture, TP degree,
attention, cache dtype) per session: each load compiles its own programs (~3 s on 2 cores), so tests that
share a configuration share the load.
"""

from __future__ import annotations

import dataclasses
import functools
import tempfile
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
import transformers

import jaxkv
import jaxkv.hf

PAGE_SIZE = 16
NEW_TOKENS = 32
PROMPT_TOKENS = 40
SHARED_TOKENS = 32  # two full pages: what prefix caching can reuse
SUFFIX_TOKENS = 40
"""Tokens of the second request after the shared prefix: its prefill pads to the 64-token bucket the first
prompt's already compiled (a suffix of 16 or fewer would compile one more program per model, ~1 s)."""
VOCAB = 512
TABLE_PAGES = 8  # every page table has this width: one compiled program per token bucket
NUM_PAGES = 2 * TABLE_PAGES + 1
"""Device cache pages of every test's cache (page 0 is the null page): one cache shape, so a loaded model's
programs serve the private runs and the prefix-caching runs alike."""
RTOL = 1e-4
"""Prefill logits: max |jaxkv - torch| / max |torch| of a float32 model with a float32 cache."""

FP8_BOUND = 0.15
"""FP8 (float8_e4m3fn, float32 power-of-two scales per group of gcd(32, head_dim) elements) cache against the
float32 model: bound on max |diff| / max |logit| of the prefill. Measured on the GQA models (2 layers, 40
tokens, logits up to ~6): 0.047-0.105 with FP8, 0.0033-0.0076 with bfloat16; on the MLA latent caches
0.061-0.076 and 0.0042-0.0062. The ratio, 11-16, is what the mantissas predict: e4m3 keeps 3 bits, bfloat16 7,
so each cached element is rounded 2^4 = 16 times coarser. The bound is 1.5x the worst measured;
`FP8_OVER_BF16` checks the error is rounding's."""

FP8_OVER_BF16 = 32
"""FP8's logit error may be at most 2 x 16 times bfloat16's (the mantissa ratio, with room for the scale
groups' power-of-two rounding): a scale or dequantisation bug shows as an error that does not shrink with the
cache's precision."""


@dataclasses.dataclass(frozen=True)
class Arch:
    name: str
    config_class: str
    fields: dict


# Every model: 2 layers, vocabulary 512. DeepSeek's have 2 dense layers (`first_k_dense_replace` =
# `num_hidden_layers`: jaxkv refuses MoE layers).
ARCHS = {
    a.name: a
    for a in (
        # Llama 3: llama3 RoPE scaling (original context 32 tokens, so all three frequency bands occur within the
        # up to 104 positions of a test) and tied embeddings; 16 query / 4 KV heads as Llama 3 8B's 32 / 8.
        Arch("llama3", "LlamaConfig", dict(
            hidden_size=256, intermediate_size=512, num_attention_heads=16, num_key_value_heads=4,
            tie_word_embeddings=True, rope_theta=500_000.0,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 32},
        )),
        # Llama with attention_bias: biases on q/k/v and the output projection; untied unembedding.
        Arch("llama-bias", "LlamaConfig", dict(
            hidden_size=128, intermediate_size=256, num_attention_heads=8, num_key_value_heads=4, attention_bias=True,
        )),
        Arch("qwen2", "Qwen2Config", dict(
            hidden_size=128, intermediate_size=384, num_attention_heads=8, num_key_value_heads=4,
            rope_theta=1_000_000.0,
        )),
        # Qwen3: head_dim 32 while hidden / heads = 8 (as Qwen3-0.6B: 16 heads of 128 over a 1024 hidden).
        Arch("qwen3", "Qwen3Config", dict(
            hidden_size=128, intermediate_size=256, num_attention_heads=16, num_key_value_heads=4, head_dim=32,
            rope_theta=1_000_000.0,
        )),
        # DeepSeek MLA. Queries projected directly (q_lora_rank None, as DeepSeek-V2-Lite); v_head_dim 24 unlike
        # qk_nope 32.
        Arch("deepseek-v2", "DeepseekV2Config", dict(
            first_k_dense_replace=2, hidden_size=128, intermediate_size=256, num_attention_heads=8,
            num_key_value_heads=8, kv_lora_rank=64, q_lora_rank=None, qk_nope_head_dim=32, qk_rope_head_dim=16,
            v_head_dim=24,
        )),
        # Query LoRA (q_a_proj + q_a_layernorm + q_b_proj, as DeepSeek-V2).
        Arch("deepseek-v2-qlora", "DeepseekV2Config", dict(
            first_k_dense_replace=2, hidden_size=256, intermediate_size=384, num_attention_heads=8,
            num_key_value_heads=8, kv_lora_rank=128, q_lora_rank=96, qk_nope_head_dim=32, qk_rope_head_dim=32,
            v_head_dim=32,
        )),
        # DeepSeek-V3's attention (rope_interleave true: the same interleaved pairs, another code path).
        Arch("deepseek-v3", "DeepseekV3Config", dict(
            first_k_dense_replace=2, hidden_size=128, intermediate_size=256, num_attention_heads=8,
            num_key_value_heads=8, kv_lora_rank=64, q_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16,
            v_head_dim=32,
        )),
        # DeepSeek-V3's yarn RoPE: factor 8 = max_position_embeddings / an original context of 32 tokens, so the
        # frequency ramp falls within the test's positions; mscale != mscale_all_dim, so both the softmax mscale and
        # cos/sin's attention_factor differ from 1.
        Arch("deepseek-v3-yarn", "DeepseekV3Config", dict(
            first_k_dense_replace=2, hidden_size=128, intermediate_size=256, num_attention_heads=8,
            num_key_value_heads=8, kv_lora_rank=64, q_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16,
            v_head_dim=32,
            rope_parameters={"rope_type": "yarn", "rope_theta": 10_000.0, "factor": 8.0, "beta_fast": 32,
                             "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 0.8,
                             "original_max_position_embeddings": 32},
        )),
    )
}  # fmt: skip
GQA = ["llama3", "llama-bias", "qwen2", "qwen3"]
MLA = ["deepseek-v2", "deepseek-v2-qlora", "deepseek-v3", "deepseek-v3-yarn"]

_scratch = tempfile.TemporaryDirectory(prefix="jaxkv-hf-")


@functools.cache
def _torch_model(name: str) -> tuple[Path, torch.nn.Module]:
    arch = ARCHS[name]
    torch.manual_seed(0)
    config = getattr(transformers, arch.config_class)(
        vocab_size=VOCAB, num_hidden_layers=2, max_position_embeddings=256, initializer_range=0.1,
        bos_token_id=None, eos_token_id=None, pad_token_id=0, **arch.fields,
    )  # fmt: skip
    # initializer_range 0.1 (not 0.02): larger weights give decisive greedy choices, not near-ties at 1e-6.
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    directory = Path(_scratch.name) / name
    model.save_pretrained(directory, safe_serialization=True)
    return directory, model


def checkpoint(name: str) -> Path:
    """The architecture's random model, saved (once per session) as a Hugging Face checkpoint directory."""
    return _torch_model(name)[0]


@dataclasses.dataclass(frozen=True)
class Reference:
    """A saved checkpoint and what `transformers` computes on it."""

    name: str
    directory: Path
    prompts: list[np.ndarray]  # the first request's prompt, then one sharing its first SHARED_TOKENS
    logits: np.ndarray  # float32 [PROMPT_TOKENS, vocab] of prompts[0]
    generated: list[np.ndarray]  # NEW_TOKENS greedy tokens after each prompt


def hf_generate(model, prompt: np.ndarray, new_tokens: int = NEW_TOKENS, *, min_new_tokens: int | None = None):
    """transformers' greedy continuation (`generate(do_sample=False)`) of `prompt`: its new tokens."""
    ids = torch.as_tensor(prompt[None])
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=min_new_tokens,
            do_sample=False,
        )  # fmt: skip
    return out[0, len(prompt) :].numpy()


@functools.cache
def reference(name: str) -> Reference:
    """The architecture's checkpoint, its prompts, and transformers' prefill logits and greedy tokens (once per
    session)."""
    directory, model = _torch_model(name)
    rng = np.random.default_rng(1)
    first = rng.integers(1, VOCAB, PROMPT_TOKENS)
    second = np.concatenate([first[:SHARED_TOKENS], rng.integers(1, VOCAB, SUFFIX_TOKENS)])
    with torch.no_grad():
        logits = model(torch.as_tensor(first[None])).logits[0].numpy()
    generated = [hf_generate(model, p, min_new_tokens=NEW_TOKENS) for p in (first, second)]
    return Reference(name, directory, [first, second], logits, generated)


def mesh(tp: int):
    return jax.make_mesh((tp,), ("tp",), devices=jax.devices()[:tp])


def load(name: str, tp: int, attention: str = "xla", cache_dtype: str = "float32") -> jaxkv.hf.CheckpointModel:
    """jaxkv's model of the architecture's checkpoint (once per session and configuration)."""
    return _load(name, tp, attention, cache_dtype)  # one cache key however the defaults were passed


@functools.cache
def _load(name: str, tp: int, attention: str, cache_dtype: str) -> jaxkv.hf.CheckpointModel:
    return jaxkv.hf.load_checkpoint(
        checkpoint(name), mesh(tp), page_size=PAGE_SIZE, cache_dtype=cache_dtype, attention=attention
    )


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def greedy(model, cache, prompt, start: int, table, *, grow=None, eos: int | None = None, new_tokens=NEW_TOKENS):
    """Prefill prompt[start:] (prompt[:start] already cached), then decode greedily: `new_tokens` tokens, or
    fewer ending in `eos` (as `generate` stops).

    `table()` gives the page table for the tokens so far; `grow(token)`, when given, appends a token to the
    request (a manager's `append_tokens`). Returns (prompt logits, generated tokens, cache)."""
    logits, cache = model.prefill(cache, prompt[start:], start, table())
    prompt_logits = np.asarray(logits)
    tokens = [int(np.argmax(prompt_logits[-1]))]
    pos = len(prompt)
    while len(tokens) < new_tokens and tokens[-1] != eos:
        if grow is not None:
            grow(tokens[-1])
        logits, cache = model.prefill(cache, [tokens[-1]], pos, table())
        tokens.append(int(np.argmax(np.asarray(logits)[-1])))
        pos += 1
    return prompt_logits, np.asarray(tokens), cache


def run_private(model, prompt, *, table_pages: int = TABLE_PAGES, num_pages: int = NUM_PAGES, eos=None):
    """One request on a private cache: pages 1.. in order. Returns (prompt logits, generated tokens)."""
    table = np.arange(1, table_pages + 1, dtype=np.int32)
    logits, tokens, _ = greedy(model, model.allocate_cache(num_pages), prompt, 0, lambda: table, eos=eos)
    return logits, tokens


def check_logits(logits: np.ndarray, want: np.ndarray, label: str) -> None:
    err = relative_error(logits, want)
    print(f"\n{label}: prefill logits max relative error {err:.2e}")
    assert err < RTOL, f"{label}: prefill logits max |diff| / max |ref| = {err:.3e} > {RTOL:g}"


def check_generation(ref: Reference, tokens: np.ndarray, which: int, label: str) -> None:
    want = ref.generated[which]
    assert len(set(want.tolist())) > 4, f"{label}: the reference generation is degenerate: {want}"
    if not np.array_equal(tokens, want):
        i = int(np.argmax(tokens != want))
        pytest.fail(
            f"{label}: token {i} of {NEW_TOKENS} differs: jaxkv {tokens.tolist()} vs transformers {want.tolist()}"
        )


def check_matches(name: str, tp: int, attention: str) -> jaxkv.hf.CheckpointModel:
    """Prefill logits within `RTOL` and NEW_TOKENS greedy tokens identical to transformers', on a private cache.
    Returns the model."""
    ref = reference(name)
    model = load(name, tp, attention)
    label = f"{name} TP {tp} {attention}"
    logits, tokens = run_private(model, ref.prompts[0])
    check_logits(logits, ref.logits, label)
    check_generation(ref, tokens, 0, label)
    return model


def check_prefix_from_every_tier(name: str, tmp_path: Path, redis_url: str, tp: int = 2) -> None:
    """A second request sharing two pages with the first: its prefix from device, host memory, disk after a
    restart, then Redis on a second instance, each time followed by NEW_TOKENS greedy tokens identical to
    transformers' on the second prompt."""
    from jaxkv.tiers.remote import RemoteTier

    ref = reference(name)
    model = load(name, tp)
    first, second = ref.prompts
    row = jaxkv.RowLayout.of(model.cache_params, tp=tp).row_bytes
    disk = tmp_path / "disk"

    def manager(store):
        return jaxkv.PagedKVCacheManager(model.cache_params, store, num_pages=NUM_PAGES, tp=tp)

    def stack(*, with_disk, with_remote):
        cache = model.allocate_cache(NUM_PAGES)
        tiers = [RemoteTier(redis_url, prefix=f"hf-{name}:", socket_timeout=5)] if with_remote else []
        kw = dict(disk_directory=disk, disk_capacity_bytes=64 * row) if with_disk else {}
        store, worker = jaxkv.open_tiers(cache, 8 * row, tiers=tiers, **kw)
        return cache, store, worker, manager(store)

    def serve(state, rid, prompt, *, commit=False):
        cache, store, worker, mgr = state
        req = mgr.add_request(rid, prompt)
        if req.load is not None:
            cache, handle = worker.load(cache, req.load)
            req = mgr.complete_load(handle.result())
        _, tokens, cache = greedy(
            model, cache, prompt, req.num_cached_tokens, lambda: mgr.page_table(rid, width=TABLE_PAGES),
            grow=lambda t: mgr.append_tokens(rid, [t]),
        )  # fmt: skip
        plan = mgr.commit(rid, len(prompt)) if commit else None
        if plan is not None:
            mgr.complete_store(worker.store(cache, plan).result())
        mgr.finish(rid)
        return (cache, store, worker, mgr), req, tokens

    # The first request computes everything and stores its two full pages in host memory, on disk and in Redis.
    # The second prompt's requests store nothing: every tier holds the first request's pages only.
    state, req, tokens = serve(stack(with_disk=True, with_remote=True), "first", first, commit=True)
    assert req.num_cached_tokens == 0
    check_generation(ref, tokens, 0, f"{name} first request")
    sources = {}
    state, req, tokens = serve(state, "device", second)
    sources["device"] = (req, tokens)
    # A fresh device cache over the same store: the prefix comes back from host memory.
    state = (model.allocate_cache(NUM_PAGES), *state[1:3], manager(state[1]))
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
        check_generation(ref, tokens, 1, f"{name} prefix from {source}")


def check_fp8_cache_error(name: str) -> None:
    """An FP8 cache's prefill logit error against transformers' float32: below `FP8_BOUND`, and at most
    `FP8_OVER_BF16` times a bfloat16 cache's."""
    ref = reference(name)
    table = np.arange(1, TABLE_PAGES + 1, dtype=np.int32)
    errors = {}
    for dtype in ("bfloat16", "float8_e4m3fn"):
        model = load(name, 1, cache_dtype=dtype)
        logits, _ = model.prefill(model.allocate_cache(NUM_PAGES), ref.prompts[0], 0, table)
        errors[dtype] = relative_error(np.asarray(logits), ref.logits)
    fp8, bf16 = errors["float8_e4m3fn"], errors["bfloat16"]
    print(f"\n{name}: prefill logits max relative error, FP8 cache {fp8:.2e}, bfloat16 cache {bf16:.2e}")
    assert fp8 < FP8_BOUND, f"{name} FP8 cache: max |diff| / max |ref| = {fp8:.3e} >= {FP8_BOUND}"
    assert fp8 < FP8_OVER_BF16 * bf16, f"{name}: FP8 error {fp8:.3e} > {FP8_OVER_BF16} x bfloat16's {bf16:.3e}"
