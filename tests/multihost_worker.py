"""One process of a 2-process jax.distributed job for tests/test_multihost.py.

    python tests/multihost_worker.py SCENARIO PROCESS_ID PORT OUT_DIR

Each process has 4 simulated CPU devices; together they form an 8-way TP mesh
(process 0 holds TP shards 0-3, process 1 shards 4-7). A worker writes what it
saw to OUT_DIR/<scenario>-<process>.json for the test to compare, and always
ends with os._exit: no teardown in the runtime can hang the test. Scenarios:

- ``roundtrip``: engine d2h/h2d with both kernel families (native CPU, and the
  pure-XLA path GPUs/TPUs use) for MHA, quantized MHA and MLA; tiered
  connector offload/reload through host and disk; lookup and load agreement
  when the processes' tiers differ; the manager deciding the same in both;
  the cost of one agreement.
- ``kill``: both processes offload; process 1 dies (SIGKILL) in the middle of
  a disk write; process 0 must finish its offload, get a timeout error (not a
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


def shard_slice(array: np.ndarray, position: int, replicated: bool) -> np.ndarray:
    """TP shard `position` of a global array (the whole array when replicated)."""
    if replicated:
        return array
    h = array.shape[4] // TP
    return array[..., position * h : (position + 1) * h, :]


def owned_positions(process: int) -> range:
    return range(process * LOCAL_DEVICES, (process + 1) * LOCAL_DEVICES)


def expected_row(arrays: list[np.ndarray], page: int, process: int, replicated: bool) -> bytes:
    """The host row process `process` stores for `page`: its shards side by side, values then scales."""
    positions = [0] if replicated else owned_positions(process)
    parts = [np.ascontiguousarray(shard_slice(a, i, replicated)[page]).tobytes() for a in arrays for i in positions]
    return b"".join(parts)


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

    replicated = params.replicated(TP)
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


def engine_round_trip(params, mesh, arrays, process, kernels) -> dict:
    from jaxkv import OffloadEngine, allocate_buffer
    from jaxkv.transfer import native

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
    engine.d2h(ids, slots).synchronize()
    for page, slot in zip(ids, slots, strict=True):
        assert engine.read_host([slot])[0].tobytes() == expected_row(arrays, page, process, replicated)
    dst = allocate_buffer(params, mesh, NUM_PAGES)
    out, transfer = engine.h2d(dst, slots, dst_ids)
    transfer.synchronize()
    assert dst.values.is_deleted()  # donated: updated in place
    return check_shards(out, placed(arrays, ids, dst_ids), mesh)


def connector_scenario(params, mesh, arrays, process, base: Path) -> dict:
    from jaxkv import KVLoadFailed, KVLoadRefused, TieredConnector, allocate_buffer
    from jaxkv.tiers.disk import SUFFIX
    from jaxkv.transfer.agreement import GroupAgreement

    replicated = params.replicated(TP)
    src = global_cache(params, mesh, arrays)
    row = params.host_bytes_per_page(TP) // (1 if replicated else NUM_PROCESSES)
    agreement = GroupAgreement.for_cache(src, timeout_s=AGREEMENT_TIMEOUT_S)
    c = TieredConnector(src, 2 * row, base, 1 << 20, agreement=agreement)
    assert c.disk.directory == base / f"process-{process}", c.disk.directory
    hashes = [block_hash(i) for i in range(6)]
    c.offload(list(range(6)), hashes).synchronize()  # host keeps the last 2, disk all 6
    assert sorted(p.name for p in c.disk.directory.iterdir()) == sorted(h.hex() + SUFFIX for h in hashes)
    for i, h in enumerate(hashes):
        assert c.disk.get(h).tobytes() == expected_row(arrays, i, process, replicated)
    assert c.lookup(hashes) == 6

    # Reload everything into a fresh cache: 4 blocks promoted from disk, 2 from host.
    fresh = allocate_buffer(params, mesh, NUM_PAGES)
    c.bind(fresh)
    dst_pages = [7, 6, 5, 4, 3, 2]
    for start in (4, 0, 2):  # 4 and 5 from host, the rest promoted from disk; 2 host slots per load
        c.load(dst_pages[start : start + 2], hashes[start : start + 2]).synchronize()
    result = {"reload": check_shards(c.buffer, placed(arrays, list(range(6)), dst_pages), mesh)}

    # Process 1 loses block 4 behind the tier's back (its file disappears):
    # its index still lists it, so both lookups say 6, but its load cannot be
    # served. Both processes must refuse, and neither writes a device byte.
    assert c.metrics.blocks_promoted == 4
    c.offload([0, 1], [block_hash(10), block_hash(11)])  # push every block out of the host tier
    if process == 1:
        os.unlink(c.disk.directory / (hashes[4].hex() + SUFFIX))
    assert c.lookup(hashes) == 6
    before = {s.device.id: np.asarray(s.data).tobytes() for s in c.buffer.values.addressable_shards}
    try:
        c.load([0, 1], hashes[4:])
        refused = None
    except KVLoadRefused as e:
        refused = str(e)
    assert refused is not None and "block_hashes[0]" in refused, refused
    assert ("another process" in refused) == (process == 0), refused
    after = {s.device.id: np.asarray(s.data).tobytes() for s in c.buffer.values.addressable_shards}
    assert before == after
    # Now process 1's index knows; the agreed answer is the group's minimum.
    assert c.lookup(hashes) == 4
    assert c.metrics.refused_loads == 1

    # A load whose copy fails in process 1 fails in both, with the same pages.
    real_h2d = c.engine.h2d

    def failing_h2d(*args, **kwargs):
        raise RuntimeError("injected h2d failure")

    if process == 1:
        c.engine.h2d = failing_h2d
    try:
        c.load([0, 1], hashes[:2])
        failed = None
    except KVLoadFailed as e:
        failed = (str(e), e.page_ids)
    c.engine.h2d = real_h2d
    assert failed is not None and failed[1] == [0, 1], failed
    assert ("another process" in failed[0]) == (process == 0), failed
    assert c.invalid_pages == {0, 1} and c.metrics.failed_loads == 1
    c.load([0, 1], hashes[:2]).synchronize()  # a later load fixes them
    assert c.invalid_pages == set()
    result["agreement_calls"] = agreement.calls
    result["fingerprint"] = c.fingerprint.hex()
    c.close()
    return result


def manager_scenario(params, mesh, process, base: Path) -> dict:
    """Drive the prefix-caching manager through a workload; return what it decided per request."""
    from jaxkv import PagedKVCacheManager, TieredConnector, allocate_buffer
    from jaxkv._cli.workload import chat_workload
    from jaxkv.transfer.agreement import GroupAgreement

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
    connector = TieredConnector(cache, 10 * row, base, 1 << 20, agreement=agreement)
    manager = PagedKVCacheManager(cache, connector)
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
            for path in connector.disk.directory.iterdir():
                path.unlink()
        rid = f"{conversation}/{step}"
        request = manager.add_request(rid, prompt)
        if request.load is not None:
            request.load.synchronize()
        manager.commit(rid, len(prompt))
        manager.append_tokens(rid, reply)
        manager.commit(rid, len(prompt) + len(reply))
        decisions.append([rid, list(request.pages), request.num_cached_tokens, request.tokens_from_device])
        manager.finish(rid)
    m = manager.metrics
    decisions.append(["totals", m.tokens_from_device, m.tokens_from_host + m.tokens_from_disk, m.tokens_recomputed])
    connector.close()
    overruled = sum(value != agreed for value, agreed in agreement.log)
    return {"decisions": decisions, "overruled": overruled, "refused": connector.metrics.refused_loads}


def agreement_cost(mesh, params, repeats: int = 200) -> dict:
    """Seconds per agreement, each mechanism, and per lookup with and without agreeing."""
    from jaxkv import HostConnector, allocate_buffer
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
    hashes = [block_hash(i) for i in range(4)]
    for name, agreement in (("alone", None), ("agreed", "auto")):
        c = HostConnector(cache, 4 * params.host_bytes_per_page(TP), agreement=agreement)
        c.offload(list(range(4)), hashes)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            assert c.lookup(hashes) == 4
            times.append(time.perf_counter() - t0)
        out[f"lookup_{name}_median_s"] = float(np.median(times))
        if agreement == "auto":
            out["auto_mechanism"] = c.agreement.mechanism
        c.close()
    return out


def jax_process() -> int:
    import jax

    return jax.process_index()


def barrier(name: str, timeout_s: float = 60.0) -> None:
    from jax._src import distributed

    distributed.global_state.client.wait_at_barrier(name, int(timeout_s * 1000))


def roundtrip(process: int, port: int, out: Path) -> dict:
    mesh = start(process, port, recoverable=False)
    from jaxkv.transfer import native

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
    result["connector"] = {}
    for seed, name in enumerate(("mha-fp8", "mla-bf16")):
        params = layouts()[name]
        base = out / f"tiers-{name}"
        result["connector"][name] = connector_scenario(params, mesh, source_arrays(params, 10 + seed), process, base)
    result["connector_s"] = time.perf_counter() - t0
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
    from jaxkv import TieredConnector
    from jaxkv.tiers import disk as _disk
    from jaxkv.tiers.disk import DiskTier
    from jaxkv.transfer.agreement import GroupAgreement, GroupAgreementError

    params = layouts()["mha-bf16"]
    arrays = source_arrays(params, 3)
    src = global_cache(params, mesh, arrays)
    agreement = GroupAgreement.for_cache(src, timeout_s=KILL_TIMEOUT_S)
    row = params.host_bytes_per_page(TP) // NUM_PROCESSES
    c = TieredConnector(src, 2 * row, out / "tiers", 1 << 20, agreement=agreement)
    info = {"fingerprint": c.fingerprint.hex(), "row_bytes": c.engine.row_bytes, "directory": str(c.disk.directory)}
    (out / f"kill-{process}.info.json").write_text(json.dumps(info))
    first = [block_hash(i) for i in range(4)]
    c.offload(list(range(4)), first).synchronize()
    assert c.lookup(first) == 4  # the group agrees while both live
    second = [block_hash(i) for i in range(4, 8)]
    if process == 1:
        # Die in the middle of the third disk write of the next offload: the
        # temporary file holds the header only.
        real_writev, calls = _disk._writev_full, []

        def dying_writev(fd, parts):
            calls.append(fd)
            if len(calls) == 3:
                os.write(fd, bytes(parts[0]))
                os.kill(os.getpid(), signal.SIGKILL)
            return real_writev(fd, parts)

        _disk._writev_full = dying_writev
    barrier("kill: both offloaded the first blocks")
    c.offload([4, 5, 6, 7], second).synchronize()  # local: never waits for the peer
    assert process == 0, "process 1 should have died"
    t0 = time.perf_counter()
    try:
        c.lookup(first + second)
        error = None
    except GroupAgreementError as e:
        error = str(e)
    waited = time.perf_counter() - t0
    t0 = time.perf_counter()
    try:
        c.lookup(first)
        again = None
    except GroupAgreementError as e:
        again = str(e)
    again_s = time.perf_counter() - t0
    # Our own tiers: every block held, every byte as offloaded.
    for i, h in enumerate(first + second):
        assert c.disk.get(h).tobytes() == expected_row(arrays, i, process, False)
    host = {h: slot for h, slot in c._host.items()}
    for i, h in enumerate(first + second):
        if h in host:
            assert c.engine.read_host([host[h]])[0].tobytes() == expected_row(arrays, i, process, False)
    reopened = DiskTier(c.disk.directory, 1 << 20, fingerprint=c.fingerprint, row_bytes=c.engine.row_bytes)
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
        "leftover_tmp": [p.name for p in c.disk.directory.iterdir() if p.name.endswith(".tmp")],
    }


SCENARIOS = {"roundtrip": roundtrip, "kill": kill}


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
    result_path.write_text(json.dumps(result))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0 if result["ok"] else 1)


if __name__ == "__main__":
    main()
