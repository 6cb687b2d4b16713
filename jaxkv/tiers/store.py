"""`TieredStore`: the scheduler side of storage outside the device. No arrays.

An ordered list of tiers (host memory first, then any number of `Tier`s:
disk, a remote store, your own) and a policy. It answers lookups and turns
decisions into plain-data plans; an `OffloadWorker` executes the plans on
the cache and hands back results; `complete_load` / `complete_store` apply
them, so an index changes only when the bytes are really there.

```
lookup(hashes)                -> tier name per leading held block
prepare_load(hashes, pages)   -> LoadPlan    (host slots pinned or reserved)
   worker.load(cache, plan)   -> cache, handle;   handle.result() -> LoadResult
complete_load(result)         (promoted rows join the host index, pins drop)
prepare_store(hashes, pages)  -> StorePlan | None  (host slots reserved)
   worker.store(cache, plan)  -> handle;          handle.result() -> StoreResult
complete_store(result)        (stored rows join the host index)
```

Completions may arrive late and in any order: a reserved slot is neither
free nor indexed until its completion, a pinned one is never evicted.

Policy (`TierPolicy`): *write-through* sends every stored block to every
lower tier at once (a block then survives its eviction from host memory and a
restart); without it, lower tiers receive a host block when it is evicted
(write-back). *Promotion* keeps a block read from a lower tier in host
memory after its load; without it the slot is freed.

When the cache spans processes (`jax.distributed`), each process's store
holds its own shards' rows and `lookup` answers the minimum over the TP
group (`GroupAgreement`), so page tables stay identical in every process.
"""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

from jaxkv.layout.fingerprint import RowLayout
from jaxkv.tiers.base import Tier, TierMetrics, check_block_hashes
from jaxkv.tiers.host import HostTier
from jaxkv.transfer.agreement import GroupAgreement


@dataclasses.dataclass(frozen=True)
class TierPolicy:
    """How blocks move between tiers."""

    write_through: bool = True
    """Store every block in every tier at once (True), or hand host blocks down only on eviction (False)."""
    promote_on_load: bool = True
    """Keep a block read from a lower tier in host memory after its load."""


@dataclasses.dataclass(frozen=True)
class LoadPlan:
    """Bring `block_hashes[i]` into device page `device_pages[i]`, from `sources[i]` via host slot `host_slots[i]`.

    Only the leading `num_held` blocks could be planned; a plan with fewer
    than all is refused by the worker (in every process of the group).
    """

    plan_id: int
    block_hashes: tuple[bytes, ...]
    device_pages: tuple[int, ...]
    host_slots: tuple[int, ...]
    """Host slot of each planned block (the first `num_held`)."""
    sources: tuple[str, ...]
    """Name of the tier each planned block is read from."""
    num_held: int
    host: str = "host"
    """Name of the host tier."""
    demotions: tuple[tuple[bytes, int], ...] = ()
    """(block hash, host slot) of evicted host blocks to hand down before promotions overwrite the slots (write-back)."""

    @property
    def promotions(self) -> list[int]:
        """Indices of planned blocks read from a lower tier into their host slot first."""
        return [i for i, s in enumerate(self.sources) if s != self.host]

    def __repr__(self) -> str:
        return f"LoadPlan(#{self.plan_id}, {len(self.block_hashes)} blocks, held {self.num_held}, from {self.sources})"


@dataclasses.dataclass(frozen=True)
class StorePlan:
    """Copy device pages `device_pages[i]` into host slots, then to `write_to` tiers, under `block_hashes[i]`.

    When there are more blocks than host slots to spare, they go through the
    same slots in `chunks` (write-through only): each chunk reaches every
    lower tier before the next one overwrites the slots, and host memory keeps
    the last chunk, which is a full one.
    """

    plan_id: int
    block_hashes: tuple[bytes, ...]
    device_pages: tuple[int, ...]
    host_slots: tuple[int, ...]
    chunks: tuple[tuple[int, int], ...]
    """[start, stop) ranges of blocks copied together, in order."""
    write_to: tuple[str, ...]
    """Lower tiers each block is written to (write-through)."""
    demotions: tuple[tuple[bytes, int], ...] = ()
    """(block hash, host slot) of evicted host blocks to hand down before the slots are overwritten (write-back)."""

    def __repr__(self) -> str:
        return f"StorePlan(#{self.plan_id}, {len(self.block_hashes)} blocks in {len(self.chunks)} chunks, to {self.write_to})"


@dataclasses.dataclass(frozen=True)
class LoadResult:
    """What a load did. `status`: 'loaded' (every block), 'refused' (nothing written) or 'failed' (pages undefined)."""

    plan: LoadPlan
    status: str
    promoted: tuple[bool, ...] = ()
    """Per planned block: its row is in its host slot (always True for host-served blocks)."""
    error: str | None = None
    nbytes: int = 0
    """Page bytes written to the device."""
    seconds: float = 0.0
    read: dict[str, tuple[int, float]] = dataclasses.field(default_factory=dict)
    """Per lower tier: (bytes read into host memory, seconds)."""
    demoted: tuple[bool | Exception, ...] = ()
    """Per `plan.demotions` entry: the first lower tier's put_many answer."""

    @property
    def failed_pages(self) -> list[int]:
        """Device pages whose bytes are undefined (a failed load's targets)."""
        return list(self.plan.device_pages) if self.status == "failed" else []


@dataclasses.dataclass(frozen=True)
class StoreResult:
    """What a store did, per block."""

    plan: StorePlan
    copied: tuple[bool, ...]
    """Per block: its bytes reached host memory (the D2H succeeded)."""
    written: dict[str, tuple[bool | Exception, ...]] = dataclasses.field(default_factory=dict)
    """Per lower tier, per block: put_many's answer (True stored, False already held, or the error)."""
    nbytes: int = 0
    seconds: float = 0.0
    wrote: dict[str, tuple[int, float]] = dataclasses.field(default_factory=dict)
    """Per lower tier: (bytes written, seconds)."""
    demoted: tuple[bool | Exception, ...] = ()
    """Per `plan.demotions` entry: the first lower tier's put_many answer."""


@dataclasses.dataclass
class StoreMetrics:
    """Counters of a `TieredStore` since construction or `reset()`; per tier under its name."""

    tiers: dict[str, TierMetrics]
    lookups: int = 0
    misses: int = 0
    """Lookups that stopped at an absent block (at most one per lookup)."""
    loads: int = 0
    refused_loads: int = 0
    failed_loads: int = 0
    load_bytes: int = 0
    load_seconds: float = 0.0
    stores: int = 0
    offload_bytes: int = 0
    offload_seconds: float = 0.0
    dropped_offloads: int = 0
    """Blocks a store could not keep anywhere (no slot free, or every write failed)."""

    def __getitem__(self, tier: str) -> TierMetrics:
        return self.tiers[tier]


class TieredStore:
    """Tiers in order (host first), their indexes, and the plans that move blocks between them."""

    def __init__(
        self,
        layout: RowLayout,
        tiers: list[Tier],
        *,
        policy: TierPolicy | None = None,
        agreement: GroupAgreement | None = None,
    ):
        """`layout`: the cache's `RowLayout` (`RowLayout.of(cache)`); `tiers`: a `HostTier`, then lower tiers.

        `agreement`: the TP group's `GroupAgreement` when the cache spans
        processes (`GroupAgreement.for_cache(cache)`), else None.
        """
        if not isinstance(layout, RowLayout):
            raise ValueError(f"layout must be a RowLayout (RowLayout.of(cache)), got {type(layout).__name__}")
        tiers = list(tiers)
        if not tiers or not isinstance(tiers[0], HostTier):
            first = type(tiers[0]).__name__ if tiers else "nothing"
            raise ValueError(f"tiers[0] must be a HostTier (rows reach the device through host memory), got {first}")
        for i, t in enumerate(tiers[1:], 1):
            if isinstance(t, HostTier):
                raise ValueError(f"tiers[{i}] is a second HostTier; host memory is tiers[0] only")
            if not isinstance(t, Tier):
                raise ValueError(f"tiers[{i}] ({type(t).__name__}) does not implement the Tier protocol")
        names = [t.name for t in tiers]
        if len(set(names)) != len(names) or "device" in names:
            raise ValueError(f"tier names must be unique and not 'device', got {names}")
        self.policy = policy or TierPolicy()
        if not isinstance(self.policy, TierPolicy):
            raise ValueError(f"policy must be a TierPolicy, got {type(self.policy).__name__}")
        self.layout = layout
        self.fingerprint = layout.fingerprint
        """The layout fingerprint every stored block carries."""
        self.agreement = agreement
        self.host: HostTier = tiers[0]
        self.lower: list[Tier] = tiers[1:]
        for t in tiers:
            t.open(layout)
        self.tiers = {t.name: t for t in tiers}
        """Tiers by name, in order."""
        self._ids = itertools.count()
        self._marks = {name: (0, 0) for name in self.tiers}
        self.metrics = StoreMetrics({name: TierMetrics() for name in self.tiers})
        self._closed = False

    @classmethod
    def for_cache(
        cls,
        cache,
        host_capacity_bytes: int,
        *,
        disk_directory=None,
        disk_capacity_bytes: int | None = None,
        tiers: list[Tier] = (),
        policy: TierPolicy | None = None,
        agreement: GroupAgreement | str | None = "auto",
        host_backend: str = "auto",
    ) -> TieredStore:
        """The usual composition for `cache` (read for its layout only, not kept).

        Host memory of `host_capacity_bytes`, then a `DiskTier` in
        `disk_directory` of `disk_capacity_bytes` if given, then `tiers`.
        When the cache spans processes each process keeps its disk blocks in
        `disk_directory/process-<index>` (processes sharing a file system never
        touch each other's files), and `agreement="auto"` builds the TP
        group's `GroupAgreement` (None, at no cost, in one process).
        `host_backend`: the `HostTier`'s backend ("auto", "numpy", "arrays").
        """
        from jaxkv.tiers.disk import DiskTier
        from jaxkv.transfer.agreement import spans_processes

        chain: list[Tier] = [HostTier(host_capacity_bytes, backend=host_backend)]
        if disk_directory is not None:
            if disk_capacity_bytes is None:
                raise ValueError("disk_capacity_bytes is required with disk_directory")
            if spans_processes(cache):
                import jax

                disk_directory = Path(disk_directory) / f"process-{jax.process_index()}"
            chain.append(DiskTier(disk_directory, disk_capacity_bytes))
        elif disk_capacity_bytes is not None:
            raise ValueError("disk_capacity_bytes needs a disk_directory")
        chain += list(tiers)
        if isinstance(agreement, str) and agreement == "auto":
            agreement = GroupAgreement.for_cache(cache)
        elif agreement is not None and not isinstance(agreement, GroupAgreement):
            raise ValueError(f"agreement must be 'auto', None or a GroupAgreement, got {agreement!r}")
        return cls(RowLayout.of(cache), chain, policy=policy, agreement=agreement)

    # -- queries -----------------------------------------------------------
    @property
    def tier_names(self) -> list[str]:
        """Tier names in order, host first."""
        return list(self.tiers)

    def where(self, block_hash: bytes) -> str | None:
        """The first tier holding `block_hash`, or None."""
        return self._where_many([block_hash])[0]

    def _where_many(self, hashes: list[bytes], tiers=None) -> list[str | None]:
        """`where` for several blocks, tier by tier in order, each asked only about blocks not found above it.

        A tier with the optional `contains_many` (a remote one) answers for all
        of them at once, in one round trip, instead of one `in` per block.
        """
        tiers = list(self.tiers.values()) if tiers is None else tiers
        found: list[str | None] = [None] * len(hashes)
        todo = list(range(len(hashes)))
        for tier in tiers:
            if not todo:
                break
            asked = [hashes[i] for i in todo]
            many = getattr(tier, "contains_many", None)
            held = many(asked) if many is not None else [h in tier for h in asked]
            for i, yes in zip(todo, held, strict=True):
                if yes:
                    found[i] = tier.name
            todo = [i for i, yes in zip(todo, held, strict=True) if not yes]
        return found

    def lookup(self, block_hashes) -> list[str]:
        """The tier serving each leading held block (advisory: nothing is reserved).

        Across processes the answer's length is the minimum over the TP group.
        """
        self._check_open()
        hashes = check_block_hashes(block_hashes)
        found = []
        for name in self._where_many(hashes):
            if name is None:
                break
            found.append(name)
        n = len(found)
        if self.agreement is not None:
            n = self.agreement.min(n)  # a block counts only if every process holds its shards
        self.metrics.lookups += 1
        for name in found[:n]:
            self.metrics.tiers[name].hits += 1
        if n < len(hashes):
            self.metrics.misses += 1
        self._sync_counters()
        return found[:n]

    def touch(self, block_hashes) -> None:
        """The scheduler served these from the device: refresh them in every tier that holds them."""
        self._check_open()
        hashes = check_block_hashes(block_hashes)
        for tier in self.tiers.values():
            tier.touch(hashes)

    # -- loads -------------------------------------------------------------
    def prepare_load(self, block_hashes, device_pages) -> LoadPlan:
        """Plan loading `block_hashes` into `device_pages` (pairwise). Never raises for absent blocks.

        Host-held blocks are pinned; a lower-tier block gets a reserved host
        slot to be promoted into. Planning stops at the first block no tier
        holds (or with no slot to promote into); the worker refuses a plan that
        is not whole, in every process at once.
        """
        self._check_open()
        hashes, pages = self._check_pairs(block_hashes, device_pages)
        if len(hashes) > self.host.num_slots:
            raise ValueError(
                f"a load of {len(hashes)} blocks exceeds the host tier's {self.host.num_slots} slots "
                f"(loads pass through host memory); load in smaller batches or raise its capacity_bytes"
            )
        protect = {s for h in hashes if (s := self.host.slot_of(h)) is not None}
        elsewhere = [h for h in hashes if self.host.slot_of(h) is None]
        below = dict(zip(elsewhere, self._where_many(elsewhere, self.lower), strict=True))
        slots, sources, demotions = [], [], []
        for h in hashes:
            slot = self.host.slot_of(h)
            source = self.host.name
            if slot is None:
                source = below[h]
                slot = self._reserve(protect, demotions) if source is not None else None
                if slot is None:
                    break
                protect.add(slot)
            else:
                self.host.pin(slot)
            slots.append(slot)
            sources.append(source)
        return LoadPlan(
            next(self._ids),
            tuple(hashes),
            tuple(pages),
            tuple(slots),
            tuple(sources),
            len(slots),
            self.host.name,
            tuple(demotions),
        )

    def cancel_load(self, plan: LoadPlan) -> None:
        """Drop a plan that will never run (its request went away first): its pins and reserved slots are freed.

        Nothing is counted: no load happened. Across processes every process cancels the same plans.
        """
        if not isinstance(plan, LoadPlan):
            raise ValueError(f"plan must be a LoadPlan, got {type(plan).__name__}")
        for slot, source in zip(plan.host_slots, plan.sources, strict=False):
            if source == self.host.name:
                self.host.unpin(slot)
            else:
                self.host.release(slot)

    def complete_load(self, result: LoadResult) -> None:
        """Apply a load's outcome: promoted rows join the host index (policy), pins and reservations drop."""
        plan = result.plan
        for i, (h, slot, source) in enumerate(zip(plan.block_hashes, plan.host_slots, plan.sources, strict=False)):
            if source == self.host.name:
                self.host.unpin(slot)
                if result.status == "loaded":
                    self.host.touch([h])
            elif i < len(result.promoted) and result.promoted[i] and self.policy.promote_on_load:
                self.host.commit(h, slot)
            else:
                self.host.release(slot)
        m = self.metrics
        m.loads += 1
        if result.status == "refused":
            m.refused_loads += 1
        elif result.status == "failed":
            m.failed_loads += 1
        else:
            m.load_bytes += result.nbytes
            m.load_seconds += result.seconds
            for source in plan.sources:
                m.tiers[source].blocks_loaded += 1
            m.tiers[self.host.name].bytes_read += result.nbytes
            m.tiers[self.host.name].read_seconds += result.seconds
        for name, (nbytes, seconds) in result.read.items():
            m.tiers[name].bytes_read += nbytes
            m.tiers[name].read_seconds += seconds
        for i in plan.promotions:
            if i >= len(result.promoted) or not result.promoted[i]:
                m.tiers[plan.sources[i]].errors += 1
        stored = self._count_demotions(result.demoted)
        if stored:
            m.tiers[self.lower[0].name].bytes_written += stored * self.layout.row_bytes
        self._sync_counters()

    # -- stores ------------------------------------------------------------
    def prepare_store(self, block_hashes, device_pages) -> StorePlan | None:
        """Plan keeping copies of `device_pages` under `block_hashes` (pairwise); None if nothing to do.

        Blocks any tier already holds are only refreshed. New blocks get
        reserved host slots (evicting least recently used, unpinned rows);
        with write-through and more blocks than slots, they pass through the
        slots in chunks; without it, what does not fit is dropped.
        """
        self._check_open()
        hashes, pages = self._check_pairs(block_hashes, device_pages)
        todo = []
        for h, p, held in zip(hashes, pages, self._where_many(hashes), strict=True):
            if held is not None:
                self.touch([h])
            else:
                todo.append((h, p))
        if not todo:
            return None
        write_through = self.policy.write_through and bool(self.lower)
        want = len(todo) if not write_through else min(len(todo), self.host.num_slots)
        slots, demotions = [], []
        while len(slots) < want:
            slot = self._reserve((), demotions)
            if slot is None:
                break
            slots.append(slot)
        if not slots:
            self.metrics.dropped_offloads += len(todo)
            return None
        if not write_through and len(slots) < len(todo):
            self.metrics.dropped_offloads += len(todo) - len(slots)
            todo = todo[: len(slots)]
        # Chunks of len(slots) blocks, the first one short, so host memory ends up full.
        c, n = len(slots), len(todo)
        first = n - (-(-n // c) - 1) * c
        chunks = ((0, first), *((a, a + c) for a in range(first, n, c)))
        per_block = [slots[i - start] for start, stop in chunks for i in range(start, stop)]
        return StorePlan(
            next(self._ids),
            tuple(h for h, _ in todo),
            tuple(p for _, p in todo),
            tuple(per_block),
            chunks,
            tuple(t.name for t in self.lower) if write_through else (),
            tuple(demotions),
        )

    def _reserve(self, protect, demotions: list[tuple[bytes, int]]) -> int | None:
        """A host slot for arriving bytes; with write-back, the block it evicts joins `demotions`.

        Without write-through the evicted block's only copy is in that slot: the
        worker hands it to the first lower tier before the slot is overwritten.
        """
        demote = not self.policy.write_through and bool(self.lower)
        got = self.host.reserve_evicting(protect, keep_bytes=demote)
        if got is None:
            return None
        slot, evicted = got
        if evicted is not None and demote:
            demotions.append((evicted, slot))
        return slot

    def _count_demotions(self, answers) -> int:
        """Count write-back answers under the first lower tier; returns the blocks newly stored."""
        if not answers or not self.lower:
            return 0
        tm = self.metrics.tiers[self.lower[0].name]
        stored = sum(1 for a in answers if a is True)
        tm.blocks_stored += stored
        tm.errors += sum(1 for a in answers if isinstance(a, Exception))
        return stored

    def complete_store(self, result: StoreResult) -> None:
        """Apply a store's outcome: the last chunk's copied rows join the host index; other slots are freed."""
        plan = result.plan
        n = len(plan.block_hashes)
        last = range(*plan.chunks[-1])
        kept = set()
        for i in last:
            if result.copied[i]:
                self.host.commit(plan.block_hashes[i], plan.host_slots[i])
                kept.add(plan.host_slots[i])
        for slot in set(plan.host_slots) - kept:
            self.host.release(slot)
        m = self.metrics
        m.stores += 1
        m.offload_bytes += result.nbytes
        m.offload_seconds += result.seconds
        host = m.tiers[self.host.name]
        for i in range(n):
            stored_below = any(
                answers[i] is True or answers[i] is False for answers in result.written.values() if i < len(answers)
            )
            if i in last and result.copied[i]:
                host.blocks_stored += 1
            elif not stored_below:
                m.dropped_offloads += 1
        host.bytes_written += result.nbytes
        host.write_seconds += result.seconds
        for name, answers in result.written.items():
            tm = m.tiers[name]
            tm.blocks_stored += sum(1 for a in answers if a is True)
            tm.errors += sum(1 for a in answers if isinstance(a, Exception))
        for name, (nbytes, seconds) in result.wrote.items():
            m.tiers[name].bytes_written += nbytes
            m.tiers[name].write_seconds += seconds
        self._count_demotions(result.demoted)
        self._sync_counters()

    # -- housekeeping ------------------------------------------------------
    def _sync_counters(self) -> None:
        for name, tier in self.tiers.items():
            ev, bad = tier.evictions, tier.corrupt
            ev0, bad0 = self._marks[name]
            self.metrics.tiers[name].evictions += ev - ev0
            self.metrics.tiers[name].corrupt += bad - bad0
            self._marks[name] = (ev, bad)

    def bytes(self) -> dict[str, tuple[int, int]]:
        """Per tier: (used, capacity) bytes."""
        return {name: (t.used_bytes, t.capacity_bytes) for name, t in self.tiers.items()}

    def reset_metrics(self) -> None:
        """Zero every counter (the tiers keep their blocks)."""
        self._sync_counters()
        self.metrics = StoreMetrics({name: TierMetrics() for name in self.tiers})

    def _check_pairs(self, block_hashes, device_pages) -> tuple[list[bytes], list[int]]:
        hashes = check_block_hashes(block_hashes)
        pages = list(device_pages)
        for i, p in enumerate(pages):
            if isinstance(p, bool) or (not isinstance(p, (int,)) and not hasattr(p, "__index__")):
                raise ValueError(f"device_pages[{i}] must be an int, got {type(p).__name__}")
        pages = [int(p) for p in pages]
        if len(pages) != len(hashes):
            raise ValueError(
                f"device_pages has {len(pages)} entries but block_hashes has {len(hashes)}: they pair up one to one"
            )
        if len(set(pages)) != len(pages):
            raise ValueError(f"device_pages repeats a page: {pages}; each block goes to its own page")
        if len(set(hashes)) != len(hashes):
            raise ValueError("block_hashes repeats a hash: each block goes to one device page")
        return hashes, pages

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("TieredStore is closed")

    def close(self) -> None:
        """Close every tier; later calls raise."""
        if not self._closed:
            self._closed = True
            for t in self.tiers.values():
                t.close()

    def __repr__(self) -> str:
        return f"TieredStore({' -> '.join(self.tiers)}, {self.policy})"
