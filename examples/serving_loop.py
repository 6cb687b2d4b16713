"""The loop a JAX serving engine runs with jaxkv: the cache flows in and out of every call.

A jitted, donating attention step writes K/V; loads and stores go through the
worker with the cache passed in and returned; the manager (scheduler side)
decides which pages each request uses and which blocks are stored where.
Nothing keeps the cache between calls: there is no bind anywhere.

Run it on a CPU machine (8 simulated devices) or on GPUs/TPUs:

    python examples/serving_loop.py
"""

import functools
import tempfile

import jax

jax.config.update("jax_num_cpu_devices", 8)  # only the CPU backend sees it: simulated devices when there is no GPU/TPU

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jaxkv  # noqa: E402

params = jaxkv.KVCacheParams(jnp.bfloat16, n_kv_heads=8, head_dim=64, num_layers=2, page_size=16)
mesh = jax.make_mesh((4,), ("tp",), devices=jax.devices()[:4])
cache = jaxkv.allocate_buffer(params, mesh, num_pages=9)  # small on purpose: pages travel

# Host memory and disk behind the device, both sides at once: the store (scheduler side) knows which
# block is where; the worker owns the bytes (host rows, disk files) and moves pages as the store plans.
row = jaxkv.RowLayout.of(cache).row_bytes
disk = tempfile.TemporaryDirectory(prefix="jaxkv-")  # removed at the end, or at exit if a request fails
store, worker = jaxkv.open_tiers(cache, 4 * row, disk_directory=disk.name, disk_capacity_bytes=64 << 20)
# Scheduler side: the prefix-caching manager decides which pages each request uses, over the store.
manager = jaxkv.PagedKVCacheManager(cache, store)


CHUNK = 32  # prompt chunks are padded to this many tokens: one compiled step


@functools.partial(jax.jit, donate_argnums=0)
def step(cache, tokens, start, n, page_table):
    """The user's own jitted, donating step: write K/V of `tokens[:n]` at `start` in every layer and attend.

    A stand-in for a model: Q/K/V are deterministic functions of the token ids.
    """
    x = jnp.sin(tokens[:, None, None].astype(jnp.float32) * jnp.arange(1, 65, dtype=jnp.float32) / 97)
    kv = jnp.broadcast_to(x, (CHUNK, params.n_kv_heads, params.head_dim)).astype(jnp.bfloat16)[None]
    q = jnp.broadcast_to(x, (CHUNK, 2 * params.n_kv_heads, params.head_dim)).astype(jnp.bfloat16)[None]
    out = None
    for layer in range(params.num_layers):
        out, cache = jaxkv.paged_attention(cache, layer, q, kv, kv, page_table[None], start[None], n[None])
    return out, cache


def prefill(cache, tokens, start, page_table):
    """Run `step` over `tokens` in chunks; returns (last output, the new cache)."""
    out = None
    for i in range(0, len(tokens), CHUNK):
        chunk = np.zeros(CHUNK, np.int32)
        part = tokens[i : i + CHUNK]
        chunk[: len(part)] = part
        out, cache = step(cache, chunk, np.int32(start + i), np.int32(len(part)), page_table)
    return out, cache


def serve(cache, request_id, prompt):
    """One request through the whole stack; returns (logits-like output, the new cache)."""
    req = manager.add_request(request_id, prompt)
    if req.load is not None:  # blocks found in host memory or on disk
        cache, handle = worker.load(cache, req.load)
        req = manager.complete_load(handle.result())  # refused or failed: recompute from the device prefix
    table = manager.page_table(request_id, width=8)
    out, cache = prefill(cache, prompt[req.num_cached_tokens :], req.num_cached_tokens, table)
    last = np.asarray(out[0, (len(prompt) - req.num_cached_tokens - 1) % CHUNK], np.float32)  # the last token's
    plan = manager.commit(request_id, len(prompt))  # full blocks join the prefix cache...
    if plan is not None:  # ...and are stored outside the device (write-through)
        manager.complete_store(worker.store(cache, plan).result())
    manager.finish(request_id)
    return last, req, cache


rng = np.random.default_rng(0)
system = rng.integers(0, 1000, 64)
prompts = [np.concatenate([system, rng.integers(0, 1000, 24)]) for _ in range(6)]
first = {}
for i, prompt in enumerate(prompts + prompts[:2]):  # the last two come back after others evicted them
    out, req, cache = serve(cache, f"r{i}", prompt)
    print(f"request r{i}: {len(prompt)} tokens, cached {req.num_cached_tokens} {req.tokens_from}")
    key = prompt.tobytes()
    if key in first:  # served partly from host/disk: the output must be the same, bit for bit
        assert first[key].tobytes() == out.tobytes(), f"r{i}: output differs after its pages came back"
    first.setdefault(key, out)

m = manager.metrics
print(f"hit rate {m.hit_rate:.0%}; tokens from {m.tokens_from}; recomputed {m.tokens_recomputed}")
print({name: (t.blocks_stored, t.blocks_loaded, t.evictions) for name, t in store.metrics.tiers.items()})
worker.close()  # the tiers are the worker's: it closes the disk tier's files and frees the host rows
disk.cleanup()
