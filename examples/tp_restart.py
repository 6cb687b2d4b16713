"""Store a prefix at TP 4, restart at TP 2: the prefix is served from disk.

Blocks on disk (and in a shared remote tier) are stored in a form that does
not depend on the TP degree, and a block's hash does not either: an instance
restarted with another parallelism, or a second instance of the same model,
reuses them.

    python examples/tp_restart.py          # both phases, each in its own process
    python examples/tp_restart.py store DIR
    python examples/tp_restart.py serve DIR

`store` runs a request at TP 4 and writes its blocks through to DIR; `serve`
starts a fresh process at TP 2 over the same DIR, serves the same prompt and
checks that its prefix came from disk, bit for bit the pages TP 4 wrote.
"""

import pathlib
import shutil
import subprocess
import sys
import tempfile

import jax

jax.config.update("jax_num_cpu_devices", 8)  # only the CPU backend sees it: simulated devices when there is no GPU/TPU

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jaxkv  # noqa: E402

params = jaxkv.KVCacheParams(jnp.bfloat16, n_kv_heads=8, head_dim=64, num_layers=2, page_size=16)
prompt = np.random.default_rng(0).integers(0, 1000, 88).astype(np.int32)  # 5 full blocks and 8 tokens


def stack(tp: int, directory: pathlib.Path):
    """A cache on a TP-`tp` mesh, host memory and disk behind it: (cache, the manager over the store, the worker)."""
    mesh = jax.make_mesh((tp,), ("tp",), devices=jax.devices()[:tp])
    cache = jaxkv.allocate_buffer(params, mesh, num_pages=16)
    row = jaxkv.RowLayout.of(cache).row_bytes
    store, worker = jaxkv.open_tiers(cache, 8 * row, disk_directory=directory, disk_capacity_bytes=64 << 20)
    return cache, jaxkv.PagedKVCacheManager(cache, store), worker


@jax.jit
def kv_of(tokens):
    """A stand-in for a model's K/V: a deterministic function of the token ids, [tokens, heads, dim]."""
    x = jnp.sin(tokens[:, None, None].astype(jnp.float32) * jnp.arange(1, 65, dtype=jnp.float32) / 97)
    return jnp.broadcast_to(x * jnp.arange(1, 9)[:, None], (tokens.size, 8, 64)).astype(jnp.bfloat16)


def write_kv(cache, table, start, tokens):
    """Write the K/V of `tokens` (positions from `start`) in every layer, through paged attention."""
    kv = kv_of(jnp.asarray(tokens))[None]
    q = jnp.concatenate([kv, kv], axis=2)  # 16 query heads over 8 KV heads
    n = jnp.asarray([len(tokens)], jnp.int32)
    for layer in range(params.num_layers):
        _, cache = jaxkv.paged_attention(cache, layer, q, kv, kv, table[None], jnp.asarray([start]), n)
    return cache


def page_bytes(cache, pages) -> list[bytes]:
    """The pages' bytes in the global (logical) cache: the same whatever the TP degree."""
    values = np.asarray(cache.values)
    return [values[p].tobytes() for p in pages]


def store(directory: pathlib.Path) -> None:
    cache, manager, worker = stack(4, directory)
    req = manager.add_request("r", prompt)
    table = manager.page_table("r", width=8)
    cache = write_kv(cache, table, 0, prompt)
    plan = manager.commit("r", len(prompt))  # 5 full blocks, written through to disk
    manager.complete_store(worker.store(cache, plan).result())
    full = len(prompt) // params.page_size
    np.save(directory / "reference.npy", np.array(page_bytes(cache, req.pages[:full])))
    print(f"TP 4: stored {full} blocks of {len(prompt)} prompt tokens in {directory}")
    worker.close()  # closes the disk tier (the store holds only indexes)


def serve(directory: pathlib.Path) -> None:
    cache, manager, worker = stack(2, directory)
    req = manager.add_request("r", prompt)
    assert req.load is not None, "nothing found on disk"
    cache, handle = worker.load(cache, req.load)
    req = manager.complete_load(handle.result())
    print(f"TP 2: {req.num_cached_tokens} of {len(prompt)} prompt tokens from {req.tokens_from}")
    assert req.tokens_from.get("disk") == req.num_cached_tokens == 80, req.tokens_from
    want = list(np.load(directory / "reference.npy"))
    got = page_bytes(cache, req.pages[: len(want)])
    assert got == [w.tobytes() for w in want], "a page loaded at TP 2 differs from the one TP 4 stored"
    table = manager.page_table("r", width=8)
    cache = write_kv(cache, table, req.num_cached_tokens, prompt[req.num_cached_tokens :])  # only the rest is computed
    print(f"TP 2: pages bit-identical to TP 4's; computed the last {len(prompt) - req.num_cached_tokens} tokens")
    worker.close()  # closes the disk tier (the store holds only indexes)


def main() -> None:
    if len(sys.argv) == 3:
        {"store": store, "serve": serve}[sys.argv[1]](pathlib.Path(sys.argv[2]))
        return
    directory = pathlib.Path(tempfile.mkdtemp(prefix="jaxkv-tp-restart-"))
    try:
        for phase in ("store", "serve"):  # two processes: a real restart
            subprocess.run([sys.executable, __file__, phase, str(directory)], check=True)
    finally:
        shutil.rmtree(directory)  # created above: ours to remove


if __name__ == "__main__":
    main()
