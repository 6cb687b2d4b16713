#!/usr/bin/env bash
# The vLLM integration, in its own venv (vLLM brings torch and ~200 packages; the core suite stays free of them):
#   1. builds the venv once (integration/_venv.sh: under $JAXKV_VENVS, default ~/.cache/jaxkv-venvs;
#      integration/vllm/.venv links to it) (vllm 0.33.0 from PyPI, its CUDA build: on a CPU machine it imports
#      with an "unspecified" platform, and the scheduler, requests and connector factory all run), then installs
#      jaxkv into it editable with its test extra;
#   2. runs integration/vllm's tests (jaxkv's connector under vLLM's own Scheduler);
#   3. type-checks jaxkv/integrations/vllm.py against vLLM's sources;
#   4. runs bench/vllm_connector.py in smoke mode (--quick) into a temporary directory.
# Measured on 2 cores: the venv ~6 min and ~9 GB the first time; the tests ~1 min.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
# shellcheck source-path=SCRIPTDIR
. "$here/../_venv.sh"  # jaxkv_venv, which sets venv

build() {
  "${pip[@]}" vllm==0.33.0
}
jaxkv_venv vllm-0.33.0-py311 .jaxkv-vllm-0.33.0 python3 build test 'vllm|torch|jax|transformers'

cd "$repo"
"$venv/bin/python" -m pytest -q -p no:cacheprovider integration/vllm "$@"
PYRIGHT_PYTHON_IGNORE_WARNINGS=1 .venv/bin/pyright --venvpath "$here" jaxkv/integrations/vllm.py
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
JAXKV_BENCH_RESULTS="$scratch" "$venv/bin/python" bench/vllm_connector.py --quick
