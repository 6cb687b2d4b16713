"""to_memory() cost as the cache grows, and read_pages throughput against a numpy copy.

    python bench/memory.py [--quick]

Results: bench/results/memory.json (memory_quick.json with --quick).

to_memory() builds descriptors, so its time and the memory it allocates must
not grow with the cache. read_pages runs one jitted gather per unit; its
baseline is a numpy copy of the same number of bytes between preallocated
arrays, measured in the same run (the memory-copy limit of this machine).
"""

from __future__ import annotations

import gc
import time

import _common
import numpy as np

_common.setup_devices()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import jaxkv  # noqa: E402

TP = 4


def params_for(page_kib_per_shard: int) -> jaxkv.KVCacheParams:
    # bf16, 8 KV heads over TP 4 (2 per shard), head_dim 128, 16-token pages:
    # one layer is 16 KiB per shard, so layers sets the page size.
    return jaxkv.KVCacheParams(
        jnp.bfloat16, n_kv_heads=8, head_dim=128, num_layers=page_kib_per_shard // 16, page_size=16
    )


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def live_buffers() -> dict[int, int]:
    """Distinct device buffers alive now: pointer -> bytes (shard views share their buffer)."""
    out = {}
    for array in jax.live_arrays():
        for shard in array.addressable_shards:
            out[shard.data.unsafe_buffer_pointer()] = shard.data.nbytes
    return out


def bench_to_memory(mesh, page_counts) -> list[dict]:
    rows = []
    params = params_for(256)
    for num_pages in page_counts:
        buffer = jaxkv.allocate_buffer(params, mesh, num_pages)
        buffer.values.block_until_ready()
        gc.collect()
        live0, rss0 = live_buffers(), rss_bytes()
        units = buffer.to_memory()  # warm the path once
        seconds = _common.median_seconds(buffer.to_memory, repeats=21)
        units = buffer.to_memory()
        live1, rss1 = live_buffers(), rss_bytes()
        rows.append(
            dict(
                num_pages=num_pages,
                cache_mib=params.bytes_per_page(TP) * num_pages / 2**20,
                units=len(units),
                to_memory_us=seconds * 1e6,
                new_buffer_bytes=sum(n for p, n in live1.items() if p not in live0),
                rss_delta_kib=(rss1 - rss0) / 1024,
            )
        )
        del units, buffer
    return rows


def bench_read_pages(mesh, page_kibs, batches, repeats) -> list[dict]:
    rows = []
    rng = np.random.default_rng(0)
    for kib in page_kibs:
        params = params_for(kib)
        num_pages = max(batches) * 2
        buffer = jaxkv.allocate_buffer(params, mesh, num_pages)
        unit = buffer.to_memory()[0]
        for k in batches:
            ids = rng.permutation(num_pages)[:k].astype(np.int32)
            nbytes = k * unit.bytes_per_page
            src = np.ones(nbytes, np.uint8)
            dst = np.empty_like(src)
            copy_s = _common.median_seconds(lambda src=src, dst=dst: np.copyto(dst, src), repeats=repeats)
            read_s = _common.median_seconds(
                lambda ids=ids, unit=unit: unit.read_pages(ids).block_until_ready(), repeats=repeats
            )
            rows.append(
                dict(
                    page_kib=unit.bytes_per_page / 1024,
                    batch=k,
                    mib=nbytes / 2**20,
                    read_gbps=nbytes / read_s / 1e9,
                    copy_gbps=nbytes / copy_s / 1e9,
                    ratio=copy_s / read_s,
                )
            )
        del unit, buffer
    return rows


def main() -> None:
    parser = _common.parser(__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer sizes and repeats (smoke run)")
    args = parser.parse_args()
    mesh = jax.make_mesh((TP,), ("tp",), devices=jax.devices()[:TP])
    cond = _common.conditions() | {"tp": TP, "dtype": "bfloat16", "layout": "MHA, 8 KV heads, head_dim 128"}
    _common.print_conditions(cond)

    t0 = time.perf_counter()
    page_counts = [64, 512] if args.quick else [64, 128, 256, 512]
    tm = bench_to_memory(mesh, page_counts)
    _common.print_table(
        "to_memory() vs cache size (256 KiB per shard page)",
        tm,
        [
            ("num_pages", "pages", "d"),
            ("cache_mib", "cache MiB", ".0f"),
            ("units", "units", "d"),
            ("to_memory_us", "to_memory us", ".1f"),
            ("new_buffer_bytes", "new buffer B", "d"),
            ("rss_delta_kib", "RSS delta KiB", ".0f"),
        ],
    )
    page_kibs = [64, 1024] if args.quick else [16, 64, 256, 1024]
    batches = [16, 128] if args.quick else [1, 16, 64, 256]
    rp = bench_read_pages(mesh, page_kibs, batches, repeats=3 if args.quick else 7)
    _common.print_table(
        "read_pages (one unit) vs numpy copy of the same bytes",
        rp,
        [
            ("page_kib", "page KiB", ".0f"),
            ("batch", "pages", "d"),
            ("mib", "MiB", ".1f"),
            ("read_gbps", "read_pages GB/s", ".2f"),
            ("copy_gbps", "np copy GB/s", ".2f"),
            ("ratio", "ratio", ".2f"),
        ],
    )
    path = _common.write_json(
        "memory_quick" if args.quick else "memory",
        {"conditions": cond, "to_memory": tm, "read_pages": rp, "seconds": time.perf_counter() - t0},
    )
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
