"""Stored blocks load at any TP degree: the stored form, block identity, disk and remote tiers, the manager.

Every page is compared bit for bit with the same logical cache (the global
arrays `random_buffer` made, random bit patterns with NaN payloads), never
through a float op.
"""

from __future__ import annotations

import hashlib

import jax.numpy as jnp
import numpy as np
import pytest
from cachegen import TP_DEGREES, random_buffer, tp_mesh

from jaxkv import (
    KVCacheParams,
    KVCacheQuantConfig,
    MultiKVCacheBuffer,
    PagedKVCacheManager,
    RowLayout,
    allocate_buffer,
    open_tiers,
)
from jaxkv.tiers.disk import HEADER_BYTES, SUFFIX
from jaxkv.tiers.remote import RemoteTier

BF16 = KVCacheParams(jnp.bfloat16, n_kv_heads=8, head_dim=16, num_layers=2, page_size=4)
FP8 = KVCacheParams(
    jnp.float8_e4m3fn, n_kv_heads=8, head_dim=16, num_layers=2, page_size=4, quant=KVCacheQuantConfig(granularity=8)
)
MLA = KVCacheParams(jnp.bfloat16, n_kv_heads=1, head_dim=24, num_layers=2, page_size=4, is_mla=True)
PAGES = 6


def h(i: int) -> bytes:
    return hashlib.sha256(f"tp block {i}".encode()).digest()


def logical_page(arrays, page: int) -> bytes:
    """The page's bytes in the global arrays: values then scales, `[kv, layers, tokens, heads, dim]` each."""
    return b"".join(np.ascontiguousarray(a[page]).tobytes() for a in arrays if a is not None)


def cache_page(cache, page: int) -> bytes:
    """The same for a cache on the mesh (its global arrays, read as bytes)."""
    return b"".join(np.asarray(a)[page].tobytes() for a in (cache.values, cache.scales) if a is not None)


def host_row(cache, page: int) -> bytes:
    """The TP-local host row: each shard's page, values shards then scales shards (an MLA unit once)."""
    parts = []
    for a in (cache.values, cache.scales):
        if a is None:
            continue
        shards = sorted(a.addressable_shards, key=lambda s: s.index[4].start or 0)
        for s in shards[:1] if cache.replicates_kv_across_tp else shards:
            parts.append(np.asarray(s.data)[page].tobytes())
    return b"".join(parts)


def pairs(params):
    heads = params.n_kv_heads
    return [(a, b) for a in TP_DEGREES for b in TP_DEGREES if heads % a == 0 and heads % b == 0]


# -- the stored form -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("params", [BF16, FP8, MLA], ids=["mha-bf16", "mha-fp8", "mla-bf16"])
def test_stored_form_and_identity_do_not_depend_on_tp(params):
    stored, stored_fps, block_fps, host_fps = {}, set(), set(), set()
    for tp in TP_DEGREES:
        cache, values, scales = random_buffer(params, tp, PAGES, seed=7)  # the same logical cache at every TP
        layout = RowLayout.of(cache)
        assert layout == RowLayout.of(params, tp=tp)
        rows = [np.frombuffer(host_row(cache, p), np.uint8) for p in range(PAGES)]
        out = np.empty(layout.row_bytes, np.uint8)
        back = np.empty(layout.row_bytes, np.uint8)
        pages = []
        for p, row in enumerate(rows):
            layout.stored.to_stored(row, out)
            assert out.tobytes() == logical_page([values, scales], p), (tp, p)  # MAX's TP-1 page
            layout.stored.from_stored(out, back)
            assert back.tobytes() == row.tobytes()
            pages.append(out.tobytes())
        stored[tp] = pages
        stored_fps.add(layout.stored.fingerprint)
        block_fps.add(layout.block_fingerprint)
        host_fps.add(layout.fingerprint)
    assert all(pages == stored[1] for pages in stored.values())
    assert len(stored_fps) == len(block_fps) == 1
    if not params.is_mla:
        assert len(host_fps) == len(TP_DEGREES)  # host rows stay TP-local
    assert RowLayout.of(params, tp=1).stored.identity  # one shard: the host row is the TP-1 page
    assert RowLayout.of(params, tp=2).stored.identity == params.is_mla  # MLA: stored as it is


def test_identity_separates_models():
    base = RowLayout.of(BF16, tp=2)
    others = [
        KVCacheParams(jnp.float16, n_kv_heads=8, head_dim=16, num_layers=2, page_size=4),  # same bytes per page
        KVCacheParams(jnp.bfloat16, n_kv_heads=4, head_dim=32, num_layers=2, page_size=4),  # same too
        KVCacheParams(jnp.bfloat16, n_kv_heads=8, head_dim=16, num_layers=4, page_size=2),  # same too
    ]
    for params in others:
        other = RowLayout.of(params, tp=2)
        assert other.row_bytes == base.row_bytes
        assert other.block_fingerprint != base.block_fingerprint
        assert other.stored.fingerprint != base.stored.fingerprint


def test_multi_cache_rows_convert_per_cache():
    """A MultiKVCacheBuffer row (two caches, one quantized): each cache's heads convert on their own."""
    stored = {}
    for tp in (1, 2, 4):
        a, av, _ = random_buffer(BF16, tp, PAGES, seed=1)
        b, bv, bs = random_buffer(FP8, tp, PAGES, seed=2)
        multi = MultiKVCacheBuffer({"a": a, "b": b})
        layout = RowLayout.of(multi)
        row = np.frombuffer(host_row(a, 3) + host_row(b, 3), np.uint8)
        out = np.empty_like(row)
        layout.stored.to_stored(row, out)
        assert out.tobytes() == logical_page([av], 3) + logical_page([bv, bs], 3)
        stored[tp] = (layout.stored.fingerprint, layout.block_fingerprint)
    assert len(set(stored.values())) == 1


# -- through the tiers ---------------------------------------------------------------------------------------------


def store_at(params, tp, directory, *, seed=11, tiers=()):
    """Offload every page of a random cache at TP `tp` through host and disk (write-through); the logical arrays."""
    cache, values, scales = random_buffer(params, tp, PAGES, seed=seed)
    row = params.host_bytes_per_page(tp)
    store, worker = open_tiers(cache, 2 * row, disk_directory=directory, disk_capacity_bytes=1 << 22, tiers=list(tiers))
    plan = store.prepare_store([h(p) for p in range(PAGES)], list(range(PAGES)))
    result = worker.store(cache, plan).result()
    store.complete_store(result)
    assert all(result.copied)
    worker.close()
    return [values, scales]


def load_at(params, tp, directory, src_pages, dst_pages, *, tiers=()):
    """A fresh cache and store at TP `tp` over the same directory ("a restart"); load, return the cache."""
    cache = allocate_buffer(params, tp_mesh(tp), PAGES)
    store, worker = open_tiers(
        cache,
        8 * params.host_bytes_per_page(tp),
        disk_directory=directory,
        disk_capacity_bytes=1 << 22,
        tiers=list(tiers),
    )
    hashes = [h(p) for p in src_pages]
    plan = store.prepare_load(hashes, dst_pages)
    assert plan.num_held == len(hashes), plan
    cache, handle = worker.load(cache, plan)
    result = handle.result()
    store.complete_load(result)
    assert result.status == "loaded", result
    sources = plan.sources
    worker.close()
    return cache, sources


@pytest.mark.parametrize("params", [BF16, FP8], ids=["mha-bf16", "mha-fp8"])
@pytest.mark.parametrize("a,b", pairs(BF16), ids=lambda x: f"tp{x}")
def test_written_at_tp_a_loads_at_tp_b_from_disk(params, a, b, tmp_path):
    arrays = store_at(params, a, tmp_path / "kv", seed=a * 10 + b)
    files = list((tmp_path / "kv").glob("*" + SUFFIX))
    assert len(files) == PAGES
    src, dst = [4, 0, 5, 2], [1, 3, 0, 5]
    cache, sources = load_at(params, b, tmp_path / "kv", src, dst)
    assert sources == ("disk",) * len(src)
    for s, d in zip(src, dst, strict=True):
        assert cache_page(cache, d) == logical_page(arrays, s), (a, b, s)


@pytest.mark.parametrize("a,b", [(4, 2), (1, 8)], ids=lambda x: f"tp{x}")
def test_conversion_on_the_disk_threads(a, b, disk_threads, tmp_path):
    """The same, with the disk tier converting on its writer threads (each with its own staging row)."""
    arrays = store_at(FP8, a, tmp_path / "kv", seed=3)
    src, dst = [0, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0]
    cache, sources = load_at(FP8, b, tmp_path / "kv", src, dst)
    assert sources == ("disk",) * len(src)
    for s, d in zip(src, dst, strict=True):
        assert cache_page(cache, d) == logical_page(arrays, s)


def test_mla_is_stored_once_and_loads_at_any_tp(tmp_path):
    arrays = store_at(MLA, 4, tmp_path / "kv")
    raw = next((tmp_path / "kv").glob("*" + SUFFIX)).read_bytes()
    assert len(raw) == HEADER_BYTES + MLA.host_bytes_per_page(1)  # one copy, not one per shard
    for b in (1, 2, 8):
        cache, _ = load_at(MLA, b, tmp_path / "kv", [3], [0])
        for shard in cache.values.addressable_shards:
            assert np.asarray(shard.data)[0].tobytes() == np.ascontiguousarray(arrays[0][3]).tobytes()


def test_a_corrupt_stored_block_is_a_miss_at_another_tp(tmp_path):
    store_at(BF16, 2, tmp_path / "kv")
    path = tmp_path / "kv" / (h(1).hex() + SUFFIX)
    raw = bytearray(path.read_bytes())
    raw[HEADER_BYTES + 5] ^= 0x40
    path.write_bytes(bytes(raw))
    cache = allocate_buffer(BF16, tp_mesh(4), PAGES)
    store, worker = open_tiers(cache, 1 << 20, disk_directory=tmp_path / "kv", disk_capacity_bytes=1 << 22)
    plan = store.prepare_load([h(1)], [0])
    before = np.asarray(cache.values).tobytes()
    out, handle = worker.load(cache, plan)
    result = handle.result()
    store.complete_load(result)
    assert result.status == "refused" and out is cache and np.asarray(cache.values).tobytes() == before
    assert store.metrics["disk"].corrupt == 1 and not path.exists()
    assert h(1) not in store.lower["disk"]  # the index learned the block is gone
    worker.close()


@pytest.mark.parametrize("a,b", [(4, 2), (1, 8), (8, 1)], ids=lambda x: f"tp{x}")
def test_written_at_tp_a_loads_at_tp_b_from_the_remote_tier(a, b, redis_server, tmp_path):
    """Two instances at different TP share one server: the second is served what the first wrote."""
    arrays = store_at(FP8, a, tmp_path / "a", tiers=[RemoteTier(redis_server.url, prefix="tp:")])
    src, dst = [5, 1, 2], [0, 4, 2]
    cache, sources = load_at(FP8, b, tmp_path / "b", src, dst, tiers=[RemoteTier(redis_server.url, prefix="tp:")])
    assert sources == ("remote",) * len(src)
    for s, d in zip(src, dst, strict=True):
        assert cache_page(cache, d) == logical_page(arrays, s)


# -- the manager ---------------------------------------------------------------------------------------------------


def test_manager_hashes_do_not_depend_on_tp():
    tokens = list(range(40))
    roots = set()
    for tp in TP_DEGREES:
        m = PagedKVCacheManager(BF16, num_pages=32, tp=tp)
        roots.add(m.add_request("r", tokens).root)
    assert len(roots) == 1
    other = PagedKVCacheManager(FP8, num_pages=32, tp=2)
    assert other.add_request("r", tokens).root not in roots


# -- the conversion kernel -----------------------------------------------------------------------------------------


def test_native_and_numpy_conversions_agree(monkeypatch):
    from jaxkv import _native as native

    layout = RowLayout.of(FP8, tp=2)
    rng = np.random.default_rng(5)
    row = rng.integers(0, 256, layout.row_bytes, dtype=np.uint8)
    outs = {}
    for path in ("native", "numpy"):
        if path == "numpy":
            monkeypatch.setattr(native, "transpose_chunks", lambda *a, **k: False)
        elif not native.available():
            continue
        stored, back = np.empty_like(row), np.empty_like(row)
        layout.stored.to_stored(row, stored)
        layout.stored.from_stored(stored, back)
        assert back.tobytes() == row.tobytes()
        outs[path] = stored.tobytes()
    assert len(set(outs.values())) == 1


def test_native_conversion_rejects_bad_buffers():
    from jaxkv import _native as native

    src = np.zeros(3 * 4 * 16, np.uint8)
    with pytest.raises(ValueError, match=r"dst must be a contiguous uint8 array of 192 bytes, got uint8 array of 191"):
        native.transpose_chunks(np.zeros(191, np.uint8), src, 3, 4, 16)
    with pytest.raises(ValueError, match=r"src must be a contiguous uint8 array of 192 bytes, got int16"):
        native.transpose_chunks(np.zeros(192, np.uint8), src.view(np.int16), 3, 4, 16)
    readonly = np.zeros(192, np.uint8)
    readonly.flags.writeable = False
    with pytest.raises(ValueError, match="dst must be writeable"):
        native.transpose_chunks(readonly, src, 3, 4, 16)


@pytest.mark.parametrize("chunk", [1, 16, 32, 96, 1024])
def test_native_transpose_is_exact(chunk):
    from jaxkv import _native as native

    if not native.available():
        pytest.skip("native library not built")
    rows, cols = 5, 7
    src = np.random.default_rng(chunk).integers(0, 256, rows * cols * chunk, dtype=np.uint8)
    dst = np.empty_like(src)
    assert native.transpose_chunks(dst, src, rows, cols, chunk)
    assert dst.tobytes() == np.ascontiguousarray(src.reshape(rows, cols, chunk).transpose(1, 0, 2)).tobytes()
