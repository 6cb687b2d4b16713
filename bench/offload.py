"""OffloadEngine throughput: batched page moves between the device cache and the host pool.

    python bench/offload.py [--quick] [--steps-only] [--out-json NAME]

For MHA and MLA caches (TP 4, bfloat16) over a range of page sizes (host row
bytes, `engine.row_bytes`) and batches, measures in one run:

- D2H: `engine.d2h(cache, ids, slots).synchronize()`, random page ids into
  random host slots. On CPU both paths ("host" and "xla"); elsewhere only "xla".
- H2D: `engine.h2d(cache, slots, ids)`, the donated cache threaded through.
- The limit, same run, same bytes: a numpy copy between preallocated arrays;
  on a GPU also a plain `jax.device_put` of one contiguous buffer between
  device and pinned host memory, which is then the limit the ratios use.
- The "arrays" host backend (`HostTier(backend="arrays")`, the GPU/TPU
  default): the same D2H and H2D with each host row held as per-unit
  `[1, bytes_per_page]` arrays in pinned_host memory, gathered into and
  scattered from by the engine's jitted programs; read against
  `jax.device_put` of one contiguous buffer of the same bytes device <->
  pinned_host, measured on every backend (on CPU pinned_host exists too).
- A naive baseline (batches of <= 64 pages): a Python loop over pages,
  `jax.device_get(unit.shard[pid])` into a numpy pool row for D2H, and a
  non-donated `cache.values.at[pid].set(page)` per page for H2D.
- Peak host memory (VmHWM) of one H2D (and D2H) in a large cache, numpy pool and arrays rows.
- Between the user's own steps (`--steps-only` runs just this): MHA, 256 KiB
  rows, 16-48 MiB batches, each transfer after a jitted, donated
  `jaxkv.paged_attention` decode step, interleaved with `np.copyto` of the
  same bytes (issue 24's scenario; goal >= 0.9x).

GB/s counts page bytes moved: k * engine.row_bytes (an MLA row is counted once,
though H2D writes it to every TP replica). Results: bench/results/NAME.json and
docs/NAME.png.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import time
from functools import partial
from pathlib import Path

import _common
import numpy as np

_common.setup_devices()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jaxkv  # noqa: E402

KIB, MIB, GIB = 2**10, 2**20, 2**30
DTYPE = jnp.bfloat16
LAYOUTS = {
    "MHA": dict(n_kv_heads=8, head_dim=128, is_mla=False),
    "MLA": dict(n_kv_heads=1, head_dim=512, is_mla=True),
}
MAX_BATCH_BYTES = 512 * MIB  # skip (page size, batch) pairs that move more per batch
ARRAYS_QUICK_BATCHES = (64,)  # --quick times the arrays rows at these batches only (each bucket compiles k outputs)
NAIVE_MAX_BATCH = 64  # the naive loops are timed only up to this batch
NAIVE_H2D_COPY_BUDGET = 2 * GIB  # naive H2D copies the whole cache per page: time at most this many bytes of it
TARGET_MIN_BATCH, TARGET_MIN_PAGE = 64, 64 * KIB
TARGETS = {"d2h_limit": 0.8, "h2d_limit": 0.7, "d2h_naive": 10.0, "h2d_naive": 10.0}
ROOT = Path(__file__).resolve().parent.parent


def params_for(layout: str, row_bytes: int, tp: int) -> jaxkv.KVCacheParams:
    """A cache whose host row (one page of every unit) is `row_bytes`: 16-token pages, layers set the size."""
    one = jaxkv.KVCacheParams(DTYPE, num_layers=1, page_size=1, **LAYOUTS[layout])
    token_layers = row_bytes // one.host_bytes_per_page(tp)  # MHA 4 KiB, MLA 1 KiB per token and layer
    page_size = min(16, token_layers)
    params = jaxkv.KVCacheParams(DTYPE, num_layers=token_layers // page_size, page_size=page_size, **LAYOUTS[layout])
    assert params.host_bytes_per_page(tp) == row_bytes, (layout, row_bytes, params)
    return params


def timing(nbytes: int, quick: bool) -> dict:
    """Repeats and warm-up calls for one measurement of `nbytes`."""
    if quick:
        return dict(repeats=3, warmup=1)
    if nbytes <= 4 * MIB:
        return dict(repeats=9, warmup=2)
    if nbytes <= 64 * MIB:
        return dict(repeats=5, warmup=2)
    return dict(repeats=3, warmup=1)


# -- memory readings (Linux) ---------------------------------------------------
def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _malloc_trim() -> None:
    """Hand freed heap memory back to the OS (glibc), so RSS before a call counts live memory only."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def peak_during(fn) -> tuple[float, float]:
    """(peak RSS - RSS before, RSS after - RSS before) of `fn()`, in MiB (after: still held once trimmed).

    Freed heap is trimmed first: otherwise a warm-up call's temporaries, kept by
    malloc, would be reused unseen and the peak would read 0.
    """
    gc.collect()
    _malloc_trim()
    before = _status_kib("VmRSS")
    reset_peak_rss()
    fn()
    peak = _status_kib("VmHWM")
    gc.collect()
    _malloc_trim()
    after = _status_kib("VmRSS")
    kept = (after - before) / 1024
    return (peak - before) / 1024, 0.0 if abs(kept) < 0.05 else kept  # no '-0.0' for page-sized noise


# -- baselines -------------------------------------------------------------------
def numpy_copy_seconds(nbytes: int, quick: bool) -> float:
    src = np.ones(nbytes, np.uint8)
    dst = np.empty_like(src)
    return _common.median_seconds(lambda: np.copyto(dst, src), **timing(nbytes, quick))


def device_put_seconds(nbytes: int, device, quick: bool) -> tuple[float, float]:
    """(device -> pinned_host, pinned_host -> device) seconds for one contiguous buffer."""
    x = jax.device_put(np.ones(nbytes, np.uint8), device)
    to_host = x.sharding.with_memory_kind("pinned_host")
    to_device = x.sharding.with_memory_kind("device")
    xh = jax.device_put(x, to_host).block_until_ready()
    d2h = _common.median_seconds(lambda: jax.device_put(x, to_host).block_until_ready(), **timing(nbytes, quick))
    h2d = _common.median_seconds(lambda: jax.device_put(xh, to_device).block_until_ready(), **timing(nbytes, quick))
    return d2h, h2d


def arrays_engine(buffer, num_slots: int) -> jaxkv.OffloadEngine:
    """An engine whose host rows are an open "arrays" `HostTier` of `num_slots` rows (what a worker builds off CPU)."""
    layout = jaxkv.RowLayout.of(buffer)
    tier = jaxkv.HostTier(num_slots * layout.row_bytes, backend="arrays")
    tier.open(layout)
    return jaxkv.OffloadEngine(buffer, host_rows=tier)


def naive_d2h(units, offsets, ids, slots, pool) -> None:
    """One page of one unit at a time: slice on device, device_get, write into the pool row."""
    for slot, pid in zip(slots.tolist(), ids.tolist(), strict=True):
        for unit, off in zip(units, offsets, strict=True):
            page = np.asarray(jax.device_get(unit.shard[pid]))
            pool[slot, off : off + unit.bytes_per_page] = page.reshape(-1).view(np.uint8)


def naive_h2d(values: jax.Array, pool, slots, ids, n_shards: int) -> jax.Array:
    """One page at a time: host row -> typed global page -> non-donated `values.at[pid].set`."""
    kv, layers, tokens, heads, dim = values.shape[1:]
    spec = tuple(values.sharding.spec) + (None,) * (values.ndim - len(values.sharding.spec))
    page_sharding = NamedSharding(values.sharding.mesh, P(*spec[1:]))
    for slot, pid in zip(slots.tolist(), ids.tolist(), strict=True):
        shards = pool[slot].view(values.dtype).reshape(n_shards, kv, layers, tokens, heads // n_shards, dim)
        page = shards.transpose(1, 2, 3, 0, 4, 5).reshape(values.shape[1:])
        values = values.at[pid].set(jax.device_put(page, page_sharding))
    return values.block_until_ready()


# -- correctness spot check ------------------------------------------------------
def check_round_trip(layout: str, mesh, tp: int, paths: list[str]) -> None:
    """Random bits through d2h (every path) and h2d, compared byte for byte with numpy."""
    params = params_for(layout, 64 * KIB, tp)
    num_pages, k = 8, 5  # k not a power of two: exercises the bucket padding
    rng = np.random.default_rng(1)
    sharding = jaxkv.allocate_buffer(params, mesh, 1).values.sharding
    shape = (num_pages, params.kv_dim, params.num_layers, params.page_size, params.n_kv_heads, params.head_dim)
    values = rng.integers(0, 2**16, size=shape, dtype=np.uint16).view(DTYPE)
    buffer = jaxkv.KVCacheBuffer(params.replicated(tp), jax.device_put(values, sharding))
    n_shards = 1 if params.replicated(tp) else tp
    h = params.n_kv_heads // n_shards

    def row(page: int) -> np.ndarray:
        return np.concatenate(
            [
                np.ascontiguousarray(values[page, :, :, :, s * h : (s + 1) * h]).reshape(-1).view(np.uint8)
                for s in range(n_shards)
            ]
        )

    ids = rng.permutation(num_pages)[:k].astype(np.int32)
    slots = rng.permutation(k).astype(np.int32)
    engines = [jaxkv.OffloadEngine(buffer, k, d2h_path=p) for p in paths]
    for eng in engines:
        eng.d2h(buffer, ids, slots).synchronize()
        for i in range(k):
            if not np.array_equal(eng.host_pool[slots[i]], row(ids[i])):
                raise AssertionError(f"{layout} d2h ({eng.d2h_path}): host slot {slots[i]} != device page {ids[i]}")
    arrays = arrays_engine(buffer, k)
    arrays.d2h(buffer, ids, slots).synchronize()
    for i in range(k):
        if not np.array_equal(arrays.read_host([slots[i]])[0], row(ids[i])):
            raise AssertionError(f"{layout} d2h (arrays): host slot {slots[i]} != device page {ids[i]}")
    for eng in (engines[-1], arrays):
        new_ids = rng.permutation(num_pages)[:k].astype(np.int32)
        buffer, t = eng.h2d(buffer, slots, new_ids)
        t.synchronize()
        for shard in buffer.values.addressable_shards:
            got = np.asarray(shard.data)
            for i in range(k):
                want = values[ids[i]][shard.index[1:]]
                if not np.array_equal(got[new_ids[i]].view(np.uint16), want.view(np.uint16)):
                    raise AssertionError(
                        f"{layout} h2d ({eng.h2d_path}): page {new_ids[i]} on {shard.device} != source page {ids[i]}"
                    )
        del got


# -- throughput ------------------------------------------------------------------
def bench_one(layout: str, mesh, tp: int, row_bytes: int, k: int, *, quick: bool, rng) -> dict:
    platform = jax.devices()[0].platform
    params = params_for(layout, row_bytes, tp)
    num_pages = 2 * k
    nbytes = k * row_bytes
    reps = timing(nbytes, quick)
    r = dict(
        layout=layout,
        page_kib=row_bytes / KIB,
        layers=params.num_layers,
        page_size=params.page_size,
        batch=k,
        mib=nbytes / MIB,
        cache_mib=params.bytes_per_page(tp) * num_pages / MIB,
    )
    r["copy_gbps"] = _common.gbps(nbytes, numpy_copy_seconds(nbytes, quick))
    # A replicated (MLA) load writes each page to every TP shard: its limit is
    # copying tp times the page bytes, expressed per page byte like the rest.
    writes = tp if params.replicated(tp) else 1
    r["copy_h2d_gbps"] = (
        r["copy_gbps"] if writes == 1 else _common.gbps(nbytes, numpy_copy_seconds(writes * nbytes, quick))
    )
    # The "arrays" backend's limit on every backend (issue 13); off CPU also the numpy pool's.
    d2h_s, h2d_s = device_put_seconds(nbytes, jax.devices()[0], quick)
    r["put_d2h_gbps"], r["put_h2d_gbps"] = _common.gbps(nbytes, d2h_s), _common.gbps(nbytes, h2d_s)

    buffer = jaxkv.allocate_buffer(params, mesh, num_pages)
    buffer.values.block_until_ready()
    ids = rng.permutation(num_pages)[:k].astype(np.int32)
    slots = rng.permutation(k).astype(np.int32)

    paths = ["host", "xla"] if platform == "cpu" else ["xla"]
    for path in paths:
        eng = jaxkv.OffloadEngine(buffer, k, d2h_path=path)
        assert eng.row_bytes == row_bytes, (eng.row_bytes, row_bytes)
        seconds = _common.median_seconds(lambda eng=eng, cache=buffer: eng.d2h(cache, ids, slots).synchronize(), **reps)
        r[f"d2h_{path}_gbps"] = _common.gbps(nbytes, seconds)
    # `eng` (the last, "xla" engine) now holds the pages in its pool and does the H2D.

    if k <= NAIVE_MAX_BATCH:
        units, pool = buffer.to_memory(), np.zeros((k, row_bytes), np.uint8)
        seconds = _common.median_seconds(
            lambda: naive_d2h(units, eng.unit_offsets, ids, slots, pool), repeats=reps["repeats"], warmup=1
        )
        r["naive_d2h_gbps"] = _common.gbps(nbytes, seconds)
        assert np.array_equal(pool[slots], eng.host_pool[slots]), "naive d2h and engine d2h disagree"
        del units, pool

    # The "arrays" backend: D2H gathers into fresh pinned_host row arrays, H2D scatters from them.
    arr = None if quick and k not in ARRAYS_QUICK_BATCHES else arrays_engine(buffer, k)
    if arr is None:
        r["d2h_arrays_gbps"] = r["h2d_arrays_gbps"] = None
        r["put_d2h_gbps"] = r["put_h2d_gbps"] = r["put_d2h_gbps"] if platform != "cpu" else None
    else:
        seconds = _common.median_seconds(lambda a=arr, cache=buffer: a.d2h(cache, ids, slots).synchronize(), **reps)
        r["d2h_arrays_gbps"] = _common.gbps(nbytes, seconds)
        if not np.array_equal(arr.read_host(slots), eng.host_pool[slots]):
            raise AssertionError(f"{layout} {row_bytes} B x {k}: arrays d2h and numpy-pool d2h disagree")

    state = [buffer]
    del buffer

    def h2d(engine):
        state[0], t = engine.h2d(state[0], slots, ids)
        t.synchronize()

    r["h2d_gbps"] = _common.gbps(nbytes, _common.median_seconds(lambda: h2d(eng), **reps))
    if arr is not None:
        r["h2d_arrays_gbps"] = _common.gbps(nbytes, _common.median_seconds(lambda a=arr: h2d(a), **reps))

    if k <= NAIVE_MAX_BATCH:
        # Every page copies the whole (non-donated) cache, so the cost per page is flat:
        # time the first n pages, n bounded by a budget of cache bytes copied, and scale to k.
        n_shards = 1 if params.replicated(tp) else tp
        cache_bytes = params.bytes_per_page(tp) * num_pages
        n = max(1, min(k, NAIVE_H2D_COPY_BUDGET // cache_bytes))
        values = state[0].values
        naive_h2d(values, eng.host_pool, slots[:1], ids[:1], n_shards)  # compile
        seconds = _common.median_seconds(
            lambda: naive_h2d(values, eng.host_pool, slots[:n], ids[:n], n_shards),
            repeats=1 if n < k else max(1, reps["repeats"] // 2),
            warmup=0,
        )
        r["naive_h2d_gbps"] = _common.gbps(nbytes, seconds * k / n)
        r["naive_h2d_pages_timed"] = n
        del values

    r["d2h_gbps"] = r["d2h_host_gbps"] if platform == "cpu" else r["d2h_xla_gbps"]
    limit_d2h = r["copy_gbps"] if platform == "cpu" else r["put_d2h_gbps"]
    limit_h2d = r["copy_h2d_gbps"] if platform == "cpu" else r["put_h2d_gbps"]
    r["d2h_limit"] = _common.ratio(r["d2h_gbps"], limit_d2h)
    r["d2h_xla_limit"] = _common.ratio(r["d2h_xla_gbps"], limit_d2h)
    r["h2d_limit"] = _common.ratio(r["h2d_gbps"], limit_h2d)
    r["d2h_arrays_put"] = _common.ratio(r["d2h_arrays_gbps"], r["put_d2h_gbps"])
    r["h2d_arrays_put"] = _common.ratio(r["h2d_arrays_gbps"], r["put_h2d_gbps"])
    r["d2h_naive"] = _common.ratio(r["d2h_gbps"], r.get("naive_d2h_gbps"))
    r["h2d_naive"] = _common.ratio(r["h2d_gbps"], r.get("naive_h2d_gbps"))
    return r  # the cache, engines and pools go with this frame


def bench_throughput(layout, mesh, tp, page_kibs, batches, *, quick) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for kib in page_kibs:
        for k in batches:
            if k * kib * KIB > MAX_BATCH_BYTES:
                continue
            rows.append(bench_one(layout, mesh, tp, kib * KIB, k, quick=quick, rng=rng))
            gc.collect()
            print(".", end="", flush=True)
    return rows


STEP_ROW = 256 * KIB
STEP_BATCHES = (64, 96, 128, 192)  # 16-48 MiB: from half a 32 MiB L3 to past a 48 MiB one
STEP_GOAL = 0.9  # issue 24: >= 0.9x np.copyto at >= 16 MiB batches


def bench_between_steps(mesh, tp: int, batches, *, repeats: int) -> list[dict]:
    """D2H and H2D of MHA pages with the user's own donated decode step before every transfer (issue 24).

    The step is `jaxkv.paged_attention` writing one token and attending over
    one page, in a jit that donates the cache, as a serving loop runs it. Per
    round, interleaved: step, D2H (timed); step, H2D (timed); np.copyto of
    the same bytes (timed); the medians of `repeats` rounds.
    """
    params = params_for("MHA", STEP_ROW, tp)
    heads, dim = params.n_kv_heads, params.head_dim
    q = jnp.ones((1, 1, heads, dim), DTYPE)
    table, start, lens = jnp.zeros((1, 1), jnp.int32), jnp.zeros((1,), jnp.int32), jnp.ones((1,), jnp.int32)

    @partial(jax.jit, donate_argnums=0)
    def step(cache):
        _, cache = jaxkv.paged_attention(cache, 0, q, q, q, table, start, lens)
        return cache

    rng = np.random.default_rng(24)
    return [steps_case(step, params, mesh, k, rng, repeats) for k in batches]


def steps_case(step, params, mesh, k: int, rng, repeats: int) -> dict:
    """One batch of `bench_between_steps`: k random pages of a 2k-page cache into random slots and back."""
    nbytes = k * STEP_ROW
    state = {"cache": jaxkv.allocate_buffer(params, mesh, 2 * k)}
    engine = jaxkv.OffloadEngine(state["cache"], k)
    ids = rng.permutation(2 * k)[:k].astype(np.int32)
    slots = rng.permutation(k).astype(np.int32)
    src, dst = np.ones(nbytes, np.uint8), np.empty(nbytes, np.uint8)

    def user_step():
        state["cache"] = step(state["cache"])
        jax.block_until_ready(state["cache"])

    def d2h() -> float:
        user_step()
        t0 = time.perf_counter()
        engine.d2h(state["cache"], ids, slots).synchronize()
        return time.perf_counter() - t0

    def h2d() -> float:
        user_step()
        t0 = time.perf_counter()
        state["cache"], t = engine.h2d(state["cache"], slots, ids)
        t.synchronize()
        return time.perf_counter() - t0

    median = _common.interleaved(
        {"d2h": d2h, "h2d": h2d, "copy": _common.timed(lambda: np.copyto(dst, src))}, repeats=repeats
    )
    r = dict(batch=k, mib=nbytes / MIB, **{f"{n}_gbps": _common.gbps(nbytes, s) for n, s in median.items()})
    r["d2h_limit"] = _common.ratio(r["d2h_gbps"], r["copy_gbps"])
    r["h2d_limit"] = _common.ratio(r["h2d_gbps"], r["copy_gbps"])
    r["ok"] = "ok" if min(r["d2h_limit"], r["h2d_limit"]) >= STEP_GOAL else "MISS"
    return r


def print_steps(rows: list[dict], tp: int) -> list[dict]:
    _common.print_table(
        f"between the user's own donated decode steps: MHA TP {tp} bf16, {STEP_ROW // KIB} KiB rows, GB/s of page "
        f"bytes, medians of interleaved rounds; goal D2H and H2D >= {STEP_GOAL}x np.copyto",
        rows,
        [
            ("batch", "pages", "d"),
            ("mib", "MiB", ".0f"),
            ("copy_gbps", "np copy", ".2f"),
            ("d2h_gbps", "D2H", ".2f"),
            ("h2d_gbps", "H2D", ".2f"),
            ("d2h_limit", "D2H/lim", ".2f"),
            ("h2d_limit", "H2D/lim", ".2f"),
            ("ok", "goal", "s"),
        ],
    )
    return rows


def targets(rows: list[dict]) -> list[dict]:
    """Pass/miss for batches >= 64 pages of >= 64 KiB.

    Naive throughput is measured up to 64 pages; larger batches are compared
    with the 64-page naive number of the same page size (the naive D2H loop's
    cost is per page; the naive H2D's grows with the cache, so this favours it).
    """
    naive = {}
    for r in rows:
        if r.get("naive_d2h_gbps") is not None:
            naive[(r["layout"], r["page_kib"])] = (r["naive_d2h_gbps"], r["naive_h2d_gbps"], r["batch"])
    out = []
    for r in rows:
        if r["batch"] < TARGET_MIN_BATCH or r["page_kib"] * KIB < TARGET_MIN_PAGE:
            continue
        nd, nh, nb = naive.get((r["layout"], r["page_kib"]), (None, None, None))
        t = dict(
            layout=r["layout"],
            page_kib=r["page_kib"],
            batch=r["batch"],
            naive_batch=nb,
            d2h_limit=r["d2h_limit"],
            h2d_limit=r["h2d_limit"],
            d2h_naive=_common.ratio(r["d2h_gbps"], nd),
            h2d_naive=_common.ratio(r["h2d_gbps"], nh),
        )
        for key, need in TARGETS.items():
            t[f"{key}_ok"] = None if t[key] is None else ("pass" if t[key] >= need else "MISS")
        out.append(t)
    return out


# -- peak memory -----------------------------------------------------------------
def bench_peak(layout, mesh, tp, cache_bytes, batches, row_bytes, *, arrays_rows: bool = True) -> list[dict]:
    platform = jax.devices()[0].platform
    params = params_for(layout, row_bytes, tp)
    num_pages = cache_bytes // params.bytes_per_page(tp)
    rng = np.random.default_rng(2)
    kmax = max(batches)
    buffer = jaxkv.allocate_buffer(params, mesh, num_pages)
    paths = ["host", "xla"] if platform == "cpu" else ["xla"]
    engines = {p: jaxkv.OffloadEngine(buffer, kmax, d2h_path=p) for p in paths}
    arrays = arrays_engine(buffer, kmax) if arrays_rows else None
    state = [buffer]
    del buffer
    h2d_eng = engines[paths[-1]]
    h2d_eng.host_pool[:] = 1  # touch the pool: its pages count before the measurement, not during it
    plan = {
        k: (rng.permutation(num_pages)[:k].astype(np.int32), rng.permutation(kmax)[:k].astype(np.int32))
        for k in batches
    }

    def h2d(k):
        ids, slots = plan[k]
        state[0], t = h2d_eng.h2d(state[0], slots, ids)
        t.synchronize()

    def d2h(path, k):
        ids, slots = plan[k]
        (arrays if path == "arrays" else engines[path]).d2h(state[0], ids, slots).synchronize()

    def h2d_arrays(k):
        ids, slots = plan[k]
        state[0], t = arrays.h2d(state[0], slots, ids)
        t.synchronize()

    for k in batches:  # compile every bucket and touch every pool first (the arrays rows: filled by a D2H)
        h2d(k)
        for p in [*paths, "arrays"] if arrays_rows else paths:
            d2h(p, k)
        if arrays_rows:
            h2d_arrays(k)
    rows = []
    for k in batches:
        r = dict(
            layout=layout,
            page_kib=row_bytes / KIB,
            cache_mib=params.bytes_per_page(tp) * num_pages / MIB,
            batch=k,
            moved_mib=k * row_bytes / MIB,
        )
        r["h2d_peak_mib"], r["h2d_kept_mib"] = peak_during(lambda k=k: h2d(k))
        for p in paths:
            r[f"d2h_{p}_peak_mib"], _ = peak_during(lambda p=p, k=k: d2h(p, k))
        # arrays: a D2H allocates its k rows (they are the held rows; the slots' old rows are freed).
        if arrays_rows:
            r["d2h_arrays_peak_mib"], r["d2h_arrays_kept_mib"] = peak_during(lambda k=k: d2h("arrays", k))
            r["h2d_arrays_peak_mib"], r["h2d_arrays_kept_mib"] = peak_during(lambda k=k: h2d_arrays(k))
        rows.append(r)
    return rows


# -- plot ------------------------------------------------------------------------
def plot(rows: list[dict], layouts: list[str], path: Path, platform: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(layouts), figsize=(6 * len(layouts), 4.5), squeeze=False)
    for ax, layout in zip(axes[0], layouts, strict=True):
        mine = [r for r in rows if r["layout"] == layout]
        biggest = {}
        for r in mine:
            if r["batch"] <= 256 and r["batch"] >= biggest.get(r["page_kib"], {"batch": 0})["batch"]:
                biggest[r["page_kib"]] = r
        sel = [biggest[p] for p in sorted(biggest)]
        naive = {}
        for r in mine:
            if r.get("naive_d2h_gbps") is not None and r["batch"] >= naive.get(r["page_kib"], {"batch": 0})["batch"]:
                naive[r["page_kib"]] = r
        nsel = [naive[p] for p in sorted(naive)]
        batches = sorted({r["batch"] for r in sel})
        nb = sorted({r["batch"] for r in nsel})
        lines = [
            ("d2h_host_gbps", sel, "D2H engine, host path", "o-"),
            ("d2h_xla_gbps", sel, "D2H engine, xla path", "s-"),
            ("h2d_gbps", sel, "H2D engine", "^-"),
            ("copy_gbps", sel, "numpy copy (limit)", "k--"),
            (
                "copy_h2d_gbps",
                [r for r in sel if r["copy_h2d_gbps"] != r["copy_gbps"]],
                "H2D limit (a copy per replica)",
                "k:",
            ),
            ("d2h_arrays_gbps", sel, "D2H engine, arrays rows", "v-"),
            ("h2d_arrays_gbps", sel, "H2D engine, arrays rows", "d-"),
            ("put_d2h_gbps", sel, "device_put D2H (arrays' limit)", "C4:"),
            ("put_h2d_gbps", sel, "device_put H2D (arrays' limit)", "C5:"),
            ("naive_d2h_gbps", nsel, f"naive D2H ({'/'.join(map(str, nb))} pages)", "x-."),
            ("naive_h2d_gbps", nsel, f"naive H2D ({'/'.join(map(str, nb))} pages)", "+-."),
        ]
        for key, src, label, style in lines:
            pts = [(r["page_kib"], r[key]) for r in src if r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts, strict=True), style, label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("page size (host row KiB)")
        ax.set_ylabel("GB/s")
        ax.set_title(f"{layout}: batch of {'/'.join(map(str, batches))} pages ({platform})")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    _common.save_figure(fig, path)


def native_kernels() -> str:
    """Whether jaxkv's native CPU page kernels are in use (jaxkv/_native)."""
    from jaxkv import _native as native

    return "on" if native.available() else "off"


def h2d_path(mesh) -> str:
    """The engine's host-to-device path on these devices, as OffloadEngine picks it."""
    params = jaxkv.KVCacheParams(jnp.bfloat16, n_kv_heads=8, head_dim=128, num_layers=1, page_size=1)
    path = jaxkv.OffloadEngine(jaxkv.allocate_buffer(params, mesh, 1), 1).h2d_path
    return {
        "pool": "pool (native memcpy straight from host pool rows, donated)",
        "staged": "staged rows + jitted donated XLA scatter",
    }[path]


# -- main ------------------------------------------------------------------------
THROUGHPUT_COLUMNS = [
    ("page_kib", "page KiB", ".0f"),
    ("batch", "pages", "d"),
    ("mib", "MiB", ".2f"),
    ("d2h_host_gbps", "D2H host", ".2f"),
    ("d2h_xla_gbps", "D2H xla", ".2f"),
    ("h2d_gbps", "H2D", ".2f"),
    ("copy_gbps", "np copy", ".2f"),
    ("copy_h2d_gbps", "H2D lim", ".2f"),
    ("put_d2h_gbps", "put D2H", ".2f"),
    ("put_h2d_gbps", "put H2D", ".2f"),
    ("d2h_arrays_gbps", "D2H arr", ".2f"),
    ("h2d_arrays_gbps", "H2D arr", ".2f"),
    ("naive_d2h_gbps", "naive D2H", ".3f"),
    ("naive_h2d_gbps", "naive H2D", ".3f"),
    ("d2h_limit", "D2H/lim", ".2f"),
    ("d2h_xla_limit", "xla/lim", ".2f"),
    ("h2d_limit", "H2D/lim", ".2f"),
    ("d2h_arrays_put", "arrD2H/put", ".2f"),
    ("h2d_arrays_put", "arrH2D/put", ".2f"),
    ("d2h_naive", "D2H/naive", ".1f"),
    ("h2d_naive", "H2D/naive", ".1f"),
]


def main() -> None:
    parser = _common.parser(__doc__)
    parser.add_argument("--quick", action="store_true", help="two page sizes, three batches, few repeats (smoke run)")
    parser.add_argument(
        "--out-json",
        default=None,
        help="results name: bench/results/NAME.json, docs/NAME.png (default offload; offload_quick with --quick, "
        "its figure beside the JSON)",
    )
    parser.add_argument(
        "--steps-only",
        action="store_true",
        help="only the transfers between the user's own decode steps (issue 24); results bench/results/NAME.json, "
        "default offload_steps",
    )
    args = parser.parse_args()
    if args.out_json is None:  # a smoke run never overwrites the committed results
        args.out_json = ("offload_steps" if args.steps_only else "offload") + ("_quick" if args.quick else "")
    t0 = time.perf_counter()

    devices = jax.devices()
    platform = devices[0].platform
    tp = min(4, len(devices))
    mesh = jax.make_mesh((tp,), ("tp",), devices=devices[:tp])
    paths = "host + xla" if platform == "cpu" else "xla"
    limit = "np.copyto" if platform == "cpu" else "jax.device_put device<->pinned_host (np.copyto also shown)"
    cond = _common.conditions() | {
        "tp": tp,
        "dtypes": "bfloat16 values, no scales",
        "layouts": "MHA 8 KV heads x 128; MLA 1 x 512 (replicated over TP)",
        "d2h_paths": paths,
        "h2d_path": h2d_path(mesh),
        "limit": limit,
        "host_memory_kind": "pinned_host",
        "arrays_backend": "HostTier(backend='arrays') rows; limit jax.device_put device<->pinned_host of one buffer",
        "jaxkv_native_kernels": native_kernels() if platform == "cpu" else "n/a",
        "git": _common.git_state(),
    }
    _common.print_conditions(cond)
    print(f"native page copy policy: {cond['copy_policy']} (JAXKV_COPY_POLICY overrides; see jaxkv._native)")

    for layout in LAYOUTS:
        check_round_trip(layout, mesh, tp, ["host", "xla"] if platform == "cpu" else ["xla"])
    print(f"round trip (random bits, d2h {paths} + arrays, h2d pool + arrays): bit-exact for {', '.join(LAYOUTS)}")

    steps_batches = STEP_BATCHES[:1] if args.quick else STEP_BATCHES
    if args.steps_only:
        steps = print_steps(bench_between_steps(mesh, tp, steps_batches, repeats=3 if args.quick else 15), tp)
        path = _common.write_json(args.out_json, {"conditions": cond, "between_steps": steps})
        print(f"\nwrote {path} ({time.perf_counter() - t0:.0f} s)")
        return

    page_kibs = [64, 1024] if args.quick else [16, 64, 256, 1024, 2048]
    batches = [1, 64, 256] if args.quick else [1, 4, 16, 64, 256, 1024]
    throughput = []
    for layout in LAYOUTS:
        t1 = time.perf_counter()
        print(f"{layout} ", end="", flush=True)
        throughput += bench_throughput(layout, mesh, tp, page_kibs, batches, quick=args.quick)
        print(f" {time.perf_counter() - t1:.0f} s")
    columns = [c for c in THROUGHPUT_COLUMNS if any(r.get(c[0]) is not None for r in throughput)]
    for layout in LAYOUTS:
        _common.print_table(
            f"{layout} TP {tp} bf16: GB/s of page bytes (k * row_bytes); ratios against the "
            f"{'numpy copy' if platform == 'cpu' else 'device_put'} limit and the naive loop "
            f"(naive timed for <= {NAIVE_MAX_BATCH} pages)",
            [r for r in throughput if r["layout"] == layout],
            columns,
        )

    tg = targets(throughput)
    _common.print_table(
        f"targets, batches >= {TARGET_MIN_BATCH} pages of >= {TARGET_MIN_PAGE // KIB} KiB: "
        f"D2H >= {TARGETS['d2h_limit']}x limit, H2D >= {TARGETS['h2d_limit']}x limit, both >= "
        f"{TARGETS['d2h_naive']:.0f}x naive (naive at 'naive@' pages of the same size)",
        tg,
        [
            ("layout", "layout", "s"),
            ("page_kib", "page KiB", ".0f"),
            ("batch", "pages", "d"),
            ("d2h_limit", "D2H/lim", ".2f"),
            ("d2h_limit_ok", "ok", "s"),
            ("h2d_limit", "H2D/lim", ".2f"),
            ("h2d_limit_ok", "ok", "s"),
            ("naive_batch", "naive@", "d"),
            ("d2h_naive", "D2H/naive", ".1f"),
            ("d2h_naive_ok", "ok", "s"),
            ("h2d_naive", "H2D/naive", ".1f"),
            ("h2d_naive_ok", "ok", "s"),
        ],
    )
    misses = sum(v == "MISS" for t in tg for k, v in t.items() if k.endswith("_ok"))
    print(f"{misses} of {sum(v is not None for t in tg for k, v in t.items() if k.endswith('_ok'))} checks missed")

    steps = print_steps(bench_between_steps(mesh, tp, steps_batches, repeats=3 if args.quick else 9), tp)

    peak = []
    if reset_peak_rss():
        cache_bytes = 128 * MIB if args.quick else 512 * MIB
        peak_batches = [16, 64] if args.quick else [16, 64, 256]
        for layout in LAYOUTS:
            peak += bench_peak(layout, mesh, tp, cache_bytes, peak_batches, 256 * KIB, arrays_rows=not args.quick)
            gc.collect()
        _common.print_table(
            "peak host memory of one transfer (VmHWM - RSS before, MiB) in a large cache; "
            "kept = RSS after - before (heap trimmed), for the H2D",
            peak,
            [
                ("layout", "layout", "s"),
                ("page_kib", "page KiB", ".0f"),
                ("cache_mib", "cache MiB", ".0f"),
                ("batch", "pages", "d"),
                ("moved_mib", "k*row MiB", ".1f"),
                ("h2d_peak_mib", "H2D peak", ".1f"),
                ("h2d_kept_mib", "H2D kept", ".1f"),
                *[
                    (f"d2h_{p}_peak_mib", f"D2H {p} peak", ".1f")
                    for p in ("host", "xla")
                    if f"d2h_{p}_peak_mib" in peak[0]
                ],
                ("h2d_arrays_peak_mib", "H2D arrays peak", ".1f"),
                ("h2d_arrays_kept_mib", "kept", ".1f"),
                ("d2h_arrays_peak_mib", "D2H arrays peak", ".1f"),
                ("d2h_arrays_kept_mib", "kept", ".1f"),
            ],
        )
    else:
        print("\npeak memory: /proc/self/clear_refs not writable here; skipped")

    seconds = time.perf_counter() - t0
    path = _common.write_json(
        args.out_json,
        {
            "conditions": cond,
            "targets_spec": TARGETS | {"min_batch": TARGET_MIN_BATCH, "min_page_bytes": TARGET_MIN_PAGE},
            "throughput": throughput,
            "targets": tg,
            "between_steps": steps,
            "peak_memory": peak,
            "seconds": seconds,
        },
    )
    # The committed figure lives in docs/; a quick run's stays beside its JSON.
    png = _common.RESULTS / f"{args.out_json}.png" if args.quick else ROOT / "docs" / f"{args.out_json}.png"
    plot(throughput, list(LAYOUTS), png, platform)
    print(f"\nwrote {path} and {png} ({seconds:.0f} s)")


if __name__ == "__main__":
    main()
