"""The two sides of `test_split_process.py`, each the body of its own process.

`worker_side` owns the cache, the host rows, the disk tier and the engine, and
answers commands; `scheduler_side` holds only a `TieredStore` built from the
worker's spec and drives it: every plan and result crosses a pipe, pickled.
Both are module-level functions so a spawned process can import them.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import traceback

BF16_MHA = dict(n_kv_heads=8, head_dim=16, num_layers=2, page_size=4)
TP = 2
NUM_PAGES = 16
HOST_SLOTS = 3
DISK_BLOCKS = 4


def h(i: int) -> bytes:
    return hashlib.sha256(f"split block {i}".encode()).digest()


# -- the worker's process: arrays, files ---------------------------------------------------------------------------


def worker_side(inbox, outbox, directory: str) -> None:
    """Serve commands from `inbox` until "stop"; every answer goes to `outbox` (an exception as its traceback)."""
    import jax

    jax.config.update("jax_num_cpu_devices", 8)
    import jax.numpy as jnp
    from cachegen import random_buffer

    import jaxkv
    from jaxkv import DiskTier, HostTier, OffloadWorker

    params = jaxkv.KVCacheParams(jnp.bfloat16, **BF16_MHA)
    source, _, _ = random_buffer(params, TP, NUM_PAGES, seed=11)  # pages with random bit patterns, NaN payloads
    cache, _, _ = random_buffer(params, TP, NUM_PAGES, seed=12)  # what loads write into
    row = jaxkv.RowLayout.of(source).row_bytes

    def open_worker() -> OffloadWorker:
        disk = DiskTier(directory, DISK_BLOCKS * (row + 96))
        return OffloadWorker(source, [HostTier(HOST_SLOTS * row), disk])

    def page(buffer, p: int) -> bytes:
        return b"".join(jax.device_get(s.data)[p].tobytes() for s in buffer.values.addressable_shards)

    worker = open_worker()
    while True:
        command, *args = inbox.recv()
        try:
            if command == "stop":
                worker.close()
                outbox.send("stopped")
                return
            if command == "spec":
                answer = worker.spec()
            elif command == "source pages":
                answer = [page(source, p) for p in range(NUM_PAGES)]
            elif command == "store":
                (plan,) = args
                answer = worker.store(source, plan).result()
            elif command == "load":
                (plan,) = args
                cache, handle = worker.load(cache, plan)
                result = handle.result()
                answer = (result, [page(cache, p) for p in plan.device_pages])
            elif command == "probe":
                answer = worker.probe(*args)
            elif command == "corrupt":  # a bit flips in a block file behind the tier's back
                (block_hash,) = args
                path = os.path.join(directory, block_hash.hex() + ".kvblock")
                with open(path, "r+b") as f:
                    f.seek(-1, os.SEEK_END)
                    last = f.read(1)[0]
                    f.seek(-1, os.SEEK_END)
                    f.write(bytes([last ^ 0x40]))
                answer = True
            elif command == "restart":  # the worker's process restarts over the same directory
                worker.close()
                worker = open_worker()
                answer = worker.spec()
            else:
                raise ValueError(f"unknown command {command!r}")
        except Exception:
            answer = RuntimeError(traceback.format_exc())
        outbox.send(answer)


# -- the scheduler's process: indexes only --------------------------------------------------------------------------


class WorkerError(Exception):
    pass


def scheduler_side(to_worker, from_worker, directory: str, report) -> None:
    """Drive stores, loads, evictions, a corrupt block and a restart through a `TieredStore`; send findings."""
    try:
        report.send(("ok", _schedule(to_worker, from_worker, directory)))
    except Exception:
        report.send(("error", traceback.format_exc()))


def _schedule(to_worker, from_worker, directory: str) -> dict:
    import sys

    from jaxkv import LoadResult, StoreResult, StoreSpec, TieredStore

    def ask(*command):
        to_worker.send(command)
        answer = from_worker.recv()
        if isinstance(answer, Exception):
            raise WorkerError(str(answer))
        return answer

    found: dict = {}
    spec = ask("spec")
    assert isinstance(spec, StoreSpec) and spec.host_slots == HOST_SLOTS and spec.lower[0].held == ()
    want = ask("source pages")
    store = TieredStore(spec, probe=lambda tier, hashes: ask("probe", tier, hashes))

    # Six blocks through three host slots (write-through): the disk takes all six and evicts two.
    plan = store.prepare_store([h(i) for i in range(6)], [1, 2, 3, 4, 5, 6])
    result = ask("store", plan)
    assert isinstance(result, StoreResult) and all(result.copied)
    store.complete_store(result)
    found["evicted"] = list(result.tiers.evicted.get("disk", ()))
    found["after store"] = [store.where(h(i)) for i in range(6)]

    # Load three: two from host memory, one promoted from disk; pages bit-exact.
    plan = store.prepare_load([h(i) for i in (4, 5, 2)], [8, 9, 10])
    result, pages = ask("load", plan)
    assert isinstance(result, LoadResult)
    store.complete_load(result)
    found["load"] = (result.status, plan.sources, [p == want[s] for p, s in zip(pages, (5, 6, 3), strict=True)])

    # A block file corrupted behind the tier's back: the load is refused, the index forgets the block.
    store.host.clear()  # so h3 must come from disk
    ask("corrupt", h(3))
    plan = store.prepare_load([h(3)], [12])
    result, _ = ask("load", plan)
    store.complete_load(result)
    found["corrupt load"] = (result.status, result.tiers.lost, result.tiers.corrupt, store.where(h(3)))
    found["corrupt metric"] = store.metrics["disk"].corrupt

    # The worker restarts: a new store from its new spec finds the disk blocks and loads them bit-exact.
    spec = ask("restart")
    store = TieredStore(spec)
    found["restart held"] = sorted(spec.lower[0].held) == sorted([h(2), h(4), h(5)])
    found["restart lookup"] = store.lookup([h(4), h(5), h(2)])
    plan = store.prepare_load([h(4), h(5), h(2)], [13, 14, 15])
    result, pages = ask("load", plan)
    store.complete_load(result)
    found["restart load"] = (result.status, [p == want[s] for p, s in zip(pages, (5, 6, 3), strict=True)])

    # This process held no arrays, files or sockets: no JAX backend started, no descriptor into the directory.
    from jax._src import xla_bridge

    found["backends"] = sorted(getattr(xla_bridge, "_backends", {}))
    fds = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(FileNotFoundError):  # the descriptor listdir itself held
            fds.append(os.readlink(f"/proc/self/fd/{fd}"))
    found["open in directory"] = [f for f in fds if f.startswith(directory)]
    found["sockets"] = [f for f in fds if f.startswith("socket:")]
    found["redis imported"] = "redis" in sys.modules
    return found
