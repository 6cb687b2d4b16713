#!/usr/bin/env bash
# The Hugging Face reference tests, in their own venv (torch from PyPI is its CUDA build, several GB: the core
# suite stays free of it). jaxkv.hf's loader is checked token for token against `transformers` on CPU:
#   1. builds integration/hf/.venv once (torch, transformers 5.x, safetensors, tokenizers, gguf; the marker file
#      names the pins, so changing them rebuilds it), then installs jaxkv into it editable with [test,hf,remote];
#   2. runs integration/hf's tests.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
venv=$here/.venv
pins=(torch==2.14.0 "transformers>=5,<6" safetensors tokenizers gguf)
marker=$venv/.jaxkv-hf-torch-2.14.0-transformers-5

start=$(date +%s)
if [ ! -f "$marker" ]; then
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "${pins[@]}"
  touch "$marker"
fi
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -e "$repo[test,hf,remote]"
echo "integration/hf: venv ready in $(($(date +%s) - start)) s ($(du -sh "$venv" | cut -f1)):" \
  "$("$venv/bin/python" -m pip list 2>/dev/null | grep -E '^(torch|transformers|jax|safetensors) ' | tr -s ' ' | paste -sd, -)"

cd "$repo"
start=$(date +%s)
"$venv/bin/python" -m pytest -q -p no:cacheprovider integration/hf "$@"
echo "integration/hf: tests ran in $(($(date +%s) - start)) s"
