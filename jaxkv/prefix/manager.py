"""`PagedKVCacheManager`: which pages each request uses, and which it can reuse.

Scheduler side: plain Python bookkeeping, no arrays. One scheduler step, for
a new request:

1. hash the prompt's full blocks (all tokens but the last: at least one token
   is always computed, so the model produces the next-token logits);
2. find the longest prefix already on the device (`BlockPool` hash index);
3. ask the `TieredStore` which tier holds each of the next blocks;
4. allocate pages for the whole prompt, or raise `InsufficientPagesError`
   with nothing changed;
5. plan the load of the outside blocks into their new pages (`Request.load`);
6. return the request with its page table and how many tokens are cached.

The worker executes the load (`OffloadWorker.load(cache, request.load)`) and
`complete_load(result)` applies it: the loaded blocks join the device prefix
cache, or, if the load was refused or failed, the request recomputes from its
device prefix (`num_cached_tokens` drops). Then, as the model writes K/V:
`commit(request_id, num_computed_tokens)` indexes each newly full block and
returns the `StorePlan` that offloads it; `complete_store` applies the
store's result. `append_tokens` grows a decoding request; `finish` releases
its pages, tail first, which stay reusable until their pages are needed.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxkv._checks import check_positive_int
from jaxkv.layout.fingerprint import RowLayout
from jaxkv.layout.params import KVCacheParams
from jaxkv.prefix.hashing import hash_blocks, root_hash
from jaxkv.prefix.pool import NULL_PAGE, BlockPool, InsufficientPagesError
from jaxkv.tiers.store import LoadPlan, LoadResult, StorePlan, StoreResult, TieredStore

DEVICE = "device"
"""The key of device-served tokens in `tokens_from` (tiers use their own names)."""


@dataclasses.dataclass
class ManagerMetrics:
    """Token and page accounting since construction."""

    requests: int = 0
    prompt_tokens: int = 0
    tokens_from: dict[str, int] = dataclasses.field(default_factory=dict)
    """Prompt tokens served per source: 'device', then each tier by name."""
    tokens_recomputed: int = 0
    loads_refused: int = 0
    loads_failed: int = 0
    blocks_committed: int = 0
    blocks_offloaded: int = 0
    """Blocks handed to the store in `StorePlan`s."""

    @property
    def tokens_cached(self) -> int:
        """Prompt tokens served from any source."""
        return sum(self.tokens_from.values())

    @property
    def hit_rate(self) -> float:
        """Fraction of prompt tokens served from the device or any tier."""
        return self.tokens_cached / self.prompt_tokens if self.prompt_tokens else 0.0


@dataclasses.dataclass(repr=False)
class Request:
    """A live request's view of the cache."""

    request_id: str
    token_ids: list[int]
    pages: list[int]
    """Page table: page i holds tokens [i * page_size, (i + 1) * page_size)."""
    num_cached_tokens: int
    """Leading prompt tokens whose K/V are in (or loading into) the pages."""
    tokens_from: dict[str, int]
    """Of those, how many each source serves: 'device', then tier names."""
    load: LoadPlan | None
    """The load that fills the outside-cached pages, until `complete_load`; None when there is none."""
    root: bytes = b""
    extra_keys: bytes | None = None
    block_hashes: list[bytes] = dataclasses.field(default_factory=list)
    num_committed_blocks: int = 0

    @property
    def tokens_from_device(self) -> int:
        """Prompt tokens served from the device prefix cache."""
        return self.tokens_from.get(DEVICE, 0)

    def __repr__(self) -> str:
        load = "none" if self.load is None else f"{len(self.load.block_hashes)} blocks pending"
        return (
            f"Request({self.request_id!r}, {len(self.token_ids)} tokens, {len(self.pages)} pages, "
            f"cached {self.num_cached_tokens} {self.tokens_from}, load {load})"
        )


class PagedKVCacheManager:
    """Pages and prefix caching for one cache, across the device and a `TieredStore`'s tiers."""

    def __init__(
        self,
        cache,
        store: TieredStore | None = None,
        *,
        num_pages: int | None = None,
        tp: int | None = None,
        seed=0,
    ):
        """`cache`: a KVCacheBuffer / MultiKVCacheBuffer (read for its layout and page count, not kept),
        or `KVCacheParams` with `num_pages` and `tp`. `store`: the tiers outside the device, or None.
        """
        layout = RowLayout.of(cache, tp=tp)
        if isinstance(cache, KVCacheParams):
            if num_pages is None:
                raise ValueError("num_pages is required when the manager is built from KVCacheParams")
        else:
            if num_pages is not None:
                raise ValueError(f"num_pages is only for KVCacheParams; the cache has its own, got {num_pages!r}")
            num_pages = (next(iter(cache.children.values())) if hasattr(cache, "children") else cache).total_num_pages
        self.page_size = layout.page_size
        self.fingerprint: bytes = layout.fingerprint
        """The host rows' layout fingerprint (`RowLayout.fingerprint`): the store must have the same."""
        self.block_fingerprint: bytes = layout.block_fingerprint
        """The model's page geometry (`RowLayout.block_fingerprint`), at the root of every block hash:
        a block has the same hash at every TP degree and process layout."""
        if store is not None:
            if not isinstance(store, TieredStore):
                raise ValueError(f"store must be a TieredStore or None, got {type(store).__name__}")
            if store.fingerprint != self.fingerprint:
                raise ValueError("store was built for another cache layout (its fingerprint differs from the cache's)")
        self.store = store
        self.seed = seed
        self.pool = BlockPool(check_positive_int("num_pages", num_pages))
        self.metrics = ManagerMetrics(tokens_from={DEVICE: 0, **{n: 0 for n in (store.tier_names if store else [])}})
        self.requests: dict[str, Request] = {}
        self._loads: dict[int, str] = {}  # plan id -> request id, until complete_load

    def __repr__(self) -> str:
        store = "no store" if self.store is None else " -> ".join(["device", *self.store.tier_names])
        return (
            f"PagedKVCacheManager({self.num_pages} pages of {self.page_size} tokens, {self.pages_in_use} in use, "
            f"{len(self.requests)} live requests, {store})"
        )

    # -- queries -----------------------------------------------------------
    @property
    def num_pages(self) -> int:
        """Device pages the manager hands out (page 0, the null page, included)."""
        return self.pool.num_pages

    @property
    def pages_in_use(self) -> int:
        """Pages held by live requests."""
        return self.pool.num_used

    @property
    def sources(self) -> list[str]:
        """Where tokens can come from: 'device', then the store's tiers in order."""
        return [DEVICE, *(self.store.tier_names if self.store else [])]

    def page_table(self, request_id: str, width: int | None = None) -> np.ndarray:
        """The request's pages as int32, padded with the null page to `width`."""
        pages = self._get(request_id).pages
        width = len(pages) if width is None else width
        if width < len(pages):
            raise ValueError(f"width ({width}) is less than the request's {len(pages)} pages")
        return np.array(pages + [NULL_PAGE] * (width - len(pages)), np.int32)

    def _get(self, request_id: str) -> Request:
        try:
            return self.requests[request_id]
        except KeyError:
            raise ValueError(f"request_id {request_id!r} is not a live request") from None

    def _pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    # -- lifecycle ---------------------------------------------------------
    def add_request(self, request_id: str, token_ids, *, cache_salt=None, extra_keys=None) -> Request:
        """Admit a request: reuse its cached prefix, allocate the rest, plan any load (`Request.load`)."""
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already live")
        tokens = np.asarray(token_ids)
        if tokens.ndim != 1 or tokens.size == 0 or not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(
                f"token_ids must be a non-empty rank-1 sequence of ints, got shape {tokens.shape} dtype {tokens.dtype}"
            )
        root = root_hash(self.seed, self.block_fingerprint, cache_salt)
        # The last token is never served from cache: hash only blocks before it.
        hashes = hash_blocks(tokens[:-1], self.page_size, root, extra_keys)

        hit_pages: list[int] = []
        for h in hashes:
            page = self.pool.lookup(h)
            if page is None:
                break
            hit_pages.append(page)
        n_dev = len(hit_pages)

        total = self._pages_for(tokens.size)
        # Device hits that sit in the free queue stop being free when acquired.
        free_after_hits = self.pool.num_free - sum(1 for p in hit_pages if self.pool.ref_counts[p] == 0)
        if total - n_dev > free_after_hits:
            raise InsufficientPagesError(
                f"request {request_id!r} needs {total} pages for {tokens.size} tokens ({n_dev} cached on "
                f"device, {total - n_dev} new) but only {free_after_hits} of {self.num_pages - 1} pages are free"
            )

        store = self.store
        sources = store.lookup(hashes[n_dev:]) if store is not None and n_dev < len(hashes) else []
        # Loads pass through host memory: at most one host tier's worth at once; the rest is recomputed.
        sources = sources[: store.host.num_slots] if store is not None and sources else sources
        # The pages `allocate` will hand out once the hits leave the free queue: plan the load onto
        # them before the pool changes, so a planning error leaves the pool (and its LRU order) as it was.
        new_pages = self.pool.next_free(total - n_dev, skip=set(hit_pages))
        n_ext = len(sources)
        load = None
        if n_ext and store is not None:
            load = store.prepare_load(hashes[n_dev : n_dev + n_ext], new_pages[:n_ext])
            self._loads[load.plan_id] = request_id
        for p in hit_pages:
            self.pool.acquire(p)
        allocated = [self.pool.allocate() for _ in new_pages]
        assert allocated == new_pages, (allocated, new_pages)

        page = self.page_size
        tokens_from = {DEVICE: n_dev * page}
        for name in sources:
            tokens_from[name] = tokens_from.get(name, 0) + page
        request = Request(
            request_id=request_id,
            token_ids=tokens.tolist(),
            pages=hit_pages + new_pages,
            num_cached_tokens=(n_dev + n_ext) * page,
            tokens_from=tokens_from,
            load=load,
            root=root,
            extra_keys=extra_keys,
            block_hashes=hashes[: n_dev + n_ext],
            num_committed_blocks=n_dev + n_ext,
        )
        self.requests[request_id] = request
        mt = self.metrics
        mt.requests += 1
        mt.prompt_tokens += tokens.size
        for name, n in tokens_from.items():
            mt.tokens_from[name] = mt.tokens_from.get(name, 0) + n
        mt.tokens_recomputed += tokens.size - request.num_cached_tokens
        return request

    def complete_load(self, result: LoadResult) -> Request | None:
        """Apply a load's result (in any order, any time after the load ran).

        Loaded: its blocks join the device prefix cache. Refused or failed:
        the request recomputes from its device prefix (`num_cached_tokens`
        drops) and its tokens count as recomputed. Returns the request, or
        None if it has finished since.
        """
        if not isinstance(result, LoadResult):
            raise ValueError(f"result must be a LoadResult (handle.result()), got {type(result).__name__}")
        plan = result.plan
        request_id = self._loads.pop(plan.plan_id, None)
        if request_id is None:
            raise ValueError(f"{plan!r} is not a pending load of this manager (completed twice?)")
        self._store().complete_load(result)
        # Counted even when the request has finished since: the store counts every refusal too.
        if result.status == "refused":
            self.metrics.loads_refused += 1
        elif result.status == "failed":
            self.metrics.loads_failed += 1
        request = self.requests.get(request_id)
        if request is None or request.load is not plan:
            return None  # finished meanwhile: its pages went back to the pool uncommitted
        request.load = None
        if result.status == "loaded":
            for p, h in zip(plan.device_pages, plan.block_hashes, strict=True):
                self.pool.commit(p, h)
            return request
        self._fall_back(request)
        return request

    def cancel_load(self, request_id: str) -> Request:
        """Drop the request's planned load before it runs (the worker never got it): recompute instead.

        Its host slots are freed and its tokens count as recomputed; nothing
        counts as a refusal. Use it when a request must go before its load
        runs; once the worker ran the load, pass its result to `complete_load`.
        """
        request = self._get(request_id)
        if request.load is None:
            raise ValueError(f"request {request_id!r} has no pending load to cancel")
        plan, request.load = request.load, None
        del self._loads[plan.plan_id]
        self._store().cancel_load(plan)
        self._fall_back(request)
        return request

    def _fall_back(self, request: Request) -> None:
        """The request's outside blocks will not arrive: it keeps its device prefix and recomputes the rest."""
        n_dev = request.tokens_from.get(DEVICE, 0) // self.page_size
        lost = request.num_cached_tokens - n_dev * self.page_size
        for name in list(request.tokens_from):
            if name != DEVICE:
                self.metrics.tokens_from[name] -= request.tokens_from.pop(name)
        self.metrics.tokens_recomputed += lost
        request.num_cached_tokens = n_dev * self.page_size
        request.num_committed_blocks = n_dev
        del request.block_hashes[n_dev:]

    def append_tokens(self, request_id: str, token_ids) -> list[int]:
        """Grow a request by decoded tokens, allocating pages as needed; returns the page table."""
        request = self._get(request_id)
        new = [int(t) for t in np.asarray(token_ids).reshape(-1)]
        need = self._pages_for(len(request.token_ids) + len(new)) - len(request.pages)
        if need > self.pool.num_free:
            raise InsufficientPagesError(
                f"request {request_id!r} needs {need} more pages for {len(new)} new tokens but only "
                f"{self.pool.num_free} of {self.num_pages - 1} pages are free"
            )
        request.token_ids.extend(new)
        request.pages.extend(self.pool.allocate() for _ in range(need))
        return list(request.pages)

    def commit(self, request_id: str, num_computed_tokens: int) -> StorePlan | None:
        """The model has written K/V for the request's first `num_computed_tokens` tokens.

        Indexes every newly full block in the prefix cache. Returns the
        `StorePlan` that offloads them (run it with `OffloadWorker.store`,
        then `complete_store`), or None when there is nothing to store.
        """
        request = self._get(request_id)
        if request.load is not None:
            raise ValueError(f"request {request_id!r} has a load in flight: pass its result to complete_load first")
        if not 0 <= num_computed_tokens <= len(request.token_ids):
            raise ValueError(
                f"num_computed_tokens ({num_computed_tokens}) must lie in [0, {len(request.token_ids)}] "
                f"for request {request_id!r}"
            )
        n_full = num_computed_tokens // self.page_size
        start = request.num_committed_blocks
        if n_full <= start:
            return None
        parent = request.block_hashes[start - 1] if start else request.root
        tokens = request.token_ids[start * self.page_size : n_full * self.page_size]
        new_hashes = hash_blocks(tokens, self.page_size, parent, request.extra_keys)
        store_pages, store_hashes = [], []
        for i, h in enumerate(new_hashes):
            page = request.pages[start + i]
            if self.pool.commit(page, h) and self.pool.lookup(h) == page:
                store_pages.append(page)
                store_hashes.append(h)
        request.block_hashes.extend(new_hashes)
        request.num_committed_blocks = n_full
        self.metrics.blocks_committed += len(store_pages)
        if not store_pages or self.store is None:
            return None
        plan = self.store.prepare_store(store_hashes, store_pages)
        if plan is not None:
            self.metrics.blocks_offloaded += len(plan.block_hashes)
        return plan

    def _store(self) -> TieredStore:
        """The store, for calls that only a manager with one can have been handed a plan for."""
        if self.store is None:
            raise ValueError("this manager has no TieredStore: it makes no plans to complete")
        return self.store

    def cancel_store(self, plan: StorePlan) -> None:
        """A store plan from `commit` that did not run (`worker.store` raised): its host slots are freed."""
        self._store().cancel_store(plan)

    def complete_store(self, result: StoreResult) -> None:
        """Apply a store's result: the stored blocks join the tiers' indexes."""
        if not isinstance(result, StoreResult):
            raise ValueError(f"result must be a StoreResult (handle.result()), got {type(result).__name__}")
        self._store().complete_store(result)

    def touch(self, request_id: str) -> None:
        """Tell the store the request's device-served blocks are hot."""
        request = self._get(request_id)
        n = request.tokens_from_device // self.page_size
        if n and self.store is not None:
            self.store.touch(request.block_hashes[:n])

    def finish(self, request_id: str) -> None:
        """Release the request's pages, tail first: they stay reusable until needed.

        A load still pending for it is abandoned: its pages return uncommitted,
        and its result may still be passed to `complete_load` to release its host slots.
        """
        request = self.requests.pop(request_id, None)
        if request is None:
            raise ValueError(f"request_id {request_id!r} is not a live request")
        for page in reversed(request.pages):
            self.pool.release(page)

    def reset_prefix_cache(self) -> None:
        """Forget every committed block on the device (e.g. after weights change)."""
        self.pool.reset_cache()
