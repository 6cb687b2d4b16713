"""tpu-inference's own `TPUOffloadConnector`, scheduler and worker, driven on CPU over one request trace: once with
its `LocalCPUBackend`, once with route (a) installed (a memory budget of 3 chunks, the rest on disk).

No model runs: the device cache is random bits (bf16, NaN payloads included), each request's prompt owns
the device blocks it was given in the first wave, and the second wave asks for the same prompts again
in other device blocks. What the connector loads there must be, byte for byte, what the first wave
saved, and both runs must load the same blocks. The trace saves more chunks than the scheduler has
(its LRU manager reuses chunk ids: the backend sees overwrites) and more than route (a)'s memory
holds (chunks go to disk and come back).
"""

import hashlib
from types import SimpleNamespace
from unittest.mock import MagicMock

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tpu_inference.offload.cpu_backend import LocalCPUBackend
from tpu_inference.offload.tpu_offload_connector import TPUOffloadConnector
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
from vllm.v1.core.sched.output import CachedRequestData, NewRequestData, SchedulerOutput
from vllm.v1.outputs import KVConnectorOutput
from vllm.v1.request import Request

from jaxkv.integrations import tpu_inference as route_a
from jaxkv.integrations.tpu_inference import JaxkvCPUBackend

BLOCK_SIZE = 16
NUM_BLOCKS = 64  # device blocks per layer
NUM_LAYERS = 3
KV_HEADS, HEAD_DIM = 8, 64
NUM_CPU_CHUNKS = 12  # the scheduler's chunk ids; the trace saves 20 chunks, so ids are reused
PROMPT_BLOCKS = 4
NUM_PROMPTS = 5


def config():
    """The three fields the connector reads from a `VllmConfig` (tpu-inference's own tests pass the same)."""
    return SimpleNamespace(
        model_config=SimpleNamespace(model="trace-model"),
        cache_config=SimpleNamespace(block_size=BLOCK_SIZE),
        kv_transfer_config=SimpleNamespace(ip="127.0.0.1", port=0),
    )


def device_cache(mesh):
    """One random-bits array per layer, tpu-inference's layout: (blocks, block_size, kv heads, 2, head_dim)."""
    sharding = NamedSharding(mesh, P(None, None, "model"))
    rng = np.random.default_rng(7)
    caches = []
    for _ in range(NUM_LAYERS):
        bits = rng.integers(0, 1 << 16, size=(NUM_BLOCKS, BLOCK_SIZE, KV_HEADS, 2, HEAD_DIM), dtype=np.uint16)
        bits[:, 0, 0, 0, :3] = [0x7FC1, 0xFFC3, 0x7F81]  # NaN payloads in every block
        caches.append(jax.device_put(bits.view(jax.numpy.bfloat16), sharding))
    return caches


def block_bytes(caches, block: int) -> bytes:
    return b"".join(np.asarray(c[block]).tobytes() for c in caches)


def quieted(raw: bytes) -> bytes:
    """`raw` (bf16) with every NaN as XLA:CPU's gather leaves it: sign kept, payload the canonical quiet one.

    tpu-inference's own save path (its jitted block gather, on XLA:CPU) rewrites NaN payloads
    (0x7FC1 -> 0x7FC0, 0xFFC3 -> 0xFFC0, 0x7F81 -> 0x7FC0): measured here, before any backend sees the chunk.
    """
    bits = np.frombuffer(raw, np.uint16).copy()
    nan = (bits & 0x7F80 == 0x7F80) & (bits & 0x007F != 0)
    bits[nan] = (bits[nan] & 0x8000) | 0x7FC0
    return bits.tobytes()


class Runner:
    """What the connector's worker reads from tpu-inference's model runner."""

    def __init__(self, kv_caches, mesh):
        self.kv_caches, self.mesh, self.devices = kv_caches, mesh, list(mesh.devices.flat)

    def get_kv_cache_layout(self):
        return "NHD"


def request(req_id: str, prompt: int):
    tokens = [prompt * 1000 + t for t in range(PROMPT_BLOCKS * BLOCK_SIZE)]
    req = MagicMock(spec=Request)
    req.request_id = req_id
    req.prompt_token_ids = tokens
    req.all_token_ids = tokens
    req.num_tokens = len(tokens)
    req.num_computed_tokens = 0
    req.block_hashes, parent = [], b""
    for b in range(PROMPT_BLOCKS):  # chained, as vLLM hashes blocks
        parent = hashlib.sha256(parent + repr(tokens[b * BLOCK_SIZE : (b + 1) * BLOCK_SIZE]).encode()).digest()
        req.block_hashes.append(parent)
    return req


def scheduler_output(new=(), finished=()):
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


def engine_step(scheduler, worker, out) -> dict[str, list[bytes]]:
    """One step as vLLM runs it: metadata to the worker, load, save, then the worker's report back.

    The load stops where the worker's own `start_load_kv` stops being runnable on CPU: it reads each
    planned chunk from the backend (`cpu_backend.get`, as the worker does); the H2D scatter into the
    device cache that follows is a Pallas TPU kernel (`update_kv_caches`), which XLA:CPU cannot lower
    ("Only interpret mode is supported on CPU backend"). Returns the bytes read per request.
    """
    meta = scheduler.build_connector_meta(out)
    worker.bind_connector_metadata(meta)
    loaded = {}
    for req in meta.requests_meta:
        if req.load_spec is not None and req.load_spec.can_load:
            values = [worker.connector_worker.cpu_backend.get(c) for c in req.load_spec.src_chunks]
            loaded[req.req_id] = [np.asarray(v).tobytes() for v in values]
            req.load_spec.can_load = False  # read above; the worker's own pass skips it and starts the step
    worker.start_load_kv(None)
    worker.wait_for_save()
    for future, _ in worker.connector_worker._pending_save_futures:
        future.result()  # the saves' D2H and backend.add ran on the connector's thread
    sending, receiving = worker.get_finished(set())
    stats = worker.get_kv_connector_stats()
    worker.clear_connector_metadata()
    scheduler.update_connector_output(
        KVConnectorOutput(finished_sending=sending, finished_recving=receiving, kv_connector_stats=stats)
    )
    return loaded


def run_trace(monkeypatch):
    """The trace; returns (what the first wave saved per prompt, what the second wave loaded, the hits)."""
    monkeypatch.setenv("TPU_OFFLOAD_NUM_CPU_CHUNKS", str(NUM_CPU_CHUNKS))
    monkeypatch.setenv("TPU_OFFLOAD_SKIP_JAX_PRECOMPILE", "1")
    monkeypatch.setenv("TPU_OFFLOAD_NUM_STAGING_BLOCKS", "64")
    mesh = jax.make_mesh((2, 4), ("data", "model"))
    scheduler = TPUOffloadConnector(config(), KVConnectorRole.SCHEDULER)
    worker = TPUOffloadConnector(config(), KVConnectorRole.WORKER)
    runner = Runner(device_cache(mesh), mesh)
    worker.connector_worker.register_runner(runner)

    saved, free_blocks = {}, iter(range(NUM_BLOCKS))
    for prompt in range(NUM_PROMPTS):  # wave 1: every prompt misses, is computed (here: already there) and saved
        req = request(f"first-{prompt}", prompt)
        assert scheduler.get_num_new_matched_tokens(req, 0) == (0, False)
        blocks = [next(free_blocks) for _ in range(PROMPT_BLOCKS)]
        scheduler.update_state_after_alloc(req, MagicMock(get_block_ids=lambda b=blocks: (b,)), 0)
        saved[prompt] = [block_bytes(runner.kv_caches, b) for b in blocks]
        engine_step(scheduler, worker, scheduler_output(new=[(req, blocks, 0)]))
        engine_step(scheduler, worker, scheduler_output(finished=[req.request_id]))

    loaded, hits = {}, {}
    for prompt in reversed(range(NUM_PROMPTS)):  # wave 2: the same prompts, in other device blocks
        req = request(f"second-{prompt}", prompt)
        to_load, _ = scheduler.get_num_new_matched_tokens(req, 0)
        blocks = [next(free_blocks) for _ in range(PROMPT_BLOCKS)]
        scheduler.update_state_after_alloc(req, MagicMock(get_block_ids=lambda b=blocks: (b,)), to_load)
        read = engine_step(scheduler, worker, scheduler_output(new=[(req, blocks, to_load)]))
        hits[prompt] = -(-to_load // BLOCK_SIZE)  # a full hit reports one token less
        loaded[prompt] = read.get(req.request_id, [])
        assert len(loaded[prompt]) == hits[prompt]
        engine_step(scheduler, worker, scheduler_output(finished=[req.request_id]))
    return saved, loaded, hits, worker.connector_worker.cpu_backend


def test_route_a_loads_the_same_bytes_as_tpu_inference_own_backend(monkeypatch, tmp_path):
    saved, loaded, hits, backend = run_trace(monkeypatch)
    assert type(backend) is LocalCPUBackend
    assert sum(hits.values()) > 0, "the trace must hit"

    chunk_bytes = NUM_LAYERS * BLOCK_SIZE * KV_HEADS * 2 * HEAD_DIM * 2
    route_a.install(
        host_bytes=3 * chunk_bytes, disk_directory=tmp_path / "kv", disk_bytes=NUM_CPU_CHUNKS * (chunk_bytes + 4096)
    )
    try:
        saved_a, loaded_a, hits_a, backend_a = run_trace(monkeypatch)
    finally:
        route_a.uninstall()
    assert isinstance(backend_a, JaxkvCPUBackend)
    assert backend_a.spills > 0 and backend_a.disk_reads > 0, "the trace must go through the disk"

    assert hits_a == hits and saved_a == saved
    for prompt, blocks in loaded.items():
        assert loaded_a[prompt] == blocks, f"route (a) read other bytes than tpu-inference's backend, prompt {prompt}"
        want = [quieted(b) for b in saved[prompt][: hits[prompt]]]
        assert blocks == want, f"the chunks are not the prompt's device blocks, prompt {prompt}"


@pytest.fixture(autouse=True)
def _no_leftover_install():
    yield
    route_a.uninstall()
