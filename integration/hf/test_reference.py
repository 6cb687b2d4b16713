"""jaxkv.hf's models against Hugging Face `transformers` (PyTorch, CPU, float32), token for token.

For each architecture a small random-initialised model is built from the real config class
(`LlamaConfig`, `Qwen2Config`, `Qwen3Config`), saved with `save_pretrained` and loaded into jaxkv.
Checked: prefill logits within float32 1e-4 relative (max |jaxkv - torch| / max |torch|), then 32 greedy
tokens identical to `generate(do_sample=False)`, at TP 1, 2 and 4 with XLA attention and at TP 2 with the
Pallas kernel (in interpret mode on CPU: slow, so one TP degree); a second request sharing a two-page
prefix with the first, its prefix served from device, host, disk and Redis; and an FP8 cache's logit error.
"""

import dataclasses
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
VOCAB = 512
TABLE_PAGES = 8  # every page table has this width: one compiled program per token bucket
RTOL = 1e-4
"""Prefill logits: max |jaxkv - torch| / max |torch| of a float32 model with a float32 cache."""


@dataclasses.dataclass(frozen=True)
class Arch:
    name: str
    config_class: str
    fields: dict


ARCHS = {
    a.name: a
    for a in (
        # Llama 3: llama3 RoPE scaling (original context 32 tokens, so all three frequency bands occur within the
        # 72 positions of a test) and tied embeddings; 16 query / 4 KV heads as Llama 3 8B's 32 / 8.
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
    )
}  # fmt: skip


@dataclasses.dataclass
class Reference:
    """A saved checkpoint and what `transformers` computes on it."""

    directory: Path
    prompts: list[np.ndarray]  # the first request's prompt, then one sharing its first SHARED_TOKENS
    logits: np.ndarray  # float32 [PROMPT_TOKENS, vocab] of prompts[0]
    generated: list[np.ndarray]  # NEW_TOKENS greedy tokens after each prompt


_references: dict[str, Reference] = {}
_scratch = tempfile.TemporaryDirectory(prefix="jaxkv-hf-")


def reference(name: str) -> Reference:
    """Build (once per run) the architecture's random model in torch, save it, and run it."""
    if name in _references:
        return _references[name]
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


def mesh(tp: int):
    return jax.make_mesh((tp,), ("tp",), devices=jax.devices()[:tp])


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def greedy(model, cache, prompt, start: int, table, *, grow=None):
    """Prefill prompt[start:] (prompt[:start] already cached), then decode NEW_TOKENS greedily.

    `table()` gives the page table for the tokens so far; `grow(token)`, when given, appends a token to the
    request (a manager's `append_tokens`). Returns (prompt logits, generated tokens, cache)."""
    logits, cache = model.prefill(cache, prompt[start:], start, table())
    prompt_logits = np.asarray(logits)
    tokens = [int(np.argmax(prompt_logits[-1]))]
    pos = len(prompt)
    while len(tokens) < NEW_TOKENS:
        if grow is not None:
            grow(tokens[-1])
        logits, cache = model.prefill(cache, [tokens[-1]], pos, table())
        tokens.append(int(np.argmax(np.asarray(logits)[-1])))
        pos += 1
    return prompt_logits, np.asarray(tokens), cache


def run_private(model, prompt):
    """One request on a private cache: pages 1.. in order."""
    cache = model.allocate_cache(TABLE_PAGES + 1)
    table = np.arange(1, TABLE_PAGES + 1, dtype=np.int32)
    logits, tokens, _ = greedy(model, cache, prompt, 0, lambda: table)
    return logits, tokens


def check_generation(ref: Reference, tokens: np.ndarray, which: int, label: str):
    want = ref.generated[which]
    assert len(set(want.tolist())) > 4, f"{label}: the reference generation is degenerate: {want}"
    if not np.array_equal(tokens, want):
        i = int(np.argmax(tokens != want))
        pytest.fail(
            f"{label}: token {i} of {NEW_TOKENS} differs: jaxkv {tokens.tolist()} vs transformers {want.tolist()}"
        )


CASES = [(a, tp, "xla") for a in ARCHS for tp in (1, 2, 4)] + [(a, 2, "pallas") for a in ARCHS]


@pytest.mark.parametrize(("arch", "tp", "impl"), CASES, ids=[f"{a}-tp{tp}-{impl}" for a, tp, impl in CASES])
def test_matches_transformers(arch, tp, impl):
    ref = reference(arch)
    model = jaxkv.hf.load_checkpoint(
        ref.directory, mesh(tp), page_size=PAGE_SIZE, cache_dtype="float32", attention=impl
    )
    logits, tokens = run_private(model, ref.prompts[0])
    err = relative_error(logits, ref.logits)
    print(f"\n{arch} TP {tp} {impl}: prefill logits max relative error {err:.2e}")
    assert err < RTOL, f"{arch} TP {tp} {impl}: prefill logits max |diff| / max |ref| = {err:.3e} > {RTOL:g}"
    check_generation(ref, tokens, 0, f"{arch} TP {tp} {impl}")


@pytest.mark.parametrize("arch", list(ARCHS))
def test_prefix_from_every_tier(arch, tmp_path, redis_server):
    """A second request sharing two pages with the first: its prefix from device, host, disk, then Redis, each
    time followed by 32 greedy tokens identical to transformers' on the second prompt."""
    from jaxkv.tiers.remote import RemoteTier

    ref = reference(arch)
    model = jaxkv.hf.load_checkpoint(ref.directory, mesh(2), page_size=PAGE_SIZE, cache_dtype="float32")
    first, second = ref.prompts
    num_pages = 2 * TABLE_PAGES + 1
    row = jaxkv.RowLayout.of(model.cache_params, tp=2).row_bytes
    disk = tmp_path / "disk"

    def stack(host_pages, *, with_disk, with_remote):
        cache = model.allocate_cache(num_pages)
        tiers = [RemoteTier(redis_server.url, prefix=f"hf-{arch}:", socket_timeout=5)] if with_remote else []
        kw = dict(disk_directory=disk, disk_capacity_bytes=64 * row) if with_disk else {}
        store, worker = jaxkv.open_tiers(cache, host_pages * row, tiers=tiers, **kw)
        return cache, store, worker, jaxkv.PagedKVCacheManager(model.cache_params, store, num_pages=num_pages, tp=2)

    def serve(state, rid, prompt):
        cache, store, worker, manager = state
        req = manager.add_request(rid, prompt)
        if req.load is not None:
            cache, handle = worker.load(cache, req.load)
            req = manager.complete_load(handle.result())
        start = req.num_cached_tokens
        _, tokens, cache = greedy(
            model, cache, prompt, start, lambda: manager.page_table(rid, width=TABLE_PAGES),
            grow=lambda t: manager.append_tokens(rid, [t]),
        )  # fmt: skip
        plan = manager.commit(rid, len(prompt))
        if plan is not None:
            manager.complete_store(worker.store(cache, plan).result())
        manager.finish(rid)
        return (cache, store, worker, manager), req, tokens

    # The first request computes everything and stores its two full pages in host memory, on disk and in Redis.
    state, req, tokens = serve(stack(8, with_disk=True, with_remote=True), "first", first)
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
    state, req, tokens = serve(stack(8, with_disk=True, with_remote=False), "disk", second)
    sources["disk"] = (req, tokens)
    state[2].close()
    # A second instance with Redis only: from the remote tier.
    state, req, tokens = serve(stack(8, with_disk=False, with_remote=True), "remote", second)
    sources["remote"] = (req, tokens)
    state[2].close()
    for source, (req, tokens) in sources.items():
        assert req.num_cached_tokens == SHARED_TOKENS, f"{source}: {req}"
        assert req.tokens_from.get(source, 0) == SHARED_TOKENS, f"{source}: prefix came from {req.tokens_from}"
        check_generation(ref, tokens, 1, f"{arch} prefix from {source}")


FP8_BOUND = 0.15
"""FP8 (float8_e4m3fn, float32 power-of-two scales per group of gcd(32, head_dim) elements) cache against the
float32 model: bound on max |diff| / max |logit| of the prefill. Measured on these models (2 layers, 40
tokens, logits up to ~6): 0.047-0.105 with FP8, 0.0033-0.0076 with bfloat16. The ratio, 14-16, is what the
mantissas predict: e4m3 keeps 3 bits, bfloat16 7, so each cached K/V element is rounded 2^4 = 16 times
coarser. The bound is 1.5x the worst measured; `FP8_OVER_BF16` checks the error is rounding's."""

FP8_OVER_BF16 = 32
"""FP8's logit error may be at most 2 x 16 times bfloat16's (the mantissa ratio, with room for the scale
groups' power-of-two rounding): a scale or dequantisation bug shows as an error that does not shrink with the
cache's precision."""


@pytest.mark.parametrize("arch", list(ARCHS))
def test_fp8_cache_error(arch):
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
