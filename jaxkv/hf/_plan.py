"""What an architecture tells the loader: `ModelPlan` (config, cache layout, attention, weights) and `Weight`.

An architecture is a function `build(hf_config: dict, *, page_size, cache_dtype, attention) -> ModelPlan`
registered in `ARCHITECTURES` under config.json's `model_type`. It reads and
checks config.json's fields (`config_field`), and describes every jaxkv
weight as a `Weight`: the checkpoint tensor it comes from, the shape that
tensor must have, and how to read the part of it one TP shard holds. The
loader checks every `Weight` against the safetensors headers before it
places anything on a device.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
from jax.sharding import PartitionSpec as P

from jaxkv._decoder import Attention, DecoderConfig
from jaxkv.layout.params import KVCacheParams

SafeSlice = Any
"""A tensor of an open safetensors file (`safe_open(...).get_slice(name)`): `get_shape()`, numpy-style slicing."""

Reader = Callable[[SafeSlice, slice], np.ndarray]
"""(the checkpoint tensor, the range of the TP-split axis this shard holds: units of the jaxkv axis) ->
this shard's block in jaxkv's layout. For an unsplit weight the range is slice(None)."""


@dataclasses.dataclass(frozen=True)
class Weight:
    """One jaxkv weight and where it comes from."""

    source: str
    """The checkpoint tensor's name. With "{layer}" in it, one tensor per decoder layer, stacked on a leading
    layer axis in jaxkv (e.g. "model.layers.{layer}.self_attn.q_proj.weight")."""
    source_shape: tuple[int, ...]
    """The shape config.json implies for that tensor: a checkpoint whose header says otherwise is refused."""
    shape: tuple[int, ...]
    """The jaxkv shape (of one layer's part, for a stacked weight)."""
    split: int | None
    """The axis of `shape` split over the TP mesh axis, or None: replicated on every device."""
    read: Reader
    """Reads one shard's block (see `Reader`)."""

    def spec(self, tp_axis: str, stacked: bool) -> P:
        axes = [tp_axis if i == self.split else None for i in range(len(self.shape))]
        return P(*([None] if stacked else []), *axes)


@dataclasses.dataclass(frozen=True)
class ModelPlan:
    """Everything the loader needs to build a model from a checkpoint, before it reads a weight."""

    config: DecoderConfig
    """The model's shape, as the shared forward pass reads it (`jaxkv._decoder.DecoderConfig`)."""
    cache_params: KVCacheParams
    """The paged cache the model reads and writes."""
    attention: Attention
    """One layer's attention on one shard (`jaxkv._decoder.gqa` for Llama-style models)."""
    weights: dict
    """The forward pass's weight tree (`jaxkv._decoder`'s docstring) with a `Weight` at every leaf."""
    tp_split: dict[str, int]
    """{config field: size} of every size TP splits: each must be divisible by the TP degree."""


Builder = Callable[..., ModelPlan]
"""`build(hf_config: dict, *, page_size: int, cache_dtype: str, attention: str) -> ModelPlan`."""

ARCHITECTURES: dict[str, Builder] = {}
"""Architectures by config.json's `model_type`. To add one: write a module under jaxkv/hf/ whose `build` returns a
`ModelPlan`, set `ARCHITECTURES["<model_type>"] = build` at its import, and import it from jaxkv/hf/__init__.py."""


_MISSING = object()


def config_field(hf_config: dict, name: str, kind: type = int, default: Any = _MISSING) -> Any:
    """config.json's `name`, checked to be a `kind` (a positive int, a float, a bool, a str); ValueError naming it."""
    if name not in hf_config or hf_config[name] is None:
        if default is _MISSING:
            raise ValueError(f"config.json: field {name!r} is missing; expected a {kind.__name__}")
        return default
    value = hf_config[name]
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"config.json: {name} must be a positive int, got {value!r}")
    elif kind is float:
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise ValueError(f"config.json: {name} must be a positive number, got {value!r}")
        value = float(value)
    elif not isinstance(value, kind):
        raise ValueError(f"config.json: {name} must be a {kind.__name__}, got {value!r}")
    return value


# -- readers for Hugging Face's linear layers (weight [out, in]) ------------------------------------------


def _rows(tensor: SafeSlice, part: slice, unit: int) -> np.ndarray:
    """Rows [part.start * unit, part.stop * unit) of a tensor (all of it for slice(None))."""
    n = tensor.get_shape()[0] // unit
    start, stop, _ = part.indices(n)
    return tensor[start * unit : stop * unit]


def _cols(tensor: SafeSlice, part: slice, unit: int) -> np.ndarray:
    n = tensor.get_shape()[1] // unit
    start, stop, _ = part.indices(n)
    return tensor[:, start * unit : stop * unit]


def as_is(source: str, shape: tuple[int, ...], split: int | None = None) -> Weight:
    """A tensor jaxkv keeps in the checkpoint's layout (norms, the embedding); split (if at all) on axis 0."""
    if split not in (None, 0):
        raise ValueError(f"as_is splits axis 0 only, got {split}")
    return Weight(source, shape, shape, split, lambda t, part: _rows(t, part, 1))


def transposed(source: str, rows: int, cols: int, split: int | None = None) -> Weight:
    """A [rows, cols] tensor jaxkv keeps as [cols, rows]: the unembedding (unsplit), MLP gate/up (split=1:
    column-parallel), MLP down (split=0: row-parallel)."""

    def read(t, part):
        return (_cols(t, part, 1) if split == 0 else _rows(t, part, 1)).T

    return Weight(source, (rows, cols), (cols, rows), split, read)


def heads_out(source: str, heads: int, head_dim: int, d_model: int) -> Weight:
    """q/k/v projection [heads * head_dim, d] -> [d, heads, head_dim], column-parallel over heads."""

    def read(t, part):
        return _rows(t, part, head_dim).reshape(-1, head_dim, d_model).transpose(2, 0, 1)

    return Weight(source, (heads * head_dim, d_model), (d_model, heads, head_dim), 1, read)


def heads_in(source: str, heads: int, head_dim: int, d_model: int) -> Weight:
    """Output projection [d, heads * head_dim] -> [heads, head_dim, d], row-parallel over heads."""

    def read(t, part):
        return _cols(t, part, head_dim).T.reshape(-1, head_dim, d_model)

    return Weight(source, (d_model, heads * head_dim), (heads, head_dim, d_model), 0, read)


def heads_bias(source: str, heads: int, head_dim: int) -> Weight:
    """A q/k/v bias [heads * head_dim] -> [heads, head_dim], split over heads."""
    return Weight(
        source,
        (heads * head_dim,),
        (heads, head_dim),
        0,
        lambda t, part: _rows(t, part, head_dim).reshape(-1, head_dim),
    )
