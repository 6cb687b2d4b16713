"""Paged, TP-sharded cache buffers and their allocation.

`KVCacheBuffer` holds one cache's `values` (and optional `scales`) as global
`jax.Array`s with a `NamedSharding`. MHA/GQA caches are split on the heads
axis over the TP mesh axis, so shard i holds heads `[i*h, (i+1)*h)` and its
bytes, row-major, are MAX's per-device buffer for those heads. MLA caches are
replicated over the TP group. The mesh and TP axis are read from the sharding.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, TypeAlias, cast

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

from jaxkv._checks import check_positive_int
from jaxkv.layout.memory import KVCacheMemory, ReplicatedKVCacheMemory
from jaxkv.layout.pages import word_dtype
from jaxkv.layout.params import CACHE_DTYPES, KVCacheParams, check_value_scale_dtypes

HEADS_AXIS = 4
"""Index of `n_kv_heads` in `[num_pages, kv_dim, num_layers, page_size, n_kv_heads, head_dim]`."""

_AXIS_NAMES = ("num_pages", "kv_dim", "num_layers", "page_size", "n_kv_heads", "head_dim")


def _spec_entries(name: str, array) -> tuple:
    """Validate `array` as a 6-D NamedSharding-ed jax.Array; return its spec padded to 6."""
    if not isinstance(array, jax.Array):
        raise ValueError(f"{name} must be a jax.Array, got {type(array).__name__}")
    if not isinstance(array.sharding, NamedSharding):
        raise ValueError(
            f"{name} must have a NamedSharding (mesh + PartitionSpec), got "
            f"{type(array.sharding).__name__}; place it with jax.device_put(x, NamedSharding(mesh, spec))"
        )
    if array.ndim != 6:
        raise ValueError(f"{name} must have rank 6 [{', '.join(_AXIS_NAMES)}], got shape {tuple(array.shape)}")
    spec = tuple(array.sharding.spec)
    return spec + (None,) * (6 - len(spec))


def _sharding(array: jax.Array) -> NamedSharding:
    """`array.sharding`: a NamedSharding for every array of a constructed buffer (`_spec_entries` checks it)."""
    return cast(NamedSharding, array.sharding)


def _mesh(array: jax.Array) -> Mesh:
    """The mesh of `_sharding(array)`: a concrete `Mesh` (an abstract one belongs to tracers, which have no sharding)."""
    return cast(Mesh, _sharding(array).mesh)


def _tp_axis(name: str, array, spec: tuple) -> str:
    """The mesh axis that shards the heads axis of a sharded (MHA) cache array."""
    for dim, entry in enumerate(spec):
        if dim != HEADS_AXIS and entry is not None:
            raise ValueError(
                f"{name} may be sharded only on n_kv_heads (axis {HEADS_AXIS}), but axis {dim} "
                f"({_AXIS_NAMES[dim]}) is sharded on {entry!r}"
            )
    axis = spec[HEADS_AXIS]
    if isinstance(axis, tuple) and len(axis) == 1:
        axis = axis[0]
    if not isinstance(axis, str):
        raise ValueError(
            f"{name} must shard n_kv_heads over one TP mesh axis, got PartitionSpec entry {axis!r}; "
            f"for a replicated (MLA) cache pass replicates_kv_across_tp=True"
        )
    return axis


def _single_device(data: jax.Array) -> jax.Array:
    """The shard as a plain single-device array (zero-copy: same device, same buffer).

    With TP degree 1 a shard's `.data` keeps the mesh's NamedSharding, whose
    explicit axes would constrain the reshapes in the page kernels.
    """
    if isinstance(data.sharding, SingleDeviceSharding):
        return data
    (device,) = data.devices()
    return jax.device_put(data, SingleDeviceSharding(device, memory_kind=data.sharding.memory_kind))


def units_of(cache) -> list[KVCacheMemory]:
    """The byte-page units of one cache array pair (`values`, then `scales`), this process's shards only.

    `cache`: anything with `values`, `scales`, `replicates_kv_across_tp` and
    `indexed_shards(array)` (a `KVCacheBuffer`, an adopted `PagedArray`).
    Sharded: one `KVCacheMemory` per shard per kind. Replicated: one
    `ReplicatedKVCacheMemory` per kind rooted at the first shard in order.
    """
    units: list[KVCacheMemory] = []
    for kind, array in (("values", cache.values), ("scales", cache.scales)):
        if array is None:
            continue
        shards = cache.indexed_shards(array)
        if cache.replicates_kv_across_tp:
            (_, root), *peers = shards
            peer_units = [KVCacheMemory(data, kind=kind, shard_index=i) for i, data in peers]
            units.append(ReplicatedKVCacheMemory(root, peer_units, kind=kind))
        else:
            units.extend(KVCacheMemory(data, kind=kind, shard_index=i) for i, data in shards)
    return units


class KVCacheBuffer:
    """One paged KV cache: values `[pages, kv, layers, tokens, heads, dim]` and optional scales.

    Registered as a pytree, so it passes through `jax.jit` (donate it to update
    it in place).
    """

    def __init__(self, replicates_kv_across_tp: bool, values: jax.Array, scales: jax.Array | None = None):
        self.replicates_kv_across_tp = bool(replicates_kv_across_tp)
        self.values = values
        self.scales = scales
        self._validate()

    def _validate(self) -> None:
        values, scales = self.values, self.scales
        spec = _spec_entries("values", values)
        mesh = _mesh(values)
        if values.dtype not in CACHE_DTYPES:
            raise ValueError(
                f"values dtype must be one of {', '.join(d.name for d in CACHE_DTYPES)}, got {values.dtype}"
            )
        if values.shape[1] not in (1, 2):
            raise ValueError(f"values kv_dim (axis 1) must be 2 (K and V) or 1 (MLA), got {values.shape[1]}")
        n_devices = values.sharding.num_devices
        if self.replicates_kv_across_tp:
            if any(entry is not None for entry in spec):
                raise ValueError(
                    f"values must be fully replicated when replicates_kv_across_tp=True, got PartitionSpec {P(*spec)}"
                )
            if n_devices < 2:
                raise ValueError(
                    f"replicates_kv_across_tp=True needs a TP degree > 1, got {n_devices} device; "
                    f"a single-shard MLA cache is an ordinary (non-replicated) buffer"
                )
        else:
            axis = _tp_axis("values", values, spec)
            if n_devices != mesh.shape[axis]:
                raise ValueError(
                    f"values spans {n_devices} devices but its TP axis {axis!r} has "
                    f"{mesh.shape[axis]}: every mesh axis other than TP must have size 1"
                )
        if scales is None:
            return
        scale_spec = _spec_entries("scales", scales)
        check_value_scale_dtypes(values.dtype, scales.dtype)
        if scales.shape[0] != values.shape[0]:
            raise ValueError(
                f"scales has {scales.shape[0]} pages but values has {values.shape[0]}: page counts must agree"
            )
        if scales.shape[1:5] != values.shape[1:5]:
            raise ValueError(
                f"scales shape {tuple(scales.shape)} must match values {tuple(values.shape)} on every axis but head_dim"
            )
        if _mesh(scales).devices.tolist() != mesh.devices.tolist():
            raise ValueError(
                f"scales devices {[d.id for d in _mesh(scales).devices.flat]} differ from values "
                f"devices {[d.id for d in mesh.devices.flat]}"
            )
        if scale_spec != spec:
            raise ValueError(
                f"scales PartitionSpec {P(*scale_spec)} differs from values {P(*spec)}: the heads "
                f"axis must be sharded on the same mesh axis ({spec[HEADS_AXIS]!r})"
            )

    # -- pytree ------------------------------------------------------------
    def tree_flatten(self) -> tuple[tuple[jax.Array, jax.Array | None], bool]:
        return (self.values, self.scales), self.replicates_kv_across_tp

    @classmethod
    def tree_unflatten(cls, replicates: bool, children: tuple[Any, Any]) -> KVCacheBuffer:
        # Leaves may be tracers or placeholders inside transformations: no validation.
        obj = object.__new__(cls)
        obj.replicates_kv_across_tp = replicates
        obj.values, obj.scales = children
        return obj

    # -- layout, read from the sharding -------------------------------------
    @property
    def mesh(self) -> Mesh:
        """The mesh the cache is laid out on."""
        return _mesh(self.values)

    @property
    def tp_axis(self) -> str | None:
        """The mesh axis sharding the heads; None when replicated."""
        if self.replicates_kv_across_tp:
            return None
        axis = _sharding(self.values).spec[HEADS_AXIS]
        return axis[0] if isinstance(axis, tuple) else axis

    @property
    def tp_degree(self) -> int:
        """Number of TP shards (devices) the cache spans."""
        if self.replicates_kv_across_tp:
            return self.values.sharding.num_devices
        return self.mesh.shape[self.tp_axis]

    # -- shards and units --------------------------------------------------
    @property
    def total_num_pages(self) -> int:
        """Pages in the cache (page 0 included)."""
        return self.values.shape[0]

    def indexed_shards(self, array: jax.Array) -> list[tuple[int, jax.Array]]:
        """This process's shards of `array` with their TP position, in TP-axis order.

        Replicated shards are ordered (and numbered) by mesh position.
        """
        if self.replicates_kv_across_tp:
            rank = {d: i for i, d in enumerate(_mesh(array).devices.flat)}
            pairs = [(rank[s.device], s.data) for s in array.addressable_shards]
        else:
            h = array.shape[HEADS_AXIS] // self.tp_degree
            pairs = [((s.index[HEADS_AXIS].start or 0) // h, s.data) for s in array.addressable_shards]
        return sorted(((i, _single_device(data)) for i, data in pairs), key=lambda pair: pair[0])

    def _ordered_shards(self, array: jax.Array) -> list[jax.Array]:
        return [data for _, data in self.indexed_shards(array)]

    @property
    def all_buffers(self) -> list[jax.Array]:
        """Per-shard arrays: every value shard, then every scale shard, in TP-axis order."""
        out = self._ordered_shards(self.values)
        if self.scales is not None:
            out += self._ordered_shards(self.scales)
        return out

    def to_memory(self) -> list[KVCacheMemory]:
        """Byte-page units, every value unit before every scale unit. Copies nothing.

        Sharded: one `KVCacheMemory` per shard per kind. Replicated: one
        `ReplicatedKVCacheMemory` per kind, rooted at TP shard 0, whose
        `peers` are one `KVCacheMemory` per other shard.

        Only this process's shards: when the mesh spans processes each process
        gets units for the shards it can address, and a replicated unit is
        rooted at its first shard in mesh order, its peers the other local ones.
        """
        return units_of(self)

    def with_memory(self, units: list[KVCacheMemory]) -> KVCacheBuffer:
        """A buffer assembled from `units` laid out like this one's `to_memory()`.

        Together with `KVCacheMemory.write_pages` this is the functional inverse
        of `to_memory()`: write byte rows into units, then rebuild the cache.
        """
        mine = self.to_memory()
        if len(units) != len(mine):
            raise ValueError(f"units has {len(units)} entries, expected {len(mine)} (one per to_memory() unit)")
        by_kind: dict[str, list[jax.Array]] = {"values": [], "scales": []}
        for i, (new, old) in enumerate(zip(units, mine, strict=True)):
            if (new.kind, new.shard_index, new.device, new.dtype, new.shard.shape) != (
                old.kind,
                old.shard_index,
                old.device,
                old.dtype,
                old.shard.shape,
            ):
                raise ValueError(f"units[{i}] is {new!r}, expected a unit laid out like {old!r}")
            by_kind[new.kind].extend(new.shards())
        arrays = [
            jax.make_array_from_single_device_arrays(old.shape, old.sharding, by_kind[kind])
            for kind, old in (("values", self.values), ("scales", self.scales))
            if old is not None
        ]
        return KVCacheBuffer(self.replicates_kv_across_tp, *arrays)

    def __repr__(self) -> str:
        axis = "replicated" if self.replicates_kv_across_tp else f"sharded on {self.tp_axis!r}"
        scales = "" if self.scales is None else f", scales={self.scales.dtype}{list(self.scales.shape)}"
        return f"KVCacheBuffer(values={self.values.dtype}{list(self.values.shape)}{scales}, TP {self.tp_degree} {axis})"


# Not `jax.tree_util.register_dataclass`, which unflattens by calling the class: the constructor's checks would
# run on every unflatten of concrete leaves (each jit output: 7-14x this unflatten's time), and be skipped for
# any other leaves (tracers, the PartitionSpecs of `jax.tree.map`), letting a numpy `values` through. Without
# checks its unflatten is still ~1.5x this one; its flatten is ~0.7x (bench/pytree.py, docs/benchmarks.md).
jax.tree_util.register_pytree_node_class(KVCacheBuffer)


class MultiKVCacheBuffer:
    """Several caches managed together (target/draft, sliding/global layers).

    `all_buffers` and `to_memory()` concatenate the children's, in the order
    of `children`.
    """

    def __init__(self, children: dict[str, KVCacheBuffer]):
        if not isinstance(children, dict) or not children:
            raise ValueError(f"children must be a non-empty dict of KVCacheBuffer, got {children!r}")
        for name, child in children.items():
            if not isinstance(child, KVCacheBuffer):
                raise ValueError(f"children[{name!r}] must be a KVCacheBuffer, got {type(child).__name__}")
        self.children = dict(children)

    @property
    def all_buffers(self) -> list[jax.Array]:
        """Every child's `all_buffers`, in the order of `children`."""
        return [b for child in self.children.values() for b in child.all_buffers]

    def to_memory(self) -> list[KVCacheMemory]:
        """Every child's `to_memory()` units, in the order of `children`. Copies nothing."""
        return [u for child in self.children.values() for u in child.to_memory()]

    def tree_flatten(self) -> tuple[tuple[KVCacheBuffer, ...], tuple[str, ...]]:
        return tuple(self.children.values()), tuple(self.children)

    @classmethod
    def tree_unflatten(cls, names: tuple[str, ...], children: Iterable[Any]) -> MultiKVCacheBuffer:
        obj = object.__new__(cls)
        obj.children = dict(zip(names, children, strict=True))
        return obj

    def __repr__(self) -> str:
        return f"MultiKVCacheBuffer({', '.join(f'{k}={v!r}' for k, v in self.children.items())})"


# Not `register_dataclass` either, for the same reason: its unflatten with the checks is ~5.5x (bench/pytree.py).
jax.tree_util.register_pytree_node_class(MultiKVCacheBuffer)

Cache: TypeAlias = KVCacheBuffer | MultiKVCacheBuffer
"""What every `cache` parameter accepts: one `KVCacheBuffer`, or several managed together as a
`MultiKVCacheBuffer` (whose pages are moved, stored and hashed as one row of all its children)."""


def check_tp_mesh(mesh: Mesh, tp_axis: str) -> int:
    """Validate a TP mesh (a `Mesh` with axis `tp_axis`, every other axis of size 1); returns the TP degree."""
    if not isinstance(mesh, Mesh):
        raise ValueError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    if tp_axis not in mesh.axis_names:
        raise ValueError(f"tp_axis {tp_axis!r} is not an axis of the mesh, whose axes are {mesh.axis_names}")
    tp = mesh.shape[tp_axis]
    if mesh.size != tp:
        raise ValueError(
            f"mesh {dict(mesh.shape)} has {mesh.size} devices but TP axis {tp_axis!r} has {tp}: "
            f"every mesh axis other than TP must have size 1"
        )
    return tp


def allocate_buffer(params: KVCacheParams, mesh: Mesh, num_pages: int, tp_axis: str = "tp") -> KVCacheBuffer:
    """A zero-filled cache of `num_pages` pages, created directly on the mesh devices.

    MHA/GQA caches shard the heads over `tp_axis`; MLA caches on more than one
    shard are replicated over it. Every other mesh axis must have size 1.
    """
    if not isinstance(params, KVCacheParams):
        raise ValueError(f"params must be a KVCacheParams, got {type(params).__name__}")
    tp = check_tp_mesh(mesh, tp_axis)
    num_pages = check_positive_int("num_pages", num_pages)
    params.heads_per_shard(tp)  # raises when the heads do not split evenly
    _check_fits(params, mesh, tp, num_pages)
    replicated = params.replicated(tp)
    spec = P() if replicated else P(None, None, None, None, tp_axis, None)
    sharding = NamedSharding(mesh, spec)
    shape = (num_pages, params.kv_dim, params.num_layers, params.page_size, params.n_kv_heads)
    values_shape = shape + (params.head_dim,)
    quant = params.quant
    if quant is None:
        values = jax.jit(lambda: _zero_bytes(values_shape, params.dtype), out_shardings=sharding)()
        return KVCacheBuffer(replicated, values)
    scales_shape = shape + (params.scales_per_head,)
    values, scales = jax.jit(
        lambda: (
            _zero_bytes(values_shape, params.dtype),
            _zero_bytes(scales_shape, quant.scale_dtype),
        ),
        out_shardings=(sharding, sharding),
    )()
    return KVCacheBuffer(replicated, values, scales)


def _check_fits(params: KVCacheParams, mesh: Mesh, tp: int, num_pages: int) -> None:
    """ValueError when `num_pages` cannot fit in the devices' memory, as far as it is known.

    Device allocation is asynchronous: a cache that does not fit would fail
    only at its first use (`RESOURCE_EXHAUSTED` at `block_until_ready`), so the
    size is checked here first, with the CLI's reading of what the devices
    (CPU: the host) have free.
    """
    from jaxkv._cli import resources  # the machine's memory: plain reads of /proc and memory_stats

    # This process's devices only: another process's devices are its to check (and report no memory here).
    local = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
    budget = resources.device_budget(local) if local else None
    per_page = params.shard_bytes_per_page(tp) * len(local)  # every local device holds one shard of each page
    if budget is None or per_page * num_pages <= budget[0]:
        return
    available, where = budget
    over = f"over TP {tp}" if len(local) == tp else f"over this process's {len(local)} of TP {tp}"
    raise ValueError(
        f"num_pages ({num_pages:,}) needs {resources.fmt_bytes(per_page * num_pages)} ({per_page:,} B per page "
        f"{over}) but {where}; num_pages must be at most {available // per_page:,}"
    )


def _zero_bytes(shape, dtype) -> jax.Array:
    # All-zero bytes, not the value 0: float8_e8m0fnu cannot represent 0 and
    # `jnp.zeros` would fill it with NaN (0xff).
    return jax.lax.bitcast_convert_type(jnp.zeros(shape, word_dtype(dtype)), dtype)
