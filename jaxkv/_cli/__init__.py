"""The `jaxkv` command line.

`jaxkv demo` serves a synthetic multi-turn chat workload through the whole
stack (manager, tiered connector, offload engine, a tiny model) and reports
where every token came from. `jaxkv layout` allocates a TP-sharded cache and
prints its layout and `to_memory()` units. Both run on the devices they find:
8 simulated CPU devices when there is no accelerator.
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


class _Parser(argparse.ArgumentParser):
    """Bad options get one line on stderr and exit status 2, no usage dump."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _demo(args) -> int:
    from jaxkv._cli.demo import DemoConfig, DemoError, format_report, run_demo

    cfg = DemoConfig(
        model=args.model,
        dtype=args.dtype,
        tp=args.tp,
        system_prompts=args.system_prompts,
        conversations=args.conversations,
        turns=args.turns,
        device_pages=args.device_pages,
        host_pages=args.host_pages,
        disk_mib=args.disk_mib,
        out=args.out,
        seed=args.seed,
        progress=not args.no_progress,
    )
    try:
        report = run_demo(cfg)
    except DemoError as e:
        return _fail(str(e))
    print(format_report(report))
    print(f"\nwrote {args.out}/report.json and {args.out}/demo.png")
    bi = report["bit_identity"]
    return 0 if bi["identical"] == bi["turns_compared"] else 1


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="jaxkv", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    demo = sub.add_parser(
        "demo",
        help="serve a multi-turn chat workload through manager, tiers and a tiny model",
        description="Serve a synthetic multi-turn chat workload (shared system prompts, conversations that "
        "come back after others pushed them out of device memory) through manager -> tiered connector -> "
        "offload engine -> tiny model, with a device cache too small on purpose. Prints where every prompt "
        "token came from, prefill time with reuse vs full recomputation, bytes moved per direction, and checks "
        "that logits computed from pages that went to host/disk and back are bit-identical to logits from "
        "pages that never left the device. Writes report.json and demo.png to --out. Exit status 1 if the "
        "bit-identity check fails.",
    )
    demo.add_argument(
        "--model", choices=["mha", "mla"], default="mha", help="mha: Llama-style GQA; mla: DeepSeek-style latent"
    )
    demo.add_argument("--dtype", choices=["bf16", "fp8"], default="bf16", help="cache dtype (fp8: e4m3 with scales)")
    demo.add_argument("--tp", type=int, default=None, help="TP degree (default 4, or fewer if fewer devices)")
    demo.add_argument("--system-prompts", type=int, default=3, help="shared system prompts (default 3)")
    demo.add_argument("--conversations", type=int, default=12, help="conversations (default 12)")
    demo.add_argument("--turns", type=int, default=4, help="turns per conversation (default 4)")
    demo.add_argument(
        "--device-pages", type=int, default=48, help="device cache pages, too few on purpose (default 48)"
    )
    demo.add_argument("--host-pages", type=int, default=32, help="host tier pages (default 32)")
    demo.add_argument("--disk-mib", type=int, default=512, help="disk tier MiB (default 512)")
    demo.add_argument("--out", default="jaxkv-demo", help="output directory (default ./jaxkv-demo)")
    demo.add_argument("--seed", type=int, default=0, help="workload and weights seed (default 0)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")
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
    return {"layout": _layout, "demo": _demo}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
