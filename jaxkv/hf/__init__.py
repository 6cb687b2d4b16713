"""Hugging Face checkpoints on jaxkv's paged cache: `load_checkpoint(directory, mesh)`.

Not imported by `import jaxkv`; needs the `hf` extra (`safetensors`, `tokenizers`).

    import jax, jaxkv.hf
    mesh = jax.make_mesh((2,), ("tp",))
    model = jaxkv.hf.load_checkpoint("Qwen3-0.6B", mesh, cache_dtype="bfloat16")
    cache = model.allocate_cache(64)
    logits, cache = model.prefill(cache, token_ids, 0, page_table)

The model offers `jaxkv.models.TinyModel`'s surface, so the demo and the
prefix-caching manager drive it unchanged. Architectures are looked up by
config.json's `model_type` in `ARCHITECTURES`: `llama`, `qwen2`, `qwen3`
(jaxkv/hf/llama.py). To add one, write a module whose `build(hf_config, *,
page_size, cache_dtype, attention)` returns a `ModelPlan` (the config the
forward pass reads, the cache layout, the attention function, and a `Weight`
per tensor: jaxkv/hf/_plan.py; the checks and weights every architecture
shares, the norms, SwiGLU MLP and embeddings around its attention, are in
jaxkv/hf/_common.py), register it with
`ARCHITECTURES["<model_type>"] = build`, and import the module below.
"""

from jaxkv.hf import deepseek, llama  # noqa: F401  (registers deepseek_v2, deepseek_v3, llama, qwen2, qwen3)
from jaxkv.hf._loader import CheckpointModel, load_checkpoint
from jaxkv.hf._plan import ARCHITECTURES, ModelPlan, Weight, config_field

__all__ = ["ARCHITECTURES", "CheckpointModel", "ModelPlan", "Weight", "config_field", "load_checkpoint"]
