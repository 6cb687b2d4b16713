"""Cache parameters: the layout, dtype, quantization and sizing of one paged cache.

A `KVCacheParams` is validated once, in `__post_init__`; every derived
quantity (page shapes, bytes per page, pages that fit in a budget) is then a
pure function of it and a TP degree.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
from jax.typing import DTypeLike

from jaxkv._checks import check_int, check_positive_int

# Value dtypes a cache may hold without quantization.
CACHE_DTYPES = (
    jnp.dtype(jnp.bfloat16),
    jnp.dtype(jnp.float16),
    jnp.dtype(jnp.float32),
    jnp.dtype(jnp.float8_e4m3fn),
    jnp.dtype(jnp.float8_e5m2),
    jnp.dtype(jnp.int8),
)

# Quantized caches: the value dtypes that carry scales, and the scale dtypes
# allowed beside them (the FP8/int8 pairs MAX supports).
QUANT_VALUE_DTYPES = (
    jnp.dtype(jnp.float8_e4m3fn),
    jnp.dtype(jnp.float8_e5m2),
    jnp.dtype(jnp.int8),
)
QUANT_SCALE_DTYPES = (
    jnp.dtype(jnp.float32),
    jnp.dtype(jnp.float16),
    jnp.dtype(jnp.float8_e8m0fnu),
)


def _names(dtypes) -> str:
    return ", ".join(d.name for d in dtypes)


def check_value_scale_dtypes(value_dtype: DTypeLike, scale_dtype: DTypeLike) -> None:
    """Raise `ValueError` unless (value_dtype, scale_dtype) is a supported pair."""
    value_dtype, scale_dtype = jnp.dtype(value_dtype), jnp.dtype(scale_dtype)
    if value_dtype not in QUANT_VALUE_DTYPES:
        raise ValueError(
            f"unsupported value/scale dtype pair ({value_dtype.name}, {scale_dtype.name}): "
            f"quantized values must be one of {_names(QUANT_VALUE_DTYPES)}"
        )
    if scale_dtype not in QUANT_SCALE_DTYPES:
        raise ValueError(
            f"unsupported value/scale dtype pair ({value_dtype.name}, {scale_dtype.name}): "
            f"scale_dtype must be one of {_names(QUANT_SCALE_DTYPES)}"
        )


@dataclasses.dataclass(frozen=True)
class KVCacheQuantConfig:
    """How a quantized (FP8 or int8) cache stores its scales."""

    scale_dtype: jnp.dtype = jnp.dtype(jnp.float32)
    """Dtype of the per-block scales: float32, float16 or float8_e8m0fnu."""

    granularity: int = 128
    """Number of consecutive `head_dim` elements that share one scale. It must
    divide `head_dim`; the scales buffer then has `head_dim // granularity`
    entries per token and head."""

    def __post_init__(self):
        try:
            scale_dtype = jnp.dtype(self.scale_dtype)
        except TypeError as e:
            raise ValueError(f"scale_dtype {self.scale_dtype!r} is not a dtype") from e
        if scale_dtype not in QUANT_SCALE_DTYPES:
            raise ValueError(f"scale_dtype must be one of {_names(QUANT_SCALE_DTYPES)}, got {scale_dtype.name}")
        object.__setattr__(self, "scale_dtype", scale_dtype)
        object.__setattr__(self, "granularity", check_positive_int("granularity", self.granularity))


@dataclasses.dataclass(frozen=True)
class KVCacheParams:
    """Layout of one paged KV cache.

    The cache is one global array
    `[num_pages, kv_dim, num_layers, page_size, n_kv_heads, head_dim]`
    (plus, when quantized, a scales array whose last axis is
    `head_dim // granularity`). MHA/GQA caches shard the heads axis over the TP
    mesh axis; MLA caches are replicated over it.
    """

    dtype: jnp.dtype
    """Dtype of the cached K/V values (or of the MLA latent)."""

    n_kv_heads: int
    """Number of KV heads in total, across the whole TP group. 1 for MLA."""

    head_dim: int
    """Elements per head per token (for MLA: the latent width, incl. rope dims)."""

    num_layers: int
    """Transformer layers stored in every page: a page holds all layers of its tokens."""

    page_size: int
    """Tokens per page. This value is expressed in tokens, not bytes."""

    is_mla: bool = False
    """Multi-head latent attention: one latent vector per token (kv_dim 1),
    replicated on every TP shard instead of split by heads."""

    quant: KVCacheQuantConfig | None = None
    """Scales layout for an FP8/int8 cache; None for an unquantized cache."""

    def __post_init__(self):
        try:
            dtype = jnp.dtype(self.dtype)
        except TypeError as e:
            raise ValueError(f"dtype {self.dtype!r} is not a dtype") from e
        object.__setattr__(self, "dtype", dtype)
        for field in ("n_kv_heads", "head_dim", "num_layers", "page_size"):
            object.__setattr__(self, field, check_positive_int(field, getattr(self, field)))
        if self.quant is None:
            if dtype not in CACHE_DTYPES:
                raise ValueError(f"dtype must be one of {_names(CACHE_DTYPES)}, got {dtype.name}")
        else:
            if not isinstance(self.quant, KVCacheQuantConfig):
                raise ValueError(f"quant must be a KVCacheQuantConfig or None, got {type(self.quant).__name__}")
            check_value_scale_dtypes(dtype, self.quant.scale_dtype)
            if self.head_dim % self.quant.granularity:
                raise ValueError(
                    f"quant.granularity ({self.quant.granularity}) must divide head_dim "
                    f"({self.head_dim}), but {self.head_dim} % {self.quant.granularity} "
                    f"= {self.head_dim % self.quant.granularity}"
                )
        if self.is_mla and self.n_kv_heads != 1:
            raise ValueError(
                f"n_kv_heads must be 1 for MLA (is_mla=True): the latent cache has one "
                f"vector per token, got n_kv_heads={self.n_kv_heads}"
            )

    @property
    def kv_dim(self) -> int:
        """2 (a K and a V vector per token and head), or 1 for MLA's single latent."""
        return 1 if self.is_mla else 2

    @property
    def scales_per_head(self) -> int:
        """Scale entries per token and head; 0 for an unquantized cache."""
        return 0 if self.quant is None else math.ceil(self.head_dim / self.quant.granularity)

    def replicated(self, tp: int) -> bool:
        """Whether a cache for TP degree `tp` is replicated (MLA over more than one shard)."""
        return self.is_mla and tp > 1

    def heads_per_shard(self, tp: int) -> int:
        """KV heads one TP shard holds: all of them when replicated."""
        tp = check_positive_int("tp", tp)
        if self.is_mla:
            return self.n_kv_heads
        if self.n_kv_heads % tp:
            raise ValueError(
                f"n_kv_heads ({self.n_kv_heads}) must be divisible by the TP degree ({tp}), "
                f"but {self.n_kv_heads} % {tp} = {self.n_kv_heads % tp}"
            )
        return self.n_kv_heads // tp

    def shape_per_page(self, tp: int) -> tuple[int, ...]:
        """Shape of one page of one shard's values: `[kv_dim, layers, tokens, heads, head_dim]`."""
        h = self.heads_per_shard(tp)
        return (self.kv_dim, self.num_layers, self.page_size, h, self.head_dim)

    def shape_per_scale_page(self, tp: int) -> tuple[int, ...] | None:
        """Shape of one page of one shard's scales, or None when unquantized."""
        if self.quant is None:
            return None
        return self.shape_per_page(tp)[:-1] + (self.scales_per_head,)

    def shard_bytes_per_page(self, tp: int) -> int:
        """Bytes of one page on one TP shard, values plus scales."""
        n = math.prod(self.shape_per_page(tp)) * self.dtype.itemsize
        if self.quant is not None and (scale_shape := self.shape_per_scale_page(tp)) is not None:
            n += math.prod(scale_shape) * self.quant.scale_dtype.itemsize
        return n

    def bytes_per_page(self, tp: int) -> int:
        """Device bytes of one page over the whole TP group (values + scales).

        A replicated MLA page is counted once per shard: every device holds it.
        """
        return tp * self.shard_bytes_per_page(tp)

    def host_bytes_per_page(self, tp: int) -> int:
        """Host bytes of one page: like `bytes_per_page`, but a replicated page
        is stored once."""
        if self.replicated(tp):
            return self.shard_bytes_per_page(tp)
        return self.bytes_per_page(tp)

    def num_pages_for(self, memory_bytes: int, tp: int) -> int:
        """How many pages fit in `memory_bytes` of device memory, summed over the TP group."""
        memory_bytes = check_int("memory_bytes", memory_bytes)
        per_page = self.bytes_per_page(tp)
        if memory_bytes < per_page:
            raise ValueError(
                f"memory_bytes ({memory_bytes}) holds no page: one page needs "
                f"{per_page} bytes over TP degree {tp}; raise memory_bytes to at least "
                f"{per_page} or shrink page_size ({self.page_size}) / num_layers "
                f"({self.num_layers})"
            )
        return memory_bytes // per_page
