"""One server instance of tests/test_remote.py's sharing test: its own device cache and host tier, one shared server.

    python tests/remote_worker.py ROLE URL PREFIX OUT_JSON

Each process has one CPU device, an `OffloadWorker` (host -> `RemoteTier`) and its `TieredStore`.
Roles:

- ``store``: fills a cache with random bits (seeded) and stores its pages
  0..5 under `block_hash(0..5)`; reports what the remote tier answered.
- ``serve``: starts from an empty cache of the same layout, looks the blocks
  up, loads them into other pages and compares them with the seeded bytes.
- ``foreign``: two instances of other layouts (float16 with the same row
  width; bf16 with another head_dim) ask for the same block hashes: they must
  find nothing and delete nothing.

The worker writes what it saw to OUT_JSON and exits through os._exit (no
runtime teardown can hang the test).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

NUM_PAGES = 8
STORED = list(range(6))
SEED = 11


def block_hash(i: int) -> bytes:
    return hashlib.sha256(b"shared block %d" % i).digest()


def params(kind: str):
    import jax.numpy as jnp

    from jaxkv import KVCacheParams

    dtype, head_dim = {"bf16": (jnp.bfloat16, 16), "f16": (jnp.float16, 16), "bf16-d32": (jnp.bfloat16, 32)}[kind]
    return KVCacheParams(dtype, n_kv_heads=4, head_dim=head_dim, num_layers=2, page_size=4)


def page_bytes(cache, page: int) -> bytes:
    import numpy as np

    return b"".join(np.asarray(s.data)[page].tobytes() for s in cache.values.addressable_shards)


def instance(kind: str, url: str, prefix: str, cache):
    from jaxkv import HostTier, OffloadWorker, RowLayout, TieredStore
    from jaxkv.tiers.remote import RemoteTier

    remote = RemoteTier(url, prefix=prefix, socket_timeout=5, connect_timeout=5)
    worker = OffloadWorker(cache, [HostTier(2 * RowLayout.of(cache).row_bytes), remote])
    return TieredStore(worker.spec(), probe=worker.probe), worker, remote


def run(role: str, url: str, prefix: str) -> dict:
    import jax

    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", 1)
    from cachegen import random_buffer

    from jaxkv import allocate_buffer

    hashes = [block_hash(i) for i in STORED]
    if role == "store":
        src, _, _ = random_buffer(params("bf16"), 1, NUM_PAGES, seed=SEED)
        store, worker, remote = instance("bf16", url, prefix, src)
        plan = store.prepare_store(hashes, STORED)
        result = worker.store(src, plan).result()
        store.complete_store(result)
        return {"written": [repr(a) for a in result.written["remote"]], "corrupt": remote.corrupt}
    if role == "serve":
        src, _, _ = random_buffer(params("bf16"), 1, NUM_PAGES, seed=SEED)  # what the storing instance held
        want = [page_bytes(src, p) for p in STORED]
        cache = allocate_buffer(params("bf16"), jax.make_mesh((1,), ("tp",)), NUM_PAGES)
        store, worker, remote = instance("bf16", url, prefix, cache)
        found = store.lookup(hashes)
        targets = [7, 6, 5, 4, 3, 2]
        loaded = []
        for i in range(0, len(hashes), 2):  # the host tier has 2 slots: a load passes through host memory
            plan = store.prepare_load(hashes[i : i + 2], targets[i : i + 2])
            cache, handle = worker.load(cache, plan)
            result = handle.result()
            store.complete_load(result)
            loaded.append(result.status)
        got = [page_bytes(cache, p) for p in targets]
        return {
            "lookup": found,
            "loads": loaded,
            "bit_exact": [g == w for g, w in zip(got, want, strict=True)],
            "blocks_loaded": store.metrics["remote"].blocks_loaded,
            "in_host": [store.where(h) for h in hashes[-2:]],
            "corrupt": remote.corrupt,
        }
    if role == "foreign":
        out = {}
        for kind in ("f16", "bf16-d32"):
            cache = allocate_buffer(params(kind), jax.make_mesh((1,), ("tp",)), NUM_PAGES)
            store, worker, remote = instance(kind, url, prefix, cache)
            plan = store.prepare_load(hashes[:2], [0, 1])
            cache, handle = worker.load(cache, plan)
            out[kind] = {
                "row_bytes": store.layout.row_bytes,
                "lookup": store.lookup(hashes),
                "num_held": plan.num_held,
                "status": handle.status,
                "get": [repr(e) for e in remote.get_many([(hashes[0], worker.host.pool[0])])],
                "corrupt": remote.corrupt,
            }
        return out
    raise ValueError(f"unknown role {role!r}")


def main() -> None:
    role, url, prefix, out = sys.argv[1:5]
    try:
        report = run(role, url, prefix)
        code = 0
    except BaseException:  # report everything to the test, then exit
        report = {"traceback": traceback.format_exc()}
        code = 1
    Path(out).write_text(json.dumps(report))
    sys.stdout.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
