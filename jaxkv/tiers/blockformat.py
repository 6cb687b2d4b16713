"""The stored block: the bytes a `DiskTier` file and a `RemoteTier` value hold, one format for both.

A header of fixed-width little-endian integers, then the payload, then (keyed
blocks only) a MAC; nothing pickled:

```
offset  size  field
0       8     magic b"JAXKVBLK"
8       4     format version: 1 unkeyed, 2 keyed (a MAC trailer follows the payload)
12      4     header length (96)
16      32    layout fingerprint (which model/layout the bytes belong to)
48      32    block hash (on disk also the file name, in hex; on a server part of the key)
80      8     payload length
88      8     checksum: xxh3_64 of the payload (version 1); 0 in a keyed block, whose MAC covers the payload
96      n     payload: one row in its stored form (`RowLayout.stored`: a TP-1
              page of the heads it holds, the same bytes at every TP degree), raw
96+n    32    version 2 only: MAC, BLAKE3 in keyed mode over bytes 0..96+n (the
              header, so fingerprint, block hash and length, and the payload),
              under a key derived from the deployment's secret (`BlockKey`)
```

**Unkeyed (version 1)** blocks are what every writer without a key writes,
as before keys existed: a reader without a key trusts the header and the
xxh3 checksum, so it trusts everyone who can write to the directory or the
server (anyone can compute a valid header and checksum for a block hash).
**Keyed (version 2)** blocks are written by a tier given a key; a tier with a
key accepts nothing else: an unkeyed block, one sealed under another key, or
one altered after sealing fails as `ForgedBlockError` (a `CorruptBlockError`).
The MAC does the checksum's job too, so a keyed block records no checksum
(0) and a keyed reader checks the MAC alone. A reader without a key meets a keyed block as
`KeyedBlockError`: not its to judge (its caller leaves it in place).

The fingerprint a tier writes and expects is the stored one
(`StoredLayout.fingerprint`), so a block written at TP 4 reads at TP 2 or 8.
A change to this layout needs a new `VERSION`: blocks already on disks and
servers then verify bad, never misread.
"""

from __future__ import annotations

import hmac
import os
import struct

import xxhash

MAGIC = b"JAXKVBLK"
"""The first 8 bytes of every block."""

VERSION = 1
"""The format version of an unkeyed block; a block of a version this code does not know is corrupt to it."""

VERSION_KEYED = 2
"""The format version of a keyed block: the payload is followed by `MAC_BYTES` of MAC."""

MAC_BYTES = 32
"""Bytes of a keyed block's MAC trailer (BLAKE3's default output: 256 bits)."""

MIN_KEY_BYTES = 16
"""The shortest secret a `BlockKey` takes: 128 bits, below which guessing the key is the cheaper attack."""

KEY_ENV = "JAXKV_BLOCK_KEY"
"""The environment variable a disk or remote tier reads its secret from when none is passed (UTF-8)."""

_KDF_CONTEXT = "jaxkv 2026-12 stored block MAC v2"
"""BLAKE3 derive-key context: the MAC key is derived from the secret, never the secret itself (any length in)."""

HEADER = struct.Struct("<8sII32s32sQQ")
"""magic, version, header length, fingerprint, block hash, payload length, checksum (the table above)."""

HEADER_BYTES = HEADER.size  # 96
"""Bytes before the payload."""


class CorruptBlockError(Exception):
    """A stored block failed verification (and was removed)."""


class ForgedBlockError(CorruptBlockError):
    """A keyed reader's block without a valid MAC: unkeyed, sealed under another key, or altered since."""


class KeyedBlockError(CorruptBlockError):
    """A reader without a key met a keyed block: it cannot check the MAC, so it neither uses nor deletes it."""


class BlockKey:
    """A deployment's secret, as the MAC key of its blocks. Never printed; compare tiers by `key_id`."""

    def __init__(self, secret: bytes | str, *, field: str = "key"):
        """`secret`: at least `MIN_KEY_BYTES` bytes (a str is taken as UTF-8), shared by every instance."""
        if isinstance(secret, str):
            secret = secret.encode()
        if not isinstance(secret, (bytes, bytearray)):
            raise ValueError(f"{field} must be bytes or str (a deployment secret), got {type(secret).__name__}")
        if len(secret) < MIN_KEY_BYTES:
            raise ValueError(
                f"{field} must be at least {MIN_KEY_BYTES} bytes (a deployment secret), got {len(secret)} bytes"
            )
        blake3 = _blake3()
        self._key = blake3(bytes(secret), derive_key_context=_KDF_CONTEXT).digest()
        self._blake3 = blake3
        self.key_id = blake3(self._key, derive_key_context=_KDF_CONTEXT + " id").hexdigest()[:16]
        """A name for the key that reveals nothing of it: two tiers with the same `key_id` hold the same key."""

    @classmethod
    def resolve(cls, key, *, field: str = "key") -> BlockKey | None:
        """`key` as a `BlockKey`: the one given, else `$JAXKV_BLOCK_KEY` when set and not empty, else None (unkeyed)."""
        if isinstance(key, BlockKey):
            return key
        if key is None:
            key = os.environ.get(KEY_ENV) or None
            field = f"${KEY_ENV}"
        return None if key is None else cls(key, field=field)

    def mac(self, header, payload) -> bytes:
        """The MAC of a block: keyed BLAKE3 over its header and payload (any buffers)."""
        hasher = self._blake3(header, key=self._key)
        hasher.update(payload)
        return hasher.digest()

    def __repr__(self) -> str:
        return f"BlockKey(id={self.key_id})"


def _blake3():
    try:
        from blake3 import blake3
    except ImportError as e:
        raise ImportError(
            "a block key needs the blake3 package: pip install 'jaxkv[remote]' (or pip install blake3)"
        ) from e
    return blake3


def trailer_bytes(key: BlockKey | None) -> int:
    """Bytes after the payload: the MAC of a keyed block, none for an unkeyed one."""
    return 0 if key is None else MAC_BYTES


def checksum(payload) -> int:
    """xxh3-64 of `payload` (any buffer: bytes, memoryview, contiguous numpy array)."""
    return xxhash.xxh3_64_intdigest(payload)


def pack_header(fingerprint: bytes, block_hash: bytes, payload, key: BlockKey | None = None) -> bytes:
    """The header of a block holding `payload` (its length and checksum computed here); keyed when `key` is given."""
    return HEADER.pack(*_fields(fingerprint, block_hash, payload, key))


def pack_header_into(buffer, fingerprint: bytes, block_hash: bytes, payload, key: BlockKey | None = None) -> None:
    """Write `pack_header(...)` into the first `HEADER_BYTES` of `buffer` (writable), without a copy."""
    HEADER.pack_into(buffer, 0, *_fields(fingerprint, block_hash, payload, key))


def _fields(fingerprint: bytes, block_hash: bytes, payload, key: BlockKey | None) -> tuple:
    length = memoryview(payload).nbytes
    if key is not None:  # the MAC is the integrity check: a checksum pass more would only cost time
        return MAGIC, VERSION_KEYED, HEADER_BYTES, fingerprint, block_hash, length, 0
    return MAGIC, VERSION, HEADER_BYTES, fingerprint, block_hash, length, checksum(payload)


def verify_payload(key: BlockKey | None, header, payload, trailer, check: int) -> str | None:
    """Why `payload` is not the block `header` describes, or None: the MAC when keyed, else the checksum.

    `header` is the block's verified header (`verify_header`), `check` the
    checksum it records, `trailer` the `trailer_bytes(key)` bytes after the payload.
    """
    if key is not None:
        if not hmac.compare_digest(key.mac(header, payload), bytes(trailer)):
            return "MAC mismatch: written under another key, or altered"
        return None
    if checksum(payload) != check:
        return "checksum mismatch"
    return None


def verify_header(
    raw, *, fingerprint: bytes, block_hash: bytes, payload_bytes: int, key: BlockKey | None = None
) -> int | None:
    """The payload checksum `raw`'s header records, if it is `block_hash`'s header for this layout.

    `raw`: the block's bytes from offset 0 (the header alone, or the header and
    the payload). Checks, in order: a whole header, magic, version and header
    length, the block hash, the fingerprint, the payload length. Returns None
    when only the fingerprint differs, so that the caller decides what another
    layout's block is (on disk: not this tier's to read or delete); raises
    `CorruptBlockError` saying what else is wrong: `ForgedBlockError` for an
    unkeyed block when `key` is given, `KeyedBlockError` for a keyed one when
    it is not. The caller checks the payload (`verify_payload`).
    """
    if len(raw) < HEADER_BYTES:
        raise CorruptBlockError("short header")
    magic, version, header_len, stored_fingerprint, stored_hash, length, check = HEADER.unpack_from(raw)
    if magic != MAGIC or version not in (VERSION, VERSION_KEYED) or header_len != HEADER_BYTES:
        raise CorruptBlockError(f"bad magic/version {magic!r}/{version}")
    if key is not None and version != VERSION_KEYED:
        raise ForgedBlockError("an unkeyed block (no MAC): this tier has a key and accepts keyed blocks only")
    if key is None and version != VERSION:
        raise KeyedBlockError("a keyed block (MAC): this tier has no key to check it")
    if stored_hash != block_hash:
        raise CorruptBlockError(f"holds another block ({stored_hash.hex()[:16]})")
    if stored_fingerprint != fingerprint:
        return None
    if length != payload_bytes:
        raise CorruptBlockError(f"payload length {length} != row_bytes {payload_bytes}")
    return check
