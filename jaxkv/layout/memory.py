"""Memory units: one shard of one cache kind, seen as `[num_pages, bytes_per_page]` bytes.

A unit is a descriptor, not a copy. It holds the shard's single-device array
(`addressable_shards[i].data`, which shares the buffer of the global array)
and derives the byte geometry from its shape and dtype. The bitcast to bytes
runs inside the jitted gather of `read_pages`, over the requested pages only;
`buffer` materializes every page and exists for tests and interop.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import numpy as np

from jaxkv.layout import pages as _pages

# jaxlib ships no type stub for `jax.Device` (jax's own stubs spell it `Any`), so pyright rejects it in an
# annotation: those lines say `pyright: ignore[reportInvalidTypeForm]`.
KINDS = ("values", "scales")


class KVCacheMemory:
    """The byte pages of one shard of one kind (values or scales) of a cache."""

    def __init__(self, shard: jax.Array, *, kind: str, shard_index: int):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if not isinstance(shard, jax.Array) or len(shard.devices()) != 1:
            raise ValueError("shard must be a single-device jax.Array")
        self._shard = shard
        self.kind = kind
        """'values' or 'scales'."""
        self.shard_index = shard_index
        """Position of this shard along the TP mesh axis (0 for a replicated root)."""

    @property
    def shard(self) -> jax.Array:
        """The typed single-device array `[num_pages, *page_shape]` this unit describes."""
        return self._shard

    @property
    def device(self) -> jax.Device:  # pyright: ignore[reportInvalidTypeForm]
        """The device whose memory holds this unit's pages."""
        (device,) = self._shard.devices()
        return device

    @property
    def page_shape(self) -> tuple[int, ...]:
        """Typed shape of one page: `[kv_dim, layers, tokens, heads, dim]`."""
        return tuple(self._shard.shape[1:])

    @property
    def dtype(self) -> np.dtype:
        """Element dtype of the shard the unit describes."""
        return self._shard.dtype

    @property
    def total_num_pages(self) -> int:
        """Pages in the unit."""
        return self._shard.shape[0]

    @property
    def bytes_per_page(self) -> int:
        """Bytes of one page of this unit: a row of its `[num_pages, bytes_per_page]` byte view."""
        return math.prod(self.page_shape) * self.dtype.itemsize

    @property
    def devices(self) -> list[jax.Device]:  # pyright: ignore[reportInvalidTypeForm]
        """Every device this unit's bytes live on (one, unless replicated)."""
        return [self.device]

    @property
    def buffer(self) -> jax.Array:
        """All pages as `[total_num_pages, bytes_per_page]` uint8 on `device`.

        This materializes a full copy of the shard; transfers use `read_pages`.
        """
        return _pages.shard_bytes_jit(self._shard)

    def read_pages(self, page_ids: _pages.PageIds) -> jax.Array:
        """Bytes of the pages `page_ids`: `[len(page_ids), bytes_per_page]` uint8 on `device`."""
        ids = _pages.check_page_ids(page_ids, self.total_num_pages)
        return _pages.read_pages_jit(self._shard, ids)

    def write_pages(self, page_ids: _pages.PageIds, page_bytes: np.ndarray | jax.Array) -> KVCacheMemory:
        """A new unit whose pages `page_ids` hold `page_bytes`; this unit is unchanged.

        The inverse of `read_pages`, bit-exact. `page_bytes` is
        `[len(page_ids), bytes_per_page]` uint8; ids must be unique.
        """
        ids, rows = self._check_write(page_ids, page_bytes)
        return self._replace([_pages.write_pages_jit(s, ids, jax.device_put(rows, s.sharding)) for s in self.shards()])

    def shards(self) -> list[jax.Array]:
        """The device arrays this unit's pages live in (one; a replicated unit: its root and every peer)."""
        return [self._shard]

    def _replace(self, shards: list[jax.Array]) -> KVCacheMemory:
        (shard,) = shards
        return KVCacheMemory(shard, kind=self.kind, shard_index=self.shard_index)

    def _check_write(self, page_ids, page_bytes):
        ids = _pages.check_page_ids(page_ids, self.total_num_pages)
        _pages.check_unique(ids)
        if not isinstance(page_bytes, (jax.Array, np.ndarray)):
            raise ValueError(f"page_bytes must be a jax.Array or numpy array, got {type(page_bytes).__name__}")
        expected = (ids.size, self.bytes_per_page)
        if tuple(page_bytes.shape) != expected or page_bytes.dtype != np.uint8:
            raise ValueError(
                f"page_bytes must be uint8 of shape {expected} (len(page_ids), bytes_per_page), "
                f"got {page_bytes.dtype} of shape {tuple(page_bytes.shape)}"
            )
        return ids, page_bytes

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.kind}, shard {self.shard_index} on {self.device}, "
            f"{self.total_num_pages} pages x {self.bytes_per_page} B, {self.dtype.name}{list(self.page_shape)})"
        )


class ReplicatedKVCacheMemory(KVCacheMemory):
    """One kind of a replicated (MLA) cache: identical bytes on every TP shard.

    The unit itself is the root (TP shard 0 of this process); `peers` are
    the other shards, each a `KVCacheMemory` of its own: the same byte pages
    (`buffer`, `read_pages`, `bytes_per_page`, ...) on its own `device`.
    Reads come from the root; `write_pages` writes the root and every peer,
    so the replicas stay identical (a peer's own `write_pages` writes that
    replica only).
    """

    def __init__(self, root: jax.Array, peers: Sequence[KVCacheMemory | jax.Array], *, kind: str):
        super().__init__(root, kind=kind, shard_index=0)
        units = []
        for i, peer in enumerate(peers, start=1):
            # A bare shard array becomes a unit numbered by its position after the root.
            unit = peer if isinstance(peer, KVCacheMemory) else KVCacheMemory(peer, kind=kind, shard_index=i)
            if type(unit) is not KVCacheMemory or unit.kind != kind:
                raise ValueError(f"peers[{i - 1}] must be a {kind} KVCacheMemory or jax.Array, got {unit!r}")
            shard = unit.shard
            if shard.shape != root.shape or shard.dtype != root.dtype:
                raise ValueError(
                    f"peer shard {shard.dtype}{list(shard.shape)} differs from root {root.dtype}{list(root.shape)}"
                )
            units.append(unit)
        self.peers: list[KVCacheMemory] = units
        """The other shards holding the same bytes, in mesh order: one `KVCacheMemory` each,
        `shard_index` its position along the TP axis."""

    @property
    def devices(self) -> list[jax.Device]:  # pyright: ignore[reportInvalidTypeForm]
        """The root's device, then every peer's: each holds the same bytes."""
        return [self.device] + [p.device for p in self.peers]

    def shards(self) -> list[jax.Array]:
        """The root's shard, then every peer's: the same bytes on each device."""
        return [self._shard, *(p.shard for p in self.peers)]

    def _replace(self, shards: list[jax.Array]) -> ReplicatedKVCacheMemory:
        peers = [
            KVCacheMemory(shard, kind=self.kind, shard_index=p.shard_index)
            for shard, p in zip(shards[1:], self.peers, strict=True)
        ]
        return ReplicatedKVCacheMemory(shards[0], peers, kind=self.kind)

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", {len(self.peers)} peers)"
