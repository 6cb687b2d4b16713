"""Helpers shared by the tests: meshes and caches filled with random bit patterns."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxkv
from jaxkv.layout.pages import word_dtype

TP_DEGREES = (1, 2, 4, 8)


def tp_mesh(tp: int, axis: str = "tp") -> jax.sharding.Mesh:
    return jax.make_mesh((tp,), (axis,), devices=jax.devices()[:tp])


def random_bits(shape, dtype, rng: np.random.Generator) -> np.ndarray:
    """Uniformly random bit patterns viewed as `dtype`: NaNs with payloads, Infs, subnormals."""
    word = np.dtype(word_dtype(dtype))
    bits = rng.integers(0, np.iinfo(word).max, size=shape, dtype=word, endpoint=True)
    return bits.view(np.dtype(dtype))


def special_values(dtype) -> np.ndarray:
    """Bit patterns a float op is most likely to disturb: signalling/quiet NaNs, ±Inf, -0."""
    word = np.dtype(word_dtype(dtype))
    if word.itemsize == 1:
        patterns = [0x7F, 0xFF, 0x80, 0x7C, 0xFC, 0x01, 0x81]
    elif word.itemsize == 2:
        patterns = [0x7FC1, 0x7F81, 0xFF81, 0x7C01, 0x7E01, 0x7F80, 0xFF80, 0x8000, 0x0001]
    else:
        patterns = [0x7FC00001, 0x7F800001, 0xFF800001, 0x7F800000, 0xFF800000, 0x80000000, 0x1]
    return np.array(patterns, dtype=word).view(np.dtype(dtype))


def random_buffer(
    params: jaxkv.KVCacheParams, tp: int, num_pages: int, seed: int = 0
) -> tuple[jaxkv.KVCacheBuffer, np.ndarray, np.ndarray | None]:
    """A cache laid out like `allocate_buffer` but filled with random bits.

    Returns the buffer and the global numpy values (and scales) it holds. The
    first page starts with special NaN/Inf patterns.
    """
    rng = np.random.default_rng(seed)
    mesh = tp_mesh(tp)
    replicated = params.replicated(tp)
    sharding = NamedSharding(mesh, P() if replicated else P(None, None, None, None, "tp", None))
    lead = (num_pages, params.kv_dim, params.num_layers, params.page_size, params.n_kv_heads)
    values = random_bits(lead + (params.head_dim,), params.dtype, rng)
    special = special_values(params.dtype)
    values.reshape(-1)[: special.size] = special
    arrays = [values]
    if params.quant is not None:
        arrays.append(random_bits(lead + (params.scales_per_head,), params.quant.scale_dtype, rng))
    buffer = jaxkv.KVCacheBuffer(replicated, *(jax.device_put(a, sharding) for a in arrays))
    return buffer, values, arrays[1] if len(arrays) > 1 else None


def as_bytes(x) -> np.ndarray:
    """Raw bytes of an array (jax or numpy), as flat uint8."""
    return np.ascontiguousarray(np.asarray(x)).reshape(-1).view(np.uint8)
