"""`DiskTier` on its own (opened with fingerprint= and row_bytes=): LRU across restarts, reads, writes."""

import errno
import hashlib
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkv.tiers.disk import HEADER_BYTES, SUFFIX, DiskTier


def h(i: int) -> bytes:
    return hashlib.sha256(f"block {i}".encode()).digest()


def test_disk_tier_warm_restart_keeps_lru_order(tmp_path):
    fp = hashlib.sha256(b"layout").digest()
    tier = DiskTier(tmp_path, 3 * (HEADER_BYTES + 64), fingerprint=fp, row_bytes=64)
    for i in range(3):
        tier.put(h(i), np.full(64, i, np.uint8))
        os.utime(tmp_path / (h(i).hex() + SUFFIX), ns=(i * 10**9, i * 10**9))
    stale = tmp_path / f".{h(9).hex()}{SUFFIX}.4194305-0.tmp"  # a temp file of a writer that died (pid > pid_max)
    stale.write_bytes(b"half a block")
    again = DiskTier(tmp_path, 3 * (HEADER_BYTES + 64), fingerprint=fp, row_bytes=64)
    assert len(again) == 3 and not stale.exists()
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


def test_disk_discard_removes_files_without_counting_evictions(tmp_path):
    fp = hashlib.sha256(b"layout").digest()
    tier = DiskTier(tmp_path, 4 * (HEADER_BYTES + 64), fingerprint=fp, row_bytes=64)
    for i in range(3):
        tier.put(h(i), np.full(64, i, np.uint8))
    tier.discard([h(0), h(7)])  # h(7) was never held: ignored
    tier.discard(h(2))
    assert h(0) not in tier and h(2) not in tier and h(1) in tier
    assert not (tmp_path / (h(0).hex() + SUFFIX)).exists()
    assert tier.used_bytes == HEADER_BYTES + 64
    assert tier.evictions == 0 and tier.take_evicted() == []
    with pytest.raises(KeyError):
        tier.get(h(0))
