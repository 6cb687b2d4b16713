"""jaxkv: the paged KV-cache memory layer for JAX LLM serving.

Public API (see docs/architecture.md):

- `KVCacheParams`, `KVCacheQuantConfig`: layout, dtype, quantization, sizing.
- `allocate_buffer`, `KVCacheBuffer`, `MultiKVCacheBuffer`: TP-sharded caches.
- `KVCacheMemory`, `ReplicatedKVCacheMemory`: byte-page units from `to_memory()`.
- `OffloadEngine`, `Transfer`: batched, async page moves between device and a host pool.
"""

from jaxkv._buffer import KVCacheBuffer, MultiKVCacheBuffer, allocate_buffer
from jaxkv._engine import OffloadEngine
from jaxkv._memory import KVCacheMemory, ReplicatedKVCacheMemory
from jaxkv._params import KVCacheParams, KVCacheQuantConfig
from jaxkv._transfer import Transfer

__version__ = "0.1.0"

__all__ = [
    "KVCacheBuffer",
    "KVCacheMemory",
    "KVCacheParams",
    "KVCacheQuantConfig",
    "MultiKVCacheBuffer",
    "OffloadEngine",
    "ReplicatedKVCacheMemory",
    "Transfer",
    "allocate_buffer",
]
