"""tpu-inference's own `TPUOffloadConnector` on the multi-turn trace: tokens served from host, and its save path's time.

    integration/tpu_inference/.venv/bin/python bench/tpu_offload_trace.py [--quick] [--json PATH]

Runs in tpu-inference's venv (integration/tpu_inference/run.sh builds it and runs this with --quick); started by
another Python (e.g. .ci/run's), it re-runs itself there, or prints why it cannot and exits 0. CPU only: libtpu is
hidden from import (integration/tpu_inference/conftest.py says why), 8 simulated CPU devices, TP 4.

The trace is bench/_trace.py's `multi_turn(...)` (vocab 1000, seed 0, the prompts bench/vllm_connector.py
replays). It goes through tpu-inference 0.25.0's real connector, scheduler and worker, twice, each time in a fresh
connector pair after a warm-up pass of the same trace in another fresh pair (the warm-up compiles the worker's
jitted gathers; a server compiles them once at start-up; its numbers are thrown away):

1. `tpu_inference`: its own `LocalCPUBackend`, `TPU_OFFLOAD_NUM_CPU_CHUNKS` = `--host-blocks` (one chunk is one
   block of every layer), i.e. host memory of `--host-blocks` blocks;
2. `route_a`: jaxkv's `JaxkvCPUBackend` (`jaxkv.integrations.tpu_inference.install`) with the same host memory
   (`host_bytes` = `--host-blocks` chunks) and a disk tier behind it, so its scheduler may keep
   `TPU_OFFLOAD_NUM_CPU_CHUNKS` = `--host-blocks` + `--disk-blocks` chunks (default: every block of the trace).
   `--disk-blocks 0`: no disk, the same chunk count as run 1 (the backend swapped, nothing else).

How a turn is driven (integration/tpu_inference/offload_driver.py, which integration/tpu_inference/test_connector.py
drives too; here with vLLM's own `Request` objects and block hasher; vLLM's `Scheduler` itself is not run): the
conversations of a turn run **concurrently**: every chat asks the connector's scheduler for matched tokens
(`get_num_new_matched_tokens`), gets fresh device blocks (`update_state_after_alloc`), then all are prefilled in
**one** engine step (their whole uncached prompt scheduled at once) and finished in the next step; turns run one
after another, so each chat's turns run sequentially. Decode steps are not driven: the connector does not save
decode tokens by default (`TPU_OFFLOAD_DECODE_SAVE=0`) and no later prompt contains a generated token.

The device cache: one random-bits bf16 array per layer (NaN payloads included) in tpu-inference's layout (blocks,
block size, kv heads, 2, head dim), sharded over kv heads. Each request gets device blocks that no earlier request used in its turn and
there is no device prefix cache in this driver, so every hit comes from the connector's host store; the device
cache holds a turn's blocks (nothing is preempted) and the staging budget (`TPU_OFFLOAD_NUM_STAGING_BLOCKS`)
holds a turn's loads and saves together, so neither limits what the connector serves.

Measured (CPU, XLA:CPU; not a TPU):
- per run: prompt tokens of the trace; tokens the connector's scheduler matched and reported to vLLM for
  loading (`get_num_new_matched_tokens`, per request; a full-prompt hit reports one token less, as it says);
  blocks the worker read back for those loads, split into read from memory and (route (a)) from disk;
- chunks saved and bytes saved to the host backend (what its worker handed `add`);
- the save path's seconds per step: `wait_for_save` (the worker's jitted block gather, synchronous) until its save
  thread finishes (device→host `device_put` into `pinned_host` memory, then `backend.add` per chunk), median over
  the steps that saved; against `np.copyto` of the same number of bytes timed right after each such step (median
  of 5), ratio = save / memcpy per step, median over steps (> 1: slower than a bare copy of the bytes);
- the load path's part that runs on CPU: `backend.get` of each planned chunk plus the worker's host→device
  `device_put` into its staging sharding, seconds per step, median over steps that loaded.
Not measured: the load's device write (`update_kv_caches`, a Pallas TPU kernel XLA:CPU cannot lower: "Only
interpret mode is supported on CPU backend"), so no end-to-end load time; anything on a TPU (device→host and
host→device over PCIe, HBM gathers); model compute; vLLM's own device prefix cache. On XLA:CPU "device" and
"pinned_host" are the same RAM, so the save path here is gather + memory copies, not DMA.

The JSON (`--json PATH`, and printed) has these keys:
- "conditions": jax version, backend, devices, cpu count, python, machine (bench/_common.py), plus
  "tpu_inference" and "vllm" versions;
- "args": the command line's values; "trace": {"requests", "prompt_tokens", "prompt_blocks"} of the whole trace;
- "shape": {"layers", "block_size", "kv_heads", "head_dim", "dtype", "tp", "chunk_bytes", "device_blocks",
  "staging_blocks"};
- "driver": "concurrent conversations per turn, turns sequential";
- "runs": a list of two objects, one per run, "name" "tpu_inference" then "route_a", each with
  "backend" (class name), "num_cpu_chunks", "host_bytes" (the memory budget), "disk_bytes" (null without disk),
  "prompt_tokens", "served_tokens" (scheduler-matched tokens, summed over requests), "loaded_blocks",
  "loaded_blocks_from_memory", "loaded_blocks_from_disk", "chunks_saved", "bytes_saved",
  "save_steps" (steps that saved), "save_s_median", "memcpy_s_median", "save_vs_memcpy_median",
  "save_s_total", "load_read_s_median" (null when nothing loaded), "load_read_s_total" (0 when nothing loaded), "spills" (route (a): chunks moved to disk; else
  null), "by_request": {request id: {"prompt_tokens", "served_tokens", "loaded_blocks", "from_disk"}};
- "not_measured": a list of sentences (what the module docstring says above, and anything skipped at run time).
"""

# engine venv: integration/tpu_inference/.venv (integration/tpu_inference/run.sh runs this benchmark's --quick there)
from __future__ import annotations

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
VENV_PYTHON = HERE.parent / "integration" / "tpu_inference" / ".venv" / "bin" / "python"

sys.modules["libtpu"] = None  # must precede every import of jax, vllm and tpu_inference (see the docstring)
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("TPU_INFERENCE_LOGGING_LEVEL", "WARNING")

try:
    import tpu_inference  # noqa: F401
except ImportError as e:
    if VENV_PYTHON.exists() and Path(sys.prefix).resolve() != VENV_PYTHON.parent.parent.resolve():
        os.execv(str(VENV_PYTHON), [str(VENV_PYTHON), __file__, *sys.argv[1:]])
    print(f"tpu_offload_trace: not run: tpu_inference is not importable here ({e}); build its venv with")
    print("  bash integration/tpu_inference/run.sh   and run this with integration/tpu_inference/.venv/bin/python")
    sys.exit(0)

import json  # noqa: E402
import logging  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from importlib.metadata import version  # noqa: E402

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_platforms", "cpu")

import numpy as np  # noqa: E402
from vllm import SamplingParams  # noqa: E402
from vllm.utils.hashing import sha256  # noqa: E402
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash  # noqa: E402
from vllm.v1.request import Request  # noqa: E402

sys.path[:0] = [str(HERE), str(HERE.parent / "integration" / "tpu_inference")]
import _common  # noqa: E402
import _trace  # noqa: E402
from offload_driver import allocate, connectors, device_cache, engine_step, scheduler_output  # noqa: E402

from jaxkv.integrations import tpu_inference as route_a  # noqa: E402
from jaxkv.tiers.blockformat import HEADER_BYTES, BlockKey, trailer_bytes  # noqa: E402

LAYERS, KV_HEADS, HEAD_DIM = 3, 8, 32  # integration/vllm/harness.py's stand-in model, as bench/vllm_connector.py
TP = 4  # kv heads sharded over 4 devices, as bench/vllm_connector.py's engine
DTYPE = jax.numpy.bfloat16
MEMCPY_REPEATS = 5

NOT_MEASURED = [
    "the load's device write (tpu-inference's update_kv_caches is a Pallas TPU kernel; XLA:CPU cannot lower it), "
    "so no end-to-end load time: the load is timed up to the host->device device_put of the chunks",
    "anything on a TPU: PCIe device<->host transfers and HBM gathers (on XLA:CPU device and pinned_host are the "
    "same RAM)",
    "model compute, decode steps (no decode saves by default) and vLLM's own device prefix cache (not in this "
    "driver: every hit is the connector's)",
]


class Memcpy:
    """`np.copyto` of n bytes between two preallocated buffers, median of `MEMCPY_REPEATS` (the baseline)."""

    def __init__(self, max_bytes: int):
        self.src = np.random.default_rng(1).integers(0, 256, max_bytes, dtype=np.uint8)
        self.dst = np.empty_like(self.src)

    def seconds(self, nbytes: int) -> float:
        times = []
        for _ in range(MEMCPY_REPEATS):
            t0 = time.perf_counter()
            np.copyto(self.dst[:nbytes], self.src[:nbytes])
            times.append(time.perf_counter() - t0)
        return statistics.median(times)


class Stats:
    """One run's counters (the keys of a "runs" entry)."""

    def __init__(self):
        self.served_tokens = self.loaded = self.from_disk = self.chunks_saved = self.bytes_saved = 0
        self.save_s: list[float] = []
        self.memcpy_s: list[float] = []
        self.load_s: list[float] = []
        self.by_request: dict[str, dict] = {}


def record(step, stats: Stats, memcpy: Memcpy, chunk_bytes: int) -> None:
    """One engine step's loads and saves into `stats`; the memcpy baseline timed right after it."""
    for rid, values in step.loaded.items():
        stats.loaded += len(values)
        stats.from_disk += step.from_disk[rid]
        row = stats.by_request[rid]
        row["loaded_blocks"] += len(values)
        row["from_disk"] += step.from_disk[rid]
    if step.loaded:
        stats.load_s.append(step.load_s)
    if step.saved_chunks:
        nbytes = step.saved_chunks * chunk_bytes  # every chunk is one block of every layer (checked after the run)
        stats.chunks_saved += step.saved_chunks
        stats.bytes_saved += nbytes
        stats.save_s.append(step.save_s)
        stats.memcpy_s.append(memcpy.seconds(nbytes))


def replay(trace, args, *, num_cpu_chunks: int, device_blocks: int, staging: int, memcpy: Memcpy, chunk_bytes: int):
    """The trace through a fresh connector pair; returns (Stats, the worker's backend)."""
    os.environ["TPU_OFFLOAD_NUM_CPU_CHUNKS"] = str(num_cpu_chunks)
    os.environ["TPU_OFFLOAD_NUM_STAGING_BLOCKS"] = str(staging)
    os.environ["TPU_OFFLOAD_SKIP_JAX_PRECOMPILE"] = "1"  # its precompile includes the Pallas load kernel
    B = args.block_size
    mesh = jax.make_mesh((TP,), ("model",), devices=jax.devices()[:TP])
    caches = device_cache(mesh, layers=LAYERS, blocks=device_blocks, block_size=B, kv_heads=KV_HEADS, head_dim=HEAD_DIM)
    scheduler, worker = connectors(mesh, caches, B)
    hasher = get_request_block_hasher(B, sha256)
    stats = Stats()
    for turn in trace:
        new, next_block = [], 0
        for rid, prompt in turn:
            req = Request(rid, prompt, SamplingParams(max_tokens=args.reply_tokens), None, block_hasher=hasher)
            to_load, _ = scheduler.get_num_new_matched_tokens(req, 0)
            n = -(-len(prompt) // B)
            blocks = list(range(next_block, next_block + n))
            next_block += n
            allocate(scheduler, req, blocks, to_load)
            stats.served_tokens += to_load
            stats.by_request[rid] = {
                "prompt_tokens": len(prompt),
                "served_tokens": to_load,
                "loaded_blocks": 0,
                "from_disk": 0,
            }
            new.append((req, blocks, to_load))
        record(engine_step(scheduler, worker, scheduler_output(new=new)), stats, memcpy, chunk_bytes)
        for req, _, _ in new:
            req.num_computed_tokens = req.num_tokens
            scheduler.request_finished(req, [])
        finished = scheduler_output(finished=[r.request_id for r, _, _ in new])
        record(engine_step(scheduler, worker, finished), stats, memcpy, chunk_bytes)
    worker.connector_worker.save_executor.shutdown(wait=True)
    backend = worker.connector_worker.cpu_backend
    on_disk = set(backend.on_disk()) if hasattr(backend, "on_disk") else set()
    for chunk_id in [c for c in backend.cache if c not in on_disk][:1]:  # one chunk held in memory
        held = backend.get(chunk_id)
        held = sum(v.nbytes for v in held) if isinstance(held, list) else held.nbytes
        if held != chunk_bytes:
            raise RuntimeError(f"a saved chunk holds {held} bytes, not the {chunk_bytes} this run counts per chunk")
    return stats, backend


def summarize(name, stats: Stats, backend, *, num_cpu_chunks, host_bytes, disk_bytes, prompt_tokens) -> dict:
    ratios = [s / m for s, m in zip(stats.save_s, stats.memcpy_s, strict=True) if m > 0]
    med = statistics.median
    return {
        "name": name,
        "backend": type(backend).__name__,
        "num_cpu_chunks": num_cpu_chunks,
        "host_bytes": host_bytes,
        "disk_bytes": disk_bytes,
        "prompt_tokens": prompt_tokens,
        "served_tokens": stats.served_tokens,
        "loaded_blocks": stats.loaded,
        "loaded_blocks_from_memory": stats.loaded - stats.from_disk,
        "loaded_blocks_from_disk": stats.from_disk,
        "chunks_saved": stats.chunks_saved,
        "bytes_saved": stats.bytes_saved,
        "save_steps": len(stats.save_s),
        "save_s_median": med(stats.save_s) if stats.save_s else None,
        "memcpy_s_median": med(stats.memcpy_s) if stats.memcpy_s else None,
        "save_vs_memcpy_median": med(ratios) if ratios else None,
        "save_s_total": sum(stats.save_s),
        "load_read_s_median": med(stats.load_s) if stats.load_s else None,
        "load_read_s_total": sum(stats.load_s),
        "spills": getattr(backend, "spills", None),
        "by_request": stats.by_request,
    }


def run_both(trace, args, shape: dict, work: Path) -> list[dict]:
    N = args.host_blocks
    chunk_bytes = shape["chunk_bytes"]
    trace_blocks = shape["trace_blocks"]
    disk_blocks = max(trace_blocks - N, 0) if args.disk_blocks is None else args.disk_blocks
    file_bytes = HEADER_BYTES + chunk_bytes + trailer_bytes(BlockKey.resolve(None))  # one DiskTier file
    common = dict(device_blocks=shape["device_blocks"], staging=shape["staging_blocks"], chunk_bytes=chunk_bytes)
    memcpy = Memcpy(max(shape["staging_blocks"], 1) * chunk_bytes)
    prompt_tokens = sum(len(p) for turn in trace for _, p in turn)
    runs = []

    for _ in ("warm-up", "measured"):
        stats, backend = replay(trace, args, num_cpu_chunks=N, memcpy=memcpy, **common)
    runs.append(
        summarize(
            "tpu_inference",
            stats,
            backend,
            num_cpu_chunks=N,
            host_bytes=N * chunk_bytes,
            disk_bytes=None,
            prompt_tokens=prompt_tokens,
        )
    )

    chunks_a = N + disk_blocks
    disk = None if disk_blocks == 0 else disk_blocks * file_bytes
    for i, _ in enumerate(("warm-up", "measured")):
        kwargs = {} if disk is None else {"disk_directory": work / f"route-a-{i}", "disk_bytes": disk}
        backends = route_a.install(host_bytes=N * chunk_bytes, **kwargs)
        try:
            stats, backend = replay(trace, args, num_cpu_chunks=chunks_a, memcpy=memcpy, **common)
        finally:
            route_a.uninstall()
            for b in backends:
                b.close()
    runs.append(
        summarize(
            "route_a",
            stats,
            backend,
            num_cpu_chunks=chunks_a,
            host_bytes=N * chunk_bytes,
            disk_bytes=disk,
            prompt_tokens=prompt_tokens,
        )
    )
    return runs


def main() -> None:
    p = _common.parser(__doc__)
    _trace.add_arguments(p, host_blocks=256)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument(
        "--disk-blocks", type=int, default=None, help="route (a)'s disk, in blocks (default: the trace's blocks)"
    )
    p.add_argument("--json", type=Path, default=None, help="write the results here (keys: the module docstring)")
    p.add_argument("--quick", action="store_true", help="smoke run: 3 chats x 2 turns, small prompts")
    args = p.parse_args()
    if args.quick:
        args.conversations, args.turns, args.system_tokens, args.user_tokens = 3, 2, 64, 32
        args.reply_tokens, args.host_blocks = 8, 8  # fewer blocks than the trace: evictions, spills
    for name in ("conversations", "turns", "block_size", "host_blocks"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} ({getattr(args, name)}) must be >= 1")
    if args.disk_blocks is not None and args.disk_blocks < 0:
        p.error(f"--disk-blocks ({args.disk_blocks}) must be >= 0")
    logging.getLogger("tpu_inference").setLevel(logging.WARNING)
    logging.getLogger("vllm").setLevel(logging.WARNING)
    init_none_hash(sha256)

    trace = _trace.from_arguments(args)
    B = args.block_size
    per_turn = [sum(-(-len(prompt) // B) for _, prompt in turn) for turn in trace]
    shape = {
        "layers": LAYERS,
        "block_size": B,
        "kv_heads": KV_HEADS,
        "head_dim": HEAD_DIM,
        "dtype": "bfloat16",
        "tp": TP,
        "chunk_bytes": LAYERS * B * KV_HEADS * 2 * HEAD_DIM * jax.numpy.dtype(DTYPE).itemsize,
        "device_blocks": max(per_turn),  # a turn's requests, each in fresh blocks
        "staging_blocks": max(per_turn),  # a turn's loads plus saves are at most its prompts' blocks
        "trace_blocks": sum(len(prompt) // B for turn in trace for _, prompt in turn),
    }
    cond = {**_common.conditions(), "tpu_inference": version("tpu-inference"), "vllm": version("vllm-tpu")}
    _common.print_conditions(cond)
    prompt_tokens = sum(len(p) for turn in trace for _, p in turn)
    print(
        f"trace: {args.conversations} chats x {args.turns} turns (chats of a turn concurrent, turns sequential), "
        f"system {args.system_tokens}, user {args.user_tokens}, reply {args.reply_tokens} tokens: "
        f"{prompt_tokens} prompt tokens, {shape['trace_blocks']} full prompt blocks summed over requests; block {B} tokens = "
        f"{shape['chunk_bytes']} B ({LAYERS} layers x {KV_HEADS} kv heads x {HEAD_DIM} bf16, TP {TP}); "
        f"host {args.host_blocks} blocks ({args.host_blocks * shape['chunk_bytes'] / 2**20:.1f} MiB) in both runs"
    )
    with tempfile.TemporaryDirectory(prefix="jaxkv-tpu-offload-trace-") as tmp:
        runs = run_both(trace, args, shape, Path(tmp))

    columns = [
        ("name", "run", "s"),
        ("num_cpu_chunks", "chunks", "d"),
        ("prompt_tokens", "prompt", "d"),
        ("served_tokens", "served", "d"),
        ("loaded_blocks_from_memory", "blk mem", "d"),
        ("loaded_blocks_from_disk", "blk disk", "d"),
        ("chunks_saved", "saved", "d"),
        ("bytes_saved", "bytes", "d"),
        ("save_s_median", "save s/step", ".5f"),
        ("memcpy_s_median", "memcpy s", ".6f"),
        ("save_vs_memcpy_median", "/ memcpy", ".1f"),
        ("load_read_s_median", "load s/step", ".5f"),
    ]
    _common.print_table(
        "tpu-inference's TPUOffloadConnector on the trace (save = gather + D2H + backend.add, median per step)",
        runs,
        columns,
    )
    for r in runs:
        if r["save_s_median"] is None:
            print(f"{r['name']}: no step saved a chunk, so no save time")
        if r["load_read_s_median"] is None:
            print(f"{r['name']}: no step loaded a chunk, so no load time")
    print("not measured:", *(f"  - {s}" for s in NOT_MEASURED), sep="\n")
    payload = {
        "conditions": cond,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "trace": {
            "requests": sum(len(t) for t in trace),
            "prompt_tokens": prompt_tokens,
            "prompt_blocks": shape["trace_blocks"],
        },
        "shape": {k: v for k, v in shape.items() if k != "trace_blocks"},
        "driver": "concurrent conversations per turn, turns sequential",
        "runs": runs,
        "not_measured": NOT_MEASURED,
    }
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
