"""`PagedKVCacheManager`: which pages each request uses, and which it can reuse.

Plain Python bookkeeping around the arrays; it never touches them. One
scheduler step, for a new request:

1. hash the prompt's full blocks (all tokens but the last: at least one token
   is always computed, so the model produces the next-token logits);
2. find the longest prefix already on the device (`BlockPool` hash index);
3. ask the connector how many of the next blocks an outside tier holds;
4. allocate pages for the whole prompt, or raise `InsufficientPagesError`
   with nothing changed;
5. start the load of the outside blocks into their new pages; if the
   connector refuses or the copy fails, recompute from there instead;
6. return the request with its page table and how many tokens are cached.

Then, as the model writes K/V: `commit(request_id, num_computed_tokens)`
indexes each newly full block in the prefix cache and offloads it through
the connector; `append_tokens` grows a decoding request; `finish` releases
its pages, tail first, which stay reusable until their pages are needed.
"""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np

from jaxkv.layout.buffer import KVCacheBuffer, MultiKVCacheBuffer
from jaxkv.layout.params import KVCacheParams
from jaxkv.prefix.hashing import hash_blocks, root_hash
from jaxkv.prefix.pool import NULL_PAGE, BlockPool, InsufficientPagesError
from jaxkv.tiers.connector import KVConnector, KVLoadFailed, KVLoadRefused, NullConnector
from jaxkv.transfer.handle import Transfer


@dataclasses.dataclass
class ManagerMetrics:
    """Token and page accounting since construction."""

    requests: int = 0
    prompt_tokens: int = 0
    tokens_from_device: int = 0
    tokens_from_host: int = 0
    tokens_from_disk: int = 0
    tokens_recomputed: int = 0
    loads_refused: int = 0
    loads_failed: int = 0
    blocks_committed: int = 0
    blocks_offloaded: int = 0

    @property
    def hit_rate(self) -> float:
        """Fraction of prompt tokens served from any cache tier."""
        cached = self.tokens_from_device + self.tokens_from_host + self.tokens_from_disk
        return cached / self.prompt_tokens if self.prompt_tokens else 0.0


@dataclasses.dataclass
class Request:
    """A live request's view of the cache."""

    request_id: str
    token_ids: list[int]
    pages: list[int]
    """Page table: page i holds tokens [i * page_size, (i + 1) * page_size)."""
    num_cached_tokens: int
    """Leading prompt tokens whose K/V are already in (or loading into) the pages."""
    tokens_from_device: int
    tokens_from_host: int
    tokens_from_disk: int
    load: Transfer | None
    """The connector load filling the outside-cached pages, if any."""
    root: bytes = dataclasses.field(repr=False, default=b"")
    extra_keys: bytes | None = dataclasses.field(repr=False, default=None)
    block_hashes: list[bytes] = dataclasses.field(repr=False, default_factory=list)
    num_committed_blocks: int = 0


def _cache_geometry(cache, num_pages) -> tuple[int, int, bytes]:
    """(num_pages, page_size, layout fingerprint) of a cache or of its params."""
    if isinstance(cache, MultiKVCacheBuffer):
        children = list(cache.children.values())
        pages = {c.total_num_pages for c in children}
        sizes = {c.values.shape[3] for c in children}
        if len(pages) != 1 or len(sizes) != 1:
            raise ValueError(f"children must share num_pages and page_size, got {sorted(pages)} / {sorted(sizes)}")
        desc = repr([(c.values.dtype.name, c.values.shape[1:]) for c in children])
        return pages.pop(), sizes.pop(), hashlib.sha256(b"jaxkv-cache" + desc.encode()).digest()
    if isinstance(cache, KVCacheBuffer):
        desc = repr((cache.values.dtype.name, cache.values.shape[1:], cache.tp_degree, cache.scales is not None))
        return cache.total_num_pages, cache.values.shape[3], hashlib.sha256(b"jaxkv-cache" + desc.encode()).digest()
    if isinstance(cache, KVCacheParams):
        if num_pages is None:
            raise ValueError("num_pages is required when the manager is built from KVCacheParams")
        return num_pages, cache.page_size, hashlib.sha256(b"jaxkv-params" + repr(cache).encode()).digest()
    raise ValueError(f"cache must be a KVCacheBuffer, MultiKVCacheBuffer or KVCacheParams, got {type(cache).__name__}")


class PagedKVCacheManager:
    """Pages and prefix caching for one cache, across device, host and disk tiers."""

    def __init__(self, cache, connector: KVConnector | None = None, *, num_pages: int | None = None, seed=0):
        pages, self.page_size, fingerprint = _cache_geometry(cache, num_pages)
        self.connector = NullConnector() if connector is None else connector
        # The connector's fingerprint describes the stored bytes; prefer it.
        self.fingerprint: bytes = getattr(self.connector, "fingerprint", None) or fingerprint
        self.seed = seed
        self.pool = BlockPool(pages)
        self.metrics = ManagerMetrics()
        self.requests: dict[str, Request] = {}

    # -- queries -----------------------------------------------------------
    @property
    def num_pages(self) -> int:
        return self.pool.num_pages

    @property
    def pages_in_use(self) -> int:
        return self.pool.num_used

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
        """Admit a request: reuse its cached prefix, allocate the rest, start any load."""
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already live")
        tokens = np.asarray(token_ids)
        if tokens.ndim != 1 or tokens.size == 0 or not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(f"token_ids must be a non-empty rank-1 sequence of ints, got shape {tokens.shape}")
        root = root_hash(self.seed, self.fingerprint, cache_salt)
        # The last token is never served from cache: hash only blocks before it.
        hashes = hash_blocks(tokens[:-1], self.page_size, root, extra_keys)

        n_dev = 0
        for h in hashes:
            if self.pool.lookup(h) is None:
                break
            n_dev += 1
        hit_pages = [self.pool.lookup(h) for h in hashes[:n_dev]]

        total = self._pages_for(tokens.size)
        # Device hits that sit in the free queue stop being free when acquired.
        free_after_hits = self.pool.num_free - sum(1 for p in hit_pages if self.pool.ref_counts[p] == 0)
        if total - n_dev > free_after_hits:
            raise InsufficientPagesError(
                f"request {request_id!r} needs {total} pages for {tokens.size} tokens ({n_dev} cached on "
                f"device, {total - n_dev} new) but only {free_after_hits} of {self.num_pages - 1} pages are free"
            )

        m = self.connector.metrics
        before = (m.host_hits, m.disk_hits)
        n_ext = self.connector.lookup(hashes[n_dev:]) if n_dev < len(hashes) else 0
        from_host, from_disk = m.host_hits - before[0], m.disk_hits - before[1]

        for p in hit_pages:
            self.pool.acquire(p)
        new_pages = [self.pool.allocate() for _ in range(total - n_dev)]

        load = None
        if n_ext:
            ext_pages, ext_hashes = new_pages[:n_ext], hashes[n_dev : n_dev + n_ext]
            try:
                load = self.connector.load(ext_pages, ext_hashes)
            except KVLoadRefused:
                self.metrics.loads_refused += 1
                n_ext = from_host = from_disk = 0
            except KVLoadFailed:
                self.metrics.loads_failed += 1
                n_ext = from_host = from_disk = 0
            except BaseException:
                # Anything else (a TP group out of step, an interrupt): undo the
                # allocation so the pool is as it was, then let it propagate.
                for p in reversed(hit_pages + new_pages):
                    self.pool.release(p)
                raise
            else:
                for p, h in zip(ext_pages, ext_hashes, strict=True):
                    self.pool.commit(p, h)

        page = self.page_size
        request = Request(
            request_id=request_id,
            token_ids=tokens.tolist(),
            pages=hit_pages + new_pages,
            num_cached_tokens=(n_dev + n_ext) * page,
            tokens_from_device=n_dev * page,
            tokens_from_host=from_host * page,
            tokens_from_disk=from_disk * page,
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
        mt.tokens_from_device += request.tokens_from_device
        mt.tokens_from_host += request.tokens_from_host
        mt.tokens_from_disk += request.tokens_from_disk
        mt.tokens_recomputed += tokens.size - request.num_cached_tokens
        return request

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

    def commit(self, request_id: str, num_computed_tokens: int, *, buffer=None) -> int:
        """The model has written K/V for the request's first `num_computed_tokens` tokens.

        Indexes every newly full block in the prefix cache and offloads it
        through the connector (`buffer`: the current cache, if the connector
        has not seen it). Returns the number of blocks committed.
        """
        request = self._get(request_id)
        if not 0 <= num_computed_tokens <= len(request.token_ids):
            raise ValueError(
                f"num_computed_tokens ({num_computed_tokens}) must lie in [0, {len(request.token_ids)}] "
                f"for request {request_id!r}"
            )
        n_full = num_computed_tokens // self.page_size
        start = request.num_committed_blocks
        if n_full <= start:
            return 0
        parent = request.block_hashes[start - 1] if start else request.root
        tokens = request.token_ids[start * self.page_size : n_full * self.page_size]
        new_hashes = hash_blocks(tokens, self.page_size, parent, request.extra_keys)
        offload_pages, offload_hashes = [], []
        for i, h in enumerate(new_hashes):
            page = request.pages[start + i]
            if self.pool.commit(page, h) and self.pool.lookup(h) == page:
                offload_pages.append(page)
                offload_hashes.append(h)
        request.block_hashes.extend(new_hashes)
        request.num_committed_blocks = n_full
        self.metrics.blocks_committed += len(offload_pages)
        if offload_pages and not isinstance(self.connector, NullConnector):
            self.connector.offload(offload_pages, offload_hashes, buffer=buffer)
            self.metrics.blocks_offloaded += len(offload_pages)
        return len(offload_pages)

    def touch(self, request_id: str) -> None:
        """Tell the connector the request's device-served blocks are hot."""
        request = self._get(request_id)
        n = request.tokens_from_device // self.page_size
        if n and not isinstance(self.connector, NullConnector):
            self.connector.touch(request.block_hashes[:n])

    def finish(self, request_id: str) -> None:
        """Release the request's pages, tail first: they stay reusable until needed."""
        request = self.requests.pop(request_id, None)
        if request is None:
            raise ValueError(f"request_id {request_id!r} is not a live request")
        for page in reversed(request.pages):
            self.pool.release(page)

    def reset_prefix_cache(self) -> None:
        """Forget every committed block on the device (e.g. after weights change)."""
        self.pool.reset_cache()
