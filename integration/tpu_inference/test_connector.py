"""tpu-inference's own `TPUOffloadConnector`, scheduler and worker, driven on CPU over one request trace: once with
its `LocalCPUBackend`, once with route (a) installed (a memory budget of 3 chunks, the rest on disk).

Driven by offload_driver.py (vLLM's step order; the load up to its device write, which XLA:CPU cannot run).
No model runs: the device cache is random bits (bf16, NaN payloads included), each request's prompt owns
the device blocks it was given in the first wave, and the second wave asks for the same prompts again
in other device blocks. What the connector loads there must be, byte for byte, what the first wave
saved, and both runs must load the same blocks. The trace saves more chunks than the scheduler has
(its LRU manager reuses chunk ids: the backend sees overwrites) and more than route (a)'s memory
holds (chunks go to disk and come back).
"""

import hashlib
from unittest.mock import MagicMock

import jax
import numpy as np
import pytest
from offload_driver import allocate, connectors, device_cache, engine_step, scheduler_output
from tpu_inference.offload.cpu_backend import LocalCPUBackend
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


def run_trace(monkeypatch):
    """The trace; returns (what the first wave saved per prompt, what the second wave loaded, the hits)."""
    monkeypatch.setenv("TPU_OFFLOAD_NUM_CPU_CHUNKS", str(NUM_CPU_CHUNKS))
    monkeypatch.setenv("TPU_OFFLOAD_SKIP_JAX_PRECOMPILE", "1")
    monkeypatch.setenv("TPU_OFFLOAD_NUM_STAGING_BLOCKS", "64")
    mesh = jax.make_mesh((2, 4), ("data", "model"))
    shape = dict(layers=NUM_LAYERS, blocks=NUM_BLOCKS, block_size=BLOCK_SIZE, kv_heads=KV_HEADS, head_dim=HEAD_DIM)
    scheduler, worker = connectors(mesh, device_cache(mesh, **shape), BLOCK_SIZE)

    saved, free_blocks = {}, iter(range(NUM_BLOCKS))
    for prompt in range(NUM_PROMPTS):  # wave 1: every prompt misses, is computed (here: already there) and saved
        req = request(f"first-{prompt}", prompt)
        assert scheduler.get_num_new_matched_tokens(req, 0) == (0, False)
        blocks = [next(free_blocks) for _ in range(PROMPT_BLOCKS)]
        allocate(scheduler, req, blocks, 0)
        saved[prompt] = [block_bytes(worker.connector_worker.runner.kv_caches, b) for b in blocks]
        engine_step(scheduler, worker, scheduler_output(new=[(req, blocks, 0)]))
        engine_step(scheduler, worker, scheduler_output(finished=[req.request_id]))

    loaded, hits = {}, {}
    for prompt in reversed(range(NUM_PROMPTS)):  # wave 2: the same prompts, in other device blocks
        req = request(f"second-{prompt}", prompt)
        to_load, _ = scheduler.get_num_new_matched_tokens(req, 0)
        blocks = [next(free_blocks) for _ in range(PROMPT_BLOCKS)]
        allocate(scheduler, req, blocks, to_load)
        step = engine_step(scheduler, worker, scheduler_output(new=[(req, blocks, to_load)]))
        hits[prompt] = -(-to_load // BLOCK_SIZE)  # a full hit reports one token less
        loaded[prompt] = [np.asarray(v).tobytes() for v in step.loaded.get(req.request_id, [])]
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
