"""A tiered load from disk to the device, end to end, against a plain file read + `jax.device_put`.

    python bench/disk_load.py [--quick] [--dir PATH]

Measures in one run, rounds interleaved (`_common.rounds`: the order reverses
every round, ratios are medians of per-round ratios):

- **jaxkv**: `prepare_load` -> `OffloadWorker.load` -> `handle.result()` ->
  `complete_load` of `k` blocks held only on disk (the host tier is cleared
  before each round, untimed), promoted into the host tier and written into
  device pages, two ways: **overlapped** (`OffloadWorker.load_chunk_bytes =
  LOAD_CHUNK_BYTES`, the default off CPU: lower-tier reads overlap the H2D of
  earlier chunks) and **one piece** (`load_chunk_bytes=None`, the default on
  CPU, and what a load does under a `GroupAgreement`). The goal is checked
  on the backend's default.
- **baseline**: the same bytes as plain files (one per block, no header, no
  checksum), read with open/readinto/close into one contiguous buffer, then
  `jax.device_put` of that buffer onto the cache's device, blocked on. Two
  buffers: `np.empty` (XLA:CPU copies it: numpy's 16-byte alignment) and a
  64-byte-aligned one (XLA:CPU adopts it without a copy, so the baseline is
  the read alone). The ratio against each is reported; the second is the
  stricter one on CPU.

All reads are warm (the files were just written: served from the page
cache), as in bench/tiers.py's warm reads. The cache is MHA bf16 at TP 1
on one device; every load is checked bit-exact against the stored pages.
Goal (issue 13): jaxkv >= 0.8x of the baseline. Results:
bench/results/disk_load.json (disk_load_quick.json with --quick).
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import _common
import numpy as np

_common.setup_devices()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

import jaxkv  # noqa: E402
from jaxkv.tiers import worker as worker_mod  # noqa: E402
from jaxkv.transfer.engine import aligned_rows  # noqa: E402

KIB, MIB = 1 << 10, 1 << 20
GOAL = 0.8


def params_for(row_bytes: int) -> jaxkv.KVCacheParams:
    """MHA bf16, 8 KV heads x 128, 16-token pages: 64 KiB of row per layer at TP 1."""
    params = jaxkv.KVCacheParams(
        jnp.bfloat16, n_kv_heads=8, head_dim=128, num_layers=row_bytes // (64 * KIB), page_size=16
    )
    assert params.host_bytes_per_page(1) == row_bytes, (params, row_bytes)
    return params


def random_cache(params, mesh, num_pages: int, rng) -> jaxkv.KVCacheBuffer:
    empty = jaxkv.allocate_buffer(params, mesh, num_pages)
    sharding, shape = empty.values.sharding, empty.values.shape
    del empty
    bits = rng.integers(0, 2**16, size=shape, dtype=np.uint16).view(jnp.bfloat16)
    return jaxkv.KVCacheBuffer(params.replicated(1), jax.device_put(bits, sharding))


def page_rows(cache, pages) -> bytes:
    """The bytes of device pages `pages` (TP 1: one shard), views dropped before returning."""
    view = np.asarray(cache.values.addressable_shards[0].data)
    out = view[np.asarray(pages)].tobytes()
    del view
    return out


def bench_one(root: Path, mesh, row_bytes: int, k: int, *, quick: bool, rng) -> dict:
    repeats, warmup = (3, 1) if quick else (9, 2)
    nbytes = k * row_bytes
    cache = random_cache(params_for(row_bytes), mesh, 2 * k, rng)
    src, dst = list(range(k)), list(range(k, 2 * k))
    want = page_rows(cache, src)
    directory = root / f"tier-{row_bytes}"
    store, worker = jaxkv.open_tiers(
        cache,
        k * row_bytes,
        disk_directory=directory,
        disk_capacity_bytes=2 * k * (row_bytes + 4096),
        policy=jaxkv.TierPolicy(write_through=True, promote_on_load=True),
    )
    hashes = [os.urandom(32) for _ in range(k)]
    plan = store.prepare_store(hashes, src)
    store.complete_store(worker.store(cache, plan).result())
    state = {"cache": cache}
    del cache

    plain = root / f"plain-{row_bytes}"
    plain.mkdir()
    files = [plain / h.hex() for h in hashes]
    for i, path in enumerate(files):
        path.write_bytes(want[i * row_bytes : (i + 1) * row_bytes])
    buf = np.empty(nbytes + 16, np.uint8)
    buf = buf[16 : 16 + nbytes] if buf.ctypes.data % 64 == 0 else buf[:nbytes]  # not 64-byte aligned: a copy
    aligned = aligned_rows(1, nbytes)[0]
    device = jax.devices()[0]

    def clear_host():
        store.host.clear()
        assert store.lookup(hashes) == ["disk"] * k

    def load(chunk_bytes: int):
        def run():
            worker.load_chunk_bytes = chunk_bytes
            plan = store.prepare_load(hashes, dst)
            state["cache"], handle = worker.load(state["cache"], plan)
            result = handle.result()
            store.complete_load(result)
            assert result.status == "loaded", result.error

        return run

    overlapped, one_piece = load(worker_mod.LOAD_CHUNK_BYTES), load(None)
    read_s, put_s = [], []

    def baseline_into(dest, log: bool):
        def run():
            t0 = time.perf_counter()
            view = memoryview(dest)
            for i, path in enumerate(files):
                with open(path, "rb", buffering=0) as f:
                    f.readinto(view[i * row_bytes : (i + 1) * row_bytes])
            t1 = time.perf_counter()
            placed = jax.device_put(dest, device).block_until_ready()
            if log:
                read_s.append(t1 - t0)
                put_s.append(time.perf_counter() - t1)
            return placed

        return run

    baseline, baseline_aligned = baseline_into(buf, True), baseline_into(aligned, False)
    probe = baseline_aligned()
    assert probe.unsafe_buffer_pointer() == aligned.ctypes.data or jax.default_backend() != "cpu", "copied"
    del probe

    for fn in (overlapped, one_piece):  # compile every bucket outside the rounds
        clear_host()
        fn()
    times = _common.rounds(
        {
            "overlapped": (clear_host, overlapped),
            "one_piece": (clear_host, one_piece),
            "baseline": (None, baseline),
            "baseline_aligned": (None, baseline_aligned),
        },
        repeats=repeats,
        warmup=warmup,
    )
    assert page_rows(state["cache"], dst) == want, "the load wrote other bytes than were stored"
    assert buf.tobytes() == want and aligned.tobytes() == want, "the plain read returned other bytes"
    read_s, put_s = read_s[warmup:], put_s[warmup:]

    def ratio(fast, slow):  # per round: how fast jaxkv is relative to the baseline (> 1: faster)
        return statistics.median(_common.paired(times[fast], times[slow]))

    def gbps(seconds):
        return nbytes / statistics.median(seconds) / 1e9

    worker.close()
    shutil.rmtree(directory, ignore_errors=True)
    shutil.rmtree(plain, ignore_errors=True)
    per = 1 << max(0, (worker_mod.LOAD_CHUNK_BYTES // row_bytes).bit_length() - 1)
    return dict(
        row_kib=row_bytes // KIB,
        blocks=k,
        mib=nbytes / MIB,
        chunk_blocks=min(per, k),
        overlapped_gbps=gbps(times["overlapped"]),
        one_piece_gbps=gbps(times["one_piece"]),
        baseline_gbps=gbps(times["baseline"]),
        plain_read_gbps=gbps(read_s),
        device_put_gbps=gbps(put_s),
        aligned_baseline_gbps=gbps(times["baseline_aligned"]),
        ratio=ratio("overlapped", "baseline"),
        ratio_aligned=ratio("overlapped", "baseline_aligned"),
        one_piece_ratio_aligned=ratio("one_piece", "baseline_aligned"),
        one_piece_ratio=ratio("one_piece", "baseline"),
        ratio_vs_plain_read=statistics.median(r / a for a, r in zip(times["overlapped"], read_s, strict=True)),
        default=DEFAULT,
        ok=ratio(DEFAULT, "baseline") >= GOAL,
        ok_zero_copy=ratio(DEFAULT, "baseline_aligned") >= GOAL,
    )


DEFAULT = "one_piece" if jax.default_backend() == "cpu" else "overlapped"
"""The path `OffloadWorker(load_chunk_bytes="auto")` takes on this backend."""


def main() -> None:
    parser = _common.parser(__doc__)
    parser.add_argument("--quick", action="store_true", help="two sizes, 32 blocks, few rounds (smoke run)")
    parser.add_argument("--dir", type=Path, default=None, help="where the temporary files go (default: system temp)")
    args = parser.parse_args()
    cond = _common.conditions()
    mesh = Mesh(np.array(jax.devices()[:1]), ("tp",))
    rng = np.random.default_rng(0)
    sizes = [(256 * KIB, 32), (1 * MIB, 32)] if args.quick else [(256 * KIB, 64), (1 * MIB, 64), (2 * MIB, 64)]
    _common.print_conditions(cond)
    print(
        f"jaxkv.tiers.worker.LOAD_CHUNK_BYTES = {worker_mod.LOAD_CHUNK_BYTES}; default on this backend: {DEFAULT}; "
        "warm page cache; TP 1, MHA bf16"
    )
    rows = []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for row_bytes, k in sizes:
            rows.append(bench_one(Path(tmp), mesh, row_bytes, k, quick=args.quick, rng=rng))
    _common.print_table(
        "disk -> device load (GB/s of row bytes; ratio = jaxkv / (plain read + device_put), median of rounds)",
        rows,
        [
            ("row_kib", "row KiB", "d"),
            ("blocks", "blocks", "d"),
            ("chunk_blocks", "chunk", "d"),
            ("overlapped_gbps", "overlapped", ".2f"),
            ("one_piece_gbps", "one piece", ".2f"),
            ("baseline_gbps", "read+put", ".2f"),
            ("plain_read_gbps", "read", ".2f"),
            ("device_put_gbps", "put", ".2f"),
            ("ratio", "ratio", ".2f"),
            ("one_piece_ratio", "1-piece ratio", ".2f"),
            ("aligned_baseline_gbps", "read+put 0-copy", ".2f"),
            ("ratio_aligned", "ratio 0-copy", ".2f"),
            ("one_piece_ratio_aligned", "1-piece 0-copy", ".2f"),
            ("ratio_vs_plain_read", "vs read", ".2f"),
            ("ok", f"default >={GOAL}", ""),
        ],
    )
    name = "disk_load_quick" if args.quick else "disk_load"
    path = _common.write_json(
        name,
        {
            "conditions": cond,
            "git": _common.git_state(),
            "load_chunk_bytes": worker_mod.LOAD_CHUNK_BYTES,
            "goal": GOAL,
            "rows": rows,
        },
    )
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
