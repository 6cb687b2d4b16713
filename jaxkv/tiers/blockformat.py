"""The stored block: the bytes a `DiskTier` file and a `RemoteTier` value hold, one format for both.

A header of fixed-width little-endian integers, then the payload; nothing
pickled:

```
offset  size  field
0       8     magic b"JAXKVBLK"
8       4     format version (1)
12      4     header length (96)
16      32    layout fingerprint (which model/layout the bytes belong to)
48      32    block hash (on disk also the file name, in hex; on a server part of the key)
80      8     payload length
88      8     checksum: xxh3_64 of the payload
96      n     payload: one row in its stored form (`RowLayout.stored`: a TP-1
              page of the heads it holds, the same bytes at every TP degree), raw
```

The fingerprint a tier writes and expects is the stored one
(`StoredLayout.fingerprint`), so a block written at TP 4 reads at TP 2 or 8.
A change to this layout needs a new `VERSION`: blocks already on disks and
servers then verify bad, never misread.
"""

from __future__ import annotations

import struct

import xxhash

MAGIC = b"JAXKVBLK"
"""The first 8 bytes of every block."""

VERSION = 1
"""The format version in the header; a block of another version is corrupt to this code."""

HEADER = struct.Struct("<8sII32s32sQQ")
"""magic, version, header length, fingerprint, block hash, payload length, checksum (the table above)."""

HEADER_BYTES = HEADER.size  # 96
"""Bytes before the payload."""


class CorruptBlockError(Exception):
    """A stored block failed verification (and was removed)."""


def checksum(payload) -> int:
    """xxh3-64 of `payload` (any buffer: bytes, memoryview, contiguous numpy array)."""
    return xxhash.xxh3_64_intdigest(payload)


def pack_header(fingerprint: bytes, block_hash: bytes, payload) -> bytes:
    """The header of a block holding `payload` (its length and checksum computed here)."""
    return HEADER.pack(*_fields(fingerprint, block_hash, payload))


def pack_header_into(buffer, fingerprint: bytes, block_hash: bytes, payload) -> None:
    """Write `pack_header(...)` into the first `HEADER_BYTES` of `buffer` (writable), without a copy."""
    HEADER.pack_into(buffer, 0, *_fields(fingerprint, block_hash, payload))


def _fields(fingerprint: bytes, block_hash: bytes, payload) -> tuple:
    return MAGIC, VERSION, HEADER_BYTES, fingerprint, block_hash, memoryview(payload).nbytes, checksum(payload)


def verify_header(raw, *, fingerprint: bytes, block_hash: bytes, payload_bytes: int) -> int | None:
    """The payload checksum `raw`'s header records, if it is `block_hash`'s header for this layout.

    `raw`: the block's bytes from offset 0 (the header alone, or the header and
    the payload). Checks, in order: a whole header, magic, version and header
    length, the block hash, the fingerprint, the payload length. Returns None
    when only the fingerprint differs, so that the caller decides what another
    layout's block is (on disk: not this tier's to read or delete); raises
    `CorruptBlockError` saying what else is wrong. The caller checks the
    payload against the returned checksum.
    """
    if len(raw) < HEADER_BYTES:
        raise CorruptBlockError("short header")
    magic, version, header_len, stored_fingerprint, stored_hash, length, check = HEADER.unpack_from(raw)
    if magic != MAGIC or version != VERSION or header_len != HEADER_BYTES:
        raise CorruptBlockError(f"bad magic/version {magic!r}/{version}")
    if stored_hash != block_hash:
        raise CorruptBlockError(f"holds another block ({stored_hash.hex()[:16]})")
    if stored_fingerprint != fingerprint:
        return None
    if length != payload_bytes:
        raise CorruptBlockError(f"payload length {length} != row_bytes {payload_bytes}")
    return check
