"""`DiskTier`: host page rows stored as one verified file per block hash.

Each file holds one block in the format of `jaxkv.tiers.blockformat` (the
byte-layout table is there): a 96-byte header, then the row in its stored form.
It is written to a temporary name and renamed into place, so a crashed
process never leaves a half-written block under a real name (files are not
fsynced: after a power loss a renamed file may be short or zeroed, which the
size check and the checksum then catch).

Opened by a composition, the fingerprint is the stored one
(`StoredLayout.fingerprint`): a block written at TP 4 loads at TP 2 or 8.
The conversion between host row and stored form runs on the writer and
reader threads, through a per-thread staging row.

The checksum is verified on every read; a mismatch, a short file or a
foreign header makes the block absent and the file is removed. On start the
tier rebuilds its index from the directory (warm restart), checking headers
and sizes of the regular files named as it names them (`<64 lower-case hex
digits>.kvblock`); it leaves every other entry alone and deletes only files
it could have written.

With a key (`key=`, or `$JAXKV_BLOCK_KEY`) the tier writes keyed blocks (a
BLAKE3 MAC over header and payload after the row: `blockformat`, version 2) and
reads nothing else: a file without a valid MAC (an unkeyed one, one written
under another key, one altered) is a miss, counted in `corrupt` and in
`forged`, and removed; at start-up, unkeyed files are removed the same way.
Without a key the tier trusts everyone who can write to the directory (a
shared file system: anyone can write a valid header and checksum); it leaves
keyed files alone (not indexed, not removed: counted in `skipped_entries`).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import itertools
import os
import re
import stat
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np

from jaxkv._checks import check_non_negative_int
from jaxkv.prefix.hashing import BLOCK_HASH_BYTES
from jaxkv.tiers.base import OpensOnce
from jaxkv.tiers.blockformat import (
    HEADER_BYTES,
    BlockKey,
    CorruptBlockError,
    ForgedBlockError,
    KeyedBlockError,
    pack_header,
    trailer_bytes,
    verify_header,
    verify_payload,
)

SUFFIX = ".kvblock"
_HEX = f"[0-9a-f]{{{2 * BLOCK_HASH_BYTES}}}"  # bytes.hex(): lower case, no separators
_BLOCK_NAME = re.compile(f"(?P<hash>{_HEX}){re.escape(SUFFIX)}")
"""The only names `_path` produces; anything else in the directory is not the tier's."""
_TMP_NAME = re.compile(rf"\.{_HEX}{re.escape(SUFFIX)}\.(?P<pid>[0-9]+)-[0-9]+\.tmp")
"""The only names `_write_tmp` produces: ".<hash>.kvblock.<pid>-<n>.tmp"."""


PARALLEL_MIN_ROW_BYTES = 512 << 10
"""Rows this large or larger are read and written on the writer threads (`DiskTier._parallel`);
measured on 2 cores: docs/benchmarks.md, "Measurements behind the rules", "Disk tier threads"."""


class DiskWriteError(Exception):
    """A block could not be written (disk full, directory unwritable); nothing was stored."""


class DiskReadError(Exception):
    """A stored block could not be read right now (an I/O error, not a verification failure); it was kept."""


class _NotARegularFile(Exception):
    """A directory entry named like a block file is not a regular file (a directory, FIFO, ...)."""


class DiskTier(OpensOnce):
    """Blocks of `row_bytes` bytes in `directory`, at most `capacity_bytes` of files, LRU-evicted."""

    def __init__(
        self,
        directory,
        capacity_bytes: int,
        *,
        name: str = "disk",
        fingerprint: bytes | None = None,
        row_bytes: int | None = None,
        key: bytes | str | BlockKey | None = None,
    ):
        """Blocks in `directory`, at most `capacity_bytes` of files.

        A composition (`TieredStore`) opens the tier with its row layout; pass
        `fingerprint` and `row_bytes` to open it at once on its own. Opening
        creates `directory` (mode 0700) and refuses, with a `ValueError`, one
        that is a file or cannot be written, and a `capacity_bytes` below one
        block; nothing is created or removed then.
        `key`: the deployment's secret (at least 16 bytes; a str is UTF-8),
        default `$JAXKV_BLOCK_KEY` when set: blocks are then sealed and
        checked with a MAC (the module docstring). None and no variable:
        unkeyed, trusting everyone who can write to the directory.
        """
        capacity_bytes = check_non_negative_int("disk capacity_bytes", capacity_bytes)
        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be a non-empty str, got {name!r}")
        self.block_key = BlockKey.resolve(key)
        """The MAC key of this tier's blocks, or None (unkeyed: trusts every writer of the directory)."""
        self.name = name
        self.directory = Path(directory)
        self.capacity_bytes = capacity_bytes
        self.fingerprint = b""
        self.row_bytes = 0
        self.file_bytes = HEADER_BYTES
        """Bytes one block occupies on disk."""
        self.evictions = 0
        """Blocks evicted to stay within `capacity_bytes`."""
        self.corrupt = 0
        """Block files that failed verification (bad header, size, checksum or MAC) and were removed."""
        self.forged = 0
        """Of `corrupt`, the files a keyed tier refused for their MAC: unkeyed, another key's, or altered."""
        self.skipped_entries = 0
        """Directory entries left alone at start-up: names this tier never writes (upper-case hex,
        other suffixes, foreign temporary files), anything not a regular file (directories,
        FIFOs, symlinks) even when named like a block, and keyed blocks when this tier has no key."""
        self.unreadable_entries = 0
        """Block files that could not be read at start-up (EACCES, EMFILE, EIO): kept on disk, not
        indexed (a miss; a later `put` of the same block replaces the file)."""
        self.writers = max(1, min(4, os.cpu_count() or 1))
        """Threads that write and read block files in parallel in `put_many` / `get_many`."""
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._staging = threading.local()  # per thread: a row for the stored form when it differs from the host row
        self._tmp_ids = itertools.count()
        self._index: OrderedDict[bytes, None] = OrderedDict()  # LRU order, oldest first
        self._evicted: list[bytes] = []  # since the last take_evicted()
        self._open_at_construction(fingerprint, row_bytes)

    def _opened(self) -> None:
        """Check the budget and the directory, then index the blocks already in it (warm restart)."""
        file_bytes = HEADER_BYTES + self.row_bytes + trailer_bytes(self.block_key)
        if self.capacity_bytes < file_bytes:
            raise ValueError(
                f"disk_capacity_bytes ({self.capacity_bytes}) is smaller than one block ({file_bytes} bytes: "
                f"{HEADER_BYTES}-byte header + row_bytes {self.row_bytes}"
                + (f" + {trailer_bytes(self.block_key)}-byte MAC" if self.block_key is not None else "")
                + f"): every write would fail; give at least {file_bytes}"
            )
        self._check_directory()
        self.file_bytes = file_bytes
        self._rebuild()

    def _check_directory(self) -> None:
        """Create the directory if needed and prove it writable (one probe file, removed); ValueError otherwise.

        The probe is named as a temporary file of this process, so a crash
        between its creation and removal leaves a file the next start removes.
        """
        where = f"disk_directory {str(self.directory)!r}"
        if self.directory.exists() and not self.directory.is_dir():
            raise ValueError(f"{where} is not a directory: pass a directory (it is created if missing)")
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError) as e:
            raise ValueError(f"{where} cannot be a directory: a part of it is a file ({e.strerror})") from None
        except OSError as e:
            raise ValueError(f"{where} cannot be created: {e.strerror}") from None
        probe = self.directory / f".{'0' * 2 * BLOCK_HASH_BYTES}{SUFFIX}.{os.getpid()}-{next(self._tmp_ids)}.tmp"
        try:
            os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except OSError as e:
            raise ValueError(
                f"{where} is not writable: {e.strerror}; choose a directory this process can write"
            ) from None
        _unlink(probe)

    # -- index -------------------------------------------------------------
    def _path(self, block_hash: bytes) -> Path:
        return self.directory / (block_hash.hex() + SUFFIX)

    def _rebuild(self) -> None:
        """Index the blocks already in the directory, oldest first; drop what verifies bad.

        Only regular files named exactly as this tier names them are opened,
        never following a symlink and never blocking (a FIFO is not opened).
        Anything else is left alone and counted in `skipped_entries`; a block
        file that cannot be read (EACCES, EMFILE, EIO) is kept, not indexed, and
        counted in `unreadable_entries`. Only a file whose header or size is
        wrong for this layout is removed (`corrupt`).
        """
        found = []
        for entry in os.scandir(self.directory):
            tmp = _TMP_NAME.fullmatch(entry.name)
            block = None if tmp else _BLOCK_NAME.fullmatch(entry.name)
            if tmp is None and block is None:
                self.skipped_entries += 1  # a name this tier never writes: not its file
                continue
            try:
                is_file = stat.S_ISREG(os.lstat(entry.path).st_mode)
            except FileNotFoundError:
                continue  # removed since scandir listed it
            except OSError:
                self.unreadable_entries += 1
                continue
            if not is_file:
                self.skipped_entries += 1  # a directory, FIFO, symlink, ...: never ours
                continue
            if tmp is not None:
                if not _writer_alive(int(tmp["pid"])):
                    _unlink(entry.path)  # a write whose process died before the rename
                continue
            assert block is not None  # a name that is neither a block nor a temporary file was skipped above
            block_hash = bytes.fromhex(block["hash"])
            try:
                mtime_ns = self._check_file(entry.path, block_hash)
            except _NotARegularFile:
                self.skipped_entries += 1  # replaced by something else since the lstat
                continue
            except KeyedBlockError:
                self.skipped_entries += 1  # a keyed deployment's block: not this unkeyed tier's to judge
                continue
            except CorruptBlockError as e:
                self.corrupt += 1
                self.forged += isinstance(e, ForgedBlockError)
                _unlink(entry.path)
                continue
            except FileNotFoundError:
                continue
            except OSError as e:
                if e.errno == errno.ELOOP:  # O_NOFOLLOW: became a symlink since the lstat
                    self.skipped_entries += 1
                else:
                    self.unreadable_entries += 1  # may be transient: keep the file, it proves nothing
                continue
            if mtime_ns is not None:  # None: another model's or layout's block, not ours to load or delete
                found.append((mtime_ns, block_hash))
        for _, block_hash in sorted(found):
            self._index[block_hash] = None
        self._evict_to(self.capacity_bytes)

    def _check_file(self, path: str, block_hash: bytes) -> int | None:
        """Verify one block file's header and size, without following a link or blocking on open.

        Returns its mtime in ns if it is a valid block of this layout, None if
        it is another layout's. Raises CorruptBlockError if it verifies bad,
        _NotARegularFile if it is not a regular file, OSError for an I/O error.
        """
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise _NotARegularFile(path)
            header = bytearray(HEADER_BYTES)
            n = _readv_full(fd, [memoryview(header)])
        finally:
            os.close(fd)
        if self._parse_header(bytes(header[:n]), block_hash) is None:
            return None
        if st.st_size != self.file_bytes:
            raise CorruptBlockError(f"file is {st.st_size} bytes, expected {self.file_bytes}")
        return st.st_mtime_ns

    def _parse_header(self, raw, block_hash: bytes) -> int | None:
        """The payload checksum the header records, None for a foreign fingerprint; raises CorruptBlockError."""
        return verify_header(
            raw, fingerprint=self.fingerprint, block_hash=block_hash, payload_bytes=self.row_bytes, key=self.block_key
        )

    # -- queries -----------------------------------------------------------
    def __contains__(self, block_hash: bytes) -> bool:
        return block_hash in self._index

    def __len__(self) -> int:
        return len(self._index)

    @property
    def used_bytes(self) -> int:
        """Bytes of the indexed block files (header included): what `capacity_bytes` bounds."""
        return len(self._index) * self.file_bytes

    @property
    def block_bytes(self) -> int:
        """Bytes one block occupies on disk (its file: header and row)."""
        return self.file_bytes

    def held_blocks(self) -> list[bytes]:
        """Every block held, least recently used first (after a warm restart: by file time)."""
        return list(self._index)

    def take_evicted(self) -> list[bytes]:
        """Blocks evicted to stay within `capacity_bytes` since the last call (the scheduler's index drops them)."""
        evicted, self._evicted = self._evicted, []
        return evicted

    def touch(self, block_hashes) -> None:
        """Refresh the recency of the held ones among `block_hashes` (one hash or an iterable)."""
        for block_hash in [block_hashes] if isinstance(block_hashes, bytes) else block_hashes:
            if block_hash in self._index:
                self._index.move_to_end(block_hash)

    # -- read / write ------------------------------------------------------
    def get(self, block_hash: bytes, out: np.ndarray | None = None) -> np.ndarray:
        """The verified row of `block_hash` (read into `out` if given).

        Raises KeyError if the tier does not hold it; CorruptBlockError if the
        file fails verification (the file is then removed and the block is
        gone); DiskReadError for an I/O error (the block is kept). On any
        error the contents of `out` are undefined.
        """
        if out is not None:
            self._check_out(out)
        if block_hash not in self._index:
            raise KeyError(block_hash)
        row = np.empty(self.row_bytes, np.uint8) if out is None else out
        error = self._settle(block_hash, self._read(block_hash, row))
        if error is not None:
            raise error
        return row

    def get_many(self, items: list[tuple[bytes, np.ndarray]]) -> list[Exception | None]:
        """Read several held blocks into their `out` rows, in parallel; per block None or the error.

        Errors are those of `get` (CorruptBlockError removes the block,
        DiskReadError keeps it), and KeyError for a block the tier no longer
        holds (evicted since the caller planned the read): an answer, not a raise.
        """
        for _, out in items:
            self._check_out(out)
        held = [(i, item) for i, item in enumerate(items) if item[0] in self._index]
        if len(held) > 1 and self._parallel:
            raw = self._on_threads(lambda t: self._read(*t[1]), held)
        else:
            raw = [self._read(*item) for _, item in held]
        answers: list[Exception | None] = [
            KeyError(f"block {h.hex()[:16]} is not in disk tier {self.name!r}") for h, _ in items
        ]
        for (i, (block_hash, _)), r in zip(held, raw, strict=True):
            answers[i] = self._settle(block_hash, r)
        return answers

    def _check_out(self, out) -> None:
        if out.dtype != np.uint8 or out.shape != (self.row_bytes,) or not out.flags.c_contiguous:
            raise ValueError(
                f"out must be a contiguous uint8 array of shape ({self.row_bytes},), got {out.dtype} {out.shape}"
            )

    def _staging_row(self) -> np.ndarray:
        """This thread's staging row for the stored form (allocated once per thread)."""
        row = getattr(self._staging, "row", None)
        if row is None:
            row = self._staging.row = np.empty(self.row_bytes, np.uint8)
        return row

    def _read(self, block_hash: bytes, row: np.ndarray) -> Exception | None:
        """Read and verify one block into `row` (thread-safe: no index access); the failure, if any."""
        target = self._staging_row() if self.converts else row
        error = self._read_payload(block_hash, target)
        if error is None and target is not row:
            self.from_stored(target, row)
        return error

    def _read_payload(self, block_hash: bytes, row: np.ndarray) -> Exception | None:
        """Read and verify one block's stored bytes into `row`; the failure, if any."""
        path = self._path(block_hash)
        header = bytearray(HEADER_BYTES)
        trailer = bytearray(trailer_bytes(self.block_key))
        try:
            # One open, fstat, readv and close per block: syscalls dominate small blocks.
            # No following of symlinks, no blocking on a FIFO put in a block's place.
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    raise CorruptBlockError("not a regular file")
                size = st.st_size
                if size != self.file_bytes:
                    # The header may say why (a keyed block met without a key, an unkeyed one with a key).
                    self._parse_header(os.pread(fd, HEADER_BYTES, 0), block_hash)
                    raise CorruptBlockError(f"file is {size} bytes, expected {self.file_bytes}")
                n = _readv_full(fd, [memoryview(header), row.data, memoryview(trailer)])
            finally:
                os.close(fd)
            if n != self.file_bytes:
                raise CorruptBlockError(f"read {n} bytes, expected {self.file_bytes}")
            check = self._parse_header(bytes(header), block_hash)
            if check is None:
                raise CorruptBlockError("fingerprint changed")
            why = verify_payload(self.block_key, header, row, trailer, check)
            if why is not None:
                raise (ForgedBlockError if self.block_key is not None else CorruptBlockError)(why)
        except (CorruptBlockError, OSError) as e:
            return e
        return None

    def _settle(self, block_hash: bytes, error: Exception | None) -> Exception | None:
        """Apply a read's outcome to the index (calling thread only); the error to raise, if any."""
        name = block_hash.hex()[:16]
        if error is None:
            self._index.move_to_end(block_hash)
            return None
        if isinstance(error, FileNotFoundError):  # removed behind our back: simply gone
            self._index.pop(block_hash, None)
            return CorruptBlockError(f"block {name}: file missing")
        if isinstance(error, KeyedBlockError):  # replaced by a keyed deployment's file: not ours to remove
            self._index.pop(block_hash, None)
            return KeyedBlockError(f"block {name}: {error}; file left in place")
        if isinstance(error, CorruptBlockError):
            self.corrupt += 1
            self.forged += isinstance(error, ForgedBlockError)
            self._drop(block_hash)
            return type(error)(f"block {name}: {error}")
        return DiskReadError(f"reading block {name}: {error}")

    @property
    def _parallel(self) -> bool:
        """Whether a batch goes to the writer threads: only for rows of `PARALLEL_MIN_ROW_BYTES` or more.

        Each block costs some Python under the GIL (open, fstat, header, the
        calls around the copies); with small rows two threads spend more on
        handing the GIL back and forth than they gain, more so with the
        stored-form conversion (docs/benchmarks.md, "Measurements behind the
        rules", "Disk tier threads").
        """
        return self.writers > 1 and self.row_bytes >= PARALLEL_MIN_ROW_BYTES

    def _on_threads(self, fn, items: list) -> list:
        """`[fn(x) for x in items]` on the `writers` threads, each taking one contiguous share.

        One task per thread, not per block: a task per block costs a future and
        a GIL hand-off each, which on a small machine cost more than the
        parallel copies gained (docs/benchmarks.md, "Disk tier threads").
        """
        n = min(self.writers, len(items))
        share = -(-len(items) // n)
        parts = [items[i : i + share] for i in range(0, len(items), share)]
        return [r for part in self._threads().map(lambda p: [fn(x) for x in p], parts) for r in part]

    def _threads(self) -> concurrent.futures.ThreadPoolExecutor:
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(self.writers, thread_name_prefix="jaxkv-disk")
        return self._pool

    def put(self, block_hash: bytes, row: np.ndarray) -> bool:
        """Store `row` under `block_hash`; False if already held (refreshed instead).

        Evicts least recently used blocks to make room. Raises DiskWriteError
        when the write fails; nothing already stored is lost.
        """
        (result,) = self.put_many([(block_hash, row)])
        if isinstance(result, DiskWriteError):
            raise result
        return result

    def put_many(self, items: list[tuple[bytes, np.ndarray]]) -> list[bool | DiskWriteError]:
        """`put` for several blocks; per block: True (stored), False (already held) or the error.

        The files are written to temporary names in parallel (`writers`
        threads: the kernel copies and checksums overlap), then renamed into
        place one by one, in order, evicting as needed: the index and the LRU
        order are only touched by the calling thread.
        """
        results: list[bool | DiskWriteError] = []
        todo = []
        for i, (block_hash, row) in enumerate(items):
            if block_hash in self._index:
                self._index.move_to_end(block_hash)
                results.append(False)
            elif self.file_bytes > self.capacity_bytes:
                results.append(
                    DiskWriteError(
                        f"one block ({self.file_bytes} B) exceeds the disk capacity ({self.capacity_bytes} B)"
                    )
                )
            else:
                results.append(True)
                todo.append((i, block_hash, row))
        if len(todo) > 1 and self._parallel:
            written = self._on_threads(lambda t: self._write_tmp(t[1], t[2]), todo)
        else:
            written = [self._write_tmp(h, row) for _, h, row in todo]
        for (i, block_hash, _), tmp in zip(todo, written, strict=True):
            if isinstance(tmp, DiskWriteError):
                results[i] = tmp
                continue
            try:
                self._evict_to(self.capacity_bytes - self.file_bytes)
                os.replace(tmp, self._path(block_hash))
            except OSError as e:
                _unlink(tmp)
                results[i] = DiskWriteError(f"writing block {block_hash.hex()[:16]} to {self.directory}: {e}")
                continue
            self._index[block_hash] = None
        return results

    def _write_tmp(self, block_hash: bytes, row: np.ndarray):
        """Write one block to a fresh temporary file; its path, or the DiskWriteError (thread-safe)."""
        row = self.to_stored(np.ascontiguousarray(row), self._staging_row() if self.converts else None)
        header = pack_header(self.fingerprint, block_hash, row, self.block_key)
        parts = [memoryview(header), row.data.cast("B")]
        if self.block_key is not None:
            parts.append(memoryview(self.block_key.mac(header, row)))
        tmp = self.directory / f".{block_hash.hex()}{SUFFIX}.{os.getpid()}-{next(self._tmp_ids)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                _writev_full(fd, parts)
            finally:
                os.close(fd)
        except OSError as e:
            _unlink(tmp)
            return DiskWriteError(f"writing block {block_hash.hex()[:16]} to {self.directory}: {e}")
        return tmp

    def close(self) -> None:
        """Stop the writer threads."""
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def _evict_to(self, budget: int) -> None:
        while self._index and self.used_bytes > budget:
            oldest = next(iter(self._index))
            self._drop(oldest)
            self._evicted.append(oldest)
            self.evictions += 1

    def _drop(self, block_hash: bytes) -> None:
        self._index.pop(block_hash, None)
        _unlink(self._path(block_hash))

    def discard(self, block_hashes) -> None:
        """Remove the held ones among `block_hashes` (one hash or an iterable): bytes their owner declared dead.

        Not evictions: nothing is counted, and `take_evicted` does not report them (the owner knows).
        """
        for block_hash in [block_hashes] if isinstance(block_hashes, bytes) else block_hashes:
            if block_hash in self._index:
                self._drop(block_hash)

    def clear(self) -> None:
        """Remove every block of this tier."""
        for block_hash in list(self._index):
            self._drop(block_hash)

    def __repr__(self) -> str:
        keyed = "" if self.block_key is None else f", key id {self.block_key.key_id}"
        return (
            f"DiskTier({self.name!r}, {str(self.directory)!r}, {len(self._index)} blocks, "
            f"{self.used_bytes}/{self.capacity_bytes} bytes{keyed})"
        )


def _writev_full(fd: int, parts: list[memoryview]) -> None:
    """Write all of `parts` (one writev when it completes): a write may be short (disk filling up)."""
    while parts:
        n = os.writev(fd, parts)
        if n <= 0:
            raise OSError(28, "short write: no progress")  # as ENOSPC
        while parts and n >= len(parts[0]):
            n -= len(parts[0])
            parts = parts[1:]
        if parts and n:
            parts = [parts[0][n:], *parts[1:]]


def _readv_full(fd: int, parts: list[memoryview]) -> int:
    """Fill `parts` from `fd` until they are full or the file ends; returns the bytes read."""
    total = 0
    while parts:
        n = os.readv(fd, parts)
        if n <= 0:
            break
        total += n
        while parts and n >= len(parts[0]):
            n -= len(parts[0])
            parts = parts[1:]
        if parts and n:
            parts = [parts[0][n:], *parts[1:]]
    return total


def _writer_alive(pid: int) -> bool:
    """Whether the process that owns a temporary file (".<name>.<pid>-<n>.tmp") still runs."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:
        return True
    return pid != os.getpid()


def _unlink(path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
