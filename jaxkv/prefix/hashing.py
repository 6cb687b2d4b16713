"""Block hashes: the identity of a full page of tokens and everything before it.

```
root    = SHA-256("jaxkv-root-v1" | seed | block fingerprint | cache_salt)
hash[0] = SHA-256(root    | tokens[0 : P]      | extra keys)
hash[i] = SHA-256(hash[i-1] | tokens[iP : (i+1)P] | extra keys)
```

Chaining makes a block's hash depend on its whole prefix, so equal hashes
mean equal K/V (for the same model and layout). The seed is per deployment,
the block fingerprint (`RowLayout.block_fingerprint`: the model's page
geometry, not the TP degree) ties blocks to the model, and a request's `cache_salt`
keeps tenants apart: different salts never share a block. Token ids enter as
little-endian int32 bytes; extra keys (LoRA id, image digests, ...) as bytes.

A request's chain runs in one call to jaxkv's native library
(`jaxkv/_native/block_hash.cc`, OpenSSL's SHA-256) when it was built with
OpenSSL, else in Python over `hashlib`: the same digests either way, the
native chain the faster (docs/benchmarks.md, "Block hashing against MAX
26.7"). `JAXKV_NATIVE=0` forces the hashlib path.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib

import numpy as np

BLOCK_HASH_BYTES = 32
"""Bytes of a block hash: a SHA-256 digest. Tiers key their rows by it."""

# Below this many blocks the hashlib loop wins: the native call's fixed cost
# (ctypes, buffers) is about two hashlib calls. Measured through hash_blocks:
# docs/benchmarks.md, "Measurements behind the rules", "Block hashing".
_NATIVE_MIN_BLOCKS = 3

# The native chain takes its counts as C ints; a chain of more bytes (2 GiB of
# tokens, never seen in practice) goes through hashlib.
_NATIVE_MAX_COUNT = 2**31 - 1

_DIGEST = np.dtype(f"V{BLOCK_HASH_BYTES}")


def _as_bytes(name: str, value) -> bytes:
    if value is None:
        return b""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, int) and not isinstance(value, bool):
        return value.to_bytes(16, "little", signed=True)
    raise ValueError(f"{name} must be bytes, str or int, got {type(value).__name__}")


def root_hash(seed, fingerprint: bytes, cache_salt=None) -> bytes:
    """The parent of a request's first block: deployment seed, layout fingerprint and tenant salt."""
    salt = _as_bytes("cache_salt", cache_salt)
    parts = [b"jaxkv-root-v1", _as_bytes("seed", seed), fingerprint]
    # Length-prefix the salt so ("ab", "") and ("a", "b") cannot collide.
    return hashlib.sha256(b"".join(parts) + len(salt).to_bytes(8, "little") + salt).digest()


@functools.cache
def _native_chain():
    """`jaxkv_hash_blocks` of the native library (a ctypes function), or None where it was not built.

    None when the library is absent or off (`jaxkv._native.library()`), or was
    built without OpenSSL (the symbol is missing).
    """
    from jaxkv import _native

    lib = _native.library()
    if lib is None or not hasattr(lib, "jaxkv_hash_blocks"):
        return None
    fn = lib.jaxkv_hash_blocks
    # No argtypes: the counts are C ints (block_hash.cc says why), the buffers
    # bytes objects and a ctypes char array, all of which ctypes passes as they are.
    fn.restype = ctypes.c_int
    return fn


def native_available() -> bool:
    """Whether `hash_blocks` runs its chains in the native library (OpenSSL) rather than over hashlib."""
    return _native_chain() is not None


def backend() -> str:
    """Which SHA-256 `hash_blocks` runs on, for benchmark conditions and logs."""
    if _native_chain() is None:
        import ssl

        # hashlib.sha256 is OpenSSL's unless CPython was built without it.
        uses_openssl = hashlib.sha256.__name__.startswith("openssl")
        return f"hashlib ({ssl.OPENSSL_VERSION if uses_openssl else 'CPython built-in SHA-256'})"
    from jaxkv import _native

    lib = _native.library()
    assert lib is not None  # `_chain` chose the native path only because the library loaded
    version = lib.jaxkv_hash_openssl_version
    version.restype = ctypes.c_char_p
    return f"jaxkv native ({version().decode()})"


def _chain_hashlib(raw: bytes, width: int, parent: bytes, extra: bytes) -> list[bytes]:
    out = []
    sha = hashlib.sha256
    for i in range(0, len(raw), width):
        parent = sha(parent + raw[i : i + width] + extra).digest()
        out.append(parent)
    return out


def _chain_native(chain, raw: bytes, width: int, parent: bytes, extra: bytes) -> list[bytes]:
    n = len(raw) // width
    # A power-of-two capacity: ctypes keeps every array type it ever made, one
    # per length, so exact lengths would grow that cache with each new one.
    out = (ctypes.c_char * (BLOCK_HASH_BYTES << (n - 1).bit_length()))()
    if chain(raw, n, width, parent, extra, len(extra), out) != 0:
        raise RuntimeError(f"OpenSSL's SHA-256 failed while hashing {n} blocks in jaxkv's native library")
    # One 32-byte bytes object per void item, NUL bytes kept: several times
    # cheaper than slicing a bytes object per block (docs/benchmarks.md, "Block hashing").
    return np.frombuffer(memoryview(out), _DIGEST)[:n].tolist()


def hash_blocks(token_ids, page_size: int, parent: bytes, extra_keys=None, *, start_block: int = 0) -> list[bytes]:
    """Chained hashes of the full blocks of `token_ids`, from block `start_block` on.

    `parent` is the 32-byte hash of block `start_block - 1` (the root for 0).
    A trailing partial block gets no hash. One SHA-256 over (parent, block
    bytes, extra) per block, in the native library or over hashlib (blocks per
    second of both: docs/benchmarks.md, "Block hashing against MAX 26.7").
    """
    given = np.asarray(token_ids)
    if given.dtype.kind in "iu" and given.size and (given.min() < -(2**31) or given.max() >= 2**31):
        bad = given.min() if given.min() < -(2**31) else given.max()
        raise ValueError(
            f"token_ids contains {int(bad)}, outside the int32 range [-2**31, 2**31) block hashes are computed over"
        )
    tokens = np.ascontiguousarray(given, dtype="<i4")
    if tokens.ndim != 1:
        raise ValueError(f"token_ids must have rank 1, got shape {tokens.shape}")
    if page_size <= 0:
        raise ValueError(f"page_size must be positive, got {page_size}")
    if start_block < 0:
        raise ValueError(f"start_block must be >= 0, got {start_block}")
    if not isinstance(parent, bytes) or len(parent) != BLOCK_HASH_BYTES:
        got = f"{len(parent)} bytes" if isinstance(parent, bytes) else type(parent).__name__
        raise ValueError(f"parent must be a {BLOCK_HASH_BYTES}-byte block hash (root_hash or hash_blocks), got {got}")
    extra = _as_bytes("extra_keys", extra_keys)
    n_full = tokens.size // page_size
    if start_block >= n_full:
        return []
    raw = tokens[start_block * page_size : n_full * page_size].tobytes()
    width = 4 * page_size
    n = n_full - start_block
    fits = n * width <= _NATIVE_MAX_COUNT and len(extra) <= _NATIVE_MAX_COUNT  # C int counts
    chain = _native_chain() if n >= _NATIVE_MIN_BLOCKS and fits else None
    if chain is None:
        return _chain_hashlib(raw, width, parent, extra)
    return _chain_native(chain, raw, width, parent, extra)
