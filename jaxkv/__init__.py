"""jaxkv: the paged KV-cache memory layer for JAX LLM serving.

Public API (see docs/architecture.md):

- `KVCacheParams`, `KVCacheQuantConfig`: layout, dtype, quantization, sizing.
- `allocate_buffer`, `KVCacheBuffer`, `MultiKVCacheBuffer`: TP-sharded caches.
- `KVCacheMemory`, `ReplicatedKVCacheMemory`: byte-page units from `to_memory()`.
- `OffloadEngine`, `Transfer`: batched, async page moves between device and a host pool.
- `NullConnector`, `HostConnector`, `TieredConnector` (+ `DiskTier`): block-hash keyed
  host and disk tiers for the scheduler (`lookup`, `load`, `offload`, `touch`).
- `PagedKVCacheManager`, `BlockPool`, `hash_blocks`: pages per request and prefix caching.
- `paged_attention` (+ `paged_attention_shard`): write K/V into pages and attend through a page table.
- `jaxkv.models`: `TinyConfig`, `TinyModel`, tiny random-weight MHA/MLA decoders on the paged cache.
- `GroupAgreement`, `GroupAgreementError`: how the processes of a multi-host TP group agree
  on lookups and loads (docs/multihost.md).
"""

from jaxkv.attention.xla import paged_attention, paged_attention_shard
from jaxkv.layout.buffer import KVCacheBuffer, MultiKVCacheBuffer, allocate_buffer
from jaxkv.layout.memory import KVCacheMemory, ReplicatedKVCacheMemory
from jaxkv.layout.params import KVCacheParams, KVCacheQuantConfig
from jaxkv.prefix.hashing import hash_blocks, root_hash
from jaxkv.prefix.manager import ManagerMetrics, PagedKVCacheManager, Request
from jaxkv.prefix.pool import NULL_PAGE, BlockPool, InsufficientPagesError
from jaxkv.tiers.connector import (
    ConnectorMetrics,
    HostConnector,
    KVConnector,
    KVLoadFailed,
    KVLoadRefused,
    NullConnector,
    TieredConnector,
)
from jaxkv.tiers.disk import DiskTier
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
    "BlockPool",
    "ConnectorMetrics",
    "DiskTier",
    "GroupAgreement",
    "GroupAgreementError",
    "HostConnector",
    "InsufficientPagesError",
    "KVCacheBuffer",
    "KVCacheMemory",
    "KVCacheParams",
    "KVCacheQuantConfig",
    "KVConnector",
    "KVLoadFailed",
    "KVLoadRefused",
    "ManagerMetrics",
    "MultiKVCacheBuffer",
    "NullConnector",
    "OffloadEngine",
    "PagedKVCacheManager",
    "ReplicatedKVCacheMemory",
    "Request",
    "TieredConnector",
    "Transfer",
    "allocate_buffer",
    "hash_blocks",
    "paged_attention",
    "paged_attention_shard",
    "root_hash",
]
