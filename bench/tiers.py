"""Tiers: DiskTier file throughput, host-tier hit latency, TieredStore + OffloadWorker end to end.

    python bench/tiers.py [--quick] [--dir PATH]

Measures in one run, each against a baseline timed in the same run on the same bytes:

1. `DiskTier.put` / `DiskTier.get(out=row)` for host rows of 256 KiB .. 2 MiB
   (about 256 MiB of rows per size; 32 MiB with --quick), against a plain file
   per block (open/write/close; open/readinto/close: no header, no checksum, no
   rename). Writes start from a fresh directory and a clean page cache
   (`os.sync()` before each round, not timed); warm reads follow the writes, so
   they are served from the page cache; cold reads drop each file's cached pages
   first (`posix_fadvise(DONTNEED)`, not timed). Also a warm restart: a new
   `DiskTier` over the populated directory (index rebuild).
2. Host-tier hits (a `TieredStore` with a `HostTier` only, MHA bf16, TP 4,
   256 KiB rows): `store.lookup`, and a whole load (`prepare_load`,
   `worker.load`, `handle.result()`, `complete_load`) per block for batches
   of 1, 16 and 64 blocks, against the engine's own `h2d` of the same host
   slots into the same pages.
3. `TieredStore` (host + disk, write-through, promote on load) driven by an
   `OffloadWorker` (1 MiB rows, 64-block batches, a host tier of 64 rows): a
   store (`prepare_store`, `worker.store(...).result()`, `complete_store`)
   into empty tiers (both cleared before each round, not timed, as the plain
   baseline starts from a fresh directory), and a load of blocks held only on
   disk (promotion + h2d), against plain file writes / reads of the same
   bytes; also against a plain file pass followed by the engine's own d2h /
   h2d of the batch (what the worker composes).

The scheduler side's bookkeeping (plans, completions) is inside every timed
store and load. GB/s counts row bytes (k * row_bytes; headers not included). A measurement
runs in rounds, each timing the tier and its baselines once, in an order that
reverses every round; throughputs are medians over rounds, ratios are medians
of the per-round ratios ("range": their min-max), so a slow spell of a shared
machine hits both sides of a ratio. The cost of creating an empty file, probed
at the start and the end, is printed beside: on a shared VM it drifts (tens to
hundreds of microseconds) and sets the floor of every write. Temporary directories go under --dir
(default: the system temp directory) and are removed at the end. Results:
bench/results/tiers.json and docs/tiers.png (with --quick:
bench/results/tiers_quick.json and .png, leaving the committed ones alone).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import _common
import numpy as np

_common.setup_devices()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import jaxkv  # noqa: E402
from jaxkv.tiers.disk import HEADER_BYTES  # noqa: E402

KIB, MIB, GIB = 2**10, 2**20, 2**30
TP = 4
ROOT = Path(__file__).resolve().parent.parent
ROW_KIBS = [256, 512, 1024, 2048]
TARGET = 0.7  # DiskTier throughput >= this fraction of the plain file baseline
FINGERPRINT = hashlib.sha256(b"jaxkv bench/tiers.py").digest()


# -- plumbing --------------------------------------------------------------------
def verdict(x: float | None) -> str | None:
    return None if x is None else ("pass" if x >= TARGET else "MISS")


def new_hashes(n: int) -> list[bytes]:
    return [os.urandom(32) for _ in range(n)]


def random_rows(n: int, row_bytes: int, rng) -> np.ndarray:
    return np.frombuffer(rng.bytes(n * row_bytes), np.uint8).reshape(n, row_bytes)


def drop_cached(paths) -> None:
    """Evict the files' pages from the page cache (they must be clean: os.sync() first)."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def filesystem(path: Path) -> dict:
    """What `df` says about the directory the files go to, and its mount options."""
    info = {"dir": str(path)}
    try:
        out = (
            subprocess.run(
                ["df", "--output=source,fstype,size,avail,target", "-B1", str(path)],
                capture_output=True,
                text=True,
                check=True,
            )
            .stdout.split("\n")[1]
            .split()
        )
        source, fstype, size, avail, target = out
        info |= dict(fs_source=source, fs_type=fstype, fs_mount=target)
        info |= dict(fs_size_gib=round(int(size) / GIB), fs_avail_gib=round(int(avail) / GIB))
        with open("/proc/mounts") as f:
            for line in f:
                fields = line.split()
                if fields[1] == target and fields[0] == source:
                    info["fs_options"] = fields[3]
    except (OSError, subprocess.CalledProcessError, ValueError):
        info["fs_type"] = "unknown (df failed)"
    info["same_fs_as_repo"] = os.stat(path).st_dev == os.stat(ROOT).st_dev
    for knob in ("dirty_ratio", "dirty_background_ratio"):
        with contextlib.suppress(OSError, ValueError):
            info[f"vm_{knob}"] = int(Path(f"/proc/sys/vm/{knob}").read_text())
    return info


def file_create_us(root: Path, n: int = 256) -> float:
    """Microseconds to create one empty file (open/close) in a fresh directory: the per-file floor of any write."""
    d = root / f"create-probe-{time.monotonic_ns()}"
    d.mkdir()
    os.sync()
    t0 = time.perf_counter()
    for i in range(n):
        with open(os.path.join(d, f"{i:064x}"), "wb", buffering=0):
            pass
    seconds = time.perf_counter() - t0
    shutil.rmtree(d)
    return seconds / n * 1e6


# -- 1. DiskTier against plain files ----------------------------------------------
class PlainFiles:
    """The baseline: one file per block, its bytes only."""

    def __init__(self, directory: Path):
        self.directory = directory
        directory.mkdir()

    def path(self, block_hash: bytes) -> str:
        return os.path.join(self.directory, block_hash.hex())

    def put(self, block_hash: bytes, row: np.ndarray) -> None:
        with open(self.path(block_hash), "wb", buffering=0) as f:
            f.write(row)

    def get(self, block_hash: bytes, out: np.ndarray) -> None:
        with open(self.path(block_hash), "rb", buffering=0) as f:
            f.readinto(out)


class Stores:
    """A fresh DiskTier and a fresh plain directory per write round, under `root`."""

    def __init__(self, root: Path, row_bytes: int, capacity: int):
        self.root, self.row_bytes, self.capacity = root, row_bytes, capacity
        self.tier: jaxkv.DiskTier | None = None
        self.plain: PlainFiles | None = None
        self._n = 0

    def _fresh(self) -> Path:
        self._n += 1
        return self.root / f"{self.row_bytes // KIB}k-{self._n}"

    def fresh_tier(self) -> None:
        if self.tier is not None:
            shutil.rmtree(self.tier.directory)
        self.tier = jaxkv.DiskTier(self._fresh(), self.capacity, fingerprint=FINGERPRINT, row_bytes=self.row_bytes)
        os.sync()

    def fresh_plain(self) -> None:
        if self.plain is not None:
            shutil.rmtree(self.plain.directory)
        self.plain = PlainFiles(self._fresh())
        os.sync()

    def tier_paths(self, hashes) -> list[str]:
        return [str(self.tier._path(h)) for h in hashes]

    def remove(self) -> None:
        for d in (self.tier and self.tier.directory, self.plain and self.plain.directory):
            if d is not None:
                shutil.rmtree(d, ignore_errors=True)


def bench_disk(root: Path, row_kibs, total_bytes: int, *, quick: bool, rng) -> list[dict]:
    repeats, warmup = (3, 1) if quick else (9, 2)
    cold_repeats = 3 if quick else 5
    out = []
    for kib in row_kibs:
        row_bytes = kib * KIB
        n = total_bytes // row_bytes
        nbytes = n * row_bytes
        rows = random_rows(n, row_bytes, rng)
        hashes = new_hashes(n)
        dest = np.empty((n, row_bytes), np.uint8)
        dest[:] = 0  # fault the pages in before any timing
        st = Stores(root, row_bytes, capacity=4 * n * (HEADER_BYTES + row_bytes))

        def tier_put(st=st, hashes=hashes, rows=rows):
            for h, r in zip(hashes, rows, strict=True):
                st.tier.put(h, r)

        def plain_put(st=st, hashes=hashes, rows=rows):
            for h, r in zip(hashes, rows, strict=True):
                st.plain.put(h, r)

        def tier_get(st=st, hashes=hashes, dest=dest):
            for i, h in enumerate(hashes):
                st.tier.get(h, out=dest[i])

        def plain_get(st=st, hashes=hashes, dest=dest):
            for i, h in enumerate(hashes):
                st.plain.get(h, dest[i])

        w = _common.rounds(
            {"tier": (st.fresh_tier, tier_put), "plain": (st.fresh_plain, plain_put)}, repeats=repeats, warmup=warmup
        )
        # The last round's stores stay populated for the reads.
        assert len(st.tier) == n and st.tier.corrupt == 0, (len(st.tier), st.tier.corrupt)
        r = _common.rounds({"tier": (None, tier_get), "plain": (None, plain_get)}, repeats=repeats, warmup=warmup)
        tier_get()
        assert np.array_equal(dest, rows), "DiskTier.get returned other bytes than were put"
        dest[:] = 0
        plain_get()
        assert np.array_equal(dest, rows), "plain read returned other bytes than were written"
        os.sync()
        tier_paths = st.tier_paths(hashes)
        plain_paths = [st.plain.path(h) for h in hashes]
        c = _common.rounds(
            {
                "tier": (lambda p=tier_paths: drop_cached(p), tier_get),
                "plain": (lambda p=plain_paths: drop_cached(p), plain_get),
            },
            repeats=cold_repeats,
            warmup=0,
        )

        def restart(st=st, row_bytes=row_bytes, n=n):
            t = jaxkv.DiskTier(st.tier.directory, st.capacity, fingerprint=FINGERPRINT, row_bytes=row_bytes)
            assert len(t) == n and t.corrupt == 0, (len(t), t.corrupt)

        restart_s = _common.median_seconds(restart, repeats=repeats, warmup=1)
        st.remove()
        wr, rr, cr = (
            _common.paired(w["tier"], w["plain"]),
            _common.paired(r["tier"], r["plain"]),
            _common.paired(c["tier"], c["plain"]),
        )
        res = dict(
            row_kib=kib,
            blocks=n,
            mib=nbytes / MIB,
            tier_write_gbps=_common.gbps(nbytes, statistics.median(w["tier"])),
            plain_write_gbps=_common.gbps(nbytes, statistics.median(w["plain"])),
            write_ratio=statistics.median(wr),
            write_ratio_range=_common.spread(wr),
            tier_read_gbps=_common.gbps(nbytes, statistics.median(r["tier"])),
            plain_read_gbps=_common.gbps(nbytes, statistics.median(r["plain"])),
            read_ratio=statistics.median(rr),
            read_ratio_range=_common.spread(rr),
            tier_cold_read_gbps=_common.gbps(nbytes, statistics.median(c["tier"])),
            plain_cold_read_gbps=_common.gbps(nbytes, statistics.median(c["plain"])),
            cold_read_ratio=statistics.median(cr),
            put_us=statistics.median(w["tier"]) / n * 1e6,
            plain_put_us=statistics.median(w["plain"]) / n * 1e6,
            get_us=statistics.median(r["tier"]) / n * 1e6,
            plain_get_us=statistics.median(r["plain"]) / n * 1e6,
            restart_ms=restart_s * 1e3,
            restart_us_per_block=restart_s / n * 1e6,
            seconds={"write": w, "read": r, "cold_read": c},
        )
        res["write_ok"], res["read_ok"] = verdict(res["write_ratio"]), verdict(res["read_ratio"])
        out.append(res)
        print(".", end="", flush=True)
        del rows, dest
    return out


# -- caches ----------------------------------------------------------------------
def params_for(row_bytes: int) -> jaxkv.KVCacheParams:
    """MHA bf16, 8 KV heads x 128, 16-token pages: 64 KiB of row per layer at TP 4."""
    params = jaxkv.KVCacheParams(
        jnp.bfloat16, n_kv_heads=8, head_dim=128, num_layers=row_bytes // (64 * KIB), page_size=16
    )
    assert params.host_bytes_per_page(TP) == row_bytes, (params, row_bytes)
    return params


def random_cache(params: jaxkv.KVCacheParams, mesh, num_pages: int, rng) -> jaxkv.KVCacheBuffer:
    """A cache full of random bits (so a wrong page cannot pass for a right one)."""
    empty = jaxkv.allocate_buffer(params, mesh, num_pages)
    sharding, shape = empty.values.sharding, empty.values.shape
    del empty
    bits = rng.integers(0, 2**16, size=shape, dtype=np.uint16).view(jnp.bfloat16)
    return jaxkv.KVCacheBuffer(params.replicated(TP), jax.device_put(bits, sharding))


def device_rows(engine: jaxkv.OffloadEngine, cache: jaxkv.KVCacheBuffer, page_ids) -> np.ndarray:
    """The host rows that device pages `page_ids` of `cache` would offload to, read from the shards.

    Independent of the engine's copy paths (only its row layout is used); the
    numpy views are dropped before returning, so `cache` can still be donated.
    """
    out = np.empty((len(page_ids), engine.row_bytes), np.uint8)
    for unit, offset in zip(cache.to_memory(), engine.unit_offsets, strict=True):
        view = np.asarray(unit.shard).reshape(unit.total_num_pages, -1).view(np.uint8)
        out[:, offset : offset + unit.bytes_per_page] = view[np.asarray(page_ids)]
        del view
    return out


def zero_pages(cache: jaxkv.KVCacheBuffer, page_ids) -> jaxkv.KVCacheBuffer:
    """`cache` with pages `page_ids` zeroed (donated), so a later check sees only what a load wrote."""
    ids = jnp.asarray(np.asarray(page_ids, np.int32))
    zero = jax.jit(lambda v: v.at[ids].set(0), out_shardings=cache.values.sharding, donate_argnums=0)
    return jaxkv.KVCacheBuffer(cache.replicates_kv_across_tp, zero(cache.values), cache.scales)


def store_blocks(store: jaxkv.TieredStore, worker: jaxkv.OffloadWorker, cache, hashes, pages) -> jaxkv.StoreResult:
    """The whole store path: plan, d2h (+ write-through on result()), completion."""
    plan = store.prepare_store(hashes, pages)
    assert plan is not None, "prepare_store planned nothing: every block already held"
    result = worker.store(cache, plan).result()
    store.complete_store(result)
    return result


def load_blocks(store: jaxkv.TieredStore, worker: jaxkv.OffloadWorker, cache, hashes, pages):
    """The whole load path: plan, promotion + h2d (cache donated), completion. Returns (cache, result)."""
    plan = store.prepare_load(hashes, pages)
    cache, handle = worker.load(cache, plan)
    result = handle.result()
    store.complete_load(result)
    assert result.status == "loaded", (result.status, result.error)
    return cache, result


# -- 2. Host-tier hit latency -------------------------------------------------------
def bench_host_hits(mesh, batches, *, quick: bool, rng) -> tuple[list[dict], dict]:
    row_bytes, num_pages, host_rows = 256 * KIB, 256, 256
    params = params_for(row_bytes)
    cache = random_cache(params, mesh, num_pages, rng)
    store, worker = jaxkv.open_tiers(cache, host_rows * row_bytes)  # host tier only
    engine = worker.engine
    held = rng.permutation(num_pages)[: 2 * max(batches)].astype(np.int32)
    hashes = new_hashes(held.size)
    store_blocks(store, worker, cache, hashes, held)
    offloaded = device_rows(engine, cache, held)
    assert np.array_equal(engine.read_host([store.host.slot_of(h) for h in hashes]), offloaded), "store: other bytes"
    state = {"cache": cache}  # every load donates it: the current one lives here
    del cache
    lookup_reps = dict(repeats=51, warmup=5)
    load_reps = dict(repeats=7, warmup=2) if quick else dict(repeats=31, warmup=3)
    out = []
    for k in batches:
        hs = hashes[:k]
        ids = rng.permutation(num_pages)[:k].astype(np.int32)
        slots = [store.host.slot_of(h) for h in hs]  # the baseline h2d reads the very same slots
        assert store.lookup(hs) == ["host"] * k
        lookup_s = _common.median_seconds(lambda hs=hs: store.lookup(hs), **lookup_reps)

        def load(ids=ids, hs=hs):
            state["cache"], _ = load_blocks(store, worker, state["cache"], hs, ids)

        def h2d(ids=ids, slots=slots):
            state["cache"], t = engine.h2d(state["cache"], slots, ids)
            t.synchronize()

        t = _common.rounds({"load": (None, load), "h2d": (None, h2d)}, **load_reps)
        extra = [(a - b) / k * 1e6 for a, b in zip(t["load"], t["h2d"], strict=True)]
        state["cache"] = zero_pages(state["cache"], ids)
        assert not device_rows(engine, state["cache"], ids).any()
        load()
        assert np.array_equal(device_rows(engine, state["cache"], ids), offloaded[:k]), "load wrote other bytes"
        out.append(
            dict(
                batch=k,
                lookup_us=lookup_s / k * 1e6,
                load_us=statistics.median(t["load"]) / k * 1e6,
                h2d_us=statistics.median(t["h2d"]) / k * 1e6,
                overhead_us=statistics.median(extra),
                overhead_range=f"{min(extra):.1f}..{max(extra):.1f}",
                load_h2d=statistics.median(_common.paired(t["load"], t["h2d"])),
                load_gbps=_common.gbps(k * row_bytes, statistics.median(t["load"])),
            )
        )
        print(".", end="", flush=True)
    m = store.metrics
    assert m.refused_loads == 0 and m.failed_loads == 0 and m["host"].evictions == 0, m
    cond = dict(
        row_kib=row_bytes // KIB,
        layers=params.num_layers,
        device_pages=num_pages,
        host_rows=host_rows,
        held_blocks=held.size,
        h2d_path=engine.h2d_path,
        d2h_path=engine.d2h_path,
        tiers=store.tier_names,
    )
    worker.close()
    return out, cond


# -- 3. TieredStore + OffloadWorker end to end -------------------------------------
def bench_tiered(mesh, root: Path, *, quick: bool, rng) -> dict:
    row_bytes, k = 1 * MIB, 64
    nbytes = k * row_bytes
    repeats, warmup = (3, 1) if quick else (9, 2)
    params = params_for(row_bytes)
    cache = random_cache(params, mesh, 2 * k, rng)
    disk_capacity = 4 * k * (HEADER_BYTES + row_bytes)  # no disk eviction in this run
    policy = jaxkv.TierPolicy(write_through=True, promote_on_load=True)
    store, worker = jaxkv.open_tiers(
        cache, k * row_bytes, disk_directory=root / "tiered", disk_capacity_bytes=disk_capacity, policy=policy
    )
    engine, disk = worker.engine, worker.tiers["disk"]
    assert engine.row_bytes == row_bytes and store.host.num_slots == k, (engine.row_bytes, store.host.num_slots)
    src = np.arange(k, dtype=np.int32)  # stored from these device pages ...
    dst = np.arange(k, 2 * k, dtype=np.int32)  # ... and loaded back into these
    want = device_rows(engine, cache, src)
    state = {"cache": cache}  # loads donate it: the current one lives here
    del cache

    # Store: a new batch of hashes every round into empty tiers (cleared, untimed: like the plain baseline's
    # fresh directory, the files of the round before are deleted first).
    batches: list[list[bytes]] = []
    plain: list[PlainFiles] = []
    results: list[jaxkv.StoreResult] = []

    def offload_setup():
        store.host.clear()  # the scheduler's host slots, all free again
        disk.clear()  # the worker's files, and what the store's index of the disk tier knows of them
        store.lower["disk"].discard(h for batch in batches for h in batch)
        store.reset_metrics()
        batches.append(new_hashes(k))
        os.sync()

    def offload():
        results.append(store_blocks(store, worker, state["cache"], batches[-1], src))

    plain_hashes = new_hashes(k)  # its own names: the rounds alternate which of the two runs first

    def plain_setup():
        if plain:
            shutil.rmtree(plain[-1].directory)
        plain.append(PlainFiles(root / f"plain-1m-{len(plain)}"))
        os.sync()

    def plain_write():
        for h, r in zip(plain_hashes, want, strict=True):
            plain[-1].put(h, r)

    probe = jaxkv.OffloadEngine(state["cache"], k)  # the engine alone: its own pool, same cache, same pages
    probe_slots = np.arange(k, dtype=np.int32)
    w = _common.rounds(
        {
            "offload": (offload_setup, offload),
            "plain": (plain_setup, plain_write),
            "d2h": (None, lambda: probe.d2h(state["cache"], src, probe_slots).synchronize()),
        },
        repeats=repeats,
        warmup=warmup,
    )
    assert np.array_equal(probe.host_pool, want), "engine d2h wrote other bytes"
    for res in results:
        assert all(res.copied) and res.written["disk"] == (True,) * k, res
    disk_part = [res.wrote["disk"][1] for res in results[warmup:]]
    host_part = [res.seconds - res.wrote["disk"][1] for res in results[warmup:]]
    m = store.metrics  # the last round's (reset before each)
    assert m["disk"].bytes_written == nbytes and m["disk"].blocks_stored == k, m
    assert m.dropped_offloads == 0 and m["disk"].evictions == 0 and m["host"].evictions == 0, m
    assert disk.used_bytes == k * disk.file_bytes == store.bytes()["disk"][0]  # the tier and its index agree
    # One more batch (untimed): the last round's blocks leave host memory and stay on disk.
    batches.append(new_hashes(k))
    store_blocks(store, worker, state["cache"], batches[-1], src)
    assert store.lookup(batches[-2]) == ["disk"] * k and store.lookup(batches[-1]) == ["host"] * k

    # Load: alternate between the last two batches; the one not in host memory is promoted from disk.
    hold = {"host": batches[-1], "disk": batches[-2]}
    dest = np.zeros((k, row_bytes), np.uint8)
    promoted, disk_read = [], []

    def load_disk():
        state["cache"], res = load_blocks(store, worker, state["cache"], hold["disk"], dst)
        hold["host"], hold["disk"] = hold["disk"], hold["host"]
        promoted.append(sum(res.promoted[i] for i in res.plan.promotions))
        disk_read.append(res.read["disk"][1])

    def h2d():  # the engine alone: the batch in host memory, from the slots the store keeps it in
        slots = [store.host.slot_of(h) for h in hold["host"]]
        state["cache"], t = engine.h2d(state["cache"], slots, dst)
        t.synchronize()

    def plain_read():
        for i, h in enumerate(plain_hashes):
            plain[-1].get(h, dest[i])

    load_disk()  # compile the h2d bucket outside the rounds
    promoted.clear(), disk_read.clear()
    r = _common.rounds(
        {"load_disk": (None, load_disk), "h2d": (None, h2d), "plain": (None, plain_read)},
        repeats=repeats,
        warmup=warmup,
    )
    assert set(promoted) == {k}, f"a load promoted {sorted(set(promoted))} blocks, expected {k}"
    disk_read = disk_read[warmup:]
    assert np.array_equal(dest, want), "plain read returned other bytes than were written"
    assert store.lookup(hold["disk"]) == ["disk"] * k
    state["cache"] = zero_pages(state["cache"], dst)
    assert not device_rows(engine, state["cache"], dst).any()
    load_disk()
    assert np.array_equal(device_rows(engine, state["cache"], dst), want), "load from disk wrote other bytes"
    m = store.metrics
    assert m.refused_loads == 0 and m.failed_loads == 0 and m["disk"].corrupt == 0 and m["disk"].errors == 0, m
    res = dict(
        row_kib=row_bytes // KIB,
        batch=k,
        mib=nbytes / MIB,
        offload_gbps=_common.gbps(nbytes, statistics.median(w["offload"])),
        offload_d2h_gbps=_common.gbps(nbytes, statistics.median(host_part)),
        offload_disk_gbps=_common.gbps(nbytes, statistics.median(disk_part)),
        plain_write_gbps=_common.gbps(nbytes, statistics.median(w["plain"])),
        engine_d2h_gbps=_common.gbps(nbytes, statistics.median(w["d2h"])),
        plain_then_d2h_gbps=_common.gbps(
            nbytes, statistics.median([a + b for a, b in zip(w["plain"], w["d2h"], strict=True)])
        ),
        load_disk_gbps=_common.gbps(nbytes, statistics.median(r["load_disk"])),
        load_disk_read_gbps=_common.gbps(nbytes, statistics.median(disk_read)),
        engine_h2d_gbps=_common.gbps(nbytes, statistics.median(r["h2d"])),
        plain_then_h2d_gbps=_common.gbps(
            nbytes, statistics.median([a + b for a, b in zip(r["plain"], r["h2d"], strict=True)])
        ),
        plain_read_gbps=_common.gbps(nbytes, statistics.median(r["plain"])),
        host_rows=store.host.num_slots,
        disk_capacity_mib=disk_capacity / MIB,
        policy=dataclasses.asdict(policy),
        tiers=store.tier_names,
        disk_threads=disk.writers,
        h2d_path=engine.h2d_path,
        d2h_path=engine.d2h_path,
    )
    off, load = _common.paired(w["offload"], w["plain"]), _common.paired(r["load_disk"], r["plain"])
    res["offload_ratio"], res["offload_ratio_range"] = statistics.median(off), _common.spread(off)
    res["load_ratio"], res["load_ratio_range"] = statistics.median(load), _common.spread(load)
    both_w = [a + b for a, b in zip(w["plain"], w["d2h"], strict=True)]
    both_r = [a + b for a, b in zip(r["plain"], r["h2d"], strict=True)]
    res["offload_composed_ratio"] = statistics.median(_common.paired(w["offload"], both_w))
    res["load_composed_ratio"] = statistics.median(_common.paired(r["load_disk"], both_r))
    res["seconds"] = {"offload": w, "load": r}
    res["offload_ok"], res["load_ok"] = verdict(res["offload_ratio"]), verdict(res["load_ratio"])
    worker.close()
    shutil.rmtree(disk.directory, ignore_errors=True)
    for p in plain:
        shutil.rmtree(p.directory, ignore_errors=True)
    print(".", end="", flush=True)
    return res


# -- plot ------------------------------------------------------------------------
def plot(disk: list[dict], path: Path, fs: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    x = [r["row_kib"] for r in disk]
    panels = [
        (
            "write (page cache, no fsync)",
            [("tier_write_gbps", "DiskTier.put", "o-"), ("plain_write_gbps", "plain file write", "ko--")],
        ),
        (
            "read",
            [
                ("tier_read_gbps", "DiskTier.get, page cache", "^-"),
                ("plain_read_gbps", "plain readinto, page cache", "k^--"),
                ("tier_cold_read_gbps", "DiskTier.get, cold", "s-"),
                ("plain_cold_read_gbps", "plain readinto, cold", "ks:"),
            ],
        ),
    ]
    for ax, (title, lines) in zip(axes, panels, strict=True):
        for key, label, style in lines:
            ax.plot(x, [r[key] for r in disk], style, label=label)
        ax.set_xscale("log", base=2)
        ax.set_xticks(x, [f"{v}" for v in x])
        ax.set_ylim(bottom=0)
        ax.set_xlabel("row size (KiB)")
        ax.set_ylabel("GB/s of row bytes")
        ax.set_title(f"{title}: {disk[0]['mib']:.0f} MiB per size, {fs}", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    _common.save_figure(fig, path)


# -- main ------------------------------------------------------------------------
def main() -> None:
    parser = _common.parser(__doc__)
    parser.add_argument("--quick", action="store_true", help="32 MiB per row size, fewer repeats (smoke run)")
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="where the temporary block directories go")
    args = parser.parse_args()
    t0 = time.perf_counter()
    rng = np.random.default_rng(0)
    mesh = jax.make_mesh((TP,), ("tp",), devices=jax.devices()[:TP])
    total = (32 if args.quick else 256) * MIB
    root = Path(tempfile.mkdtemp(prefix="jaxkv-bench-tiers-", dir=args.dir))
    try:
        fs = filesystem(root)
        cond = (
            _common.conditions()
            | {
                "tp": TP,
                "dtype": "bfloat16",
                "layout": "MHA, 8 KV heads, head_dim 128, 16-token pages",
                "bytes_per_row_size": total,
                "row_sizes_kib": ROW_KIBS,
                "block_header_bytes": HEADER_BYTES,
                "checksum": "xxh3_64, verified on every get",
            }
            | fs
            | {"empty_file_create_us_at_start": round(file_create_us(root), 1)}
            | {
                "page_cache": "writes land in the page cache (no fsync; os.sync() before each write round, untimed); "
                "warm reads follow the writes and come from RAM; cold reads drop each file's pages first "
                "(posix_fadvise DONTNEED, untimed)",
                "git": _common.git_state(),
            }
        )
        _common.print_conditions(cond)

        print("disk ", end="", flush=True)
        disk = bench_disk(root, ROW_KIBS, total, quick=args.quick, rng=rng)
        print(" host ", end="", flush=True)
        hits, hits_cond = bench_host_hits(mesh, [1, 16, 64], quick=args.quick, rng=rng)
        print(" tiered ", end="", flush=True)
        tiered = bench_tiered(mesh, root, quick=args.quick, rng=rng)
        print()
        cond["empty_file_create_us_at_end"] = round(file_create_us(root), 1)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    _common.print_table(
        f"1. DiskTier vs plain files (one file per block; GB/s of row bytes; target tier/plain >= {TARGET}x "
        "for page-cache write and read; ratio: median of per-round ratios, range: their min-max)",
        disk,
        [
            ("row_kib", "row KiB", "d"),
            ("blocks", "blocks", "d"),
            ("mib", "MiB", ".0f"),
            ("tier_write_gbps", "put", ".2f"),
            ("plain_write_gbps", "plain wr", ".2f"),
            ("write_ratio", "wr ratio", ".2f"),
            ("write_ratio_range", "(range)", "s"),
            ("write_ok", "ok", "s"),
            ("tier_read_gbps", "get", ".2f"),
            ("plain_read_gbps", "plain rd", ".2f"),
            ("read_ratio", "rd ratio", ".2f"),
            ("read_ratio_range", "(range)", "s"),
            ("read_ok", "ok", "s"),
            ("tier_cold_read_gbps", "get cold", ".2f"),
            ("plain_cold_read_gbps", "plain cold", ".2f"),
            ("cold_read_ratio", "cold ratio", ".2f"),
        ],
    )
    _common.print_table(
        "1b. DiskTier per block: put / get (page cache) and warm restart (new DiskTier over the populated "
        "directory: index rebuild)",
        disk,
        [
            ("row_kib", "row KiB", "d"),
            ("blocks", "blocks", "d"),
            ("put_us", "put us", ".1f"),
            ("plain_put_us", "plain wr us", ".1f"),
            ("get_us", "get us", ".1f"),
            ("plain_get_us", "plain rd us", ".1f"),
            ("restart_ms", "restart ms", ".1f"),
            ("restart_us_per_block", "restart us/block", ".1f"),
        ],
    )
    _common.print_table(
        f"2. Host-tier hits (TieredStore {hits_cond['tiers']} + OffloadWorker), {hits_cond['row_kib']} KiB rows, "
        f"{hits_cond['held_blocks']} blocks held, h2d path {hits_cond['h2d_path']}: us per block; load = "
        "prepare_load + worker.load + result() + complete_load; baseline engine.h2d of the same slots into the same pages",
        hits,
        [
            ("batch", "blocks", "d"),
            ("lookup_us", "lookup us", ".2f"),
            ("load_us", "load us", ".1f"),
            ("h2d_us", "engine h2d us", ".1f"),
            ("overhead_us", "overhead us", ".1f"),
            ("overhead_range", "(range)", "s"),
            ("load_h2d", "load/h2d speed", ".2f"),
            ("load_gbps", "load GB/s", ".2f"),
        ],
    )
    _common.print_table(
        f"3. TieredStore {tiered['tiers']} + OffloadWorker, {tiered['policy']}, {tiered['row_kib']} KiB rows, "
        f"batches of {tiered['batch']} blocks ({tiered['mib']:.0f} MiB), host tier {tiered['host_rows']} rows: "
        f"GB/s of row bytes; target tier/plain >= {TARGET}x. 'of it': the worker's own disk and host parts "
        "(StoreResult.wrote / LoadResult.read, and the rest of StoreResult.seconds); "
        "engine alone: engine.d2h / engine.h2d of the batch; plain+engine: a plain file pass then the engine "
        "transfer, serially",
        [
            dict(
                op="store (write-through)",
                tier=tiered["offload_gbps"],
                host_part=tiered["offload_d2h_gbps"],
                disk_part=tiered["offload_disk_gbps"],
                plain=tiered["plain_write_gbps"],
                engine=tiered["engine_d2h_gbps"],
                composed=tiered["plain_then_d2h_gbps"],
                ratio=tiered["offload_ratio"],
                range=tiered["offload_ratio_range"],
                ok=tiered["offload_ok"],
                composed_ratio=tiered["offload_composed_ratio"],
            ),
            dict(
                op="load from disk",
                tier=tiered["load_disk_gbps"],
                disk_part=tiered["load_disk_read_gbps"],
                plain=tiered["plain_read_gbps"],
                engine=tiered["engine_h2d_gbps"],
                composed=tiered["plain_then_h2d_gbps"],
                ratio=tiered["load_ratio"],
                range=tiered["load_ratio_range"],
                ok=tiered["load_ok"],
                composed_ratio=tiered["load_composed_ratio"],
            ),
        ],
        [
            ("op", "operation", "s"),
            ("tier", "tiered", ".2f"),
            ("host_part", "of it: d2h", ".2f"),
            ("disk_part", "of it: disk", ".2f"),
            ("plain", "plain files", ".2f"),
            ("ratio", "/plain", ".2f"),
            ("range", "(range)", "s"),
            ("ok", "ok", "s"),
            ("engine", "engine alone", ".2f"),
            ("composed", "plain+engine", ".2f"),
            ("composed_ratio", "/(plain+engine)", ".2f"),
        ],
    )
    checks = [r[k] for r in disk for k in ("write_ok", "read_ok")] + [tiered["offload_ok"], tiered["load_ok"]]
    print(f"{sum(c == 'MISS' for c in checks)} of {len(checks)} ratio checks missed (>= {TARGET}x plain files)")
    print(
        f"creating an empty file cost {cond['empty_file_create_us_at_start']} us at the start of the run, "
        f"{cond['empty_file_create_us_at_end']} us at the end (the per-file floor of every write above)"
    )

    seconds = time.perf_counter() - t0
    name = "tiers_quick" if args.quick else "tiers"
    path = _common.write_json(
        name,
        {
            "conditions": cond,
            "target_ratio": TARGET,
            "disk": disk,
            "host_hits": {"conditions": hits_cond, "rows": hits},
            "tiered": tiered,
            "seconds": seconds,
        },
    )
    # The committed figure lives in docs/; a quick run's stays beside its JSON.
    png = _common.RESULTS / f"{name}.png" if args.quick else ROOT / "docs" / f"{name}.png"
    plot(disk, png, f"{fs.get('fs_type')} on {fs.get('fs_source')}")
    print(f"\nwrote {path} and {png} ({seconds:.0f} s)")


if __name__ == "__main__":
    main()
