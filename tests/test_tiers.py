"""`TieredStore` + `OffloadWorker`: pages through host memory, disk and a tier defined here, bit-exact.

The scheduler side plans (`prepare_load` / `prepare_store`), the worker executes
the plan on the cache it is handed, the store applies the result
(`complete_load` / `complete_store`). Every test drives that loop; the cache is
a value that flows through it.
"""

import dataclasses
import errno
import functools
import hashlib
import os
import stat

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cachegen import TP_DEGREES, random_buffer, tp_mesh
from dict_tier import DictTier

import jaxkv
from jaxkv import (
    HostTier,
    KVCacheParams,
    KVCacheQuantConfig,
    OffloadWorker,
    PagedKVCacheManager,
    RowLayout,
    TieredStore,
    TierMetrics,
    TierPolicy,
    allocate_buffer,
    open_tiers,
)
from jaxkv.tiers.blockformat import HEADER_BYTES, MAGIC
from jaxkv.tiers.disk import SUFFIX, DiskTier, DiskWriteError

# Every test here runs with each HostTier backend (numpy: CPU's default; arrays: GPU/TPU's, run on CPU).
pytestmark = pytest.mark.usefixtures("host_backend")

BF16_MHA = KVCacheParams(jnp.bfloat16, n_kv_heads=8, head_dim=16, num_layers=2, page_size=4)
FP8_MHA = KVCacheParams(
    jnp.float8_e4m3fn, n_kv_heads=8, head_dim=16, num_layers=2, page_size=4, quant=KVCacheQuantConfig(granularity=8)
)
BF16_MLA = KVCacheParams(jnp.bfloat16, n_kv_heads=1, head_dim=24, num_layers=2, page_size=4, is_mla=True)
FP8_MLA = KVCacheParams(
    jnp.float8_e4m3fn,
    n_kv_heads=1,
    head_dim=16,
    num_layers=2,
    page_size=4,
    is_mla=True,
    quant=KVCacheQuantConfig(scale_dtype=jnp.float8_e8m0fnu, granularity=8),
)
LAYOUTS = [BF16_MHA, FP8_MHA, BF16_MLA, FP8_MLA]
LAYOUT_IDS = ["mha-bf16", "mha-fp8", "mla-bf16", "mla-fp8"]
ROW = BF16_MHA.host_bytes_per_page(2)  # 4096: the row of most tests' cache (BF16_MHA at TP 2)
FILE = ROW + HEADER_BYTES  # the same row on disk


def h(i: int) -> bytes:
    return hashlib.sha256(f"block {i}".encode()).digest()


def block_file(directory, i: int):
    return directory / (h(i).hex() + SUFFIX)


def page_bytes(cache, page: int) -> bytes:
    """The bytes of one page on every shard of every array of the cache."""
    return b"".join(
        np.asarray(s.data)[page].tobytes()
        for a in (cache.values, cache.scales)
        if a is not None
        for s in a.addressable_shards
    )


def all_pages(cache) -> list[bytes]:
    return [page_bytes(cache, p) for p in range(cache.total_num_pages)]


def compose(cache, host_bytes, directory=None, disk_bytes=None, **kwargs) -> tuple[TieredStore, OffloadWorker]:
    """A store (host, then disk when `directory` is given, then `tiers=`) and a worker for `cache`."""
    return open_tiers(cache, host_bytes, disk_directory=directory, disk_capacity_bytes=disk_bytes, **kwargs)


def offload(store, worker, cache, pages, hashes):
    """prepare_store -> worker.store -> complete_store; the StoreResult, or None when nothing was new."""
    plan = store.prepare_store(hashes, pages)
    if plan is None:
        return None
    result = worker.store(cache, plan).result()
    store.complete_store(result)
    return result


def load(store, worker, cache, hashes, pages):
    """prepare_load -> worker.load -> complete_load; (the new cache, the LoadResult)."""
    plan = store.prepare_load(hashes, pages)
    cache, handle = worker.load(cache, plan)
    result = handle.result()
    store.complete_load(result)
    return cache, result


def host_row(store, worker, block_hash) -> bytes:
    return bytes(worker.engine.read_host([store.host.slot_of(block_hash)])[0])


def snapshot(store, worker=None, directory=None) -> dict:
    """Everything a bad call must leave as it was: indexes, slot states, pool bytes, files, counters."""
    index = store.host
    state = {
        "host index": index.held(),  # LRU order included
        "reserved": sorted(index._reserved),
        "pins": dict(index._pins),
        "free": sorted(index._free),
        "bytes": store.bytes(),
        "metrics": dataclasses.asdict(store.metrics),
        "outstanding": store.outstanding,
    }
    if worker is not None:
        rows = worker.host
        state["pool"] = rows.pool.tobytes() if rows.backend == "numpy" else [r and tuple(map(id, r)) for r in rows.rows]
        state["worker bytes"] = worker.bytes()
        if "disk" in worker.tiers:
            state["disk index"] = list(worker.tiers["disk"]._index)
    if directory is not None:
        state["files"] = {p.name: p.read_bytes() for p in sorted(directory.iterdir())}
    return state


def flip_byte(path):
    raw = bytearray(path.read_bytes())
    raw[HEADER_BYTES + (len(raw) - HEADER_BYTES) // 2] ^= 0x01
    path.write_bytes(bytes(raw))


def truncate(path):
    os.truncate(path, os.path.getsize(path) - 1)


# -- device -> host -> disk -> restart -> host -> device ----------------------------------------------------------


@pytest.mark.parametrize("tp", TP_DEGREES)
@pytest.mark.parametrize("params", LAYOUTS, ids=LAYOUT_IDS)
def test_device_host_disk_restart_device_is_bit_exact(params, tp, tmp_path):
    src, _, _ = random_buffer(params, tp, num_pages=8, seed=tp)
    want = [page_bytes(src, p) for p in (1, 6, 3)]
    row = params.host_bytes_per_page(tp)
    file = row + HEADER_BYTES
    store, worker = compose(src, 2 * row, tmp_path / "kv", 16 * file)
    result = offload(store, worker, src, [1, 6, 3], [h(1), h(6), h(3)])
    assert result.plan.chunks == ((0, 1), (1, 3))  # 3 blocks through 2 host slots, host keeps the last 2
    assert all(result.copied) and result.written == {"disk": (True, True, True)}
    assert store.bytes() == {"host": (2 * row, 2 * row), "disk": (3 * file, 16 * file)}
    assert [store.where(x) for x in (h(1), h(6), h(3))] == ["disk", "host", "host"]
    store.close()

    # Restart: a new store and worker over a fresh cache and the same directory.
    fresh = allocate_buffer(params, tp_mesh(tp), 8)
    store, worker = compose(fresh, 3 * row, tmp_path / "kv", 16 * file)
    assert store.lookup([h(1), h(6), h(3), h(9)]) == ["disk"] * 3
    assert (store.metrics["disk"].hits, store.metrics.misses) == (3, 1)
    out, result = load(store, worker, fresh, [h(1), h(6), h(3)], [0, 7, 5])
    assert result.status == "loaded" and result.promoted == (True, True, True)
    assert fresh.values.is_deleted()
    assert [page_bytes(out, p) for p in (0, 7, 5)] == want
    m = store.metrics
    assert (m["disk"].blocks_loaded, m["disk"].bytes_read, m.loads) == (3, 3 * row, 1)
    assert store.bytes()["host"] == (3 * row, 3 * row)  # promoted
    if src.replicates_kv_across_tp:  # an MLA page lands identical on every shard
        copies = {np.asarray(s.data)[7].tobytes() for s in out.values.addressable_shards}
        assert len(copies) == 1


def test_mla_blocks_move_across_tp_degrees(tmp_path):
    """A replicated page's bytes do not depend on TP, nor does its fingerprint."""
    src, _, _ = random_buffer(BF16_MLA, 2, 4)
    row = BF16_MLA.host_bytes_per_page(2)
    a, wa = compose(src, 4 * row, tmp_path, 1 << 20)
    offload(a, wa, src, [2], [h(2)])
    fresh = allocate_buffer(BF16_MLA, tp_mesh(4), 4)
    b, wb = compose(fresh, 4 * row, tmp_path, 1 << 20)
    assert a.fingerprint == b.fingerprint
    out, result = load(b, wb, fresh, [h(2)], [0])
    assert result.status == "loaded" and result.plan.sources == ("disk",)
    assert np.asarray(out.values.addressable_shards[3].data)[0].tobytes() == np.asarray(src.values)[2].tobytes()


def test_another_layout_never_loads_foreign_blocks(tmp_path):
    src, _, _ = random_buffer(BF16_MHA, 2, 4)
    a, wa = compose(src, 1 << 20, tmp_path, 1 << 20)
    offload(a, wa, src, [0, 1], [h(0), h(1)])
    other = KVCacheParams(jnp.float16, n_kv_heads=8, head_dim=16, num_layers=2, page_size=4)  # same bytes per page
    cache = allocate_buffer(other, tp_mesh(2), 4)
    b, wb = compose(cache, 1 << 20, tmp_path, 1 << 20)
    assert a.layout.row_bytes == b.layout.row_bytes and a.fingerprint != b.fingerprint
    assert b.lookup([h(0)]) == []
    plan = b.prepare_load([h(0)], [0])
    assert plan.num_held == 0
    out, handle = wb.load(cache, plan)
    assert handle.status == "refused" and out is cache
    assert len(list(tmp_path.glob("*" + SUFFIX))) == 2  # not ours to delete


def test_disk_format_and_directory(tmp_path):
    src, _, _ = random_buffer(BF16_MHA, 2, 4)
    store, worker = compose(src, 1 << 20, tmp_path / "tier", 1 << 20)
    offload(store, worker, src, [3], [h(3)])
    assert stat.S_IMODE(os.stat(tmp_path / "tier").st_mode) == 0o700
    files = os.listdir(tmp_path / "tier")
    assert files == [h(3).hex() + SUFFIX]  # no temporary file left behind
    raw = (tmp_path / "tier" / files[0]).read_bytes()
    assert raw[:8] == MAGIC and len(raw) == HEADER_BYTES + worker.engine.row_bytes
    # The page's bytes, no pickle: the whole (TP-1) page, [kv, layers, tokens, heads, dim], at every TP degree.
    assert raw[HEADER_BYTES:] == np.asarray(src.values)[3].tobytes()
    assert host_row(store, worker, h(3)) == page_bytes(src, 3)  # the host row stays TP-local


# -- LRU order and byte accounting ---------------------------------------------------------------------------------


def test_the_backend_fixture_picks_the_rows(host_backend):
    host = HostTier(1 << 20)
    host.open(RowLayout.of(random_buffer(BF16_MHA, 1, 4)[0]))
    assert host.backend == host_backend
    assert (host.pool is None) == (host_backend == "arrays")


def test_host_lru_eviction_order_and_byte_accounting():
    src, _, _ = random_buffer(BF16_MHA, 2, 8)
    want = all_pages(src)
    store, worker = compose(src, 3 * ROW + 5)
    assert store.tier_names == ["host"] and store.host.num_slots == 3
    assert store.bytes() == {"host": (0, 3 * ROW + 5)}
    offload(store, worker, src, [0, 1, 2], [h(0), h(1), h(2)])
    assert store.bytes() == {"host": (3 * ROW, 3 * ROW + 5)}
    store.touch([h(0)])  # now h1 is the least recently used
    offload(store, worker, src, [3], [h(3)])
    assert store.metrics["host"].evictions == 1
    assert [store.where(x) for x in (h(0), h(1), h(2), h(3))] == ["host", None, "host", "host"]
    cache, result = load(store, worker, src, [h(2)], [7])  # a load refreshes recency too
    assert result.status == "loaded"
    offload(store, worker, cache, [4], [h(4)])  # evicts h0 (h2 was just used, h3 newer)
    assert [store.where(x) for x in (h(0), h(2), h(3), h(4))] == [None, "host", "host", "host"]
    assert store.metrics["host"].evictions == 2 and store.bytes()["host"] == (3 * ROW, 3 * ROW + 5)
    assert page_bytes(cache, 7) == want[2]
    assert host_row(store, worker, h(4)) == want[4]


def test_disk_lru_eviction_order_and_accounting(tmp_path):
    src, _, _ = random_buffer(BF16_MHA, 2, 8)
    store, worker = compose(src, ROW, tmp_path, 2 * FILE)
    for i in range(3):
        offload(store, worker, src, [i], [h(i)])
    assert store.metrics["disk"].evictions == 1 and store.metrics["disk"].blocks_stored == 3
    assert sorted(os.listdir(tmp_path)) == sorted(x.hex() + SUFFIX for x in (h(1), h(2)))
    assert store.bytes() == {"host": (ROW, ROW), "disk": (2 * FILE, 2 * FILE)}
    assert store.lookup([h(0)]) == [] and store.lookup([h(1), h(2)]) == ["disk", "host"]


def test_touch_accepts_any_iterable_and_refreshes_disk(tmp_path):
    src, _, _ = random_buffer(BF16_MHA, 2, 8)
    store, worker = compose(src, ROW, tmp_path, 2 * FILE)
    offload(store, worker, src, [0], [h(0)])
    offload(store, worker, src, [1], [h(1)])
    store.touch(x for x in [h(0)])  # a generator: host and disk both see it
    offload(store, worker, src, [2], [h(2)])  # the disk evicts h1, not the touched h0
    assert store.where(h(0)) == "disk" and store.where(h(1)) is None


# -- corrupt, failed and transient storage --------------------------------------------------------------------------


def corrupt_store(tmp_path, damage):
    src, _, _ = random_buffer(BF16_MHA, 2, 8)
    store, worker = compose(src, ROW, tmp_path, 1 << 20)
    offload(store, worker, src, [0, 1], [h(0), h(1)])  # host keeps h1, disk keeps both
    damage(block_file(tmp_path, 0))
    return src, store, worker


@pytest.mark.parametrize("damage", [flip_byte, truncate])
def test_corrupt_block_is_a_miss_not_garbage(damage, tmp_path):
    src, store, worker = corrupt_store(tmp_path, damage)
    before = all_pages(src)
    plan = store.prepare_load([h(0)], [5])
    assert plan.sources == ("disk",)
    cache, handle = worker.load(src, plan)
    result = handle.result()
    assert result.status == "refused" and cache is src and not src.values.is_deleted()
    assert "block_hashes[0]" in result.error and "is no longer held" in result.error
    store.complete_load(result)
    assert all_pages(cache) == before  # no device page written
    m = store.metrics
    assert m["disk"].corrupt == 1 and m.refused_loads == 1 and m["disk"].blocks_loaded == 0
    assert not block_file(tmp_path, 0).exists()
    assert store.lookup([h(0)]) == [] and store.bytes()["disk"] == (FILE, 1 << 20)
    assert store.lookup([h(1)]) == ["disk"]  # the healthy block is untouched (its host copy made room)
    assert store.host.available() == 1 and len(store.host) == 0  # the slot reserved for h0 is free again
    cache, result = load(store, worker, cache, [h(1)], [5])
    assert result.status == "loaded" and page_bytes(cache, 5) == before[1]


@pytest.mark.parametrize("damage", [flip_byte, truncate])
def test_corrupt_block_after_restart(damage, tmp_path):
    src, store, _ = corrupt_store(tmp_path, damage)
    want = page_bytes(src, 1)
    store.close()
    fresh = allocate_buffer(BF16_MHA, tp_mesh(2), 8)
    store, worker = compose(fresh, 4 * ROW, tmp_path, 1 << 20)
    if damage is truncate:  # a short file fails the size check while the index is rebuilt
        assert store.lookup([h(0)]) == [] and store.metrics["disk"].corrupt == 1
    else:  # a flipped payload byte is caught by the checksum at load time
        assert store.lookup([h(0)]) == ["disk"]
        cache, result = load(store, worker, fresh, [h(0)], [0])
        assert result.status == "refused" and cache is fresh
        assert store.metrics["disk"].corrupt == 1
    assert not block_file(tmp_path, 0).exists()
    cache, result = load(store, worker, fresh, [h(1)], [0])
    assert result.status == "loaded" and page_bytes(cache, 0) == want


@pytest.mark.parametrize("threads", [False, True], ids=["one-thread", "threads"])
def test_parallel_promotion_with_one_corrupt_block(threads, tmp_path, request):
    """Several disk blocks read together (on the writer threads or not): a corrupt one refuses the load,
    the good ones stay promoted."""
    if threads:
        request.getfixturevalue("disk_threads")
    src, _, _ = random_buffer(BF16_MHA, 2, 8)
    want = all_pages(src)
    store, worker = compose(src, 4 * ROW, tmp_path, 1 << 20)
    offload(store, worker, src, [0, 1, 2, 3], [h(0), h(1), h(2), h(3)])
    store.close()
    flip_byte(block_file(tmp_path, 2))
    fresh = allocate_buffer(BF16_MHA, tp_mesh(2), 8)
    empty = all_pages(fresh)
    store, worker = compose(fresh, 4 * ROW, tmp_path, 1 << 20)
    cache, result = load(store, worker, fresh, [h(0), h(1), h(2), h(3)], [4, 5, 6, 7])
    assert result.status == "refused" and "block_hashes[2]" in result.error and cache is fresh
    assert result.promoted == (True, True, False, True) and all_pages(cache) == empty
    assert store.metrics["disk"].corrupt == 1 and store.where(h(2)) is None
    assert store.bytes()["host"] == (3 * ROW, 4 * ROW)
    cache, result = load(store, worker, cache, [h(0), h(1), h(3)], [4, 5, 7])
    assert result.plan.sources == ("host", "host", "host")  # now all from host memory
    assert [page_bytes(cache, p) for p in (4, 5, 7)] == [want[0], want[1], want[3]]


def short_writev(real):
    """os.writev that writes half of its first part once per file, then nothing (a file size limit)."""
    seen = set()

    def writev(fd, parts):
        if fd in seen:
            return 0
        seen.add(fd)
        return real(fd, [parts[0][: len(parts[0]) // 2]])

    return writev


def fail_with(err):
    def fail(*args, **kwargs):
        raise OSError(err, os.strerror(err))

    return fail


DISK_FAILURES = {  # what to replace in jaxkv.tiers.disk, and a factory for the replacement
    "disk-full": ("os.replace", lambda: fail_with(errno.ENOSPC)),
    "unwritable": ("os.replace", lambda: fail_with(errno.EACCES)),
    "unwritable-open": ("os.open", lambda: fail_with(errno.EACCES)),
    "short-write": ("os.writev", lambda: short_writev(os.writev)),
}


@pytest.mark.parametrize("failure", DISK_FAILURES)
def test_failed_disk_write_keeps_the_host_copy(failure, tmp_path, monkeypatch):
    src, _, _ = random_buffer(BF16_MHA, 2, 8)
    want = all_pages(src)
    store, worker = compose(src, 2 * ROW, tmp_path, 1 << 20)
    offload(store, worker, src, [0], [h(0)])
    name, fake = DISK_FAILURES[failure]
    monkeypatch.setattr("jaxkv.tiers.disk." + name, fake())
    result = offload(store, worker, src, [1, 2], [h(1), h(2)])
    monkeypatch.undo()
    assert result.copied == (True, True)
    assert all(isinstance(a, DiskWriteError) for a in result.written["disk"])
    m = store.metrics
    assert (m["disk"].errors, m["disk"].blocks_stored, m["host"].blocks_stored) == (2, 1, 3)
    assert m.dropped_offloads == 0  # host memory still holds both
    assert os.listdir(tmp_path) == [h(0).hex() + SUFFIX]  # nothing half-written, nothing lost
    assert store.bytes() == {"host": (2 * ROW, 2 * ROW), "disk": (FILE, 1 << 20)}
    assert [store.where(x) for x in (h(0), h(1), h(2))] == ["disk", "host", "host"]
    # The host copies still serve; the stored block still loads after a restart.
    cache, result = load(store, worker, src, [h(1), h(2)], [5, 6])
    assert result.status == "loaded" and [page_bytes(cache, p) for p in (5, 6)] == want[1:3]
    store.close()
    fresh = allocate_buffer(BF16_MHA, tp_mesh(2), 8)
    store, worker = compose(fresh, ROW, tmp_path, 1 << 20)
    cache, result = load(store, worker, fresh, [h(0)], [3])
    assert result.status == "loaded" and page_bytes(cache, 3) == want[0]


def test_block_kept_nowhere_is_a_dropped_offload(tmp_path, monkeypatch):
    """Blocks of an early chunk live only on disk; when that write fails they are dropped, and counted."""
    src, _, _ = random_buffer(BF16_MHA, 2, 8)
    store, worker = compose(src, ROW, tmp_path, 1 << 20)
    monkeypatch.setattr("jaxkv.tiers.disk.os.replace", fail_with(errno.ENOSPC))
    result = offload(store, worker, src, [0, 1], [h(0), h(1)])
    monkeypatch.undo()
    assert result.plan.chunks == ((0, 1), (1, 2))
    assert store.metrics.dropped_offloads == 1 and store.metrics["disk"].errors == 2
    assert store.where(h(0)) is None and store.where(h(1)) == "host"
    assert os.listdir(tmp_path) == []


def test_transient_read_error_refuses_the_load_and_keeps_the_block(tmp_path, monkeypatch):
    src, _, _ = random_buffer(BF16_MHA, 2, 8)
    want = page_bytes(src, 0)
    store, worker = compose(src, ROW, tmp_path, 1 << 20)
    offload(store, worker, src, [0, 1], [h(0), h(1)])  # h0 only on disk
    before = all_pages(src)
    plan = store.prepare_load([h(0)], [5])
    monkeypatch.setattr("jaxkv.tiers.disk.os.open", fail_with(errno.EMFILE))
    cache, handle = worker.load(src, plan)
    monkeypatch.undo()
    assert handle.status == "refused" and cache is src
    store.complete_load(handle.result())
    assert all_pages(cache) == before
    assert (store.metrics["disk"].errors, store.metrics["disk"].corrupt) == (1, 0)
    assert store.where(h(0)) == "disk" and block_file(tmp_path, 0).exists()
    cache, result = load(store, worker, cache, [h(0)], [5])
    assert result.status == "loaded" and page_bytes(cache, 5) == want


# -- overlapped loads: lower-tier reads beside the H2D of earlier chunks ----------------------------------------------


def disk_only(tmp_path, n):
    """A 2n-page cache whose first n pages are stored on disk only (host cleared), its store and worker."""
    src, _, _ = random_buffer(BF16_MHA, 2, 2 * n)
    store, worker = compose(src, n * ROW, tmp_path, 2 * n * FILE)
    hashes = [h(i) for i in range(n)]
    offload(store, worker, src, list(range(n)), hashes)
    store.host.clear()
    assert [store.where(x) for x in hashes] == ["disk"] * n
    return src, store, worker, hashes


def count_h2d(worker, monkeypatch) -> list[int]:
    """Page counts of the engine's h2d calls from now on."""
    calls, real = [], worker.engine.h2d

    def h2d(cache, slots, pages, **kw):
        calls.append(len(pages))
        return real(cache, slots, pages, **kw)

    monkeypatch.setattr(worker.engine, "h2d", h2d)
    return calls


def test_a_load_from_disk_goes_in_overlapped_chunks_bit_exact(tmp_path, monkeypatch):
    src, store, worker, hashes = disk_only(tmp_path, 8)
    want = all_pages(src)[:8]
    worker.load_chunk_bytes = 3 * ROW  # 2 rows a chunk (a power of two)
    calls = count_h2d(worker, monkeypatch)
    cache, result = load(store, worker, src, hashes, list(range(8, 16)))
    assert result.status == "loaded" and calls == [2, 2, 2, 2]
    assert [page_bytes(cache, p) for p in range(8, 16)] == want
    assert result.promoted == (True,) * 8 and result.nbytes == 8 * ROW
    assert store.metrics["disk"].bytes_read == 8 * ROW and store.metrics["disk"].blocks_loaded == 8
    assert [store.where(x) for x in hashes] == ["host"] * 8  # promoted on load


def test_a_read_failure_after_written_chunks_fails_the_load(tmp_path, monkeypatch):
    src, store, worker, hashes = disk_only(tmp_path, 8)
    worker.load_chunk_bytes = 2 * ROW
    calls = count_h2d(worker, monkeypatch)
    flip_byte(block_file(tmp_path, 5))  # the third chunk's second block
    cache, handle = worker.load(src, store.prepare_load(hashes, list(range(8, 16))))
    result = handle.result()
    assert result.status == "failed" and calls == [2, 2] and src.values.is_deleted()
    assert "block_hashes[5]" in result.error and "after 4 of 8 pages were written" in result.error
    assert result.failed_pages == list(range(8, 16))
    assert result.promoted == (True,) * 5 + (False,) + (True,) * 2  # every chunk was read
    store.complete_load(result)
    assert store.metrics.failed_loads == 1 and store.metrics["disk"].corrupt == 1
    assert not store.host._pins and not store.host._reserved
    assert [store.where(x) for x in hashes] == ["host"] * 5 + [None] + ["host"] * 2
    cache, again = load(store, worker, cache, hashes[:5], list(range(8, 13)))
    assert again.status == "loaded" and [page_bytes(cache, p) for p in range(8, 13)] == all_pages(cache)[8:13]


def test_a_read_failure_in_the_first_chunk_refuses_and_writes_nothing(tmp_path, monkeypatch):
    src, store, worker, hashes = disk_only(tmp_path, 8)
    worker.load_chunk_bytes = 2 * ROW
    calls = count_h2d(worker, monkeypatch)
    flip_byte(block_file(tmp_path, 1))
    before = all_pages(src)
    cache, handle = worker.load(src, store.prepare_load(hashes, list(range(8, 16))))
    result = handle.result()
    assert result.status == "refused" and cache is src and not src.values.is_deleted() and calls == []
    assert "no device page was written" in result.error and result.failed_pages == [] and result.nbytes == 0
    assert all_pages(cache) == before
    store.complete_load(result)
    assert store.metrics.refused_loads == 1 and not store.host._pins and not store.host._reserved


def test_a_group_agreement_keeps_the_load_in_one_piece(tmp_path, monkeypatch):
    """Across processes refused/failed must be decided alike: no chunks, one agreement before one H2D."""

    class Alone:  # a group of one process: its own answer is the group's
        asked = 0

        def min(self, value):
            Alone.asked += 1
            return int(value)

    src, store, worker, hashes = disk_only(tmp_path, 8)
    want = all_pages(src)[:8]
    worker.load_chunk_bytes = 2 * ROW
    monkeypatch.setattr(worker, "agreement", Alone())
    calls = count_h2d(worker, monkeypatch)
    cache, result = load(store, worker, src, hashes, list(range(8, 16)))
    assert result.status == "loaded" and calls == [8] and Alone.asked == 2
    assert [page_bytes(cache, p) for p in range(8, 16)] == want


# -- races: eviction, in-flight loads, repeated stores, late completions ----------------------------------------------


def test_eviction_between_lookup_and_load_refuses_and_writes_nothing():
    src, _, _ = random_buffer(BF16_MHA, 2, 8)
    store, worker = compose(src, 2 * ROW)
    offload(store, worker, src, [0, 1], [h(0), h(1)])
    assert store.lookup([h(0), h(1)]) == ["host", "host"]
    offload(store, worker, src, [2, 3], [h(2), h(3)])  # evicts both between the lookup and the load
    before = all_pages(src)
    plan = store.prepare_load([h(2), h(0)], [4, 5])  # h2 is held, h0 is not: no short load
    assert plan.num_held == 1
    cache, handle = worker.load(src, plan)
    assert handle.status == "refused" and cache is src and not src.values.is_deleted()
    store.complete_load(handle.result())
    assert all_pages(cache) == before
    assert store.metrics.refused_loads == 1 and store.host.available() == 2  # the pin is gone


@pytest.mark.parametrize("why", ["evicted", "corrupt"])
def test_refused_load_leaves_the_cache_as_it_was(why, tmp_path):
    """A block gone after planning (evicted from every tier, or corrupt on disk): the same cache comes back."""
    src, _, _ = random_buffer(BF16_MHA, 2, 8)
    store, worker = compose(src, 3 * ROW, tmp_path, 4 * FILE)
    offload(store, worker, src, [0, 1, 2, 3], [h(0), h(1), h(2), h(3)])  # host: h1-h3; disk: h0-h3
    plan = store.prepare_load([h(1), h(0)], [5, 6])  # h1 pinned in host, h0 to be promoted from disk
    assert plan.sources == ("host", "disk") and plan.num_held == 2
    if why == "evicted":
        offload(store, worker, src, [4], [h(4)])  # host evicts h3, the disk evicts its oldest: h0
        assert store.where(h(0)) is None and store.where(h(1)) == "host"  # a pinned slot is never evicted
    else:
        flip_byte(block_file(tmp_path, 0))
    before = all_pages(src)
    cache, handle = worker.load(src, plan)
    result = handle.result()
    assert result.status == "refused" and cache is src and not src.values.is_deleted()
    assert result.nbytes == 0 and result.failed_pages == []
    assert all_pages(cache) == before
    store.complete_load(result)
    assert store.metrics.refused_loads == 1 and store.metrics["disk"].corrupt == (why == "corrupt")
    assert store.host._pins == {} and store.host._reserved == set()
    assert all_pages(cache) == before


def test_store_while_a_load_is_in_flight_and_repeated_store(tmp_path):
    src, _, _ = random_buffer(BF16_MHA, 2, 8)
    want = page_bytes(src, 1)
    store, worker = compose(src, 2 * ROW, tmp_path, 1 << 20)
    offload(store, worker, src, [1], [h(1)])
    plan = store.prepare_load([h(1)], [6])
    cache, loading = worker.load(src, plan)  # in flight
    storing = worker.store(cache, store.prepare_store([h(60)], [6]))  # reads the page the load writes
    store.complete_store(storing.result())  # completions in either order
    store.complete_load(loading.result())
    assert page_bytes(cache, 6) == want and host_row(store, worker, h(60)) == want
    m = store.metrics
    counters = (m["host"].blocks_stored, m["disk"].blocks_stored, m["disk"].bytes_written, m.stores)
    assert counters == (2, 2, 2 * ROW, 2)
    files = snapshot(store, worker, tmp_path)["files"]
    # Repeating a store of held blocks only refreshes them: no plan, no write.
    assert store.prepare_store([h(60), h(1)], [6, 1]) is None
    assert store.prepare_store([h(60)], [6]) is None  # h60 is now the most recent
    assert (m["host"].blocks_stored, m["disk"].blocks_stored, m["disk"].bytes_written, m.stores) == counters
    assert snapshot(store, worker, tmp_path)["files"] == files and len(files) == 2
    offload(store, worker, cache, [2], [h(2)])  # evicts h1 from host memory, not the refreshed h60
    assert store.where(h(60)) == "host" and store.where(h(1)) == "disk"


def test_completions_late_and_out_of_order(tmp_path):
    """Two stores and a load in flight at once, completed in reverse order: slots are never shared or indexed early."""
    src, _, _ = random_buffer(BF16_MHA, 2, 8)
    want = all_pages(src)
    first, w = compose(src, 4 * ROW, tmp_path, 1 << 20)
    offload(first, w, src, [0, 1], [h(0), h(1)])
    first.close()
    cache, _, _ = random_buffer(BF16_MHA, 2, 8, seed=1)
    new = all_pages(cache)
    store, worker = compose(cache, 5 * ROW, tmp_path, 1 << 20)  # host memory empty, h0 and h1 on disk
    cache, result = load(store, worker, cache, [h(0)], [4])
    assert result.status == "loaded" and store.host.slot_of(h(0)) is not None
    held = store.host.slot_of(h(0))

    plan_l = store.prepare_load([h(0), h(1)], [4, 5])  # h0 pinned, h1 promoted from disk
    plan_a = store.prepare_store([h(10), h(11)], [6, 7])
    plan_b = store.prepare_store([h(12)], [2])
    assert plan_l.host_slots[0] == held and plan_l.sources == ("host", "disk")
    slots = [*plan_l.host_slots, *plan_a.host_slots, *plan_b.host_slots]
    assert sorted(slots) == list(range(5))  # every slot handed out once
    assert store.prepare_store([h(13)], [3]) is None  # all pinned or reserved: nothing evicted, dropped
    assert store.metrics.dropped_offloads == 1 and store.host.slot_of(h(0)) == held

    def indexed():
        return [store.host.slot_of(x) for x in (h(0), h(1), h(10), h(11), h(12))]

    assert indexed() == [held, None, None, None, None] and len(store.host) == 1
    cache, loading = worker.load(cache, plan_l)
    storing_a = worker.store(cache, plan_a)
    storing_b = worker.store(cache, plan_b)
    results = [storing_b.result(), storing_a.result(), loading.result()]
    assert indexed() == [held, None, None, None, None] and len(store.host) == 1  # bytes there, not yet applied
    store.complete_store(results[0])
    assert indexed() == [held, None, None, None, plan_b.host_slots[0]] and len(store.host) == 2
    store.complete_store(results[1])
    assert indexed() == [held, None, *plan_a.host_slots, plan_b.host_slots[0]] and len(store.host) == 4
    store.complete_load(results[2])
    assert indexed() == [held, plan_l.host_slots[1], *plan_a.host_slots, plan_b.host_slots[0]]
    assert len(store.host) == 5 and store.host._pins == {} and store.host._reserved == set()
    assert [page_bytes(cache, p) for p in (4, 5)] == want[:2]
    rows = [host_row(store, worker, x) for x in (h(0), h(1), h(10), h(11), h(12))]
    assert rows == [want[0], want[1], new[6], new[7], new[2]]
    assert store.bytes()["host"] == (5 * ROW, 5 * ROW)
    # Index order is completion order (h0 was refreshed by its load): h12 is the least recent now.
    offload(store, worker, cache, [3], [h(13)])
    assert store.where(h(12)) == "disk" and store.host.slot_of(h(13)) == plan_b.host_slots[0]


def test_failed_copy_reports_its_pages(monkeypatch):
    src, _, _ = random_buffer(BF16_MHA, 2, 8)
    want = all_pages(src)
    store, worker = compose(src, 4 * ROW)
    offload(store, worker, src, [1, 2], [h(1), h(2)])

    def broken(*args, **kwargs):
        raise RuntimeError("DMA error")

    monkeypatch.setattr(worker.engine, "h2d", broken)
    cache, result = load(store, worker, src, [h(1), h(2)], [4, 5])
    assert result.status == "failed" and result.error == "loading 2 pages failed: DMA error"
    assert result.failed_pages == [4, 5] and store.metrics.failed_loads == 1
    monkeypatch.undo()
    cache, result = load(store, worker, cache, [h(1), h(2)], [4, 5])
    assert result.status == "loaded" and [page_bytes(cache, p) for p in (4, 5)] == want[1:3]


# -- bad arguments move nothing -------------------------------------------------------------------------------------


def donating_step(cache):
    return jax.jit(lambda c: c, donate_argnums=0)(cache)


BAD_CALLS = [
    (lambda s, w, c, lp, sp: s.lookup("abc"), "block_hashes must be a sequence of 32-byte hashes, got str"),
    (lambda s, w, c, lp, sp: s.lookup([h(0), "x"]), r"block_hashes\[1\] must be bytes, got str"),
    (lambda s, w, c, lp, sp: s.touch([1]), r"block_hashes\[0\] must be bytes, got int"),
    (
        lambda s, w, c, lp, sp: s.prepare_store([b"short"], [0]),
        r"block_hashes\[0\] must be 32 bytes \(a SHA-256 digest\), got 5",
    ),
    (lambda s, w, c, lp, sp: s.prepare_load([h(0)], [0, 1]), "device_pages has 2 entries but block_hashes has 1"),
    (lambda s, w, c, lp, sp: s.prepare_store([h(7), h(7)], [0, 1]), "block_hashes repeats a hash"),
    (lambda s, w, c, lp, sp: s.prepare_load([h(1), h(2)], [1, 1]), r"device_pages repeats a page: \[1, 1\]"),
    (lambda s, w, c, lp, sp: s.prepare_store([h(7)], ["x"]), r"device_pages\[0\] must be an int, got str"),
    (
        lambda s, w, c, lp, sp: s.prepare_load([h(i) for i in range(5)], range(5)),
        "a load of 5 blocks exceeds the host tier's 4 slots",
    ),
    (lambda s, w, c, lp, sp: w.load(c, sp), "plan must be a LoadPlan from TieredStore.prepare_load, got StorePlan"),
    (lambda s, w, c, lp, sp: w.store(c, lp), "plan must be a StorePlan from TieredStore.prepare_store, got LoadPlan"),
    (
        lambda s, w, c, lp, sp: w.load(c, dataclasses.replace(lp, device_pages=(8,))),
        r"plan.device_pages contains 8, outside the valid range \[0, 8\)",
    ),
    (
        lambda s, w, c, lp, sp: w.store(c, dataclasses.replace(sp, device_pages=(-1,))),
        r"plan.device_pages contains -1, outside the valid range \[0, 8\)",
    ),
    (
        lambda s, w, c, lp, sp: w.load(c.values, lp),
        "cache must be a KVCacheBuffer or MultiKVCacheBuffer, got ArrayImpl",
    ),
]
BAD_IDS = [
    "lookup-str",
    "lookup-non-bytes",
    "touch-int",
    "short-hash",
    "mismatched-lengths",
    "repeated-hash",
    "repeated-page",
    "page-not-int",
    "more-than-host-slots",
    "load-store-plan",
    "store-load-plan",
    "load-page-out-of-range",
    "store-page-out-of-range",
    "load-an-array",
]


@pytest.fixture
def busy_store(tmp_path):
    """A store with blocks on host and disk, a load (from disk) and a store planned but not executed."""
    cache, _, _ = random_buffer(BF16_MHA, 2, 8)
    store, worker = compose(cache, 4 * ROW, tmp_path, 1 << 20)
    offload(store, worker, cache, [0, 1, 2, 3, 4], [h(i) for i in range(5)])  # host: h1-h4; disk: h0-h4
    load_plan = store.prepare_load([h(0)], [6])
    store_plan = store.prepare_store([h(5)], [5])
    assert load_plan.sources == ("disk",) and store_plan is not None
    return store, worker, cache, load_plan, store_plan, tmp_path


@pytest.mark.parametrize(("call", "message"), BAD_CALLS, ids=BAD_IDS)
def test_bad_arguments_move_nothing(call, message, busy_store):
    store, worker, cache, load_plan, store_plan, directory = busy_store
    before, pages = snapshot(store, worker, directory), all_pages(cache)
    with pytest.raises(ValueError, match=message):
        call(store, worker, cache, load_plan, store_plan)
    assert snapshot(store, worker, directory) == before
    assert not cache.values.is_deleted() and all_pages(cache) == pages


@pytest.mark.parametrize("worker_call", ["load", "store"])
def test_a_donated_cache_is_refused(worker_call, busy_store):
    store, worker, cache, load_plan, store_plan, directory = busy_store
    current = donating_step(cache)
    assert cache.values.is_deleted()
    before, pages = snapshot(store, worker, directory), all_pages(current)
    with pytest.raises(ValueError, match="pass the cache the last call returned"):
        if worker_call == "load":
            worker.load(cache, load_plan)
        else:
            worker.store(cache, store_plan)
    assert snapshot(store, worker, directory) == before and all_pages(current) == pages


def test_construction_errors(tmp_path):
    src, _, _ = random_buffer(BF16_MHA, 2, 8)
    with pytest.raises(ValueError, match=r"host capacity_bytes \(100\) holds no page: one host row is 4096 bytes"):
        open_tiers(src, 100)
    with pytest.raises(ValueError, match="disk capacity_bytes must be a non-negative int, got -1"):
        open_tiers(src, 1 << 20, disk_directory=tmp_path, disk_capacity_bytes=-1)
    with pytest.raises(ValueError, match="disk_capacity_bytes needs a disk_directory"):
        open_tiers(src, 1 << 20, disk_capacity_bytes=1 << 20)
    with pytest.raises(ValueError, match=r"tiers\[0\] must be a HostTier .*, got DictTier"):
        OffloadWorker(src, [DictTier(1 << 20)])
    with pytest.raises(ValueError, match=r"tiers\[1\] \(object\) does not implement the Tier protocol"):
        OffloadWorker(src, [HostTier(1 << 20), object()])
    with pytest.raises(ValueError, match=r"tier names must be unique and not 'device', got \['host', 'host'\]"):
        OffloadWorker(src, [HostTier(1 << 20), DictTier(1 << 20, name="host")])
    disks = [DiskTier(tmp_path / "a", 1 << 20), DiskTier(tmp_path / "b", 1 << 20)]
    with pytest.raises(ValueError, match=r"got \['host', 'disk', 'disk'\]"):
        OffloadWorker(src, [HostTier(1 << 20), *disks])
    worker = OffloadWorker(src, [HostTier(1 << 20)])
    with pytest.raises(ValueError, match="spec must be a StoreSpec .*, got RowLayout"):
        TieredStore(RowLayout.of(src))
    with pytest.raises(ValueError, match="policy must be a TierPolicy, got dict"):
        TieredStore(worker.spec(), policy={"write_through": False})
    with pytest.raises(ValueError, match="probe must be callable"):
        TieredStore(worker.spec(), probe="remote")
    with pytest.raises(ValueError, match="load_chunk_bytes must be a positive int, got 0"):
        OffloadWorker(src, [HostTier(1 << 20)], load_chunk_bytes=0)
    store = TieredStore(worker.spec())
    other = allocate_buffer(BF16_MHA, tp_mesh(4), 8)
    plan = store.prepare_store([h(0)], [1])
    with pytest.raises(ValueError, match="cache layout differs from the engine's at unit 0"):
        worker.store(other, plan)
    with pytest.raises(ValueError, match=r"plan.host_slots contains 300, outside the valid range \[0, 256\)"):
        worker.store(src, dataclasses.replace(plan, host_slots=(300,)))
    with pytest.raises(ValueError, match=r"plan.write_to names tiers this worker does not have: \['disk'\]"):
        worker.store(src, dataclasses.replace(plan, write_to=("disk",)))


def test_metrics_reset_and_close(tmp_path):
    src, _, _ = random_buffer(BF16_MHA, 2, 8)
    store, worker = compose(src, 2 * ROW, tmp_path, 1 << 20)
    offload(store, worker, src, [0, 1], [h(0), h(1)])
    cache, _ = load(store, worker, src, [h(0)], [4])
    m = store.metrics
    assert (m.stores, m.loads) == (1, 1) and m["host"].blocks_loaded == 1
    assert (m["host"].blocks_stored, m["disk"].blocks_stored) == (2, 2)
    assert m.offload_bytes == 2 * ROW and m["disk"].bytes_written == 2 * ROW and m.load_bytes == ROW
    assert m.load_seconds > 0 and m.offload_seconds > 0 and m["disk"].write_seconds > 0
    used = store.bytes()
    store.reset_metrics()
    assert store.metrics == jaxkv.StoreMetrics({"host": TierMetrics(), "disk": TierMetrics()})
    assert store.bytes() == used  # the tiers keep their blocks
    offload(store, worker, cache, [2], [h(2)])
    assert store.metrics["host"].evictions == 1  # counted from the reset, not from the start
    store.close()
    with pytest.raises(ValueError, match="TieredStore is closed"):
        store.lookup([h(0)])
    with pytest.raises(ValueError, match="TieredStore is closed"):
        store.prepare_store([h(3)], [3])


# -- a tier defined here ------------------------------------------------------------------------------------------


def test_a_tier_defined_in_a_test_plugs_in_after_host_memory():
    src, _, _ = random_buffer(BF16_MHA, 2, 8)
    want = all_pages(src)
    assert isinstance(DictTier(1), jaxkv.Tier)
    mine = DictTier(8 * ROW)
    worker = OffloadWorker(src, [HostTier(2 * ROW), mine])
    store = TieredStore(worker.spec())
    assert store.tier_names == ["host", "dict"] and list(store.metrics.tiers) == ["host", "dict"]
    result = offload(store, worker, src, [0, 1, 2, 3], [h(i) for i in range(4)])
    assert result.written == {"dict": (True,) * 4} and mine.received == [h(i) for i in range(4)]
    assert store.bytes() == {"host": (2 * ROW, 2 * ROW), "dict": (4 * ROW, 8 * ROW)}
    assert [mine.rows[h(i)] for i in range(4)] == want[:4]  # copies, taken before the slots were reused
    assert store.lookup([h(i) for i in range(5)]) == ["dict", "dict", "host", "host"]
    assert (store.metrics["dict"].hits, store.metrics["host"].hits) == (2, 2)
    fresh = allocate_buffer(BF16_MHA, tp_mesh(2), 8)
    cache, result = load(store, worker, fresh, [h(0), h(1)], [6, 7])  # evicts h2, h3 from host memory
    assert result.status == "loaded" and result.plan.sources == ("dict", "dict")
    assert [page_bytes(cache, p) for p in (6, 7)] == want[:2]
    d = store.metrics["dict"]
    assert (d.blocks_loaded, d.bytes_read, d.blocks_stored, d.bytes_written) == (2, 2 * ROW, 4, 4 * ROW)
    assert store.lookup([h(2), h(3)]) == ["dict", "dict"]
    cache, result = load(store, worker, cache, [h(2), h(3)], [0, 1])
    assert [page_bytes(cache, p) for p in (0, 1)] == want[2:4] and store.metrics["dict"].blocks_loaded == 4
    store.close()
    assert not mine.closed  # the scheduler side holds no tier: the worker closes them
    worker.close()
    assert mine.closed


def test_a_tier_defined_in_a_test_plugs_in_after_disk(tmp_path):
    src, _, _ = random_buffer(BF16_MHA, 2, 8)
    want = all_pages(src)
    mine = DictTier(8 * ROW)
    store, worker = compose(src, ROW, tmp_path, 2 * FILE, tiers=[mine])
    assert store.tier_names == ["host", "disk", "dict"]
    offload(store, worker, src, [0, 1, 2, 3], [h(i) for i in range(4)])
    assert store.bytes() == {"host": (ROW, ROW), "disk": (2 * FILE, 2 * FILE), "dict": (4 * ROW, 8 * ROW)}
    assert store.lookup([h(i) for i in range(4)]) == ["dict", "dict", "disk", "host"]
    m = store.metrics
    assert (m["dict"].hits, m["disk"].hits, m["host"].hits) == (2, 1, 1)
    assert (m["dict"].blocks_stored, m["disk"].blocks_stored, m["disk"].evictions) == (4, 4, 2)
    fresh = allocate_buffer(BF16_MHA, tp_mesh(2), 8)
    cache, result = load(store, worker, fresh, [h(0)], [5])
    assert result.status == "loaded" and page_bytes(cache, 5) == want[0]
    assert store.metrics["dict"].blocks_loaded == 1 and store.where(h(0)) == "host"
    cache, result = load(store, worker, cache, [h(2)], [6])
    assert result.plan.sources == ("disk",) and page_bytes(cache, 6) == want[2]


class LostConnectionTier(DictTier):
    """A DictTier whose calls raise while `down` (a remote store that went away)."""

    down = False

    def put_many(self, items):
        if self.down:
            raise ConnectionError("connection reset")
        return super().put_many(items)

    def get_many(self, items):
        if self.down:
            raise ConnectionError("connection reset")
        return super().get_many(items)


def test_a_tier_that_raises_for_a_whole_batch_is_an_error_not_a_crash():
    src, _, _ = random_buffer(BF16_MHA, 2, 8)
    want = all_pages(src)
    remote = LostConnectionTier(8 * ROW, name="remote")
    worker = OffloadWorker(src, [HostTier(ROW), remote])
    store = TieredStore(worker.spec())
    offload(store, worker, src, [0, 1], [h(0), h(1)])  # h0 only in the remote tier
    remote.down = True
    result = offload(store, worker, src, [2], [h(2)])
    assert isinstance(result.written["remote"][0], ConnectionError) and store.metrics["remote"].errors == 1
    assert store.where(h(2)) == "host"  # the host copy stays
    plan = store.prepare_load([h(0)], [5])
    cache, handle = worker.load(src, plan)
    assert handle.status == "refused" and cache is src and all_pages(cache) == want
    store.complete_load(handle.result())
    assert store.metrics["remote"].errors == 2 and store.host._reserved == set()
    remote.down = False
    cache, result = load(store, worker, cache, [h(0)], [5])
    assert result.status == "loaded" and page_bytes(cache, 5) == want[0]


# -- policy -------------------------------------------------------------------------------------------------------


def test_write_back_hands_blocks_down_only_on_eviction(tmp_path):
    src, _, _ = random_buffer(BF16_MHA, 2, 8)
    want = all_pages(src)
    mine = DictTier(8 * ROW)
    store, worker = compose(src, 2 * ROW, tmp_path, 1 << 20, tiers=[mine], policy=TierPolicy(write_through=False))
    result = offload(store, worker, src, [0, 1], [h(0), h(1)])
    assert result.plan.write_to == () and result.plan.demotions == ()
    assert os.listdir(tmp_path) == [] and mine.received == []
    assert store.bytes()["disk"] == (0, 1 << 20) and store.metrics["disk"].blocks_stored == 0
    result = offload(store, worker, src, [2], [h(2)])  # evicts h0: it goes to the first lower tier
    assert [x for x, _ in result.plan.demotions] == [h(0)]
    assert os.listdir(tmp_path) == [h(0).hex() + SUFFIX] and mine.received == []
    m = store.metrics["disk"]
    assert (m.blocks_stored, m.bytes_written) == (1, ROW)
    assert [store.where(h(i)) for i in range(3)] == ["disk", "host", "host"]
    # A promotion that evicts a host block hands it down too: h1 has no other copy.
    fresh = allocate_buffer(BF16_MHA, tp_mesh(2), 8)
    cache, result = load(store, worker, fresh, [h(0)], [7])
    assert result.status == "loaded" and page_bytes(cache, 7) == want[0]
    assert [x for x, _ in result.plan.demotions] == [h(1)] and result.demoted == (True,)
    assert [store.where(h(i)) for i in range(3)] == ["host", "disk", "host"]
    assert (store.metrics["disk"].blocks_stored, store.metrics["disk"].bytes_written) == (2, 2 * ROW)
    cache, result = load(store, worker, cache, [h(1)], [6])
    assert result.plan.sources == ("disk",) and page_bytes(cache, 6) == want[1]
    assert mine.received == []  # write-back goes to the first lower tier only


def test_without_promotion_a_disk_hit_is_loaded_but_not_kept_in_host(tmp_path):
    src, _, _ = random_buffer(BF16_MHA, 2, 8)
    want = all_pages(src)
    store, worker = compose(src, 2 * ROW, tmp_path, 1 << 20, policy=TierPolicy(promote_on_load=False))
    offload(store, worker, src, [0, 1, 2], [h(0), h(1), h(2)])  # h0 only on disk
    assert [x for x, _ in snapshot(store)["host index"]] == [h(1), h(2)]
    fresh = allocate_buffer(BF16_MHA, tp_mesh(2), 8)
    cache, result = load(store, worker, fresh, [h(0), h(1)], [3, 4])
    assert result.status == "loaded" and result.plan.sources == ("disk", "host")
    assert [page_bytes(cache, p) for p in (3, 4)] == want[:2]
    assert store.where(h(0)) == "disk" and store.host.slot_of(h(0)) is None
    assert store.bytes()["host"] == (ROW, 2 * ROW)  # the slot it passed through was freed, h2 was evicted for it
    assert [x for x, _ in snapshot(store)["host index"]] == [h(1)] and store.where(h(2)) == "disk"
    assert store.metrics["disk"].blocks_loaded == 1 and store.host.available() == 2


# -- the cache flows through the user's own steps -------------------------------------------------------------------


def zero_page(array, page):
    bits = jax.lax.bitcast_convert_type(array, jnp.uint16)
    return jax.lax.bitcast_convert_type(bits.at[page].set(0), array.dtype)


def test_the_cache_flows_through_a_users_donating_step(tmp_path):
    src, _, _ = random_buffer(BF16_MHA, 2, 8)
    want = all_pages(src)
    store, worker = compose(src, 4 * ROW, tmp_path, 1 << 20)
    # The user's own step: zero page p. On the bits, since XLA:CPU computes in float32 and would quiet
    # the NaN payloads of every page of a bfloat16 array it updates.
    clear = jax.jit(lambda c, p: jax.tree.map(lambda a: zero_page(a, p), c), donate_argnums=0)
    cache = clear(src, 2)
    assert src.values.is_deleted() and isinstance(cache, jaxkv.KVCacheBuffer)
    zeros = page_bytes(cache, 2)
    assert zeros == bytes(len(zeros)) != want[2]
    with pytest.raises(ValueError, match="pass the cache the last call returned"):
        worker.store(src, store.prepare_store([h(2)], [2]))
    handle = worker.store(cache, store.prepare_store([h(9)], [2]))
    store.complete_store(handle.result())
    assert host_row(store, worker, h(9)) == zeros
    cache, result = load(store, worker, cache, [h(9)], [0])  # the live cache: the one the step returned
    assert result.status == "loaded"
    cache = clear(cache, 5)  # and the loaded one flows on into the next step
    assert all_pages(cache) == [zeros, *want[1:2], zeros, *want[3:5], zeros, *want[6:]]
    with pytest.raises(ValueError, match="pass the cache the last call returned"):
        worker.load(src, store.prepare_load([h(9)], [1]))


def test_the_cache_flows_through_paged_attention():
    """A real write: paged attention appends K/V in a donating jit; the pages it wrote are stored and load back."""
    params = BF16_MHA
    cache = allocate_buffer(params, tp_mesh(2), 8)
    store, worker = compose(cache, 4 * ROW)
    step = jax.jit(functools.partial(jaxkv.paged_attention, mesh=tp_mesh(2)), donate_argnums=0)
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 8, 8, params.head_dim), np.float32) for _ in range(3))
    table, start, lens = np.array([[3, 5]], np.int32), np.zeros(1, np.int32), np.full(1, 8, np.int32)
    old, blank = cache, page_bytes(cache, 3)
    for layer in range(params.num_layers):
        _, cache = step(cache, layer, q, k, v, table, start, lens)
    assert old.values.is_deleted()
    written = [page_bytes(cache, 3), page_bytes(cache, 5)]
    assert written[0] != blank  # the step really wrote
    with pytest.raises(ValueError, match="pass the cache the last call returned"):
        worker.store(old, store.prepare_store([h(3)], [3]))
    store.complete_store(worker.store(cache, store.prepare_store([h(30), h(50)], [3, 5])).result())
    cache, result = load(store, worker, cache, [h(30), h(50)], [6, 7])
    assert result.status == "loaded" and [page_bytes(cache, p) for p in (6, 7)] == written
    _, cache = step(cache, 0, q, k, v, np.array([[6, 7]], np.int32), start, lens)  # the loaded cache flows on


# -- one layout fingerprint -----------------------------------------------------------------------------------------


def fingerprints(params, tp) -> dict[str, bytes]:
    """The layout fingerprint by every path that computes one."""
    cache = allocate_buffer(params, tp_mesh(tp), 4)
    store, worker = open_tiers(cache, 1 << 20)
    return {
        "layout_fingerprint(params, tp)": jaxkv.layout_fingerprint(params, tp=tp),
        "RowLayout.of(params, tp)": RowLayout.of(params, tp=tp).fingerprint,
        "layout_fingerprint(buffer)": jaxkv.layout_fingerprint(cache),
        "store.fingerprint": store.fingerprint,
        "worker.engine.layout_fingerprint": worker.engine.layout_fingerprint,
        "worker.spec().layout": worker.spec().layout.fingerprint,
        "manager(buffer, store)": PagedKVCacheManager(cache, store).fingerprint,
        "manager(buffer)": PagedKVCacheManager(cache).fingerprint,
        "manager(params, tp)": PagedKVCacheManager(params, num_pages=4, tp=tp).fingerprint,
    }


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("params", LAYOUTS, ids=LAYOUT_IDS)
def test_one_layout_fingerprint_by_every_path(params, tp):
    found = fingerprints(params, tp)
    groups: dict[bytes, list[str]] = {}
    for path, fp in found.items():
        assert isinstance(fp, bytes) and len(fp) == 32, path
        groups.setdefault(fp, []).append(path)
    assert len(groups) == 1, f"paths disagree: {[paths for paths in groups.values()]}"


def test_fingerprint_differs_when_the_layout_differs():
    base = BF16_MHA
    variants = {
        "dtype": dataclasses.replace(base, dtype=jnp.dtype(jnp.float16)),  # same bytes per page
        "head_dim": dataclasses.replace(base, head_dim=32),
        "page_size": dataclasses.replace(base, page_size=8),
    }
    fp = jaxkv.layout_fingerprint
    for tp in (1, 2):
        ref = fp(base, tp=tp)
        assert ref == fp(allocate_buffer(base, tp_mesh(tp), 2))
        for what, params in variants.items():
            assert fp(params, tp=tp) != ref, what
            assert fp(allocate_buffer(params, tp_mesh(tp), 2)) != ref, what
    # The TP split of an MHA cache changes what a row holds; an MLA row is the same at every degree.
    assert len({fp(base, tp=t) for t in (1, 2, 4)}) == 3
    assert len({fp(allocate_buffer(base, tp_mesh(t), 2)) for t in (1, 2, 4)}) == 3
    assert len({fp(BF16_MLA, tp=t) for t in (1, 2, 4)} | {fp(allocate_buffer(BF16_MLA, tp_mesh(4), 2))}) == 1
    assert RowLayout.of(variants["dtype"], tp=2).row_bytes == RowLayout.of(base, tp=2).row_bytes


def test_a_lower_tiers_evictions_reach_the_schedulers_index():
    """The tier evicts on its own; the worker reports it (`take_evicted`), so lookups never plan a gone block."""
    src, _, _ = random_buffer(BF16_MHA, 2, 8)
    mine = DictTier(2 * ROW)
    worker = OffloadWorker(src, [HostTier(ROW), mine])
    store = TieredStore(worker.spec())
    result = offload(store, worker, src, [0, 1, 2, 3], [h(i) for i in range(4)])
    assert result.tiers.evicted == {"dict": (h(0), h(1))} and result.tiers.evictions == {"dict": 2}
    assert [store.where(h(i)) for i in range(4)] == [None, None, "dict", "host"]
    assert store.metrics["dict"].evictions == 2 and store.bytes()["dict"] == (2 * ROW, 2 * ROW)
    assert store.bytes()["dict"] == worker.bytes()["dict"]


def test_complete_store_after_a_d2h_that_raised_indexes_nothing(tmp_path, monkeypatch):
    """A D2H that raises leaves its blocks out of every index and its host slots free (issue 24 item 6(f))."""
    src, _, _ = random_buffer(BF16_MHA, 2, 8)
    store, worker = compose(src, 4 * ROW, tmp_path, 8 * ROW)
    before = snapshot(store)

    def broken(*args, **kwargs):
        raise RuntimeError("the device went away")

    monkeypatch.setattr(worker.engine, "d2h", broken)
    result = offload(store, worker, src, [1, 2], [h(1), h(2)])
    assert result is not None and result.copied == (False, False)
    assert [store.where(h(i)) for i in (1, 2)] == [None, None]
    assert list(tmp_path.iterdir()) == []  # nothing written through: no row holds the block
    after = snapshot(store)
    assert after["host index"] == before["host index"] == [] and after["reserved"] == [] and after["pins"] == {}
    assert after["free"] == before["free"]
    assert store.metrics.tiers["host"].blocks_stored == 0 and store.metrics.dropped_offloads == 2


def test_an_overlapped_load_of_a_partial_plan_is_refused_with_nothing_written(tmp_path):
    """With load_chunk_bytes set (reads overlap H2Ds), a plan whose tail no tier holds (num_held < blocks) is
    refused before any page is written, the cache returned as it was (issue 24 item 6(g))."""
    src, _, _ = random_buffer(BF16_MHA, 2, 8)
    store, worker = compose(src, 4 * ROW, tmp_path, 8 * ROW, load_chunk_bytes=ROW)  # one block per chunk
    offload(store, worker, src, [1, 2, 3], [h(1), h(2), h(3)])
    store.host.clear()  # as if host memory had been reset: the blocks are on disk only
    dst, _, _ = random_buffer(BF16_MHA, 2, 8, seed=5)
    before = all_pages(dst)
    plan = store.prepare_load([h(1), h(2), h(9)], [4, 5, 6])  # h(9) is held nowhere
    assert plan.num_held == 2 and plan.sources == ("disk", "disk")
    out, handle = worker.load(dst, plan)
    result = handle.result()
    store.complete_load(result)
    assert result.status == "refused" and "block_hashes[2]" in result.error
    assert out is dst and not dst.values.is_deleted() and all_pages(dst) == before


def test_engine_repr_says_pages_rows_and_paths():
    src, _, _ = random_buffer(BF16_MHA, 2, 8)
    _, worker = compose(src, 4 * ROW)
    engine = worker.engine
    assert repr(engine) == (
        f"OffloadEngine(8 device pages <-> 4 host rows of {ROW:,} B (2 units), "
        f"d2h {engine.d2h_path}, h2d {engine.h2d_path})"
    )


def test_a_store_that_did_not_run_is_cancelled_and_pages_past_the_cache_are_refused():
    src, _, _ = random_buffer(BF16_MHA, 2, 8)
    store, worker = compose(src, 2 * ROW)
    before = snapshot(store, worker)
    with pytest.raises(
        ValueError, match=r"device_pages\[1\] = 99 is not a page of the cache: the cache has pages 0..7"
    ):
        store.prepare_store([h(0), h(1)], [1, 99])
    with pytest.raises(ValueError, match=r"device_pages\[0\] = 8 is not a page of the cache"):
        store.prepare_load([h(0)], [8])
    assert snapshot(store, worker) == before
    plan = store.prepare_store([h(0), h(1)], [1, 2])
    other = allocate_buffer(BF16_MHA, tp_mesh(4), 8)
    with pytest.raises(ValueError, match="cache layout differs from the engine's at unit 0 .*another TP degree"):
        worker.store(other, plan)
    store.cancel_store(plan)  # the slots come back; nothing was indexed or counted
    assert snapshot(store, worker) == before
    with pytest.raises(ValueError, match=r"cancel_store: plan #\d+ is not outstanding"):
        store.cancel_store(plan)


def test_open_tiers_passes_the_disk_key(tmp_path, monkeypatch):
    monkeypatch.delenv("JAXKV_BLOCK_KEY", raising=False)
    src, _, _ = random_buffer(BF16_MHA, 2, 8)
    _, keyed = compose(src, 2 * ROW, tmp_path / "a", 1 << 20, disk_key=b"k" * 32)
    _, plain = compose(src, 2 * ROW, tmp_path / "b", 1 << 20)
    assert keyed.tiers["disk"].block_key is not None and plain.tiers["disk"].block_key is None
    keyed.close()
    plain.close()


def test_asking_for_the_spec_again_changes_nothing(tmp_path):
    """spec() reports what the tiers held and found corrupt at open; plans' results report the rest, once."""
    src, _, _ = random_buffer(BF16_MHA, 2, 8)
    store, worker = compose(src, ROW, tmp_path, 1 << 20)
    offload(store, worker, src, [1, 2], [h(1), h(2)])  # host keeps h2; the disk has both
    flip_byte(block_file(tmp_path, 1))
    _, result = load(store, worker, src, [h(1)], [5])
    assert result.status == "refused" and result.tiers.corrupt == {"disk": 1}
    first, again = worker.spec(), worker.spec()
    assert first == again and first.lower[0].corrupt == 0 and first.lower[0].held == (h(2),)
    assert TieredStore(again).metrics["disk"].corrupt == 0  # counted once, by the load's result
    worker.close()
