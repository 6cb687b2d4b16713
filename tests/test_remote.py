"""`RemoteTier` on a real Redis server: composition, two instances sharing it, and its faults.

Every test starts its own `redis-server` on a free 127.0.0.1 port (no
persistence) and stops it by pid, even when the test fails. Every fault ends
in misses, refused loads or failed writes, per the `Tier` protocol: never a
short or wrong row, never a hang (a SIGALRM fails any test that runs long).
"""

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import redis
from cachegen import random_buffer, tp_mesh
from redis_server import RedisServer
from test_tiers import BF16_MHA, FP8_MLA, ROW, all_pages, h, load, offload, page_bytes

from jaxkv import HostTier, KVCacheParams, OffloadWorker, RowLayout, TieredStore, allocate_buffer
from jaxkv.tiers.blockformat import HEADER, HEADER_BYTES, checksum
from jaxkv.tiers.disk import SUFFIX, DiskTier
from jaxkv.tiers.remote import RemoteTier, RemoteUnavailable, RemoteWriteError

TEST_DEADLINE_S = 60  # each test takes a few seconds at most; past this something hangs
VALUE = ROW + HEADER_BYTES  # a BF16_MHA TP-2 row on the server
WORKER = Path(__file__).with_name("remote_worker.py")


@pytest.fixture(autouse=True)
def no_hang():
    """Fail (not hang) a test that waits on a server forever: SIGALRM interrupts a blocked socket call."""

    def expired(*_):
        raise TimeoutError(f"test still running after {TEST_DEADLINE_S} s: something waits without a timeout")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(TEST_DEADLINE_S)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def server(redis_server):
    """A fresh redis-server (conftest's); always stopped."""
    return redis_server


def make_server(tmp_path, *args):
    return RedisServer(tmp_path / "redis", *args)


def remote_store(cache, url, host_rows=2, lower=(), **kwargs):
    """host (host_rows rows) -> lower tiers -> RemoteTier(url); quick timeouts."""
    kwargs = {"socket_timeout": 0.5, "connect_timeout": 0.5, "retry_interval": 0.2, **kwargs}
    remote = RemoteTier(url, **kwargs)
    row = RowLayout.of(cache).row_bytes
    worker = OffloadWorker(cache, [HostTier(host_rows * row), *lower, remote])
    return TieredStore(worker.spec(), probe=worker.probe), worker, remote


def keys(server) -> list[bytes]:
    with server.admin() as r:
        return sorted(r.keys("*"))


def kill_during(remote, server, command: str, nth: int = 1):
    """Kill the server while the `nth` pipeline of `command`s from now is in flight (sent, the server paused on it)."""
    real = remote._client.pipeline
    seen = [0]

    def pipeline(*args, **kwargs):
        pipe = real(*args, **kwargs)
        execute = pipe.execute

        def killing_execute(*a, **k):
            if pipe.command_stack and pipe.command_stack[0][0][0] == command:
                seen[0] += 1
                if seen[0] == nth:
                    with server.admin() as r:
                        r.client_pause(5000)  # the commands arrive, nothing answers them
                    threading.Timer(0.2, server.stop).start()
            return execute(*a, **k)

        pipe.execute = killing_execute
        return pipe

    remote._client.pipeline = pipeline


# -- format -------------------------------------------------------------------------------------------------------


def test_a_value_is_a_disk_block_file_under_a_namespaced_key(server, tmp_path):
    src, _, _ = random_buffer(BF16_MHA, 2, 4)
    layout = RowLayout.of(src)
    row = np.frombuffer(page_bytes(src, 1), np.uint8)
    remote = RemoteTier(server.url, prefix="deploy-a:", fingerprint=layout.fingerprint, row_bytes=layout.row_bytes)
    disk = DiskTier(tmp_path / "disk", 1 << 20, fingerprint=layout.fingerprint, row_bytes=layout.row_bytes)
    assert remote.put_many([(h(1), row)]) == [True] and disk.put_many([(h(1), row)]) == [True]
    key = b"deploy-a:" + layout.fingerprint[:16].hex().encode() + b":" + h(1).hex().encode()
    assert keys(server) == [key] == [remote.key(h(1))]
    with server.admin() as r:
        assert r.get(key) == (tmp_path / "disk" / (h(1).hex() + SUFFIX)).read_bytes()
    assert remote.put_many([(h(1), row)]) == [False]  # write-once: already held
    out = np.zeros_like(row)
    assert remote.get_many([(h(1), out)]) == [None] and out.tobytes() == row.tobytes()
    assert (remote.used_bytes, len(remote)) == (VALUE, 1)
    remote.close()


# -- composition --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("params", "tp"), [(BF16_MHA, 2), (FP8_MLA, 4)], ids=["mha-bf16-tp2", "mla-fp8-tp4"])
def test_device_host_remote_promotes_a_remote_block_bit_exact(params, tp, server):
    src, _, _ = random_buffer(params, tp, 8, seed=3)
    want = all_pages(src)
    row = params.host_bytes_per_page(tp)
    store, worker, remote = remote_store(src, server.url)
    result = offload(store, worker, src, [0, 1, 2, 3], [h(i) for i in range(4)])
    assert result.written == {"remote": (True,) * 4}
    assert store.lookup([h(i) for i in range(5)]) == ["remote", "remote", "host", "host"]
    fresh = allocate_buffer(params, tp_mesh(tp), 8)
    cache, result = load(store, worker, fresh, [h(0), h(1)], [6, 7])
    assert result.status == "loaded" and result.plan.sources == ("remote", "remote")
    assert [page_bytes(cache, p) for p in (6, 7)] == want[:2]
    assert [store.where(h(i)) for i in (0, 1)] == ["host", "host"]  # promoted into host memory
    m = store.metrics["remote"]
    assert (m.blocks_stored, m.blocks_loaded, m.bytes_read, m.hits) == (4, 2, 2 * row, 2)
    # The tier's own count, and its index's (4 blocks of header + row): they agree.
    assert worker.bytes()["remote"] == store.bytes()["remote"] == (4 * (row + HEADER_BYTES), remote.capacity_bytes)
    worker.close()


def test_device_host_disk_remote(server, tmp_path):
    src, _, _ = random_buffer(BF16_MHA, 2, 8, seed=4)
    want = all_pages(src)
    disk = DiskTier(tmp_path / "disk", 2 * VALUE)
    store, worker, _ = remote_store(src, server.url, host_rows=1, lower=[disk])
    assert store.tier_names == ["host", "disk", "remote"]
    offload(store, worker, src, [0, 1, 2, 3], [h(i) for i in range(4)])
    assert store.lookup([h(i) for i in range(4)]) == ["remote", "remote", "disk", "host"]
    fresh = allocate_buffer(BF16_MHA, tp_mesh(2), 8)
    cache, result = load(store, worker, fresh, [h(0)], [5])  # found only on the server
    assert result.status == "loaded" and result.plan.sources == ("remote",) and page_bytes(cache, 5) == want[0]
    assert store.where(h(0)) == "host"
    cache, result = load(store, worker, cache, [h(2)], [6])
    assert result.plan.sources == ("disk",) and page_bytes(cache, 6) == want[2]
    worker.close()


def test_lookup_asks_the_server_once(server):
    src, _, _ = random_buffer(BF16_MHA, 2, 8)
    store, worker, remote = remote_store(src, server.url)
    offload(store, worker, src, list(range(6)), [h(i) for i in range(6)])
    asked = []
    real = remote.contains_many
    remote.contains_many = lambda hashes: asked.append(len(hashes)) or real(hashes)
    assert store.lookup([h(i) for i in range(8)]) == ["remote"] * 4 + ["host"] * 2
    # One round trip for the six blocks host memory does not hold: a shared tier's index cannot know what
    # other instances stored or the server evicted, so the probe, not the index, answers for it.
    assert asked == [6]
    assert store.lookup([h(i) for i in range(4)]) == ["remote"] * 4 and asked == [6, 4]
    worker.close()


def run_worker(role, url, prefix, out: Path) -> subprocess.Popen:
    cmd = [sys.executable, str(WORKER), role, url, prefix, str(out)]
    with open(out.with_suffix(".log"), "w") as log:  # the child has its own copy of the descriptor
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "JAX_PLATFORMS": "cpu"})


def finish(procs: dict, tmp_path) -> dict:
    reports = {}
    try:
        for role, p in procs.items():
            try:
                p.wait(timeout=TEST_DEADLINE_S - 10)
            except subprocess.TimeoutExpired:
                pytest.fail(
                    f"{role} instance still running: {(tmp_path / role).with_suffix('.log').read_text()[-3000:]}"
                )
            path = tmp_path / f"{role}.json"
            reports[role] = json.loads(path.read_text()) if path.exists() else {}
            assert p.returncode == 0, reports[role].get("traceback") or (tmp_path / f"{role}.log").read_text()[-3000:]
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    return reports


def test_two_instances_share_one_server_and_other_layouts_get_nothing(server, tmp_path):
    """Instance 1 stores; instance 2 (another process, own device cache and host tier) serves bit-exact from it."""
    prefix = "shared-test:"
    first = finish({"store": run_worker("store", server.url, prefix, tmp_path / "store.json")}, tmp_path)
    assert first["store"]["written"] == ["True"] * 6
    stored = keys(server)
    assert len(stored) == 6 and all(k.startswith(prefix.encode()) for k in stored)
    # The second instance and two of other layouts run at once, against what the first left.
    reports = finish(
        {role: run_worker(role, server.url, prefix, tmp_path / f"{role}.json") for role in ("serve", "foreign")},
        tmp_path,
    )
    serve = reports["serve"]
    assert serve["lookup"] == ["remote"] * 6 and serve["loads"] == ["loaded"] * 3
    assert serve["bit_exact"] == [True] * 6 and serve["blocks_loaded"] == 6
    assert serve["in_host"] == ["host", "host"] and serve["corrupt"] == 0
    foreign = reports["foreign"]
    assert foreign["f16"]["row_bytes"] == 2048  # the same row width as the stored blocks: only the layout differs
    for kind in ("f16", "bf16-d32"):
        f = foreign[kind]
        assert (f["lookup"], f["num_held"], f["status"], f["corrupt"]) == ([], 0, "refused", 0), kind
        assert f["get"][0].startswith("KeyError"), kind
    assert keys(server) == stored  # nobody deleted anybody's blocks


# -- faults -------------------------------------------------------------------------------------------------------


def test_server_not_running_at_start_logs_once_and_serves_on(tmp_path, caplog):
    server = make_server(tmp_path)  # a free port, nothing listening yet
    src, _, _ = random_buffer(BF16_MHA, 2, 8)
    want = all_pages(src)
    caplog.set_level(logging.WARNING, logger="jaxkv.tiers.remote")
    try:
        store, worker, remote = remote_store(src, server.url, retry_interval=1.0)
        assert not remote.available and remote.unavailable == 1
        t0 = time.perf_counter()
        result = offload(store, worker, src, [0, 1, 2], [h(i) for i in range(3)])
        assert all(isinstance(a, RemoteUnavailable) for a in result.written["remote"])
        assert store.where(h(2)) == "host" and store.metrics["remote"].errors == 3  # host keeps what fits
        assert store.lookup([h(0)]) == [] and h(0) not in remote
        plan = store.prepare_load([h(2)], [5])
        cache, handle = worker.load(src, plan)
        assert handle.status == "loaded" and page_bytes(cache, 5) == want[2]  # host hits serve on
        store.complete_load(handle.result())
        assert time.perf_counter() - t0 < 2.0
        assert remote.unavailable == 1  # within retry_interval nothing tried the server again
        time.sleep(remote.retry_interval)
        assert store.lookup([h(0)]) == [] and remote.unavailable == 2  # tried again: still down
        outages = [r for r in caplog.records if "unavailable" in r.getMessage()]
        assert len(outages) == 1 and server.url in outages[0].getMessage()  # one outage, one line

        server.start()  # the server comes up: after retry_interval the tier uses it
        time.sleep(remote.retry_interval)
        result = offload(store, worker, cache, [3], [h(3)])
        assert result.written == {"remote": (True,)}
        assert [r.getMessage().endswith("answers again") for r in caplog.records] == [False, True]
        fresh = allocate_buffer(BF16_MHA, tp_mesh(2), 8)
        store2, worker2, _ = remote_store(fresh, server.url)
        out, result = load(store2, worker2, fresh, [h(3)], [0])
        assert result.status == "loaded" and page_bytes(out, 0) == want[3]
        worker.close()
        worker2.close()
    finally:
        server.stop()


def test_server_killed_mid_offload(server):
    src, _, _ = random_buffer(BF16_MHA, 2, 8)
    store, worker, remote = remote_store(src, server.url, host_rows=8, batch_blocks=2, socket_timeout=5)
    kill_during(remote, server, "SET", nth=2)  # the first batch lands, the server dies under the second
    t0 = time.perf_counter()
    result = offload(store, worker, src, list(range(6)), [h(i) for i in range(6)])
    assert time.perf_counter() - t0 < 3.0  # a reset connection, not the 5 s timeout
    written = result.written["remote"]
    assert written[:2] == (True, True)
    assert all(isinstance(a, RemoteUnavailable) for a in written[2:])
    assert [store.where(h(i)) for i in range(6)] == ["host"] * 6  # every host copy stays
    assert store.metrics["remote"].errors == 4 and store.metrics.dropped_offloads == 0
    assert store.lookup([h(i) for i in range(6)]) == ["host"] * 6
    worker.close()


def test_server_killed_mid_load(server):
    src, _, _ = random_buffer(BF16_MHA, 2, 8)
    want = all_pages(src)
    store, worker, remote = remote_store(src, server.url, host_rows=4, socket_timeout=5)
    offload(store, worker, src, list(range(6)), [h(i) for i in range(6)])  # host memory keeps h2..h5
    fresh = allocate_buffer(BF16_MHA, tp_mesh(2), 8)
    before = all_pages(fresh)
    plan = store.prepare_load([h(0), h(1)], [6, 7])  # its two promotion slots evict h2, h3 from host memory
    assert plan.sources == ("remote", "remote")
    kill_during(remote, server, "GET")
    t0 = time.perf_counter()
    cache, handle = worker.load(fresh, plan)
    assert time.perf_counter() - t0 < 3.0
    assert handle.status == "refused" and cache is fresh and all_pages(cache) == before
    store.complete_load(handle.result())
    assert store.host._reserved == set() and store.metrics["remote"].errors == 2
    assert store.lookup([h(0)]) == []  # unavailable: a miss at once

    server.start()  # back, empty
    time.sleep(remote.retry_interval)
    assert store.lookup([h(0), h(1)]) == []
    assert remote.evictions == 2  # stored by this instance, gone from the server
    cache, result = load(store, worker, cache, [h(4), h(5)], [6, 7])  # host memory still serves
    assert result.status == "loaded" and [page_bytes(cache, p) for p in (6, 7)] == want[4:6]
    worker.close()


def test_server_restarted_empty(server):
    src, _, _ = random_buffer(BF16_MHA, 2, 8)
    want = all_pages(src)
    store, worker, remote = remote_store(src, server.url, host_rows=2)
    offload(store, worker, src, [0, 1, 2, 3], [h(i) for i in range(4)])
    plan = store.prepare_load([h(0)], [6])  # planned while the server held it
    server.restart()
    fresh = allocate_buffer(BF16_MHA, tp_mesh(2), 8)
    cache, handle = worker.load(fresh, plan)
    assert handle.status == "refused" and cache is fresh
    store.complete_load(handle.result())
    time.sleep(remote.retry_interval)  # in case the first command met the dead connection
    assert store.lookup([h(0), h(1)]) == [] and h(2) not in remote
    assert remote.contains_many([h(2), h(3)]) == [False, False]
    assert worker.bytes()["remote"][0] == 0 and remote.evictions == 4  # all it stored, seen gone
    result = offload(store, worker, src, [0], [h(0)])  # stored again on the new server
    assert result.written == {"remote": (True,)}
    cache, result = load(store, worker, cache, [h(0)], [6])
    assert result.status == "loaded" and page_bytes(cache, 6) == want[0]
    worker.close()


def test_keys_evicted_by_the_server_under_maxmemory_allkeys_lru(tmp_path):
    big = KVCacheParams(jnp.bfloat16, n_kv_heads=8, head_dim=64, num_layers=4, page_size=8)  # 64 KiB rows at TP 1
    server = make_server(tmp_path, "--maxmemory", "2mb", "--maxmemory-policy", "allkeys-lru")
    try:
        server.start()
        src, _, _ = random_buffer(big, 1, 48, seed=5)
        want = all_pages(src)
        store, worker, remote = remote_store(src, server.url, host_rows=4)
        assert remote.capacity_bytes == 2 << 20  # the server's maxmemory
        hashes = [h(i) for i in range(48)]
        result = offload(store, worker, src, list(range(48)), hashes)  # 3 MiB of rows into 2 MiB
        assert result.written["remote"] == (True,) * 48
        assert remote.used_bytes <= remote.capacity_bytes
        with server.admin() as r:
            assert r.info("stats")["evicted_keys"] > 0
        held = remote.contains_many(hashes)
        # Redis's LRU clock ticks once a second: which keys of this one-second burst went is the server's pick.
        gone, kept = [i for i in range(44) if not held[i]], [i for i in range(44) if held[i]]
        assert len(gone) >= 8 and len(kept) >= 4
        assert remote.evictions > 0 and all(held[hashes.index(x)] for x in remote._held)  # what it counts is there
        fresh = allocate_buffer(big, tp_mesh(1), 48)
        assert store.lookup([hashes[i] for i in gone[:2]]) == []
        plan = store.prepare_load([hashes[i] for i in gone[:2]], [0, 1])
        cache, handle = worker.load(fresh, plan)
        assert plan.num_held == 0 and handle.status == "refused" and cache is fresh
        store.complete_load(handle.result())
        pair = [hashes[i] for i in kept[:2]]
        cache, result = load(store, worker, cache, pair, [0, 1])  # present ones load bit-exact
        assert result.plan.sources == ("remote", "remote") and result.status == "loaded"
        assert [page_bytes(cache, p) for p in (0, 1)] == [want[i] for i in kept[:2]]
        worker.close()
    finally:
        server.stop()


def test_a_full_server_without_eviction_refuses_writes_and_the_host_copy_stays(tmp_path):
    server = make_server(tmp_path)
    try:
        server.start()
        src, _, _ = random_buffer(BF16_MHA, 2, 8)
        with server.admin() as r:
            r.set(b"ballast", b"x" * (2 << 20))
            r.config_set("maxmemory-policy", "noeviction")
            r.config_set("maxmemory", "1mb")  # the server is now over its limit and evicts nothing
        store, worker, remote = remote_store(src, server.url, host_rows=2)
        result = offload(store, worker, src, [0, 1], [h(0), h(1)])
        assert all(isinstance(a, RemoteWriteError) for a in result.written["remote"])
        assert "OutOfMemoryError" in str(result.written["remote"][0])
        assert [store.where(h(i)) for i in (0, 1)] == ["host", "host"] and remote.used_bytes == 0
        assert remote.available  # a refusal is an answer, not an outage
        worker.close()
    finally:
        server.stop()


def flip_payload_byte(r, key, **_):
    value = bytearray(r.get(key))
    value[HEADER_BYTES + len(value) // 2] ^= 0x01
    r.set(key, bytes(value))


def flip_header_byte(r, key, **_):
    value = bytearray(r.get(key))
    value[3] ^= 0x20  # the magic
    r.set(key, bytes(value))


def truncate_value(r, key, **_):
    r.set(key, r.get(key)[:-1])


def truncate_with_a_matching_checksum(r, key, **_):
    """A short row whose header checksum was recomputed: only the length check stands between it and a copy."""
    value = r.get(key)
    fields = list(HEADER.unpack_from(value))
    payload = value[HEADER_BYTES:-64]
    fields[-1] = checksum(payload)
    r.set(key, HEADER.pack(*fields) + payload)


def another_blocks_bytes(r, key, other_key, **_):
    r.set(key, r.get(other_key))


def another_layouts_bytes(r, key, foreign_value, **_):
    r.set(key, foreign_value)


def not_a_string(r, key, **_):
    r.delete(key)
    r.rpush(key, b"x")


DAMAGE = [
    flip_payload_byte,
    flip_header_byte,
    truncate_value,
    truncate_with_a_matching_checksum,
    another_blocks_bytes,
    another_layouts_bytes,
    not_a_string,
]


@pytest.mark.parametrize("damage", DAMAGE, ids=[d.__name__ for d in DAMAGE])
def test_a_value_corrupted_inside_the_server_is_a_miss_and_its_key_is_deleted(damage, server):
    src, _, _ = random_buffer(BF16_MHA, 2, 8)
    want = all_pages(src)
    store, worker, remote = remote_store(src, server.url)
    offload(store, worker, src, [0, 1, 2, 3], [h(i) for i in range(4)])
    # Another layout (float16, the same row width) writing the same block hash; its key differs, so copy its value.
    other = KVCacheParams(jnp.float16, n_kv_heads=8, head_dim=16, num_layers=2, page_size=4)
    layout = RowLayout.of(other, tp=2)
    assert layout.row_bytes == ROW and layout.fingerprint != store.fingerprint
    foreign = RemoteTier(server.url, fingerprint=layout.fingerprint, row_bytes=ROW)
    foreign.put_many([(h(0), np.frombuffer(want[0], np.uint8))])
    with server.admin() as r:
        foreign_value = r.get(foreign.key(h(0)))
        damage(r, remote.key(h(0)), other_key=remote.key(h(1)), foreign_value=foreign_value)
    fresh = allocate_buffer(BF16_MHA, tp_mesh(2), 8)
    before = all_pages(fresh)
    plan = store.prepare_load([h(0), h(1)], [6, 7])
    assert plan.sources == ("remote", "remote")
    cache, handle = worker.load(fresh, plan)
    assert handle.status == "refused" and cache is fresh and all_pages(cache) == before
    store.complete_load(handle.result())
    assert (remote.corrupt, store.metrics["remote"].corrupt) == (1, 1)
    with server.admin() as r:
        assert not r.exists(remote.key(h(0)))  # deleted
        assert r.exists(remote.key(h(1))) and r.exists(foreign.key(h(0)))  # nothing else
    assert store.lookup([h(0)]) == []
    offload(store, worker, src, [0], [h(0)])  # stored again, then served bit-exact
    cache, result = load(store, worker, cache, [h(1), h(0)], [6, 7])
    assert result.status == "loaded" and [page_bytes(cache, p) for p in (6, 7)] == [want[1], want[0]]
    worker.close()


def slow_by_client_pause(server):
    with server.admin() as r:
        r.client_pause(1500)


def slow_by_debug_sleep(server):
    def sleep():
        with server.admin() as r:
            r.execute_command("DEBUG", "SLEEP", "1.5")  # the whole server stops answering

    threading.Thread(target=sleep, daemon=True).start()
    time.sleep(0.1)


SLOW = [slow_by_client_pause, slow_by_debug_sleep]


@pytest.mark.parametrize("slow", SLOW, ids=["client-pause", "debug-sleep"])
def test_a_server_slower_than_the_timeout_is_a_refusal(slow, server):
    src, _, _ = random_buffer(BF16_MHA, 2, 8)
    want = all_pages(src)
    store, worker, _ = remote_store(src, server.url, socket_timeout=0.3, retry_interval=2.0)
    offload(store, worker, src, list(range(6)), [h(i) for i in range(6)])  # h0..h3 only on the server
    fresh = allocate_buffer(BF16_MHA, tp_mesh(2), 8)
    plan = store.prepare_load([h(0), h(1)], [6, 7])
    slow(server)
    t0 = time.perf_counter()
    cache, handle = worker.load(fresh, plan)
    assert time.perf_counter() - t0 < 1.0  # the 0.3 s timeout, not the 1.5 s stall
    assert handle.status == "refused" and cache is fresh
    store.complete_load(handle.result())
    t0 = time.perf_counter()
    assert store.lookup([h(2)]) == [] and offload(store, worker, src, [6], [h(6)]).written["remote"][0]
    assert time.perf_counter() - t0 < 0.2  # unavailable: answered without waiting on the server again
    time.sleep(max(0.0, 2.0 - (time.perf_counter() - t0)))  # the stall is over and retry_interval has passed
    # The timed-out connection was dropped: the late replies to h0/h1 are never read as h2/h3's.
    cache, result = load(store, worker, cache, [h(2), h(3)], [6, 7])
    assert result.status == "loaded" and [page_bytes(cache, p) for p in (6, 7)] == want[2:4]
    cache, result = load(store, worker, cache, [h(0), h(1)], [4, 5])
    assert result.status == "loaded" and [page_bytes(cache, p) for p in (4, 5)] == want[:2]
    worker.close()


def test_a_cluster_client_spreads_blocks_over_hash_slots(tmp_path):
    """One key per block, no hash tags: a Redis Cluster spreads them (here one node holding all 16384 slots)."""
    from redis.cluster import RedisCluster

    server = make_server(tmp_path, "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf")
    try:
        server.start()
        with server.admin() as r:
            r.execute_command("CLUSTER", "ADDSLOTS", *range(16384))
            deadline = time.monotonic() + 10
            while b"cluster_state:ok" not in r.execute_command("CLUSTER", "INFO"):
                assert time.monotonic() < deadline, "the one-node cluster never became ready"
                time.sleep(0.02)
        client = RedisCluster(host="127.0.0.1", port=server.port, socket_timeout=2)
        src, _, _ = random_buffer(BF16_MHA, 2, 8)
        want = all_pages(src)
        worker = OffloadWorker(src, [HostTier(2 * ROW), RemoteTier(client=client)])
        store = TieredStore(worker.spec(), probe=worker.probe)
        remote = worker.tiers["remote"]
        offload(store, worker, src, list(range(6)), [h(i) for i in range(6)])
        with server.admin() as r:
            slots = {r.execute_command("CLUSTER", "KEYSLOT", remote.key(h(i))) for i in range(6)}
            assert len(slots) == 6
            r.set(remote.key(h(1)), b"junk")
        assert store.lookup([h(i) for i in range(6)]) == ["remote"] * 4 + ["host"] * 2
        fresh = allocate_buffer(BF16_MHA, tp_mesh(2), 8)
        cache, result = load(store, worker, fresh, [h(0), h(1)], [6, 7])
        assert result.status == "refused" and remote.corrupt == 1 and h(1) not in remote
        cache, result = load(store, worker, cache, [h(2), h(3)], [6, 7])
        assert result.status == "loaded" and [page_bytes(cache, p) for p in (6, 7)] == want[2:4]
        worker.close()
        assert client.ping()  # a client passed in is the caller's: close() left it open
        client.close()
    finally:
        server.stop()


def test_unavailable_tier_answers_every_call_without_the_network(server):
    src, _, _ = random_buffer(BF16_MHA, 2, 4)
    layout = RowLayout.of(src)
    remote = RemoteTier(server.url, fingerprint=layout.fingerprint, row_bytes=ROW, retry_interval=30)
    row = np.zeros(ROW, np.uint8)
    assert remote.put_many([(h(0), row)]) == [True]
    server.stop()
    assert h(0) not in remote  # the failure that starts the outage
    calls = []
    remote._client.pipeline = lambda *a, **k: calls.append(1)  # any network use would fail loudly here
    assert remote.contains_many([h(0), h(1)]) == [False, False]
    assert isinstance(remote.put_many([(h(1), row)])[0], RemoteUnavailable)
    assert isinstance(remote.get_many([(h(0), row)])[0], RemoteUnavailable)
    assert calls == [] and remote.unavailable == 1


def test_construction_errors():
    with pytest.raises(ValueError, match="socket_timeout must be a positive number"):
        RemoteTier("redis://127.0.0.1:1/0", socket_timeout=0)
    with pytest.raises(ValueError, match="batch_blocks must be a positive int"):
        RemoteTier("redis://127.0.0.1:1/0", batch_blocks=0)
    with pytest.raises(ValueError, match="either url or client"):
        RemoteTier("redis://127.0.0.1:1/0", client=redis.Redis())
    with pytest.raises(ValueError, match="must return bytes"):
        RemoteTier(client=redis.Redis(decode_responses=True))
    with pytest.raises(ValueError, match="not open"):
        RemoteTier("redis://127.0.0.1:1/0").get_many([])
    assert "secret" not in RemoteTier("redis://user:secret@127.0.0.1:1/0").url


# -- namespaces ---------------------------------------------------------------------------------------------------

# Each prefix holds glob characters that, unescaped in `SCAN MATCH <prefix>*`, match `team-a:`'s keys too.
GLOB_PREFIXES = ["team-?:", "team-*", "team-[a]:", "team-\\a:", "team-[^b]:", "team-[a-c]:"]


def test_glob_escape_covers_every_glob_character():
    from jaxkv.tiers.remote import glob_escape

    assert glob_escape(b"a*b?c[d]e\\f^g-h:") == b"a\\*b\\?c\\[d\\]e\\\\f\\^g\\-h:"
    assert glob_escape(b"jaxkv:0123abcd:") == b"jaxkv:0123abcd:"


@pytest.mark.parametrize("prefix", GLOB_PREFIXES)
def test_clear_under_a_prefix_with_glob_characters_deletes_only_its_own_keys(prefix, server):
    """Issue 23: `clear()` under `team-?:` deleted `team-a:`'s 5 blocks (Valkey 8.1; Redis matches the same)."""
    fingerprint, row = bytes(range(32)), np.arange(ROW, dtype=np.uint8)
    team_a = RemoteTier(server.url, prefix="team-a:", fingerprint=fingerprint, row_bytes=ROW)
    other = RemoteTier(server.url, prefix=prefix, fingerprint=fingerprint, row_bytes=ROW)
    assert team_a.put_many([(h(i), row) for i in range(5)]) == [True] * 5
    assert other.put_many([(h(i), row) for i in range(3, 6)]) == [True] * 3
    before = keys(server)
    with server.admin() as r:  # what the unescaped pattern would have matched: team-a:'s keys too
        assert len(list(r.scan_iter(match=other._namespace + b"*"))) > 3
    assert other.clear() == 3
    assert keys(server) == sorted(k for k in before if k.startswith(b"team-a:"))  # team-a's 5, untouched
    assert team_a.clear() == 5 and keys(server) == []
    team_a.close()
    other.close()


# -- many instances -----------------------------------------------------------------------------------------------


def test_two_instances_storing_the_same_blocks_at_once_both_succeed_and_read_one_value(server):
    """Write-once under contention: per block one SET NX lands (True), the other finds it (False); both read it."""
    fingerprint, n = bytes(range(32)), 16
    tiers = [RemoteTier(server.url, fingerprint=fingerprint, row_bytes=ROW, batch_blocks=4) for _ in range(2)]
    rows = [np.full((n, ROW), 0xA0 + i, np.uint8) for i in range(2)]  # which instance's value survived is visible
    barrier = threading.Barrier(2)
    answers: list = [None, None]

    def store(i):
        barrier.wait()
        answers[i] = tiers[i].put_many([(h(b), rows[i][b]) for b in range(n)])

    threads = [threading.Thread(target=store, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    for b in range(n):  # both succeed: exactly one stored it, the other found it held
        assert sorted([answers[0][b], answers[1][b]]) == [False, True], (b, answers[0][b], answers[1][b])
    read = [np.zeros((n, ROW), np.uint8) for _ in range(2)]
    for i in range(2):
        assert tiers[i].get_many([(h(b), read[i][b]) for b in range(n)]) == [None] * n
    for b in range(n):
        winner = 0 if answers[0][b] else 1
        assert read[0][b].tobytes() == read[1][b].tobytes() == rows[winner][b].tobytes()  # the one value, whole
    assert len(keys(server)) == n
    for t in tiers:
        assert (t.corrupt, t.unavailable) == (0, 0)
        t.close()


def header_states_a_wrong_length(delta):
    """Damage: the header's payload length off by `delta`, the value's size and the payload's checksum kept valid:
    only the length field says it is not this layout's row."""

    def damage(r, key, **_):
        value = r.get(key)
        fields = list(HEADER.unpack_from(value))
        fields[-2] += delta  # payload length
        r.set(key, HEADER.pack(*fields) + value[HEADER_BYTES:])

    return damage


@pytest.mark.parametrize("delta", [-64, 64])
def test_a_value_whose_header_states_a_wrong_payload_length_is_a_miss(delta, server):
    """Issue 24 item 6(e): a reader that ignored the length field passed every other damage case."""
    test_a_value_corrupted_inside_the_server_is_a_miss_and_its_key_is_deleted(
        header_states_a_wrong_length(delta), server
    )
