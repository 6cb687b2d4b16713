#!/usr/bin/env bash
# Builds a venv (once, integration/_venv.sh: under $JAXKV_VENVS, default ~/.cache/jaxkv-venvs; later runs and clones
# reuse it; integration/tpu_inference/.venv links to it) with tpu-inference 0.25.0, the vLLM it
# was released with and jaxkv, then runs the tests in integration/tpu_inference in it (extra arguments go to
# pytest), then bench/tpu_offload_trace.py --quick (tpu-inference's connector on the multi-turn trace; its JSON
# goes to a temporary directory, removed at the end).
#
# vLLM: tpu-inference declares no vLLM dependency; its release 0.25.0 pairs with `vllm-tpu==0.25.0` (which pins
# tpu-inference==0.25.0). PyPI has no CPU build of vLLM 0.25 (the `vllm` wheels are CUDA builds, and need
# torch 2.11 where tpu-inference's torchvision 0.25 needs torch 2.10), so vllm-tpu's source is built as vLLM's
# device-less ("empty") target: pure Python, no CMake or CUDA; its optional Rust front end is skipped offline.
# Measured on 2 cores: ~13 min and ~9 GB (torch's CUDA libraries from PyPI are most of it), then ~1 min.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
# shellcheck source-path=SCRIPTDIR
. "$here/../_venv.sh"  # jaxkv_venv, which sets venv

python=python3.11
command -v "$python" >/dev/null || python=python3
"$python" -c 'import sys; assert sys.version_info[:2] == (3, 11), sys.version' || {
  echo "run.sh: needs Python 3.11 (tpu-inference 0.25.0's pins install there), found $("$python" --version)" >&2
  exit 1
}

build() {
  "${pip[@]}" tpu-inference==0.25.0
  "${pip[@]}" "setuptools==78.1.0" "setuptools-scm>=8" "setuptools-rust>=1.9.0" wheel jinja2 cmake ninja "packaging>=24.2"
  VLLM_TARGET_DEVICE=empty VLLM_VERSION_OVERRIDE=0.25.0 CARGO_NET_OFFLINE=true \
    "${pip[@]}" --no-build-isolation vllm-tpu==0.25.0
}
jaxkv_venv tpu-inference-0.25.0-py311 .jaxkv-setup-tpu-inference-0.25.0 "$python" build remote \
  'tpu_inference|tpu-inference|vllm-tpu|jax|torch'

cd "$repo"
"$venv/bin/python" -m pytest -q -p no:cacheprovider integration/tpu_inference "$@"
# The module imports tpu-inference: its types are checked here, against tpu-inference's sources.
PYRIGHT_PYTHON_IGNORE_WARNINGS=1 .venv/bin/pyright --venvpath "$here" jaxkv/integrations/tpu_inference.py

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
"$venv/bin/python" bench/tpu_offload_trace.py --quick --json "$scratch/tpu_offload_trace.json"
"$venv/bin/python" -c 'import json, sys; runs = json.load(open(sys.argv[1]))["runs"]; assert [r["name"] for r in runs] == ["tpu_inference", "route_a"], runs' \
  "$scratch/tpu_offload_trace.json"
