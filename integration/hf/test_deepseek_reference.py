"""jaxkv.hf's DeepSeek-V2/V3 (MLA) models against Hugging Face `transformers` (PyTorch, CPU, float32).

As test_reference.py does for the GQA families, for each architecture of `_reference.MLA` (DeepSeek-V2 without
query LoRA and v_head_dim != qk_nope_head_dim, DeepSeek-V2 with query LoRA, DeepSeek-V3's interleaved RoPE,
DeepSeek-V3 with yarn RoPE): a small random model from `DeepseekV2Config` / `DeepseekV3Config` loaded into
jaxkv's absorbed MLA over the latent cache. Checked: prefill logits within float32 1e-4 relative, 32 greedy
tokens identical to `generate(do_sample=False)`, a second request sharing a two-page prefix, served from
device, host memory, disk and Redis, token-identical; and an FP8 latent cache's logit error.

Every architecture runs at TP 2 with XLA attention; TP 1, TP 4 and the Pallas kernel (interpret mode) each on
one architecture, as in test_reference.py.
"""

import pytest
from _reference import MLA, check_fp8_cache_error, check_matches, check_prefix_from_every_tier

CASES = [(a, 2, "xla") for a in MLA] + [
    ("deepseek-v3-yarn", 1, "xla"),  # unsharded
    ("deepseek-v2", 4, "xla"),  # 2 heads per shard; o_proj's input split 4 ways over 24-wide value heads
    ("deepseek-v2-qlora", 2, "pallas"),  # the kernel over the widest latent: 128 + 32 (value 128)
]


@pytest.mark.parametrize(("arch", "tp", "impl"), CASES, ids=[f"{a}-tp{tp}-{impl}" for a, tp, impl in CASES])
def test_matches_transformers(arch, tp, impl):
    model = check_matches(arch, tp, impl)
    assert model.cache_params.is_mla and model.cache_params.n_kv_heads == 1


@pytest.mark.parametrize("arch", MLA)
def test_prefix_from_every_tier(arch, tmp_path, redis_server):
    check_prefix_from_every_tier(arch, tmp_path, redis_server.url)


# The FP8 latent cache quantizes c_kv and the RoPE key: kv_lora_rank 64 + 16 (as deepseek-v3 and v3-yarn,
# whose query-side differences do not reach the cache) and 128 + 32.
@pytest.mark.parametrize("arch", ["deepseek-v2", "deepseek-v2-qlora"])
def test_fp8_cache_error(arch):
    check_fp8_cache_error(arch)
