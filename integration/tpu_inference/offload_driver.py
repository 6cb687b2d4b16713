"""tpu-inference's `TPUOffloadConnector` driven on CPU as vLLM drives it, without vLLM's engine or a model.

One connector per role (scheduler, worker), a worker that sees a model runner holding a random-bits device
cache, and engine steps in the order of vLLM's `KVConnectorModelRunnerMixin`: metadata to the worker, load,
save, the worker's report back to the scheduler. integration/tpu_inference/test_connector.py checks the bytes it
moves; bench/tpu_offload_trace.py times it on the multi-turn trace (it puts this directory on `sys.path`).

Import it after libtpu is hidden (`sys.modules["libtpu"] = None`, before jax, vLLM and tpu_inference: conftest.py
says why) and after jax has its 8 simulated CPU devices.

The load runs as far as the worker's own `start_load_kv` can on CPU: `cpu_backend.get` of each planned chunk,
then their host→device `device_put` into the worker's staging sharding. The device write that follows is a Pallas
TPU kernel (`update_kv_caches`), which XLA:CPU cannot lower ("Only interpret mode is supported on CPU backend"),
so the driver marks each load done (`can_load = False`) before the worker's own pass.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from types import SimpleNamespace

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tpu_inference.offload.tpu_offload_connector import TPUOffloadConnector
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
from vllm.v1.core.kv_cache_manager import KVCacheBlocks
from vllm.v1.core.kv_cache_utils import KVCacheBlock
from vllm.v1.core.sched.output import CachedRequestData, NewRequestData, SchedulerOutput
from vllm.v1.outputs import KVConnectorOutput

# bf16 NaNs with payloads (quiet, negative quiet, signalling) written into every block: a save path that
# rewrites payloads shows in the bytes (test_connector.py's `quieted` says what XLA:CPU's gather does).
NAN_PAYLOADS = [0x7FC1, 0xFFC3, 0x7F81]


class Runner:
    """What the connector's worker reads from tpu-inference's model runner."""

    def __init__(self, kv_caches, mesh):
        self.kv_caches, self.mesh, self.devices = kv_caches, mesh, list(mesh.devices.flat)

    def get_kv_cache_layout(self):
        return "NHD"


def config(block_size: int):
    """The three fields the connector reads from a `VllmConfig` (tpu-inference's own tests pass the same)."""
    return SimpleNamespace(
        model_config=SimpleNamespace(model="trace-model"),
        cache_config=SimpleNamespace(block_size=block_size),
        kv_transfer_config=SimpleNamespace(ip="127.0.0.1", port=0),
    )


def device_cache(mesh, *, layers: int, blocks: int, block_size: int, kv_heads: int, head_dim: int):
    """One random-bits bf16 array per layer in tpu-inference's layout, kv heads over the mesh's "model" axis.

    Shape (blocks, block_size, kv_heads, 2, head_dim); every block carries `NAN_PAYLOADS` in its first token.
    """
    sharding = NamedSharding(mesh, P(None, None, "model"))
    rng = np.random.default_rng(7)
    caches = []
    for _ in range(layers):
        bits = rng.integers(0, 1 << 16, size=(blocks, block_size, kv_heads, 2, head_dim), dtype=np.uint16)
        bits[:, 0, 0, 0, : len(NAN_PAYLOADS)] = NAN_PAYLOADS
        caches.append(jax.device_put(bits.view(jax.numpy.bfloat16), sharding))
    return caches


def connectors(mesh, caches, block_size: int):
    """A fresh (scheduler, worker) pair over `caches`.

    The worker's steps may replace the arrays (donated buffers): read the live cache from
    `worker.connector_worker.runner.kv_caches`, not from `caches`.

    They read their sizes from the environment when built: set `TPU_OFFLOAD_NUM_CPU_CHUNKS`,
    `TPU_OFFLOAD_NUM_STAGING_BLOCKS` and `TPU_OFFLOAD_SKIP_JAX_PRECOMPILE=1` (its precompile includes the Pallas
    load kernel) first.
    """
    scheduler = TPUOffloadConnector(config(block_size), KVConnectorRole.SCHEDULER)
    worker = TPUOffloadConnector(config(block_size), KVConnectorRole.WORKER)
    worker.connector_worker.register_runner(Runner(caches, mesh))
    return scheduler, worker


def allocate(scheduler, req, blocks: list[int], to_load: int) -> None:
    """Tells the connector's scheduler that `req` got device `blocks`, `to_load` tokens of them from the connector."""
    scheduler.update_state_after_alloc(req, KVCacheBlocks(([KVCacheBlock(b) for b in blocks],)), to_load)


def scheduler_output(new=(), finished=()):
    """A `SchedulerOutput` that schedules `new` (request, device blocks, computed tokens) whole and finishes ids."""
    out = SchedulerOutput.make_empty()
    out.scheduled_new_reqs = [
        NewRequestData(
            req_id=req.request_id,
            prompt_token_ids=req.prompt_token_ids,
            mm_features=[],
            sampling_params=None,
            pooling_params=None,
            block_ids=(blocks,),
            num_computed_tokens=computed,
            lora_request=None,
        )
        for req, blocks, computed in new
    ]
    out.scheduled_cached_reqs = CachedRequestData.make_empty()
    out.num_scheduled_tokens = {req.request_id: req.num_tokens - computed for req, _, computed in new}
    out.total_num_scheduled_tokens = sum(out.num_scheduled_tokens.values())
    out.finished_req_ids = set(finished)
    return out


@dataclass
class Step:
    """What one engine step moved, and how long its load and save took."""

    loaded: dict[str, list] = field(default_factory=dict)
    """Request id -> the chunks its load read from the backend, in load order (host arrays, as `get` returns)."""
    from_disk: dict[str, int] = field(default_factory=dict)
    """Request id -> how many of those the backend read from disk (its `disk_reads`; 0 for a backend without)."""
    load_s: float = 0.0
    """Seconds of every load: `backend.get` of its chunks plus their host→device `device_put`, until ready."""
    saved_chunks: int = 0
    """Chunks the step's save specs handed the backend."""
    save_s: float = 0.0
    """Seconds from `wait_for_save` (the worker's jitted gather, synchronous) until its save thread finished."""


def engine_step(scheduler, worker, out) -> Step:
    """One step as vLLM runs it: metadata to the worker, load (up to the device write), save, the report back."""
    meta = scheduler.build_connector_meta(out)
    worker.bind_connector_metadata(meta)
    cw = worker.connector_worker
    backend = cw.cpu_backend
    step = Step()
    for req in meta.requests_meta:
        spec = req.load_spec
        if spec is None or not spec.can_load:
            continue
        reads_before = getattr(backend, "disk_reads", 0)
        t0 = time.perf_counter()
        values = [backend.get(c) for c in spec.src_chunks]
        if any(v is None for v in values):
            raise RuntimeError(
                f"{req.req_id}: the backend lost chunks the scheduler planned to load: {spec.src_chunks}"
            )
        jax.block_until_ready([jax.device_put(v, cw.expanded_device_sharding) for v in values])
        step.load_s += time.perf_counter() - t0
        step.loaded[req.req_id] = values
        step.from_disk[req.req_id] = getattr(backend, "disk_reads", 0) - reads_before
        cw.offload_stats.record_load(req=req.req_id, loaded_chunk_ids=spec.src_chunks)  # as start_load_kv does
        spec.can_load = False  # done above; the worker's own pass skips it (its device write cannot run here)
    worker.start_load_kv(None)

    saves = [r.save_spec for r in meta.requests_meta if r.save_spec is not None and not r.save_spec.skip_save]
    t0 = time.perf_counter()
    worker.wait_for_save()  # the gather, synchronous; the D2H and backend.add go to the save thread
    for future, _ in cw._pending_save_futures:
        future.result()
    step.save_s = time.perf_counter() - t0
    step.saved_chunks = sum(len(s.dst_chunks) for s in saves)

    sending, receiving = worker.get_finished(set())
    report = worker.get_kv_connector_stats()
    worker.clear_connector_metadata()
    scheduler.update_connector_output(
        KVConnectorOutput(finished_sending=sending, finished_recving=receiving, kv_connector_stats=report)
    )
    return step
