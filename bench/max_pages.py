"""jaxkv's OffloadEngine against MAX's own page copy, side by side at TP 1 on the CPU.

    python bench/max_pages.py [--quick] [--row-kib KIB ...] [--pages N ...]

MHA caches (bfloat16, 8 KV heads x 128, 16-token pages; the layer count sets
the row) of 256 KiB, 1 MiB and 2 MiB rows, batches of 64 and 256 random pages
into random host slots of a pool of that many rows, on one CPU device:

- jaxkv: `engine.d2h(cache, ids, slots).synchronize()` and
  `cache, t = engine.h2d(cache, slots, ids); t.synchronize()` (the cache
  passed in and out, native kernels as installed);
- MAX: `max.driver.batch_inplace_copy` over `KVCacheBuffer.to_memory()` page
  views into and out of a `Usage.STAGING` host buffer, the primitive MAX 26.7's
  block manager copies pages with (its tiered KV connector needs a GPU), run
  by bench/max_pages_max.py under a Python with MAX (`JAXKV_MAX_PYTHON`, else
  /tmp/maxvenv/bin/python) on the same page ids and slots;
- the limit: a numpy copy of the same bytes between preallocated arrays,
  measured in each process (jaxkv's figures are read against the copy in this
  process, MAX's against the copy in its own).

Per case the runs interleave (jaxkv D2H, MAX D2H, jaxkv H2D, MAX H2D, copy,
MAX-process copy, repeat) so every contender sees the same load on a shared
machine; each figure is the median of its runs, round 0 warms up. Without MAX
the table has jaxkv and the copy only, and says why. Goal (issue 13): jaxkv
>= 1.1x MAX both ways.

Results: bench/results/max_pages.json (`--quick`: one row size and batch, few
repeats, max_pages_quick.json; both under $JAXKV_BENCH_RESULTS if set).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import _common
import numpy as np

_common.setup_devices(1)  # TP 1: one CPU device, as MAX's CPU device is one

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import jaxkv  # noqa: E402

KIB, MIB = 2**10, 2**20
ROW_KIBS = (256, 1024, 2048)
BATCHES = (64, 256)
HEADS, HEAD_DIM, PAGE_SIZE = 8, 128, 16  # MHA: 2 x 8 x 128 bf16 = 4 KiB per token and layer
GOAL_VS_MAX = 1.1  # issue 13: jaxkv >= 1.1x MAX's page copy, D2H and H2D


def params_for(row_bytes: int) -> jaxkv.KVCacheParams:
    """An MHA bf16 cache of 16-token pages whose page (one host row at TP 1) is `row_bytes`."""
    per_layer = 2 * PAGE_SIZE * HEADS * HEAD_DIM * 2  # K and V, bf16
    params = jaxkv.KVCacheParams(jnp.bfloat16, HEADS, HEAD_DIM, row_bytes // per_layer, PAGE_SIZE)
    assert params.host_bytes_per_page(1) == row_bytes, (row_bytes, params)
    return params


class MaxPages(_common.MaxProcess):
    """bench/max_pages_max.py under a Python with MAX: one timed op per `seconds(op, case)` call."""

    def __init__(self, python: str, cases: list[dict], tmp: Path):
        spec = tmp / "spec.json"
        spec.write_text(json.dumps(dict(cases=cases)))
        super().__init__(python, "max_pages_max.py", [str(spec)], tmp)

    def seconds(self, op: str, case: int) -> float:
        """Seconds of one MAX run of `op` ('d2h' / 'h2d' / 'copy') on case `case`."""
        return self.ask(f"{op} {case}")


class JaxkvCase:
    """A cache on the one device, an OffloadEngine with a pool of `k` rows, and the batch's ids and slots."""

    def __init__(self, row_bytes: int, ids: np.ndarray, slots: np.ndarray, mesh, rng):
        params = params_for(row_bytes)
        k = len(ids)
        num_pages = 2 * k
        shape = (num_pages, params.kv_dim, params.num_layers, params.page_size, HEADS, HEAD_DIM)
        bits = rng.integers(0, 2**16, size=shape, dtype=np.uint16)
        sharding = jaxkv.allocate_buffer(params, mesh, 1).values.sharding
        self.cache = jaxkv.KVCacheBuffer(False, jax.device_put(bits.view(jnp.bfloat16), sharding))
        self.engine = jaxkv.OffloadEngine(self.cache, k)
        self.ids, self.slots, self.nbytes = ids, slots, k * row_bytes
        self._src, self._dst = np.ones(self.nbytes, np.uint8), np.empty(self.nbytes, np.uint8)
        # Bit-exact once: D2H rows are the pages' bytes; H2D of other rows lands in those pages.
        self.d2h()
        if not np.array_equal(self.engine.host_pool[slots], bits[ids].reshape(k, -1).view(np.uint8)):
            raise AssertionError(f"jaxkv d2h at {row_bytes} B rows: host rows differ from the device pages")
        fresh = rng.integers(0, 256, (k, row_bytes), dtype=np.uint8)
        self.engine.host_pool[slots] = fresh
        self.h2d()
        got = np.asarray(self.cache.values)[ids].reshape(k, -1).view(np.uint8)
        if not np.array_equal(got, fresh):
            raise AssertionError(f"jaxkv h2d at {row_bytes} B rows: device pages differ from the host rows")

    def d2h(self) -> None:
        self.engine.d2h(self.cache, self.ids, self.slots).synchronize()

    def h2d(self) -> None:
        self.cache, t = self.engine.h2d(self.cache, self.slots, self.ids)
        t.synchronize()

    def copy(self) -> None:
        np.copyto(self._dst, self._src)


def bench_case(i: int, case: dict, ours: JaxkvCase, theirs: MaxPages | None, repeats: int) -> dict:
    contenders = {"d2h": _common.timed(ours.d2h), "h2d": _common.timed(ours.h2d), "copy": _common.timed(ours.copy)}
    if theirs is not None:
        for op in ("d2h", "h2d", "copy"):
            contenders[f"max_{op}"] = lambda op=op: theirs.seconds(op, i)
    order = ["d2h", "max_d2h", "h2d", "max_h2d", "copy", "max_copy"]
    median = _common.interleaved(contenders, order, repeats=repeats)
    n = ours.nbytes
    row = dict(page_kib=case["row_bytes"] / KIB, batch=len(ours.ids), mib=n / MIB)
    for k, s in median.items():
        row[f"{k}_gbps"] = _common.gbps(n, s)
    for d in ("d2h", "h2d"):
        row[f"{d}_limit"] = median["copy"] / median[d]
        if theirs is not None:
            row[f"max_{d}_limit"] = median["max_copy"] / median[f"max_{d}"]
            row[f"{d}_vs_max"] = median[f"max_{d}"] / median[d]
            row[f"{d}_goal"] = "ok" if row[f"{d}_vs_max"] >= GOAL_VS_MAX else "MISS"
    return row


COLUMNS = [
    ("page_kib", "page KiB", ".0f"),
    ("batch", "pages", "d"),
    ("mib", "MiB", ".0f"),
    ("copy_gbps", "copy", ".2f"),
    ("max_copy_gbps", "MAX copy", ".2f"),
    ("d2h_gbps", "D2H jaxkv", ".2f"),
    ("max_d2h_gbps", "D2H MAX", ".2f"),
    ("d2h_limit", "jaxkv/lim", ".2f"),
    ("max_d2h_limit", "MAX/lim", ".2f"),
    ("d2h_vs_max", "jaxkv/MAX", ".3f"),
    ("d2h_goal", "goal", "s"),
    ("h2d_gbps", "H2D jaxkv", ".2f"),
    ("max_h2d_gbps", "H2D MAX", ".2f"),
    ("h2d_limit", "jaxkv/lim", ".2f"),
    ("max_h2d_limit", "MAX/lim", ".2f"),
    ("h2d_vs_max", "jaxkv/MAX", ".3f"),
    ("h2d_goal", "goal", "s"),
]


def main() -> None:
    parser = _common.parser(__doc__)
    parser.add_argument("--quick", action="store_true", help="256 KiB rows, 64 pages, few repeats (smoke run)")
    parser.add_argument("--row-kib", type=int, nargs="+", help=f"page (row) sizes in KiB (default {ROW_KIBS})")
    parser.add_argument("--pages", type=int, nargs="+", help=f"batches in pages (default {BATCHES})")
    args = parser.parse_args()
    t0 = time.perf_counter()
    row_kibs, batches = (ROW_KIBS[:1], BATCHES[:1]) if args.quick else (ROW_KIBS, BATCHES)
    row_kibs, batches = args.row_kib or row_kibs, args.pages or batches
    repeats = 3 if args.quick else 11

    mesh = jax.make_mesh((1,), ("tp",), devices=jax.devices()[:1])
    rng = np.random.default_rng(0)
    cases = []
    for kib in row_kibs:
        for k in batches:
            params = params_for(kib * KIB)
            ids = rng.permutation(2 * k)[:k].astype(np.int32)
            slots = rng.permutation(k).astype(np.int32)
            shape = [2 * k, params.kv_dim, params.num_layers, params.page_size, HEADS, HEAD_DIM]
            cases.append(dict(row_bytes=kib * KIB, shape=shape, ids=ids.tolist(), slots=slots.tolist()))

    python = _common.max_python()
    theirs, max_info = (
        None,
        dict(error=f"MAX not found: no Python with MAX (set JAXKV_MAX_PYTHON, or a venv at {_common.MAX_VENV})"),
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if python is not None:
            try:
                theirs = MaxPages(python, cases, Path(tmp))
                max_info = dict(theirs.info)
            except OSError as e:
                max_info = dict(interpreter=python, error=f"MAX not found: {e}")
            except (RuntimeError, ValueError) as e:
                max_info = dict(interpreter=python, error=f"MAX not usable: {e}")
        try:
            for i, case in enumerate(cases):
                ours = JaxkvCase(case["row_bytes"], np.array(case["ids"]), np.array(case["slots"]), mesh, rng)
                rows.append(bench_case(i, case, ours, theirs, repeats))
                del ours
        finally:
            if theirs is not None:
                theirs.close()

    engine = jaxkv.OffloadEngine(jaxkv.allocate_buffer(params_for(ROW_KIBS[0] * KIB), mesh, 1), 1)
    from jaxkv import _native as native

    cond = _common.conditions() | {
        "tp": 1,
        "dtype": "bfloat16 values, no scales",
        "layout": f"MHA {HEADS} KV heads x {HEAD_DIM}, {PAGE_SIZE}-token pages, layers set the row",
        "cache_pages": "2 x batch (ids: a random half; slots: a permutation of the pool)",
        "jaxkv_d2h_path": engine.d2h_path,
        "jaxkv_h2d_path": engine.h2d_path,
        "jaxkv_native_kernels": "on" if native.available() else "off",
        "limit": "np.copyto of the same bytes between preallocated arrays, in each process",
        "repeats": repeats,
        "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_") or k == "GLIBC_TUNABLES"},
        "max": max_info,
        "git": _common.git_state(),
    }
    _common.print_conditions(cond, skip=("max",))
    print(f"native page copy policy: {cond['copy_policy']} (JAXKV_COPY_POLICY overrides; see jaxkv._native)")
    if theirs is not None:
        print(
            f"MAX {max_info['max']} (Python {max_info['python']}, {max_info['device']}): {max_info['entry']}, "
            f"host pool {max_info['host_usage']} (pinned={max_info['host_pinned']})"
        )
    else:
        print(f"{max_info['error']}: jaxkv measured against the numpy copy only")
    columns = [c for c in COLUMNS if any(r.get(c[0]) is not None for r in rows)]
    _common.print_table(
        "TP 1 CPU, MHA bf16: GB/s of page bytes (k * row_bytes); /lim = against a numpy copy of the same bytes "
        f"in the same process; goal jaxkv/MAX >= {GOAL_VS_MAX}",
        rows,
        columns,
    )
    if theirs is not None:
        misses = sum(r[f"{d}_goal"] == "MISS" for r in rows for d in ("d2h", "h2d"))
        print(f"goal jaxkv >= {GOAL_VS_MAX}x MAX: {2 * len(rows) - misses} of {2 * len(rows)} met")
    name = "max_pages_quick" if args.quick else "max_pages"
    if args.row_kib or args.pages:  # a custom run never replaces the standard results
        name += "_custom"
    path = _common.write_json(name, dict(conditions=cond, rows=rows))
    print(f"wrote {path} ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
