"""`RowLayout`: what one stored page (a *host row*) holds, and its fingerprint.

Everything outside the device stores a page as one row of bytes: the page's
bytes in every unit of `to_memory()` (every shard of values, then of
scales), side by side; a replicated (MLA) unit once. The fingerprint names
exactly that: per unit its kind, dtype, typed page shape and width, and, when
the cache spans processes, which TP shards this process's rows hold.

It is computed here and nowhere else, from a cache or from its params and TP
degree, and both give the same digest for the same layout. Stored blocks
carry it (a row written for another layout is never loaded), and the
prefix-caching manager mixes it into every block hash.
"""

from __future__ import annotations

import dataclasses
import hashlib

from jaxkv.layout.buffer import KVCacheBuffer, MultiKVCacheBuffer
from jaxkv.layout.params import KVCacheParams

# Bump when the meaning of a row changes: every stored block becomes a miss.
_TAG = b"jaxkv-row-layout-v2"


@dataclasses.dataclass(frozen=True)
class RowUnit:
    """One unit's part of a host row."""

    kind: str
    """'values' or 'scales'."""
    dtype: str
    """The unit's element dtype, by name."""
    page_shape: tuple[int, ...]
    """Typed shape of one page of this unit: `[kv_dim, layers, tokens, heads, dim]`."""
    bytes_per_page: int
    """Width of this unit in the row."""


@dataclasses.dataclass(frozen=True)
class RowLayout:
    """The layout of a host row: its units in order, and which shards a row holds.

    Plain data (no arrays): the scheduler side and every tier use it to size
    and identify stored pages.
    """

    units: tuple[RowUnit, ...]
    """Units in `to_memory()` order."""
    owned_shards: tuple = ()
    """Per sharded cache this process holds part of: (TP degree, its TP positions). Empty in one process."""
    page_size: int = 0
    """Tokens per page."""

    @property
    def row_bytes(self) -> int:
        """Bytes of one host row: one page of every unit."""
        return sum(u.bytes_per_page for u in self.units)

    @property
    def unit_offsets(self) -> tuple[int, ...]:
        """Column where each unit's bytes start in a row."""
        offsets, at = [], 0
        for u in self.units:
            offsets.append(at)
            at += u.bytes_per_page
        return tuple(offsets)

    @property
    def fingerprint(self) -> bytes:
        """SHA-256 of what the row's bytes mean. Equal layouts, equal digests; nothing else matters."""
        desc = [(u.kind, u.dtype, u.page_shape, u.bytes_per_page) for u in self.units]
        if self.owned_shards:
            desc.append(("owned TP shards", self.owned_shards))
        return hashlib.sha256(_TAG + repr(desc).encode()).digest()

    @classmethod
    def of(cls, cache: KVCacheBuffer | MultiKVCacheBuffer | KVCacheParams, *, tp: int | None = None) -> RowLayout:
        """The row layout of a cache, or of the cache `KVCacheParams` describe at TP degree `tp`.

        From params the cache is taken to live in one process (every shard local).
        """
        if isinstance(cache, KVCacheParams):
            if tp is None:
                raise ValueError("tp is required for the row layout of KVCacheParams (the TP degree splits the heads)")
            return cls(_units_from_params(cache, tp), (), cache.page_size)
        if tp is not None:
            raise ValueError(f"tp is only for KVCacheParams; a cache knows its TP degree, got tp={tp!r}")
        if isinstance(cache, MultiKVCacheBuffer):
            children = list(cache.children.values())
        elif isinstance(cache, KVCacheBuffer):
            children = [cache]
        else:
            raise ValueError(
                f"cache must be a KVCacheBuffer, MultiKVCacheBuffer or KVCacheParams, got {type(cache).__name__}"
            )
        sizes = {c.values.shape[3] for c in children}
        pages = {c.total_num_pages for c in children}
        if len(sizes) != 1 or len(pages) != 1:
            raise ValueError(
                f"the caches of a MultiKVCacheBuffer must share num_pages and page_size to be stored as one row, "
                f"got num_pages {sorted(pages)} and page_size {sorted(sizes)}"
            )
        units = tuple(
            RowUnit(u.kind, u.dtype.name, tuple(u.page_shape), u.bytes_per_page)
            for c in children
            for u in c.to_memory()
        )
        return cls(units, _owned_shards(children), sizes.pop())


def _units_from_params(params: KVCacheParams, tp: int) -> tuple[RowUnit, ...]:
    copies = 1 if params.replicated(tp) else tp
    kinds = [("values", params.dtype, params.shape_per_page(tp))]
    if params.quant is not None:
        kinds.append(("scales", params.quant.scale_dtype, params.shape_per_scale_page(tp)))
    units = []
    for kind, dtype, shape in kinds:
        width = dtype.itemsize
        for d in shape:
            width *= d
        units += [RowUnit(kind, dtype.name, tuple(shape), width)] * copies
    return tuple(units)


def _owned_shards(children: list[KVCacheBuffer]) -> tuple:
    owned = []
    for cache in children:
        for array in (cache.values, cache.scales):
            if array is not None and not cache.replicates_kv_across_tp and not array.is_fully_addressable:
                owned.append((cache.tp_degree, tuple(i for i, _ in cache._indexed_shards(array))))
    return tuple(owned)


def layout_fingerprint(cache, *, tp: int | None = None) -> bytes:
    """`RowLayout.of(cache, tp=tp).fingerprint`: the one layout fingerprint of a cache."""
    return RowLayout.of(cache, tp=tp).fingerprint
