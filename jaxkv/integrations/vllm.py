"""A vLLM KV connector backed by jaxkv: host memory, disk and Redis/Valkey under a JAX engine's own cache arrays.

Turn it on in vLLM (or tpu-inference, where its connector allowlist lets it):

```
KVTransferConfig(
    kv_connector="JaxkvConnector",
    kv_connector_module_path="jaxkv.integrations.vllm",
    kv_role="kv_both",
    kv_connector_extra_config={"host_bytes": 32 << 30, "disk_directory": "/local_nvme/jaxkv", "disk_bytes": 1 << 40},
)
```

The connector is jaxkv's scheduler/worker split (docs/architecture.md) under
vLLM's `KVConnectorBase_V1` contract:

- **Scheduler role** (vLLM's scheduler process): a `TieredStore`, indexes
  only. It hashes each request's full blocks with jaxkv's chained block
  hashes (rooted in the model's page geometry, not the TP degree, and the
  request's `cache_salt`; stable across restarts, unlike vLLM's own block
  hashes, which a random seed starts unless `PYTHONHASHSEED` is set), answers
  `get_num_new_matched_tokens` from its indexes, pins the blocks to load in
  `update_state_after_alloc`, and sends plans (`LoadPlan`, `StorePlan`: plain
  data) to the worker in the step's `JaxkvConnectorMetadata`.
- **Worker role** (the process that holds the cache): an `OffloadWorker` over
  the engine's arrays, adopted as they are (`jaxkv.adopt`: one page-major
  `jax.Array` per layer, heads sharded on one axis). It runs each step's
  loads in `start_load_kv` and its stores in `wait_for_save`, and sends the
  results (and, once, the `StoreSpec` the scheduler builds its indexes from)
  back in `JaxkvWorkerMetadata`. Loads that cannot be served are reported to
  vLLM as failed blocks (`get_block_ids_with_load_errors`): vLLM recomputes
  them; garbage never reaches attention.

Loads are synchronous (they feed the step that follows them) and stores copy
the step's full blocks to host memory before `wait_for_save` returns, so
vLLM may reuse a page as soon as the step ends: no delayed frees. A JAX
engine's arrays are immutable: a load donates them and hands new ones back,
written into `runner.kv_caches` (after `register_runner`, tpu-inference's
hook) or into the list given to `register_kv_caches`, in place.

Not supported (refused with one clear error, never wrong bytes): more than
one KV cache group (hybrid sliding-window/Mamba models), caches that are not
JAX arrays (vLLM's torch tensors), pipeline parallelism across workers.
Requests with LoRA adapters, multimodal inputs or prompt embeddings are
neither served nor stored (their K/V depend on more than their tokens).
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import jax

from jaxkv._checks import check_positive_int
from jaxkv.layout.adopted import AdoptedCache, adopt
from jaxkv.prefix.hashing import hash_blocks, root_hash
from jaxkv.tiers.host import HostTier
from jaxkv.tiers.index import StoreSpec
from jaxkv.tiers.store import LoadPlan, LoadResult, StorePlan, StoreResult, TieredStore, TierPolicy
from jaxkv.tiers.worker import OffloadWorker

from vllm.distributed.kv_transfer.kv_connector.v1.base import (  # isort: skip
    KVConnectorBase_V1,
    KVConnectorHandshakeMetadata,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorWorkerMetadata,
)
from vllm.v1.metrics.cache_hit_source import CacheHitSource  # isort: skip

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

__all__ = [
    "ConnectorConfig",
    "JaxkvConnector",
    "JaxkvConnectorMetadata",
    "JaxkvHandshakeMetadata",
    "JaxkvWorkerMetadata",
]

GiB = 1 << 30


# -- configuration -----------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ConnectorConfig:
    """`kv_connector_extra_config`, checked: every key is one of these fields."""

    host_bytes: int = 4 * GiB
    """Host memory for blocks (the first tier; loads pass through it)."""
    disk_directory: str | None = None
    """A directory for the disk tier (blocks survive a restart, and a change of TP degree); None: no disk tier."""
    disk_bytes: int | None = None
    """The disk tier's byte budget; required with `disk_directory`."""
    remote_url: str | None = None
    """`redis://host:port/db` of a Redis/Valkey server shared by instances; None: no remote tier."""
    remote_prefix: str = "jaxkv:"
    """Key prefix of this deployment on the remote server."""
    shard_axis: int | str | None = "auto"
    """The axis of each cache array the mesh splits (the KV heads); "auto": read from its sharding; None: replicated."""
    seed: str = "jaxkv"
    """Deployment seed at the root of every block hash: instances that share blocks share it."""
    write_through: bool = True
    """Send every stored block to every lower tier at once (True), or only on eviction from host memory."""
    block_key: str | None = None
    """A deployment secret authenticating disk and remote blocks (None: `JAXKV_BLOCK_KEY` if set)."""

    @classmethod
    def from_extra(cls, extra: Mapping[str, Any] | None) -> ConnectorConfig:
        extra = dict(extra or {})
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(extra) - fields)
        if unknown:
            raise ValueError(
                f"kv_connector_extra_config has unknown key(s) {unknown} for JaxkvConnector; expected some of "
                f"{sorted(fields)}"
            )
        config = cls(**extra)
        check_positive_int("kv_connector_extra_config['host_bytes']", config.host_bytes)
        if (config.disk_directory is None) != (config.disk_bytes is None):
            raise ValueError(
                "kv_connector_extra_config needs disk_directory and disk_bytes together, got "
                f"disk_directory={config.disk_directory!r}, disk_bytes={config.disk_bytes!r}"
            )
        if config.disk_bytes is not None:
            check_positive_int("kv_connector_extra_config['disk_bytes']", config.disk_bytes)
        axis = config.shard_axis
        if not (axis is None or axis == "auto" or (isinstance(axis, int) and not isinstance(axis, bool) and axis >= 1)):
            raise ValueError(
                f"kv_connector_extra_config['shard_axis'] must be 'auto', None or an int >= 1 (axis 0 holds "
                f"pages), got {axis!r}"
            )
        for name in ("seed", "remote_prefix"):
            if not isinstance(getattr(config, name), str):
                raise ValueError(
                    f"kv_connector_extra_config[{name!r}] must be a str, got {type(getattr(config, name)).__name__}"
                )
        if not isinstance(config.write_through, bool):
            raise ValueError(f"kv_connector_extra_config['write_through'] must be a bool, got {config.write_through!r}")
        return config


def _check_one_group(kv_cache_config: KVCacheConfig | None) -> None:
    """jaxkv pages one group of full-attention layers; a hybrid model's other groups would get wrong bytes."""
    if kv_cache_config is None:
        return
    groups = kv_cache_config.kv_cache_groups
    kinds = [type(g.kv_cache_spec).__name__ for g in groups]
    if len(groups) != 1:
        raise ValueError(
            f"JaxkvConnector serves one KV cache group of full-attention layers; this model has {len(groups)} "
            f"({kinds}): hybrid sliding-window or Mamba models are not supported yet"
        )
    spec = groups[0].kv_cache_spec
    if getattr(spec, "sliding_window", None) is not None or getattr(spec, "attention_chunk_size", None) is not None:
        raise ValueError(
            f"JaxkvConnector serves full-attention layers only; the model's KV cache group is {kinds[0]} with "
            f"sliding_window={getattr(spec, 'sliding_window', None)}, "
            f"attention_chunk_size={getattr(spec, 'attention_chunk_size', None)}"
        )


# -- what the two sides send each other --------------------------------------


@dataclasses.dataclass
class JaxkvConnectorMetadata(KVConnectorMetadata):
    """Scheduler → worker, once a step: the plans to run. Plain data."""

    generation: int = 0
    """Counts resets: the worker skips nothing, the scheduler ignores results of an older generation."""
    loads: list[tuple[str, LoadPlan]] = dataclasses.field(default_factory=list)
    """(request id, plan), run in `start_load_kv` before the step's forward."""
    stores: list[StorePlan] = dataclasses.field(default_factory=list)
    """Run in `wait_for_save`, after the step's forward wrote the pages."""
    reset: bool = False
    """Empty every tier before anything else (a prefix-cache reset)."""


@dataclasses.dataclass
class JaxkvHandshakeMetadata(KVConnectorHandshakeMetadata):
    """Worker → scheduler at start-up, after `register_kv_caches`: the worker's spec (layout, tiers, blocks held)."""

    spec: StoreSpec


@dataclasses.dataclass
class JaxkvWorkerMetadata(KVConnectorWorkerMetadata):
    """Worker → scheduler, once a step: what the plans did, and the worker's spec when it is new."""

    generation: int = 0
    spec: StoreSpec | None = None
    loads: list[LoadResult] = dataclasses.field(default_factory=list)
    stores: list[StoreResult] = dataclasses.field(default_factory=list)
    cancelled: list[StorePlan] = dataclasses.field(default_factory=list)
    """Store plans the worker could not start (nothing copied): the scheduler frees their slots."""

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        if not isinstance(other, JaxkvWorkerMetadata):
            raise TypeError(f"cannot aggregate JaxkvWorkerMetadata with {type(other).__name__}")
        return JaxkvWorkerMetadata(
            max(self.generation, other.generation),
            self.spec if self.spec is not None else other.spec,
            self.loads + other.loads,
            self.stores + other.stores,
            self.cancelled + other.cancelled,
        )


_HIT_SOURCES = {"host": CacheHitSource.HOST, "disk": CacheHitSource.DISK}

# A worker in the scheduler's own process answers probes of shared tiers (blocks other instances wrote).
_LOCAL_WORKERS: dict[str, OffloadWorker] = {}
_LOCAL_LOCK = threading.Lock()


# -- the connector ------------------------------------------------------------


class JaxkvConnector(KVConnectorBase_V1):
    """vLLM's KV connector over jaxkv (module docstring). vLLM builds one per role."""

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig | None = None):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)  # pyright: ignore[reportArgumentType]
        transfer = vllm_config.kv_transfer_config
        self.config = ConnectorConfig.from_extra(transfer.kv_connector_extra_config if transfer else None)
        self.block_size = check_positive_int("cache_config.block_size", vllm_config.cache_config.block_size)
        self._engine_id = str(getattr(transfer, "engine_id", "") or "")
        self._scheduler: _SchedulerSide | None = None
        self._worker: _WorkerSide | None = None
        if role == KVConnectorRole.SCHEDULER:
            _check_one_group(kv_cache_config)
            self._scheduler = _SchedulerSide(self.config, self.block_size, self._engine_id)
        else:
            self._worker = _WorkerSide(self.config, self.block_size, self._engine_id, kv_cache_config)

    # -- scheduler role ----------------------------------------------------
    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        return self._sched.matched(request, num_computed_tokens), False

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int):
        self._sched.allocated(request, blocks, num_external_tokens)

    def get_external_cache_hit_sources(self, request: Request, num_external_tokens: int) -> dict[CacheHitSource, int]:
        """The tokens of the request's load per tier: host memory, disk, or the remote store."""
        plan = self._sched.pending_loads.get(request.request_id)
        if plan is None or num_external_tokens == 0:
            return super().get_external_cache_hit_sources(request, num_external_tokens)
        out: dict[CacheHitSource, int] = {}
        for source in plan.sources:
            kind = _HIT_SOURCES.get(source, CacheHitSource.EXTERNAL_UNSPECIFIED)
            out[kind] = out.get(kind, 0) + self.block_size
        return out

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        return self._sched.build(scheduler_output)

    def update_connector_output(self, connector_output: KVConnectorOutput):
        meta = connector_output.kv_connector_worker_meta
        if meta is not None:
            if not isinstance(meta, JaxkvWorkerMetadata):
                raise TypeError(f"expected JaxkvWorkerMetadata from the worker, got {type(meta).__name__}")
            self._sched.apply(meta)

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        self._sched.finished(request.request_id)
        return False, None

    def set_xfer_handshake_metadata(self, metadata: dict[int, KVConnectorHandshakeMetadata]) -> None:
        """vLLM's start-up exchange: the worker's spec, so the first request is already looked up in every tier."""
        specs = [m.spec for m in metadata.values() if isinstance(m, JaxkvHandshakeMetadata)]
        if len(specs) > 1:
            raise ValueError(
                f"JaxkvConnector runs one worker (a JAX process drives every device of its mesh); got handshakes "
                f"from {len(specs)} workers (ranks {sorted(metadata)})"
            )
        if specs:
            self._sched.open(specs[0])

    def reset_cache(self) -> bool | None:
        self._sched.reset()
        return True

    # -- worker role -------------------------------------------------------
    def register_kv_caches(self, kv_caches):  # pyright: ignore[reportIncompatibleMethodOverride]
        self._work.register(kv_caches)

    def register_runner(self, runner) -> None:
        """tpu-inference's hook: the runner whose `kv_caches` list the connector reads and writes back."""
        self._work.runner = runner

    def _meta(self) -> JaxkvConnectorMetadata:
        meta = self._get_connector_metadata()
        if not isinstance(meta, JaxkvConnectorMetadata):
            raise TypeError(f"expected JaxkvConnectorMetadata from the scheduler, got {type(meta).__name__}")
        return meta

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        self._work.start_load(self._meta())

    def wait_for_layer_load(self, layer_name: str) -> None:
        self._work.wait_for_layer(layer_name)

    def save_kv_layer(self, layer_name: str, kv_layer, attn_metadata, **kwargs: Any) -> None:
        """Nothing per layer: a JAX step writes every layer in one program, so `wait_for_save` copies them all."""
        return

    def wait_for_save(self):
        if self.has_connector_metadata():
            self._work.save(self._meta())

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._work.take_load_errors()

    def get_handshake_metadata(self) -> KVConnectorHandshakeMetadata | None:
        return self._work.handshake()

    def build_connector_worker_meta(self) -> KVConnectorWorkerMetadata | None:
        return self._work.take_meta()

    def shutdown(self):
        if self._worker is not None:
            self._worker.close()
        if self._scheduler is not None:
            self._scheduler.close()

    # -- sides -------------------------------------------------------------
    @property
    def _sched(self) -> _SchedulerSide:
        if self._scheduler is None:
            raise RuntimeError(f"a scheduler-role method was called on the {self.role.name} connector")
        return self._scheduler

    @property
    def _work(self) -> _WorkerSide:
        if self._worker is None:
            raise RuntimeError(f"a worker-role method was called on the {self.role.name} connector")
        return self._worker

    @property
    def worker(self) -> OffloadWorker | None:
        """The worker role's `OffloadWorker` (None before `register_kv_caches`, or in the scheduler role)."""
        return None if self._worker is None else self._worker.worker

    @property
    def served(self) -> dict[str, int]:
        """Scheduler role: prompt tokens jaxkv loaded instead of vLLM computing them, per tier they came from."""
        return dict(self._sched.served)

    @property
    def store(self) -> TieredStore | None:
        """The scheduler role's `TieredStore` (None until the worker's spec arrived, or in the worker role)."""
        return None if self._scheduler is None else self._scheduler.store


@dataclasses.dataclass
class _Request:
    request: Any
    block_ids: list[int] = dataclasses.field(default_factory=list)
    hashes: list[bytes] = dataclasses.field(default_factory=list)
    stored: int = 0
    """Full blocks already handed to a store plan (or found held)."""


class _SchedulerSide:
    """Indexes and plans; no bytes, files or sockets (the worker's `probe` only when it lives in this process)."""

    def __init__(self, config: ConnectorConfig, block_size: int, engine_id: str):
        self.config = config
        self.block_size = block_size
        self.engine_id = engine_id
        self.store: TieredStore | None = None
        self.generation = 0
        self.root: bytes = b""
        self.requests: dict[str, _Request] = {}
        self.matched_blocks: dict[str, tuple[int, int]] = {}
        """Request id -> (blocks vLLM computed itself, blocks jaxkv can load), from the last lookup."""
        self.pending_loads: dict[str, LoadPlan] = {}
        self.reset_pending = False
        self.served: dict[str, int] = {}
        """Tokens loaded into the device per tier they came from (loads that completed whole)."""
        self.failed_loads = 0
        """Loads the worker refused or failed: vLLM recomputed their blocks."""

    # Requests whose K/V depend on more than their tokens are neither served nor stored.
    @staticmethod
    def _cacheable(request) -> bool:
        return not (
            getattr(request, "lora_request", None) is not None
            or getattr(request, "mm_features", None)
            or getattr(request, "prompt_embeds", None) is not None
        )

    def _hashes(self, state: _Request, n_blocks: int) -> list[bytes]:
        """The chained jaxkv hashes of the request's first `n_blocks` full blocks (extended as tokens arrive)."""
        have = len(state.hashes)
        if n_blocks > have:
            tokens = list(state.request.all_token_ids[: n_blocks * self.block_size])
            salt = getattr(state.request, "cache_salt", None)
            parent = state.hashes[-1] if have else root_hash(self.config.seed, self.root, salt)
            state.hashes += hash_blocks(tokens, self.block_size, parent, start_block=have)
        return state.hashes[:n_blocks]

    def matched(self, request, num_computed_tokens: int) -> int:
        self.matched_blocks.pop(request.request_id, None)
        if self.store is None or not self._cacheable(request):
            return 0
        # The last token is always computed: its logits sample the next one.
        limit = (request.num_tokens - 1) // self.block_size
        local = num_computed_tokens // self.block_size
        if limit <= local:
            return 0
        state = self.requests.get(request.request_id) or _Request(request)
        self.requests[request.request_id] = state
        held = len(self.store.lookup(self._hashes(state, limit)))
        # A load passes through host memory: at most its slots' worth of blocks at once.
        held = min(held, local + self.store.host.num_slots)
        if held <= local:
            return 0
        self.matched_blocks[request.request_id] = (local, held - local)
        return (held - local) * self.block_size

    def allocated(self, request, blocks, num_external_tokens: int) -> None:
        state = self.requests.get(request.request_id) or _Request(request)
        self.requests[request.request_id] = state
        state.request = request
        if num_external_tokens <= 0 or self.store is None:
            return
        local, n = self.matched_blocks.pop(request.request_id, (0, 0))
        if n * self.block_size != num_external_tokens:
            raise RuntimeError(
                f"request {request.request_id}: vLLM allocated {num_external_tokens} external tokens, the connector "
                f"matched {n} blocks of {self.block_size}"
            )
        block_ids = list(blocks.get_block_ids()[0])
        hashes = self._hashes(state, local + n)[local:]
        plan = self.store.prepare_load(hashes, block_ids[local : local + n])
        self.pending_loads[request.request_id] = plan

    def build(self, out) -> JaxkvConnectorMetadata:
        meta = JaxkvConnectorMetadata(self.generation, reset=self.reset_pending)
        self.reset_pending = False
        for rid in out.preempted_req_ids or ():
            if rid in self.requests:
                self.requests[rid].block_ids = []
        meta.loads = [(rid, plan) for rid, plan in self.pending_loads.items()]
        self.pending_loads.clear()
        scheduled: list[tuple[str, int]] = []
        for new in out.scheduled_new_reqs:
            state = self.requests.get(new.req_id)
            if state is None:  # not seen by update_state_after_alloc (cannot happen in vLLM's order)
                continue
            state.block_ids = list(new.block_ids[0])
            scheduled.append((new.req_id, new.num_computed_tokens))
        cached = out.scheduled_cached_reqs
        resumed = getattr(cached, "resumed_req_ids", set())
        for i, rid in enumerate(cached.req_ids):
            state = self.requests.get(rid)
            if state is None:
                continue
            new_ids = cached.new_block_ids[i]
            if rid in resumed:
                state.block_ids = list(new_ids[0]) if new_ids is not None else []
            elif new_ids is not None:
                state.block_ids += new_ids[0]
            scheduled.append((rid, cached.num_computed_tokens[i]))
        if self.store is not None:
            hashes: list[bytes] = []
            pages: list[int] = []
            for rid, computed in scheduled:
                state = self.requests[rid]
                if not self._cacheable(state.request):
                    continue
                drafts = len(out.scheduled_spec_decode_tokens.get(rid, ()))
                done = computed + out.num_scheduled_tokens.get(rid, 0) - drafts
                full = min(done, len(state.request.all_token_ids), len(state.block_ids) * self.block_size)
                full //= self.block_size
                if full > state.stored:
                    hashes += self._hashes(state, full)[state.stored :]
                    pages += state.block_ids[state.stored : full]
                    state.stored = full
            # Requests that share a prefix share its device pages (vLLM's prefix cache): one copy per block.
            unique = dict(zip(hashes, pages, strict=True))
            if unique:
                plan = self.store.prepare_store(list(unique), list(unique.values()))
                if plan is not None:
                    meta.stores.append(plan)
        return meta

    def apply(self, meta: JaxkvWorkerMetadata) -> None:
        if meta.generation != self.generation:
            return  # results of plans made before a reset: their store is gone
        if meta.spec is not None and self.store is None:
            self.open(meta.spec)
        store = self.store
        if store is None:
            return
        for result in meta.loads:
            store.complete_load(result)
            if result.status == "loaded":
                for source in result.plan.sources:
                    self.served[source] = self.served.get(source, 0) + self.block_size
            else:
                self.failed_loads += 1
        for result in meta.stores:
            store.complete_store(result)
        for plan in meta.cancelled:
            store.cancel_store(plan)

    def open(self, spec: StoreSpec) -> None:
        """Build the indexes from the worker's spec (at start-up, and after a reset)."""
        if self.store is not None:
            return
        worker = _LOCAL_WORKERS.get(self.engine_id)
        probe = worker.probe if worker is not None else None
        self.store = TieredStore(spec, policy=TierPolicy(write_through=self.config.write_through), probe=probe)
        self.root = spec.layout.block_fingerprint
        for state in self.requests.values():
            state.hashes, state.stored = [], 0

    def finished(self, rid: str) -> None:
        self.requests.pop(rid, None)
        self.matched_blocks.pop(rid, None)
        plan = self.pending_loads.pop(rid, None)
        if plan is not None and self.store is not None:
            self.store.cancel_load(plan)

    def reset(self) -> None:
        """Forget every block; the worker empties its tiers with the next step's metadata and sends a new spec."""
        if self.store is not None:
            self.store.close()
        self.store = None
        self.generation += 1
        self.reset_pending = True
        self.pending_loads.clear()
        self.matched_blocks.clear()
        for state in self.requests.values():
            state.hashes, state.stored = [], 0

    def close(self) -> None:
        if self.store is not None:
            self.store.close()
            self.store = None


class _WorkerSide:
    """Owns the tiers and the adopted cache; runs plans on the engine's current arrays."""

    def __init__(self, config: ConnectorConfig, block_size: int, engine_id: str, kv_cache_config):
        self.config = config
        self.block_size = block_size
        self.engine_id = engine_id
        self.kv_cache_config = kv_cache_config
        self.worker: OffloadWorker | None = None
        self.runner = None
        self.registered: list | None = None
        self.names: list[str] = []
        self.treedef = None
        self.generation = 0
        self.spec_sent = False
        self.load_errors: set[int] = set()
        self.results = JaxkvWorkerMetadata()
        self.loaded_this_step = False

    # -- registration ------------------------------------------------------
    def register(self, kv_caches) -> None:
        _check_one_group(self.kv_cache_config)
        if isinstance(kv_caches, Mapping):
            names, arrays = [str(k) for k in kv_caches], list(kv_caches.values())
        elif isinstance(kv_caches, Sequence) and not isinstance(kv_caches, str | bytes):
            arrays = list(kv_caches)
            groups = self.kv_cache_config.kv_cache_groups if self.kv_cache_config is not None else []
            layer_names = list(groups[0].layer_names) if groups else []
            names = layer_names if len(layer_names) == len(arrays) else [str(i) for i in range(len(arrays))]
        else:
            raise ValueError(f"kv_caches must be a list or dict of jax.Array, got {type(kv_caches).__name__}")
        if not arrays:
            raise ValueError("kv_caches is empty: register at least one layer's cache")
        for name, a in zip(names, arrays, strict=True):
            if not isinstance(a, jax.Array):
                raise ValueError(
                    f"kv_caches[{name!r}] is a {type(a).__module__}.{type(a).__name__}: JaxkvConnector pages JAX "
                    f"arrays (a JAX engine such as tpu-inference), not torch tensors"
                )
        cache = self._adopt(names, arrays)
        self.names = names
        self.registered = kv_caches if isinstance(kv_caches, list) else None
        self.treedef = jax.tree.structure(cache)
        self.worker = self._open(cache)

    def _adopt(self, names: list[str], arrays: list) -> AdoptedCache:
        by_layer = {}
        for name, a in zip(names, arrays, strict=True):
            by_layer[name] = a
        if self.config.shard_axis != "auto":
            axis = self.config.shard_axis
            try:
                return adopt(by_layer, page_size=self.block_size, shard_axis=axis)  # pyright: ignore[reportArgumentType]
            except ValueError as e:
                raise ValueError(f"JaxkvConnector cannot page the registered KV caches: {e}") from None
        axes = {name: _sharded_axis(name, a) for name, a in by_layer.items()}
        for name, axis in axes.items():
            if axis == 0:
                raise ValueError(
                    f"kv_caches[{name!r}] is sharded on axis 0, its page (block) axis: a page must lie whole on "
                    f"each device that holds it; shard the KV heads' axis instead"
                )
        if len(set(axes.values())) != 1:
            raise ValueError(f"layers are sharded on different axes {axes}: every layer's cache must split alike")
        try:
            return adopt(by_layer, page_size=self.block_size, shard_axis=next(iter(axes.values())))
        except ValueError as e:
            raise ValueError(f"JaxkvConnector cannot page the registered KV caches: {e}") from None

    def _open(self, cache) -> OffloadWorker:
        from jaxkv.tiers.disk import DiskTier

        c = self.config
        chain: list = [HostTier(c.host_bytes)]
        if c.disk_directory is not None:
            chain.append(DiskTier(os.fspath(c.disk_directory), c.disk_bytes, key=c.block_key))  # pyright: ignore[reportArgumentType]
        if c.remote_url is not None:
            from jaxkv.tiers.remote import RemoteTier

            chain.append(RemoteTier(c.remote_url, prefix=c.remote_prefix, key=c.block_key))
        worker = OffloadWorker(cache, chain)
        with _LOCAL_LOCK:
            _LOCAL_WORKERS[self.engine_id] = worker
        self.spec_sent = False
        return worker

    # -- the engine's current arrays ----------------------------------------
    def _arrays(self) -> list:
        if self.runner is not None:
            return list(self.runner.kv_caches)
        if self.registered is None:
            raise RuntimeError("register_kv_caches (with a list) or register_runner must come before loads and saves")
        return list(self.registered)

    def _publish(self, arrays: list) -> None:
        target = self.runner.kv_caches if self.runner is not None else self.registered
        assert target is not None
        target[:] = arrays

    def _cache(self):
        return jax.tree.unflatten(self.treedef, self._arrays())

    def _ready(self) -> OffloadWorker:
        if self.worker is None:
            raise RuntimeError("register_kv_caches must come before loads and saves")
        return self.worker

    # -- steps -------------------------------------------------------------
    def start_load(self, meta: JaxkvConnectorMetadata) -> None:
        worker = self._ready()
        if meta.reset:
            self._reset(meta.generation)
            worker = self._ready()
        self.loaded_this_step = False
        if meta.generation != self.generation or not meta.loads:
            return
        cache = self._cache()
        for _, plan in meta.loads:
            try:
                cache, handle = worker.load(cache, plan)
                result = handle.result()
            except ValueError as e:  # a plan this worker cannot run (a page past the cache): nothing written
                result = LoadResult(plan, "refused", error=str(e))
            if result.status != "loaded":
                self.load_errors.update(plan.device_pages)
            self.results.loads.append(result)
        self._publish(jax.tree.leaves(cache))
        self.loaded_this_step = True

    def wait_for_layer(self, layer_name: str) -> None:
        """Block until the layer's loaded pages are in place (a load writes every layer in one program)."""
        if not self.loaded_this_step:
            return
        if layer_name not in self.names:
            raise ValueError(f"layer_name {layer_name!r} is not a registered layer; layers are {self.names[:4]}...")
        jax.block_until_ready(self._arrays()[self.names.index(layer_name)])

    def save(self, meta: JaxkvConnectorMetadata) -> None:
        if meta.generation != self.generation or not meta.stores:
            return
        worker = self._ready()
        cache = self._cache()
        for plan in meta.stores:
            try:
                handle = worker.store(cache, plan)
            except ValueError:
                self.results.cancelled.append(plan)
                continue
            self.results.stores.append(handle.result())

    def take_load_errors(self) -> set[int]:
        errors, self.load_errors = self.load_errors, set()
        return errors

    def handshake(self) -> JaxkvHandshakeMetadata | None:
        if self.worker is None:
            return None
        self.spec_sent = True
        return JaxkvHandshakeMetadata(self.worker.spec())

    def take_meta(self) -> JaxkvWorkerMetadata | None:
        if self.worker is None:
            return None
        meta, self.results = self.results, JaxkvWorkerMetadata(self.generation)
        meta.generation = self.generation
        if not self.spec_sent:
            meta.spec = self.worker.spec()
            self.spec_sent = True
        return meta

    def _reset(self, generation: int) -> None:
        """Empty host memory and every lower tier (a prefix-cache reset), reopen, and send a new spec."""
        worker = self._ready()
        for tier in worker.tiers.values():
            clear = getattr(tier, "clear", None)
            if clear is None:
                raise RuntimeError(f"tier {tier.name!r} cannot be emptied for a prefix-cache reset (no clear())")
            clear()
        worker.close()
        self.worker = self._open(self._cache())
        self.generation = generation
        self.results = JaxkvWorkerMetadata(generation)

    def close(self) -> None:
        if self.worker is not None:
            with _LOCAL_LOCK:
                if _LOCAL_WORKERS.get(self.engine_id) is self.worker:
                    del _LOCAL_WORKERS[self.engine_id]
            self.worker.close()
            self.worker = None


def _sharded_axis(name: str, array) -> int | None:
    """The one axis of `array` its `NamedSharding` names a mesh axis for, or None (replicated)."""
    spec = getattr(array.sharding, "spec", None)
    if spec is None:
        return None
    split = [axis for axis, entry in enumerate(spec) if entry is not None and entry != ()]
    if len(split) > 1:
        raise ValueError(f"layer {name!r} is sharded on axes {split}; jaxkv pages caches split on one axis (the heads)")
    return split[0] if split else None
