"""Adopted caches: an engine's own page-major arrays through host, disk and the remote tier, bit-exact.

The layouts are the engines' own, built here on 8 simulated CPU devices:
tpu-inference's per-layer fused K/V cache `(blocks, block_size, cdiv(2 *
kv_heads, packing), packing, head_dim)` sharded on axis 2 (bf16: packing 2;
fp8: packing 4), an MLA latent replicated on every device, a MaxText-style
cache with one key and one value array per layer (heads on axis 2), an FP8
cache with per-head scales, and jaxkv's own layout adopted as a plain array.
Pages hold random bit patterns (NaN payloads included) and are compared as
bytes of the logical (global) arrays.
"""

from __future__ import annotations

import functools
import hashlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cachegen import random_bits
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxkv
from jaxkv import HostTier, OffloadWorker, PagedKVCacheManager, RowLayout, TieredStore, adopt, open_tiers
from jaxkv.layout.pages import word_dtype

NUM_PAGES = 12
BLOCK = 4  # tokens per page


def h(i: int) -> bytes:
    return hashlib.sha256(f"adopted block {i}".encode()).digest()


def mesh_of(tp: int) -> jax.sharding.Mesh:
    return jax.make_mesh((tp,), ("model",), devices=jax.devices()[:tp])


def place(array: np.ndarray, tp: int, shard_axis: int | None) -> jax.Array:
    spec = [None] * array.ndim
    if shard_axis is not None:
        spec[shard_axis] = "model"
    return jax.device_put(array, NamedSharding(mesh_of(tp), P(*spec)))


# Each layout: (per-array global shapes and dtypes, shard axis); `scales` for the FP8 one.
LAYOUTS = {
    # tpu-inference: 8 KV heads, fused K/V (16 heads) packed by 2 (bf16) or 4 (fp8) along axis 3.
    "tpu-inference-bf16": ([((NUM_PAGES, BLOCK, 8, 2, 16), jnp.bfloat16)] * 3, 2),
    "tpu-inference-fp8": ([((NUM_PAGES, BLOCK, 4, 4, 16), jnp.float8_e4m3fn)] * 3, 2),
    "mla-latent": ([((NUM_PAGES, BLOCK, 96), jnp.bfloat16)] * 2, None),
    "maxtext-k-v": ([((NUM_PAGES, BLOCK, 4, 16), jnp.bfloat16)] * 4, 2),
    "fp8-scales": ([((NUM_PAGES, BLOCK, 4, 16), jnp.float8_e5m2)] * 2, 2),
    "jaxkv-own": ([((NUM_PAGES, 2, 2, BLOCK, 8, 16), jnp.bfloat16)], 4),
}
IDS = list(LAYOUTS)


def logical(name: str, seed: int) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
    """The layout's arrays (and scales) as global numpy arrays of random bits."""
    shapes, _ = LAYOUTS[name]
    rng = np.random.default_rng(seed)
    arrays = [random_bits(shape, dtype, rng) for shape, dtype in shapes]
    if name != "fp8-scales":
        return arrays, None
    return arrays, [random_bits((NUM_PAGES, BLOCK, 4, 1), np.float32, rng) for _ in arrays]


def build(name: str, tp: int, seed: int) -> jaxkv.AdoptedCache:
    arrays, scales = logical(name, seed)
    _, axis = LAYOUTS[name]
    placed = [place(a, tp, axis) for a in arrays]
    placed_scales = None if scales is None else [place(s, tp, axis) for s in scales]
    return adopt(placed, page_size=BLOCK, shard_axis=axis, scales=placed_scales)


def page(cache: jaxkv.AdoptedCache, p: int) -> bytes:
    """One logical page of every array (and its scales), as bytes."""
    out = []
    for child in cache.children.values():
        for a in (child.values, child.scales):
            if a is not None:
                out.append(np.asarray(jax.device_get(a))[p].tobytes())
    return b"".join(out)


def _zero_page_0(a: jax.Array) -> jax.Array:
    # Through the bits: on XLA:CPU a typed bf16/fp8 scatter converts the array through float32 and would
    # quiet NaN payloads in pages it never wrote (the engine's own step is the engine's business).
    word = word_dtype(a.dtype)
    bits = jax.lax.bitcast_convert_type(a, word)
    return jax.lax.bitcast_convert_type(bits.at[0].set(jnp.zeros_like(bits[0])), a.dtype)


@functools.partial(jax.jit, donate_argnums=0)
def user_step(cache: jaxkv.AdoptedCache) -> jaxkv.AdoptedCache:
    """The engine's own jitted step between jaxkv's calls: the cache donated, page 0 written."""
    return jax.tree.map(_zero_page_0, cache)


def store_and_load(store, worker, source, target, src_pages, dst_pages, hashes, load=None):
    """Store `src_pages` under `hashes`, run the user's step, load `load` (indices into them) into `dst_pages`."""
    plan = store.prepare_store(hashes, src_pages)
    store.complete_store(worker.store(source, plan).result())
    target = user_step(target)
    load = range(len(hashes)) if load is None else load
    plan = store.prepare_load([hashes[i] for i in load], dst_pages)
    target, handle = worker.load(target, plan)
    result = handle.result()
    store.complete_load(result)
    return target, result


@pytest.mark.parametrize("name", IDS)
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_round_trip_through_host_and_disk_is_bit_exact(name, tp, tmp_path):
    source = build(name, tp, seed=1)
    target = build(name, tp, seed=2)
    before = [page(target, p) for p in range(NUM_PAGES)]
    row = RowLayout.of(source).row_bytes
    store, worker = open_tiers(source, 3 * row, disk_directory=tmp_path, disk_capacity_bytes=64 * (row + 96))
    src_pages, dst_pages = [1, 2, 3, 5, 7], [11, 10, 9]
    hashes = [h(i) for i in range(5)]
    target, result = store_and_load(store, worker, source, target, src_pages, dst_pages, hashes, load=[0, 3, 4])
    assert result.status == "loaded" and result.plan.sources == ("disk", "host", "host")
    for s, d in zip([1, 5, 7], dst_pages, strict=True):
        assert page(target, d) == page(source, s)
    for p in (1, 2, 3, 4, 5, 6, 7, 8):  # untouched pages kept their bytes
        assert page(target, p) == before[p]
    assert isinstance(target, jaxkv.AdoptedCache) and len(target.arrays) == len(source.arrays)
    worker.close()


@pytest.mark.parametrize("name", ["tpu-inference-bf16", "mla-latent", "fp8-scales"])
def test_round_trip_through_the_remote_tier_is_bit_exact(name, redis_server):
    from jaxkv.tiers.remote import RemoteTier

    source, target = build(name, 2, seed=3), build(name, 2, seed=4)
    row = RowLayout.of(source).row_bytes
    worker = OffloadWorker(source, [HostTier(3 * row), RemoteTier(redis_server.url, prefix=f"adopted-{name}:")])
    store = TieredStore(worker.spec(), probe=worker.probe)
    hashes = [h(i) for i in range(3)]
    store.complete_store(worker.store(source, store.prepare_store(hashes, [1, 2, 3])).result())
    store.host.clear()  # host memory forgets them: the remote tier serves all three
    target = user_step(target)
    target, handle = worker.load(target, store.prepare_load(hashes, [9, 10, 11]))
    result = handle.result()
    store.complete_load(result)
    assert result.status == "loaded" and result.plan.sources == ("remote",) * 3
    assert [page(target, p) for p in (9, 10, 11)] == [page(source, p) for p in (1, 2, 3)]
    worker.close()


@pytest.mark.parametrize("name", ["tpu-inference-bf16", "maxtext-k-v", "mla-latent"])
@pytest.mark.parametrize("stored_tp, loaded_tp", [(4, 2), (4, 1), (2, 4)])
def test_blocks_stored_at_one_tp_load_at_another(name, stored_tp, loaded_tp, tmp_path):
    """The stored form gathers each array's shards into its TP-1 page: bytes independent of the TP degree."""
    source = build(name, stored_tp, seed=5)
    row = RowLayout.of(source).row_bytes
    store, worker = open_tiers(source, 2 * row, disk_directory=tmp_path, disk_capacity_bytes=1 << 22)
    hashes = [h(i) for i in range(4)]
    store.complete_store(worker.store(source, store.prepare_store(hashes, [1, 2, 3, 4])).result())
    worker.close()

    target = build(name, loaded_tp, seed=6)
    row = RowLayout.of(target).row_bytes
    store, worker = open_tiers(target, 4 * row, disk_directory=tmp_path, disk_capacity_bytes=1 << 22)
    assert store.lookup(hashes) == ["disk"] * 4
    target, handle = worker.load(target, store.prepare_load(hashes, [8, 9, 10, 11]))
    assert handle.result().status == "loaded"
    assert [page(target, p) for p in (8, 9, 10, 11)] == [page(source, p) for p in (1, 2, 3, 4)]
    worker.close()


def test_block_identity_does_not_depend_on_tp():
    layouts = [RowLayout.of(build("tpu-inference-bf16", tp, seed=0)) for tp in (1, 2, 4)]
    assert len({lay.block_fingerprint for lay in layouts}) == 1
    assert len({lay.stored.fingerprint for lay in layouts}) == 1
    assert len({lay.fingerprint for lay in layouts}) == 3  # host rows are TP-local
    assert layouts[2].stored.identity is False and layouts[0].stored.identity is True
    # Another engine layout with the same bytes per page is another model: other fingerprints.
    other = RowLayout.of(build("maxtext-k-v", 2, seed=0))
    assert other.block_fingerprint != layouts[0].block_fingerprint


def test_jaxkv_layout_adopted_keeps_its_stored_bytes(tmp_path):
    """jaxkv's own cache adopted as a plain array (heads on axis 4): the stored form is MAX's TP-1 page."""
    params = jaxkv.KVCacheParams(jnp.bfloat16, n_kv_heads=8, head_dim=16, num_layers=2, page_size=BLOCK)
    buffer = jaxkv.allocate_buffer(params, jax.make_mesh((4,), ("tp",), devices=jax.devices()[:4]), NUM_PAGES)
    adopted = adopt([buffer.values], page_size=BLOCK, shard_axis=4)
    assert RowLayout.of(adopted).row_bytes == RowLayout.of(buffer).row_bytes
    assert RowLayout.of(adopted).stored.runs[0].full_shape == (2, 2, BLOCK, 8, 16)


def test_the_manager_pages_an_adopted_cache(tmp_path):
    source = build("tpu-inference-fp8", 4, seed=7)
    row = RowLayout.of(source).row_bytes
    store, worker = open_tiers(source, 4 * row, disk_directory=tmp_path, disk_capacity_bytes=1 << 22)
    manager = PagedKVCacheManager(source, store)
    assert manager.page_size == BLOCK and manager.pool.num_pages == NUM_PAGES
    prompt = np.arange(13)
    manager.add_request("a", prompt)
    plan = manager.commit("a", 13)
    assert plan is not None and len(plan.block_hashes) == 3
    manager.complete_store(worker.store(source, plan).result())
    manager.finish("a")
    manager.reset_prefix_cache()
    again = manager.add_request("b", prompt)
    assert again.tokens_from == {"device": 0, "host": 12}
    cache, handle = worker.load(source, again.load)
    manager.complete_load(handle.result())
    assert [page(cache, p) for p in again.pages[:3]] == [
        page(build("tpu-inference-fp8", 4, 7), p) for p in plan.device_pages
    ]
    worker.close()


def test_bad_layouts_are_refused_naming_the_array_and_axis():
    good = [place(np.zeros((NUM_PAGES, BLOCK, 8, 2, 16), np.float32), 2, 2) for _ in range(2)]
    with pytest.raises(ValueError, match=r"page_axis must be 0: .* got page_axis=1"):
        adopt(good, page_size=BLOCK, shard_axis=2, page_axis=1)
    sharded_pages = place(np.zeros((NUM_PAGES, BLOCK, 8), np.float32), 2, 0)
    with pytest.raises(ValueError, match=r"arrays\['0'\].values is sharded on its page axis \(axis 0"):
        adopt([sharded_pages], page_size=BLOCK, shard_axis=2)
    with pytest.raises(ValueError, match=r"arrays\['0'\].values must be sharded on shard_axis 3 only, got axis 2"):
        adopt(good, page_size=BLOCK, shard_axis=3)
    with pytest.raises(ValueError, match=r"arrays\['0'\].values is sharded on axis 2 .* but shard_axis is None"):
        adopt(good, page_size=BLOCK)
    short = place(np.zeros((NUM_PAGES - 1, BLOCK, 8, 2, 16), np.float32), 2, 2)
    with pytest.raises(ValueError, match=r"arrays\['1'\] has 11 pages but arrays\['0'\] has 12"):
        adopt([good[0], short], page_size=BLOCK, shard_axis=2)
    with pytest.raises(ValueError, match=r"arrays\['0'\].values must be a jax.Array, got ndarray"):
        adopt([np.zeros((4, 4))], page_size=BLOCK)
    with pytest.raises(ValueError, match="shard_axis must be an int >= 1"):
        adopt(good, page_size=BLOCK, shard_axis=0)
    with pytest.raises(ValueError, match="page_size must be a positive int, got 0"):
        adopt(good, page_size=0, shard_axis=2)
    with pytest.raises(ValueError, match=r"scales must pair up with arrays"):
        adopt(good, page_size=BLOCK, shard_axis=2, scales=good[:1])
    with pytest.raises(ValueError, match=r"arrays\['0'\] has 5 axes; shard_axis 7"):
        adopt(good, page_size=BLOCK, shard_axis=7)
