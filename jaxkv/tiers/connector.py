"""KV connectors: what a serving scheduler asks about memory outside the device.

A connector answers four questions, keyed by block hash (32-byte SHA-256
digests, defined by the prefix-caching manager):

- `lookup(block_hashes) -> int`: how many *leading* blocks an outside tier
  holds (advisory: nothing is reserved).
- `load(device_page_ids, block_hashes) -> Transfer`: bring exactly those blocks
  into those device pages, or raise `KVLoadRefused` before writing anything
  (never a short load). A copy that fails raises `KVLoadFailed` and leaves the
  pages listed in `invalid_pages`.
- `offload(device_page_ids, block_hashes) -> Transfer`: keep copies of those
  device pages under those hashes; hashes already held are only refreshed.
- `touch(block_hashes)`: the scheduler served these from the device; refresh
  their recency so the tiers keep hot prefixes.

Connectors own an `OffloadEngine` and so the cache's functional state: a load
donates the cache and `connector.buffer` is the current one afterwards. Pass
`buffer=` to `load`/`offload` when the cache was donated elsewhere since.

When the cache spans processes (`jax.distributed`), each process's connector
holds its own shards' bytes, and answers for the whole TP group: `lookup`
returns the minimum over the group, and a load is refused (or fails) in every
process when it is refused (or fails) in one, so page tables stay identical.
See `jaxkv.transfer.agreement` and docs/multihost.md.
"""

from __future__ import annotations

import dataclasses
import time
from collections import OrderedDict
from pathlib import Path

import jax
import numpy as np

from jaxkv.layout import pages as _pages
from jaxkv.tiers.disk import BLOCK_HASH_BYTES, DiskTier, DiskWriteError
from jaxkv.transfer.agreement import GroupAgreement, spans_processes
from jaxkv.transfer.engine import OffloadEngine
from jaxkv.transfer.handle import Transfer, combine, completed


class KVLoadRefused(Exception):
    """A load cannot be served in full (a block is no longer held); no device page was written."""


class KVLoadFailed(Exception):
    """A load's copy failed; the pages it targeted hold undefined bytes (see `invalid_pages`)."""

    def __init__(self, message: str, page_ids: list[int]):
        super().__init__(message)
        self.page_ids = page_ids


@dataclasses.dataclass
class ConnectorMetrics:
    """Counters since construction or `reset()`."""

    host_hits: int = 0
    """Blocks `lookup` found in host memory."""
    disk_hits: int = 0
    """Blocks `lookup` found on disk only."""
    misses: int = 0
    """Lookups that stopped at an absent block (at most one per lookup)."""
    blocks_loaded: int = 0
    blocks_promoted: int = 0
    """Blocks read from disk into host memory to serve a load."""
    blocks_offloaded: int = 0
    load_bytes: int = 0
    load_seconds: float = 0.0
    offload_bytes: int = 0
    offload_seconds: float = 0.0
    disk_write_bytes: int = 0
    disk_write_seconds: float = 0.0
    disk_read_bytes: int = 0
    disk_read_seconds: float = 0.0
    host_evictions: int = 0
    disk_evictions: int = 0
    refused_loads: int = 0
    failed_loads: int = 0
    dropped_offloads: int = 0
    """Blocks an offload could not store (no room, or the disk write failed)."""
    corrupt_blocks: int = 0
    """Stored blocks that failed verification and were removed (counted as misses)."""


def check_block_hashes(block_hashes, *, name: str = "block_hashes") -> list[bytes]:
    """Validate hashes: a sequence of `bytes` of length 32; returns them as a list."""
    if isinstance(block_hashes, (bytes, str)) or not hasattr(block_hashes, "__iter__"):
        raise ValueError(
            f"{name} must be a sequence of {BLOCK_HASH_BYTES}-byte hashes, got {type(block_hashes).__name__}"
        )
    hashes = list(block_hashes)
    for i, h in enumerate(hashes):
        if not isinstance(h, bytes):
            raise ValueError(f"{name}[{i}] must be bytes, got {type(h).__name__}")
        if len(h) != BLOCK_HASH_BYTES:
            raise ValueError(f"{name}[{i}] must be {BLOCK_HASH_BYTES} bytes (a SHA-256 digest), got {len(h)}")
    return hashes


class KVConnector:
    """The protocol. `NullConnector` is the trivial implementation."""

    metrics: ConnectorMetrics

    def lookup(self, block_hashes) -> int:
        raise NotImplementedError

    def load(self, device_page_ids, block_hashes, *, buffer=None) -> Transfer:
        raise NotImplementedError

    def offload(self, device_page_ids, block_hashes, *, buffer=None) -> Transfer:
        raise NotImplementedError

    def touch(self, block_hashes) -> None:
        raise NotImplementedError

    @property
    def host_bytes(self) -> tuple[int, int]:
        """(used, total) bytes of the host tier."""
        return (0, 0)

    @property
    def disk_bytes(self) -> tuple[int, int]:
        """(used, total) bytes of the disk tier."""
        return (0, 0)

    def bind(self, buffer) -> None:
        """Hand over the current cache after a computation (attention) donated the old one."""

    def reset(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class NullConnector(KVConnector):
    """Holds nothing: every lookup is 0, every load is refused, offloads are no-ops."""

    def __init__(self):
        self.metrics = ConnectorMetrics()

    def lookup(self, block_hashes) -> int:
        if check_block_hashes(block_hashes):
            self.metrics.misses += 1
        return 0

    def load(self, device_page_ids, block_hashes, *, buffer=None) -> Transfer:
        if check_block_hashes(block_hashes):
            self.metrics.refused_loads += 1
            raise KVLoadRefused("NullConnector holds no blocks")
        return completed("h2d", 0, 0)

    def offload(self, device_page_ids, block_hashes, *, buffer=None) -> Transfer:
        check_block_hashes(block_hashes)
        return completed("d2h", 0, 0)

    def touch(self, block_hashes) -> None:
        check_block_hashes(block_hashes)

    def reset(self) -> None:
        self.metrics = ConnectorMetrics()


class HostConnector(KVConnector):
    """A host-memory tier on the offload engine's page pool, LRU-evicted.

    `host_capacity_bytes` is divided into host slots of `row_bytes` (one page
    of every shard; an MLA page stored once). When the cache spans processes,
    a row holds the pages of the shards this process owns, and `agreement`
    keeps the group's answers identical: "auto" builds a `GroupAgreement` over the processes the
    cache spans (none, and no cost, when it spans one); pass one to choose its
    timeout or mechanism, or None to answer for this process alone.
    """

    def __init__(
        self,
        buffer,
        host_capacity_bytes: int,
        *,
        host_memory_kind: str = "pinned_host",
        agreement: GroupAgreement | str | None = "auto",
    ):
        probe = OffloadEngine(buffer, 1, host_memory_kind=host_memory_kind)
        if isinstance(host_capacity_bytes, bool) or not isinstance(host_capacity_bytes, int):
            raise ValueError(f"host_capacity_bytes must be an int, got {host_capacity_bytes!r}")
        slots = host_capacity_bytes // probe.row_bytes
        if slots < 1:
            raise ValueError(
                f"host_capacity_bytes ({host_capacity_bytes}) holds no page: one host row is {probe.row_bytes} bytes"
            )
        if isinstance(agreement, str) and agreement == "auto":
            agreement = GroupAgreement.for_cache(buffer)
        elif agreement is not None and not isinstance(agreement, GroupAgreement):
            raise ValueError(f"agreement must be 'auto', None or a GroupAgreement, got {agreement!r}")
        self.engine = OffloadEngine(buffer, slots, host_memory_kind=host_memory_kind)
        self.agreement: GroupAgreement | None = agreement
        """Agrees lookups and loads across the processes of the TP group; None in one process."""
        self.metrics = ConnectorMetrics()
        self.invalid_pages: set[int] = set()
        """Device pages whose load failed: their bytes are undefined until rewritten."""
        self._host: OrderedDict[bytes, int] = OrderedDict()  # hash -> slot, LRU order (oldest first)
        self._free = list(range(slots - 1, -1, -1))
        self._closed = False

    # -- state -------------------------------------------------------------
    @property
    def buffer(self):
        """The current cache (after the last load, it is the returned one)."""
        return self.engine.buffer

    @property
    def fingerprint(self) -> bytes:
        return self.engine.layout_fingerprint

    def bind(self, buffer) -> None:
        self._check_open()
        self.engine.bind(buffer)

    @property
    def host_bytes(self) -> tuple[int, int]:
        return (len(self._host) * self.engine.row_bytes, self.engine.num_host_pages * self.engine.row_bytes)

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"{type(self).__name__} is closed")

    # -- host tier ---------------------------------------------------------
    def _host_slot(self, protect: set[int]) -> int | None:
        """A free host slot, evicting the least recently used block not in `protect`."""
        if self._free:
            return self._free.pop()
        for block_hash, slot in self._host.items():
            if slot not in protect:
                del self._host[block_hash]
                self.metrics.host_evictions += 1
                return slot
        return None

    def _holds(self, block_hash: bytes) -> str | None:
        return "host" if block_hash in self._host else None

    # -- protocol ----------------------------------------------------------
    def lookup(self, block_hashes) -> int:
        self._check_open()
        hashes = check_block_hashes(block_hashes)
        tiers = []
        for h in hashes:
            tier = self._holds(h)
            if tier is None:
                break
            tiers.append(tier)
        n = len(tiers)
        if self.agreement is not None:
            n = self.agreement.min(n)  # a block counts only if every process holds its shards
        self.metrics.host_hits += tiers[:n].count("host")
        self.metrics.disk_hits += tiers[:n].count("disk")
        if n < len(hashes):
            self.metrics.misses += 1
        return n

    def touch(self, block_hashes) -> None:
        self._check_open()
        for h in check_block_hashes(block_hashes):
            if h in self._host:
                self._host.move_to_end(h)

    def _check_pair(self, device_page_ids, block_hashes) -> tuple[np.ndarray, list[bytes]]:
        ids = _pages.check_page_ids(device_page_ids, self.engine.num_device_pages, name="device_page_ids")
        hashes = check_block_hashes(block_hashes)
        if ids.size != len(hashes):
            raise ValueError(
                f"device_page_ids has {ids.size} entries but block_hashes has {len(hashes)}: they pair up one to one"
            )
        _pages.check_unique(ids, name="device_page_ids")
        if len(set(hashes)) != len(hashes):
            raise ValueError("block_hashes repeats a hash: each block goes to one device page")
        return ids, hashes

    def load(self, device_page_ids, block_hashes, *, buffer=None) -> Transfer:
        self._check_open()
        ids, hashes = self._check_pair(device_page_ids, block_hashes)
        if buffer is not None:
            self.engine._check_buffer(buffer)
        if not hashes:
            return completed("h2d", 0, 0)
        if len(hashes) > self.engine.num_host_pages:
            raise ValueError(
                f"a load of {len(hashes)} blocks exceeds the host tier's {self.engine.num_host_pages} slots "
                f"(loads pass through host memory); load in smaller batches or raise host_capacity_bytes"
            )
        t0 = time.perf_counter()
        # Promoting a disk block may evict a host block: never one this load needs.
        protect = {self._host[h] for h in hashes if h in self._host}
        slots = self._slots_for_load(hashes, protect)
        held = len(slots)
        if self.agreement is not None:
            held = self.agreement.min(held)  # refused in one process: refused in all, before any write
        if held < len(hashes):
            self.metrics.refused_loads += 1
            where = " by another process of the TP group" if held < len(slots) else ""
            raise KVLoadRefused(
                f"block_hashes[{held}] ({hashes[held].hex()[:16]}…) is no longer held{where}; "
                f"no device page was written, recompute from block {held}"
            )
        error = None
        try:
            _, transfer = self.engine.h2d(buffer if buffer is not None else self.engine.buffer, slots, ids)
        except Exception as e:
            error = e
        if self.agreement is not None and self.agreement.min(error is None) == 0 and error is None:
            error = RuntimeError("another process of the TP group failed its part of the load")
        if error is not None:
            self.metrics.failed_loads += 1
            self.invalid_pages.update(ids.tolist())
            raise KVLoadFailed(f"loading {ids.size} pages failed: {error}", ids.tolist()) from error
        self.invalid_pages.difference_update(ids.tolist())
        for h in hashes:
            self._host.move_to_end(h)
        self.metrics.blocks_loaded += len(hashes)
        self.metrics.load_bytes += transfer.nbytes
        self.metrics.load_seconds += time.perf_counter() - t0
        return transfer

    def _slots_for_load(self, hashes: list[bytes], protect: set[int]) -> list[int]:
        """Host slots holding the leading `hashes` (stops at the first absent block)."""
        slots = []
        for h in hashes:
            slot = self._host.get(h)
            if slot is None:
                break
            slots.append(slot)
        return slots

    def offload(self, device_page_ids, block_hashes, *, buffer=None) -> Transfer:
        self._check_open()
        ids, hashes = self._check_pair(device_page_ids, block_hashes)
        if buffer is not None:
            self.engine._check_buffer(buffer)
        t0 = time.perf_counter()
        todo = []
        for page, h in zip(ids.tolist(), hashes, strict=True):
            if self._holds(h) is not None:
                self._refresh(h)
            else:
                todo.append((page, h))
        chunk = max(1, self._offload_chunk(len(todo)))
        parts = []
        for start in range(0, len(todo), chunk):
            new_ids, new_slots, new_hashes = [], [], []
            for page, h in todo[start : start + chunk]:
                slot = self._host_slot(protect=set(new_slots))
                if slot is None:
                    self.metrics.dropped_offloads += 1
                    continue
                new_ids.append(page)
                new_slots.append(slot)
                new_hashes.append(h)
            if not new_ids:
                continue
            transfer = self.engine.d2h(new_ids, new_slots, buffer=buffer)
            buffer = None  # bound by the first d2h
            for h, slot in zip(new_hashes, new_slots, strict=True):
                self._host[h] = slot
            self.metrics.blocks_offloaded += len(new_ids)
            self.metrics.offload_bytes += transfer.nbytes
            self._after_offload(new_hashes, new_slots)
            parts.append(transfer)
        self.metrics.offload_seconds += time.perf_counter() - t0
        return combine("d2h", parts)

    def _offload_chunk(self, n: int) -> int:
        """Blocks per engine batch. Host only: one batch; what does not fit is dropped."""
        return n

    def _refresh(self, block_hash: bytes) -> None:
        if block_hash in self._host:
            self._host.move_to_end(block_hash)

    def _after_offload(self, hashes: list[bytes], slots: list[int]) -> None:
        pass

    def reset(self) -> None:
        """Forget every stored block and zero the metrics."""
        self.engine.flush()
        self._host.clear()
        self._free = list(range(self.engine.num_host_pages - 1, -1, -1))
        self.invalid_pages.clear()
        self.metrics = ConnectorMetrics()

    def close(self) -> None:
        """Finish pending transfers; later calls raise."""
        if not self._closed:
            self.engine.flush()
            self._closed = True


class TieredConnector(HostConnector):
    """Host tier backed by a disk tier, write-through.

    Offloaded blocks go to host memory and, at once, to disk. A lookup counts
    blocks held on either; a disk hit is promoted (read, verified) into a host
    slot and then loaded to the device. Blocks that fail verification are
    absent: counted in `metrics.corrupt_blocks`, removed, and a load that
    needed one is refused. When the cache spans processes each process keeps
    its blocks in `disk_directory/process-<index>`.
    """

    def __init__(
        self,
        buffer,
        host_capacity_bytes: int,
        disk_directory,
        disk_capacity_bytes: int,
        *,
        host_memory_kind: str = "pinned_host",
        agreement: GroupAgreement | str | None = "auto",
    ):
        super().__init__(buffer, host_capacity_bytes, host_memory_kind=host_memory_kind, agreement=agreement)
        if spans_processes(buffer):
            # Each process stores its own shards' rows; processes sharing a
            # file system must never write or evict each other's files.
            disk_directory = Path(disk_directory) / f"process-{jax.process_index()}"
        self.disk = DiskTier(
            disk_directory, disk_capacity_bytes, fingerprint=self.fingerprint, row_bytes=self.engine.row_bytes
        )
        self._disk_marks = (self.disk.evictions, self.disk.corrupt)

    @property
    def disk_bytes(self) -> tuple[int, int]:
        return (self.disk.used_bytes, self.disk.capacity_bytes)

    def _sync_disk_counters(self) -> None:
        evictions, corrupt = self.disk.evictions, self.disk.corrupt
        self.metrics.disk_evictions += evictions - self._disk_marks[0]
        self.metrics.corrupt_blocks += corrupt - self._disk_marks[1]
        self._disk_marks = (evictions, corrupt)

    def _holds(self, block_hash: bytes) -> str | None:
        if block_hash in self._host:
            return "host"
        return "disk" if block_hash in self.disk else None

    def _refresh(self, block_hash: bytes) -> None:
        super()._refresh(block_hash)
        self.disk.touch(block_hash)

    def touch(self, block_hashes) -> None:
        hashes = check_block_hashes(block_hashes)
        super().touch(hashes)
        for h in hashes:
            self.disk.touch(h)

    def _slots_for_load(self, hashes: list[bytes], protect: set[int]) -> list[int]:
        """Host slots for the leading held `hashes`, promoting disk blocks into free slots.

        Disk blocks are read in parallel straight into their pool rows. A
        block that fails to read ends the held prefix; blocks after it that
        did read stay promoted (they are valid), the failed ones free their slot.
        """
        slots: list[int] = []
        reads: list[tuple[int, bytes, int]] = []  # (position, hash, slot)
        for i, h in enumerate(hashes):
            slot = self._host.get(h)
            if slot is None:
                if h not in self.disk:
                    break
                slot = self._host_slot(protect)
                if slot is None:
                    break
                protect.add(slot)
                reads.append((i, h, slot))
            slots.append(slot)
        if not reads:
            return slots
        self.engine.flush()  # nothing in flight may read or write the pool rows we fill
        t0 = time.perf_counter()
        errors = self.disk.get_many([(h, self.engine.host_pool[slot]) for _, h, slot in reads])
        first_bad = len(slots)
        for (i, h, slot), error in zip(reads, errors, strict=True):
            if error is None:
                self._host[h] = slot
                self.metrics.blocks_promoted += 1
                self.metrics.disk_read_bytes += self.engine.row_bytes
            else:
                self._free.append(slot)
                first_bad = min(first_bad, i)
        self.metrics.disk_read_seconds += time.perf_counter() - t0
        self._sync_disk_counters()
        return slots[:first_bad]

    def _offload_chunk(self, n: int) -> int:
        # Write-through: a batch larger than the host tier goes to disk in
        # host-sized chunks, each chunk's slots reusable by the next.
        return self.engine.num_host_pages

    def _after_offload(self, hashes: list[bytes], slots: list[int]) -> None:
        self.engine.flush()  # the offload lands in the pool; then write from the rows in place
        t0 = time.perf_counter()
        results = self.disk.put_many([(h, self.engine.host_pool[slot]) for h, slot in zip(hashes, slots, strict=True)])
        for stored in results:
            if isinstance(stored, DiskWriteError):
                self.metrics.dropped_offloads += 1  # the host copy stays; serving goes on
            elif stored:
                self.metrics.disk_write_bytes += self.engine.row_bytes
        self.metrics.disk_write_seconds += time.perf_counter() - t0
        self._sync_disk_counters()

    def lookup(self, block_hashes) -> int:
        n = super().lookup(block_hashes)
        self._sync_disk_counters()
        return n

    def reset(self) -> None:
        """Forget every block, in host memory and on disk, and zero the metrics."""
        super().reset()
        self.disk.clear()
        self._disk_marks = (self.disk.evictions, self.disk.corrupt)

    def close(self) -> None:
        """Finish pending transfers and stop the disk writer threads; later calls raise."""
        super().close()
        self.disk.close()
