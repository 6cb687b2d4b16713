"""One process of a 2-process jax.distributed job for tests/test_multihost.py.

    python tests/multihost_worker.py SCENARIO PROCESS_ID PORT OUT_DIR

Each process has 4 simulated CPU devices; together they form an 8-way TP mesh
(process 0 holds TP shards 0-3, process 1 shards 4-7). A worker writes what it
saw to OUT_DIR/<scenario>-<process>.json for the test to compare, and always
ends with os._exit: no teardown in the runtime can hang the test. Process 0,
which hosts the coordination service, exits last. Scenarios:

- ``roundtrip``: engine d2h/h2d with both kernel families (native CPU, and the
  pure-XLA path GPUs/TPUs use) for MHA, quantized MHA and MLA; a
  `TieredStore` + `OffloadWorker` storing and reloading through each
  process's host and disk tiers; lookup and load agreement when the
  processes' tiers differ (refused in one, refused in all; failed in one,
  failed in all); the manager deciding the same in both; the cost of one
  agreement.
- ``tp_change``: blocks stored at one TP degree load at another (8 -> 2,
  2 -> 4, 4 -> 8; every mesh spans both processes, each holding half the
  heads), MHA bf16 and FP8 with scales: each process writes and reads only
  its own heads' stored rows, and every local shard is bit-exact.
- ``kill``: both processes store; process 1 dies (SIGKILL) in the middle of
  a disk write; process 0 must finish its store, get a timeout error (not a
  hang) from the next lookup, and find its own tiers intact.

The numpy helpers at the top (source caches, expected rows) import nothing
that starts a JAX backend, so the test process uses them too.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

NUM_PROCESSES = 2
LOCAL_DEVICES = 4
TP = NUM_PROCESSES * LOCAL_DEVICES
NUM_PAGES = 8
AGREEMENT_TIMEOUT_S = 20.0  # generous for CI on 2 cores; the kill scenario uses its own short one
KILL_TIMEOUT_S = 3.0


def layouts():
    import jax.numpy as jnp

    from jaxkv import KVCacheParams, KVCacheQuantConfig

    return {
        "mha-bf16": KVCacheParams(jnp.bfloat16, n_kv_heads=8, head_dim=16, num_layers=2, page_size=4),
        "mha-fp8": KVCacheParams(
            jnp.float8_e4m3fn,
            n_kv_heads=8,
            head_dim=16,
            num_layers=2,
            page_size=4,
            quant=KVCacheQuantConfig(granularity=8),
        ),
        "mla-bf16": KVCacheParams(jnp.bfloat16, n_kv_heads=1, head_dim=24, num_layers=2, page_size=4, is_mla=True),
    }


def source_arrays(params, seed: int) -> list[np.ndarray]:
    """The global values (and scales) of a test cache: random bits, NaN payloads first."""
    from cachegen import random_bits, special_values

    rng = np.random.default_rng(seed)
    lead = (NUM_PAGES, params.kv_dim, params.num_layers, params.page_size, params.n_kv_heads)
    values = random_bits(lead + (params.head_dim,), params.dtype, rng)
    special = special_values(params.dtype)
    values.reshape(-1)[: special.size] = special
    arrays = [values]
    if params.quant is not None:
        arrays.append(random_bits(lead + (params.scales_per_head,), params.quant.scale_dtype, rng))
    return arrays


def shard_slice(array: np.ndarray, position: int, replicated: bool, tp: int = TP) -> np.ndarray:
    """TP shard `position` of a global array at TP degree `tp` (the whole array when replicated)."""
    if replicated:
        return array
    h = array.shape[4] // tp
    return array[..., position * h : (position + 1) * h, :]


def owned_positions(process: int) -> range:
    return range(process * LOCAL_DEVICES, (process + 1) * LOCAL_DEVICES)


def expected_row(arrays: list[np.ndarray], page: int, process: int, replicated: bool) -> bytes:
    """The host row process `process` stores for `page`: its shards side by side, values then scales."""
    positions = [0] if replicated else owned_positions(process)
    parts = [np.ascontiguousarray(shard_slice(a, i, replicated)[page]).tobytes() for a in arrays for i in positions]
    return b"".join(parts)


def expected_stored(arrays: list[np.ndarray], page: int, process: int) -> bytes:
    """The stored (TP-independent) row of an MHA page in process `process`: a TP-1 page of its heads, per array."""
    per = arrays[0].shape[4] // NUM_PROCESSES
    heads = slice(process * per, (process + 1) * per)
    return b"".join(np.ascontiguousarray(a[page][..., heads, :]).tobytes() for a in arrays)


def block_hash(i: int) -> bytes:
    return hashlib.sha256(b"multihost block %d" % i).digest()


def digest(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


# -- inside a worker ---------------------------------------------------------


def start(process: int, port: int, *, recoverable: bool):
    import jax

    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", LOCAL_DEVICES)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # By default the coordination service stops every process once one dies
    # (fail-stop). The kill scenario turns that off to watch the survivor.
    jax.config.update("jax_enable_recoverability", recoverable)
    jax.distributed.initialize(
        f"127.0.0.1:{port}",
        num_processes=NUM_PROCESSES,
        process_id=process,
        initialization_timeout=60,
        heartbeat_timeout_seconds=10,
    )
    assert jax.process_count() == NUM_PROCESSES and jax.device_count() == TP
    return jax.make_mesh((TP,), ("tp",))


def global_cache(params, mesh, arrays):
    """A KVCacheBuffer over the whole mesh, each process placing only its own shards."""
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from jaxkv import KVCacheBuffer

    replicated = params.replicated(mesh.devices.size)
    sharding = NamedSharding(mesh, P() if replicated else P(None, None, None, None, "tp", None))
    placed = [jax.make_array_from_callback(a.shape, sharding, lambda index, a=a: a[index]) for a in arrays]
    return KVCacheBuffer(replicated, *placed)


def shard_position(shard, array, replicated: bool, mesh) -> int:
    if replicated:
        return list(mesh.devices.flat).index(shard.device)
    return (shard.index[4].start or 0) // (array.shape[4] // TP)


def check_shards(cache, want: list[np.ndarray], mesh) -> dict[str, str]:
    """Assert every local shard of `cache` equals `want`, bit for bit; return digests by kind/position."""
    out = {}
    for kind, array, expected in zip(("values", "scales"), (cache.values, cache.scales), want, strict=False):
        assert not array.is_fully_addressable
        for shard in array.addressable_shards:
            position = shard_position(shard, array, cache.replicates_kv_across_tp, mesh)
            got = np.asarray(shard.data).tobytes()
            exp = np.ascontiguousarray(shard_slice(expected, position, cache.replicates_kv_across_tp)).tobytes()
            assert got == exp, f"{kind} shard {position} differs from the expected bytes"
            out[f"{kind}/{position}"] = digest(got)
    return out


def placed(arrays: list[np.ndarray], src_pages, dst_pages) -> list[np.ndarray]:
    """Zero arrays with `src_pages` of `arrays` at `dst_pages` (what an h2d into a fresh cache leaves)."""
    out = []
    for a in arrays:
        want = np.zeros_like(a.view(np.uint8)).view(a.dtype)
        want[dst_pages] = a[src_pages]
        out.append(want)
    return out


def shard_bytes(cache) -> dict[int, bytes]:
    """This process's value shards by device id, as raw bytes."""
    return {s.device.id: np.asarray(s.data).tobytes() for s in cache.values.addressable_shards}


def engine_round_trip(params, mesh, arrays, process, kernels) -> dict:
    from jaxkv import OffloadEngine, allocate_buffer
    from jaxkv import _native as native

    src = global_cache(params, mesh, arrays)
    replicated = params.replicated(TP)
    units = src.to_memory()
    kinds = len(arrays)
    assert len(units) == kinds * (1 if replicated else LOCAL_DEVICES), units
    assert all(d.process_index == process for u in units for d in u.devices)
    engine = OffloadEngine(src, num_host_pages=6, d2h_path="host" if kernels == "native" else "xla")
    assert engine.h2d_path == ("pool" if kernels == "native" and native.available() else "staged")
    # A row holds this process's shards; an MLA row is the whole latent page, once.
    share = params.host_bytes_per_page(TP) // (1 if replicated else NUM_PROCESSES)
    assert engine.row_bytes == share, (engine.row_bytes, share)
    ids, dst_ids = [5, 0, 7], [1, 6, 3]
    slots = [4, 1, 2] if process == 0 else [0, 3, 5]  # host slots are per process and may differ
    engine.d2h(src, ids, slots).synchronize()
    for page, slot in zip(ids, slots, strict=True):
        assert engine.read_host([slot])[0].tobytes() == expected_row(arrays, page, process, replicated)
    dst = allocate_buffer(params, mesh, NUM_PAGES)
    out, transfer = engine.h2d(dst, slots, dst_ids)
    transfer.synchronize()
    assert dst.values.is_deleted()  # donated: updated in place
    return check_shards(out, placed(arrays, ids, dst_ids), mesh)


def load(worker, store, cache, plan):
    """Run `plan` and apply its result; (the new cache, the LoadResult, agreement calls the load made)."""
    calls = store.agreement.calls
    cache, handle = worker.load(cache, plan)
    result = handle.result()
    assert handle.status == result.status
    store.complete_load(result)
    return cache, result, store.agreement.calls - calls


def tiered_scenario(params, mesh, arrays, process, base: Path) -> dict:
    """Store and reload through each process's host and disk tiers; refusals and failures agree."""
    from jaxkv import GroupAgreement, allocate_buffer, open_tiers
    from jaxkv.tiers.disk import SUFFIX

    replicated = params.replicated(TP)
    src = global_cache(params, mesh, arrays)
    row = params.host_bytes_per_page(TP) // (1 if replicated else NUM_PROCESSES)
    # agreement="auto" (the default): the TP group's GroupAgreement over the coordination service.
    store, worker = open_tiers(src, 2 * row, disk_directory=base, disk_capacity_bytes=1 << 20)
    agreement = store.agreement
    assert isinstance(agreement, GroupAgreement) and agreement.mechanism == "store", agreement
    assert agreement.processes == tuple(range(NUM_PROCESSES)), agreement
    assert worker.agreement is agreement  # the worker agrees on loads with the same group
    disk = worker.tiers["disk"]
    assert disk.directory == base / f"process-{process}", disk.directory
    assert worker.engine.row_bytes == row == store.layout.row_bytes == worker.layout.row_bytes
    assert store.host.num_slots == worker.host.num_slots == 2

    hashes = [block_hash(i) for i in range(6)]
    plan = store.prepare_store(hashes, list(range(6)))
    assert plan.chunks == ((0, 2), (2, 4), (4, 6)) and plan.write_to == ("disk",), plan
    calls = agreement.calls
    store.complete_store(worker.store(src, plan).result())  # host keeps the last 2, disk all 6
    assert agreement.calls == calls  # a store is local: nothing to agree on
    assert sorted(p.name for p in disk.directory.iterdir()) == sorted(h.hex() + SUFFIX for h in hashes)
    for i, h in enumerate(hashes):
        assert disk.get(h).tobytes() == expected_row(arrays, i, process, replicated)
    for i, h in enumerate(hashes[4:], 4):
        assert worker.host.pool[store.host.slot_of(h)].tobytes() == expected_row(arrays, i, process, replicated)
    calls = agreement.calls
    assert store.lookup(hashes) == ["disk"] * 4 + ["host"] * 2
    assert agreement.calls == calls + 1  # one agreement per lookup

    # Reload everything into a fresh cache: 2 blocks from host, 4 promoted from disk.
    cache = allocate_buffer(params, mesh, NUM_PAGES)
    dst_pages = [7, 6, 5, 4, 3, 2]
    sources = []
    for start in (4, 0, 2):  # 4 and 5 from host, the rest promoted from disk; 2 host slots per load
        plan = store.prepare_load(hashes[start : start + 2], dst_pages[start : start + 2])
        cache, result, calls = load(worker, store, cache, plan)
        assert result.status == "loaded" and result.promoted == (True, True), result
        assert calls == 2  # one before writing (whole plan, every promotion read), one after the copy
        sources += plan.sources
    assert sources == ["host"] * 2 + ["disk"] * 4, sources
    assert store.metrics["disk"].blocks_loaded == 4 and store.metrics["host"].blocks_loaded == 2
    out = {"reload": check_shards(cache, placed(arrays, list(range(6)), dst_pages), mesh)}
    statuses = []

    # Process 1 loses block 4 behind the tier's back (its file disappears):
    # its index still lists it, so both lookups say 6, but its load cannot be
    # served. Both processes must refuse, and neither writes a device byte.
    plan = store.prepare_store([block_hash(10), block_hash(11)], [0, 1])
    store.complete_store(worker.store(cache, plan).result())  # push every block out of the host tier
    assert not any(h in store.host for h in hashes)
    if process == 1:
        os.unlink(disk.directory / (hashes[4].hex() + SUFFIX))
    assert len(store.lookup(hashes)) == 6
    plan = store.prepare_load(hashes[4:], [0, 1])
    assert plan.num_held == 2 and plan.sources == ("disk", "disk"), plan  # whole in both at planning
    before = shard_bytes(cache)
    new, result, calls = load(worker, store, cache, plan)
    statuses.append(result.status)
    assert result.status == "refused" and result.failed_pages == [], result
    assert calls == 1  # refused by the first agreement: no copy, nothing to agree on after it
    assert result.promoted == ((True, True) if process == 0 else (False, True)), result.promoted
    assert ("another process" in result.error) == (process == 0), result.error
    assert ("block_hashes[0]" in result.error) == (process == 1), result.error
    assert new is cache and not cache.values.is_deleted() and shard_bytes(cache) == before
    # Now process 1's index knows; the agreed answer is the group's minimum.
    assert len(store.lookup(hashes)) == 4
    assert store.metrics.refused_loads == 1

    # The same load again: process 1's plan is short from the start (it no
    # longer holds block 4); process 0 holds both (promoted into host memory
    # by the refused load). Refused in both again, nothing written.
    plan = store.prepare_load(hashes[4:], [0, 1])
    assert plan.num_held == (2 if process == 0 else 0), plan
    assert plan.sources == (("host", "host") if process == 0 else ()), plan
    new, result, calls = load(worker, store, cache, plan)
    statuses.append(result.status)
    assert result.status == "refused" and calls == 1, result
    assert ("another process" in result.error) == (process == 0), result.error
    assert new is cache and shard_bytes(cache) == before
    assert store.metrics.refused_loads == 2

    # A load whose copy fails in process 1 fails in both, with the same pages.
    real_h2d = worker.engine.h2d

    def failing_h2d(*args, **kwargs):
        raise RuntimeError("injected h2d failure")

    if process == 1:
        worker.engine.h2d = failing_h2d
    plan = store.prepare_load(hashes[:2], [0, 1])
    assert plan.num_held == 2 and plan.sources == ("disk", "disk"), plan
    try:
        cache, result, calls = load(worker, store, cache, plan)
    finally:
        worker.engine.h2d = real_h2d
    statuses.append(result.status)
    assert result.status == "failed" and result.failed_pages == [0, 1], result
    assert calls == 2
    assert ("another process" in result.error) == (process == 0), result.error
    assert ("injected h2d failure" in result.error) == (process == 1), result.error
    assert store.metrics.failed_loads == 1
    # A later load rewrites them: every page of every shard as expected.
    plan = store.prepare_load(hashes[:2], [0, 1])
    cache, result, calls = load(worker, store, cache, plan)
    statuses.append(result.status)
    assert result.status == "loaded" and calls == 2, result
    out["final"] = check_shards(cache, placed(arrays, [0, 1, 2, 3, 4, 5, 0, 1], [7, 6, 5, 4, 3, 2, 0, 1]), mesh)
    out["statuses"] = statuses
    out["agreement_calls"] = agreement.calls
    out["fingerprint"] = store.fingerprint.hex()
    worker.close()
    return out


def manager_scenario(params, mesh, process, base: Path) -> dict:
    """Drive the prefix-caching manager through a workload; return what it decided per request."""
    from jaxkv import GroupAgreement, PagedKVCacheManager, allocate_buffer, open_tiers
    from jaxkv._cli.workload import chat_workload

    class Recording(GroupAgreement):
        """Remembers (this process's value, the agreed one) per call."""

        log: list

        def min(self, value: int) -> int:
            agreed = super().min(value)
            self.log.append((int(value), agreed))
            return agreed

    cache = allocate_buffer(params, mesh, 12)  # too small: requests evict each other's prefixes
    agreement = Recording.for_cache(cache, timeout_s=AGREEMENT_TIMEOUT_S)
    agreement.log = []
    row = params.host_bytes_per_page(TP) // (1 if params.replicated(TP) else NUM_PROCESSES)
    store, worker = open_tiers(cache, 10 * row, disk_directory=base, disk_capacity_bytes=1 << 20, agreement=agreement)
    assert store.agreement is agreement and worker.agreement is agreement
    manager = PagedKVCacheManager(cache, store)
    events = chat_workload(
        np.random.default_rng(7),
        system_prompts=1,
        conversations=4,
        turns=4,
        system_tokens=9,
        user_tokens=5,
        reply_tokens=3,
        vocab=50,
    )
    decisions = []
    for step, (conversation, prompt, reply) in enumerate(events):
        if process == 1 and step == len(events) // 2:
            # Process 1's disk loses every block: from here on its tiers hold
            # less than process 0's, and the group must still decide alike.
            for path in worker.tiers["disk"].directory.iterdir():
                path.unlink()
        rid = f"{conversation}/{step}"
        request = manager.add_request(rid, prompt)
        status = None
        if request.load is not None:
            cache, handle = worker.load(cache, request.load)
            status = handle.status
            manager.complete_load(handle.result())
        for computed in (len(prompt), len(prompt) + len(reply)):
            if computed > len(prompt):
                manager.append_tokens(rid, reply)
            plan = manager.commit(rid, computed)
            if plan is not None:
                manager.complete_store(worker.store(cache, plan).result())
        decisions.append([rid, list(request.pages), request.num_cached_tokens, request.tokens_from_device, status])
        manager.finish(rid)
    m = manager.metrics
    outside = sum(n for source, n in m.tokens_from.items() if source != "device")
    decisions.append(["totals", m.tokens_from["device"], outside, m.tokens_recomputed])
    worker.close()
    overruled = sum(value != agreed for value, agreed in agreement.log)
    return {
        "decisions": decisions,
        "overruled": overruled,
        "refused": store.metrics.refused_loads,
        "manager_refused": m.loads_refused,
        "agreement_calls": agreement.calls,
    }


def agreement_cost(mesh, params, repeats: int = 200) -> dict:
    """Seconds per agreement, each mechanism, and per lookup with and without agreeing."""
    from jaxkv import allocate_buffer, open_tiers
    from jaxkv.transfer.agreement import GroupAgreement

    out = {}
    cache = allocate_buffer(params, mesh, NUM_PAGES)
    for mechanism in ("store", "collective"):
        agreement = GroupAgreement.for_cache(cache, mechanism=mechanism, timeout_s=AGREEMENT_TIMEOUT_S)
        for i in range(20):  # warm up (the collective compiles)
            agreement.min(i)
        times = []
        for i in range(repeats):
            t0 = time.perf_counter()
            assert agreement.min(100 + i + jax_process()) == 100 + i
            times.append(time.perf_counter() - t0)
        out[f"{mechanism}_median_s"] = float(np.median(times))
        out[f"{mechanism}_p90_s"] = float(np.percentile(times, 90))
    out["fallback"] = agreement_fallback(cache)
    hashes = [block_hash(i) for i in range(4)]
    for name, agreement in (("alone", None), ("agreed", "auto")):
        store, worker = open_tiers(cache, 4 * params.host_bytes_per_page(TP), agreement=agreement)
        store.complete_store(worker.store(cache, store.prepare_store(hashes, list(range(4)))).result())
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            assert store.lookup(hashes) == ["host"] * 4
            times.append(time.perf_counter() - t0)
        out[f"lookup_{name}_median_s"] = float(np.median(times))
        if agreement == "auto":
            out["auto_mechanism"] = store.agreement.mechanism
        worker.close()
    return out


def agreement_fallback(cache) -> dict:
    """The agreement when `_jax_compat` finds no coordination client (as on a jax it was not
    checked against): "auto" warns and takes the collective, which agrees all the same."""
    import warnings

    from jaxkv import _jax_compat
    from jaxkv.transfer.agreement import GroupAgreement

    real = _jax_compat.coordination_client
    _jax_compat.coordination_client = lambda: None
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            agreement = GroupAgreement.for_cache(cache, timeout_s=AGREEMENT_TIMEOUT_S)
        out = {
            "mechanism": agreement.mechanism,
            "warnings": [f"{w.category.__name__}: {w.message}" for w in caught],
            # Process p votes v + 10 p: the group's minimum is process 0's vote.
            "mins": [agreement.min(v + 10 * jax_process()) for v in (7, 3, 12)],
        }
        try:
            GroupAgreement.for_cache(cache, mechanism="store")
            out["store_error"] = None
        except ValueError as e:
            out["store_error"] = str(e)
        return out
    finally:
        _jax_compat.coordination_client = real


def jax_process() -> int:
    import jax

    return jax.process_index()


def barrier(name: str, timeout_s: float = 60.0) -> None:
    """All processes reach `name` (the coordination service's barrier: host-side, with a timeout)."""
    from jaxkv import _jax_compat

    client = _jax_compat.coordination_client()
    assert client is not None, "the coordination client is what the 'store' agreement runs on"
    client.wait_at_barrier(name, int(timeout_s * 1000))


def roundtrip(process: int, port: int, out: Path) -> dict:
    mesh = start(process, port, recoverable=False)
    from jaxkv import _native as native

    result = {"engine": {}}
    t0 = time.perf_counter()
    real_available = native.available
    for kernels in ("native", "xla"):
        if kernels == "xla":
            native.available = lambda: False  # the pure-XLA kernels GPUs and TPUs use
        for seed, (name, params) in enumerate(layouts().items()):
            arrays = source_arrays(params, seed)
            result["engine"][f"{kernels}/{name}"] = engine_round_trip(params, mesh, arrays, process, kernels)
        native.available = real_available
    result["engine_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    result["tiered"] = {}
    for seed, name in enumerate(("mha-fp8", "mla-bf16")):
        params = layouts()[name]
        base = out / f"tiers-{name}"
        result["tiered"][name] = tiered_scenario(params, mesh, source_arrays(params, 10 + seed), process, base)
    result["tiered_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    result["manager"] = {
        name: manager_scenario(layouts()[name], mesh, process, out / f"manager-{name}")
        for name in ("mha-bf16", "mla-bf16")
    }
    result["manager_s"] = time.perf_counter() - t0
    result["cost"] = agreement_cost(mesh, layouts()["mha-bf16"])
    return result


def kill(process: int, port: int, out: Path) -> dict:
    mesh = start(process, port, recoverable=True)
    from jaxkv import open_tiers
    from jaxkv.tiers import disk as _disk
    from jaxkv.tiers.disk import DiskTier
    from jaxkv.transfer.agreement import GroupAgreement, GroupAgreementError

    params = layouts()["mha-bf16"]
    arrays = source_arrays(params, 3)
    src = global_cache(params, mesh, arrays)
    agreement = GroupAgreement.for_cache(src, timeout_s=KILL_TIMEOUT_S)
    row = params.host_bytes_per_page(TP) // NUM_PROCESSES
    store, worker = open_tiers(
        src, 2 * row, disk_directory=out / "tiers", disk_capacity_bytes=1 << 20, agreement=agreement
    )
    disk = worker.tiers["disk"]
    info = {
        "fingerprint": disk.fingerprint.hex(),  # the stored form's
        "row_bytes": worker.engine.row_bytes,
        "directory": str(disk.directory),
    }
    (out / f"kill-{process}.info.json").write_text(json.dumps(info))
    first = [block_hash(i) for i in range(4)]
    store.complete_store(worker.store(src, store.prepare_store(first, [0, 1, 2, 3])).result())
    assert store.lookup(first) == ["disk", "disk", "host", "host"]  # the group agrees while both live
    second = [block_hash(i) for i in range(4, 8)]
    if process == 1:
        # Die in the middle of the third disk write of the next store: the
        # temporary file holds the header only.
        real_writev, calls = _disk._writev_full, []

        def dying_writev(fd, parts):
            calls.append(fd)
            if len(calls) == 3:
                os.write(fd, bytes(parts[0]))
                os.kill(os.getpid(), signal.SIGKILL)
            return real_writev(fd, parts)

        _disk._writev_full = dying_writev
    barrier("kill: both stored the first blocks")
    # Local: a store never waits for the peer.
    store.complete_store(worker.store(src, store.prepare_store(second, [4, 5, 6, 7])).result())
    assert process == 0, "process 1 should have died"
    t0 = time.perf_counter()
    try:
        store.lookup(first + second)
        error = None
    except GroupAgreementError as e:
        error = str(e)
    waited = time.perf_counter() - t0
    t0 = time.perf_counter()
    try:
        store.lookup(first)
        again = None
    except GroupAgreementError as e:
        again = str(e)
    again_s = time.perf_counter() - t0
    # Our own tiers: every block held, every byte as stored.
    for i, h in enumerate(first + second):
        assert disk.get(h).tobytes() == expected_row(arrays, i, process, False)
    host = {h: store.host.slot_of(h) for h in first + second if h in store.host}
    for i, h in enumerate(first + second):
        if h in host:
            assert worker.engine.read_host([host[h]])[0].tobytes() == expected_row(arrays, i, process, False)
    reopened = DiskTier(disk.directory, 1 << 20)
    reopened.open(store.layout)  # as a composition opens it: rows in their stored form
    verified = sum(
        reopened.get(h).tobytes() == expected_row(arrays, i, process, False) for i, h in enumerate(first + second)
    )
    return {
        "error": error,
        "waited_s": waited,
        "again": again,
        "again_s": again_s,
        "host_blocks": len(host),
        "verified_disk_blocks": verified,
        "leftover_tmp": [p.name for p in disk.directory.iterdir() if p.name.endswith(".tmp")],
    }


def mesh_of(tp: int):
    """A TP mesh of `tp` devices spanning both processes: the first `tp / 2` local devices of each."""
    import jax

    per = tp // NUM_PROCESSES
    devices = [d for p in range(NUM_PROCESSES) for d in [x for x in jax.devices() if x.process_index == p][:per]]
    return jax.make_mesh((tp,), ("tp",), devices=devices)


def tp_change(process: int, port: int, out: Path) -> dict:
    start(process, port, recoverable=False)
    from jaxkv import PagedKVCacheManager, allocate_buffer, open_tiers

    result = {}
    src_pages, dst_pages = [6, 1, 3, 0], [2, 7, 0, 5]
    hashes = [block_hash(100 + i) for i in range(NUM_PAGES)]
    for seed, name in enumerate(("mha-bf16", "mha-fp8")):
        params = layouts()[name]
        arrays = source_arrays(params, 30 + seed)
        for a, b in ((8, 2), (2, 4), (4, 8)):
            base = out / f"tp-{name}-{a}-{b}"
            src = global_cache(params, mesh_of(a), arrays)
            row = params.host_bytes_per_page(a) // NUM_PROCESSES
            store, worker = open_tiers(src, 2 * row, disk_directory=base, disk_capacity_bytes=1 << 22)
            plan = store.prepare_store(hashes, list(range(NUM_PAGES)))
            store.complete_store(worker.store(src, plan).result())
            stored_fp = worker.tiers["disk"].fingerprint
            worker.close()
            disk = base / f"process-{process}"
            raw = (disk / (hashes[3].hex() + ".kvblock")).read_bytes()
            assert raw.endswith(expected_stored(arrays, 3, process)), "the stored row is not this process's heads"

            # "Restart" at TP b over the same directory: a fresh cache and store.
            mesh = mesh_of(b)
            cache = allocate_buffer(params, mesh, NUM_PAGES)
            store, worker = open_tiers(cache, 8 * row, disk_directory=base, disk_capacity_bytes=1 << 22)
            assert worker.tiers["disk"].fingerprint == stored_fp
            plan = store.prepare_load([hashes[i] for i in src_pages], dst_pages)
            assert plan.sources == ("disk",) * len(src_pages), plan
            cache, handle = worker.load(cache, plan)
            loaded = handle.result()
            store.complete_load(loaded)
            assert loaded.status == "loaded", loaded
            want = placed(arrays, src_pages, dst_pages)
            digests = {}
            for kind, array, expected in zip(("values", "scales"), (cache.values, cache.scales), want, strict=False):
                h = array.shape[4] // b
                for shard in array.addressable_shards:
                    position = (shard.index[4].start or 0) // h
                    got = np.asarray(shard.data).tobytes()
                    exp = np.ascontiguousarray(shard_slice(expected, position, False, tp=b)).tobytes()
                    assert got == exp, f"{name} {a}->{b}: {kind} shard {position} differs"
                    digests[f"{kind}/{position}"] = digest(got)
            worker.close()
            result[f"{name}/{a}->{b}"] = {
                "digests": digests,
                "stored_fingerprint": stored_fp.hex(),
                "block_fingerprint": PagedKVCacheManager(cache, store=None).block_fingerprint.hex(),
            }
    return result


SCENARIOS = {"roundtrip": roundtrip, "tp_change": tp_change, "kill": kill}


def main() -> None:
    scenario, process, port, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
    result_path = out / f"{scenario}-{process}.json"
    t0 = time.perf_counter()
    try:
        result = SCENARIOS[scenario](process, port, out)
        result["ok"] = True
        if scenario != "kill":
            barrier(f"{scenario}: done")
    except BaseException as e:
        result = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
    result["seconds"] = time.perf_counter() - t0
    result["pid"] = os.getpid()
    result_path.write_text(json.dumps(result))
    sys.stdout.flush()
    sys.stderr.flush()
    if process == 0 and scenario != "kill":
        # Process 0 hosts the coordination service: were it to exit first, a
        # peer still between the last barrier and its own exit would see the
        # service vanish and abort (SIGABRT) before writing its report.
        wait_for_peers_to_exit(out, scenario)
    os._exit(0 if result["ok"] else 1)


def wait_for_peers_to_exit(out: Path, scenario: str, timeout_s: float = 30.0) -> None:
    """Until every other process has written its report and exited (or `timeout_s` passed)."""
    deadline = time.monotonic() + timeout_s
    for peer in range(1, NUM_PROCESSES):
        path = out / f"{scenario}-{peer}.json"
        while time.monotonic() < deadline:
            try:
                pid = json.loads(path.read_text())["pid"]
            except (OSError, ValueError, KeyError):
                time.sleep(0.01)  # not written yet, or written halfway
                continue
            if not process_running(pid):
                break
            time.sleep(0.01)


def process_running(pid: int) -> bool:
    """Whether `pid` is alive (an exited child its parent has not reaped yet counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


if __name__ == "__main__":
    main()
