"""jaxkv's vLLM connector on a multi-turn trace: where prompt tokens came from, and what the transfers cost.

    integration/vllm/.venv/bin/python bench/vllm_connector.py [--quick]

Runs in the vLLM venv (integration/vllm/run.sh builds it and runs this with --quick), under vLLM 0.33's own
`Scheduler` with the stand-in JAX model of integration/vllm/harness.py (tpu-inference's cache layout, one
bf16 array per layer, TP 4 on simulated CPU devices; every step checks the pages it attends to byte for byte).

The trace (bench/_trace.py): chats sharing a system prompt, each turn extending the last one's prompt.
vLLM's device holds few blocks, so its own prefix cache cannot keep every chat. Scenarios, one run:

1. vLLM alone (its device prefix cache only);
2. + jaxkv, host memory of `--host-blocks` blocks;
3. + jaxkv, host memory and disk; then a **restart** (a new instance over the same disk) replays the last turn;
4. the same restart at **TP 2** (blocks stored at TP 4);
5. a **second instance** sharing a Redis server (a local redis-server) replays the last turn.

Reported per scenario: prompt tokens computed by the model, served by vLLM's device cache, served by jaxkv per
tier; the connector's time (start_load_kv + wait_for_layer_load + wait_for_save, all steps, less the time JAX
spent compiling in them, which is printed apart: each new instance compiles its transfer programs once per
page-count bucket) against `np.copyto` of the same bytes timed in the same run (ratio: connector / memcpy;
> 1 is slower than a bare copy). With
tpu-inference's venv built (integration/tpu_inference/run.sh), the same trace also goes through tpu-inference's
own `TPUOffloadConnector` scheduler with its `LocalCPUBackend` at the same host budget
(bench/tpu_offload_trace.py, run there as a subprocess), and its served tokens print beside jaxkv's.
Results: bench/results/vllm_connector.json and docs/vllm_connector.png (--quick: *_quick, the committed ones
stay).
"""

# engine venv: integration/vllm/.venv (integration/vllm/run.sh runs this benchmark's --quick there)
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # vLLM's CUDA wheel on a CPU machine: JAX on CPU
HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "integration" / "vllm"), str(HERE.parent / "tests")]

import _common  # noqa: E402
import _trace  # noqa: E402

_common.setup_devices(8)

from harness import BLOCK, HEAD_DIM, LAYERS, Engine  # noqa: E402

KV_HEADS = 8
BLOCK_BYTES = LAYERS * BLOCK * KV_HEADS * 2 * HEAD_DIM * 2  # one page of every layer, bf16


def replay(engine: Engine, turns, reply_tokens: int) -> None:
    for turn in turns:
        for rid, prompt in turn:
            engine.add(rid, prompt, reply_tokens)
        engine.run()


def account(name: str, engine: Engine, turns) -> dict:
    """Where the prompt tokens of `turns` came from, and the connector's bytes and seconds."""
    prompt = sum(len(p) for turn in turns for _, p in turn)
    computed = engine.runner.prompt_tokens_computed
    served = {} if engine.worker_connector is None else engine.connector.served
    row = {
        "scenario": name,
        "prompt_tokens": prompt,
        "computed": computed,
        "device_cache": prompt - computed - sum(served.values()),
        **{f"jaxkv_{tier}": n for tier, n in served.items()},
        "steps": engine.steps,
        "connector_s": engine.runner.connector_seconds,
        "compile_s": engine.runner.connector_compile_seconds,
    }
    store = None if engine.worker_connector is None else engine.connector.store
    if store is not None:
        moved = store.metrics.load_bytes + store.metrics.offload_bytes
        row["bytes_moved"] = moved
        row["memcpy_s"] = memcpy_seconds(moved)
        row["vs_memcpy"] = row["connector_s"] / row["memcpy_s"] if row["memcpy_s"] else None
    return row


def memcpy_seconds(nbytes: int) -> float:
    """np.copyto of `nbytes` in block-sized rows (what the connector moves), median of 5."""
    n = max(1, nbytes // BLOCK_BYTES)
    src = np.random.default_rng(0).integers(0, 255, (n, BLOCK_BYTES), dtype=np.uint8)
    dst = np.empty_like(src)

    def once() -> float:
        t0 = time.perf_counter()
        for i in range(n):
            np.copyto(dst[i], src[i])
        return time.perf_counter() - t0

    once()
    return float(np.median([once() for _ in range(5)]))


def tpu_inference_side(args, work: Path) -> dict | None:
    """tpu-inference's own connector on the same trace, in its venv; None (and why, printed) when it cannot run."""
    python = HERE.parent / "integration" / "tpu_inference" / ".venv" / "bin" / "python"
    script = HERE / "tpu_offload_trace.py"
    if not python.exists() or not script.exists():
        print(f"tpu-inference side: not run ({python} or {script} missing; integration/tpu_inference/run.sh builds it)")
        return None
    out = work / "tpu_inference.json"
    cmd = [
        str(python),
        str(script),
        "--json",
        str(out),
        "--block-size",
        str(BLOCK),
        "--host-blocks",
        str(args.host_blocks),
    ]
    for key in ("conversations", "turns", "system_tokens", "user_tokens", "reply_tokens"):
        cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        print(f"tpu-inference side: failed (exit {done.returncode}):\n{done.stderr[-2000:]}")
        return None
    return json.loads(out.read_text())


def scenarios(args, turns, last, work: Path) -> list[dict]:
    """Every scenario of the module docstring, in fresh instances whose tiers live under `work`."""
    host = {"host_bytes": args.host_blocks * BLOCK_BYTES}
    disk = {**host, "disk_directory": str(work / "blocks"), "disk_bytes": 1 << 30}
    rows = []

    def scenario(name, extra, trace, *, tp=4, keep=False, prefix_caching=True, batched_tokens=64, reply_tokens=None):
        blocks = args.device_blocks if prefix_caching else 8 * args.device_blocks  # no device cache: room for a turn
        engine = Engine(
            extra,
            tp=tp,
            num_blocks=blocks,
            kv_heads=KV_HEADS,
            prefix_caching=prefix_caching,
            batched_tokens=batched_tokens,
        )
        try:
            replay(engine, trace, args.reply_tokens if reply_tokens is None else reply_tokens)
            rows.append(account(name, engine, trace))
        finally:
            if not keep:
                engine.close()
        return engine

    scenario("vLLM alone", None, turns)
    # As tpu-inference's run of the same trace (bench/tpu_offload_trace.py): every hit is the connector's, each
    # turn's prefills run in one step (a token budget that holds them all), and no decode steps (its driver runs
    # none; its connector saves no decode tokens by default): one sampled token per request.
    scenario("jaxkv host, no device cache", host, turns, prefix_caching=False, batched_tokens=1 << 14, reply_tokens=1)
    scenario("+ jaxkv host", host, turns)
    scenario("+ jaxkv host+disk", disk, turns)
    scenario("restart, last turn (disk)", disk, last)
    scenario("restart at TP 2, last turn", disk, last, tp=2)
    from redis_server import RedisServer  # the core suite's helper: a local redis-server on a free port

    server = RedisServer(work / "redis")
    server.start()
    try:
        remote = {**host, "remote_url": server.url, "remote_prefix": "bench:"}
        first = scenario("+ jaxkv host+redis", remote, turns, keep=True)
        try:
            scenario("second instance, last turn (redis)", remote, last, tp=2)
        finally:
            first.close()
    finally:
        server.stop()
    return rows


def main() -> None:
    p = _common.parser(__doc__)
    p.add_argument("--quick", action="store_true", help="smoke run: a small trace")
    _trace.add_arguments(p, host_blocks=128)
    p.add_argument("--device-blocks", type=int, default=96, help="vLLM's device cache, in blocks")
    args = p.parse_args()
    if args.quick:
        args.conversations, args.turns, args.system_tokens, args.user_tokens = 3, 2, 64, 32
        args.reply_tokens, args.device_blocks, args.host_blocks = 8, 48, 64
    turns = _trace.from_arguments(args)
    last = [[(f"{rid}-again", prompt) for rid, prompt in turns[-1]]]
    cond = _common.conditions()
    _common.print_conditions(cond)
    print(
        f"trace: {args.conversations} chats x {args.turns} turns, system {args.system_tokens}, user {args.user_tokens},"
        f" reply {args.reply_tokens} tokens; block {BLOCK} tokens = {BLOCK_BYTES} B; device {args.device_blocks} "
        f"blocks, jaxkv host {args.host_blocks} blocks ({args.host_blocks * BLOCK_BYTES >> 20} MiB)"
    )
    with tempfile.TemporaryDirectory(prefix="jaxkv-bench-vllm-") as tmp:
        rows = scenarios(args, turns, last, Path(tmp))
        theirs = tpu_inference_side(args, Path(tmp))
    columns = [
        ("scenario", "scenario", "s"),
        ("prompt_tokens", "prompt", "d"),
        ("computed", "computed", "d"),
        ("device_cache", "device", "d"),
        ("jaxkv_host", "jaxkv host", "d"),
        ("jaxkv_disk", "disk", "d"),
        ("jaxkv_remote", "redis", "d"),
        ("bytes_moved", "bytes", "d"),
        ("connector_s", "connector s", ".4f"),
        ("compile_s", "(compile s)", ".2f"),
        ("vs_memcpy", "/ memcpy", ".2f"),
    ]
    _common.print_table("Prompt tokens by source, and the connector's time", rows, columns)
    if theirs is not None:
        compare(rows, theirs)
    suffix = "_quick" if args.quick else ""
    payload = {"conditions": cond, "args": vars(args), "rows": rows, "tpu_inference": theirs}
    print(f"wrote {_common.write_json('vllm_connector' + suffix, payload)}")
    plot(
        rows,
        _common.RESULTS / "vllm_connector_quick.png" if args.quick else HERE.parent / "docs" / "vllm_connector.png",
    )


def compare(rows: list[dict], theirs: dict) -> None:
    """jaxkv's connector and tpu-inference's on the same trace and host budget, every hit the connector's."""
    ours = next(r for r in rows if r["scenario"] == "jaxkv host, no device cache")
    table = [
        {
            "who": "jaxkv JaxkvConnector (vLLM 0.33 scheduler)",
            "host": ours.get("jaxkv_host", 0),
            "disk": ours.get("jaxkv_disk", 0),
            "computed": ours["computed"],
            "transfer_s": ours["connector_s"],
            "what": "load + save, whole trace",
        }
    ]
    for run in theirs["runs"]:
        per_block = run["served_tokens"] / run["loaded_blocks"] if run["loaded_blocks"] else 0
        table.append(
            {
                "who": f"tpu-inference 0.25 TPUOffloadConnector, {run['backend']}",
                "host": round((run["loaded_blocks"] - run["loaded_blocks_from_disk"]) * per_block),
                "disk": round(run["loaded_blocks_from_disk"] * per_block),
                "computed": run["prompt_tokens"] - run["served_tokens"],
                "transfer_s": run["save_s_total"] + run["load_read_s_total"],
                "what": "save + load up to its device write (not runnable on CPU)",
            }
        )
    _common.print_table(
        f"Same trace, host budget {theirs['args']['host_blocks']} blocks, no device prefix cache",
        table,
        [
            ("who", "connector", "s"),
            ("host", "from host", "d"),
            ("disk", "from disk", "d"),
            ("computed", "computed", "d"),
            ("transfer_s", "transfer s", ".4f"),
            ("what", "timed", "s"),
        ],
    )


def plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no matplotlib: no figure")
        return
    kinds = [
        ("computed", "computed by the model"),
        ("device_cache", "vLLM device cache"),
        ("jaxkv_host", "jaxkv host"),
        ("jaxkv_disk", "jaxkv disk"),
        ("jaxkv_remote", "jaxkv Redis"),
    ]
    fig, ax = plt.subplots(figsize=(10, 4.6))
    left = np.zeros(len(rows))
    for key, label in kinds:
        vals = np.array([r.get(key, 0) / r["prompt_tokens"] for r in rows])
        ax.barh(range(len(rows)), vals, left=left, label=label)
        left += vals
    ax.set_yticks(range(len(rows)), [r["scenario"] for r in rows])
    ax.invert_yaxis()
    ax.set_xlabel("share of prompt tokens")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=len(kinds), fontsize=8, frameon=False)
    ax.set_title("Where prompt tokens came from (vLLM 0.33 scheduler, jaxkv connector)")
    path.parent.mkdir(parents=True, exist_ok=True)
    _common.save_figure(fig, path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
