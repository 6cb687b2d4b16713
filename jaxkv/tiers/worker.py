"""`OffloadWorker`: the worker side. Owns the bytes and executes a `TieredStore`'s plans on the cache it is given.

It owns the host rows (`HostTier`), the lower tiers (their files, their
connections) and the transfer engine; the scheduler side (`TieredStore`)
owns none of them and learns what the tiers hold from `spec()` and from the
results of the plans. It keeps no cache. A load takes the cache and returns the new one (the old
one is donated: updated in place); a store reads the cache and returns a
handle. Handles say when the bytes are in place (`is_complete`,
`synchronize`) and what happened (`result()`), which the scheduler side
applies with `complete_load` / `complete_store`.

```
worker = OffloadWorker(cache, [HostTier(1 << 30), DiskTier(path, 64 << 30)])
store = TieredStore(worker.spec(), probe=worker.probe)   # or: store, worker = open_tiers(cache, ...)
cache, handle = worker.load(cache, plan)     # lower-tier rows -> host slots -> device pages
handle = worker.store(cache, plan)           # device pages -> host slots -> lower tiers
store.complete_load(handle.result())
```

A load never writes part of a plan and calls it loaded: a block missing at
planning time, or a row that fails to read (verification, I/O) before any
device page is written, refuses the whole load (nothing written). Reads from
lower tiers overlap the device copies: the plan's blocks go in chunks of about
`LOAD_CHUNK_BYTES`, a reader thread reads chunk after chunk, and each chunk's
H2D is dispatched as soon as its rows are in, threading the donated cache
through. A row that fails to read after earlier chunks were written fails the
load (its pages are undefined, as for a failed copy); the scheduler side
recomputes from the device prefix either way. When the cache spans processes
the load is not overlapped: the group agrees first (refused in one, refused
in all) and after the copy (failed in one, failed in all).
"""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Sequence

import jax

from jaxkv._checks import check_positive_int
from jaxkv.layout import pages as _pages
from jaxkv.layout.buffer import Cache
from jaxkv.layout.fingerprint import RowLayout
from jaxkv.tiers.base import Tier, check_block_hashes
from jaxkv.tiers.blockformat import CorruptBlockError
from jaxkv.tiers.host import HostTier
from jaxkv.tiers.index import StoreSpec, TierSpec
from jaxkv.tiers.store import LoadPlan, LoadResult, StorePlan, StoreResult, TierReport
from jaxkv.transfer.agreement import GroupAgreement
from jaxkv.transfer.engine import OffloadEngine
from jaxkv.transfer.handle import Transfer, combine, completed

LOAD_CHUNK_BYTES = 8 << 20
"""Row bytes per overlapped chunk of a load from lower tiers, where loads overlap (`OffloadWorker.load_chunk_bytes`).

A chunk is one `get_many` and one H2D: big enough that their fixed costs stay
small (docs/benchmarks.md, "Measurements behind the rules", "Engine and worker"), small
enough that reads and copies overlap in a load of a few dozen rows
(bench/disk_load.py measures the whole load against a plain read + device_put).
"""


class LoadHandle(Transfer):
    """A load in flight; `result()` waits and says what happened."""

    def __init__(self, result: LoadResult, transfer: Transfer | None = None):
        t = transfer
        super().__init__("h2d", t.num_pages if t else 0, t.nbytes if t else 0, t.arrays if t else ())
        self._result = result

    @property
    def status(self) -> str:
        """'loaded', 'refused' or 'failed'."""
        return self._result.status

    def result(self) -> LoadResult:
        """Wait for the copy; the `LoadResult` to hand to `complete_load`."""
        self.synchronize()
        return self._result


class StoreHandle(Transfer):
    """A store in flight; `result()` waits, finishes the write-through and says what happened."""

    def __init__(self, plan: StorePlan, transfer: Transfer, finish):
        super().__init__("d2h", transfer.num_pages, transfer.nbytes, transfer.arrays, on_complete=None)
        self._transfer = transfer
        self._finish = finish
        self._result: StoreResult | None = None
        self.plan = plan

    def synchronize(self) -> StoreHandle:
        self.result()
        return self

    def result(self) -> StoreResult:
        """Wait for the copy and the writes to lower tiers; the `StoreResult` to hand to `complete_store`."""
        result = self._result
        if result is None:
            self._transfer.synchronize()
            result = self._result = self._finish()
            self._arrays = []
        return result


class OffloadWorker:
    """Owns host rows, lower tiers and the engine for one cache layout; moves pages as plans say."""

    def __init__(
        self,
        cache: Cache,
        tiers: Sequence[HostTier | Tier],
        *,
        agreement: GroupAgreement | None = None,
        host_memory_kind: str = "pinned_host",
        d2h_path: str = "auto",
        load_chunk_bytes: int | str | None = "auto",
    ):
        """`cache`: read for its layout only (not kept); `tiers`: a `HostTier`, then lower tiers (`Tier`s).

        The worker opens every tier with the cache's row layout (a disk tier
        indexes the blocks already in its directory) and closes them in
        `close()`. `agreement`: the TP group's `GroupAgreement` when the cache
        spans processes (the same one the process's `TieredStore` uses).
        `load_chunk_bytes`: row bytes per overlapped chunk of a load from lower
        tiers, or None for loads in one piece. "auto": `LOAD_CHUNK_BYTES` where
        the H2D is a DMA (GPU/TPU), one piece on CPU, where the H2D is itself a
        copy by the cores that also read, and overlapping loses (docs/benchmarks.md,
        "Measurements behind the rules", "Engine and worker").
        """
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
        if agreement is not None and not isinstance(agreement, GroupAgreement):
            raise ValueError(f"agreement must be None or a GroupAgreement, got {type(agreement).__name__}")
        if load_chunk_bytes == "auto":
            on_cpu = all(d.platform == "cpu" for d in jax.tree.leaves(cache)[0].sharding.device_set)
            load_chunk_bytes = None if on_cpu else LOAD_CHUNK_BYTES
        elif load_chunk_bytes is not None:
            if isinstance(load_chunk_bytes, str):
                raise ValueError(f"load_chunk_bytes must be a positive int, None or 'auto', got {load_chunk_bytes!r}")
            load_chunk_bytes = check_positive_int("load_chunk_bytes", load_chunk_bytes)
        self.load_chunk_bytes: int | None = load_chunk_bytes
        """Row bytes per overlapped chunk of a load from lower tiers; None: loads in one piece."""
        layout = RowLayout.of(cache)
        host: HostTier = tiers[0]
        opened = []
        try:
            for t in tiers:
                t.open(layout)
                opened.append(t)
            arrays = host.backend == "arrays"
            self.engine = OffloadEngine(
                cache,
                host_memory_kind=host_memory_kind,
                d2h_path=d2h_path,
                host_pool=None if arrays else host.pool,
                host_rows=host if arrays else None,
            )
            """The engine over the host tier's rows."""
        except BaseException:
            for t in opened:
                t.close()
            raise
        self.layout = layout
        """What a host row holds."""
        self.host = host
        """The host rows (the bytes of the host tier's slots)."""
        # (Checked above: none of them is a HostTier; the test narrows the type.)
        self.tiers: dict[str, Tier] = {t.name: t for t in tiers[1:] if not isinstance(t, HostTier)}
        """Lower tiers by name, in order."""
        self.agreement = agreement
        self._written_by: dict[int, int] = {}  # host slot -> id of the last plan that wrote its bytes
        for t in self.tiers.values():
            t.take_evicted()  # evictions at open are not news: the blocks held after them are what spec() says
        self._counts = {name: (t.evictions, t.corrupt) for name, t in self.tiers.items()}  # reported so far
        self._corrupt_at_open = {name: t.corrupt for name, t in self.tiers.items()}
        self._reader: concurrent.futures.ThreadPoolExecutor | None = None  # an overlapped load's reads
        self._closed = False

    # -- what the scheduler side learns -------------------------------------
    def spec(self) -> StoreSpec:
        """What a `TieredStore` is built from: the layout, host slots, and each lower tier with what it holds now.

        Plain data (it pickles): send it to a scheduler in another process.
        Asking again changes nothing: a restarted scheduler asks again.
        """
        lower = []
        for t in self.tiers.values():
            held = getattr(t, "held_blocks", None)
            lower.append(
                TierSpec(
                    t.name,
                    int(t.capacity_bytes),
                    int(getattr(t, "block_bytes", self.layout.row_bytes)),
                    bool(getattr(t, "shared", False)),
                    tuple(held()) if held is not None else (),
                    self._corrupt_at_open[t.name],
                )
            )
        return StoreSpec(
            self.layout,
            self.host.name,
            self.host.num_slots,
            self.host.capacity_bytes,
            tuple(lower),
            self.engine.num_device_pages,
        )

    def probe(self, tier: str, block_hashes: Sequence[bytes]) -> list[bool]:
        """Whether lower tier `tier` holds each of `block_hashes` now (one round trip for a remote store).

        `TieredStore(probe=worker.probe)` asks this for blocks a shared tier's
        index does not know. Never raises for an unreachable tier: it answers False.
        """
        if tier not in self.tiers:
            raise ValueError(f"tier {tier!r} is not a lower tier of this worker; it has {list(self.tiers)}")
        hashes = check_block_hashes(block_hashes)
        t = self.tiers[tier]
        many = getattr(t, "contains_many", None)
        try:
            return list(many(hashes)) if many is not None else [h in t for h in hashes]
        except Exception:
            return [False] * len(hashes)

    def bytes(self) -> dict[str, tuple[int, int]]:
        """Per tier: (bytes its blocks occupy now, capacity), as the tiers themselves count them.

        The host tier counts the memory its rows hold (`HostTier.live_bytes`).
        """
        out = {self.host.name: (self.host.live_bytes, self.host.capacity_bytes)}
        for name, t in self.tiers.items():
            out[name] = (t.used_bytes, t.capacity_bytes)
        return out

    # -- loads -------------------------------------------------------------
    def load(self, cache: Cache, plan: LoadPlan) -> tuple[Cache, LoadHandle]:
        """Execute `plan` on `cache`: returns (the new cache, a `LoadHandle`).

        `cache` is donated when the load writes (status 'loaded' or
        'failed'); when refused it is returned as it was.
        """
        self._check_open()
        if not isinstance(plan, LoadPlan):
            raise ValueError(f"plan must be a LoadPlan from TieredStore.prepare_load, got {type(plan).__name__}")
        checked = self.engine.check(cache)  # the full check, unless laid out as the last cache that passed it
        # The store knows no page count: check the pages here, before any row moves.
        _pages.check_page_ids(plan.device_pages, self.engine.num_device_pages, name="plan.device_pages")
        if plan.promotions or plan.demotions:  # rows are touched before the engine checks the slots
            self._check_slots(plan.host_slots, "plan.host_slots")
        t0 = time.perf_counter()
        report = _Report()
        self._begin(plan)
        demoted = self._demote(plan, {}, report)
        chunks = self._chunks(plan)
        if self.agreement is None and plan.num_held == len(plan.block_hashes) and len(chunks) > 1:
            return self._load_overlapped(cache, plan, checked, chunks, demoted, report, t0)
        promoted, read = self._promote(plan, report)
        whole = plan.num_held == len(plan.block_hashes) and all(promoted)
        agreement = self.agreement
        ok = agreement.min(int(whole)) if agreement is not None else int(whole)
        if not ok:
            if not whole:
                at = plan.num_held if plan.num_held < len(plan.block_hashes) else promoted.index(False)
                why = f"block_hashes[{at}] ({plan.block_hashes[at].hex()[:16]}…) is no longer held"
            else:
                why = "another process of the TP group cannot serve the whole load"
            error = f"{why}; no device page was written, recompute from there"
            result = LoadResult(
                plan, "refused", tuple(promoted), error, read=read, demoted=demoted, tiers=self._report(report)
            )
            return cache, LoadHandle(result)
        if not plan.block_hashes:
            return cache, LoadHandle(LoadResult(plan, "loaded", (), None, demoted=demoted, tiers=self._report(report)))
        cache, transfer, error = self._h2d(cache, plan, 0, len(plan.block_hashes), checked)
        if agreement is not None and agreement.min(error is None) == 0 and error is None:
            error = "another process of the TP group failed its part of the load"
        status = "loaded" if error is None else "failed"
        nbytes = transfer.nbytes if transfer is not None else 0
        seconds = time.perf_counter() - t0
        result = LoadResult(plan, status, tuple(promoted), error, nbytes, seconds, read, demoted, self._report(report))
        return cache, LoadHandle(result, transfer)

    def _h2d(self, cache, plan: LoadPlan, a: int, b: int, checked):
        """H2D of the plan's blocks [a, b): (the new cache, the transfer, None), or (cache, None, the error) when
        the copy itself failed (the pages it targeted are undefined). A ValueError, a bad argument found
        before anything was written, propagates."""
        try:
            cache, transfer = self.engine.h2d(
                cache, list(plan.host_slots[a:b]), list(plan.device_pages[a:b]), checked=checked
            )
        except ValueError:
            raise
        except Exception as e:
            return cache, None, f"loading {len(plan.device_pages)} pages failed: {e}"
        return cache, transfer, None

    def _chunks(self, plan: LoadPlan) -> list[tuple[int, int]]:
        """The plan's blocks in overlapped chunks (one chunk when nothing is read from a lower tier).

        A power-of-two count of blocks per chunk, so the chunks' H2D programs
        are the engine's page-count buckets, compiled once.
        """
        n = len(plan.block_hashes)
        if not plan.promotions or n < 2 or self.load_chunk_bytes is None:
            return [(0, n)]
        per = 1 << max(0, (self.load_chunk_bytes // self.engine.row_bytes).bit_length() - 1)
        return [(a, min(a + per, n)) for a in range(0, n, per)]

    def _load_overlapped(self, cache, plan: LoadPlan, checked, chunks, demoted, report, t0):
        """`load` of a plan whose blocks were all held at planning time, one process: reads overlap H2Ds.

        Every chunk's rows are read (so every row that arrived is promoted,
        as in the plain path); H2Ds stop at the first chunk with a row missing.
        """
        if self._reader is None:
            self._reader = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="jaxkv-load")
        self.engine.flush()  # nothing in flight may read or write the rows we fill
        promotions = set(plan.promotions)
        reads = [
            self._reader.submit(self._promote, plan, report, [i for i in range(a, b) if i in promotions], flush=False)
            for a, b in chunks
        ]
        promoted = [True] * plan.num_held
        totals: dict[str, list] = {}
        transfers, written, error, refused = [], 0, None, None
        for (a, b), future in zip(chunks, reads, strict=True):
            got, chunk_read = future.result()
            for i in range(a, b):
                promoted[i] = got[i]
            for name, (nbytes, seconds) in chunk_read.items():
                entry = totals.setdefault(name, [0, 0.0])
                entry[0] += nbytes
                entry[1] += seconds
            if error is not None or refused is not None:
                continue  # read on (its rows are promoted), write no more
            if not all(got[a:b]):
                at = a + got[a:b].index(False)
                why = f"block_hashes[{at}] ({plan.block_hashes[at].hex()[:16]}…) could not be read"
                if not written:
                    refused = f"{why}; no device page was written, recompute from there"
                else:
                    error = f"{why} after {written} of {len(plan.device_pages)} pages were written; recompute"
                continue
            # The check made at the start describes the cache given, not the one the first H2D returned.
            cache, t, error = self._h2d(cache, plan, a, b, None if written else checked)
            if error is None:
                transfers.append(t)
                written += b - a
        read = {name: (nbytes, seconds) for name, (nbytes, seconds) in totals.items()}
        if refused is not None:
            result = LoadResult(
                plan, "refused", tuple(promoted), refused, read=read, demoted=demoted, tiers=self._report(report)
            )
            return cache, LoadHandle(result)
        transfer = combine("h2d", transfers)
        status = "loaded" if error is None else "failed"
        seconds = time.perf_counter() - t0
        result = LoadResult(
            plan, status, tuple(promoted), error, transfer.nbytes, seconds, read, demoted, self._report(report)
        )
        return cache, LoadHandle(result, transfer)

    def _promote(
        self, plan: LoadPlan, report: _Report, promotions=None, *, flush: bool = True
    ) -> tuple[list[bool], dict[str, tuple[int, float]]]:
        """Read the plan's lower-tier blocks (`promotions`: those indices only) into their host slots.

        Returns per planned block whether its row is there, and per tier (bytes read, seconds).
        A block a tier no longer has (absent, corrupt) goes into `report`.
        """
        promoted = [True] * plan.num_held
        by_tier: dict[str, list[int]] = {}
        for i in plan.promotions if promotions is None else promotions:
            by_tier.setdefault(plan.sources[i], []).append(i)
        if by_tier and flush:
            self.engine.flush()  # nothing in flight may read or write the rows we fill
        read = {}
        for name, idx in by_tier.items():
            t0 = time.perf_counter()
            # The pool rows themselves (numpy), or fresh aligned buffers that become the rows' arrays (arrays).
            rows = [self.host.row_buffer(plan.host_slots[i]) for i in idx]
            tier = self.tiers.get(name)
            try:
                if tier is None:
                    raise KeyError(f"the plan reads tier {name!r}, which this worker does not have")
                errors = tier.get_many([(plan.block_hashes[i], row) for i, row in zip(idx, rows, strict=True)])
            except Exception as e:  # a tier that fails the whole batch (a lost connection): none of it is read
                errors = [e] * len(idx)
            for i, row, error in zip(idx, rows, errors, strict=True):
                promoted[i] = error is None
                if error is None:
                    self._fill(plan, plan.host_slots[i], row)
                elif tier is not None:
                    report.read_failed(name, plan.block_hashes[i], error)
            ok = sum(1 for e in errors if e is None)
            read[name] = (ok * self.engine.row_bytes, time.perf_counter() - t0)
        return promoted, read

    # -- stores ------------------------------------------------------------
    def store(self, cache: Cache, plan: StorePlan) -> StoreHandle:
        """Execute `plan`: copy its pages of `cache` (read, not donated) into host slots, then to lower tiers.

        The device copy is dispatched now (it reads the cache as it is now);
        the lower-tier writes run when the handle is waited on, or at once
        for every chunk but the last.
        """
        self._check_open()
        if not isinstance(plan, StorePlan):
            raise ValueError(f"plan must be a StorePlan from TieredStore.prepare_store, got {type(plan).__name__}")
        self.engine.check(cache)
        _pages.check_page_ids(plan.device_pages, self.engine.num_device_pages, name="plan.device_pages")
        self._check_slots(plan.host_slots, "plan.host_slots")
        unknown = [name for name in plan.write_to if name not in self.tiers]
        if unknown:
            raise ValueError(
                f"plan.write_to names tiers this worker does not have: {unknown}; it has {list(self.tiers)}"
            )
        t0 = time.perf_counter()
        n = len(plan.block_hashes)
        copied = [False] * n
        written: dict[str, list] = {name: [None] * n for name in plan.write_to}
        wrote = {name: [0, 0.0] for name in plan.write_to}
        report = _Report()
        self._begin(plan)
        demoted = self._demote(plan, wrote, report)
        transfer, previous = None, (0, 0)
        for start, stop in plan.chunks:
            if transfer is not None:  # an earlier chunk: write it through before its slots are reused
                transfer.synchronize()
                self._write_through(plan, range(*previous), copied, written, wrote, report)
            previous = (start, stop)
            slots = list(plan.host_slots[start:stop])
            try:
                transfer = self.engine.d2h(cache, list(plan.device_pages[start:stop]), slots)
            except Exception:
                transfer = None
                for slot in slots:  # whatever the copy left there is not the block's
                    self.host.drop(slot)
                continue
            for slot in slots:
                self._written_by[slot] = plan.plan_id
            for i in range(start, stop):
                copied[i] = True
        last = range(*plan.chunks[-1])
        nbytes = sum(copied) * self.engine.row_bytes

        def finish() -> StoreResult:
            self._write_through(plan, last, copied, written, wrote, report)
            return StoreResult(
                plan,
                tuple(copied),
                {name: tuple(a) for name, a in written.items()},
                nbytes,
                time.perf_counter() - t0,
                {name: (b, s) for name, (b, s) in wrote.items()},
                demoted,
                self._report(report),
            )

        return StoreHandle(plan, transfer if transfer is not None else completed("d2h", 0, 0), finish)

    def _write_through(self, plan: StorePlan, idx: range, copied, written, wrote, report: _Report) -> None:
        items = [(i, plan.block_hashes[i], self.host.row(plan.host_slots[i])) for i in idx if copied[i]]
        if not items or not plan.write_to:
            return
        for name in plan.write_to:
            tier = self.tiers[name]
            t0 = time.perf_counter()
            try:
                answers = tier.put_many([(h, row) for _, h, row in items])
            except Exception as e:  # a tier that fails the whole batch: no block stored there, the others go on
                answers = [e] * len(items)
            for (i, _, _), a in zip(items, answers, strict=True):
                written[name][i] = a
            wrote[name][0] += sum(1 for a in answers if a is True) * self.engine.row_bytes
            wrote[name][1] += time.perf_counter() - t0

    def _demote(self, plan: StorePlan | LoadPlan, wrote, report: _Report) -> tuple:
        """Write-back: hand evicted host rows to the first lower tier before their slots are overwritten.

        Returns the tier's put_many answers, one per `plan.demotions` entry.
        """
        if not plan.demotions or not self.tiers:
            return ()
        self.engine.flush()
        tier = next(iter(self.tiers.values()))
        t0 = time.perf_counter()
        try:
            answers = tier.put_many([(h, self.host.row(slot)) for h, slot in plan.demotions])
        except Exception as e:
            # A tier that fails the whole batch (a lost connection) answers with the error for each block. Never
            # raise here: a load demotes before the TP group's first agreement, which every process must reach.
            answers = [e] * len(plan.demotions)
        entry = wrote.setdefault(tier.name, [0, 0.0])
        entry[0] += sum(1 for a in answers if a is True) * self.engine.row_bytes
        entry[1] += time.perf_counter() - t0
        return tuple(answers)

    # -- host rows ---------------------------------------------------------
    def _begin(self, plan: LoadPlan | StorePlan) -> None:
        """Before a plan runs: refresh the blocks it says are hot, release the rows it says were freed.

        A freed slot is released only if no plan made after the one that freed
        it has written it since (plans may run out of order).
        """
        for name, hashes in plan.touches:
            tier = self.tiers.get(name)
            if tier is not None:
                tier.touch(list(hashes))
        for slot in plan.drops:
            if self._written_by.get(slot, -1) < plan.plan_id:
                self.host.drop(slot)
                self._written_by.pop(slot, None)

    def _fill(self, plan: LoadPlan, slot: int, row) -> None:
        self.host.fill(slot, row)
        self._written_by[slot] = plan.plan_id

    def _check_slots(self, slots, field: str) -> None:
        _pages.check_page_ids(slots, self.host.num_slots, name=field)

    def _report(self, report: _Report) -> TierReport:
        """The plan's report, with what each tier's counters did since the last one (every tier: a shared
        tier's count moves on a probe too)."""
        for name, t in self.tiers.items():
            evictions, corrupt = t.evictions, t.corrupt
            ev0, bad0 = self._counts[name]
            self._counts[name] = (evictions, corrupt)
            report.counted(name, evictions - ev0, corrupt - bad0)
            report.evicted(name, list(t.take_evicted()))
        return report.done()

    # -- housekeeping ------------------------------------------------------
    def flush(self) -> None:
        """Wait for every transfer in flight."""
        self.engine.flush()

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("OffloadWorker is closed")

    def close(self) -> None:
        """Wait for transfers in flight, then close every tier (files, connections) and release host rows."""
        if self._closed:
            return
        self._closed = True
        self.engine.flush()
        if self._reader is not None:
            self._reader.shutdown()
            self._reader = None
        for t in self.tiers.values():
            t.close()
        self.host.close()

    def __repr__(self) -> str:
        chain = " -> ".join([self.host.name, *self.tiers])
        return (
            f"OffloadWorker({chain}, {self.host.num_slots} host rows of {self.engine.row_bytes} B, "
            f"d2h {self.engine.d2h_path}, h2d {self.engine.h2d_path})"
        )


class _Report:
    """What a plan's run saw of the lower tiers; becomes the result's `TierReport`. Thread-safe enough for the
    overlapped load's one reader thread: list appends only."""

    def __init__(self):
        self._evicted: dict[str, list[bytes]] = {}
        self._lost: dict[str, list[bytes]] = {}
        self._evictions: dict[str, int] = {}
        self._corrupt: dict[str, int] = {}

    def evicted(self, tier: str, hashes: list[bytes]) -> None:
        if hashes:
            self._evicted.setdefault(tier, []).extend(hashes)

    def read_failed(self, tier: str, block_hash: bytes, error: Exception) -> None:
        """A read's error: a block absent or corrupt is gone from the tier; an I/O error keeps it."""
        # The Tier protocol: KeyError (not held) and a failed verification (dropped) mean gone.
        if isinstance(error, (KeyError, CorruptBlockError)):
            self._lost.setdefault(tier, []).append(block_hash)

    def counted(self, tier: str, evictions: int, corrupt: int) -> None:
        if evictions:
            self._evictions[tier] = evictions
        if corrupt:
            self._corrupt[tier] = corrupt

    def done(self) -> TierReport:
        return TierReport(
            {k: tuple(v) for k, v in self._evicted.items()},
            {k: tuple(v) for k, v in self._lost.items()},
            dict(self._evictions),
            dict(self._corrupt),
        )
