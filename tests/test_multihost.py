"""jaxkv under jax.distributed: 2 processes x 4 CPU devices, one 8-way TP mesh.

Each test launches tests/multihost_worker.py twice (process 0 holds TP shards
0-3, process 1 shards 4-7), joined by `jax.distributed.initialize` on a free
127.0.0.1 port, and compares what the workers report. Every launch has a hard
deadline: stragglers are killed and the test fails with their logs.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from cachegen import random_buffer, tp_mesh
from multihost_worker import (
    NUM_PROCESSES,
    TP,
    block_hash,
    digest,
    expected_stored,
    layouts,
    placed,
    shard_slice,
    source_arrays,
)

from jaxkv import OffloadEngine, PagedKVCacheManager, _jax_compat, layout_fingerprint, open_tiers
from jaxkv import _native as native
from jaxkv.tiers.disk import DiskTier
from jaxkv.transfer.agreement import GroupAgreement

WORKER = Path(__file__).with_name("multihost_worker.py")
LAUNCH_DEADLINE_S = 240  # normally 5-15 s; only a broken runtime gets near this
BIND_FAILURE = "Failed to add port"  # what the coordinator logs (then crashes) when its port is taken


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(scenario: str, out: Path) -> tuple[list[int], list[dict], float]:
    """Run both processes of `scenario`; return their exit codes, JSON reports and the wall time."""
    for _ in range(3):
        result = launch_once(scenario, out)
        if result is not None:
            return result
    pytest.fail("3 free ports in a row were taken before the coordinator could bind them")


def launch_once(scenario: str, out: Path):
    """One launch; None when the coordinator could not bind its port (taken since we probed it)."""
    port = free_port()
    env = dict(os.environ, PYTHONUNBUFFERED="1", JAX_PLATFORMS="cpu")
    logs = [out / f"{scenario}-{i}.log" for i in range(NUM_PROCESSES)]
    t0 = time.perf_counter()
    procs = []
    for i, log in enumerate(logs):
        with open(log, "w") as f:
            cmd = [sys.executable, str(WORKER), scenario, str(i), str(port), str(out)]
            procs.append(subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env))
    try:
        while any(p.poll() is None for p in procs):
            if procs[0].poll() not in (None, 0) and BIND_FAILURE in logs[0].read_text():
                return None  # the finally clause stops process 1, which waits for a coordinator
            if time.perf_counter() - t0 > LAUNCH_DEADLINE_S:
                pytest.fail(f"{scenario} workers still running after {LAUNCH_DEADLINE_S} s:\n{tails(logs)}")
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    elapsed = time.perf_counter() - t0
    reports = []
    for i in range(NUM_PROCESSES):
        path = out / f"{scenario}-{i}.json"
        reports.append(json.loads(path.read_text()) if path.exists() else {})
    return [p.returncode for p in procs], reports, elapsed


def tails(logs) -> str:
    return "\n".join(f"--- {log.name}\n" + "\n".join(log.read_text().splitlines()[-40:]) for log in logs)


def failure(reports, out: Path, scenario: str) -> str:
    errors = [r.get("traceback") or r.get("error") or "no report" for r in reports]
    return "\n".join(errors) + "\n" + tails([out / f"{scenario}-{i}.log" for i in range(NUM_PROCESSES)])


@pytest.fixture(scope="module")
def roundtrip(tmp_path_factory):
    out = tmp_path_factory.mktemp("multihost-roundtrip")
    codes, reports, elapsed = launch("roundtrip", out)
    assert codes == [0, 0] and all(r.get("ok") for r in reports), failure(reports, out, "roundtrip")
    return out, reports, elapsed


@pytest.fixture(scope="module")
def tp_change(tmp_path_factory):
    out = tmp_path_factory.mktemp("multihost-tp-change")
    codes, reports, _ = launch("tp_change", out)
    assert codes == [0, 0] and all(r.get("ok") for r in reports), failure(reports, out, "tp_change")
    return reports


def expected_digests(name: str, seed: int, src_pages, dst_pages) -> dict[str, str]:
    """Digest of every shard, by kind and TP position, of a fresh cache after the given placement."""
    params = layouts()[name]
    replicated = params.replicated(TP)
    want = placed(source_arrays(params, seed), src_pages, dst_pages)
    return {
        f"{kind}/{i}": digest(np.ascontiguousarray(shard_slice(a, i, replicated)).tobytes())
        for kind, a in zip(("values", "scales"), want, strict=False)
        for i in range(TP)
    }


def merged(reports, key) -> dict:
    """One process's shards plus the other's: they must not overlap."""
    a, b = (r[key] for r in reports)
    assert not set(a) & set(b), sorted(set(a) & set(b))
    return {**a, **b}


@pytest.mark.parametrize("kernels", ["native", "xla"])
@pytest.mark.parametrize("name", ["mha-bf16", "mha-fp8", "mla-bf16"])
def test_engine_round_trip_is_bit_exact_on_every_shard(roundtrip, name, kernels):
    """d2h then h2d of pages, each process moving only its own shards: all 8 shards bit-exact."""
    _, reports, _ = roundtrip
    if kernels == "native" and not native.available():
        pytest.skip("native CPU kernels unavailable")
    seed = list(layouts()).index(name)
    want = expected_digests(name, seed, [5, 0, 7], [1, 6, 3])
    # MHA: TP positions 0-3 in process 0, 4-7 in process 1. MLA: mesh positions,
    # each process writing its own four replicas from its one host copy.
    got = merged([r["engine"] for r in reports], f"{kernels}/{name}")
    assert got == want


@pytest.mark.parametrize("name", ["mha-fp8", "mla-bf16"])
def test_tiered_store_reloads_every_shard_bit_exact(roundtrip, name):
    """Store to each process's host and disk tier, reload (host hits and disk promotions)."""
    out, reports, _ = roundtrip
    seed = 10 + ["mha-fp8", "mla-bf16"].index(name)
    want = expected_digests(name, seed, list(range(6)), [7, 6, 5, 4, 3, 2])
    got = merged([r["tiered"][name] for r in reports], "reload")
    assert got == want
    # After the refused and failed loads, a load of blocks 0 and 1 into pages 0 and 1 restored them.
    final = expected_digests(name, seed, [0, 1, 2, 3, 4, 5, 0, 1], [7, 6, 5, 4, 3, 2, 0, 1])
    assert merged([r["tiered"][name] for r in reports], "final") == final
    # One disk directory per process (open_tiers), each with its own shards' rows.
    assert sorted(p.name for p in (out / f"tiers-{name}").iterdir()) == ["process-0", "process-1"]


@pytest.mark.parametrize("name", ["mha-fp8", "mla-bf16"])
def test_one_sided_refusal_and_failure_agree(roundtrip, name):
    """Process 1 alone lacks a block (twice: found at load time, then at planning time) and alone
    fails its copy: every load ends the same way in both processes (the workers check the messages,
    that a refused load writes nothing, and that a failed one names its pages)."""
    _, reports, _ = roundtrip
    statuses = [r["tiered"][name]["statuses"] for r in reports]
    assert statuses[0] == statuses[1] == ["refused", "refused", "failed", "loaded"]
    calls = [r["tiered"][name]["agreement_calls"] for r in reports]
    assert calls[0] == calls[1] > 0


def test_fingerprints_name_the_shards_a_row_holds(roundtrip):
    """An MHA row holds different shards in each process; an MLA row is the same latent page
    everywhere, so its blocks are interchangeable, with a single-process TP 8 cache too."""
    _, reports, _ = roundtrip
    mha, mla = ([r["tiered"][name]["fingerprint"] for r in reports] for name in ("mha-fp8", "mla-bf16"))
    assert mha[0] != mha[1]
    single, _, _ = random_buffer(layouts()["mla-bf16"], TP, 4)
    assert mla[0] == mla[1] == OffloadEngine(single, 1).layout_fingerprint.hex()


def test_disk_rows_hold_each_process_own_shards(roundtrip):
    out, _, _ = roundtrip
    params = layouts()["mha-fp8"]
    arrays = source_arrays(params, 10)
    for process in range(NUM_PROCESSES):
        directory = out / "tiers-mha-fp8" / f"process-{process}"
        raw = (directory / (block_hash(3).hex() + ".kvblock")).read_bytes()
        assert raw.endswith(expected_stored(arrays, 3, process))  # its own heads, in the stored form


@pytest.mark.parametrize("name", ["mha-bf16", "mha-fp8"])
@pytest.mark.parametrize("a,b", [(8, 2), (2, 4), (4, 8)], ids=lambda x: f"tp{x}")
def test_blocks_stored_at_one_tp_load_at_another(tp_change, name, a, b):
    """2 processes x 4 devices: stored at TP a, loaded at TP b, every shard of both processes bit-exact."""
    key = f"{name}/{a}->{b}"
    first, second = (r[key] for r in tp_change)
    got = merged([first, second], "digests")
    params = layouts()[name]
    want = placed(source_arrays(params, 30 + ["mha-bf16", "mha-fp8"].index(name)), [6, 1, 3, 0], [2, 7, 0, 5])
    expected = {
        f"{kind}/{i}": digest(np.ascontiguousarray(shard_slice(x, i, False, tp=b)).tobytes())
        for kind, x in zip(("values", "scales"), want, strict=False)
        for i in range(b)
    }
    assert got == expected
    # Each process stores its own heads (so their stored fingerprints differ); blocks are named alike in both.
    assert first["stored_fingerprint"] != second["stored_fingerprint"]
    assert first["block_fingerprint"] == second["block_fingerprint"]
    single, _, _ = random_buffer(params, 2, 4)
    assert first["block_fingerprint"] == PagedKVCacheManager(single).block_fingerprint.hex()


@pytest.mark.parametrize("name", ["mha-bf16", "mla-bf16"])
def test_manager_decides_the_same_in_every_process(roundtrip, name):
    """Same workload, different tiers (process 1 loses its disk halfway): identical page tables."""
    _, reports, _ = roundtrip
    first, second = (r["manager"][name] for r in reports)
    assert first["decisions"] == second["decisions"]
    totals = first["decisions"][-1]
    assert totals[2] > 0  # some prompts were served from host or disk
    # Process 1 held less than process 0 after losing its disk: the agreement
    # overruled process 0's own answer at least once, and no process acted alone.
    assert first["overruled"] > 0 and second["overruled"] == 0
    assert first["refused"] == second["refused"] == first["manager_refused"] == second["manager_refused"]
    assert first["agreement_calls"] == second["agreement_calls"] > 0


def test_lookup_agreement_cost(roundtrip):
    _, reports, elapsed = roundtrip
    for r in reports:
        cost = r["cost"]
        assert cost["auto_mechanism"] == "store"
        assert 0 < cost["store_median_s"] < 0.25
    print(
        "\nagreement cost per call (median, 2 processes on 127.0.0.1):",
        {k: f"{v * 1e6:.0f} us" for k, v in reports[0]["cost"].items() if k.endswith("_s")},
        f"roundtrip launch {elapsed:.1f} s",
    )


def test_agreement_falls_back_to_the_collective_without_the_client(roundtrip):
    """With `_jax_compat` finding no coordination client (a jax it was not checked against), both
    processes warn, take the collective, and agree on the group's minimum; 'store' is refused, saying why."""
    _, reports, _ = roundtrip
    for r in reports:
        fallback = r["cost"]["fallback"]
        assert fallback["mechanism"] == "collective"
        assert fallback["mins"] == [7, 3, 12]  # process 1 voted 17, 13, 22
        (warning,) = fallback["warnings"]
        assert warning.startswith("RuntimeWarning") and "falls back to mechanism='collective'" in warning
        assert "no public API" in fallback["store_error"] and "use mechanism='collective'" in fallback["store_error"]


def test_killed_process_neither_hangs_nor_corrupts(tmp_path):
    """Process 1 dies mid-offload (SIGKILL inside a disk write). Process 0 finishes its
    store, gets a timeout error from the next lookup instead of a hang, and both
    processes' tiers hold only whole, verified blocks."""
    codes, reports, elapsed = launch("kill", tmp_path)
    assert codes[1] == -9, failure(reports, tmp_path, "kill")
    assert codes[0] == 0 and reports[0].get("ok"), failure(reports, tmp_path, "kill")
    survivor = reports[0]
    assert "did not agree" in survivor["error"]
    assert survivor["waited_s"] < 3.0 + 5.0  # the agreement timeout (3 s) plus slack
    assert "failed earlier" in survivor["again"] and survivor["again_s"] < 0.5
    assert survivor["verified_disk_blocks"] == 8 and survivor["leftover_tmp"] == []
    assert elapsed < 60
    # The dead process's directory: its half-written temporary file is removed
    # on restart and every block left is whole and verifies.
    info = json.loads((tmp_path / "kill-1.info.json").read_text())
    directory = Path(info["directory"])
    assert any(p.name.endswith(".tmp") for p in directory.iterdir())  # died mid-write
    tier = DiskTier(directory, 1 << 20, fingerprint=bytes.fromhex(info["fingerprint"]), row_bytes=info["row_bytes"])
    assert not any(p.name.endswith(".tmp") for p in directory.iterdir())
    arrays = source_arrays(layouts()["mha-bf16"], 3)
    held = [i for i in range(8) if block_hash(i) in tier]
    assert held == [0, 1, 2, 3, 4, 5]  # the two writes that completed before the third
    for i in held:
        assert tier.get(block_hash(i)).tobytes() == expected_stored(arrays, i, 1)  # opened as given: stored bytes
    assert tier.corrupt == 0


# -- one process: what the multi-process code costs and checks there ---------


BF16_MHA, FP8_MHA, BF16_MLA = (layouts()[name] for name in ("mha-bf16", "mha-fp8", "mla-bf16"))


def test_one_process_agrees_with_nobody(tmp_path):
    """A cache on one process builds no agreement (lookups cost what they did) and keeps its
    disk blocks in the directory it was given, not in a process-<i> subdirectory."""
    src, _, _ = random_buffer(BF16_MHA, 8, 4)
    assert GroupAgreement.for_cache(src) is None
    store, worker = open_tiers(src, 1 << 20)
    assert store.agreement is None and worker.agreement is None
    worker.close()
    store, worker = open_tiers(src, 1 << 20, disk_directory=tmp_path, disk_capacity_bytes=1 << 20)
    assert store.agreement is None and worker.agreement is None and worker.tiers["disk"].directory == tmp_path
    worker.close()


# Fingerprints of single-process caches at TP 4, row layout v2 (jaxkv/layout/fingerprint.py
# `_TAG`; the scheduler/worker split bumped it from the connector-era digests, which made
# every block stored before it a miss). Multi-process support must not move them: blocks
# already on disk stay loadable. A change here should come with a deliberate tag bump.
PINNED_FINGERPRINTS = [
    (BF16_MHA, "5e5bc912c6067a7f8e3d71b23956e7e2eca7011d1d0391a66865ccea0fd5399f"),
    (FP8_MHA, "eee98fb171cdcfb7979cc2717765c89ba71909b7c6ca949afc3e538a724d42af"),
    (BF16_MLA, "7b17249dd74aff2adafaf26db59b895838dce1e2bd5d73bc8652429dea8f7d2b"),
]


@pytest.mark.parametrize(("params", "fingerprint"), PINNED_FINGERPRINTS)
def test_single_process_fingerprints_are_unchanged(params, fingerprint):
    src, _, _ = random_buffer(params, 4, 4)
    assert OffloadEngine(src, 1).layout_fingerprint.hex() == fingerprint
    assert layout_fingerprint(src).hex() == layout_fingerprint(params, tp=4).hex() == fingerprint


def test_agreement_arguments_are_validated():
    mesh = tp_mesh(8)
    with pytest.raises(ValueError, match=r"needs the jax.distributed coordination service"):
        GroupAgreement([0], mesh=mesh, mechanism="store")
    with pytest.raises(ValueError, match=r"mechanism must be one of"):
        GroupAgreement([0], mesh=mesh, mechanism="gossip")
    with pytest.raises(ValueError, match=r"timeout_s must be a positive number"):
        GroupAgreement([0], mesh=mesh, timeout_s=0)
    with pytest.raises(ValueError, match=r"this process \(0\) is not in processes \[1\]"):
        GroupAgreement([1], mesh=mesh)
    with pytest.raises(ValueError, match=r"needs the mesh"):
        GroupAgreement([0])
    src, _, _ = random_buffer(BF16_MHA, 2, 4)
    with pytest.raises(ValueError, match=r"agreement must be 'auto', None or a GroupAgreement"):
        open_tiers(src, 1 << 20, agreement="always")


def test_collective_agreement_in_one_process():
    """Without a coordination service "auto" falls back to a jitted min over the mesh."""
    agreement = GroupAgreement([0], mesh=tp_mesh(8))
    assert agreement.mechanism == "collective"
    assert [agreement.min(v) for v in (7, 3)] == [7, 3] and agreement.calls == 2


def test_collective_agreement_needs_no_private_api(monkeypatch):
    """mechanism='collective' never asks `_jax_compat` for the coordination client."""

    def private_api(*_):
        raise AssertionError("the collective mechanism reached for the private coordination client")

    monkeypatch.setattr(_jax_compat, "coordination_client", private_api)
    agreement = GroupAgreement([0], mesh=tp_mesh(8), mechanism="collective")
    assert [agreement.min(v) for v in (7, 3)] == [7, 3]


def test_auto_agreement_falls_back_when_the_client_is_out_of_reach(monkeypatch):
    """Under jax.distributed on a jax `_jax_compat` does not know, "auto" warns and takes the
    collective, and "store" is refused with the versions it was checked on."""
    monkeypatch.setattr(jax, "__version_info__", (0, 11, 0))
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)
    assert _jax_compat.coordination_client() is None
    with pytest.warns(RuntimeWarning, match=r"only on jax >=0\.10\.0,<0\.11\.0.*falls back to mechanism='collective'"):
        agreement = GroupAgreement([0], mesh=tp_mesh(8))
    assert agreement.mechanism == "collective"
    assert [agreement.min(v) for v in (7, 3)] == [7, 3]
    with pytest.raises(ValueError, match=r"this is jax .*; use mechanism='collective'"):
        GroupAgreement([0], mesh=tp_mesh(8), mechanism="store")
