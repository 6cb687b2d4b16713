"""Adopted caches: page-major arrays a serving engine already owns, paged by jaxkv without a copy.

An engine keeps its KV cache in its own layout, for its own attention kernel:
vLLM on TPU (`tpu-inference`) one array per layer, `(num_blocks, block_size,
cdiv(2 * kv_heads, packing), packing, head_dim)` with K and V heads fused and
sharded on axis 2; MaxText one key and one value array per layer; jaxkv its
own `[pages, kv, layers, tokens, heads, dim]`. All of them are *page-major*:
the page (block) axis leads, so each shard of each array is a `[pages,
bytes_per_page]` byte matrix already. `adopt` describes such arrays; nothing
is converted and the engine's kernel keeps working on the same buffers:

```
cache = jaxkv.adopt(runner.kv_caches, page_size=block_size, shard_axis=2)
store, worker = jaxkv.open_tiers(cache, host_bytes, disk_directory=...)
cache, handle = worker.load(cache, plan)   # the engine's arrays, donated and returned
runner.kv_caches = cache.arrays
```

What the user says: which arrays (one per layer, K and V fused or
separate, packed or not, with or without FP8 scales), the tokens per page,
and which axis the mesh shards (the heads), or none (replicated, as an MLA
latent is). Everything else (pages, bytes per page, the TP degree and mesh
axis, the stored TP-independent form) is derived from the arrays and checked.

An `AdoptedCache` is a `MultiKVCacheBuffer` whose children are `PagedArray`s:
the engine, the tiers, the manager and the fingerprint take it wherever they
take a jaxkv cache. Its stored form gathers each array's shards along the
sharded axis into the TP-1 page, so blocks stored at TP 4 load at TP 2 or 8.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, cast

import jax
from jax.sharding import Mesh, NamedSharding

from jaxkv._checks import check_int, check_positive_int
from jaxkv.layout.buffer import MultiKVCacheBuffer, _single_device, units_of
from jaxkv.layout.memory import KVCacheMemory

PAGE_AXIS = 0
"""The axis of pages: jaxkv pages arrays whose page (block) axis leads."""


class PagedArray:
    """One adopted page-major array (`values`), and optionally its per-page scales, split on `shard_axis`.

    Quacks like a `KVCacheBuffer` child for the engine and the tiers:
    `values`, `scales`, `replicates_kv_across_tp`, `tp_axis`, `tp_degree`,
    `total_num_pages`, `indexed_shards`, `to_memory`.
    """

    def __init__(self, values: jax.Array, *, shard_axis: int | None, scales: jax.Array | None = None, name: str = ""):
        self.name = name
        self.values = values
        self.scales = scales
        self.shard_axis = shard_axis
        """The axis of `values` (and `scales`) split over the TP mesh axis; None: replicated on every device."""
        self.tp_axis: str | tuple[str, ...] = ""
        """The mesh axis (or axes) that split `shard_axis`; "" when replicated."""
        self._validate()

    # -- checks ------------------------------------------------------------
    def _where(self, what: str = "values") -> str:
        return f"{self.name}.{what}" if self.name else what

    def _validate(self) -> None:
        values, scales = self.values, self.scales
        self.tp_axis = self._check_array("values", values)
        if scales is None:
            return
        axis = self._check_array("scales", scales)
        if scales.shape[PAGE_AXIS] != values.shape[PAGE_AXIS]:
            raise ValueError(
                f"{self._where('scales')} has {scales.shape[PAGE_AXIS]} pages but {self._where()} has "
                f"{values.shape[PAGE_AXIS]}: page counts must agree"
            )
        if axis != self.tp_axis or _mesh(scales).devices.tolist() != _mesh(values).devices.tolist():
            raise ValueError(
                f"{self._where('scales')} must be split like {self._where()} (axis {self.shard_axis} over "
                f"{self.tp_axis or 'no mesh axis'} of the same mesh), got {scales.sharding}"
            )

    def _check_array(self, what: str, array) -> str | tuple[str, ...]:
        where = self._where(what)
        if not isinstance(array, jax.Array):
            raise ValueError(f"{where} must be a jax.Array, got {type(array).__name__}")
        if not isinstance(array.sharding, NamedSharding):
            raise ValueError(f"{where} must have a NamedSharding over the TP mesh, got {type(array.sharding).__name__}")
        if array.ndim < 2:
            raise ValueError(f"{where} must be page-major with at least one axis per page, got shape {array.shape}")
        spec = tuple(array.sharding.spec) + (None,) * (array.ndim - len(array.sharding.spec))
        if spec[PAGE_AXIS] is not None:
            raise ValueError(
                f"{where} is sharded on its page axis (axis {PAGE_AXIS}, {spec[PAGE_AXIS]!r}): every device must "
                f"hold every page of its shard; shard the heads instead"
            )
        sharded = [a for a, entry in enumerate(spec) if entry is not None]
        if self.shard_axis is None:
            if sharded:
                raise ValueError(
                    f"{where} is sharded on axis {sharded[0]} ({spec[sharded[0]]!r}) but shard_axis is None "
                    f"(replicated); pass shard_axis={sharded[0]}"
                )
            return ""
        if sharded != [self.shard_axis]:
            got = ", ".join(f"axis {a} on {spec[a]!r}" for a in sharded) or "nothing"
            raise ValueError(f"{where} must be sharded on shard_axis {self.shard_axis} only, got {got}")
        entry = spec[self.shard_axis]
        return entry[0] if isinstance(entry, tuple) and len(entry) == 1 else entry

    # -- what the engine and the tiers read ----------------------------------
    @property
    def replicates_kv_across_tp(self) -> bool:
        """Every device holds the whole array (an MLA latent): stored once, written to every shard."""
        return self.shard_axis is None

    @property
    def mesh(self) -> Mesh:
        """The mesh `values` is laid out on."""
        return _mesh(self.values)

    @property
    def tp_degree(self) -> int:
        """Shards `shard_axis` is split into (the devices for a replicated array)."""
        if self.shard_axis is None:
            return self.values.sharding.num_devices
        axes = (self.tp_axis,) if isinstance(self.tp_axis, str) else self.tp_axis
        return math.prod(self.mesh.shape[a] for a in axes)

    @property
    def total_num_pages(self) -> int:
        """Pages (blocks) in the array: its leading axis."""
        return self.values.shape[PAGE_AXIS]

    @property
    def split_axis(self) -> int:
        """The axis of one *page* (`shape[1:]`) the shards split; 0 for a replicated array."""
        return 0 if self.shard_axis is None else self.shard_axis - 1

    def indexed_shards(self, array: jax.Array) -> list[tuple[int, jax.Array]]:
        """This process's shards of `array` with their position along the split, in order."""
        if self.shard_axis is None:
            rank = {d: i for i, d in enumerate(self.mesh.devices.flat)}
            pairs = [(rank[s.device], s.data) for s in array.addressable_shards]
        else:
            width = array.shape[self.shard_axis] // self.tp_degree
            pairs = [((s.index[self.shard_axis].start or 0) // width, s.data) for s in array.addressable_shards]
        return sorted(((i, _single_device(data)) for i, data in pairs), key=lambda pair: pair[0])

    def to_memory(self) -> list[KVCacheMemory]:
        """Byte-page units: one per shard (values, then scales), or one replicated unit per kind. No copy."""
        return units_of(self)

    # -- pytree ------------------------------------------------------------
    def tree_flatten(self):
        return (self.values, self.scales), (self.shard_axis, self.tp_axis, self.name)

    @classmethod
    def tree_unflatten(cls, aux, leaves) -> PagedArray:
        obj = object.__new__(cls)  # no checks: leaves may be tracers inside jit
        obj.shard_axis, obj.tp_axis, obj.name = aux
        obj.values, obj.scales = leaves
        return obj

    def __repr__(self) -> str:
        split = "replicated" if self.shard_axis is None else f"axis {self.shard_axis} on {self.tp_axis!r}"
        scales = "" if self.scales is None else f", scales={self.scales.dtype}{list(self.scales.shape)}"
        return f"PagedArray({self.name or 'values'}={self.values.dtype}{list(self.values.shape)}{scales}, {split})"


jax.tree_util.register_pytree_node_class(PagedArray)


class AdoptedCache(MultiKVCacheBuffer):
    """An engine's page-major arrays as one jaxkv cache (see the module docstring). Build it with `adopt`."""

    def __init__(self, children: Mapping[str, PagedArray], *, page_size: int):
        if not isinstance(children, Mapping) or not children:
            raise ValueError(f"an adopted cache needs at least one array, got {children!r}")
        for name, child in children.items():
            if not isinstance(child, PagedArray):
                raise ValueError(f"children[{name!r}] must be a PagedArray, got {type(child).__name__}")
        self.children = dict(children)  # pyright: ignore[reportAttributeAccessIssue]
        self.page_size = check_positive_int("page_size", page_size)
        """Tokens per page (the engine's block size): prefix caching hashes blocks of this many tokens."""
        first_name, first = next(iter(self.children.items()))
        for name, child in self.children.items():
            if child.total_num_pages != first.total_num_pages:
                raise ValueError(
                    f"arrays[{name!r}] has {child.total_num_pages} pages but arrays[{first_name!r}] has "
                    f"{first.total_num_pages}: every adopted array must hold the same pages"
                )
            if child.mesh.devices.tolist() != first.mesh.devices.tolist():
                raise ValueError(f"arrays[{name!r}] lives on other devices than arrays[{first_name!r}]")

    @property
    def total_num_pages(self) -> int:
        """Pages in every adopted array (they all hold the same)."""
        return next(iter(self.children.values())).total_num_pages

    @property
    def arrays(self) -> list[jax.Array]:
        """The adopted `values` arrays, in order: hand them back to the engine after a load."""
        return [c.values for c in self.children.values()]  # pyright: ignore[reportAttributeAccessIssue]

    def tree_flatten(self):  # pyright: ignore[reportIncompatibleMethodOverride]
        return tuple(self.children.values()), (tuple(self.children), self.page_size)

    @classmethod
    def tree_unflatten(cls, aux, children: Iterable[Any]) -> AdoptedCache:  # pyright: ignore[reportIncompatibleMethodOverride]
        names, page_size = aux
        obj = object.__new__(cls)
        obj.children = dict(zip(names, children, strict=True))
        obj.page_size = page_size
        return obj

    def __repr__(self) -> str:
        first = next(iter(self.children.values()))
        return f"AdoptedCache({len(self.children)} arrays like {first!r}, page_size {self.page_size})"


jax.tree_util.register_pytree_node_class(AdoptedCache)


def adopt(
    arrays: Sequence[jax.Array] | Mapping[str, jax.Array],
    *,
    page_size: int,
    shard_axis: int | None = None,
    page_axis: int = PAGE_AXIS,
    scales: Sequence[jax.Array] | Mapping[str, jax.Array] | None = None,
) -> AdoptedCache:
    """Page the engine's own arrays: one `PagedArray` per array (per layer, or per layer and K/V), no copy.

    `arrays`: page-major `jax.Array`s, a list (named `0`, `1`, ...) or a
    mapping of names. `page_size`: tokens per page. `shard_axis`: the axis
    the TP mesh splits (the KV heads); None if no axis is sharded (replicated,
    an MLA latent). `page_axis` must be 0 (pages lead; an array whose pages
    do not lead has no byte page to move). `scales`: per-array scales (FP8),
    paired with `arrays` by position or name.
    """
    check_int("page_axis", page_axis)
    named = dict(arrays) if isinstance(arrays, Mapping) else {str(i): a for i, a in enumerate(arrays)}
    if not named:
        raise ValueError("arrays is empty: adopt at least one page-major array")
    if page_axis != PAGE_AXIS:
        raise ValueError(
            f"page_axis must be {PAGE_AXIS}: jaxkv moves a page as one contiguous run of bytes per shard, which "
            f"only a page-major array has; got page_axis={page_axis}"
        )
    if shard_axis is not None:
        shard_axis = check_int("shard_axis", shard_axis, minimum=1, expected="an int >= 1 (axis 0 holds pages)")
    if scales is None:
        paired: dict[str, jax.Array | None] = dict.fromkeys(named)
    else:
        by_name = dict(scales) if isinstance(scales, Mapping) else {str(i): s for i, s in enumerate(scales)}
        if set(by_name) != set(named):
            raise ValueError(f"scales must pair up with arrays: arrays {sorted(named)}, scales {sorted(by_name)}")
        paired = {k: by_name[k] for k in named}
    children = {}
    for name, values in named.items():
        label = f"arrays[{name!r}]"
        if isinstance(values, jax.Array) and shard_axis is not None and shard_axis >= values.ndim:
            raise ValueError(f"{label} has {values.ndim} axes; shard_axis {shard_axis} is not one of them")
        children[name] = PagedArray(values, shard_axis=shard_axis, scales=paired[name], name=label)
    return AdoptedCache(children, page_size=page_size)


def _mesh(array: jax.Array) -> Mesh:
    return cast(Mesh, cast(NamedSharding, array.sharding).mesh)
