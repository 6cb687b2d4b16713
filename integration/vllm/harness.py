"""A vLLM engine on CPU around jaxkv's connector: vLLM's real `Scheduler` and `Request`s, a JAX stand-in model.

vLLM's scheduler decides everything it decides in production: admission,
chunked prefill, preemption, prefix-cache hits on the device, finishing. The
connector is built by vLLM's own `KVConnectorFactory` from a `KVTransferConfig`
naming `jaxkv.integrations.vllm`, once per role, and driven in the order of
vLLM's `KVConnectorModelRunnerMixin` (bind, start_load_kv, forward with
wait_for_layer_load per layer, wait_for_save, transfer results, load errors,
worker metadata, clear).

The model is a stand-in with a real cache: tpu-inference's layout, one
`jax.Array` per layer `(num_blocks, block_size, kv_heads, 2, head_dim)`
bfloat16 (K and V heads fused, packing 2), heads sharded over a TP mesh of
simulated CPU devices. Its "forward" writes, for every token it computes, K/V
words that are a function of the whole prefix up to that token (random bits,
NaN payloads included, from a chained digest of the token ids), and before it
writes it *reads back every page the step attends to* and compares it, byte
for byte, with what that prefix must hold. So a page that a load filled with
the wrong block, a stale block or garbage fails the step it is used in.
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import shutil
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from vllm.config import CacheConfig, DeviceConfig, KVTransferConfig, ModelConfig, SchedulerConfig, VllmConfig
from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
from vllm.sampling_params import SamplingParams
from vllm.utils.hashing import sha256
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput
from vllm.v1.request import Request
from vllm.v1.structured_output import StructuredOutputManager

BLOCK = 16
LAYERS = 3
HEAD_DIM = 32
VOCAB = 1000

_MODEL_DIR: str | None = None

_COMPILE = [0.0]
_COMPILE_EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
)


def _count_compile(event: str, seconds: float, **_) -> None:
    if event in _COMPILE_EVENTS:
        _COMPILE[0] += seconds


jax.monitoring.register_event_duration_secs_listener(_count_compile)


def compile_seconds() -> float:
    """Seconds JAX spent tracing, lowering and compiling in this process so far."""
    return _COMPILE[0]


def model_dir() -> str:
    """A Llama config on disk for vLLM's `ModelConfig` (no weights: the scheduler reads only the config)."""
    global _MODEL_DIR
    if _MODEL_DIR is None:
        from transformers import LlamaConfig

        _MODEL_DIR = tempfile.mkdtemp(prefix="jaxkv-vllm-model-")
        atexit.register(shutil.rmtree, _MODEL_DIR, ignore_errors=True)  # the directory this process made
        LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=LAYERS,
            num_attention_heads=8,
            num_key_value_heads=8,
            max_position_embeddings=4096,
        ).save_pretrained(_MODEL_DIR)
    return _MODEL_DIR


def vllm_config(
    extra: dict | None,
    *,
    num_blocks: int,
    prefix_caching: bool,
    batched_tokens: int = 64,
    on_load_failure: str = "recompute",
) -> VllmConfig:
    config = VllmConfig(
        model_config=ModelConfig(
            model=model_dir(), skip_tokenizer_init=True, dtype="bfloat16", seed=0, max_model_len=2048
        ),
        scheduler_config=SchedulerConfig(
            max_num_seqs=8,
            max_num_batched_tokens=batched_tokens,
            max_model_len=2048,
            enable_chunked_prefill=True,
            is_encoder_decoder=False,
        ),
        cache_config=CacheConfig(block_size=BLOCK, enable_prefix_caching=prefix_caching),
        kv_transfer_config=None
        if extra is None
        else KVTransferConfig(
            kv_connector="JaxkvConnector",
            kv_connector_module_path="jaxkv.integrations.vllm",
            kv_role="kv_both",
            kv_connector_extra_config=extra,
            kv_load_failure_policy=on_load_failure,
        ),
        device_config=DeviceConfig("cpu"),
    )
    config.cache_config.num_gpu_blocks = num_blocks
    return config


def kv_cache_config(num_blocks: int, kv_heads: int) -> KVCacheConfig:
    names = [f"model.layers.{i}.self_attn.attn" for i in range(LAYERS)]
    spec = FullAttentionSpec(block_size=BLOCK, num_kv_heads=kv_heads, head_size=HEAD_DIM, dtype=torch.bfloat16)
    return KVCacheConfig(num_blocks=num_blocks, kv_cache_tensors=[], kv_cache_groups=[KVCacheGroupSpec(names, spec)])


# -- the stand-in model's K/V ------------------------------------------------------


def token_words(digest: bytes, kv_heads: int) -> np.ndarray:
    """The K/V words every layer holds for one token whose prefix digests to `digest`: [layers, heads, 2, dim]."""
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    return rng.integers(0, 1 << 16, size=(LAYERS, kv_heads, 2, HEAD_DIM), dtype=np.uint16)


class Prefixes:
    """Per request: a chained digest of its tokens, one per position (what the K/V at that position depends on)."""

    def __init__(self):
        self.chains: dict[str, list[bytes]] = {}

    def digests(self, rid: str, tokens: list[int]) -> list[bytes]:
        chain = self.chains.setdefault(rid, [])
        for t in tokens[len(chain) :]:
            chain.append(
                hashlib.blake2b((chain[-1] if chain else b"") + int(t).to_bytes(4, "little"), digest_size=16).digest()
            )
        return chain[: len(tokens)]


@functools.partial(jax.jit, donate_argnums=0)
def _write(caches, pages, slots, words):
    """The forward's cache writes, through the bits (a typed bf16 scatter would quiet NaN payloads on XLA:CPU)."""
    out = []
    for layer, cache in enumerate(caches):
        bits = jax.lax.bitcast_convert_type(cache, jnp.uint16)
        bits = bits.at[pages, slots].set(words[layer], mode="promise_in_bounds")
        out.append(jax.lax.bitcast_convert_type(bits, cache.dtype))
    return out


class Runner:
    """The worker process's model runner: `kv_caches` (one array per layer), a forward, the connector calls."""

    def __init__(self, connector, *, num_blocks: int, kv_heads: int, tp: int):
        mesh = jax.make_mesh((tp,), ("model",), devices=jax.devices()[:tp], axis_types=(jax.sharding.AxisType.Auto,))
        sharding = NamedSharding(mesh, P(None, None, "model", None, None))
        shape = (num_blocks, BLOCK, kv_heads, 2, HEAD_DIM)
        self.kv_caches = [jax.device_put(np.zeros(shape, jnp.bfloat16), sharding) for _ in range(LAYERS)]
        self.kv_heads = kv_heads
        self.connector = connector
        self.prefixes = Prefixes()
        self.checked_tokens = 0
        """Tokens whose K/V a step read back and found as the prefix says."""
        self.layer_waits = 0
        self.connector_seconds = 0.0
        """Time in the connector's load and save calls (start_load_kv, wait_for_layer_load, wait_for_save), less
        the time JAX spent compiling inside them (`connector_compile_seconds`: once per program, not per step)."""
        self.connector_compile_seconds = 0.0
        self.computed_tokens = 0
        self.prompt_tokens_computed = 0
        """Prompt positions the forward computed (the rest came from a cache: the device's or the connector's)."""
        """Tokens whose K/V the forward computed (what a cache hit saves)."""
        self.discarded = 0
        """Steps of a request that read pages whose load failed (vLLM throws their results away)."""
        if connector is not None:
            connector.register_runner(self)
            connector.register_kv_caches(self.kv_caches)

    def _time_connector(self, t0: float, c0: float) -> None:
        compiled = compile_seconds() - c0
        self.connector_compile_seconds += compiled
        self.connector_seconds += time.perf_counter() - t0 - compiled

    def _pages(self) -> list[np.ndarray]:
        return [np.asarray(jax.device_get(c)).view(np.uint16) for c in self.kv_caches]

    def execute(self, sched_out, requests: dict[str, Request]) -> ModelRunnerOutput:
        c = self.connector
        if c is None:  # vLLM alone
            req_ids, sampled = self._forward(sched_out, requests, set())
            return ModelRunnerOutput(
                req_ids=req_ids, req_id_to_index={r: i for i, r in enumerate(req_ids)}, sampled_token_ids=sampled
            )
        c.bind_connector_metadata(sched_out.kv_connector_metadata)
        t0, c0 = time.perf_counter(), compile_seconds()
        c.start_load_kv(None)
        for name in c._work.names:
            c.wait_for_layer_load(name)
            self.layer_waits += 1
        self._time_connector(t0, c0)
        # Pages whose load failed this step: vLLM discards what the step computes from them and recomputes them.
        failed = set(c._work.load_errors)
        req_ids, sampled = self._forward(sched_out, requests, failed)
        t0, c0 = time.perf_counter(), compile_seconds()
        c.wait_for_save()
        self._time_connector(t0, c0)
        results = c.get_transfer_results(sched_out.finished_req_ids)
        output = KVConnectorOutput(
            finished_sending=results.finished_sending,
            finished_recving=results.finished_recving,
            invalid_block_ids=c.get_block_ids_with_load_errors(),
            kv_connector_worker_meta=c.build_connector_worker_meta(),
        )
        c.clear_connector_metadata()
        return ModelRunnerOutput(
            req_ids=req_ids,
            req_id_to_index={r: i for i, r in enumerate(req_ids)},
            sampled_token_ids=sampled,
            kv_connector_output=output,
        )

    def _forward(self, out, requests, failed: set[int]):
        """Check what the step attends to, write what it computes, sample the next token of finished prefills."""
        items = [(n.req_id, n.num_computed_tokens, n.block_ids[0]) for n in out.scheduled_new_reqs]
        cached = out.scheduled_cached_reqs
        self.block_ids = getattr(self, "block_ids", {})
        for n in out.scheduled_new_reqs:
            self.block_ids[n.req_id] = list(n.block_ids[0])
        for i, rid in enumerate(cached.req_ids):
            new = cached.new_block_ids[i]
            if rid in cached.resumed_req_ids:
                self.block_ids[rid] = list(new[0]) if new is not None else []
            elif new is not None:
                self.block_ids[rid] += new[0]
            items.append((rid, cached.num_computed_tokens[i], None))
        host = self._pages() if items else []
        pages, slots, words, req_ids, sampled = [], [], [], [], []
        for rid, computed, _ in items:
            request = requests[rid]
            n = out.num_scheduled_tokens[rid]
            tokens = list(request.all_token_ids)
            digests = self.prefixes.digests(rid, tokens[: computed + n])
            ids = self.block_ids[rid]
            if failed.intersection(ids[: -(-computed // BLOCK)]):
                self.discarded += 1
                computed_check = 0
            else:
                computed_check = computed
            for p in range(computed_check):  # the K/V this step attends to: every earlier position
                got = np.stack([layer[ids[p // BLOCK], p % BLOCK] for layer in host])
                if not np.array_equal(got, token_words(digests[p], self.kv_heads)):
                    raise AssertionError(f"request {rid}: the K/V at position {p} (page {ids[p // BLOCK]}) is wrong")
            self.checked_tokens += computed_check
            self.computed_tokens += n
            self.prompt_tokens_computed += max(0, min(computed + n, request.num_prompt_tokens) - computed)
            for p in range(computed, computed + n):
                pages.append(ids[p // BLOCK])
                slots.append(p % BLOCK)
                words.append(token_words(digests[p], self.kv_heads))
            req_ids.append(rid)
            done = computed + n >= request.num_tokens
            sampled.append([int.from_bytes(digests[-1][8:12], "little") % VOCAB] if done else [])
        if pages:
            stacked = np.stack(words, axis=1)  # [layers, tokens, heads, 2, dim]
            self.kv_caches[:] = _write(
                self.kv_caches, jnp.asarray(pages, jnp.int32), jnp.asarray(slots, jnp.int32), jnp.asarray(stacked)
            )
        return req_ids, sampled


class Engine:
    """One vLLM instance: scheduler (with the scheduler-role connector) and one runner (the worker-role one)."""

    def __init__(
        self,
        extra: dict | None,
        *,
        num_blocks: int = 64,
        kv_heads: int = 8,
        tp: int = 4,
        prefix_caching: bool = True,
        on_load_failure: str = "recompute",
        batched_tokens: int = 64,
    ):
        init_none_hash(sha256)
        self.config = vllm_config(
            extra,
            num_blocks=num_blocks,
            prefix_caching=prefix_caching,
            on_load_failure=on_load_failure,
            batched_tokens=batched_tokens,
        )
        kv_config = kv_cache_config(num_blocks, kv_heads)
        self.scheduler = Scheduler(
            vllm_config=self.config,
            kv_cache_config=kv_config,
            structured_output_manager=StructuredOutputManager(self.config),
            block_size=BLOCK,
            log_stats=True,
        )
        self.worker_connector = (
            None
            if extra is None
            else KVConnectorFactory.create_connector(self.config, KVConnectorRole.WORKER, kv_config)
        )
        self.runner = Runner(self.worker_connector, num_blocks=num_blocks, kv_heads=kv_heads, tp=tp)
        # EngineCore's start-up handshake, keyed (pp_rank, tp_rank): one JAX worker drives the whole mesh.
        handshake = None if self.worker_connector is None else self.worker_connector.get_handshake_metadata()
        if handshake is not None:
            self.scheduler.connector.set_xfer_handshake_metadata_pp_aware({(0, 0): handshake})
        self.requests: dict[str, Request] = {}
        self.outputs: dict[str, list[int]] = {}
        self.finish_reasons: dict[str, str] = {}
        self.hasher = get_request_block_hasher(BLOCK, sha256)
        self.steps = 0
        self.preemptions = 0

    @property
    def connector(self):
        return self.scheduler.connector

    def add(self, rid: str, prompt: list[int], max_tokens: int) -> None:
        request = Request(
            request_id=rid,
            prompt_token_ids=list(prompt),
            sampling_params=SamplingParams(max_tokens=max_tokens, ignore_eos=True),
            pooling_params=None,
            block_hasher=self.hasher,
        )
        self.requests[rid] = request
        self.scheduler.add_request(request)

    def step(self) -> None:
        out = self.scheduler.schedule()
        self.preemptions += len(out.preempted_req_ids or ())
        result = self.runner.execute(out, self.requests)
        finished = self.scheduler.update_from_output(out, result)
        for outputs in finished.values():
            for o in outputs.outputs:
                self.outputs.setdefault(o.request_id, []).extend(o.new_token_ids)
                if o.finish_reason is not None:
                    self.finish_reasons[o.request_id] = str(o.finish_reason)
        self.steps += 1

    def run(self, max_steps: int = 2000) -> None:
        while self.scheduler.has_unfinished_requests():
            self.step()
            if self.steps > max_steps:
                raise AssertionError(f"not finished after {max_steps} steps")

    def close(self) -> None:
        self.scheduler.shutdown()
        if self.worker_connector is not None:
            self.worker_connector.shutdown()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def shared_prompts(n: int, prefix_tokens: int, suffix_tokens: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    prefix = rng.integers(1, VOCAB, prefix_tokens).tolist()
    return [prefix + rng.integers(1, VOCAB, suffix_tokens).tolist() for _ in range(n)]
