"""`open_tiers`: the usual composition, both sides at once, for a server that runs them in one process.

```
store, worker = open_tiers(cache, 1 << 30, disk_directory="/var/cache/jaxkv", disk_capacity_bytes=64 << 30)
```

is

```
worker = OffloadWorker(cache, [HostTier(1 << 30), DiskTier("/var/cache/jaxkv", 64 << 30)])
store = TieredStore(worker.spec(), probe=worker.probe)
```

A server whose scheduler runs in another process builds the worker where the
cache lives and sends `worker.spec()` to the scheduler, which builds the
`TieredStore` from it (docs/tiers.md, "Two processes").
"""

from __future__ import annotations

from pathlib import Path

from jaxkv.layout.buffer import Cache
from jaxkv.tiers.base import Tier
from jaxkv.tiers.host import HostTier
from jaxkv.tiers.store import TieredStore, TierPolicy
from jaxkv.tiers.worker import OffloadWorker
from jaxkv.transfer.agreement import GroupAgreement


def open_tiers(
    cache: Cache,
    host_capacity_bytes: int,
    *,
    disk_directory=None,
    disk_capacity_bytes: int | None = None,
    disk_key: bytes | str | None = None,
    tiers: list[Tier] = (),  # type: ignore[assignment]
    policy: TierPolicy | None = None,
    agreement: GroupAgreement | str | None = "auto",
    host_backend: str = "auto",
    **worker_options,
) -> tuple[TieredStore, OffloadWorker]:
    """Host memory of `host_capacity_bytes`, then a `DiskTier` in `disk_directory` if given, then `tiers`.

    `cache` is read for its layout only (not kept). When the cache spans
    processes each process keeps its disk blocks in
    `disk_directory/process-<index>` (processes sharing a file system never
    touch each other's files), and `agreement="auto"` builds the TP group's
    `GroupAgreement` (None, at no cost, in one process); the store and the
    worker share it. `disk_key`: the deployment secret that authenticates
    disk blocks (`DiskTier(key=)`; None: `JAXKV_BLOCK_KEY` if set).
    `host_backend`: the `HostTier`'s backend ("auto",
    "numpy", "arrays"). `worker_options` go to `OffloadWorker`
    (`load_chunk_bytes`, `d2h_path`, `host_memory_kind`).

    Returns (the scheduler side, the worker side); the store's `probe` asks
    the worker about shared tiers.
    """
    from jaxkv.tiers.disk import DiskTier
    from jaxkv.transfer.agreement import spans_processes

    chain: list = [HostTier(host_capacity_bytes, backend=host_backend)]
    if disk_directory is not None:
        if disk_capacity_bytes is None:
            raise ValueError("disk_capacity_bytes is required with disk_directory")
        if spans_processes(cache):
            import jax

            disk_directory = Path(disk_directory) / f"process-{jax.process_index()}"
        chain.append(DiskTier(disk_directory, disk_capacity_bytes, key=disk_key))
    elif disk_capacity_bytes is not None:
        raise ValueError("disk_capacity_bytes needs a disk_directory")
    chain += list(tiers)
    if isinstance(agreement, str) and agreement == "auto":
        agreement = GroupAgreement.for_cache(cache)
    elif agreement is not None and not isinstance(agreement, GroupAgreement):
        raise ValueError(f"agreement must be 'auto', None or a GroupAgreement, got {agreement!r}")
    worker = OffloadWorker(cache, chain, agreement=agreement, **worker_options)
    try:
        store = TieredStore(worker.spec(), policy=policy, agreement=agreement, probe=worker.probe)
    except BaseException:
        worker.close()
        raise
    return store, worker
