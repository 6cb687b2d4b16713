"""Block hashes: the identity of a full page of tokens and everything before it.

```
root    = SHA-256("jaxkv-root-v1" | seed | layout fingerprint | cache_salt)
hash[0] = SHA-256(root    | tokens[0 : P]      | extra keys)
hash[i] = SHA-256(hash[i-1] | tokens[iP : (i+1)P] | extra keys)
```

Chaining makes a block's hash depend on its whole prefix, so equal hashes
mean equal K/V (for the same model and layout). The seed is per deployment,
the fingerprint ties blocks to the cache layout, and a request's `cache_salt`
keeps tenants apart: different salts never share a block. Token ids enter as
little-endian int32 bytes; extra keys (LoRA id, image digests, ...) as bytes.
"""

from __future__ import annotations

import hashlib

import numpy as np

BLOCK_HASH_BYTES = 32


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


def hash_blocks(token_ids, page_size: int, parent: bytes, extra_keys=None, *, start_block: int = 0) -> list[bytes]:
    """Chained hashes of the full blocks of `token_ids`, from block `start_block` on.

    `parent` is the hash of block `start_block - 1` (the root for 0). A
    trailing partial block gets no hash. About a microsecond per block: one
    SHA-256 over (parent, block bytes, extra).
    """
    tokens = np.ascontiguousarray(np.asarray(token_ids, dtype="<i4"))
    if tokens.ndim != 1:
        raise ValueError(f"token_ids must have rank 1, got shape {tokens.shape}")
    extra = _as_bytes("extra_keys", extra_keys)
    raw = tokens.tobytes()
    width = 4 * page_size
    n_full = tokens.size // page_size
    out = []
    sha = hashlib.sha256
    for i in range(start_block, n_full):
        parent = sha(parent + raw[i * width : (i + 1) * width] + extra).digest()
        out.append(parent)
    return out
