"""`TieredStore`: the scheduler side of storage outside the device. Indexes only: no arrays, files or sockets.

It knows which block is where (host slots, and what each lower tier holds, as
the worker reported) and a policy. It answers lookups and turns decisions
into plain-data plans; an `OffloadWorker`, which owns the bytes (host rows,
the lower tiers' files and connections, the transfer engine), executes the
plans on the cache and hands back results; `complete_load` /
`complete_store` apply them, so an index changes only when the bytes are
really there. Spec, plans and results pickle: the two sides may run in
different processes (a serving engine's scheduler and its workers).

```
store = TieredStore(worker.spec())    # the worker opened the tiers and says what they hold
lookup(hashes)                -> tier name per leading held block
prepare_load(hashes, pages)   -> LoadPlan    (host slots pinned or reserved)
   worker.load(cache, plan)   -> cache, handle;   handle.result() -> LoadResult
complete_load(result)         (promoted rows join the host index, pins drop, lost blocks leave the indexes)
prepare_store(hashes, pages)  -> StorePlan | None  (host slots reserved)
   worker.store(cache, plan)  -> handle;          handle.result() -> StoreResult
complete_store(result)        (stored rows join the host and tier indexes, evicted ones leave)
```

Completions may arrive late and in any order: a reserved slot is neither
free nor indexed until its completion, a pinned one is never evicted. Each
plan completes once (or is cancelled): a second completion raises.

Policy (`TierPolicy`): *write-through* sends every stored block to every
lower tier at once (a block then survives its eviction from host memory and a
restart); without it, lower tiers receive a host block when it is evicted
(write-back). *Promotion* keeps a block read from a lower tier in host
memory after its load; without it the slot is freed.

A lower tier's index holds what the worker reported: what it found when it
opened the tier (a warm restart), what it stored since, minus what it
reported evicted, corrupt or gone. A *shared* tier (a remote store other
instances write) holds more than that: give the store a `probe` (in one
process, `worker.probe`; across processes, a call to the worker) and lookups
ask it about blocks the index does not know.

When the cache spans processes (`jax.distributed`), each process runs its own
store and worker over its own shards' rows, and `lookup` answers the minimum
over the TP group (`GroupAgreement`), so page tables stay identical in every
process.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Sequence

from jaxkv.tiers.base import TierMetrics, check_block_hashes
from jaxkv.tiers.index import HostIndex, StoreSpec, TierIndex
from jaxkv.transfer.agreement import GroupAgreement

Probe = Callable[[str, list[bytes]], Sequence[bool]]
"""`probe(tier_name, block_hashes) -> [held, ...]`: asks the worker whether a shared tier holds blocks."""


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
    """(block hash, host slot) of evicted host blocks to hand down before promotions overwrite them (write-back)."""
    touches: tuple[tuple[str, tuple[bytes, ...]], ...] = ()
    """(lower tier, block hashes) the scheduler found hot since the last plan: the worker refreshes them there."""
    drops: tuple[int, ...] = ()
    """Host slots freed before this plan was made: the worker may release their rows' memory."""

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
    touches: tuple[tuple[str, tuple[bytes, ...]], ...] = ()
    """(lower tier, block hashes) the scheduler found hot since the last plan: the worker refreshes them there."""
    drops: tuple[int, ...] = ()
    """Host slots freed before this plan was made: the worker may release their rows' memory."""

    def __repr__(self) -> str:
        n, chunks = len(self.block_hashes), len(self.chunks)
        return f"StorePlan(#{self.plan_id}, {n} blocks in {chunks} chunks, to {self.write_to})"


@dataclasses.dataclass(frozen=True)
class TierReport:
    """What the worker saw of the lower tiers while it ran a plan; the scheduler's indexes follow it."""

    evicted: dict[str, tuple[bytes, ...]] = dataclasses.field(default_factory=dict)
    """Per tier: blocks it dropped to make room."""
    lost: dict[str, tuple[bytes, ...]] = dataclasses.field(default_factory=dict)
    """Per tier: blocks a read found absent or corrupt (no longer held there)."""
    evictions: dict[str, int] = dataclasses.field(default_factory=dict)
    """Per tier: how much its `evictions` counter grew."""
    corrupt: dict[str, int] = dataclasses.field(default_factory=dict)
    """Per tier: how much its `corrupt` counter grew (blocks that failed verification and were dropped)."""


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
    tiers: TierReport = dataclasses.field(default_factory=TierReport)
    """Evictions, losses and corruption the worker saw in lower tiers."""

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
    tiers: TierReport = dataclasses.field(default_factory=TierReport)
    """Evictions the worker saw in lower tiers while writing."""


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
    """Which block is where (host slots first, then each lower tier), and the plans that move blocks."""

    def __init__(
        self,
        spec: StoreSpec,
        *,
        policy: TierPolicy | None = None,
        agreement: GroupAgreement | None = None,
        probe: Probe | None = None,
    ):
        """`spec`: what the worker opened (`OffloadWorker.spec()`), plain data.

        `agreement`: the TP group's `GroupAgreement` when the cache spans
        processes (each process runs its own store and worker), else None.
        `probe`: asks the worker whether a shared tier holds blocks its index
        does not know (`OffloadWorker.probe` in one process); None: the index
        alone answers.
        """
        if not isinstance(spec, StoreSpec):
            raise ValueError(f"spec must be a StoreSpec (OffloadWorker.spec()), got {type(spec).__name__}")
        self.policy = policy or TierPolicy()
        if not isinstance(self.policy, TierPolicy):
            raise ValueError(f"policy must be a TierPolicy, got {type(self.policy).__name__}")
        if agreement is not None and not isinstance(agreement, GroupAgreement):
            raise ValueError(f"agreement must be None or a GroupAgreement, got {type(agreement).__name__}")
        if probe is not None and not callable(probe):
            raise ValueError(f"probe must be callable (tier name, block hashes) -> [bool], got {probe!r}")
        self.spec = spec
        self.layout = spec.layout
        self.fingerprint = spec.layout.fingerprint
        """The layout fingerprint every stored block carries."""
        self.agreement = agreement
        self.probe = probe
        self.host = HostIndex(spec.host_slots, spec.layout.row_bytes, name=spec.host_name)
        """Host slots: which block each holds, pins, reservations."""
        self.lower: dict[str, TierIndex] = {t.name: TierIndex(t) for t in spec.lower}
        """Lower tiers' indexes by name, in lookup order."""
        self._ids = itertools.count()
        self._outstanding: set[int] = set()  # plans prepared and not yet completed or cancelled
        self._touches: dict[str, dict[bytes, None]] = {name: {} for name in self.lower}
        self._host_evictions = 0
        self.metrics = self._fresh_metrics()
        for t in spec.lower:
            self.metrics.tiers[t.name].corrupt += t.corrupt
        self._closed = False

    # -- queries -----------------------------------------------------------
    @property
    def tier_names(self) -> list[str]:
        """Tier names in order, host first."""
        return self.spec.tier_names

    def where(self, block_hash: bytes) -> str | None:
        """The first tier holding `block_hash`, or None."""
        return self._where_many([block_hash])[0]

    def _where_many(self, hashes: list[bytes], *, host: bool = True) -> list[str | None]:
        """`where` for several blocks, tier by tier in order, each asked only about blocks not found above it.

        A shared tier with a probe is asked through it, in one call per tier:
        other instances add and the server evicts blocks its index cannot see,
        so the probe's answer is the truth and the index follows it.
        """
        found: list[str | None] = [None] * len(hashes)
        todo = list(range(len(hashes)))
        if host:
            for i in todo:
                if hashes[i] in self.host:
                    found[i] = self.host.name
            todo = [i for i in todo if found[i] is None]
        for name, index in self.lower.items():
            if not todo:
                break
            if index.shared and self.probe is not None:
                asked = [hashes[i] for i in todo]
                try:
                    held = [bool(a) for a in self.probe(name, asked)]
                except Exception:  # an unreachable worker or store is a miss, never an error to the scheduler
                    held = [False] * len(asked)
                if len(held) != len(asked):
                    raise ValueError(f"probe answered {len(held)} times for {len(asked)} blocks of tier {name!r}")
                index.add(h for h, yes in zip(asked, held, strict=True) if yes)
                index.discard(h for h, yes in zip(asked, held, strict=True) if not yes)
            else:
                held = [hashes[i] in index for i in todo]
            for i, yes in zip(todo, held, strict=True):
                if yes:
                    found[i] = name
            todo = [i for i, yes in zip(todo, held, strict=True) if not yes]
        return found

    def lookup(self, block_hashes: Sequence[bytes]) -> list[str]:
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
        return found[:n]

    def touch(self, block_hashes: Sequence[bytes]) -> None:
        """The scheduler served these from the device: refresh them in every tier that holds them.

        Host recency changes now; lower tiers hear of it with the next plan.
        """
        self._check_open()
        hashes = check_block_hashes(block_hashes)
        self.host.touch(hashes)
        for name, index in self.lower.items():
            pending = self._touches[name]
            for h in hashes:
                if h in index:
                    pending.pop(h, None)
                    pending[h] = None

    # -- loads -------------------------------------------------------------
    def prepare_load(self, block_hashes: Sequence[bytes], device_pages: Sequence[int]) -> LoadPlan:
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
        below = dict(zip(elsewhere, self._where_many(elsewhere, host=False), strict=True))
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
        plan_id = self._next_id()
        return LoadPlan(
            plan_id,
            tuple(hashes),
            tuple(pages),
            tuple(slots),
            tuple(sources),
            len(slots),
            self.host.name,
            tuple(demotions),
            self._take_touches(),
            self.host.take_dropped(),
        )

    def cancel_load(self, plan: LoadPlan) -> None:
        """Drop a plan that will never run (its request went away first): its pins and reserved slots are freed.

        Nothing is counted: no load happened. Across processes every process cancels the same plans.
        """
        if not isinstance(plan, LoadPlan):
            raise ValueError(f"plan must be a LoadPlan, got {type(plan).__name__}")
        self._settle(plan, "cancel_load")
        for slot, source in zip(plan.host_slots, plan.sources, strict=False):
            if source == self.host.name:
                self.host.unpin(slot)
            else:
                self.host.release(slot)

    def complete_load(self, result: LoadResult) -> None:
        """Apply a load's outcome: promoted rows join the host index (policy), pins and reservations drop.

        Blocks the worker found gone or corrupt leave their tier's index.
        """
        if not isinstance(result, LoadResult):
            raise ValueError(f"result must be a LoadResult from a worker's load, got {type(result).__name__}")
        plan = result.plan
        self._settle(plan, "complete_load")
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
        self._apply_demotions(plan, result.demoted, count_bytes=True)
        self._apply_report(result.tiers)
        self._count_host_evictions()

    # -- stores ------------------------------------------------------------
    def prepare_store(self, block_hashes: Sequence[bytes], device_pages: Sequence[int]) -> StorePlan | None:
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
        slots: list[int] = []
        demotions: list[tuple[bytes, int]] = []
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
            self._next_id(),
            tuple(h for h, _ in todo),
            tuple(p for _, p in todo),
            tuple(per_block),
            chunks,
            tuple(self.lower) if write_through else (),
            tuple(demotions),
            self._take_touches(),
            self.host.take_dropped(),
        )

    def cancel_store(self, plan: StorePlan) -> None:
        """Drop a store plan that did not run (`worker.store` raised, or its pages went away): its slots are freed.

        Nothing is counted and nothing is indexed.
        """
        if not isinstance(plan, StorePlan):
            raise ValueError(f"plan must be a StorePlan, got {type(plan).__name__}")
        self._settle(plan, "cancel_store")
        for slot in set(plan.host_slots):
            self.host.release(slot)

    def _reserve(self, protect, demotions: list[tuple[bytes, int]]) -> int | None:
        """A host slot for arriving bytes; with write-back, the block it evicts joins `demotions`.

        Without write-through the evicted block's only copy is in that slot: the
        worker hands it to the first lower tier before the slot is overwritten.
        """
        got = self.host.reserve_evicting(protect)
        if got is None:
            return None
        slot, evicted = got
        if evicted is not None and not self.policy.write_through and self.lower:
            demotions.append((evicted, slot))
        return slot

    def complete_store(self, result: StoreResult) -> None:
        """Apply a store's outcome: the last chunk's copied rows join the host index; other slots are freed.

        Blocks a lower tier stored (or already held) join its index; blocks it evicted leave it.
        """
        if not isinstance(result, StoreResult):
            raise ValueError(f"result must be a StoreResult from a worker's store, got {type(result).__name__}")
        plan = result.plan
        self._settle(plan, "complete_store")
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
            self.lower[name].add(h for h, a in zip(plan.block_hashes, answers, strict=False) if a is True or a is False)
        for name, (nbytes, seconds) in result.wrote.items():
            m.tiers[name].bytes_written += nbytes
            m.tiers[name].write_seconds += seconds
        self._apply_demotions(plan, result.demoted)
        self._apply_report(result.tiers)
        self._count_host_evictions()

    # -- applying reports ---------------------------------------------------
    def _apply_demotions(self, plan: LoadPlan | StorePlan, answers, *, count_bytes: bool = False) -> None:
        """Write-back answers: blocks the first lower tier took join its index, counted there.

        `count_bytes`: a load's (a store's result counts demoted bytes in `wrote`).
        """
        if not answers or not self.lower:
            return
        name = next(iter(self.lower))
        tm = self.metrics.tiers[name]
        stored = sum(1 for a in answers if a is True)
        tm.blocks_stored += stored
        tm.errors += sum(1 for a in answers if isinstance(a, Exception))
        if count_bytes:
            tm.bytes_written += stored * self.layout.row_bytes
        held = [h for (h, _), a in zip(plan.demotions, answers, strict=False) if a is True or a is False]
        self.lower[name].add(held)

    def _apply_report(self, report: TierReport) -> None:
        for name, hashes in report.evicted.items():
            self.lower[name].discard(hashes)
        for name, count in report.evictions.items():
            self.metrics.tiers[name].evictions += count
        for name, hashes in report.lost.items():
            self.lower[name].discard(hashes)
        for name, count in report.corrupt.items():
            self.metrics.tiers[name].corrupt += count

    def _count_host_evictions(self) -> None:
        ev = self.host.evictions
        self.metrics.tiers[self.host.name].evictions += ev - self._host_evictions
        self._host_evictions = ev

    # -- housekeeping ------------------------------------------------------
    def _next_id(self) -> int:
        plan_id = next(self._ids)
        self._outstanding.add(plan_id)
        return plan_id

    def _settle(self, plan: LoadPlan | StorePlan, what: str) -> None:
        """Mark a plan done; a plan completed, cancelled or never prepared here raises (nothing changes)."""
        if plan.plan_id not in self._outstanding:
            raise ValueError(
                f"{what}: plan #{plan.plan_id} is not outstanding in this store (already completed or "
                f"cancelled, or prepared by another store); apply each result once"
            )
        self._outstanding.remove(plan.plan_id)

    def _take_touches(self) -> tuple[tuple[str, tuple[bytes, ...]], ...]:
        touches = tuple((name, tuple(hashes)) for name, hashes in self._touches.items() if hashes)
        for hashes in self._touches.values():
            hashes.clear()
        return touches

    @property
    def outstanding(self) -> int:
        """Plans prepared and not yet completed or cancelled."""
        return len(self._outstanding)

    def bytes(self) -> dict[str, tuple[int, int]]:
        """Per tier: (used, capacity) bytes, as the indexes know them."""
        out = {self.host.name: (self.host.used_bytes, self.spec.host_capacity_bytes)}
        for t in self.spec.lower:
            out[t.name] = (self.lower[t.name].used_bytes, t.capacity_bytes)
        return out

    def _fresh_metrics(self) -> StoreMetrics:
        return StoreMetrics({name: TierMetrics() for name in self.tier_names})

    def reset_metrics(self) -> None:
        """Zero every counter (the tiers keep their blocks)."""
        self._count_host_evictions()
        self.metrics = self._fresh_metrics()

    def _check_pairs(self, block_hashes, device_pages) -> tuple[list[bytes], list[int]]:
        hashes = check_block_hashes(block_hashes)
        pages = list(device_pages)
        for i, p in enumerate(pages):
            if isinstance(p, bool) or (not isinstance(p, (int,)) and not hasattr(p, "__index__")):
                raise ValueError(f"device_pages[{i}] must be an int, got {type(p).__name__}")
        pages = [int(p) for p in pages]
        limit = self.spec.num_device_pages
        for i, p in enumerate(pages):
            if p < 0 or (limit is not None and p >= limit):
                have = "" if limit is None else f": the cache has pages 0..{limit - 1}"
                raise ValueError(f"device_pages[{i}] = {p} is not a page of the cache{have}")
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
        """Refuse later calls (the tiers themselves are the worker's to close)."""
        self._closed = True

    def __repr__(self) -> str:
        return f"TieredStore({' -> '.join(self.tier_names)}, {self.policy})"
