"""jaxkv's vLLM connector under vLLM 0.33's own scheduler, requests and factory (harness.py says how).

Every step of every test reads back the K/V pages it attends to and compares
them with what their prefix must hold, byte for byte: a load that brought
wrong, stale or partial bytes fails the step that uses them. So the tests
below assert, besides that, *where* the tokens came from.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
from harness import BLOCK, Engine, kv_cache_config, shared_prompts, vllm_config
from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec, SlidingWindowSpec

from jaxkv.integrations.vllm import JaxkvConnector, JaxkvConnectorMetadata

MiB = 1 << 20
BLOCK_BYTES = 3 * BLOCK * 8 * 2 * 32 * 2  # harness: 3 layers, 8 KV heads x (K, V) x 32 dims, bf16
PREFIX, SUFFIX = 100, 40  # 6 full blocks of shared prefix


def host_only():
    return {"host_bytes": 8 * MiB}


def with_disk(tmp_path):
    return {"host_bytes": 8 * MiB, "disk_directory": str(tmp_path / "blocks"), "disk_bytes": 256 * MiB}


def run_one(engine: Engine, rid: str, prompt: list[int], max_tokens: int = 8) -> list[int]:
    engine.add(rid, prompt, max_tokens)
    engine.run()
    return engine.outputs[rid]


def test_vllm_builds_the_connector_by_module_path():
    with Engine(host_only(), tp=1) as engine:
        assert isinstance(engine.connector, JaxkvConnector) and engine.connector.role == KVConnectorRole.SCHEDULER
        assert isinstance(engine.worker_connector, JaxkvConnector)
        assert engine.worker_connector.role == KVConnectorRole.WORKER
        engine.add("a", shared_prompts(1, PREFIX, SUFFIX)[0], 4)
        out = engine.scheduler.schedule()
        assert isinstance(out.kv_connector_metadata, JaxkvConnectorMetadata)


@pytest.mark.parametrize("tp", [1, 4])
def test_a_shared_prefix_is_served_from_host_memory(tp):
    with Engine(host_only(), tp=tp, prefix_caching=False) as engine:
        a, b = shared_prompts(2, PREFIX, SUFFIX)
        run_one(engine, "a", a)
        assert engine.connector.served == {}
        checked = engine.runner.checked_tokens
        run_one(engine, "b", b)
        # b's 6 shared blocks came from host memory and every step of b read them back as written.
        assert engine.connector.served == {"host": 6 * BLOCK}
        assert engine.runner.checked_tokens > checked + 6 * BLOCK
        assert engine.connector.store.metrics.failed_loads == 0


def test_device_prefix_cache_first_then_jaxkv():
    """With vLLM's own prefix cache on, jaxkv serves only what the device no longer holds."""
    with Engine(host_only(), tp=4, prefix_caching=True, num_blocks=24) as engine:
        prompts = shared_prompts(4, PREFIX, SUFFIX, seed=3)
        run_one(engine, "a", prompts[0])
        run_one(engine, "b", prompts[1])  # the device still holds a's prefix blocks
        assert engine.connector.served == {}
        # Unrelated requests push a's blocks out of the device's 24 blocks.
        for i in range(3):
            run_one(engine, f"other{i}", shared_prompts(1, 200, 0, seed=20 + i)[0])
        run_one(engine, "c", prompts[2])
        assert engine.connector.served.get("host", 0) >= BLOCK


def test_concurrent_requests_sharing_device_pages_store_each_block_once():
    """vLLM's prefix cache gives requests scheduled together the same pages for their shared prefix."""
    with Engine(host_only(), tp=4, prefix_caching=True, num_blocks=64) as engine:
        prompts = shared_prompts(4, PREFIX, SUFFIX, seed=4)
        for i, p in enumerate(prompts):
            engine.add(f"r{i}", p, 8)
        engine.run()
        metrics = engine.connector.store.metrics
        # 6 shared blocks once, then each request's own full blocks (suffix and replies): stored once each.
        own = sum((len(p) + 7) // BLOCK - 6 for p in prompts)
        assert metrics["host"].blocks_stored == 6 + own


def test_chunked_prefill_preemption_and_finish_keep_every_page_right():
    """Few device blocks, many requests: vLLM chunks prefills, preempts and resumes; jaxkv refills preempted ones."""
    with (
        Engine(host_only(), tp=4, num_blocks=40, prefix_caching=False) as engine,
        Engine(host_only(), tp=1, num_blocks=400, prefix_caching=False) as reference,
    ):
        prompts = shared_prompts(6, 120, 60, seed=5)
        for e in (engine, reference):
            for i, p in enumerate(prompts):
                e.add(f"r{i}", p, 40)
            e.run()
        assert engine.preemptions > 0, "the trace should make vLLM preempt"
        assert reference.preemptions == 0
        assert engine.outputs == reference.outputs
        assert sum(engine.connector.served.values()) > 0
        assert engine.runner.checked_tokens > 0


def test_a_restart_serves_the_prefix_from_disk(tmp_path):
    a, b = shared_prompts(2, PREFIX, SUFFIX, seed=7)
    with Engine(with_disk(tmp_path), tp=4, prefix_caching=False) as first:
        run_one(first, "a", a)
    with Engine(with_disk(tmp_path), tp=4, prefix_caching=False) as second:
        assert second.connector.served == {}
        run_one(second, "b", b)
        assert second.connector.served == {"disk": 6 * BLOCK}


def test_a_prefix_longer_than_host_memory_loads_what_host_slots_hold(tmp_path):
    """Loads pass through host memory: a restart with 4 host slots serves 4 of the 6 blocks on disk."""
    a, b = shared_prompts(2, PREFIX, SUFFIX, seed=14)
    with Engine(with_disk(tmp_path), tp=4, prefix_caching=False) as first:
        run_one(first, "a", a)
    small = {**with_disk(tmp_path), "host_bytes": 4 * BLOCK_BYTES}
    with Engine(small, tp=4, prefix_caching=False) as second:
        assert second.connector.store.host.num_slots == 4
        run_one(second, "b", b)
        assert second.connector.served == {"disk": 4 * BLOCK}


@pytest.mark.parametrize("tps", [(4, 2), (4, 8), (2, 1)])
def test_a_restart_at_another_tp_degree_serves_from_disk(tmp_path, tps):
    a, b = shared_prompts(2, PREFIX, SUFFIX, seed=8)
    with Engine(with_disk(tmp_path), tp=tps[0], prefix_caching=False) as first:
        run_one(first, "a", a)
    with Engine(with_disk(tmp_path), tp=tps[1], prefix_caching=False) as second:
        run_one(second, "b", b)
        assert second.connector.served == {"disk": 6 * BLOCK}


def test_a_second_instance_is_served_from_redis(redis_server):
    extra = {"host_bytes": 8 * MiB, "remote_url": redis_server.url, "remote_prefix": "vllm-test:"}
    a, b = shared_prompts(2, PREFIX, SUFFIX, seed=11)
    # The two run at the same time, each with its own host memory.
    with Engine(extra, tp=4, prefix_caching=False) as first, Engine(extra, tp=2, prefix_caching=False) as second:
        run_one(first, "a", a)
        run_one(second, "b", b)
        assert second.connector.served == {"remote": 6 * BLOCK}


def test_reset_prefix_cache_empties_every_tier(tmp_path):
    a, b = shared_prompts(2, PREFIX, SUFFIX, seed=12)
    with Engine(with_disk(tmp_path), tp=4, prefix_caching=False) as engine:
        run_one(engine, "a", a)
        assert any((tmp_path / "blocks").rglob("*")), "blocks were written to disk"
        assert engine.scheduler.reset_prefix_cache(reset_connector=True)
        run_one(engine, "b", b)
        assert engine.connector.served == {}, "blocks from before the reset were served"
    # After a restart, a's own blocks (6 and 7: a's suffix) are gone; the 6 shared ones b stored anew remain.
    # Without the reset a's prompt would find all 8 of its full blocks.
    with Engine(with_disk(tmp_path), tp=4, prefix_caching=False) as again:
        run_one(again, "a-again", a)
        assert again.connector.served == {"disk": 6 * BLOCK}


def corrupt_disk_blocks(directory) -> int:
    files = [f for f in directory.rglob("*") if f.is_file() and f.stat().st_size > 4096]
    for f in files:
        data = bytearray(f.read_bytes())
        data[-100] ^= 0xFF  # a payload byte: header intact, checksum wrong
        f.write_bytes(bytes(data))
    return len(files)


@pytest.mark.parametrize("policy", ["recompute", "fail"])
def test_a_load_that_fails_is_reported_never_served(tmp_path, policy):
    """Blocks corrupted on disk behind jaxkv's back: the load fails and vLLM is told (its policy decides the rest)."""
    a, b = shared_prompts(2, PREFIX, SUFFIX, seed=13)
    with Engine(with_disk(tmp_path), tp=4, prefix_caching=False) as first:
        expected_a = run_one(first, "a", a)
        expected_b = run_one(first, "b", b)
    assert corrupt_disk_blocks(tmp_path / "blocks") >= 6
    with Engine(with_disk(tmp_path), tp=4, prefix_caching=False, on_load_failure=policy) as second:
        out = run_one(second, "b", b)
        assert second.connector.served == {}
        assert second.connector._sched.failed_loads == 1
        assert second.runner.discarded == 1  # the step that read the failed pages, and no other
        assert second.connector.store.metrics["disk"].corrupt > 0
        if policy == "recompute":  # vLLM computed the prefix itself: the same tokens as the first instance
            assert out == expected_b
        else:  # vLLM fails the request: an error, never tokens sampled from wrong K/V
            assert out == [] and second.finish_reasons["b"] == "error"
        # The corrupt blocks left jaxkv's indexes (and disk): a's prompt is computed and stored anew, then served.
        assert run_one(second, "a", a) == expected_a


# -- refusals ---------------------------------------------------------------------


def worker_connector(extra, kv_config=None, num_blocks=16):
    config = vllm_config(extra, num_blocks=num_blocks, prefix_caching=False)
    return KVConnectorFactory.create_connector(
        config, KVConnectorRole.WORKER, kv_config or kv_cache_config(num_blocks, 8)
    )


def test_unknown_or_bad_extra_config_is_refused():
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['host_byte'\]"):
        worker_connector({"host_byte": 1})
    with pytest.raises(ValueError, match=r"disk_directory and disk_bytes together"):
        worker_connector({"disk_directory": "/tmp/x"})
    with pytest.raises(ValueError, match=r"host_bytes"):
        worker_connector({"host_bytes": 0})
    with pytest.raises(ValueError, match=r"shard_axis.*got 0"):
        worker_connector({"shard_axis": 0})


def test_torch_tensors_are_refused_at_register():
    c = worker_connector(host_only())
    with pytest.raises(ValueError, match=r"kv_caches\['model.layers.0.self_attn.attn'\] is a torch.Tensor"):
        c.register_kv_caches({"model.layers.0.self_attn.attn": torch.zeros(16, 16, 8, 2, 32)})
    assert c.worker is None


def test_a_sharded_page_axis_is_refused_naming_the_layer():
    mesh = jax.make_mesh((4,), ("model",), devices=jax.devices()[:4])
    bad = jax.device_put(
        np.zeros((16, BLOCK, 8, 2, 32), np.uint16),
        jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("model")),
    )
    c = worker_connector(host_only())
    with pytest.raises(
        ValueError, match=r"kv_caches\[.model.layers.0.self_attn.attn.\] is sharded on axis 0, its page"
    ):
        c.register_kv_caches([bad] * 3)
    assert c.worker is None


def test_hybrid_models_are_refused():
    names = ["full.0", "slide.0"]
    full = FullAttentionSpec(block_size=BLOCK, num_kv_heads=8, head_size=32, dtype=torch.bfloat16)
    slide = SlidingWindowSpec(block_size=BLOCK, num_kv_heads=8, head_size=32, dtype=torch.bfloat16, sliding_window=64)
    hybrid = KVCacheConfig(
        num_blocks=16,
        kv_cache_tensors=[],
        kv_cache_groups=[KVCacheGroupSpec([names[0]], full), KVCacheGroupSpec([names[1]], slide)],
    )
    c = worker_connector(host_only(), hybrid)
    mesh = jax.make_mesh((1,), ("model",), devices=jax.devices()[:1])
    arrays = [
        jax.device_put(
            np.zeros((16, BLOCK, 8, 2, 32), np.uint16), jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        )
    ] * 2
    with pytest.raises(ValueError, match=r"one KV cache group.*has 2 .*hybrid"):
        c.register_kv_caches(arrays)
    assert c.worker is None
    config = vllm_config(host_only(), num_blocks=16, prefix_caching=False)
    with pytest.raises(ValueError, match=r"hybrid"):
        JaxkvConnector(config, KVConnectorRole.SCHEDULER, hybrid)
