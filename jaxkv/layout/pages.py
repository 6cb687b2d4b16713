"""Per-shard page kernels: typed cache pages <-> uint8 byte rows.

These are the only places that reinterpret cache bytes. Each works on one
shard's local array `[num_pages, *page_shape]` and runs inside a jitted
computation (directly, or per shard inside `jax.shard_map`). Two families:

- Pure XLA (`gather_page_bytes`, `scatter_page_bytes`): portable, used on
  GPU/TPU. They move words, not floats: pages are bitcast to the unsigned
  integer of the same width so no float op touches a NaN payload (XLA:CPU
  computes bfloat16/float8_e5m2 scatters through float32, quieting signalling
  NaNs). They select first and narrow second: the narrowing bitcast to uint8
  runs on the gathered pages only. On XLA:CPU even the same-width bitcast of
  the cache is a real pass (a loop fusion), so the XLA scatter costs two
  whole-cache passes there; on GPU it does not (bench/scatter_probe.py).
- Native (`*_native`, XLA:CPU only, jaxkv/_native): one memcpy per page through
  the XLA FFI, the cache aliased to the output so a donated write is in place.

`kernels(devices)` picks the family for the devices at hand.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import TypeAlias

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import DTypeLike

from jaxkv import _native as native

PageIds: TypeAlias = Sequence[int] | np.ndarray | jax.Array
"""Page ids as callers pass them: a rank-1 sequence, numpy array or jax.Array of ints (see `check_page_ids`)."""

# jaxlib ships no type stub for `jax.Device` (jax's own stubs spell it `Any`), so pyright rejects it in an
# annotation: those lines say `pyright: ignore[reportInvalidTypeForm]`.
_WORD_DTYPES = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint64}


def word_dtype(dtype: DTypeLike) -> np.dtype:
    """The unsigned integer dtype as wide as `dtype`."""
    return jnp.dtype(_WORD_DTYPES[jnp.dtype(dtype).itemsize])


def _as_words(x: jax.Array) -> jax.Array:
    return lax.bitcast_convert_type(x, word_dtype(x.dtype))


def _words_to_bytes(words: jax.Array) -> jax.Array:
    """[k, n] words -> [k, n * itemsize] uint8 (row-major, native byte order)."""
    k = words.shape[0]
    if words.dtype == jnp.uint8:
        return words.reshape(k, -1)
    return lax.bitcast_convert_type(words, jnp.uint8).reshape(k, -1)


def gather_page_bytes(shard: jax.Array, page_ids: jax.Array) -> jax.Array:
    """Bytes of the pages `page_ids` of one shard.

    shard: [num_pages, *page_shape] of any cache dtype; page_ids: [k] int32,
    already validated to lie in range. Returns [k, bytes_per_page] uint8.
    """
    rows = _as_words(shard).reshape(shard.shape[0], -1)  # [num_pages, words_per_page]
    return _words_to_bytes(rows[page_ids])


def scatter_page_bytes(shard: jax.Array, page_ids: jax.Array, page_bytes: jax.Array) -> jax.Array:
    """`shard` with the pages `page_ids` replaced by the byte rows `page_bytes`.

    The inverse of `gather_page_bytes`: page_bytes is [k, bytes_per_page]
    uint8 and page_ids [k] int32, unique and in range.
    """
    words = _as_words(shard)
    word = words.dtype
    k = page_bytes.shape[0]
    if word == jnp.uint8:
        pages = page_bytes.reshape(k, *shard.shape[1:])
    else:
        pages = page_bytes.reshape(k, *shard.shape[1:], word.itemsize)
        pages = lax.bitcast_convert_type(pages, word)
    # Ids past the end (bucket padding) are dropped.
    words = words.at[page_ids].set(pages, unique_indices=True, mode="drop")
    return lax.bitcast_convert_type(words, shard.dtype)


def shard_bytes(shard: jax.Array) -> jax.Array:
    """All pages of one shard as [num_pages, bytes_per_page] uint8."""
    return _words_to_bytes(_as_words(shard).reshape(shard.shape[0], -1))


def _page_bytes(shard: jax.Array) -> int:
    return math.prod(shard.shape[1:]) * shard.dtype.itemsize


def gather_page_bytes_native(shard: jax.Array, page_ids: jax.Array) -> jax.Array:
    """`gather_page_bytes` as one memcpy per page (XLA:CPU only; see jaxkv/_native)."""
    out = jax.ShapeDtypeStruct((page_ids.shape[0], _page_bytes(shard)), jnp.uint8)
    return jax.ffi.ffi_call("jaxkv_page_gather", out)(shard, page_ids)


def scatter_page_bytes_native(shard: jax.Array, page_ids: jax.Array, page_bytes: jax.Array) -> jax.Array:
    """`scatter_page_bytes` as one memcpy per page, in place when `shard` is donated (XLA:CPU only)."""
    out = jax.ShapeDtypeStruct(shard.shape, shard.dtype)
    return jax.ffi.ffi_call("jaxkv_page_scatter", out, input_output_aliases={0: 0})(shard, page_ids, page_bytes)


def scatter_page_bytes_from_pool(
    shard: jax.Array, page_ids: jax.Array, pool: jax.Array, slots: jax.Array, offset: jax.Array, *, group: int = 1
) -> jax.Array:
    """`shard` with page `page_ids[i]` set from `pool[slots[i], offset:offset + bytes_per_page]`.

    Native (XLA:CPU) only: the pool is the engine's host page pool, placed on
    the device without a copy. offset: [1] int32. group: the shards one load
    writes like this one (the copy policy streams by the whole load's bytes).
    """
    out = jax.ShapeDtypeStruct(shard.shape, shard.dtype)
    call = jax.ffi.ffi_call("jaxkv_page_scatter_from_pool", out, input_output_aliases={0: 0})
    return call(shard, page_ids, pool, slots, offset, group=np.int64(group))


def done_marker(array: jax.Array, *, native_kernels: bool) -> jax.Array:
    """A [1] array that exists only once `array` does: what a caller waits on when `array` itself may be donated.

    With the native kernels, a custom call that reads no byte of `array`: on
    XLA:CPU a fusion slicing one element of a freshly written cache cost ~1 ms
    a load. Elsewhere the first element, taken as unsigned words (a slice of a
    bfloat16 array would go through float32).
    """
    if native_kernels:
        return jax.ffi.ffi_call("jaxkv_done", jax.ShapeDtypeStruct((1,), jnp.uint8))(array)
    return lax.slice(_as_words(array), (0,) * array.ndim, (1,) * array.ndim).reshape(1)


def native_enabled(devices: Iterable[jax.Device]) -> bool:  # pyright: ignore[reportInvalidTypeForm]
    """Whether the native memcpy kernels serve these devices (all CPU, kernels built)."""
    return all(d.platform == "cpu" for d in devices) and native.available()


def kernels(devices: Iterable[jax.Device]) -> tuple[Callable[..., jax.Array], Callable[..., jax.Array]]:  # pyright: ignore[reportInvalidTypeForm]
    """(gather, scatter) per-shard kernels for arrays on `devices`.

    On XLA:CPU the native kernels: XLA:CPU's gather runs far below memcpy
    speed (docs/benchmarks.md, "Measurements behind the rules", "XLA:CPU's
    gather"), and a scatter into a bfloat16 or float8_e5m2 array converts it
    through float32 (quieting signalling NaNs), so jaxkv's word-typed scatter
    must bitcast the whole cache twice. Elsewhere the pure-XLA kernels.
    """
    if native_enabled(devices):
        return gather_page_bytes_native, scatter_page_bytes_native
    return gather_page_bytes, scatter_page_bytes


_jitted = {
    f: jax.jit(f) for f in (gather_page_bytes, scatter_page_bytes, gather_page_bytes_native, scatter_page_bytes_native)
}


def read_pages_jit(shard: jax.Array, page_ids: np.ndarray | jax.Array) -> jax.Array:
    """Jitted gather of page bytes from a single-device shard, with the best kernel for its device."""
    return _jitted[kernels(shard.devices())[0]](shard, page_ids)


def write_pages_jit(
    shard: jax.Array, page_ids: np.ndarray | jax.Array, page_bytes: np.ndarray | jax.Array
) -> jax.Array:
    """Jitted (non-donating) scatter of page bytes into a copy of a single-device shard."""
    return _jitted[kernels(shard.devices())[1]](shard, page_ids, page_bytes)


shard_bytes_jit = jax.jit(shard_bytes)


def check_page_ids(page_ids: PageIds, num_pages: int, *, name: str = "page_ids") -> np.ndarray:
    """Validate page ids on the host; returns them as an int32 numpy array.

    Accepts a sequence, numpy array or jax.Array of integers, rank 1. Raises
    `ValueError` naming `name` for a wrong rank or dtype, or an id outside
    [0, num_pages).
    """
    if isinstance(page_ids, (jax.Array, np.ndarray)):
        ids = np.asarray(page_ids)
    else:
        try:
            ids = np.asarray(list(page_ids))
        except TypeError as e:
            raise ValueError(f"{name} must be a rank-1 sequence of ints, got {type(page_ids).__name__}") from e
        if ids.size == 0:
            ids = ids.astype(np.int32)
    if ids.ndim != 1:
        raise ValueError(f"{name} must have rank 1, got shape {ids.shape}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"{name} must have an integer dtype, got {ids.dtype}")
    if ids.size:
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= num_pages:
            bad = lo if lo < 0 else hi
            raise ValueError(f"{name} contains {bad}, outside the valid range [0, {num_pages})")
    return ids.astype(np.int32)


def check_unique(ids: np.ndarray, *, name: str = "page_ids") -> None:
    """Raise `ValueError` if `ids` repeats a value (a scatter's order would be undefined).

    One sort and a neighbour comparison (cheaper than `np.unique`: this runs on every transfer).
    """
    s = np.sort(np.asarray(ids), axis=None)
    repeats = s[1:][s[1:] == s[:-1]]
    if repeats.size:
        raise ValueError(f"{name} repeats {int(repeats[0])}: ids in one batch must be unique")


def bucket(n: int) -> int:
    """The power of two >= `n` (1 for `n` <= 1) that a batch of `n` is padded to.

    Transfers pad their page batches, and attention its tokens, sequences and
    page-table columns, to buckets: a jitted program compiles once per power
    of two instead of once per size.
    """
    return 1 << max(0, n - 1).bit_length()
