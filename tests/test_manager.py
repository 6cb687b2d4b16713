import hashlib

import jax.numpy as jnp
import numpy as np
import pytest
from cachegen import random_buffer
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from jaxkv import (
    NULL_PAGE,
    BlockPool,
    ConnectorMetrics,
    HostConnector,
    InsufficientPagesError,
    KVCacheParams,
    KVConnector,
    KVLoadRefused,
    PagedKVCacheManager,
    hash_blocks,
    root_hash,
)

PARAMS = KVCacheParams(jnp.bfloat16, n_kv_heads=2, head_dim=8, num_layers=1, page_size=4)
FP = hashlib.sha256(b"layout").digest()


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


# -- manager -------------------------------------------------------------------


def run_request(manager, rid, tokens, **kw):
    """Admit, 'compute' the whole prompt, commit, finish."""
    req = manager.add_request(rid, tokens, **kw)
    manager.commit(rid, len(tokens))
    manager.finish(rid)
    return req


def test_prefix_hit_on_device_and_last_token_rule():
    m = PagedKVCacheManager(PARAMS, num_pages=32)
    system = list(range(100, 112))  # 3 full blocks
    first = run_request(m, "a", system + [1, 2, 3, 4, 5])
    assert first.num_cached_tokens == 0 and m.metrics.blocks_committed == 4
    second = m.add_request("b", system + [1, 2, 3, 4, 9, 9])
    assert second.num_cached_tokens == 16 and second.tokens_from_device == 16
    assert second.pages[:4] == first.pages[:4]
    # A prompt that is exactly cached blocks still computes its last token.
    third = m.add_request("c", system)
    assert third.num_cached_tokens == 8 and len(third.pages) == 3
    assert m.metrics.tokens_recomputed == 17 + 2 + 4
    np.testing.assert_array_equal(m.page_table("c", width=5), third.pages + [NULL_PAGE] * 2)


def test_insufficient_pages_leaks_nothing():
    m = PagedKVCacheManager(PARAMS, num_pages=6)  # 5 usable pages
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
    m = PagedKVCacheManager(PARAMS, num_pages=32)
    tokens = list(range(20))
    run_request(m, "a", tokens, cache_salt="tenant-a")
    assert m.add_request("b", tokens, cache_salt="tenant-b").num_cached_tokens == 0
    assert m.add_request("c", tokens, cache_salt="tenant-a").num_cached_tokens == 16


def test_layout_fingerprint_change_invalidates_everything(tmp_path):
    src, _, _ = random_buffer(PARAMS, 2, 16)
    conn = HostConnector(src, 1 << 20)
    m = PagedKVCacheManager(src, conn)
    run_request(m, "a", list(range(17)))
    other_params = KVCacheParams(jnp.float16, n_kv_heads=2, head_dim=8, num_layers=1, page_size=4)
    other = PagedKVCacheManager(other_params, num_pages=16)
    assert other.fingerprint != m.fingerprint
    assert root_hash(0, other.fingerprint) != root_hash(0, m.fingerprint)


def test_manager_with_a_real_connector_serves_host_hits_bit_exact():
    src, _, _ = random_buffer(PARAMS, 2, 8)
    conn = HostConnector(src, 1 << 20)
    m = PagedKVCacheManager(src, conn)
    prompt = list(range(13))  # 3 full blocks + 1
    first = m.add_request("a", prompt)
    m.commit("a", 13)
    want = [np.asarray(conn.buffer.values)[p].tobytes() for p in first.pages[:3]]
    m.finish("a")
    # Push the blocks out of device memory: allocate every page.
    filler = m.add_request("fill", [5] * 28)
    m.finish("fill")
    again = m.add_request("b", prompt)
    assert again.tokens_from_device == 0 and again.tokens_from_host == 12 and again.num_cached_tokens == 12
    again.load.synchronize()
    got = [np.asarray(conn.buffer.values)[p].tobytes() for p in again.pages[:3]]
    assert got == want
    assert m.metrics.tokens_from_host == 12 and filler.num_cached_tokens == 0


def test_unexpected_connector_error_rolls_back_the_allocation():
    class Broken(FakeConnector):
        def load(self, device_page_ids, block_hashes, *, buffer=None):
            raise RuntimeError("TP group out of step")

    pages: dict = {}
    conn = Broken(pages)
    m = PagedKVCacheManager(PARAMS, conn, num_pages=16)
    prompt = list(range(13))
    req = m.add_request("a", prompt)
    pages.update((p, ("bytes of", p)) for p in req.pages)  # the model wrote the pages
    m.commit("a", 13)  # offloads the 3 full blocks to the connector
    assert len(conn.store) == 3
    m.finish("a")
    m.reset_prefix_cache()  # force the next request to the connector
    before = (m.pool.num_free, list(m.pool.ref_counts))
    with pytest.raises(RuntimeError, match="TP group out of step"):
        m.add_request("b", prompt)
    assert (m.pool.num_free, list(m.pool.ref_counts)) == before and "b" not in m.requests


# -- property-based: random interleavings against a reference model ------------------


class FakeConnector(KVConnector):
    """A dict-backed connector that writes 'content' into the test's page store."""

    def __init__(self, pages: dict):
        self.metrics = ConnectorMetrics()
        self.store: dict[bytes, tuple] = {}
        self.tier: dict[bytes, str] = {}
        self.pages = pages
        self.refuse = False

    def lookup(self, block_hashes) -> int:
        n = 0
        for h in block_hashes:
            if h not in self.store:
                self.metrics.misses += 1
                break
            if self.tier[h] == "host":
                self.metrics.host_hits += 1
            else:
                self.metrics.disk_hits += 1
            n += 1
        return n

    def load(self, device_page_ids, block_hashes, *, buffer=None):
        if self.refuse or any(h not in self.store for h in block_hashes):
            raise KVLoadRefused("refused")
        for p, h in zip(device_page_ids, block_hashes, strict=True):
            self.pages[p] = self.store[h]
        return None

    def offload(self, device_page_ids, block_hashes, *, buffer=None):
        for p, h in zip(device_page_ids, block_hashes, strict=True):
            if h not in self.store:
                self.store[h] = self.pages[p]
                self.tier[h] = "host" if len(self.store) % 2 else "disk"

    def touch(self, block_hashes) -> None:
        pass

    def reset(self) -> None:
        self.store.clear()


SYSTEM_PROMPTS = [list(range(1, 10)), list(range(50, 58)), []]


class ManagerMachine(RuleBasedStateMachine):
    """Random requests, growth, finishes, evictions and refusals against a reference model."""

    def __init__(self):
        super().__init__()
        self.pages: dict[int, tuple] = {}  # page -> (salt, token prefix) the model wrote there
        self.connector = FakeConnector(self.pages)
        self.m = PagedKVCacheManager(PARAMS, self.connector, num_pages=10)  # small: evictions happen
        self.live: dict[str, tuple] = {}  # rid -> salt
        self.n = 0

    def expected(self, salt, tokens, block: int) -> tuple:
        return (salt, tuple(tokens[: (block + 1) * 4]))

    def compute(self, rid: str, start: int) -> None:
        """The model writes K/V for tokens[start:] into the request's pages."""
        req, salt = self.m.requests[rid], self.live[rid]
        for block in range(start // 4, len(req.pages)):
            self.pages[req.pages[block]] = self.expected(salt, req.token_ids, block)
        self.m.commit(rid, len(req.token_ids))

    @rule(
        system=st.sampled_from(range(len(SYSTEM_PROMPTS))),
        suffix=st.lists(st.integers(0, 3), min_size=1, max_size=9),
        salt=st.sampled_from([None, "t1"]),
    )
    def new_request(self, system, suffix, salt):
        tokens = SYSTEM_PROMPTS[system] + suffix
        rid = f"r{self.n}"
        self.n += 1
        try:
            req = self.m.add_request(rid, tokens, cache_salt=salt)
        except InsufficientPagesError:
            return
        self.live[rid] = salt
        event("device hit" if req.tokens_from_device else "no device hit")
        event(
            "outside load" if req.load is not None or req.tokens_from_host + req.tokens_from_disk else "no outside load"
        )
        assert req.num_cached_tokens <= len(tokens) - 1  # at least one token computed
        assert req.num_cached_tokens % 4 == 0
        for block in range(req.num_cached_tokens // 4):  # every hit holds this prefix's bytes
            assert self.pages[req.pages[block]] == self.expected(salt, tokens, block)
        self.compute(rid, req.num_cached_tokens)

    @precondition(lambda self: self.live)
    @rule(data=st.data(), extra=st.lists(st.integers(0, 3), min_size=1, max_size=6))
    def grow(self, data, extra):
        rid = data.draw(st.sampled_from(sorted(self.live)))
        before = len(self.m.requests[rid].token_ids)
        try:
            self.m.append_tokens(rid, extra)
        except InsufficientPagesError:
            return
        self.compute(rid, before)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def finish(self, data):
        rid = data.draw(st.sampled_from(sorted(self.live)))
        self.m.finish(rid)
        del self.live[rid]

    @rule(refuse=st.booleans())
    def connector_refuses(self, refuse):
        self.connector.refuse = refuse

    @precondition(lambda self: self.connector.store)
    @rule(data=st.data())
    def connector_evicts(self, data):
        h = data.draw(st.sampled_from(sorted(self.connector.store)))
        del self.connector.store[h]

    @invariant()
    def pages_are_consistent(self):
        pool = self.m.pool
        holders: dict[int, int] = {}
        for rid in self.live:
            for p in self.m.requests[rid].pages:
                holders[p] = holders.get(p, 0) + 1
        assert NULL_PAGE not in holders
        for p in range(1, pool.num_pages):
            assert pool.ref_counts[p] == holders.get(p, 0) >= 0
            if holders.get(p, 0) > 1:  # shared only as a committed prefix block
                assert pool.page_hash[p] is not None
        assert pool.num_free + pool.num_used == pool.num_pages - 1
        assert set(holders).isdisjoint(pool._free)  # a live request's pages are never evictable
        for h, p in pool.hash_to_page.items():
            assert pool.page_hash[p] == h


TestManagerMachine = ManagerMachine.TestCase
TestManagerMachine.settings = settings(
    max_examples=150, stateful_step_count=50, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
