"""jaxkv inside serving engines: `vllm` (a vLLM KV connector) and `tpu_inference` (a host backend for its offload connector).

Neither is imported by `import jaxkv`: each needs its engine installed (docs/integrations.md).
"""
