"""`jaxkv demo`: serve a multi-turn chat workload through the whole stack.

manager -> tiered store (host + disk) -> offload worker -> tiny model, with
a device cache deliberately too small, so pages travel to host memory and disk
and come back. A *shadow* stack runs the same turns with a device cache large
enough never to evict: its pages never leave the device. For every turn whose
prefix came back from host or disk, the logits of the two stacks are compared
bit for bit. A baseline stack, with a device cache of the same size as the
stack under test, recomputes every prompt from scratch (no reuse) to show
what prefix caching saves.

With `--remote` a RemoteTier on a Redis server (`jaxkv._cli.demo_remote`)
joins the stack behind disk, and a second instance, started cold, serves the
same turns from what the first stored there, checked against the shadow
stack the same way.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

from jaxkv._cli.errors import DemoError
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
    """Distinct system prompts, each shared by several conversations."""
    conversations: int = 12
    """Conversations; their turns interleave at random."""
    turns: int = 4
    """Turns per conversation: each one's prompt is the whole history so far."""
    system_tokens: int = 192
    """Tokens of each system prompt."""
    user_tokens: int = 32
    """Tokens of each user message."""
    reply_tokens: int = 8
    """Tokens of each reply, decoded one at a time."""
    device_pages: int = 48
    """Device cache pages: too few for the workload on purpose."""
    host_pages: int = 32
    """Host tier capacity in pages."""
    disk_mib: int = 512
    """Disk tier capacity."""
    out: str = "jaxkv-demo"
    """Output directory: report.json, demo.png and the disk tier."""
    seed: int = 0
    """Seed of the workload and of the model's weights."""
    remote: str | None = None
    """None: one instance. 'local' (a private redis-server) or a redis:// URL: a RemoteTier joins the stack, and
    a second instance starts cold and serves the same turns from what the first stored there."""
    attention: str = "auto"
    """Paged attention implementation: 'auto', 'xla' or 'pallas' (on CPU in Pallas' interpret mode: slow)."""
    progress: bool = True
    """Show progress on stderr."""
    checkpoint: str | None = None
    """A Hugging Face checkpoint directory (config.json + *.safetensors, `jaxkv.hf`) to serve instead of the tiny
    random model: `model` is then ignored, and the workload's token ids are drawn from its vocabulary."""

    def max_prompt_tokens(self) -> int:
        return self.system_tokens + self.turns * (self.user_tokens + self.reply_tokens)


class Progress:
    """Progress on stderr: a bar redrawn in place on a terminal; in a log, a plain line every ~10%."""

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
        bar = f"[{'#' * filled}{'.' * (width - filled)}] {done}/{self.total} turns  eta {eta:4.0f}s  "
        if self.every is None:  # not a terminal: "\r" would make the whole run one endless log line
            sys.stderr.write(f"{bar}{note}".rstrip() + "\n")
        else:
            sys.stderr.write(f"\r{bar}{note:<40}" + ("\n" if done >= self.total else ""))
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


DISK_HEADROOM_BYTES = 16 << 20
"""Free space the demo leaves on --out's filesystem beside its disk tier: report.json and demo.png take well
under 1 MiB; the rest is slack for whatever else writes there during the run."""

MIN_DISK_ROWS = 8
"""The smallest disk tier the demo runs with, in blocks: fewer and the disk column of its report says nothing."""


def _disk_capacity(cfg: DemoConfig, disk_dir: Path, row_bytes: int) -> int:
    """--disk-mib in bytes, cut to the free space of the filesystem under --out (less `DISK_HEADROOM_BYTES`),
    so a full filesystem never ends the run half-way; `DemoError` when not even `MIN_DISK_ROWS` blocks fit."""
    import shutil

    free = shutil.disk_usage(disk_dir).free - DISK_HEADROOM_BYTES
    want = cfg.disk_mib << 20
    if want <= free:
        return want
    block = row_bytes + 4096  # a block file: the row and its header, rounded up to a filesystem block
    if free < MIN_DISK_ROWS * block:
        raise DemoError(
            f"--out {str(cfg.out)!r} has {max(free + DISK_HEADROOM_BYTES, 0) >> 20} MiB free, too little for the "
            f"disk tier (--disk-mib {cfg.disk_mib}; at least {(MIN_DISK_ROWS * block + DISK_HEADROOM_BYTES) >> 20} "
            f"MiB needed); free some space or choose another --out"
        )
    return free


def _write_atomically(path: Path, text: str) -> None:
    """Write `path` whole or not at all: a full filesystem never leaves a truncated report behind."""
    import os

    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise DemoError(f"writing {str(path)!r} failed: {e.strerror or e}") from e


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
    import tempfile

    import jax

    import jaxkv
    from jaxkv.models import TinyConfig, TinyModel

    if not str(cfg.out).strip():
        raise DemoError("--out must name a directory, got ''")
    out = Path(cfg.out)
    page_size = TinyConfig().page_size
    _check(cfg, page_size)
    _prepare_out(out)
    devices = jax.devices()
    tp = cfg.tp if cfg.tp is not None else max(t for t in (4, 2, 1) if t <= len(devices))
    cfg = dataclasses.replace(cfg, tp=tp)
    if tp > len(devices):
        raise DemoError(f"--tp ({tp}) exceeds the {len(devices)} available devices")
    with contextlib.ExitStack() as stack:
        shared = None
        if cfg.remote is not None:  # first: a server that is missing or does not answer fails before any work
            from jaxkv._cli.demo_remote import shared_server

            shared = stack.enter_context(shared_server(cfg.remote, out))
        mesh = jax.make_mesh((tp,), ("tp",), devices=devices[:tp])
        cache_dtype = "bfloat16" if cfg.dtype == "bf16" else "float8_e4m3fn"
        try:
            if cfg.checkpoint is not None:
                model = _load_checkpoint(cfg, cfg.checkpoint, mesh, page_size, cache_dtype)
            else:
                model = TinyModel(
                    TinyConfig(kind=cfg.model, cache_dtype=cache_dtype, seed=cfg.seed, attention=cfg.attention), mesh
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
        layout = jaxkv.RowLayout.of(model.cache_params, tp=cfg.tp)
        # A fresh disk tier each run, in a directory the demo creates and removes (never one it did not create).
        disk_dir = Path(tempfile.mkdtemp(prefix="disk-", dir=out))
        stack.callback(shutil.rmtree, disk_dir, ignore_errors=True)
        return _serve(cfg, jax, jaxkv, model, events, layout, disk_dir, out, devices, shared)


def _load_checkpoint(cfg: DemoConfig, directory: str, mesh, page_size: int, cache_dtype: str):
    """`--checkpoint`'s model; DemoError when the hf extra is missing (ValueError for a checkpoint that does not fit)."""
    try:
        import jaxkv.hf
    except ImportError as e:
        raise DemoError(f"--checkpoint needs the hf extra (pip install 'jaxkv[hf]'): {e}") from e
    return jaxkv.hf.load_checkpoint(
        directory, mesh, page_size=page_size, cache_dtype=cache_dtype, attention=cfg.attention
    )


def _serve(cfg, jax, jaxkv, model, events, layout, disk_dir, out, devices, shared) -> dict:
    from jaxkv.attention.xla import resolve_impl
    from jaxkv.layout.pages import bucket
    from jaxkv.models import MIN_PREFILL_TOKENS

    page_size = layout.page_size
    # The stack under test: `device_pages` pages on the device, host memory and disk behind them (and with
    # --remote, the shared server behind those).
    cache = model.allocate_cache(cfg.device_pages)
    # The store (scheduler side) indexes the tiers; the worker owns their bytes and moves pages.
    disk_bytes = _disk_capacity(cfg, disk_dir, layout.row_bytes)
    store, worker = jaxkv.open_tiers(
        cache,
        cfg.host_pages * layout.row_bytes,
        disk_directory=disk_dir,
        disk_capacity_bytes=disk_bytes,
        tiers=[] if shared is None else [shared.tier()],
    )
    manager = jaxkv.PagedKVCacheManager(model.cache_params, store, num_pages=cfg.device_pages, tp=cfg.tp, seed=cfg.seed)
    # The baseline recomputes every prompt from scratch, on a cache of the same shape (so it runs the
    # same compiled programs at the same cost per step: a step's cost grows with the cache's size).
    state = {"main": cache, "baseline": model.allocate_cache(cfg.device_pages)}
    baseline = jaxkv.PagedKVCacheManager(state["baseline"], seed=cfg.seed)
    # The shadow stack has room for every block of the run, so its pages never leave the device.
    total_tokens = sum(len(p) + len(r) for _, p, r in events)
    shadow_pages = 2 * math.ceil(total_tokens / page_size) + 2 * math.ceil(cfg.max_prompt_tokens() / page_size) + 2
    state["shadow"] = model.allocate_cache(shadow_pages)
    shadow = jaxkv.PagedKVCacheManager(state["shadow"], seed=cfg.seed)
    width = bucket(math.ceil(cfg.max_prompt_tokens() / page_size))

    def step(which, mgr, rid, tokens, start) -> np.ndarray:
        logits, state[which] = model.prefill(
            state[which], np.asarray(tokens, np.int32), start, mgr.page_table(rid, width=width)
        )
        return np.asarray(logits)  # waits for the result

    def warm_transfers(which, worker) -> None:
        """Compile `worker`'s transfer buckets. Its pages and host slots are all free: these bytes are never read."""
        for k in sorted({bucket(n) for n in range(1, min(cfg.host_pages, cfg.device_pages - 1) + 1)}):
            k = min(k, cfg.host_pages, cfg.device_pages - 1)
            ids = np.arange(1, k + 1)
            worker.engine.d2h(state[which], ids, np.arange(k)).synchronize()
            state[which], t = worker.engine.h2d(state[which], np.arange(k), ids)
            t.synchronize()

    def serve(which, mgr, worker, request, conversation, turn, prompt, reply, own) -> tuple[dict, bool | None]:
        """One turn on stack `which` and on the shadow stack: its record, and whether its logits equal the
        shadow's bit for bit (None: not compared, as its prefix did not come from outside the device, the
        shadow reused a different number of tokens, or it read a block in `own`).

        `own` (None: not tracked): hashes of the blocks whose copy on this stack's device or in its host memory
        holds bytes this stack computed itself, kept up to date here.
        """
        rid = f"c{conversation}-r{request}"
        t0 = time.perf_counter()
        req = mgr.add_request(rid, prompt)
        load_s = 0.0
        if req.load is not None:
            load = req.load
            state[which], handle = worker.load(state[which], load)
            result = handle.result()
            mgr.complete_load(result)  # waits for the copy; a refusal means recomputing
            load_s = time.perf_counter() - t0
            if own is not None and result.status == "loaded":  # the server's copy now, on device and in host memory
                served = zip(load.block_hashes, load.sources, strict=True)
                own.difference_update(h for h, src in served if src != load.host)
        logits = step(which, mgr, rid, prompt[req.num_cached_tokens :], req.num_cached_tokens)
        reuse_s = time.perf_counter() - t0  # the load's wait included

        sreq = shadow.add_request(rid, prompt)
        slogits = step("shadow", shadow, rid, prompt[sreq.num_cached_tokens :], sreq.num_cached_tokens)
        same = None
        cached_blocks = req.num_cached_tokens // page_size
        if (
            req.num_cached_tokens > req.tokens_from_device
            and sreq.num_cached_tokens == req.num_cached_tokens
            and (own is None or own.isdisjoint(req.block_hashes[:cached_blocks]))
        ):
            same = bool(np.array_equal(logits.view(np.uint32), slogits.view(np.uint32)))

        # Decode the reply one token at a time (teacher-forced: the same turns on both stacks).
        pos = len(prompt)
        for tok in reply:
            for w, m in ((which, mgr), ("shadow", shadow)):
                m.append_tokens(rid, [tok])
                step(w, m, rid, [tok], pos)
            pos += 1
        plan = mgr.commit(rid, pos)
        if plan is not None:
            mgr.complete_store(worker.store(state[which], plan).result())
        if own is not None:  # the blocks this turn computed that the device now indexes (and host memory stores)
            new = range(cached_blocks, req.num_committed_blocks)
            own.update(req.block_hashes[j] for j in new if mgr.pool.lookup(req.block_hashes[j]) == req.pages[j])
        shadow.commit(rid, pos)
        mgr.finish(rid)
        shadow.finish(rid)
        record = dict(
            request=request,
            conversation=conversation,
            turn=turn,
            prompt_tokens=len(prompt),
            tokens_from={s: req.tokens_from.get(s, 0) for s in mgr.sources},
            recomputed=len(prompt) - req.num_cached_tokens,
            prefill_seconds=reuse_s,
            load_seconds=load_s,
        )
        return record, same

    def run(which, mgr, worker, second: bool) -> tuple[list[dict], dict[int, bool], float]:
        """Serve every turn on stack `which`: the turns' records, {request: bit-identical} of the turns compared
        with the shadow stack, the seconds. The first instance also times the baseline's full recomputation."""
        progress = Progress(len(events), cfg.progress)
        turns, compared, turn_of = [], {}, {}
        own = set() if second else None
        t_run = time.perf_counter()
        for i, (conv, prompt, reply) in enumerate(events):
            turn_of[conv] = turn_of.get(conv, 0) + 1
            record, same = serve(which, mgr, worker, i, conv, turn_of[conv], prompt, reply, own)
            if same is not None:
                compared[i] = same
            if not second:  # full recomputation of the same prompt: a salted request shares no block
                rid = f"c{conv}-r{i}"
                baseline.add_request(rid, prompt, cache_salt="no-reuse")
                t1 = time.perf_counter()
                step("baseline", baseline, rid, prompt, 0)
                record["full_prefill_seconds"] = time.perf_counter() - t1
                baseline.finish(rid)
            turns.append(record)
            cached = sum(sum(t["tokens_from"].values()) for t in turns)
            progress.update(
                i + 1,
                f"{'second instance: ' if second else ''}hit rate {cached / sum(t['prompt_tokens'] for t in turns):.0%}",
            )
        return turns, compared, time.perf_counter() - t_run

    # Compile outside the timed turns: every prompt-length bucket, for both cache shapes (on the
    # baseline and shadow stacks, with their own salt: nothing they cache is ever served), and the
    # worker's transfer buckets.
    compiles = _CompileCounter(jax)
    t_compile = time.perf_counter()
    sizes = range(1, cfg.max_prompt_tokens() + 1)
    for b in sorted({1 if n == 1 else max(bucket(n), MIN_PREFILL_TOKENS) for n in sizes}):
        n = min(b, cfg.max_prompt_tokens())
        for which, mgr in (("baseline", baseline), ("shadow", shadow)):
            mgr.add_request("warmup", np.zeros(n, np.int32), cache_salt="warmup")
            step(which, mgr, "warmup", np.zeros(n, np.int32), 0)
            mgr.finish("warmup")
    warm_transfers("main", worker)
    compile_seconds = time.perf_counter() - t_compile
    compiled = compiles.snapshot()

    sources = manager.sources  # 'device', then the tiers in order
    per_turn, compared, run_seconds = run("main", manager, worker, second=False)
    worker.close()  # waits for transfers in flight, closes the tiers
    store.close()

    st = store.metrics
    row = layout.row_bytes
    lower = store.tier_names[1:]
    lower_write_s = sum(st.tiers[n].write_seconds for n in lower)
    lower_read_s = sum(st.tiers[n].read_seconds for n in lower)
    # Logical bytes: one copy of each page (an MLA page reaches every TP shard, but is one page).
    moved = {
        "device_to_host": (st.offload_bytes, st.offload_seconds - lower_write_s),
        "host_to_device": (
            sum(st.tiers[n].blocks_loaded for n in store.tier_names) * row,
            st.load_seconds - lower_read_s,
        ),
    }
    for n in lower:
        moved[f"host_to_{n}"] = (st.tiers[n].bytes_written, st.tiers[n].write_seconds)
        moved[f"{n}_to_host"] = (st.tiers[n].bytes_read, st.tiers[n].read_seconds)
    tokens = _tally(per_turn, sources)
    prompt_tokens = sum(t["prompt_tokens"] for t in per_turn)
    config = dataclasses.asdict(cfg)
    if cfg.remote is None:
        del config["remote"]  # the one-instance report stays as it was before --remote existed
    report = {
        "config": config,
        "conditions": {
            "jax": jax.__version__,
            "backend": devices[0].platform,
            "devices": len(devices),
            "tp": cfg.tp,
            "model": dataclasses.asdict(model.config),
            "row_bytes": row,
            "shadow_device_pages": shadow_pages,
            "attention": resolve_impl(cfg.attention),
            "disk_capacity_bytes": disk_bytes,
        },
        "requests": len(events),
        "prompt_tokens": prompt_tokens,
        "sources": sources,
        "tokens": tokens,
        "hit_rate": (prompt_tokens - tokens["recomputed"]) / prompt_tokens,
        "prefill_seconds_with_reuse": sum(t["prefill_seconds"] for t in per_turn),
        "load_seconds": sum(t["load_seconds"] for t in per_turn),
        "prefill_seconds_full_recompute": sum(t["full_prefill_seconds"] for t in per_turn),
        "bytes": {d: b for d, (b, _) in moved.items()},
        "seconds": {d: s for d, (_, s) in moved.items()} | {"compile": compile_seconds, "run": run_seconds},
        "compiled_programs": compiled,
        "loads": {"refused": manager.metrics.loads_refused, "failed": manager.metrics.loads_failed},
        "evictions": {"device": manager.pool.evictions} | {n: st.tiers[n].evictions for n in store.tier_names},
        "bit_identity": {"turns_compared": len(compared), "identical": sum(compared.values())},
        "turns": per_turn,
    }

    if shared is not None:
        # A second instance starts cold: a fresh device cache and host memory, no disk, its own connection to
        # the same server under the same prefix. The shadow stack now holds every block of the run on the
        # device, as the server does, so it reuses as many tokens as the second instance finds there. A block the
        # second instance computes itself (the one holding a prompt's last token, always recomputed) comes from
        # another prefill split than the shadow's copy, so its last bits may differ: a turn that reads one is not
        # compared (`own` in `serve`).
        del state["main"], state["baseline"], cache, worker, manager, store  # the first instance is gone
        state["second"] = model.allocate_cache(cfg.device_pages)
        store, worker = jaxkv.open_tiers(state["second"], cfg.host_pages * row, tiers=[shared.tier()])
        manager = jaxkv.PagedKVCacheManager(
            model.cache_params, store, num_pages=cfg.device_pages, tp=cfg.tp, seed=cfg.seed
        )
        t_compile = time.perf_counter()
        warm_transfers("second", worker)
        compile_seconds = time.perf_counter() - t_compile
        turns, compared, run_seconds = run("second", manager, worker, second=True)
        worker.close()
        store.close()
        remote, rm = worker.tiers["remote"], store.metrics.tiers["remote"]
        tokens = _tally(turns, manager.sources)
        report["second_instance"] = {
            "remote": shared.describe(),
            "requests": len(turns),
            "prompt_tokens": prompt_tokens,
            "sources": manager.sources,
            "tokens": tokens,
            "hit_rate": (prompt_tokens - tokens["recomputed"]) / prompt_tokens,
            "prefill_seconds_with_reuse": sum(t["prefill_seconds"] for t in turns),
            "load_seconds": sum(t["load_seconds"] for t in turns),
            # The same prompts on a cache of the same shape: the first instance's baseline is this one's too.
            "prefill_seconds_full_recompute": report["prefill_seconds_full_recompute"],
            "bytes": {"remote_to_host": rm.bytes_read},
            "seconds": {"remote_to_host": rm.read_seconds, "compile": compile_seconds, "run": run_seconds},
            "loads": {"refused": manager.metrics.loads_refused, "failed": manager.metrics.loads_failed},
            "remote_errors": {"unavailable": remote.unavailable, "corrupt": remote.corrupt},
            "bit_identity": {
                "turns_compared": len(compared),
                "identical": sum(compared.values()),
                "from_remote": sum(turns[i]["tokens_from"]["remote"] > 0 for i in compared),
            },
            "turns": turns,
        }

    plt = _pyplot()
    report["plot"] = None if plt is None else "demo.png"  # None: matplotlib (the `demo` extra) is not installed
    _write_atomically(out / "report.json", json.dumps(report, indent=2) + "\n")
    if plt is not None:
        _plot(plt, report, out / "demo.png")
    return report


def _tally(turns: list[dict], sources: list[str]) -> dict:
    """Prompt tokens of `turns` per source, then 'recomputed'."""
    tokens = {s: sum(t["tokens_from"][s] for t in turns) for s in sources}
    tokens["recomputed"] = sum(t["recomputed"] for t in turns)
    return tokens


class _CompileCounter:
    """Counts the programs XLA compiles (and those the persistent compilation cache served) from now on."""

    def __init__(self, jax):
        import jax.monitoring

        self._monitoring = jax.monitoring
        self.requests = self.hits = 0
        jax.monitoring.register_event_listener(self._on_event)
        jax.monitoring.register_event_duration_secs_listener(self._on_duration)

    def _on_event(self, event, **_):
        if event == "/jax/compilation_cache/cache_hits":
            self.hits += 1

    def _on_duration(self, event, duration_secs, **_):
        if event == "/jax/core/compile/backend_compile_duration":
            self.requests += 1  # one per program, compiled or loaded from the persistent cache

    def snapshot(self) -> dict:
        """{'programs': compiled or loaded, 'from_persistent_cache': of those, loaded}; stops counting."""
        self._monitoring.unregister_event_listener(self._on_event)
        self._monitoring.unregister_event_duration_listener(self._on_duration)
        return {"programs": self.requests, "from_persistent_cache": self.hits}


def _attention(r: dict) -> str:
    """'xla attention', 'xla attention (auto)', 'pallas attention': the implementation that ran."""
    ran = r["conditions"].get("attention", r["config"]["attention"])
    return f"{ran} attention" + (" (auto)" if r["config"]["attention"] == "auto" else "")


def _disk(r: dict) -> str:
    """'512 MiB', or '512 MiB asked, 97 MiB (the free space under --out)' when the tier was cut to fit."""
    asked = r["config"]["disk_mib"]
    got = r["conditions"].get("disk_capacity_bytes", asked << 20)
    return f"{asked} MiB" if got == asked << 20 else f"{asked} MiB asked, {got >> 20} MiB (the free space under --out)"


def format_report(r: dict) -> str:
    """The table `jaxkv demo` prints. Every figure counts the listed turns only (no warm-up)."""
    pt = r["prompt_tokens"]

    def gbps(direction):
        s = r["seconds"][direction]
        return r["bytes"][direction] / s / 1e9 if s > 0 else 0.0

    c = r["conditions"]
    bi = r["bit_identity"]
    cfg = r["config"]
    second = r.get("second_instance")
    remote = "" if second is None else f", remote: {second['remote']['server']} at {second['remote']['url']}"
    lines = [
        f"jaxkv demo: {cfg['model']} model, {cfg['dtype']} cache, {_attention(r)}, TP {c['tp']} on "
        f"{c['devices']} {c['backend']} devices (jax {c['jax']})",
        f"  {r['requests']} requests, {pt:,} prompt tokens; device cache {cfg['device_pages']} pages, "
        f"host {cfg['host_pages']} pages, disk {_disk(r)}{remote}",
        "",
        *_served(r),
        "",
        f"  {'direction':<16}{'MiB':>10}{'GB/s':>9}   (one copy of each page)",
    ]
    for d in r["bytes"]:
        lines.append(f"  {d.replace('_', ' '):<16}{r['bytes'][d] / 2**20:>10.1f}{gbps(d):>9.2f}")
    ev = ", ".join(f"{k} {v}" for k, v in r["evictions"].items())
    cp = r["compiled_programs"]
    cached = f", {cp['from_persistent_cache']} from the compilation cache" if cp["from_persistent_cache"] else ""
    lines += [
        "",
        f"  logits after host/disk round trips vs pages that never left the device: "
        f"{bi['identical']}/{bi['turns_compared']} turns {_verdict(bi)}",
        f"  evictions: {ev}",
        f"  compile {r['seconds']['compile']:.1f} s ({cp['programs']} programs{cached}), run {r['seconds']['run']:.1f} s",
    ]
    if second is not None:
        bi, sec = second["bit_identity"], second["seconds"]
        read = second["bytes"]["remote_to_host"]
        rate = read / sec["remote_to_host"] / 1e9 if sec["remote_to_host"] > 0 else 0.0
        errors = ", ".join(f"{k} {v}" for k, v in second["remote_errors"].items())
        lines += [
            "",
            "  second instance, started cold (its own device cache and host memory, no disk), same server and prefix:",
            *_served(second, full_note="the first instance's, same prompts"),
            f"  {'remote to host':<34}{read / 2**20:>8.1f} MiB  {rate:.2f} GB/s; remote errors: {errors}",
            f"  logits after remote round trips vs pages that never left the device: "
            f"{bi['identical']}/{bi['turns_compared']} turns {_verdict(bi)} ({bi['from_remote']} with remote blocks)",
            f"  warm-up {sec['compile']:.1f} s, run {sec['run']:.1f} s",
        ]
    return "\n".join(lines)


_SOURCE_LABEL = {"device": "device", "host": "host memory"}


def _served(r: dict, full_note: str = "") -> list[str]:
    """Lines of a report (or its second instance): prompt tokens per source, then prefill times."""
    tok, pt = r["tokens"], r["prompt_tokens"]
    sources: list[str] = r["sources"]
    lines = [
        f"  {'tokens served from ' + _SOURCE_LABEL.get(s, s):<34}{tok[s]:>9,}  {tok[s] / pt:6.1%}" for s in sources
    ]
    full, reuse = r["prefill_seconds_full_recompute"], r["prefill_seconds_with_reuse"]
    note = f"{full_note}; " if full_note else ""
    return lines + [
        f"  {'tokens recomputed':<34}{tok['recomputed']:>9,}  {tok['recomputed'] / pt:6.1%}",
        "",
        f"  {'prefill time with reuse':<34}{reuse:>8.2f} s  (of which waiting for loads {r['load_seconds']:.2f} s)",
        f"  {'prefill time, full recomputation':<34}{full:>8.2f} s  ({note}{full / max(reuse, 1e-9):.1f}x)",
    ]


def _verdict(bit_identity: dict) -> str:
    return "bit-identical" if bit_identity["identical"] == bit_identity["turns_compared"] else "MISMATCH"


PLOT_EXTRA = "pip install 'jaxkv[demo]'"
"""What installs matplotlib, which only demo.png needs: jaxkv itself never imports it."""


def _pyplot():
    """matplotlib.pyplot on the Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot(plt, r: dict, path: Path) -> None:
    turns = r["turns"]
    x = np.arange(1, len(turns) + 1)
    prompt = np.cumsum([t["prompt_tokens"] for t in turns])
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.8))
    bottom = np.zeros(len(turns))
    for i, source in enumerate(r["sources"]):
        frac = np.cumsum([t["tokens_from"][source] for t in turns]) / prompt
        a.fill_between(x, bottom, bottom + frac, label=source, color=f"C{i}", step="mid")
        bottom = bottom + frac
    a.set_xlabel("request")
    a.set_ylabel("cumulative fraction of prompt tokens")
    a.set_title("hit rate by tier over the run")
    a.set_ylim(0, 1)
    a.legend(loc="lower right", fontsize=8)
    b.plot(x, [t["full_prefill_seconds"] * 1e3 for t in turns], ".", color="0.5", label="full recomputation")
    b.plot(x, [t["prefill_seconds"] * 1e3 for t in turns], ".", color="C3", label="with reuse (incl. loads)")
    b.set_xlabel("request")
    b.set_ylabel("prefill ms")
    b.set_title("time per request")
    b.legend(fontsize=8)
    fig.suptitle(
        f"jaxkv demo: {r['config']['model']} {r['config']['dtype']}, {_attention(r)}, TP {r['conditions']['tp']}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
