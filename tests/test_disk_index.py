"""`DiskTier` start-up indexing: only regular files with the names the tier writes; I/O errors keep files."""

import builtins
import errno
import hashlib
import os
import threading

import chex
import numpy as np
import pytest

from jaxkv.tiers.disk import HEADER_BYTES, SUFFIX, DiskTier

FP = hashlib.sha256(b"layout").digest()
ROW = 64
CAPACITY = 1 << 20
DEAD_PID = 4_194_305  # above Linux's largest pid_max (2**22): never a live process


def h(i: int) -> bytes:
    return hashlib.sha256(f"block {i}".encode()).digest()


def block_name(i: int) -> str:
    return h(i).hex() + SUFFIX


def tier(directory) -> DiskTier:
    return DiskTier(directory, CAPACITY, fingerprint=FP, row_bytes=ROW)


def write_blocks(directory, ids) -> None:
    """Valid block files for `ids` (row i is all i), written by a tier of the same layout."""
    t = tier(directory)
    for i in ids:
        t.put(h(i), np.full(ROW, i, np.uint8))
    t.close()


def test_directories_named_like_blocks_or_temp_files_are_skipped(tmp_path):
    write_blocks(tmp_path, [0])
    (tmp_path / block_name(1)).mkdir()
    (tmp_path / f".{h(2).hex()}{SUFFIX}.{DEAD_PID}-0.tmp").mkdir()
    t = tier(tmp_path)
    assert h(0) in t and h(1) not in t and len(t) == 1
    assert t.skipped_entries == 2 and t.corrupt == 0
    assert (tmp_path / block_name(1)).is_dir()


def test_fifo_named_like_a_block_does_not_block_start_up(tmp_path):
    write_blocks(tmp_path, [0])
    fifo = tmp_path / block_name(1)
    os.mkfifo(fifo)
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("tier", tier(tmp_path)), daemon=True)
    thread.start()
    thread.join(timeout=10)
    if thread.is_alive():
        # Unblock the reader stuck in open() (a writer appears and leaves), then fail.
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(timeout=10)
        pytest.fail("DiskTier() blocked opening a FIFO named like a block file")
    t = result["tier"]
    assert h(0) in t and h(1) not in t
    assert t.skipped_entries == 1 and t.corrupt == 0
    assert fifo.exists()


def test_symlink_named_like_a_block_is_not_followed(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    write_blocks(elsewhere, [1])
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    (cache_dir / block_name(1)).symlink_to(elsewhere / block_name(1))
    t = tier(cache_dir)
    assert h(1) not in t and len(t) == 0
    assert t.skipped_entries == 1 and t.corrupt == 0
    assert (cache_dir / block_name(1)).is_symlink() and (elsewhere / block_name(1)).is_file()


@pytest.mark.parametrize("err", [errno.EACCES, errno.EMFILE, errno.EIO], ids=lambda e: errno.errorcode[e])
def test_io_error_while_indexing_keeps_the_file(err, tmp_path, monkeypatch):
    write_blocks(tmp_path, [0, 1])
    bad = str(tmp_path / block_name(1))
    real_os_open, real_open = os.open, builtins.open

    def failing(real):
        def opener(path, *args, **kwargs):
            if os.fspath(path) == bad:
                raise OSError(err, os.strerror(err), bad)
            return real(path, *args, **kwargs)

        return opener

    monkeypatch.setattr(os, "open", failing(real_os_open))
    monkeypatch.setattr(builtins, "open", failing(real_open))
    t = tier(tmp_path)
    monkeypatch.undo()
    assert os.path.isfile(bad) and t.corrupt == 0  # an I/O error proves nothing about the block
    assert h(0) in t and h(1) not in t and t.unreadable_entries == 1
    # Once the error is gone, a restart indexes the block and it reads back.
    again = tier(tmp_path)
    assert h(1) in again and again.unreadable_entries == 0
    chex.assert_trees_all_equal(again.get(h(1)), np.full(ROW, 1, np.uint8))


@pytest.mark.parametrize(
    "name",
    [
        h(1).hex().upper() + SUFFIX,  # the tier writes lower-case hex
        h(1).hex()[:63] + SUFFIX,
        h(1).hex() + "0" + SUFFIX,
        h(1).hex()[:32] + SUFFIX,  # a 16-byte hash
        "notes" + SUFFIX,
        " " + h(1).hex() + SUFFIX,  # bytes.fromhex would accept the space
        h(1).hex() + SUFFIX + ".bak",
    ],
    ids=["upper-case", "63-digits", "65-digits", "32-digits", "not-hex", "leading-space", "other-suffix"],
)
def test_names_the_tier_never_writes_are_left_alone(name, tmp_path):
    write_blocks(tmp_path, [0, 1])
    os.rename(tmp_path / block_name(1), tmp_path / name)
    t = tier(tmp_path)
    assert h(0) in t and h(1) not in t and len(t) == 1
    assert t.corrupt == 0 and t.skipped_entries == 1
    assert (tmp_path / name).is_file()  # not the tier's file: never deleted
    chex.assert_trees_all_equal(t.get(h(0)), np.zeros(ROW, np.uint8))


def test_temp_files_the_tier_never_writes_are_left_alone(tmp_path):
    write_blocks(tmp_path, [0])
    ours = tmp_path / f".{h(1).hex()}{SUFFIX}.{DEAD_PID}-3.tmp"  # a dead writer's leftover
    foreign = [".stale.tmp", f".{h(1).hex().upper()}{SUFFIX}.{DEAD_PID}-3.tmp", f".{h(1).hex()}{SUFFIX}.x-3.tmp"]
    for name in [ours.name, *foreign]:
        (tmp_path / name).write_bytes(b"half a block")
    t = tier(tmp_path)
    assert len(t) == 1 and t.corrupt == 0
    assert not ours.exists()
    assert all((tmp_path / name).is_file() for name in foreign)
    assert t.skipped_entries == len(foreign)


def test_verified_bad_blocks_are_still_removed(tmp_path):
    write_blocks(tmp_path, [0, 1, 2])
    with open(tmp_path / block_name(1), "r+b") as f:
        f.truncate(HEADER_BYTES + ROW - 1)  # short: a power loss after the rename
    with open(tmp_path / block_name(2), "r+b") as f:
        f.write(b"NOTJAXKV")  # bad magic
    t = tier(tmp_path)
    assert h(0) in t and len(t) == 1
    assert t.corrupt == 2 and t.unreadable_entries == 0 and t.skipped_entries == 0
    assert sorted(os.listdir(tmp_path)) == [block_name(0)]


# -- opening: bad directories and budgets are refused, and leave everything as it was (issue 24) -----------------------


def test_a_directory_that_is_a_file_is_refused_naming_disk_directory(tmp_path):
    path = tmp_path / "not-a-dir"
    path.write_bytes(b"user data")
    with pytest.raises(ValueError, match=r"disk_directory '.*not-a-dir' is not a directory"):
        tier(path)
    with pytest.raises(
        ValueError, match=r"disk_directory '.*not-a-dir/sub' cannot be a directory: a part of it is a file"
    ):
        tier(path / "sub")
    assert path.read_bytes() == b"user data" and sorted(p.name for p in tmp_path.iterdir()) == ["not-a-dir"]


def test_an_unwritable_directory_is_refused_naming_disk_directory(tmp_path, monkeypatch):
    from jaxkv.tiers import disk

    write_blocks(tmp_path, [0])
    before = sorted(p.name for p in tmp_path.iterdir())
    real_open = os.open

    def read_only(path, flags, *args):  # as a read-only mount or a directory of another user (tests run as root)
        if flags & os.O_CREAT:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(disk.os, "open", read_only)
    with pytest.raises(ValueError, match=r"disk_directory '.*' is not writable: Permission denied"):
        tier(tmp_path)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert h(0) in tier(tmp_path)  # the block was left alone


def test_a_capacity_below_one_block_is_refused_when_opened(tmp_path):
    directory = tmp_path / "blocks"
    with pytest.raises(
        ValueError,
        match=rf"disk_capacity_bytes \({HEADER_BYTES + ROW - 1}\) is smaller than one block \({HEADER_BYTES + ROW} bytes",
    ):
        DiskTier(directory, HEADER_BYTES + ROW - 1, fingerprint=FP, row_bytes=ROW)
    with pytest.raises(ValueError, match=r"disk_capacity_bytes \(0\) is smaller than one block"):
        DiskTier(directory, 0, fingerprint=FP, row_bytes=ROW)
    assert not directory.exists()  # nothing created
    assert len(DiskTier(directory, HEADER_BYTES + ROW, fingerprint=FP, row_bytes=ROW)) == 0  # exactly one block: fine


def test_a_capacity_below_one_block_is_refused_by_open_tiers(tmp_path):
    from cachegen import random_buffer
    from test_tiers import BF16_MHA

    from jaxkv import open_tiers

    src, _, _ = random_buffer(BF16_MHA, 2, 4)
    with pytest.raises(ValueError, match=r"disk_capacity_bytes \(100\) is smaller than one block \(4192 bytes"):
        open_tiers(src, 1 << 20, disk_directory=tmp_path / "d", disk_capacity_bytes=100)
    assert not (tmp_path / "d").exists()


def test_warm_restart_rebuilds_lru_order_from_file_times_not_listing_order(tmp_path):
    """Issue 24-6(c): reopened over capacity, the blocks oldest by mtime go first, whatever order the listing has."""
    write_blocks(tmp_path, range(6))
    ages = {3: 1, 0: 2, 5: 3, 1: 4, 4: 5, 2: 6}  # block -> mtime (s): neither write nor name order
    for i, t in ages.items():
        os.utime(tmp_path / block_name(i), ns=(t * 10**9, t * 10**9))
    listed = [e.name for e in os.scandir(tmp_path)]
    by_age = [block_name(i) for i in sorted(ages, key=ages.get)]
    assert listed != by_age  # the listing alone would give another order
    t = DiskTier(tmp_path, 4 * (HEADER_BYTES + ROW), fingerprint=FP, row_bytes=ROW)
    assert t.take_evicted() == [h(3), h(0)] and t.evictions == 2
    assert t.held_blocks() == [h(5), h(1), h(4), h(2)]
    assert not (tmp_path / block_name(3)).exists() and not (tmp_path / block_name(0)).exists()
    t.put(h(9), np.zeros(ROW, np.uint8))  # the next eviction is the next oldest
    assert t.take_evicted() == [h(5)]
