"""The `jaxkv` command line.

`jaxkv layout` allocates a TP-sharded cache on the devices it finds (8
simulated CPU devices when there is no accelerator) and prints its layout and
its `to_memory()` units.
"""

from __future__ import annotations

import argparse
import sys

SIMULATED_CPU_DEVICES = 8
"""CPU devices to simulate when no accelerator is present, so TP meshes up to 8 run anywhere."""


def _fail(msg: str) -> int:
    print(f"jaxkv: error: {msg}", file=sys.stderr)
    return 2


def _layout(args) -> int:
    import jax
    import numpy as np

    import jaxkv

    quant = jaxkv.KVCacheQuantConfig() if args.fp8 else None
    try:
        params = jaxkv.KVCacheParams(
            dtype="float8_e4m3fn" if args.fp8 else "bfloat16",
            n_kv_heads=1 if args.mla else args.heads,
            head_dim=args.head_dim,
            num_layers=args.layers,
            page_size=args.page_size,
            is_mla=args.mla,
            quant=quant,
        )
        devices = jax.devices()
        if args.tp > len(devices):
            return _fail(f"--tp ({args.tp}) exceeds the {len(devices)} available devices")
        mesh = jax.make_mesh((args.tp,), ("tp",), devices=devices[: args.tp])
        buffer = jaxkv.allocate_buffer(params, mesh, args.pages)
    except ValueError as e:
        return _fail(str(e))

    tp = args.tp
    print(f"jax {jax.__version__} on {devices[0].platform}: {len(devices)} devices, TP mesh {dict(mesh.shape)}")
    print(f"params: {params}")
    print(f"buffer: {buffer}")
    print(f"  values sharding: {buffer.values.sharding.spec}")
    print(f"  page shape per shard: {params.shape_per_page(tp)}", end="")
    print(f" + scales {params.shape_per_scale_page(tp)}" if params.quant else "")
    print(
        f"  bytes per page: {params.bytes_per_page(tp):,} on devices, "
        f"{params.host_bytes_per_page(tp):,} on host; cache {params.bytes_per_page(tp) * args.pages:,} B"
    )
    units = buffer.to_memory()
    print(f"to_memory(): {len(units)} units (no copies)")
    for unit in units:
        print(f"  {unit!r}")
    ids = np.array([0, args.pages - 1], np.int32)
    rows = units[0].read_pages(ids)
    print(f"units[0].read_pages({ids.tolist()}) -> {rows.dtype}{list(rows.shape)} on {rows.devices()}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jaxkv", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    layout = sub.add_parser("layout", help="allocate a sharded cache and print its layout and units")
    layout.add_argument("--tp", type=int, default=4, help="TP degree (default 4)")
    layout.add_argument("--mla", action="store_true", help="MLA latent cache, replicated over TP")
    layout.add_argument("--fp8", action="store_true", help="float8_e4m3fn values with float32 scales")
    layout.add_argument("--heads", type=int, default=8, help="KV heads in total (default 8)")
    layout.add_argument("--head-dim", type=int, default=128, help="head dim (default 128)")
    layout.add_argument("--layers", type=int, default=4, help="layers per page (default 4)")
    layout.add_argument("--page-size", type=int, default=16, help="tokens per page (default 16)")
    layout.add_argument("--pages", type=int, default=64, help="pages in the cache (default 64)")
    args = parser.parse_args(argv)

    import jax

    # Only the CPU backend reads this; on GPUs/TPUs the real devices are used.
    jax.config.update("jax_num_cpu_devices", SIMULATED_CPU_DEVICES)
    return {"layout": _layout}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
