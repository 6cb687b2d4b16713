"""jaxkv: the paged KV-cache memory layer for JAX LLM serving.

Public API (see docs/architecture.md), by layer:

- Adopted caches: `adopt` (an engine's own page-major arrays, e.g. vLLM-TPU's per-layer caches, as an
  `AdoptedCache` of `PagedArray`s that everything below takes as a cache; no copy).
- Layout: `KVCacheParams`, `KVCacheQuantConfig`, `allocate_buffer`, `KVCacheBuffer`,
  `MultiKVCacheBuffer`, `KVCacheMemory`, `ReplicatedKVCacheMemory` (byte-page units from
  `to_memory()`), `RowLayout` / `layout_fingerprint` (what a stored page holds).
- Transfer: `OffloadEngine`, `Transfer` (batched, async page moves between device and host rows),
  `GroupAgreement`, `GroupAgreementError` (multi-process TP groups, docs/multihost.md).
- Tiers, scheduler side (indexes only, picklable): `TieredStore` (+ `TierPolicy`, `LoadPlan`,
  `StorePlan`, `HostIndex`, `TierIndex`, built from a `StoreSpec`). Worker side (the bytes):
  `OffloadWorker` (+ `LoadResult`, `StoreResult`, `TierReport`) over a `HostTier` and lower tiers
  implementing the `Tier` protocol (`DiskTier`, ...). `open_tiers` builds both in one process.
- Prefix caching, scheduler side: `PagedKVCacheManager`, `Request`, `BlockPool`, `hash_blocks`.
- Attention: `paged_attention`, `paged_attention_shard`.
- `jaxkv.models` (imported on first use): tiny random-weight MHA/MLA decoders on the paged cache.
"""

from jaxkv.attention.xla import paged_attention, paged_attention_shard
from jaxkv.layout.adopted import AdoptedCache, PagedArray, adopt
from jaxkv.layout.buffer import KVCacheBuffer, MultiKVCacheBuffer, allocate_buffer
from jaxkv.layout.fingerprint import RowLayout, layout_fingerprint
from jaxkv.layout.memory import KVCacheMemory, ReplicatedKVCacheMemory
from jaxkv.layout.params import KVCacheParams, KVCacheQuantConfig
from jaxkv.prefix.hashing import hash_blocks, root_hash
from jaxkv.prefix.manager import ManagerMetrics, PagedKVCacheManager, Request
from jaxkv.prefix.pool import NULL_PAGE, BlockPool, InsufficientPagesError
from jaxkv.tiers.base import Tier, TierMetrics
from jaxkv.tiers.compose import open_tiers
from jaxkv.tiers.disk import DiskTier
from jaxkv.tiers.host import HostTier
from jaxkv.tiers.index import HostIndex, StoreSpec, TierIndex, TierSpec
from jaxkv.tiers.store import (
    LoadPlan,
    LoadResult,
    StoreMetrics,
    StorePlan,
    StoreResult,
    TieredStore,
    TierPolicy,
    TierReport,
)
from jaxkv.tiers.worker import LoadHandle, OffloadWorker, StoreHandle
from jaxkv.transfer.agreement import GroupAgreement, GroupAgreementError
from jaxkv.transfer.engine import OffloadEngine
from jaxkv.transfer.handle import Transfer

__version__ = "0.1.0"


def __getattr__(name):
    # The toy models are for demos and tests: importable as jaxkv.models, not loaded by `import jaxkv`.
    if name == "models":
        import importlib

        return importlib.import_module("jaxkv.models")
    raise AttributeError(f"module 'jaxkv' has no attribute {name!r}")


__all__ = [
    "NULL_PAGE",
    "AdoptedCache",
    "BlockPool",
    "DiskTier",
    "GroupAgreement",
    "GroupAgreementError",
    "HostIndex",
    "HostTier",
    "InsufficientPagesError",
    "KVCacheBuffer",
    "KVCacheMemory",
    "KVCacheParams",
    "KVCacheQuantConfig",
    "LoadHandle",
    "LoadPlan",
    "LoadResult",
    "ManagerMetrics",
    "MultiKVCacheBuffer",
    "OffloadEngine",
    "OffloadWorker",
    "PagedArray",
    "PagedKVCacheManager",
    "ReplicatedKVCacheMemory",
    "Request",
    "RowLayout",
    "StoreHandle",
    "StoreMetrics",
    "StorePlan",
    "StoreResult",
    "StoreSpec",
    "Tier",
    "TierIndex",
    "TierMetrics",
    "TierPolicy",
    "TierReport",
    "TierSpec",
    "TieredStore",
    "Transfer",
    "adopt",
    "allocate_buffer",
    "hash_blocks",
    "layout_fingerprint",
    "open_tiers",
    "paged_attention",
    "paged_attention_shard",
    "root_hash",
]
