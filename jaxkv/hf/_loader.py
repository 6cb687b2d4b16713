"""`load_checkpoint`: a Hugging Face checkpoint directory onto a TP mesh, checked whole before any byte moves."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

import jax
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy: safetensors then returns BF16 tensors as is)
import numpy as np
from jax.sharding import Mesh, NamedSharding

from jaxkv._decoder import PagedDecoder, check_tp_split, forward
from jaxkv.hf._plan import ARCHITECTURES, ModelPlan, Weight

FLOAT_DTYPES = ("F32", "BF16", "F16", "F64")
"""safetensors dtypes the loader reads; each converts to float32 exactly (F64 rounds once)."""


class CheckpointModel(PagedDecoder):
    """A model loaded from a checkpoint: float32 weights sharded Megatron-style over `mesh`'s `tp_axis`.

    The same surface as `jaxkv.models.TinyModel`: `config` (`page_size`,
    `vocab`, ...), `cache_params`, `mesh`, `tp_axis`, `allocate_cache`,
    `prefill`. Built by `load_checkpoint`.
    """

    def __init__(self, plan: ModelPlan, weights: dict, specs: dict, mesh: Mesh, tp_axis: str, tp: int, path: str):
        self.config = plan.config
        self.mesh = mesh
        self.tp_axis = tp_axis
        self.cache_params = plan.cache_params
        self.weights = weights
        self.path = path
        """The checkpoint directory."""
        step = lambda *args: forward(plan.config, tp_axis, plan.attention, *args)  # noqa: E731
        self._build(step, specs, tp)

    def __repr__(self) -> str:
        model_type = getattr(self.config, "model_type", "?")
        return (
            f"CheckpointModel({model_type} from {self.path!r}, TP {self.mesh.shape[self.tp_axis]} on {self.tp_axis!r})"
        )


def _files(directory: Path) -> dict[str, Path]:
    """{tensor name: file}: from model.safetensors.index.json when present, else every *.safetensors file."""
    from safetensors import safe_open

    index = directory / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: expected a 'weight_map' object of tensor name -> file")
        return {name: directory / file for name, file in weight_map.items()}
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{directory}: no *.safetensors file (and no model.safetensors.index.json)")
    names = {}
    for file in files:
        with safe_open(file, framework="numpy") as f:
            names |= dict.fromkeys(f.keys(), file)
    return names


def _leaves(tree: dict, prefix: str = "") -> list[tuple[str, Weight]]:
    out = []
    for key, value in tree.items():
        if isinstance(value, dict):
            out += _leaves(value, f"{prefix}{key}/")
        else:
            out.append((prefix + key, value))
    return out


def _check_headers(plan: ModelPlan, files: dict[str, Path], opened) -> None:
    """Every tensor the plan reads exists with the shape config.json implies and a float dtype."""
    n_layers = plan.config.n_layers
    for _, weight in _leaves(plan.weights):
        names = (
            [weight.source.format(layer=i) for i in range(n_layers)] if "{layer}" in weight.source else [weight.source]
        )
        for name in names:
            if name not in files:
                raise ValueError(f"checkpoint: tensor {name!r} is missing; expected shape {list(weight.source_shape)}")
            t = opened(files[name]).get_slice(name)
            shape, dtype = tuple(t.get_shape()), t.get_dtype()
            if shape != weight.source_shape:
                raise ValueError(
                    f"checkpoint: tensor {name!r} has shape {list(shape)}, but config.json implies "
                    f"{list(weight.source_shape)}"
                )
            if dtype not in FLOAT_DTYPES:
                raise ValueError(f"checkpoint: tensor {name!r} has dtype {dtype}; expected one of {FLOAT_DTYPES}")


def load_checkpoint(
    directory: str | os.PathLike,
    mesh: Mesh,
    *,
    tp_axis: str = "tp",
    page_size: int = 16,
    cache_dtype: str = "bfloat16",
    attention: str = "auto",
) -> CheckpointModel:
    """Load the Hugging Face checkpoint in `directory` (config.json + *.safetensors) onto `mesh`.

    The architecture is config.json's `model_type`, looked up in
    `ARCHITECTURES`. Every tensor's name, shape and dtype is checked against
    the safetensors headers, and the heads and MLP width against the TP
    degree, before any device memory is filled: a checkpoint that does not
    match raises one `ValueError` naming the field or tensor. Each device then
    reads only its own slice of each split weight (`get_slice`), and weights
    are float32 on device (bfloat16 words widened exactly); the cache is
    `cache_dtype`.
    """
    from safetensors import safe_open

    directory = Path(directory)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{directory}: no config.json; expected a Hugging Face checkpoint directory")
    hf = json.loads(config_path.read_text())
    model_type = hf.get("model_type")
    if model_type not in ARCHITECTURES:
        raise ValueError(
            f"config.json: model_type {model_type!r} is not supported; expected one of {sorted(ARCHITECTURES)}"
        )
    plan = ARCHITECTURES[model_type](hf, page_size=page_size, cache_dtype=cache_dtype, attention=attention)
    tp = check_tp_split(plan.tp_split, mesh, tp_axis)
    files = _files(directory)
    with contextlib.ExitStack() as stack:
        handles: dict[Path, Any] = {}

        def opened(file: Path):
            if file not in handles:
                handles[file] = stack.enter_context(safe_open(file, framework="numpy"))
            return handles[file]

        _check_headers(plan, files, opened)
        n_layers = plan.config.n_layers

        def place(weight: Weight):
            stacked = "{layer}" in weight.source
            shape = ((n_layers,) if stacked else ()) + weight.shape
            spec = weight.spec(tp_axis, stacked)

            def block(index: Any) -> np.ndarray:  # a tuple of slices, one per axis
                layers = range(n_layers)[index[0]] if stacked else [None]
                part = index[1:] if stacked else index
                split = slice(None) if weight.split is None else part[weight.split]
                parts = []
                for layer in layers:
                    name = weight.source.format(layer=layer) if stacked else weight.source
                    parts.append(np.asarray(weight.read(opened(files[name]).get_slice(name), split), np.float32))
                out = np.stack(parts) if stacked else parts[0]
                rest = tuple(slice(None) if i == weight.split else s for i, s in enumerate(part))
                return np.ascontiguousarray(out[(slice(None),) * stacked + rest])

            return jax.make_array_from_callback(shape, NamedSharding(mesh, spec), block), spec

        placed = {path: place(w) for path, w in _leaves(plan.weights)}
    weights, specs = (
        _unflatten({p: a for p, (a, _) in placed.items()}),
        _unflatten({p: s for p, (_, s) in placed.items()}),
    )
    return CheckpointModel(plan, weights, specs, mesh, tp_axis, tp, str(directory))


def _unflatten(flat: dict) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        *parents, leaf = path.split("/")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree
