"""TinyModel: chunked prefill through the page table, determinism, isolation from other pages, validation."""

import functools
import itertools
import re

import chex
import jax
import numpy as np
import pytest
from cachegen import as_bytes, random_buffer, tp_mesh

from jaxkv import models
from jaxkv.models import TinyConfig, TinyModel

NUM_PAGES = 16
PAGE_SIZE = 8
PROMPT = np.random.default_rng(0).integers(0, 256, size=32)
SPLIT = 20  # mid-page: the second chunk starts inside the prefix's last page
WHOLE = (0, len(PROMPT))
CHUNKED = (0, SPLIT, len(PROMPT))
PAGES = np.array([5, 2, 9, 12, 0, 0], np.int32)  # 32 tokens of 8 need 4 pages; the rest is null padding
OTHER_PAGES = np.array([3, 11, 7, 0, 0, 0], np.int32)  # another sequence, SPLIT tokens
# Shapes are chosen so every test runs two programs per model: 17..32 tokens (bucket 32) and
# the second chunk (bucket 16), each with page tables of width 6 (bucket 8).
TOLERANCE = {"bfloat16": 2e-3, "float8_e4m3fn": 1e-2}  # logits are O(1); a wrong mask moves them by O(1)
CASES = [(kind, dtype, tp) for kind in ("mha", "mla") for dtype in TOLERANCE for tp in (1, 4)]


@functools.cache
def model(kind: str, cache_dtype: str, tp: int) -> TinyModel:
    """One model per case, shared by the tests so each compiles its programs once."""
    return TinyModel(TinyConfig(kind=kind, cache_dtype=cache_dtype, page_size=PAGE_SIZE), tp_mesh(tp))


def prefill_chunks(m: TinyModel, cache, splits=WHOLE):
    """Prefill PROMPT in chunks [splits[i], splits[i+1]) on PAGES; returns (logits of the last chunk, cache)."""
    for start, end in itertools.pairwise(splits):
        logits, cache = m.prefill(cache, PROMPT[start:end], start, PAGES)
    return logits, cache


def sequence_bytes(m: TinyModel, cache) -> list[np.ndarray]:
    """Bytes of the slots PROMPT occupies (values, then scales): [tokens, kv, layers, heads, dim] per kind."""
    page_size = m.config.page_size
    pos = np.arange(len(PROMPT))
    pages, slots = PAGES[pos // page_size], pos % page_size
    arrays = [cache.values] + ([] if cache.scales is None else [cache.scales])
    return [as_bytes(np.asarray(a)[pages, :, :, slots]) for a in arrays]


@pytest.mark.parametrize(("kind", "dtype", "tp"), CASES)
def test_chunked_prefill_matches_whole_prompt(kind, dtype, tp):
    m = model(kind, dtype, tp)
    whole, _ = prefill_chunks(m, m.allocate_cache(NUM_PAGES))
    chunked, cache = prefill_chunks(m, m.allocate_cache(NUM_PAGES), CHUNKED)
    chex.assert_shape(chunked, (len(PROMPT) - SPLIT, m.config.vocab))
    chex.assert_type(chunked, np.float32)
    tol = TOLERANCE[dtype]
    np.testing.assert_allclose(np.asarray(chunked), np.asarray(whole)[SPLIT:], atol=tol, rtol=tol)

    again, cache_again = prefill_chunks(m, m.allocate_cache(NUM_PAGES), CHUNKED)
    chex.assert_trees_all_equal(np.asarray(again), np.asarray(chunked))
    chex.assert_trees_all_equal(as_bytes(cache_again.values), as_bytes(cache.values))
    if cache.scales is not None:
        chex.assert_trees_all_equal(as_bytes(cache_again.scales), as_bytes(cache.scales))


@pytest.mark.parametrize(("kind", "dtype", "tp"), CASES)
def test_other_pages_hold_garbage(kind, dtype, tp):
    """Random bytes (NaN, Inf) everywhere but the slots a sequence writes, and another
    sequence's pages in use: the sequence's logits and K/V bytes do not change by a bit."""
    m = model(kind, dtype, tp)
    clean_logits, clean = prefill_chunks(m, m.allocate_cache(NUM_PAGES), CHUNKED)

    dirty, _, _ = random_buffer(m.cache_params, tp, NUM_PAGES, seed=7)
    other = np.random.default_rng(1).integers(0, 256, size=SPLIT)
    _, dirty = m.prefill(dirty, other, 0, OTHER_PAGES)
    dirty_logits, dirty = prefill_chunks(m, dirty, CHUNKED)

    chex.assert_trees_all_equal(np.asarray(dirty_logits), np.asarray(clean_logits))
    chex.assert_trees_all_equal(sequence_bytes(m, dirty), sequence_bytes(m, clean))


def test_tp_degrees_agree():
    for kind in ("mha", "mla"):
        logits = [
            np.asarray(prefill_chunks(m, m.allocate_cache(NUM_PAGES))[0])
            for m in (model(kind, "bfloat16", tp) for tp in (1, 4))
        ]
        np.testing.assert_allclose(logits[1], logits[0], atol=2e-3, rtol=2e-3, err_msg=kind)


def test_one_program_per_bucket(monkeypatch):
    """Prompt lengths in one power-of-two bucket, with page tables in one width bucket, share a program."""
    # A fresh model whose step traces a _forward allowed one trace: the first prefill's.
    chex.clear_trace_counter()
    monkeypatch.setattr(models, "_forward", chex.assert_max_traces(models._forward, n=1))
    m = TinyModel(TinyConfig(kind="mha", cache_dtype="bfloat16", page_size=PAGE_SIZE), tp_mesh(1))
    _, cache = m.prefill(m.allocate_cache(NUM_PAGES), PROMPT, 0, PAGES)
    for n, table in ((17, PAGES[:5]), (20, PAGES), (25, np.r_[PAGES[:4], 1, 3, 0, 0]), (32, np.r_[PAGES[:4] + 1, 0])):
        logits, cache = m.prefill(cache, PROMPT[:n], 0, table)
        chex.assert_shape(logits, (n, m.config.vocab))
    # A narrower table is its own width bucket: a second trace, which the limit refuses.
    with pytest.raises(AssertionError, match=r"'_forward' is traced > 1 times"):
        m.prefill(cache, PROMPT[:20], 0, PAGES[:3])


def test_model_layout():
    mha, mla = model("mha", "float8_e4m3fn", 4), model("mla", "bfloat16", 4)
    assert (mha.cache_params.n_kv_heads, mha.cache_params.head_dim, mha.cache_params.is_mla) == (4, 32, False)
    assert mha.cache_params.page_size == PAGE_SIZE
    assert mha.cache_params.quant.granularity == 32
    assert (mla.cache_params.n_kv_heads, mla.cache_params.head_dim, mla.cache_params.is_mla) == (1, 128, True)
    assert mla.allocate_cache(3).replicates_kv_across_tp
    assert mha.weights["layers"]["wq"].sharding.spec == jax.sharding.PartitionSpec(None, None, "tp", None)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"kind": "gqa"}, "kind must be one of ('mha', 'mla'), got 'gqa'"),
        ({"d_model": 0}, "d_model must be a positive int, got 0"),
        ({"n_layers": 2.0}, "n_layers must be a positive int, got 2.0"),
        ({"n_heads": 6}, "n_heads (6) must be a multiple of n_kv_heads (4), but 6 % 4 = 2"),
        ({"head_dim": 31}, "head_dim (31) must be even: RoPE rotates pairs of dimensions"),
        ({"kind": "mla", "rope_dim": 3}, "rope_dim (3) must be even"),
        ({"cache_dtype": "fp8"}, "cache_dtype must be one of bfloat16, float16, float32, float8_e4m3fn"),
        ({"seed": -1}, "seed must be a non-negative int, got -1"),
    ],
)
def test_bad_config(fields, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        TinyConfig(**fields)


def test_config_does_not_fit_mesh():
    with pytest.raises(
        ValueError,
        match=re.escape("n_kv_heads (4) must be divisible by the TP degree (8) of mesh axis 'tp', but 4 % 8 = 4"),
    ):
        TinyModel(TinyConfig(), tp_mesh(8))
    with pytest.raises(ValueError, match=re.escape("n_heads (6) must be divisible by the TP degree (4)")):
        TinyModel(TinyConfig(kind="mla", n_heads=6), tp_mesh(4))
    with pytest.raises(ValueError, match="tp_axis 'model' is not an axis of the mesh"):
        TinyModel(TinyConfig(), tp_mesh(2), tp_axis="model")


def test_bad_prefill_inputs():
    m = model("mha", "bfloat16", 1)
    cache = m.allocate_cache(NUM_PAGES)
    cases = [
        (([], 0, PAGES), "token_ids must be a non-empty 1-D sequence of ints"),
        (([1, 256], 0, PAGES), "token_ids contains 256, outside [0, vocab=256)"),
        (([1, 2], -1, PAGES), "start_pos must be a non-negative int, got -1"),
        ((PROMPT, 0, PAGES[:3]), "page_table has 3 pages but positions [0, 32) need ceil(32 / 8) = 4"),
        ((PROMPT, 0, [5, 0, 9, 1]), "page_table[1] is the null page 0, but positions [8, 16) need a real page"),
        ((PROMPT, 0, [5, 2, 5, 1]), "page_table repeats 5"),
        (
            (PROMPT, 0, [5, 2, 1, NUM_PAGES]),
            f"page_table contains {NUM_PAGES}, outside the valid range [0, {NUM_PAGES})",
        ),
    ]
    for (tokens, start, table), message in cases:
        with pytest.raises(ValueError, match=re.escape(message)):
            m.prefill(cache, tokens, start, table)
    with pytest.raises(ValueError, match="does not match this model's cache_params"):
        m.prefill(model("mla", "bfloat16", 1).allocate_cache(NUM_PAGES), PROMPT, 0, PAGES)
    _, new_cache = m.prefill(cache, PROMPT, 0, PAGES)
    with pytest.raises(ValueError, match="cache has been donated"):
        m.prefill(cache, PROMPT, 0, PAGES)
    assert not new_cache.values.is_deleted()
