"""`OffloadWorker`: the worker side. Executes a `TieredStore`'s plans on the cache it is given.

It keeps no cache. A load takes the cache and returns the new one (the old
one is donated: updated in place); a store reads the cache and returns a
handle. Handles say when the bytes are in place (`is_complete`,
`synchronize`) and what happened (`result()`), which the scheduler side
applies with `complete_load` / `complete_store`.

```
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

import jax

from jaxkv.layout import pages as _pages
from jaxkv.tiers.store import LoadPlan, LoadResult, StorePlan, StoreResult, TieredStore
from jaxkv.transfer.engine import OffloadEngine
from jaxkv.transfer.handle import Transfer, combine, completed

LOAD_CHUNK_BYTES = 8 << 20
"""Row bytes per overlapped chunk of a load from lower tiers, where loads overlap (`OffloadWorker.load_chunk_bytes`).

A chunk is one `get_many` and one H2D: big enough that their fixed costs stay
small (an H2D call costs ~0.1-0.3 ms on XLA:CPU, bench/offload.py), small
enough that reads and copies overlap in a load of a few dozen rows
(bench/disk_load.py measures the whole load against a plain read + device_put).
"""


class LoadHandle(Transfer):
    """A load in flight; `result()` waits and says what happened."""

    def __init__(self, result: LoadResult, transfer: Transfer | None = None):
        t = transfer
        super().__init__("h2d", t.num_pages if t else 0, t.nbytes if t else 0, t._arrays if t else ())
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
        super().__init__("d2h", transfer.num_pages, transfer.nbytes, transfer._arrays, on_complete=None)
        self._transfer = transfer
        self._finish = finish
        self._result: StoreResult | None = None
        self.plan = plan

    def synchronize(self) -> StoreHandle:
        self.result()
        return self

    def result(self) -> StoreResult:
        """Wait for the copy and the writes to lower tiers; the `StoreResult` to hand to `complete_store`."""
        if self._result is None:
            self._transfer.synchronize()
            self._result = self._finish()
            self._arrays = []
        return self._result


class OffloadWorker:
    """Moves pages between one cache layout's devices and a `TieredStore`'s tiers."""

    def __init__(
        self,
        cache,
        store: TieredStore,
        *,
        host_memory_kind: str = "pinned_host",
        d2h_path: str = "auto",
        load_chunk_bytes: int | str | None = "auto",
    ):
        """`cache`: read for its layout only (not kept); `store`: the scheduler side whose plans this executes.

        `load_chunk_bytes`: row bytes per overlapped chunk of a load from lower
        tiers, or None for loads in one piece. "auto": `LOAD_CHUNK_BYTES` where
        the H2D is a DMA (GPU/TPU), one piece on CPU, where the H2D is itself a
        copy by the cores that also read, and overlapping measured 0.87-0.94x
        of one piece (bench/disk_load.py).
        """
        if not isinstance(store, TieredStore):
            raise ValueError(f"store must be a TieredStore, got {type(store).__name__}")
        if load_chunk_bytes == "auto":
            on_cpu = all(d.platform == "cpu" for d in jax.tree.leaves(cache)[0].sharding.device_set)
            load_chunk_bytes = None if on_cpu else LOAD_CHUNK_BYTES
        elif load_chunk_bytes is not None and (
            isinstance(load_chunk_bytes, bool) or not isinstance(load_chunk_bytes, int) or load_chunk_bytes < 1
        ):
            raise ValueError(f"load_chunk_bytes must be a positive int, None or 'auto', got {load_chunk_bytes!r}")
        self.load_chunk_bytes: int | None = load_chunk_bytes
        """Row bytes per overlapped chunk of a load from lower tiers; None: loads in one piece."""
        host = store.host
        rows = {"host_rows": host} if host.backend == "arrays" else {"host_pool": host.pool}
        self.engine = OffloadEngine(cache, host_memory_kind=host_memory_kind, d2h_path=d2h_path, **rows)
        """The engine over the host tier's rows."""
        if self.engine.layout.fingerprint != store.fingerprint:
            raise ValueError("cache's row layout differs from the store's: build both from the same cache")
        self._store = store  # read for its tiers and agreement; plans come from its owner
        self._reader: concurrent.futures.ThreadPoolExecutor | None = None  # an overlapped load's reads

    # -- loads -------------------------------------------------------------
    def load(self, cache, plan: LoadPlan):
        """Execute `plan` on `cache`: returns (the new cache, a `LoadHandle`).

        `cache` is donated when the load writes (status 'loaded' or
        'failed'); when refused it is returned as it was.
        """
        if not isinstance(plan, LoadPlan):
            raise ValueError(f"plan must be a LoadPlan from TieredStore.prepare_load, got {type(plan).__name__}")
        units = self.engine._h2d_units(cache)  # the full check, unless laid out as the last cache that passed it
        # The store knows no page count: check the pages here, before any row moves.
        _pages.check_page_ids(plan.device_pages, self.engine.num_device_pages, name="plan.device_pages")
        t0 = time.perf_counter()
        demoted = self._demote(plan, {})
        chunks = self._chunks(plan)
        if self._store.agreement is None and plan.num_held == len(plan.block_hashes) and len(chunks) > 1:
            return self._load_overlapped(cache, plan, units, chunks, demoted, t0)
        promoted, read = self._promote(plan)
        whole = plan.num_held == len(plan.block_hashes) and all(promoted)
        agreement = self._store.agreement
        ok = agreement.min(int(whole)) if agreement is not None else int(whole)
        if not ok:
            if not whole:
                at = plan.num_held if plan.num_held < len(plan.block_hashes) else promoted.index(False)
                why = f"block_hashes[{at}] ({plan.block_hashes[at].hex()[:16]}…) is no longer held"
            else:
                why = "another process of the TP group cannot serve the whole load"
            error = f"{why}; no device page was written, recompute from there"
            return cache, LoadHandle(LoadResult(plan, "refused", tuple(promoted), error, read=read, demoted=demoted))
        if not plan.block_hashes:
            return cache, LoadHandle(LoadResult(plan, "loaded", (), None, demoted=demoted))
        cache, transfer, error = self._h2d(cache, plan, 0, len(plan.block_hashes), units)
        if agreement is not None and agreement.min(error is None) == 0 and error is None:
            error = "another process of the TP group failed its part of the load"
        status = "loaded" if error is None else "failed"
        nbytes = transfer.nbytes if transfer is not None else 0
        result = LoadResult(plan, status, tuple(promoted), error, nbytes, time.perf_counter() - t0, read, demoted)
        return cache, LoadHandle(result, transfer)

    def _h2d(self, cache, plan: LoadPlan, a: int, b: int, units):
        """H2D of the plan's blocks [a, b): (the new cache, the transfer, None), or (cache, None, the error) when
        the copy itself failed (the pages it targeted are undefined). A ValueError, a bad argument found
        before anything was written, propagates."""
        try:
            cache, transfer = self.engine.h2d(
                cache, list(plan.host_slots[a:b]), list(plan.device_pages[a:b]), _units=units
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

    def _load_overlapped(self, cache, plan: LoadPlan, units, chunks, demoted, t0):
        """`load` of a plan whose blocks were all held at planning time, one process: reads overlap H2Ds.

        Every chunk's rows are read (so every row that arrived is promoted,
        as in the plain path); H2Ds stop at the first chunk with a row missing.
        """
        if self._reader is None:
            self._reader = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="jaxkv-load")
        self.engine.flush()  # nothing in flight may read or write the rows we fill
        promotions = set(plan.promotions)
        reads = [
            self._reader.submit(self._promote, plan, [i for i in range(a, b) if i in promotions], flush=False)
            for a, b in chunks
        ]
        promoted = [True] * plan.num_held
        read: dict[str, list] = {}
        transfers, written, error, refused = [], 0, None, None
        for (a, b), future in zip(chunks, reads, strict=True):
            got, chunk_read = future.result()
            for i in range(a, b):
                promoted[i] = got[i]
            for name, (nbytes, seconds) in chunk_read.items():
                entry = read.setdefault(name, [0, 0.0])
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
            # The units checked at the start describe the cache given, not the one the first H2D returned.
            cache, t, error = self._h2d(cache, plan, a, b, None if written else units)
            if error is None:
                transfers.append(t)
                written += b - a
        read = {name: (nbytes, seconds) for name, (nbytes, seconds) in read.items()}
        if refused is not None:
            return cache, LoadHandle(LoadResult(plan, "refused", tuple(promoted), refused, read=read, demoted=demoted))
        transfer = combine("h2d", transfers)
        status = "loaded" if error is None else "failed"
        result = LoadResult(
            plan, status, tuple(promoted), error, transfer.nbytes, time.perf_counter() - t0, read, demoted
        )
        return cache, LoadHandle(result, transfer)

    def _promote(
        self, plan: LoadPlan, promotions=None, *, flush: bool = True
    ) -> tuple[list[bool], dict[str, tuple[int, float]]]:
        """Read the plan's lower-tier blocks (`promotions`: those indices only) into their host slots.

        Returns per planned block whether its row is there, and per tier (bytes read, seconds).
        """
        promoted = [True] * plan.num_held
        by_tier: dict[str, list[int]] = {}
        for i in plan.promotions if promotions is None else promotions:
            by_tier.setdefault(plan.sources[i], []).append(i)
        if by_tier and flush:
            self.engine.flush()  # nothing in flight may read or write the rows we fill
        read = {}
        host = self._store.host
        for name, idx in by_tier.items():
            t0 = time.perf_counter()
            # The pool rows themselves (numpy), or fresh aligned buffers that become the rows' arrays (arrays).
            rows = [host.row_buffer(plan.host_slots[i]) for i in idx]
            try:
                errors = self._store.tiers[name].get_many(
                    [(plan.block_hashes[i], row) for i, row in zip(idx, rows, strict=True)]
                )
            except Exception as e:  # a tier that fails the whole batch (a lost connection): none of it is read
                errors = [e] * len(idx)
            for i, row, error in zip(idx, rows, errors, strict=True):
                promoted[i] = error is None
                if error is None:
                    host.fill(plan.host_slots[i], row)
            ok = sum(1 for e in errors if e is None)
            read[name] = (ok * self.engine.row_bytes, time.perf_counter() - t0)
        return promoted, read

    # -- stores ------------------------------------------------------------
    def store(self, cache, plan: StorePlan) -> StoreHandle:
        """Execute `plan`: copy its pages of `cache` (read, not donated) into host slots, then to lower tiers.

        The device copy is dispatched now (it reads the cache as it is now);
        the lower-tier writes run when the handle is waited on, or at once
        for every chunk but the last.
        """
        if not isinstance(plan, StorePlan):
            raise ValueError(f"plan must be a StorePlan from TieredStore.prepare_store, got {type(plan).__name__}")
        units = self.engine._check_buffer(cache).copy()
        _pages.check_page_ids(plan.device_pages, self.engine.num_device_pages, name="plan.device_pages")
        t0 = time.perf_counter()
        n = len(plan.block_hashes)
        copied = [False] * n
        written = {name: [None] * n for name in plan.write_to}
        wrote = {name: [0, 0.0] for name in plan.write_to}
        demoted = self._demote(plan, wrote)
        transfer, previous = None, None
        for start, stop in plan.chunks:
            if transfer is not None:  # an earlier chunk: write it through before its slots are reused
                transfer.synchronize()
                self._write_through(plan, range(*previous), copied, written, wrote)
            previous = (start, stop)
            try:
                transfer = self.engine.d2h(
                    units, list(plan.device_pages[start:stop]), list(plan.host_slots[start:stop])
                )
            except Exception:
                transfer = None
                continue
            for i in range(start, stop):
                copied[i] = True
        last = range(*plan.chunks[-1])
        nbytes = sum(copied) * self.engine.row_bytes

        def finish() -> StoreResult:
            self._write_through(plan, last, copied, written, wrote)
            return StoreResult(
                plan,
                tuple(copied),
                {name: tuple(a) for name, a in written.items()},
                nbytes,
                time.perf_counter() - t0,
                {name: (b, s) for name, (b, s) in wrote.items()},
                demoted,
            )

        return StoreHandle(plan, transfer if transfer is not None else completed("d2h", 0, 0), finish)

    def _write_through(self, plan: StorePlan, idx: range, copied, written, wrote) -> None:
        items = [(i, plan.block_hashes[i], self._store.host.row(plan.host_slots[i])) for i in idx if copied[i]]
        if not items or not plan.write_to:
            return
        for name in plan.write_to:
            t0 = time.perf_counter()
            try:
                answers = self._store.tiers[name].put_many([(h, row) for _, h, row in items])
            except Exception as e:  # a tier that fails the whole batch: no block stored there, the others go on
                answers = [e] * len(items)
            for (i, _, _), a in zip(items, answers, strict=True):
                written[name][i] = a
            wrote[name][0] += sum(1 for a in answers if a is True) * self.engine.row_bytes
            wrote[name][1] += time.perf_counter() - t0

    def _demote(self, plan: StorePlan | LoadPlan, wrote) -> tuple:
        """Write-back: hand evicted host rows to the first lower tier before their slots are overwritten.

        Returns the tier's put_many answers, one per `plan.demotions` entry.
        """
        if not plan.demotions or not self._store.lower:
            return ()
        self.engine.flush()
        tier = self._store.lower[0]
        t0 = time.perf_counter()
        try:
            answers = tier.put_many([(h, self._store.host.row(slot)) for h, slot in plan.demotions])
        except Exception as e:
            # A tier that fails the whole batch (a lost connection) answers with the error for each block. Never
            # raise here: a load demotes before the TP group's first agreement, which every process must reach.
            answers = [e] * len(plan.demotions)
        entry = wrote.setdefault(tier.name, [0, 0.0])
        entry[0] += sum(1 for a in answers if a is True) * self.engine.row_bytes
        entry[1] += time.perf_counter() - t0
        return tuple(answers)

    def flush(self) -> None:
        """Wait for every transfer in flight."""
        self.engine.flush()
