import errno
import hashlib
import os
import stat

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cachegen import TP_DEGREES, random_buffer, tp_mesh

from jaxkv import (
    HostConnector,
    KVCacheParams,
    KVCacheQuantConfig,
    KVLoadFailed,
    KVLoadRefused,
    NullConnector,
    TieredConnector,
    allocate_buffer,
)
from jaxkv.tiers.disk import HEADER_BYTES, MAGIC, SUFFIX, DiskTier

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


def h(i: int) -> bytes:
    return hashlib.sha256(f"block {i}".encode()).digest()


def page_bytes(buffer, page: int) -> bytes:
    """The bytes of one page on every shard of every array of the cache."""
    return b"".join(
        np.asarray(s.data)[page].tobytes()
        for a in (buffer.values, buffer.scales)
        if a is not None
        for s in a.addressable_shards
    )


def rows(connector) -> int:
    return connector.engine.row_bytes


@pytest.mark.parametrize("tp", TP_DEGREES)
@pytest.mark.parametrize(
    "params", [BF16_MHA, FP8_MHA, BF16_MLA, FP8_MLA], ids=["mha-bf16", "mha-fp8", "mla-bf16", "mla-fp8"]
)
def test_device_host_disk_restart_device_is_bit_exact(params, tp, tmp_path):
    src, _, _ = random_buffer(params, tp, num_pages=8, seed=tp)
    want = [page_bytes(src, p) for p in (1, 6, 3)]
    row = params.host_bytes_per_page(tp)
    first = TieredConnector(src, 2 * row, tmp_path / "kv", 16 * (row + HEADER_BYTES))
    first.offload([1, 6, 3], [h(1), h(6), h(3)]).synchronize()
    assert first.host_bytes == (2 * row, 2 * row)  # the host tier holds 2 of 3; disk holds all (chunked)
    assert first.disk_bytes == (3 * (row + HEADER_BYTES), 16 * (row + HEADER_BYTES))
    first.close()

    # Restart: a new connector over a fresh cache and the same directory.
    fresh = allocate_buffer(params, tp_mesh(tp), 8)
    second = TieredConnector(fresh, 3 * row, tmp_path / "kv", 16 * (row + HEADER_BYTES))
    assert second.lookup([h(1), h(6), h(3), h(9)]) == 3
    assert (second.metrics.disk_hits, second.metrics.misses) == (3, 1)
    second.load([0, 7, 5], [h(1), h(6), h(3)]).synchronize()
    assert fresh.values.is_deleted()
    out = second.buffer
    for page, expected in zip([0, 7, 5], want, strict=True):
        assert page_bytes(out, page) == expected
    assert second.metrics.blocks_promoted == 3
    # An MLA page lands identical on every shard.
    if src.replicates_kv_across_tp:
        copies = {np.asarray(s.data)[7].tobytes() for s in out.values.addressable_shards}
        assert len(copies) == 1


def test_mla_blocks_move_across_tp_degrees(tmp_path):
    """A replicated page's bytes do not depend on TP, nor does its fingerprint."""
    src, _, _ = random_buffer(BF16_MLA, 2, 4)
    row = BF16_MLA.host_bytes_per_page(2)
    a = TieredConnector(src, 4 * row, tmp_path, 1 << 20)
    a.offload([2], [h(2)])
    b = TieredConnector(allocate_buffer(BF16_MLA, tp_mesh(4), 4), 4 * row, tmp_path, 1 << 20)
    assert a.fingerprint == b.fingerprint
    b.load([0], [h(2)]).synchronize()
    assert np.asarray(b.buffer.values.addressable_shards[3].data)[0].tobytes() == np.asarray(src.values)[2].tobytes()


def test_another_layout_never_loads_foreign_blocks(tmp_path):
    src, _, _ = random_buffer(BF16_MHA, 2, 4)
    a = TieredConnector(src, 1 << 20, tmp_path, 1 << 20)
    a.offload([0, 1], [h(0), h(1)])
    other = KVCacheParams(jnp.float16, n_kv_heads=8, head_dim=16, num_layers=2, page_size=4)  # same bytes per page
    b = TieredConnector(allocate_buffer(other, tp_mesh(2), 4), 1 << 20, tmp_path, 1 << 20)
    assert a.engine.row_bytes == b.engine.row_bytes and a.fingerprint != b.fingerprint
    assert b.lookup([h(0)]) == 0
    with pytest.raises(KVLoadRefused):
        b.load([0], [h(0)])
    assert len(list(tmp_path.glob("*" + SUFFIX))) == 2  # not ours to delete
    tp4 = TieredConnector(allocate_buffer(BF16_MHA, tp_mesh(4), 4), 1 << 20, tmp_path, 1 << 20)
    assert tp4.lookup([h(0)]) == 0  # MHA rows depend on the TP split


def test_disk_format_and_directory(tmp_path):
    src, _, _ = random_buffer(BF16_MHA, 2, 4)
    c = TieredConnector(src, 1 << 20, tmp_path / "tier", 1 << 20)
    c.offload([3], [h(3)])
    assert stat.S_IMODE(os.stat(tmp_path / "tier").st_mode) == 0o700
    files = os.listdir(tmp_path / "tier")
    assert files == [h(3).hex() + SUFFIX]  # no temporary file left behind
    raw = (tmp_path / "tier" / files[0]).read_bytes()
    assert raw[:8] == MAGIC and len(raw) == HEADER_BYTES + rows(c)
    assert raw[HEADER_BYTES:] == page_bytes(src, 3)  # raw page bytes, no pickle


def test_host_lru_eviction_order_and_byte_accounting():
    src, _, _ = random_buffer(BF16_MHA, 2, 8)
    c = HostConnector(src, 3 * BF16_MHA.host_bytes_per_page(2) + 5)
    assert c.host_bytes == (0, 3 * rows(c))
    c.offload([0, 1, 2], [h(0), h(1), h(2)])
    assert c.host_bytes == (3 * rows(c), 3 * rows(c))
    c.touch([h(0)])  # now B (h1) is the least recently used
    c.offload([3], [h(3)])
    assert c.metrics.host_evictions == 1
    assert [c.lookup([x]) for x in (h(0), h(1), h(2), h(3))] == [1, 0, 1, 1]
    c.load([7], [h(2)]).synchronize()  # a load refreshes recency too
    c.offload([4], [h(4)])  # evicts h0 (h2 was just used, h3 newer)
    assert [c.lookup([x]) for x in (h(0), h(2), h(3), h(4))] == [0, 1, 1, 1]
    assert page_bytes(c.buffer, 7) == page_bytes(c.buffer, 2)


def test_disk_lru_eviction_order_and_accounting(tmp_path):
    src, _, _ = random_buffer(BF16_MHA, 2, 8)
    row = BF16_MHA.host_bytes_per_page(2)
    c = TieredConnector(src, row, tmp_path, 2 * (row + HEADER_BYTES))
    for i in range(3):
        c.offload([i], [h(i)])
    assert c.metrics.disk_evictions == 1
    assert sorted(os.listdir(tmp_path)) == sorted(x.hex() + SUFFIX for x in (h(1), h(2)))
    assert c.disk_bytes == (2 * (row + HEADER_BYTES), 2 * (row + HEADER_BYTES))
    assert c.lookup([h(0)]) == 0 and c.lookup([h(1), h(2)]) == 2


def corrupt_connector(tmp_path, damage):
    src, _, _ = random_buffer(BF16_MHA, 2, 8)
    row = BF16_MHA.host_bytes_per_page(2)
    c = TieredConnector(src, row, tmp_path, 1 << 20)
    c.offload([0, 1], [h(0), h(1)])  # host keeps h1, disk keeps both
    damage(tmp_path / (h(0).hex() + SUFFIX), row)
    return c


def flip_byte(path, row):
    raw = bytearray(path.read_bytes())
    raw[HEADER_BYTES + row // 2] ^= 0x01
    path.write_bytes(bytes(raw))


def truncate(path, row):
    os.truncate(path, HEADER_BYTES + row - 1)


@pytest.mark.parametrize("damage", [flip_byte, truncate])
def test_corrupt_block_is_a_miss_not_garbage(damage, tmp_path):
    c = corrupt_connector(tmp_path, damage)
    before = page_bytes(c.buffer, 5)
    with pytest.raises(KVLoadRefused, match=r"block_hashes\[0\] .* is no longer held"):
        c.load([5], [h(0)])
    assert page_bytes(c.buffer, 5) == before  # no device page written
    assert c.metrics.corrupt_blocks == 1 and c.metrics.refused_loads == 1
    assert not (tmp_path / (h(0).hex() + SUFFIX)).exists()
    assert c.lookup([h(0)]) == 0
    assert c.lookup([h(1)]) == 1  # the healthy block is untouched


@pytest.mark.parametrize("damage", [flip_byte, truncate])
def test_corrupt_block_after_restart(damage, tmp_path):
    c = corrupt_connector(tmp_path, damage)
    c.close()
    fresh = allocate_buffer(BF16_MHA, tp_mesh(2), 8)
    d = TieredConnector(fresh, 1 << 20, tmp_path, 1 << 20)
    if damage is truncate:  # a short file fails the size check while the index is rebuilt
        assert d.lookup([h(0)]) == 0 and d.disk.corrupt == 1
    else:  # a flipped payload byte is caught by the checksum at load time
        with pytest.raises(KVLoadRefused):
            d.load([0], [h(0)])
        assert d.metrics.corrupt_blocks == 1
    assert not (tmp_path / (h(0).hex() + SUFFIX)).exists()
    d.load([0], [h(1)]).synchronize()


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EACCES], ids=["disk-full", "unwritable"])
def test_failed_disk_write_drops_the_offload_and_keeps_serving(err, tmp_path, monkeypatch):
    src, _, _ = random_buffer(BF16_MHA, 2, 8)
    row = BF16_MHA.host_bytes_per_page(2)
    want = page_bytes(src, 0)
    c = TieredConnector(src, 2 * row, tmp_path, 1 << 20)
    c.offload([0], [h(0)])

    def fail(*args, **kwargs):
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr("jaxkv.tiers.disk.os.replace", fail)
    c.offload([1, 2], [h(1), h(2)]).synchronize()
    assert c.metrics.dropped_offloads == 2
    assert os.listdir(tmp_path) == [h(0).hex() + SUFFIX]  # nothing half-written, nothing lost
    monkeypatch.undo()
    # The host copies still serve; the stored block still loads after a restart.
    c.load([5, 6], [h(1), h(2)]).synchronize()
    assert page_bytes(c.buffer, 5) == page_bytes(c.buffer, 1)
    d = TieredConnector(allocate_buffer(BF16_MHA, tp_mesh(2), 8), row, tmp_path, 1 << 20)
    d.load([3], [h(0)]).synchronize()
    assert page_bytes(d.buffer, 3) == want


def test_load_after_eviction_is_refused_and_writes_nothing():
    src, _, _ = random_buffer(BF16_MHA, 2, 8)
    c = HostConnector(src, 2 * BF16_MHA.host_bytes_per_page(2))
    c.offload([0, 1], [h(0), h(1)])
    assert c.lookup([h(0), h(1)]) == 2
    c.offload([2, 3], [h(2), h(3)])  # evicts both between the lookup and the load
    before = [page_bytes(c.buffer, p) for p in range(8)]
    with pytest.raises(KVLoadRefused):
        c.load([4, 5], [h(2), h(0)])  # h2 is held, h0 is not: no short load
    assert [page_bytes(c.buffer, p) for p in range(8)] == before
    assert not c.buffer.values.is_deleted()
    assert c.metrics.refused_loads == 1


def test_offload_during_load_and_repeated_offload(tmp_path):
    src, _, _ = random_buffer(BF16_MHA, 2, 8)
    row = BF16_MHA.host_bytes_per_page(2)
    want = page_bytes(src, 1)
    c = TieredConnector(src, 4 * row, tmp_path, 1 << 20)
    c.offload([1], [h(1)])
    t = c.load([6], [h(1)])  # in flight
    c.offload([6], [h(60)])  # reads the page the load is writing: ordered after it
    t.synchronize()
    assert bytes(c.engine.read_host([c._host[h(60)]])[0]) == want
    writes = c.metrics.disk_write_bytes
    again = c.offload([6, 1], [h(60), h(1)])
    assert again.num_pages == 0 and c.metrics.disk_write_bytes == writes
    assert c.metrics.blocks_offloaded == 2
    assert len(os.listdir(tmp_path)) == 2


def test_failed_copy_marks_pages_invalid(monkeypatch):
    src, _, _ = random_buffer(BF16_MHA, 2, 8)
    c = HostConnector(src, 4 * BF16_MHA.host_bytes_per_page(2))
    c.offload([1, 2], [h(1), h(2)])

    def broken(*args, **kwargs):
        raise RuntimeError("DMA error")

    monkeypatch.setattr(c.engine, "h2d", broken)
    with pytest.raises(KVLoadFailed, match="loading 2 pages failed: DMA error") as info:
        c.load([4, 5], [h(1), h(2)])
    assert info.value.page_ids == [4, 5]
    assert c.invalid_pages == {4, 5} and c.metrics.failed_loads == 1
    monkeypatch.undo()
    c.load([4, 5], [h(1), h(2)]).synchronize()
    assert c.invalid_pages == set()


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda c: c.lookup("abc"), "block_hashes must be a sequence of 32-byte hashes, got str"),
        (lambda c: c.lookup([h(0), "x"]), r"block_hashes\[1\] must be bytes, got str"),
        (lambda c: c.offload([0], [b"short"]), r"block_hashes\[0\] must be 32 bytes \(a SHA-256 digest\), got 5"),
        (lambda c: c.offload([0, 9], [h(0), h(1)]), r"device_page_ids contains 9, outside the valid range \[0, 8\)"),
        (lambda c: c.load([0, 1], [h(0)]), "device_page_ids has 2 entries but block_hashes has 1"),
        (lambda c: c.offload([0, 1], [h(0), h(0)]), "block_hashes repeats a hash"),
        (lambda c: c.load([1, 1], [h(0), h(1)]), "device_page_ids repeats 1"),
        (lambda c: c.touch([1]), r"block_hashes\[0\] must be bytes, got int"),
        (lambda c: c.load(range(5), [h(i) for i in range(5)]), "a load of 5 blocks exceeds the host tier's 4 slots"),
    ],
)
def test_bad_arguments_move_nothing(call, message, tmp_path):
    src, _, _ = random_buffer(BF16_MHA, 2, 8)
    c = TieredConnector(src, 4 * BF16_MHA.host_bytes_per_page(2), tmp_path, 1 << 20)
    c.offload([0, 1], [h(0), h(1)])
    state = (c.host_bytes, c.disk_bytes, dict(c._host), sorted(os.listdir(tmp_path)))
    metrics = c.metrics.__dict__.copy()
    with pytest.raises(ValueError, match=message):
        call(c)
    assert (c.host_bytes, c.disk_bytes, dict(c._host), sorted(os.listdir(tmp_path))) == state
    assert c.metrics.__dict__ == metrics
    assert not c.buffer.values.is_deleted()


def test_construction_errors(tmp_path):
    src, _, _ = random_buffer(BF16_MHA, 2, 8)
    with pytest.raises(ValueError, match=r"host_capacity_bytes \(100\) holds no page: one host row is 4096 bytes"):
        HostConnector(src, 100)
    with pytest.raises(ValueError, match="disk capacity_bytes must be a non-negative int, got -1"):
        TieredConnector(src, 1 << 20, tmp_path, -1)


def test_metrics_reset_and_close(tmp_path):
    src, _, _ = random_buffer(BF16_MHA, 2, 8)
    c = TieredConnector(src, 1 << 20, tmp_path, 1 << 20)
    c.offload([0, 1], [h(0), h(1)])
    c.load([4], [h(0)]).synchronize()
    m = c.metrics
    assert (m.blocks_offloaded, m.blocks_loaded) == (2, 1)
    assert m.offload_bytes == 2 * rows(c) and m.disk_write_bytes == 2 * rows(c) and m.load_bytes == rows(c)
    assert m.load_seconds > 0 and m.offload_seconds > 0
    c.reset()
    assert c.host_bytes[0] == 0 and c.disk_bytes[0] == 0 and os.listdir(tmp_path) == []
    assert c.metrics.blocks_offloaded == 0
    c.close()
    with pytest.raises(ValueError, match="TieredConnector is closed"):
        c.lookup([h(0)])


def test_null_connector():
    c = NullConnector()
    assert c.lookup([h(0)]) == 0 and c.metrics.misses == 1
    with pytest.raises(KVLoadRefused):
        c.load([0], [h(0)])
    assert c.offload([0], [h(0)]).is_complete()
    assert c.host_bytes == (0, 0) and c.disk_bytes == (0, 0)


def test_disk_tier_warm_restart_keeps_lru_order(tmp_path):
    fp = hashlib.sha256(b"layout").digest()
    tier = DiskTier(tmp_path, 3 * (HEADER_BYTES + 64), fingerprint=fp, row_bytes=64)
    for i in range(3):
        tier.put(h(i), np.full(64, i, np.uint8))
        os.utime(tmp_path / (h(i).hex() + SUFFIX), ns=(i * 10**9, i * 10**9))
    (tmp_path / ".stale.tmp").write_bytes(b"half a block")
    again = DiskTier(tmp_path, 3 * (HEADER_BYTES + 64), fingerprint=fp, row_bytes=64)
    assert len(again) == 3 and not (tmp_path / ".stale.tmp").exists()
    again.put(h(3), np.zeros(64, np.uint8))  # evicts the oldest: h0
    assert h(0) not in again and h(1) in again
    chex.assert_trees_all_equal(again.get(h(2)), np.full(64, 2, np.uint8))
    jax.block_until_ready(jnp.zeros(1))


def test_disk_get_rejects_a_bad_out_buffer_and_keeps_the_block(tmp_path):
    fp = hashlib.sha256(b"layout").digest()
    tier = DiskTier(tmp_path, 1 << 20, fingerprint=fp, row_bytes=64)
    tier.put(h(0), np.arange(64, dtype=np.uint8))
    for bad in (np.empty(128, np.uint8), np.empty(32, np.uint8), np.empty(64, np.int8)):
        with pytest.raises(ValueError, match=r"out must be a contiguous uint8 array of shape \(64,\)"):
            tier.get(h(0), out=bad)
    assert h(0) in tier and tier.corrupt == 0
    chex.assert_trees_all_equal(tier.get(h(0)), np.arange(64, dtype=np.uint8))


def test_transient_read_error_keeps_the_block(tmp_path, monkeypatch):
    from jaxkv.tiers.disk import DiskReadError

    fp = hashlib.sha256(b"layout").digest()
    tier = DiskTier(tmp_path, 1 << 20, fingerprint=fp, row_bytes=64)
    tier.put(h(0), np.arange(64, dtype=np.uint8))

    def emfile(*args, **kwargs):
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr("jaxkv.tiers.disk.os.open", emfile)
    with pytest.raises(DiskReadError, match="Too many open files"):
        tier.get(h(0))
    monkeypatch.undo()
    assert h(0) in tier and tier.corrupt == 0
    chex.assert_trees_all_equal(tier.get(h(0)), np.arange(64, dtype=np.uint8))


def test_short_write_is_a_failed_write(tmp_path, monkeypatch):
    from jaxkv.tiers.disk import DiskWriteError

    fp = hashlib.sha256(b"layout").digest()
    tier = DiskTier(tmp_path, 1 << 20, fingerprint=fp, row_bytes=4096)
    real_writev, budget = os.writev, [1000]

    def short_writev(fd, parts):
        """Accepts 1000 bytes, then makes no progress (a file size limit)."""
        take = []
        for p in parts:
            take.append(p[: max(0, budget[0] - sum(len(t) for t in take))])
        n = real_writev(fd, [t for t in take if len(t)]) if any(len(t) for t in take) else 0
        budget[0] -= n
        return n

    monkeypatch.setattr("jaxkv.tiers.disk.os.writev", short_writev)
    with pytest.raises(DiskWriteError, match="short write"):
        tier.put(h(0), np.ones(4096, np.uint8))
    monkeypatch.undo()
    assert h(0) not in tier and os.listdir(tmp_path) == []


def test_tiered_touch_accepts_any_iterable_and_refreshes_disk(tmp_path):
    src, _, _ = random_buffer(BF16_MHA, 2, 8)
    row = BF16_MHA.host_bytes_per_page(2)
    c = TieredConnector(src, row, tmp_path, 2 * (row + HEADER_BYTES))
    c.offload([0], [h(0)])
    c.offload([1], [h(1)])
    c.touch(x for x in [h(0)])  # a generator: host and disk both see it
    c.offload([2], [h(2)])  # the disk evicts h1, not the touched h0
    assert h(0) in c.disk and h(1) not in c.disk


def test_parallel_promotion_with_one_corrupt_block(tmp_path):
    """Several disk blocks read in parallel: a corrupt one refuses the load, the good ones stay promoted."""
    src, _, _ = random_buffer(BF16_MHA, 2, 8)
    row = BF16_MHA.host_bytes_per_page(2)
    want = [page_bytes(src, p) for p in range(4)]
    c = TieredConnector(src, 4 * row, tmp_path, 1 << 20)
    c.offload([0, 1, 2, 3], [h(0), h(1), h(2), h(3)])
    c.close()
    flip_byte(tmp_path / (h(2).hex() + SUFFIX), row)
    d = TieredConnector(allocate_buffer(BF16_MHA, tp_mesh(2), 8), 4 * row, tmp_path, 1 << 20)
    with pytest.raises(KVLoadRefused, match=r"block_hashes\[2\]"):
        d.load([4, 5, 6, 7], [h(0), h(1), h(2), h(3)])
    assert d.metrics.corrupt_blocks == 1 and d.metrics.blocks_promoted == 3
    assert h(2) not in d.disk and d.host_bytes[0] == 3 * row
    d.load([4, 5, 7], [h(0), h(1), h(3)]).synchronize()  # now all from host memory
    assert [page_bytes(d.buffer, p) for p in (4, 5, 7)] == [want[0], want[1], want[3]]
