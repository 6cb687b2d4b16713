"""`RowLayout`: what one stored page (a *host row*) holds, and its fingerprint.

Everything outside the device stores a page as one row of bytes: the page's
bytes in every unit of `to_memory()` (every shard of values, then of
scales), side by side; a replicated (MLA) unit once. The fingerprint names
exactly that: per unit its kind, dtype, typed page shape and width, and, when
the cache spans processes, which TP shards this process's rows hold.

It is computed here and nowhere else, from a cache or from its params and TP
degree, and both give the same digest for the same layout.

A host row depends on the TP degree: a shard's page is `[kv_dim, layers,
tokens, heads, dim]` for *its* heads, so the same logical page is laid out
differently at TP 2 and TP 4. Tiers that outlive an instance (disk, a shared
remote store) keep the *stored* form instead (`RowLayout.stored`): per cache
and kind, the page as one TP-1 page of the heads this process holds,
`[kv_dim, layers, tokens, heads, dim]` (MAX's TP-1 page when the process
holds them all). Those bytes do not depend on how the heads are split into
shards, so they are the same at every TP degree. Converting interleaves the
process's shards row by row (`kv_dim * layers * tokens` rows of `heads *
dim` bytes per shard); it is no work at all when the process holds one shard
(TP 1, or one device per process) or a page has one row. Three fingerprints
follow:

- `RowLayout.fingerprint`: the host row (TP-local). Host tiers and engines.
- `RowLayout.block_fingerprint`: the model's page geometry only (no TP, no
  process layout). The prefix-caching manager mixes it into every block
  hash, so a block has one identity at every TP degree.
- `StoredLayout.fingerprint`: the stored form of this process's heads
  (which heads of how many). Stored blocks carry it: a block stored at TP 4
  loads at TP 2 or 8, and a row written for another model never loads.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math

import numpy as np

from jaxkv import _native as native
from jaxkv.layout.adopted import AdoptedCache, PagedArray
from jaxkv.layout.buffer import Cache, KVCacheBuffer, MultiKVCacheBuffer
from jaxkv.layout.params import KVCacheParams

# Bump when the meaning of a row changes: every stored block becomes a miss.
_TAG = b"jaxkv-row-layout-v2"
_BLOCK_TAG = b"jaxkv-block-layout-v1"
_STORED_TAG = b"jaxkv-stored-layout-v1"


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
    shards: int = 1
    """Shards the heads axis is split into (the TP degree); 1 for a replicated (MLA) or TP-1 unit."""
    shard: int = 0
    """This unit's position along the TP axis (which heads it holds); 0 when `shards` is 1."""
    split_axis: int = 3
    """The axis of `page_shape` the shards split: the heads (3 in jaxkv's own page; an adopted array's own)."""


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
        # The split axis is named only where it is not jaxkv's own (3), so jaxkv caches keep their fingerprints.
        desc: list[tuple] = [
            (u.kind, u.dtype, u.page_shape, u.bytes_per_page, *(("split", u.split_axis),) * (u.split_axis != 3))
            for u in self.units
        ]
        if self.owned_shards:
            desc.append(("owned TP shards", self.owned_shards))
        return hashlib.sha256(_TAG + repr(desc).encode()).digest()

    @property
    def block_fingerprint(self) -> bytes:
        """SHA-256 of the model's page geometry, whatever the TP degree and process layout.

        Per cache and kind: dtype and the whole page's typed shape (all heads).
        The prefix-caching manager roots every block hash in it.
        """
        desc: list[tuple] = []
        last = None
        for r in self.stored.runs:
            key = (r.kind, r.dtype, r.full_shape)
            if last is not None and key == desc[-1] and r.first_head > last.first_head:
                last = r  # more heads of the same array (this process's shards are not all adjacent)
                continue
            desc.append(key)
            last = r
        return hashlib.sha256(_BLOCK_TAG + repr(desc).encode()).digest()

    @functools.cached_property
    def stored(self) -> StoredLayout:
        """The TP-independent form of this layout's rows, for tiers that outlive an instance."""
        return StoredLayout.of(self)

    @classmethod
    def of(cls, cache: Cache | KVCacheParams, *, tp: int | None = None) -> RowLayout:
        """The row layout of a cache, or of the cache `KVCacheParams` describe at TP degree `tp`.

        From params the cache is taken to live in one process (every shard local).
        """
        if isinstance(cache, KVCacheParams):
            if tp is None:
                raise ValueError("tp is required for the row layout of KVCacheParams (the TP degree splits the heads)")
            return cls(_units_from_params(cache, tp), (), cache.page_size)
        if tp is not None:
            raise ValueError(f"tp is only for KVCacheParams; a cache knows its TP degree, got tp={tp!r}")
        if isinstance(cache, AdoptedCache):
            units = tuple(
                RowUnit(u.kind, u.dtype.name, tuple(u.page_shape), u.bytes_per_page, *_position(c, u), c.split_axis)
                for c in cache.children.values()
                for u in c.to_memory()
            )
            return cls(units, _owned_shards(list(cache.children.values())), cache.page_size)
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
            RowUnit(u.kind, u.dtype.name, tuple(u.page_shape), u.bytes_per_page, *_position(c, u))
            for c in children
            for u in c.to_memory()
        )
        return cls(units, _owned_shards(children), sizes.pop())


def _units_from_params(params: KVCacheParams, tp: int) -> tuple[RowUnit, ...]:
    replicated = params.replicated(tp)
    copies = 1 if replicated else tp
    kinds = [("values", params.dtype, params.shape_per_page(tp))]
    if params.quant is not None and (scale_shape := params.shape_per_scale_page(tp)) is not None:
        kinds.append(("scales", params.quant.scale_dtype, scale_shape))
    units = []
    for kind, dtype, shape in kinds:
        width = dtype.itemsize
        for d in shape:
            width *= d
        shards = 1 if replicated else tp
        units += [RowUnit(kind, dtype.name, tuple(shape), width, shards, i) for i in range(copies)]
    return tuple(units)


def _position(cache: KVCacheBuffer | PagedArray, unit) -> tuple[int, int]:
    """(shards, shard) of a unit: its place along the heads split."""
    if cache.replicates_kv_across_tp or cache.tp_degree == 1:
        return 1, 0
    return cache.tp_degree, unit.shard_index


def _owned_shards(children: list[KVCacheBuffer] | list[PagedArray]) -> tuple:
    owned = []
    for cache in children:
        for array in (cache.values, cache.scales):
            if array is not None and not cache.replicates_kv_across_tp and not array.is_fully_addressable:
                owned.append((cache.tp_degree, tuple(i for i, _ in cache.indexed_shards(array))))
    return tuple(owned)


def layout_fingerprint(cache: Cache | KVCacheParams, *, tp: int | None = None) -> bytes:
    """`RowLayout.of(cache, tp=tp).fingerprint`: the one layout fingerprint of a cache."""
    return RowLayout.of(cache, tp=tp).fingerprint


@dataclasses.dataclass(frozen=True)
class StoredRun:
    """Consecutive units of a row that hold consecutive heads of one cache's values or scales."""

    kind: str
    dtype: str
    offset: int
    """Where the run starts in a row (the same in the host row and the stored row)."""
    units: int
    """Shards in the run."""
    rows: int
    """`kv_dim * layers * tokens`: the rows of one shard's page (each `heads * dim` elements)."""
    heads: int
    """Heads per shard."""
    head_bytes: int
    """Bytes of one head in one of those rows (`dim * itemsize`)."""
    full_shape: tuple[int, ...]
    """Typed shape of the whole page, all heads: `[kv_dim, layers, tokens, total heads, dim]`."""
    first_head: int
    """First head the run holds."""

    @property
    def nbytes(self) -> int:
        return self.units * self.rows * self.heads * self.head_bytes

    @property
    def identity(self) -> bool:
        """Whether host and stored bytes are the same (one shard, or one row per page)."""
        return self.units == 1 or self.rows == 1

    def to_stored(self, src: np.ndarray, dst: np.ndarray) -> None:
        """`[units, rows, heads * head_bytes]` (shard by shard) -> `[rows, units * heads * head_bytes]` (TP-1 page).

        One native pass when jaxkv's library is built (the GIL released:
        tiers convert on their I/O threads in parallel), numpy otherwise.
        """
        _transpose(dst, src, self.units, self.rows, self.heads * self.head_bytes)

    def from_stored(self, src: np.ndarray, dst: np.ndarray) -> None:
        """The inverse of `to_stored`."""
        _transpose(dst, src, self.rows, self.units, self.heads * self.head_bytes)


def _transpose(dst: np.ndarray, src: np.ndarray, rows: int, cols: int, chunk: int) -> None:
    """`dst[c, r] = src[r, c]` over `[rows, cols]` elements of `chunk` bytes."""
    if not native.transpose_chunks(dst, src, rows, cols, chunk):
        dst.reshape(cols, rows, chunk)[...] = src.reshape(rows, cols, chunk).transpose(1, 0, 2)


@dataclasses.dataclass(frozen=True)
class StoredLayout:
    """The stored (TP-independent) form of a `RowLayout`'s rows: same width, bytes permuted.

    Each run of units holding consecutive heads of one cache's values (or
    scales) is stored as one TP-1 page of those heads, `[kv_dim, layers,
    tokens, heads, dim]`; a replicated (MLA) unit is stored as it is. The
    stored row of a process holding heads `[a, b)` of every cache is the same
    at every TP degree, so `fingerprint` names only the model's geometry and
    which heads.
    """

    runs: tuple[StoredRun, ...]
    row_bytes: int

    @classmethod
    def of(cls, layout: RowLayout) -> StoredLayout:
        runs: list[StoredRun] = []
        offset, i = 0, 0
        units = layout.units
        while i < len(units):
            u = units[i]
            j = i + 1
            while (
                j < len(units)
                and u.shards > 1
                and (units[j].kind, units[j].dtype, units[j].page_shape, units[j].shards)
                == (u.kind, u.dtype, u.page_shape, u.shards)
                and units[j].shard == units[j - 1].shard + 1
            ):
                j += 1
            # Per shard's page: `rows` rows (the axes before the split) of `heads` chunks of `head_bytes`.
            a = u.split_axis
            rows, heads = math.prod(u.page_shape[:a]), u.page_shape[a]
            head_bytes = u.bytes_per_page // (rows * heads)
            full = (*u.page_shape[:a], heads * u.shards, *u.page_shape[a + 1 :])
            runs.append(StoredRun(u.kind, u.dtype, offset, j - i, rows, heads, head_bytes, full, u.shard * heads))
            offset += (j - i) * u.bytes_per_page
            i = j
        return cls(tuple(runs), offset)

    @property
    def identity(self) -> bool:
        """Whether stored rows are byte-identical to host rows (no conversion needed)."""
        return all(r.identity for r in self.runs)

    @property
    def fingerprint(self) -> bytes:
        """SHA-256 of what a stored row's bytes mean: the model's geometry and the heads it holds (no TP degree)."""
        desc = [(r.kind, r.dtype, r.full_shape, r.first_head, r.first_head + r.units * r.heads) for r in self.runs]
        return hashlib.sha256(_STORED_TAG + repr(desc).encode()).digest()

    def to_stored(self, row: np.ndarray, out: np.ndarray) -> None:
        """Write the stored form of host `row` into `out` (both `[row_bytes]` uint8, not overlapping)."""
        self._convert(row, out, StoredRun.to_stored)

    def from_stored(self, stored: np.ndarray, out: np.ndarray) -> None:
        """Write the host row of `stored` into `out` (both `[row_bytes]` uint8, not overlapping)."""
        self._convert(stored, out, StoredRun.from_stored)

    def _convert(self, src: np.ndarray, out: np.ndarray, how) -> None:
        for r in self.runs:
            part, dst = src[r.offset : r.offset + r.nbytes], out[r.offset : r.offset + r.nbytes]
            if r.identity:
                dst[...] = part
            else:
                how(r, part, dst)
