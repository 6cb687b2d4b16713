"""`jaxkv demo`: serve a multi-turn chat workload through the whole stack.

manager -> tiered connector (host + disk) -> offload engine -> tiny model, with
a device cache deliberately too small, so pages travel to host memory and disk
and come back. A *shadow* stack runs the same turns with a device cache large
enough never to evict: its pages never leave the device. For every turn whose
prefix came back from host or disk, the logits of the two stacks are compared
bit for bit. A third measurement recomputes every prompt from scratch (a
salted request: no reuse) to show what prefix caching saves.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

from jaxkv._cli.workload import chat_workload


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """What `jaxkv demo` runs; every field is a command-line option."""

    model: str = "mha"
    """'mha' (Llama-style GQA) or 'mla' (DeepSeek-style latent attention)."""
    dtype: str = "bf16"
    """Cache dtype: 'bf16' or 'fp8' (float8_e4m3fn with float32 scales)."""
    tp: int | None = None
    """TP degree (devices in the mesh); None: 4, or as many devices as there are if fewer."""
    system_prompts: int = 3
    conversations: int = 12
    turns: int = 4
    system_tokens: int = 192
    user_tokens: int = 32
    reply_tokens: int = 8
    device_pages: int = 48
    """Device cache pages: too few for the workload on purpose."""
    host_pages: int = 32
    """Host tier capacity in pages."""
    disk_mib: int = 512
    """Disk tier capacity."""
    out: str = "jaxkv-demo"
    """Output directory: report.json, demo.png and the disk tier."""
    seed: int = 0
    progress: bool = True

    def max_prompt_tokens(self) -> int:
        return self.system_tokens + self.turns * (self.user_tokens + self.reply_tokens)


class DemoError(Exception):
    """Bad demo input: printed as one line by the CLI."""


class Progress:
    """A one-line progress bar on stderr."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled, self.t0, self.last = total, enabled, time.perf_counter(), 0.0
        # Redraw often on a terminal; in a log, a line per ~10%.
        self.every = 0.1 if sys.stderr.isatty() else None

    def update(self, done: int, note: str = "") -> None:
        now = time.perf_counter()
        if not self.enabled:
            return
        if self.every is None:
            if done % max(1, self.total // 10) and done < self.total:
                return
        elif now - self.last < self.every and done < self.total:
            return
        self.last = now
        width = 30
        filled = int(width * done / self.total)
        eta = (now - self.t0) / done * (self.total - done) if done else 0.0
        sys.stderr.write(
            f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{self.total} turns  eta {eta:4.0f}s  {note:<40}"
        )
        if done >= self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def _check(cfg: DemoConfig, page_size: int) -> None:
    if cfg.model not in ("mha", "mla"):
        raise DemoError(f"--model must be 'mha' or 'mla', got {cfg.model!r}")
    if cfg.dtype not in ("bf16", "fp8"):
        raise DemoError(f"--dtype must be 'bf16' or 'fp8', got {cfg.dtype!r}")
    if cfg.tp is not None and cfg.tp < 1:
        raise DemoError(f"--tp must be >= 1, got {cfg.tp}")
    for name in (
        "system_prompts",
        "conversations",
        "turns",
        "host_pages",
        "disk_mib",
        "system_tokens",
        "user_tokens",
    ):
        if getattr(cfg, name) < 1:
            raise DemoError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    need = math.ceil(cfg.max_prompt_tokens() / page_size) + 1  # + the null page
    if cfg.device_pages < need:
        raise DemoError(
            f"--device-pages ({cfg.device_pages}) cannot hold one conversation's last turn: "
            f"{cfg.max_prompt_tokens()} tokens need {need} pages of {page_size} tokens (incl. the null page)"
        )
    if cfg.host_pages < need - 1:
        raise DemoError(
            f"--host-pages ({cfg.host_pages}) must hold one turn's cached prefix: at least {need - 1} pages"
        )


def _prepare_out(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise DemoError(f"--out {str(out)!r} is not a writable directory: {e.strerror or e}") from e


def run_demo(cfg: DemoConfig) -> dict:
    """Serve the workload; returns the report (also written to `cfg.out`/report.json)."""
    import shutil

    import jax

    import jaxkv
    from jaxkv.models import TinyConfig, TinyModel

    out = Path(cfg.out)
    page_size = TinyConfig().page_size
    _check(cfg, page_size)
    _prepare_out(out)
    devices = jax.devices()
    if cfg.tp is None:
        cfg = dataclasses.replace(cfg, tp=max(t for t in (4, 2, 1) if t <= len(devices)))
    if cfg.tp > len(devices):
        raise DemoError(f"--tp ({cfg.tp}) exceeds the {len(devices)} available devices")
    mesh = jax.make_mesh((cfg.tp,), ("tp",), devices=devices[: cfg.tp])
    try:
        model = TinyModel(
            TinyConfig(
                kind=cfg.model,
                cache_dtype="bfloat16" if cfg.dtype == "bf16" else "float8_e4m3fn",
                seed=cfg.seed,
            ),
            mesh,
        )
    except ValueError as e:
        raise DemoError(str(e)) from e

    rng = np.random.default_rng(cfg.seed)
    events = chat_workload(
        rng,
        system_prompts=cfg.system_prompts,
        conversations=cfg.conversations,
        turns=cfg.turns,
        system_tokens=cfg.system_tokens,
        user_tokens=cfg.user_tokens,
        reply_tokens=cfg.reply_tokens,
        vocab=model.config.vocab,
    )
    row_bytes = model.cache_params.host_bytes_per_page(cfg.tp)
    disk_dir = out / "disk"
    shutil.rmtree(disk_dir, ignore_errors=True)  # a fresh tier each run: the numbers are this run's

    # The stack under test: a small device cache, host and disk tiers behind it.
    cache = model.allocate_cache(cfg.device_pages)
    connector = jaxkv.TieredConnector(cache, cfg.host_pages * row_bytes, disk_dir, cfg.disk_mib << 20)
    manager = jaxkv.PagedKVCacheManager(cache, connector, seed=cfg.seed)
    # The shadow stack: room for everything, pages never leave the device.
    total_tokens = sum(len(p) + len(r) for _, p, r in events)
    shadow_pages = 2 * math.ceil(total_tokens / page_size) + 2 * math.ceil(cfg.max_prompt_tokens() / page_size) + 2
    shadow_cache = model.allocate_cache(shadow_pages)
    shadow = jaxkv.PagedKVCacheManager(shadow_cache, seed=cfg.seed)
    state = {"main": cache, "shadow": shadow_cache}
    width = 1 << (math.ceil(cfg.max_prompt_tokens() / page_size) - 1).bit_length()

    def table(mgr, rid) -> np.ndarray:
        return mgr.page_table(rid, width=width)

    def step(which, mgr, rid, tokens, start) -> tuple[np.ndarray, float]:
        t0 = time.perf_counter()
        logits, state[which] = model.prefill(state[which], np.asarray(tokens, np.int32), start, table(mgr, rid))
        logits = np.asarray(logits)  # waits for the result
        return logits, time.perf_counter() - t0

    # Compile every prompt-length bucket once, outside the timed turns.
    t_compile = time.perf_counter()
    buckets = sorted({1 << (n - 1).bit_length() for n in range(1, cfg.max_prompt_tokens() + 1)})
    for which, mgr in (("main", manager), ("shadow", shadow)):
        for b in buckets:
            n = min(b, cfg.max_prompt_tokens())  # pads to bucket b
            mgr.add_request("warmup", np.zeros(n, np.int32), cache_salt="warmup")
            step(which, mgr, "warmup", np.zeros(n, np.int32), 0)
            mgr.finish("warmup")
    connector.bind(state["main"])
    # And the engine's transfer buckets, so the byte rates below measure copies, not compiles.
    # Pages and host slots are all free and uncommitted here: the bytes moved are never read.
    engine = connector.engine
    for k in sorted({1 << (n - 1).bit_length() for n in range(1, min(cfg.host_pages, cfg.device_pages - 1) + 1)}):
        k = min(k, cfg.host_pages, cfg.device_pages - 1)
        ids = np.arange(1, k + 1)
        engine.d2h(ids, np.arange(k)).synchronize()
        state["main"], t = engine.h2d(state["main"], np.arange(k), ids)
        t.synchronize()
    compile_seconds = time.perf_counter() - t_compile

    progress = Progress(len(events), cfg.progress)
    per_turn, compared, identical = [], 0, 0
    t_run = time.perf_counter()
    for i, (conv, prompt, reply) in enumerate(events):
        rid = f"c{conv}-t{i}"
        req = manager.add_request(rid, prompt)
        if req.load is not None:
            req.load.synchronize()
        state["main"] = connector.buffer
        logits, reuse_s = step("main", manager, rid, prompt[req.num_cached_tokens :], req.num_cached_tokens)

        sreq = shadow.add_request(rid, prompt)
        slogits, _ = step("shadow", shadow, rid, prompt[sreq.num_cached_tokens :], sreq.num_cached_tokens)
        outside = req.tokens_from_host + req.tokens_from_disk
        if outside and sreq.num_cached_tokens == req.num_cached_tokens:
            compared += 1
            identical += int(np.array_equal(logits.view(np.uint32), slogits.view(np.uint32)))

        # Full recomputation of the same prompt: a salted request shares no block.
        shadow.add_request(rid + "-full", prompt, cache_salt="no-reuse")
        _, full_s = step("shadow", shadow, rid + "-full", prompt, 0)
        shadow.finish(rid + "-full")

        # Decode the reply one token at a time (teacher-forced: the same turns on both stacks).
        pos = len(prompt)
        for tok in reply:
            for which, mgr in (("main", manager), ("shadow", shadow)):
                mgr.append_tokens(rid, [tok])
                step(which, mgr, rid, [tok], pos)
            pos += 1
        connector.bind(state["main"])
        manager.commit(rid, pos)
        shadow.commit(rid, pos)
        manager.finish(rid)
        shadow.finish(rid)
        per_turn.append(
            dict(
                turn=i,
                conversation=conv,
                prompt_tokens=len(prompt),
                from_device=req.tokens_from_device,
                from_host=req.tokens_from_host,
                from_disk=req.tokens_from_disk,
                recomputed=len(prompt) - req.num_cached_tokens,
                prefill_seconds=reuse_s,
                full_prefill_seconds=full_s,
            )
        )
        progress.update(i + 1, f"hit rate {manager.metrics.hit_rate:.0%}")
    run_seconds = time.perf_counter() - t_run
    connector.close()

    mt, ct = manager.metrics, connector.metrics
    report = {
        "config": dataclasses.asdict(cfg),
        "conditions": {
            "jax": jax.__version__,
            "backend": devices[0].platform,
            "devices": len(devices),
            "tp": cfg.tp,
            "model": dataclasses.asdict(model.config),
            "row_bytes": row_bytes,
            "shadow_device_pages": shadow_pages,
        },
        "requests": len(events),
        "prompt_tokens": mt.prompt_tokens,
        "tokens": {
            "device": mt.tokens_from_device,
            "host": mt.tokens_from_host,
            "disk": mt.tokens_from_disk,
            "recomputed": mt.tokens_recomputed,
        },
        "hit_rate": mt.hit_rate,
        "prefill_seconds_with_reuse": sum(t["prefill_seconds"] for t in per_turn),
        "prefill_seconds_full_recompute": sum(t["full_prefill_seconds"] for t in per_turn),
        "bytes": {
            "device_to_host": ct.offload_bytes,
            "host_to_device": ct.load_bytes,
            "host_to_disk": ct.disk_write_bytes,
            "disk_to_host": ct.disk_read_bytes,
        },
        "seconds": {
            "device_to_host": ct.offload_seconds - ct.disk_write_seconds,
            "host_to_device": ct.load_seconds - ct.disk_read_seconds,
            "host_to_disk": ct.disk_write_seconds,
            "disk_to_host": ct.disk_read_seconds,
            "compile": compile_seconds,
            "run": run_seconds,
        },
        "evictions": {"device": manager.pool.evictions, "host": ct.host_evictions, "disk": ct.disk_evictions},
        "bit_identity": {"turns_compared": compared, "identical": identical},
        "turns": per_turn,
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    _plot(report, out / "demo.png")
    return report


def format_report(r: dict) -> str:
    """The table `jaxkv demo` prints."""
    tok, pt = r["tokens"], r["prompt_tokens"]

    def gbps(direction):
        s = r["seconds"][direction]
        return r["bytes"][direction] / s / 1e9 if s > 0 else 0.0

    c = r["conditions"]
    bi = r["bit_identity"]
    lines = [
        f"jaxkv demo: {r['config']['model']} model, {r['config']['dtype']} cache, TP {c['tp']} on "
        f"{c['devices']} {c['backend']} devices (jax {c['jax']})",
        f"  {r['requests']} requests, {pt:,} prompt tokens; device cache {r['config']['device_pages']} pages, "
        f"host {r['config']['host_pages']} pages, disk {r['config']['disk_mib']} MiB",
        "",
        f"  {'tokens served from device':<34}{tok['device']:>9,}  {tok['device'] / pt:6.1%}",
        f"  {'tokens served from host memory':<34}{tok['host']:>9,}  {tok['host'] / pt:6.1%}",
        f"  {'tokens served from disk':<34}{tok['disk']:>9,}  {tok['disk'] / pt:6.1%}",
        f"  {'tokens recomputed':<34}{tok['recomputed']:>9,}  {tok['recomputed'] / pt:6.1%}",
        "",
        f"  {'prefill time with reuse':<34}{r['prefill_seconds_with_reuse']:>8.2f} s",
        f"  {'prefill time, full recomputation':<34}{r['prefill_seconds_full_recompute']:>8.2f} s  "
        f"({r['prefill_seconds_full_recompute'] / max(r['prefill_seconds_with_reuse'], 1e-9):.1f}x)",
        "",
        f"  {'direction':<16}{'MiB':>10}{'GB/s':>9}",
    ]
    for d in ("device_to_host", "host_to_device", "host_to_disk", "disk_to_host"):
        lines.append(f"  {d.replace('_', ' '):<16}{r['bytes'][d] / 2**20:>10.1f}{gbps(d):>9.2f}")
    verdict = "bit-identical" if bi["identical"] == bi["turns_compared"] else "MISMATCH"
    lines += [
        "",
        f"  logits after host/disk round trips vs pages that never left the device: "
        f"{bi['identical']}/{bi['turns_compared']} turns {verdict}",
        f"  evictions: device {r['evictions']['device']}, host {r['evictions']['host']}, disk {r['evictions']['disk']};"
        f" compile {r['seconds']['compile']:.1f} s, run {r['seconds']['run']:.1f} s",
    ]
    return "\n".join(lines)


def _plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    turns = r["turns"]
    x = np.arange(1, len(turns) + 1)
    cum = {k: np.cumsum([t[k] for t in turns]) for k in ("from_device", "from_host", "from_disk", "prompt_tokens")}
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.8))
    bottom = np.zeros(len(turns))
    for key, label, color in (
        ("from_device", "device", "C0"),
        ("from_host", "host", "C1"),
        ("from_disk", "disk", "C2"),
    ):
        frac = cum[key] / cum["prompt_tokens"]
        a.fill_between(x, bottom, bottom + frac, label=label, color=color, step="mid")
        bottom = bottom + frac
    a.set_xlabel("request")
    a.set_ylabel("cumulative fraction of prompt tokens")
    a.set_title("hit rate by tier over the run")
    a.set_ylim(0, 1)
    a.legend(loc="lower right", fontsize=8)
    b.plot(x, [t["full_prefill_seconds"] * 1e3 for t in turns], ".", color="0.5", label="full recomputation")
    b.plot(x, [t["prefill_seconds"] * 1e3 for t in turns], ".", color="C3", label="with reuse")
    b.set_xlabel("request")
    b.set_ylabel("prefill ms")
    b.set_title("time per request")
    b.legend(fontsize=8)
    fig.suptitle(f"jaxkv demo: {r['config']['model']} {r['config']['dtype']}, TP {r['conditions']['tp']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
