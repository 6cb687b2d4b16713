"""jaxkv.hf's GQA models (llama, qwen2, qwen3) against Hugging Face `transformers` (PyTorch, CPU, float32),
token for token.

Each architecture of `_reference.GQA` (Llama 3 with llama3 RoPE scaling and tied embeddings, Llama with
attention biases, Qwen2, Qwen3 with head_dim != hidden / heads) is a small random model saved with
`save_pretrained` and loaded into jaxkv. Checked: prefill logits within float32 1e-4 relative, then 32 greedy
tokens identical to `generate(do_sample=False)`; a second request sharing a two-page prefix with the first,
its prefix served from device, host, disk and Redis; and an FP8 cache's logit error.

Every architecture runs at TP 2 with XLA attention (the load the prefix test shares). TP 1, TP 4 and the
Pallas kernel (interpret mode on CPU: slow) each run on one architecture: the sharding and the kernel are the
same code for all four, so one shows each; each load costs a compile (~3 s on 2 cores).
"""

import pytest
from _reference import GQA, check_fp8_cache_error, check_matches, check_prefix_from_every_tier

CASES = [(a, 2, "xla") for a in GQA] + [
    ("llama3", 1, "xla"),  # unsharded, tied embeddings
    ("llama-bias", 4, "xla"),  # one KV head per shard; the output bias added once after the 4-way sum
    ("qwen3", 2, "pallas"),  # head_dim 32 != hidden / heads, 4 query heads per KV head
]


@pytest.mark.parametrize(("arch", "tp", "impl"), CASES, ids=[f"{a}-tp{tp}-{impl}" for a, tp, impl in CASES])
def test_matches_transformers(arch, tp, impl):
    check_matches(arch, tp, impl)


@pytest.mark.parametrize("arch", GQA)
def test_prefix_from_every_tier(arch, tmp_path, redis_server):
    check_prefix_from_every_tier(arch, tmp_path, redis_server.url)


# FP8's scale groups span gcd(32, head_dim) elements of a K/V head: 16 for Llama 3 (as llama-bias and qwen2),
# 32 for Qwen3. The cache and its quantization do not depend on the projections around attention.
@pytest.mark.parametrize("arch", ["llama3", "qwen3"])
def test_fp8_cache_error(arch):
    check_fp8_cache_error(arch)
