"""`PagedKVCacheManager` with a real cache, `TieredStore` and `OffloadWorker`: plans, late completions, failures."""

import hashlib
from collections import Counter
from functools import lru_cache

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cachegen import random_buffer
from dict_tier import DictTier
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import jaxkv
from jaxkv import (
    NULL_PAGE,
    BlockPool,
    HostTier,
    InsufficientPagesError,
    KVCacheParams,
    LoadResult,
    OffloadWorker,
    PagedKVCacheManager,
    TieredStore,
    hash_blocks,
    open_tiers,
    root_hash,
)

PARAMS = KVCacheParams(jnp.bfloat16, n_kv_heads=2, head_dim=8, num_layers=1, page_size=4)
FP = hashlib.sha256(b"layout").digest()


# -- helpers: a real one-device cache whose pages the test reads and writes as rows -----------


def rows_of(cache, pages) -> np.ndarray:
    """[len(pages), row_bytes] uint8: the pages' bytes (one unit at TP 1, so a page is a host row)."""
    values = np.asarray(cache.values)
    row_bytes = values[0].nbytes
    return np.ascontiguousarray(values[list(pages)]).view(np.uint8).reshape(len(pages), row_bytes)


def write_rows(cache, pages, rows) -> jaxkv.KVCacheBuffer:
    """The model's step: the cache with `rows` written into `pages` (a new value; the old one is dropped)."""
    values = np.array(cache.values)
    values.view(np.uint8).reshape(values.shape[0], -1)[list(pages)] = rows
    return jaxkv.KVCacheBuffer(cache.replicates_kv_across_tp, jax.device_put(values, cache.values.sharding))


def model_writes(cache, pages, seed):
    """Fill `pages` with fresh random bits, as a model step would; returns (cache, the rows written)."""
    row_bytes = jaxkv.RowLayout.of(cache).row_bytes
    rows = np.random.default_rng(seed).integers(0, 256, (len(pages), row_bytes), dtype=np.uint8)
    return write_rows(cache, pages, rows), rows


def setup(num_pages=16, host_pages=8, *, disk=None, disk_pages=64, seed=0):
    """A real cache, a store (host, and disk when `disk` is a directory), its worker and a manager."""
    cache, _, _ = random_buffer(PARAMS, 1, num_pages, seed)
    row = jaxkv.RowLayout.of(cache).row_bytes
    kw = dict(disk_directory=disk, disk_capacity_bytes=disk_pages * row) if disk is not None else {}
    store, worker = open_tiers(cache, host_pages * row, **kw)
    return cache, store, worker, PagedKVCacheManager(cache, store)


def put_host(store, worker, items) -> None:
    """Place rows in host memory under their hashes, as a promotion would: the store picks, the worker fills."""
    for block_hash, row in items:
        slot = store.host.reserve()
        worker.host.fill(slot, np.ascontiguousarray(row))
        assert store.host.commit(block_hash, slot)


def serve(manager, worker, cache, rid, tokens, *, seed=0, finish=True):
    """Admit, load, 'compute' the rest, commit, store, finish. Returns (cache, request, rows of its pages)."""
    req = manager.add_request(rid, tokens)
    if req.load is not None:
        cache, handle = worker.load(cache, req.load)
        manager.complete_load(handle.result())
    computed = req.pages[req.num_cached_tokens // manager.page_size :]
    cache, _ = model_writes(cache, computed, seed)
    plan = manager.commit(rid, len(tokens))
    if plan is not None:
        manager.complete_store(worker.store(cache, plan).result())
    rows = rows_of(cache, req.pages)
    if finish:
        manager.finish(rid)
    return cache, req, rows


def evict_device(manager, cache):
    """Push every block in a free page out of device memory: a request takes every free page and writes it."""
    req = manager.add_request("evictor", [7] * (manager.pool.num_free * manager.page_size))
    cache, _ = model_writes(cache, req.pages, 99)
    manager.finish("evictor")
    return cache


def state(manager, store):
    """Everything a failed call must leave as it was: pool, free-queue order, host slots, metrics."""
    pool, host = manager.pool, store.host
    return (
        list(pool.ref_counts),
        list(pool._free),
        dict(pool.hash_to_page),
        list(host._index.items()),
        dict(host._pins),
        set(host._reserved),
        list(host._free),
        repr(manager.metrics),
        set(manager.requests),
    )


# -- hashing -------------------------------------------------------------------


def test_block_hashes_are_chained_and_salted():
    tokens = np.arange(10)
    root = root_hash(0, FP)
    hashes = hash_blocks(tokens, 4, root)
    assert len(hashes) == 2 and all(len(x) == 32 for x in hashes)
    assert hashes[0] == hashlib.sha256(root + np.arange(4, dtype="<i4").tobytes()).digest()
    assert hashes[1] == hashlib.sha256(hashes[0] + np.arange(4, 8, dtype="<i4").tobytes()).digest()
    # The same block after a different prefix hashes differently.
    other = hash_blocks([9, 9, 9, 9, 4, 5, 6, 7], 4, root)
    assert other[1] != hashes[1]
    assert hash_blocks(tokens, 4, root_hash(0, FP, "tenant-a")) != hashes
    assert root_hash(0, FP, "ab") != root_hash(0, FP + b"", "a") and root_hash(1, FP) != root
    assert hash_blocks(tokens, 4, root, extra_keys=b"lora-3") != hashes
    assert hash_blocks(tokens[4:], 4, hashes[0]) == hashes[1:]


# -- block pool ----------------------------------------------------------------


def test_block_pool_lru_reuse_evicts_cached_blocks():
    pool = BlockPool(4)  # pages 1..3 usable
    a, b, c = pool.allocate(), pool.allocate(), pool.allocate()
    assert NULL_PAGE not in (a, b, c) and pool.num_free == 0
    with pytest.raises(InsufficientPagesError):
        pool.allocate()
    pool.commit(a, b"A" * 32)
    pool.commit(b, b"B" * 32)
    for p in (b, a, c):
        pool.release(p)
    assert pool.num_free == 3 and pool.lookup(b"A" * 32) == a  # free but still cached
    pool.acquire(a)  # a prefix hit takes it back out of the free queue
    assert pool.ref_counts[a] == 1 and pool.num_free == 2
    assert pool.allocate() == b  # least recently freed first: evicts B
    assert pool.lookup(b"B" * 32) is None and pool.evictions == 1
    with pytest.raises(ValueError, match=r"page 3 is not in use \(ref count 0\)"):
        pool.release(c)
    with pytest.raises(ValueError, match="num_pages must be an int >= 2"):
        BlockPool(1)


# -- manager without a store ----------------------------------------------------


def run_request(manager, rid, tokens, **kw):
    """Admit, 'compute' the whole prompt, commit, finish (no store: nothing to load or offload)."""
    req = manager.add_request(rid, tokens, **kw)
    assert req.load is None and manager.commit(rid, len(tokens)) is None
    manager.finish(rid)
    return req


def test_prefix_hit_on_device_and_last_token_rule():
    m = PagedKVCacheManager(PARAMS, num_pages=32, tp=1)
    system = list(range(100, 112))  # 3 full blocks
    first = run_request(m, "a", system + [1, 2, 3, 4, 5])
    assert first.num_cached_tokens == 0 and m.metrics.blocks_committed == 4
    second = m.add_request("b", system + [1, 2, 3, 4, 9, 9])
    assert second.num_cached_tokens == 16 and second.tokens_from_device == 16
    assert second.tokens_from == {"device": 16} and second.load is None
    assert second.pages[:4] == first.pages[:4]
    # A prompt that is exactly cached blocks still computes its last token.
    third = m.add_request("c", system)
    assert third.num_cached_tokens == 8 and len(third.pages) == 3
    assert m.metrics.tokens_recomputed == 17 + 2 + 4
    assert m.metrics.tokens_from == {"device": 24} and m.sources == ["device"]
    np.testing.assert_array_equal(m.page_table("c", width=5), third.pages + [NULL_PAGE] * 2)


def test_insufficient_pages_leaks_nothing():
    m = PagedKVCacheManager(PARAMS, num_pages=6, tp=1)  # 5 usable pages
    m.add_request("a", list(range(12)))  # 3 pages
    before = (m.pool.num_free, list(m.pool.ref_counts))
    with pytest.raises(
        InsufficientPagesError, match=r"needs 3 pages for 9 tokens \(0 cached on device, 3 new\) but only 2 of 5"
    ):
        m.add_request("b", [7] * 9)
    assert (m.pool.num_free, list(m.pool.ref_counts)) == before and "b" not in m.requests
    with pytest.raises(InsufficientPagesError, match="needs 3 more pages"):
        m.append_tokens("a", [1] * 12)
    assert len(m.requests["a"].token_ids) == 12


def test_salted_tenants_never_share_blocks():
    m = PagedKVCacheManager(PARAMS, num_pages=32, tp=1)
    tokens = list(range(20))
    run_request(m, "a", tokens, cache_salt="tenant-a")
    assert m.add_request("b", tokens, cache_salt="tenant-b").num_cached_tokens == 0
    assert m.add_request("c", tokens, cache_salt="tenant-a").num_cached_tokens == 16


def test_request_repr_does_not_print_the_token_list():
    m = PagedKVCacheManager(PARAMS, num_pages=600, tp=1)
    tokens = list(range(1000, 3000))
    req = m.add_request("long", tokens)
    text = repr(req)
    assert len(text) < 200, text
    assert "'long'" in text and "2000 tokens" in text and "500 pages" in text
    assert "1001" not in text and "2999" not in text


# -- layouts ---------------------------------------------------------------------


def test_layout_fingerprint_change_invalidates_everything():
    cache, store, worker, m = setup()
    cache, _, _ = serve(m, worker, cache, "a", list(range(17)))
    assert m.fingerprint == store.fingerprint == jaxkv.RowLayout.of(cache).fingerprint
    other_params = KVCacheParams(jnp.float16, n_kv_heads=2, head_dim=8, num_layers=1, page_size=4)
    other = PagedKVCacheManager(other_params, num_pages=16, tp=1)
    assert other.fingerprint != m.fingerprint and other.block_fingerprint != m.block_fingerprint
    assert root_hash(0, other.block_fingerprint) != root_hash(0, m.block_fingerprint)
    # The same layout from params and TP degree gives the same hashes as from the cache.
    same = PagedKVCacheManager(PARAMS, num_pages=16, tp=1)
    assert (same.fingerprint, same.block_fingerprint) == (m.fingerprint, m.block_fingerprint)


def test_a_store_of_another_layout_is_refused():
    cache, _, _ = random_buffer(PARAMS, 1, 8)
    other_params = KVCacheParams(jnp.float16, n_kv_heads=2, head_dim=8, num_layers=1, page_size=4)
    other_cache, _, _ = random_buffer(other_params, 1, 8)
    store, _ = open_tiers(other_cache, 1 << 16)
    with pytest.raises(ValueError, match="another cache layout"):
        PagedKVCacheManager(cache, store)
    with pytest.raises(ValueError, match="another cache layout"):
        PagedKVCacheManager(PARAMS, store, num_pages=8, tp=1)
    with pytest.raises(ValueError, match="store must be a TieredStore or None, got HostTier"):
        PagedKVCacheManager(cache, HostTier(1 << 16))
    assert PagedKVCacheManager(other_cache, store).store is store  # its own layout is fine


# -- manager with a real store and worker ------------------------------------------


def test_host_hits_are_loaded_bit_exact():
    cache, store, worker, m = setup(num_pages=9)
    prompt = list(range(13))  # 3 full blocks + 1
    cache, _, want = serve(m, worker, cache, "a", prompt)
    assert m.metrics.blocks_offloaded == 3 and len(store.host) == 3
    cache = evict_device(m, cache)
    again = m.add_request("b", prompt)
    assert again.tokens_from == {"device": 0, "host": 12} and again.num_cached_tokens == 12
    assert again.load is not None and again.load.sources == ("host",) * 3
    assert again.load.device_pages == tuple(again.pages[:3])
    # Not a device hit for anyone until its bytes are there.
    assert [m.pool.lookup(h) for h in again.block_hashes] == [None] * 3
    assert [m.pool.page_hash[p] for p in again.pages] == [None] * 4
    assert rows_of(cache, again.pages[:3]).tobytes() != want[:3].tobytes()  # not there before the load
    c = m.add_request("c", prompt)  # so the same blocks are planned again, into c's pages
    assert c.load.block_hashes == again.load.block_hashes and c.tokens_from == {"device": 0, "host": 12}
    cache, handle = worker.load(cache, again.load)
    cache, handle_c = worker.load(cache, c.load)
    assert handle.status == handle_c.status == "loaded"
    assert m.complete_load(handle.result()) is again and again.load is None
    assert rows_of(cache, again.pages[:3]).tobytes() == want[:3].tobytes()
    assert [m.pool.lookup(h) for h in again.block_hashes] == again.pages[:3]
    # c's copy arrives second: its bytes are right, but the index keeps one page per block.
    assert m.complete_load(handle_c.result()) is c
    assert rows_of(cache, c.pages[:3]).tobytes() == want[:3].tobytes()
    assert [m.pool.lookup(h) for h in again.block_hashes] == again.pages[:3]
    assert [m.pool.page_hash[p] for p in c.pages] == [None] * 4
    assert m.metrics.tokens_from == {"device": 0, "host": 24} and not store.host._pins


def test_device_host_and_disk_hits_touch_only_device_blocks(tmp_path):
    """A mixed hit: device, host and disk blocks load bit-exact; `touch` hands the store exactly the device ones."""
    cache, store, worker, m = setup(num_pages=9, host_pages=5, disk=tmp_path / "disk")
    assert m.sources == ["device", "host", "disk"] and m.metrics.tokens_from == {"device": 0, "host": 0, "disk": 0}
    prompt = list(range(25))  # 6 full blocks + 1: 7 of the 8 usable pages
    cache, _, want = serve(m, worker, cache, "a", prompt)
    hashes = hash_blocks(prompt[:-1], 4, root_hash(0, m.block_fingerprint))
    # Write-through in chunks of 5 host slots: the disk has all 6 blocks, host memory the last 5.
    assert [store.where(h) for h in hashes] == ["disk"] + ["host"] * 5
    m.add_request("keep", prompt[:5])  # block 0 stays on the device
    cache = evict_device(m, cache)
    assert [m.pool.lookup(h) is not None for h in hashes] == [True] + [False] * 5
    # Host memory keeps blocks 1-3 only; 4 and 5 are on disk.
    store.host.clear()
    put_host(store, worker, [(hashes[i], want[i]) for i in (1, 2, 3)])
    assert [store.where(h) for h in hashes[1:]] == ["host"] * 3 + ["disk"] * 2
    calls = []
    real_touch = store.touch
    store.touch = lambda hs: (calls.append(list(hs)), real_touch(hs))

    req = m.add_request("b", prompt)
    assert req.tokens_from == {"device": 4, "host": 12, "disk": 8} and req.num_cached_tokens == 24
    assert req.pages[0] == m.requests["keep"].pages[0]
    assert req.load.sources == ("host", "host", "host", "disk", "disk")
    cache, handle = worker.load(cache, req.load)
    assert m.complete_load(handle.result()) is req
    assert rows_of(cache, req.pages[:6]).tobytes() == want[:6].tobytes()

    m.touch("b")
    assert calls == [[hashes[0]]]  # the device-served block, not the host- or disk-served ones
    mt = m.metrics
    assert mt.tokens_from == {"device": 4 + 4, "host": 12, "disk": 8}  # keep's hit and b's
    assert set(mt.tokens_from) == set(m.sources) == {"device", "host", "disk"}
    assert sum(mt.tokens_from.values()) + mt.tokens_recomputed == mt.prompt_tokens
    assert store.metrics["disk"].blocks_loaded == 2 and store.metrics["host"].blocks_loaded == 3
    store.close()


def test_touch_after_a_load_names_the_device_prefix_only():
    """After host-only hits nothing is touched; after a device hit exactly those blocks, in order."""
    cache, store, worker, m = setup(num_pages=8)
    prompt = list(range(13))
    cache, _, _ = serve(m, worker, cache, "a", prompt)
    hashes = hash_blocks(prompt[:-1], 4, root_hash(0, m.block_fingerprint))
    cache = evict_device(m, cache)
    calls = []
    store.touch = calls.append
    cache, req, _ = serve(m, worker, cache, "b", prompt, finish=False)
    assert req.tokens_from == {"device": 0, "host": 12}
    m.touch("b")
    assert calls == []  # no block was served from the device
    c = m.add_request("c", prompt)
    assert c.tokens_from == {"device": 12}
    m.touch("c")
    assert calls == [hashes]


def test_a_page_shared_by_two_requests_survives_one_finishing():
    cache, _, worker, m = setup(num_pages=9)  # 8 usable pages
    prompt = list(range(9))  # 2 full blocks + 1
    cache, a, rows_a = serve(m, worker, cache, "a", prompt, finish=False)
    b = m.add_request("b", prompt[:8] + [50, 51, 52])
    shared = a.pages[:2]
    assert b.pages[:2] == shared and b.tokens_from == {"device": 8}
    assert [m.pool.ref_counts[p] for p in shared] == [2, 2]
    m.finish("a")
    assert [m.pool.ref_counts[p] for p in shared] == [1, 1]
    assert not set(shared) & set(m.pool._free)  # still held by b: never evictable
    assert a.pages[2] in m.pool._free  # a's own last page is free
    # Take every free page: the shared ones are not among them, and keep b's bytes.
    free = m.pool.num_free
    filler = m.add_request("fill", [9] * (free * 4))
    assert not set(filler.pages) & set(b.pages)
    cache, _ = model_writes(cache, filler.pages, 3)
    assert rows_of(cache, shared).tobytes() == rows_a[:2].tobytes()
    with pytest.raises(InsufficientPagesError):
        m.add_request("more", [3] * 5)
    m.finish("fill")
    # b still hits its own prefix and finishing it frees the shared pages, blocks kept.
    m.finish("b")
    assert [m.pool.ref_counts[p] for p in shared] == [0, 0]
    assert [m.pool.lookup(h) for h in a.block_hashes] == shared
    assert m.add_request("c", prompt).tokens_from == {"device": 8}


def test_failed_allocation_with_hits_in_the_free_queue_leaks_nothing():
    cache, store, worker, m = setup(num_pages=8, host_pages=8)  # 7 usable pages
    prompt = list(range(13))  # 3 full blocks + 1
    cache, a, _ = serve(m, worker, cache, "a", prompt)
    assert all(m.pool.ref_counts[p] == 0 for p in a.pages)  # its blocks sit in the free queue
    m.add_request("hold", [5] * 12)  # 3 pages: 4 free left, 3 of them hold a's blocks
    longer = prompt[:12] + list(range(200, 213))  # 3 device hits, 4 new pages, but only 1 free page after hits
    before = state(m, store)
    lookups = store.metrics.lookups
    with pytest.raises(InsufficientPagesError, match=r"needs 7 pages .* \(3 cached on device, 4 new\) but only 1"):
        m.add_request("b", longer)
    assert state(m, store) == before and store.metrics.lookups == lookups
    # Host hits too: a's blocks are still in host memory; push the device copies out and fail again.
    m.finish("hold")
    cache = evict_device(m, cache)
    m.add_request("hold", [5] * 16)  # 4 pages: 3 free left
    before = state(m, store)
    with pytest.raises(InsufficientPagesError, match=r"\(0 cached on device, 7 new\) but only 3"):
        m.add_request("b", longer)
    assert state(m, store) == before and not store.host._pins and not store.host._reserved
    # The same request fits once pages are back, and is served from the host.
    m.finish("hold")
    assert m.add_request("b", longer).tokens_from == {"device": 0, "host": 12}


def test_unexpected_store_error_rolls_back_the_allocation(monkeypatch):
    """An error while planning the load leaves the pool as it was: no page taken, no cached block evicted."""
    cache, store, worker, m = setup(num_pages=9)  # 8 usable pages
    prompt = list(range(13))  # 3 full blocks + 1
    cache, _, _ = serve(m, worker, cache, "a", prompt)
    m.reset_prefix_cache()  # a's blocks are only in host memory now
    cache, other, _ = serve(m, worker, cache, "other", list(range(100, 113)))
    assert sum(1 for p in m.pool._free if m.pool.page_hash[p] is not None) == 3  # other's blocks, free
    longer = prompt[:12] + list(range(200, 213))  # 7 pages: allocating them would evict other's blocks

    def out_of_step(*args, **kw):
        raise RuntimeError("TP group out of step")

    monkeypatch.setattr(store, "prepare_load", out_of_step)
    before = state(m, store)[:7]
    with pytest.raises(RuntimeError, match="TP group out of step"):
        m.add_request("b", longer)
    assert state(m, store)[:7] == before and "b" not in m.requests and not m._loads
    assert [m.pool.lookup(h) for h in other.block_hashes] == other.pages[:3]
    monkeypatch.undo()
    assert m.add_request("b", longer).tokens_from == {"device": 0, "host": 12}


def test_lower_tier_loss_between_lookup_and_load_recomputes_from_the_device_prefix(tmp_path):
    cache, store, worker, m = setup(num_pages=8, host_pages=4, disk=tmp_path / "disk")
    prompt = list(range(13))  # 3 full blocks + 1
    cache, a, _ = serve(m, worker, cache, "a", prompt)
    m.add_request("keep", prompt[:5])  # block 0 stays on the device
    cache = evict_device(m, cache)
    store.host.clear()  # only the disk has blocks 1 and 2 now
    req = m.add_request("b", prompt)
    assert req.tokens_from == {"device": 4, "disk": 8} and req.num_cached_tokens == 12
    assert req.load.sources == ("disk", "disk") and req.load.promotions == [0, 1]
    with pytest.raises(ValueError, match="request 'b' has a load in flight"):
        m.commit("b", 13)
    worker.tiers["disk"].clear()  # the disk loses them before the worker runs the plan
    cache_before = cache
    cache, handle = worker.load(cache, req.load)
    assert handle.status == "refused" and cache is cache_before  # nothing written
    result = handle.result()
    assert "no longer held" in result.error
    assert m.complete_load(result) is req
    # The request recomputes from its device prefix; nothing of the refused load is indexed.
    assert req.num_cached_tokens == req.tokens_from_device == 4 and req.tokens_from == {"device": 4}
    assert req.block_hashes == a.block_hashes[:1] and req.num_committed_blocks == 1
    assert all(m.pool.page_hash[p] is None for p in req.pages[1:])
    assert not store.host._reserved and not store.host._pins  # promotion slots released
    mt = m.metrics
    assert mt.loads_refused == 1 and store.metrics.refused_loads == 1
    assert mt.tokens_from == {"device": 4 + 4, "host": 0, "disk": 0}  # keep's hit and b's
    assert sum(mt.tokens_from.values()) + mt.tokens_recomputed == mt.prompt_tokens
    assert mt.tokens_recomputed == 13 + 1 + 20 + 9  # a, keep, the evictor, b after the refusal
    with pytest.raises(ValueError, match="not a pending load of this manager"):
        m.complete_load(result)
    # Recomputed, blocks 1 and 2 are committed and stored again.
    cache, rows = model_writes(cache, req.pages[1:], 5)
    plan = m.commit("b", 13)
    assert plan is not None and plan.block_hashes == tuple(a.block_hashes[1:3])
    assert [m.pool.lookup(h) for h in a.block_hashes] == req.pages[:3]
    m.complete_store(worker.store(cache, plan).result())
    assert [store.where(h) for h in a.block_hashes[1:]] == ["host", "host"]
    held = [worker.host.row(store.host.slot_of(h)).tobytes() for h in a.block_hashes[1:]]
    assert held == [rows[0].tobytes(), rows[1].tobytes()]
    store.close()


def test_failed_load_is_never_indexed(monkeypatch):
    cache, store, worker, m = setup(num_pages=8)
    prompt = list(range(13))
    cache, _, _ = serve(m, worker, cache, "a", prompt)
    cache = evict_device(m, cache)
    req = m.add_request("b", prompt)

    def broken(*args, **kw):
        raise RuntimeError("DMA engine fault")

    monkeypatch.setattr(worker.engine, "h2d", broken)
    cache, handle = worker.load(cache, req.load)
    result = handle.result()
    assert result.status == "failed" and result.failed_pages == req.pages[:3] and "DMA engine fault" in result.error
    assert m.complete_load(result) is req
    assert req.num_cached_tokens == req.tokens_from_device == 0 and req.tokens_from == {"device": 0}
    assert all(m.pool.page_hash[p] is None for p in req.pages)
    assert m.metrics.loads_failed == 1 and m.metrics.tokens_from == {"device": 0, "host": 0}
    assert not store.host._pins


def test_finish_before_the_load_completes(tmp_path):
    cache, store, worker, m = setup(num_pages=8, disk=tmp_path / "disk")
    prompt = list(range(13))
    cache, _, _ = serve(m, worker, cache, "a", prompt)
    cache = evict_device(m, cache)
    req = m.add_request("b", prompt)
    cache, handle = worker.load(cache, req.load)
    m.finish("b")
    assert m.complete_load(handle.result()) is None  # abandoned: its pages were returned uncommitted
    assert all(m.pool.page_hash[p] is None for p in req.pages) and not store.host._pins
    with pytest.raises(ValueError, match="not a pending load"):
        m.complete_load(handle.result())
    # A new request with the same id does not take the old result.
    again = m.add_request("b", prompt)
    assert again.load is not None and again.load is not req.load
    cache, handle = worker.load(cache, again.load)
    m.complete_load(handle.result())
    m.finish("b")
    # A refusal still counts when its request finished first.
    cache = evict_device(m, cache)
    store.host.clear()
    req = m.add_request("c", prompt)
    assert req.load.sources == ("disk",) * 3
    worker.tiers["disk"].clear()
    cache, handle = worker.load(cache, req.load)
    m.finish("c")
    assert m.complete_load(handle.result()) is None
    assert m.metrics.loads_refused == store.metrics.refused_loads == 1
    assert not store.host._reserved and not store.host._pins
    store.close()


def test_complete_load_and_commit_check_their_arguments():
    cache, _, worker, m = setup(num_pages=8)
    cache, _, _ = serve(m, worker, cache, "a", list(range(13)))
    cache = evict_device(m, cache)
    req = m.add_request("b", list(range(13)))
    with pytest.raises(ValueError, match="has a load in flight"):
        m.commit("b", 13)
    with pytest.raises(ValueError, match="result must be a LoadResult"):
        m.complete_load(req.load)
    plan = req.load
    cache, handle = worker.load(cache, plan)
    m.complete_load(handle.result())
    with pytest.raises(ValueError, match="not a pending load of this manager"):
        m.complete_load(handle.result())
    with pytest.raises(ValueError, match="not a pending load"):
        m.complete_load(LoadResult(plan, "loaded"))
    assert m.commit("b", 13) is None  # blocks 0-2 are loaded and already stored; nothing new is full
    with pytest.raises(ValueError, match="result must be a StoreResult"):
        m.complete_store(handle.result())


# -- property-based: random interleavings of plans and late completions ------------------------


SYSTEM_PROMPTS = [list(range(1, 10)), list(range(50, 58)), []]
NUM_PAGES = 8  # 7 usable: small, so device evictions happen
HOST_SLOTS = 8
LOWER_SLOTS = 64
_COMPILED: dict = {}  # per host backend, the engine's jitted load, shared by the machine's examples
FAIL_SOMETIMES = st.sampled_from([False] * 5 + [True])  # a store's copy fails one time in six
FAIL_LOAD_SOMETIMES = st.sampled_from([False, False, True])  # a load's copy fails one time in three


@lru_cache(maxsize=4096)
def block_row(key: tuple, row_bytes: int) -> bytes:
    """The bytes the model writes for `key` = (salt, tokens up to the page's end): random bit patterns."""
    seed = int.from_bytes(hashlib.sha256(repr(key).encode()).digest()[:8], "little")
    return np.random.default_rng(seed).integers(0, 256, row_bytes, dtype=np.uint8).tobytes()


class ManagerMachine(RuleBasedStateMachine):
    """Random requests, growth, finishes and tier losses; loads and stores run on a real worker and
    complete late and out of order, some refused or failed; checked against a reference of page bytes."""

    host_backend = "numpy"

    def __init__(self):
        super().__init__()
        self.cache, _, _ = random_buffer(PARAMS, 1, NUM_PAGES)
        layout = jaxkv.RowLayout.of(self.cache)
        self.row_bytes = layout.row_bytes
        self.lower = DictTier(LOWER_SLOTS * self.row_bytes, name="remote")
        host = HostTier(HOST_SLOTS * self.row_bytes, backend=self.host_backend)
        self.worker = OffloadWorker(self.cache, [host, self.lower])
        self.store = TieredStore(self.worker.spec(), probe=self.worker.probe)
        # Every example's cache has the same layout: compile the engine's load once, not once per example.
        self.worker.engine.h2d_transfer.program = _COMPILED.get(self.host_backend)
        self.m = PagedKVCacheManager(self.cache, self.store)
        self.live: dict[str, object] = {}  # rid -> salt
        self.key_of: dict[bytes, tuple] = {}  # block hash -> (salt, tokens through that block)
        self.planned: dict[str, jaxkv.LoadPlan] = {}  # rid -> its load, not yet run by the worker
        self.ran: list[tuple[str, LoadResult]] = []  # loads run by the worker, not yet completed
        self.stores: list = []  # StoreHandles not yet completed
        self.recomputing: set[str] = set()  # live requests whose load was refused or failed
        self.completed = Counter()  # completed load results by status
        self.served = Counter({source: 0 for source in self.m.sources})  # reference of metrics.tokens_from
        self.recomputed = 0  # reference of metrics.tokens_recomputed
        self.prompt_tokens = 0
        self.history: list[tuple[list[int], object]] = []  # (tokens, salt) of finished requests
        self.n = 0

    def teardown(self):
        self.worker.flush()
        self.store.close()

    # -- the reference ------------------------------------------------------------------------
    def key(self, salt, tokens, block: int) -> tuple:
        return (salt, tuple(tokens[: (block + 1) * 4]))

    def expect(self, key) -> bytes:
        return block_row(key, self.row_bytes)

    def hashes(self, salt, tokens) -> list[bytes]:
        hs = hash_blocks(tokens, 4, root_hash(0, self.m.block_fingerprint, salt))
        for b, h in enumerate(hs):
            self.key_of[h] = self.key(salt, tokens, b)
        return hs

    def waiting(self, rid) -> bool:
        return self.m.requests[rid].load is not None

    def check_touch(self, rid: str) -> None:
        """`touch` hands the store exactly the request's device-served blocks, which are on the device."""
        req = self.m.requests[rid]
        calls = []
        self.store.touch = calls.append
        try:
            self.m.touch(rid)
        finally:
            del self.store.touch
        n = req.tokens_from_device // 4
        assert calls == ([req.block_hashes[:n]] if n else [])
        assert [self.m.pool.lookup(h) for h in req.block_hashes[:n]] == req.pages[:n]

    # -- what the model and the worker do -------------------------------------------------------
    def compute(self, rid: str, start: int, fail_store: bool = False) -> None:
        """The model writes K/V for tokens[start:], then commits; the worker runs the store plan at once."""
        req, salt = self.m.requests[rid], self.live[rid]
        blocks = range(start // 4, len(req.pages))
        rows = np.frombuffer(b"".join(self.expect(self.key(salt, req.token_ids, b)) for b in blocks), np.uint8)
        self.cache = write_rows(self.cache, [req.pages[b] for b in blocks], rows.reshape(len(blocks), -1))
        self.hashes(salt, req.token_ids)
        plan = self.m.commit(rid, len(req.token_ids))
        if plan is None:
            return
        if fail_store:  # the device-to-host copy fails: nothing may be indexed anywhere
            self.worker.engine.d2h = _raise("injected d2h failure")
        try:
            handle = self.worker.store(self.cache, plan)
        finally:
            if fail_store:
                del self.worker.engine.d2h
        event("store failed" if fail_store else "store ran")
        self.stores.append(handle)

    def run_load(self, rid: str, fail: bool) -> None:
        plan = self.planned.pop(rid)
        before = self.cache
        if fail:  # the host-to-device copy fails: its pages are undefined
            self.worker.engine.h2d = _raise("injected h2d failure")
        try:
            cache, handle = self.worker.load(self.cache, plan)
        finally:
            if fail:
                del self.worker.engine.h2d
        result = handle.result()
        if self.worker.engine.h2d_transfer.program is not None:
            _COMPILED.setdefault(self.host_backend, self.worker.engine.h2d_transfer.program)
        event(f"load {result.status}")
        assert result.status in (("refused", "failed") if fail else ("refused", "loaded"))
        if result.status == "refused":
            assert cache is before  # nothing written
        elif result.status == "loaded":
            want = b"".join(self.expect(self.key_of[h]) for h in plan.block_hashes)
            assert rows_of(cache, plan.device_pages).tobytes() == want  # every outside hit: the prefix's bytes
        else:
            assert result.failed_pages == list(plan.device_pages)
            garbage = np.full((len(plan.device_pages), self.row_bytes), 0xA5, np.uint8)
            cache = write_rows(cache, plan.device_pages, garbage)  # what a failed copy may leave
        self.cache = cache
        self.ran.append((rid, result))

    def admit(self, tokens, salt, fail_store: bool) -> None:
        rid = f"r{self.n}"
        self.n += 1
        while True:
            before = state(self.m, self.store)
            try:
                req = self.m.add_request(rid, tokens, cache_salt=salt)
                break
            except InsufficientPagesError:
                assert state(self.m, self.store) == before  # nothing taken, nothing pinned
                event("admission failed: no pages")
                if not self.live:
                    return
                self.end(min(self.live, key=lambda r: int(r[1:])))  # a scheduler frees the oldest request's pages
        self.live[rid] = salt
        hashes = self.hashes(salt, tokens[:-1])
        n_dev = req.tokens_from_device // 4
        n_cached = req.num_cached_tokens // 4
        for source, n in req.tokens_from.items():
            if n:
                event(f"hit from {source}")
        assert req.num_cached_tokens <= len(tokens) - 1 and req.num_cached_tokens % 4 == 0
        assert sum(req.tokens_from.values()) == req.num_cached_tokens and set(req.tokens_from) <= set(self.m.sources)
        assert req.block_hashes == hashes[:n_cached] and req.num_committed_blocks == n_cached
        assert req.pages[:n_dev] == [self.m.pool.lookup(h) for h in hashes[:n_dev]]
        want = b"".join(self.expect(self.key(salt, tokens, b)) for b in range(n_dev))
        assert rows_of(self.cache, req.pages[:n_dev]).tobytes() == want  # every device hit: the prefix's bytes
        self.check_touch(rid)
        outside = Counter({k: n for k, n in req.tokens_from.items() if k != "device"})
        planned = Counter({k: 4 * n for k, n in Counter(req.load.sources if req.load else ()).items()})
        assert outside.total() == (n_cached - n_dev) * 4 and planned <= outside  # a partial plan: the held prefix
        self.served.update(req.tokens_from)
        self.recomputed += len(tokens) - req.num_cached_tokens
        self.prompt_tokens += len(tokens)
        if req.load is None:
            assert n_cached == n_dev
            self.compute(rid, req.num_cached_tokens, fail_store)
        else:
            plan = req.load
            assert plan.block_hashes == tuple(hashes[n_dev:n_cached])
            assert plan.device_pages == tuple(req.pages[n_dev:n_cached])
            if plan.num_held < len(plan.block_hashes):
                event("load planned partially (no host slot to promote into)")
            self.planned[rid] = plan

    # -- rules ----------------------------------------------------------------------------------
    @rule(
        system=st.sampled_from(range(len(SYSTEM_PROMPTS))),
        suffix=st.lists(st.integers(0, 3), min_size=1, max_size=9),
        salt=st.sampled_from([None, "t1"]),
        fail_store=FAIL_SOMETIMES,
    )
    def new_request(self, system, suffix, salt, fail_store):
        self.admit(SYSTEM_PROMPTS[system] + suffix, salt, fail_store)

    @precondition(lambda self: self.history)
    @rule(data=st.data(), suffix=st.lists(st.integers(0, 3), min_size=1, max_size=4))
    def conversation_returns(self, data, suffix):
        """A finished request's tokens come back with a new turn: its prefix is on the device, in a tier, or gone."""
        tokens, salt = data.draw(st.sampled_from(self.history))
        self.admit(tokens[:16] + suffix, salt, False)

    @precondition(lambda self: self.planned or self.ran or self.stores)
    @rule(data=st.data())
    def worker_step(self, data):
        """The worker runs some planned loads; some stores and loads it ran complete, late and in any order."""
        for rid in data.draw(st.permutations(sorted(self.planned)), label="loads run"):
            if data.draw(st.sampled_from([True, True, True, False]), label=f"{rid} runs now"):
                self.run_load(rid, data.draw(FAIL_LOAD_SOMETIMES, label=f"{rid} fails"))
        stores = pick_some(data, len(self.stores), "stores")
        done = [self.stores[i] for i in stores]
        self.stores = [h for i, h in enumerate(self.stores) if i not in stores]
        for handle in done:
            self.m.complete_store(handle.result())
        loads = pick_some(data, len(self.ran), "loads")
        finished = [self.ran[i] for i in loads]
        self.ran = [r for i, r in enumerate(self.ran) if i not in loads]
        for rid, result in finished:
            self.complete_load(rid, result)

    @precondition(lambda self: self.lower.rows)
    @rule(data=st.data())
    def lower_tier_loses_a_block(self, data):
        """Often one that a plan not yet run reads (lost between lookup and load), else any."""
        planned = sorted(
            {p.block_hashes[i] for p in self.planned.values() for i in p.promotions} & set(self.lower.rows)
        )
        h = data.draw(st.sampled_from(planned if planned and data.draw(st.booleans()) else sorted(self.lower.rows)))
        del self.lower.rows[h]

    def complete_load(self, rid: str, result: LoadResult) -> None:
        plan = result.plan
        served = dict(self.m.requests[rid].tokens_from) if rid in self.live else {}
        req = self.m.complete_load(result)
        self.completed[result.status] += 1
        if rid not in self.live:
            assert req is None
            event("load completed after finish")
            return
        assert req is self.m.requests[rid] and req.load is None
        n_dev = req.tokens_from_device // 4
        if result.status == "loaded":
            assert req.num_cached_tokens == (n_dev + len(plan.block_hashes)) * 4
            for p, h in zip(plan.device_pages, plan.block_hashes, strict=True):
                assert self.m.pool.lookup(h) is not None
                assert self.m.pool.page_hash[p] in (h, None)
        else:
            # Refused or failed: recompute from the device prefix; nothing of the load is indexed.
            assert req.num_cached_tokens == req.tokens_from_device == n_dev * 4
            assert req.tokens_from == {"device": n_dev * 4}
            assert len(req.block_hashes) == req.num_committed_blocks == n_dev
            assert all(self.m.pool.page_hash[p] is None for p in plan.device_pages)
            self.recomputing.add(rid)
            for name, n in served.items():  # what the tiers were to serve is recomputed instead
                if name != "device":
                    self.served[name] -= n
                    self.recomputed += n
        self.check_touch(rid)
        self.compute(rid, req.num_cached_tokens)

    @precondition(lambda self: any(not self.waiting(r) for r in self.live))
    @rule(data=st.data(), extra=st.lists(st.integers(0, 3), min_size=1, max_size=6), fail_store=FAIL_SOMETIMES)
    def grow(self, data, extra, fail_store):
        rid = data.draw(st.sampled_from(sorted(r for r in self.live if not self.waiting(r))))
        before = len(self.m.requests[rid].token_ids)
        try:
            self.m.append_tokens(rid, extra)
        except InsufficientPagesError:
            return
        self.compute(rid, before, fail_store)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def finish(self, data):
        self.end(data.draw(st.sampled_from(sorted(self.live))))

    def end(self, rid: str) -> None:
        if rid in self.planned:  # the worker already has it: it runs before the abort reaches it
            self.run_load(rid, fail=False)
        self.history.append((list(self.m.requests[rid].token_ids), self.live[rid]))
        self.m.finish(rid)
        del self.live[rid]
        self.recomputing.discard(rid)

    # -- invariants -----------------------------------------------------------------------------
    @invariant()
    def pages_are_consistent(self):
        pool = self.m.pool
        holders: dict[int, int] = {}
        for rid in self.live:
            for p in self.m.requests[rid].pages:
                holders[p] = holders.get(p, 0) + 1
        assert set(self.m.requests) == set(self.live)
        assert NULL_PAGE not in holders
        for p in range(1, pool.num_pages):
            assert pool.ref_counts[p] == holders.get(p, 0) >= 0
            if holders.get(p, 0) > 1:  # shared only as a committed prefix block
                assert pool.page_hash[p] is not None
        assert pool.num_free + pool.num_used == pool.num_pages - 1
        assert set(holders).isdisjoint(pool._free)  # a live request's pages are never evictable
        for h, p in pool.hash_to_page.items():
            assert pool.page_hash[p] == h

    @invariant()
    def bytes_match_the_reference(self):
        rows = rows_of(self.cache, range(NUM_PAGES))
        # Every device-indexed block (a future device hit) holds its prefix's bytes.
        for h, p in self.m.pool.hash_to_page.items():
            assert rows[p].tobytes() == self.expect(self.key_of[h])
        # So does every page of a request that is not waiting for its load.
        for rid, salt in self.live.items():
            req = self.m.requests[rid]
            if req.load is None:
                for b, p in enumerate(req.pages):
                    assert rows[p].tobytes() == self.expect(self.key(salt, req.token_ids, b))
        # And every block any tier holds (a future outside hit).
        for h, slot in self.store.host.held():
            assert self.worker.host.row(slot).tobytes() == self.expect(self.key_of[h])
        for h, row in self.lower.rows.items():
            assert row == self.expect(self.key_of[h])

    @invariant()
    def loads_in_flight_are_not_indexed(self):
        for rid in self.live:
            plan = self.m.requests[rid].load
            if plan is not None:
                assert rid in self.planned or any(r == rid for r, _ in self.ran)
                assert all(self.m.pool.page_hash[p] is None for p in plan.device_pages)

    @invariant()
    def host_slots_are_accounted_for(self):
        """Pins and reservations belong to plans not yet completed, and to nothing else."""
        host = self.store.host
        plans = list(self.planned.values()) + [r.plan for _, r in self.ran]
        pins = Counter(s for p in plans for s, src in zip(p.host_slots, p.sources, strict=True) if src == host.name)
        reserved = {p.host_slots[i] for p in plans for i in p.promotions}
        reserved |= {s for h in self.stores for s in h.plan.host_slots}
        assert dict(host._pins) == dict(pins)
        assert host._reserved == reserved
        free, held = set(host._free), set(host._index.values())
        assert len(host._free) == len(free) and len(free) + len(held) + len(reserved) == host.num_slots
        assert not (free & held) and not (free & reserved) and not (held & reserved)

    @invariant()
    def metrics_add_up(self):
        mt = self.m.metrics
        assert set(mt.tokens_from) == set(self.m.sources) == {"device", "host", "remote"}
        assert all(v >= 0 for v in mt.tokens_from.values())
        assert sum(mt.tokens_from.values()) + mt.tokens_recomputed == mt.prompt_tokens
        assert (mt.tokens_from, mt.tokens_recomputed, mt.prompt_tokens) == (
            dict(self.served),
            self.recomputed,
            self.prompt_tokens,
        )
        assert mt.loads_refused == self.completed["refused"] == self.store.metrics.refused_loads
        assert mt.loads_failed == self.completed["failed"] == self.store.metrics.failed_loads
        for rid in self.recomputing:
            req = self.m.requests[rid]
            assert req.num_cached_tokens == req.tokens_from_device


def pick_some(data, n: int, what: str) -> list[int]:
    """Some of range(n) (maybe none), in a drawn order."""
    if not n:
        return []
    order = data.draw(st.permutations(range(n)), label=f"{what} order")
    picked = order[: data.draw(st.integers(0, n), label=f"{what} completed")]
    if picked:
        event(f"{what} completed out of order" if picked != list(range(len(picked))) else f"{what} completed in order")
    return picked


def _raise(message):
    def fail(*args, **kw):
        raise RuntimeError(message)

    return fail


TestManagerMachine = ManagerMachine.TestCase
TestManagerMachine.settings = settings(
    max_examples=150, stateful_step_count=50, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


class ManagerMachineArrays(ManagerMachine):
    """The same machine over a HostTier holding rows as pinned_host arrays (GPU/TPU's default backend)."""

    host_backend = "arrays"


TestManagerMachineArrays = ManagerMachineArrays.TestCase
TestManagerMachineArrays.settings = settings(
    max_examples=50, stateful_step_count=50, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


def test_cancel_load_frees_the_plan_and_recomputes_without_counting_a_refusal():
    from cachegen import tp_mesh

    params = jaxkv.KVCacheParams(jnp.bfloat16, n_kv_heads=2, head_dim=8, num_layers=1, page_size=4)
    cache = jaxkv.allocate_buffer(params, tp_mesh(1), 8)
    row = jaxkv.RowLayout.of(cache).row_bytes
    store, worker = jaxkv.open_tiers(cache, 4 * row)
    manager = jaxkv.PagedKVCacheManager(cache, store)
    prompt = np.arange(13)
    manager.add_request("a", prompt)
    manager.complete_store(worker.store(cache, manager.commit("a", 13)).result())
    manager.finish("a")
    manager.reset_prefix_cache()  # the device forgets; host memory still holds the 3 blocks
    req = manager.add_request("b", prompt)
    assert req.load is not None and req.tokens_from == {"device": 0, "host": 12}
    pinned = set(req.load.host_slots)
    assert all(store.host._pins.get(s) for s in pinned)
    manager.cancel_load("b")
    assert req.load is None and req.num_cached_tokens == 0 and req.tokens_from == {"device": 0}
    assert not any(store.host._pins.get(s) for s in pinned)
    assert manager.metrics.loads_refused == 0 and store.metrics.refused_loads == 0
    assert manager.metrics.tokens_recomputed == 13 + 13 and manager.metrics.tokens_from["host"] == 0
    with pytest.raises(ValueError, match="has no pending load"):
        manager.cancel_load("b")


# Every test function runs with each HostTier backend (a module-wide pytestmark would reach the state
# machines too, which are unittest cases and take no fixtures: they have a class per backend instead).
for _name, _test in list(globals().items()):
    if _name.startswith("test_") and callable(_test):
        globals()[_name] = pytest.mark.usefixtures("host_backend")(_test)


def test_manager_repr_and_a_float_prompt_names_its_dtype():
    """repr says pages, use, requests and tiers; a float prompt's error names the dtype (issue 24 item 5)."""
    _, _, _, manager = setup()
    manager.add_request("a", list(range(9)))
    assert repr(manager) == "PagedKVCacheManager(16 pages of 4 tokens, 3 in use, 1 live requests, device -> host)"
    assert repr(PagedKVCacheManager(PARAMS, num_pages=4, tp=1)) == (
        "PagedKVCacheManager(4 pages of 4 tokens, 0 in use, 0 live requests, no store)"
    )
    with pytest.raises(ValueError, match=r"got shape \(5,\) dtype float64"):
        manager.add_request("b", np.arange(5, dtype=np.float64))
