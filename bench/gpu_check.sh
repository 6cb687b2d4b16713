#!/usr/bin/env bash
# The one short check a session with a GPU runs (issue 13: host tier at the accelerator's speed; issue 15's stored
# form; issue 16's Pallas attention).
#
#   OUT=/some/dir bash bench/gpu_check.sh        (the device tool sets $OUT; default: ./gpu_check_out)
#
# Writes under $OUT: conditions.txt (nvidia-smi, jax devices, XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB), the JSON of
# bench/offload.py --quick and bench/disk_load.py --quick, the default demo's report.json/demo.png, and each
# step's log. On a GPU, HostTier(backend="auto") holds rows as pinned_host arrays, so the demo and
# disk_load exercise that path end to end; bench/offload.py measures the engine over its own pool.
# Every step runs even if one before it failed; the exit status is the number of failed steps.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
PY=${PYTHON:-python}
export JAXKV_BENCH_RESULTS="$OUT"
failed=0

step() {  # step NAME TIMEOUT_S CMD...: run with a time limit, log to $OUT/NAME.log, count a failure
    local name=$1 limit=$2
    shift 2
    echo "== $name: $*"
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$OUT/$name.log"
    [[ $rc -eq 0 ]] || { echo "!! $name exited $rc"; failed=$((failed + 1)); }
}

{
    date -u
    nvidia-smi 2>&1 || echo "no nvidia-smi"
    echo "XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB=${XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB:-unset (XLA default 64)}"
    $PY -c "import jax, jaxkv; print(jax.__version__, jax.devices(), jaxkv.__file__)"
    git log -1 --oneline 2>/dev/null
} >"$OUT/conditions.txt" 2>&1
cat "$OUT/conditions.txt"

step offload_quick 240 $PY bench/offload.py --quick
step disk_load_quick 120 $PY bench/disk_load.py --quick
step stored_format_quick 120 $PY bench/stored_format.py --quick  # issue 15: where the stored form converts on a GPU
step attention_quick 180 $PY bench/attention.py --quick  # issue 16: the Pallas kernel vs XLA and the stock kernel
step demo 240 $PY -m jaxkv demo --out "$OUT/demo" --no-progress
exit $failed
