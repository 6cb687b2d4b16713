"""Block hashing: the native chain (OpenSSL) and the hashlib one give the digests jaxkv always gave."""

import hashlib
import struct

import numpy as np
import pytest

from jaxkv import _native
from jaxkv.prefix import hashing
from jaxkv.prefix.hashing import hash_blocks, root_hash

FP = hashlib.sha256(b"known-answer").digest()


def reference_hash_blocks(tokens, page_size, parent, extra=b""):
    """The pure-Python chain jaxkv shipped before the native path: token by token, one hashlib call a block."""
    out = []
    for b in range(len(tokens) // page_size):
        block = b"".join(struct.pack("<i", int(t)) for t in tokens[b * page_size : (b + 1) * page_size])
        parent = hashlib.sha256(parent + block + extra).digest()
        out.append(parent)
    return out


@pytest.fixture(params=["native", "hashlib"])
def path(request, monkeypatch):
    """Run a test through the native chain (every length, not only long ones) and through hashlib."""
    if request.param == "hashlib":
        monkeypatch.setattr(hashing, "_native_chain", lambda: None)
    elif not hashing.native_available():
        pytest.skip("native block hashing unavailable (library built without OpenSSL, not built, or JAXKV_NATIVE=0)")
    else:
        monkeypatch.setattr(hashing, "_NATIVE_MIN_BLOCKS", 1)

        def no_fallback(*args):
            raise AssertionError("the native path fell back to hashlib")

        monkeypatch.setattr(hashing, "_chain_hashlib", no_fallback)
    return request.param


def test_known_answer(path):
    # Digests computed by jaxkv before the native path existed: stored hashes must stay valid.
    root = root_hash(7, FP, "tenant")
    assert root.hex() == "e53895ba628b4144b8732eeba814f06779861fbd024c2e3e7943308cc6866c32"
    tokens = np.arange(-40, 40) * 1000003
    assert hash_blocks(tokens, 16, root)[-1].hex() == "f81f653d73e92df610dfb28e4d30a845abed99bccaefd1c99dc6a074af71d3bb"
    last = hash_blocks(tokens, 16, root, extra_keys=b"lora-3")[-1]
    assert last.hex() == "549419c801d587c1df7bc64832387202d99b10b3a8e8d52cda46ae7528427806"


@pytest.mark.parametrize("page_size", [16, 128])
@pytest.mark.parametrize("extra_keys", [None, b"lora-3\x00", "image:ab12", 42])
def test_random_inputs_match_reference(path, page_size, extra_keys):
    rng = np.random.default_rng(page_size)
    extra = hashing._as_bytes("extra_keys", extra_keys)
    for trial in range(20):
        # Lengths with and without a partial tail block, and shorter than a block.
        n_tokens = int(rng.integers(0, 12 * page_size))
        tokens = rng.integers(np.iinfo(np.int32).min, np.iinfo(np.int32).max, n_tokens, dtype=np.int64, endpoint=True)
        parent = rng.bytes(32)
        expected = reference_hash_blocks(tokens.tolist(), page_size, parent, extra)
        got = hash_blocks(tokens, page_size, parent, extra_keys)
        assert got == expected, (trial, n_tokens)
        assert all(type(h) is bytes and len(h) == 32 for h in got)
        # A Python list and an int32 array of the same tokens hash the same.
        assert hash_blocks(tokens.astype(np.int32).tolist(), page_size, parent, extra_keys) == expected
        start = int(rng.integers(0, len(expected) + 2))
        parent_of_start = ([parent, *expected])[min(start, len(expected))]  # past the end: no blocks, any parent
        assert hash_blocks(tokens, page_size, parent_of_start, extra_keys, start_block=start) == expected[start:]


def test_digests_with_nul_bytes_survive(path):
    # The native path turns its output into bytes objects through numpy's void
    # dtype; a digest that ends in 0x00 must keep all 32 bytes.
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 32000, 2000 * 16)
    parent = root_hash(0, FP)
    expected = reference_hash_blocks(tokens.tolist(), 16, parent)
    assert any(h.endswith(b"\x00") for h in expected) and any(h.startswith(b"\x00") for h in expected)
    assert hash_blocks(tokens, 16, parent) == expected


def test_native_and_hashlib_agree_on_a_long_chain(monkeypatch):
    if not hashing.native_available():
        pytest.skip("native block hashing unavailable (library built without OpenSSL, not built, or JAXKV_NATIVE=0)")
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, 128_000, 20_000 * 16)
    parent = root_hash(0, FP, "tenant")
    native = hash_blocks(tokens, 16, parent, b"lora")
    monkeypatch.setattr(hashing, "_native_chain", lambda: None)
    assert hash_blocks(tokens, 16, parent, b"lora") == native


def test_library_without_the_symbol_falls_back_to_hashlib(monkeypatch):
    # A library built without OpenSSL lacks jaxkv_hash_blocks: hashing still works, over hashlib.
    class LibraryWithoutHashing:
        pass

    hashing._native_chain.cache_clear()
    monkeypatch.setattr(_native, "library", lambda: LibraryWithoutHashing())
    try:
        assert not hashing.native_available()
        tokens = np.arange(64)
        assert hash_blocks(tokens, 16, root_hash(0, FP)) == reference_hash_blocks(range(64), 16, root_hash(0, FP))
        monkeypatch.setattr(_native, "library", lambda: None)  # not built, or JAXKV_NATIVE=0
        hashing._native_chain.cache_clear()
        assert not hashing.native_available()
    finally:
        hashing._native_chain.cache_clear()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(token_ids=np.zeros((2, 16))), r"token_ids must have rank 1, got shape \(2, 16\)"),
        (dict(page_size=0), "page_size must be positive, got 0"),
        (dict(parent=b"x" * 31), "parent must be a 32-byte block hash .* got 31 bytes"),
        (dict(parent="ab"), "parent must be a 32-byte block hash .* got str"),
        (dict(start_block=-1), "start_block must be >= 0, got -1"),
        (dict(extra_keys=1.5), "extra_keys must be bytes, str or int, got float"),
    ],
)
def test_argument_errors(path, kwargs, message):
    args = dict(token_ids=np.arange(64), page_size=16, parent=root_hash(0, FP)) | kwargs
    with pytest.raises(ValueError, match=message):
        hash_blocks(**args)


def test_token_ids_past_int32_are_refused_not_wrapped():
    root = root_hash(0, b"\0" * 32)
    with pytest.raises(ValueError, match=r"token_ids contains 4294967297, outside the int32 range"):
        hash_blocks(np.array([1, 2, 3, 2**32 + 1], np.int64), 2, root)
    with pytest.raises(ValueError, match=r"token_ids contains -2147483649"):
        hash_blocks([1, -(2**31) - 1], 2, root)
    assert hash_blocks([1, 2**31 - 1], 2, root) == hash_blocks(np.array([1, 2**31 - 1], np.int64), 2, root)
