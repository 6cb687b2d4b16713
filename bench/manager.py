"""Prefix-caching manager speed and hit rates on a synthetic multi-turn chat workload.

    python bench/manager.py [--quick]

Measures, in one run:
- block hashing throughput (blocks/s) of `hash_blocks` on 16- and 128-token
  blocks, as one long chain and as one chain per 2,560-token request: jaxkv
  as installed (native OpenSSL chain where built), its hashlib path, and MAX's
  SHA-256 path when a Python with MAX is at hand (`JAXKV_MAX_PYTHON`, else
  /tmp/maxvenv/bin/python; bench/max_hashing.py runs there on the same
  tokens); plus a plain-Python reference that packs token by token;
- scheduler cycles (add_request + commit + finish per request) per second of
  `PagedKVCacheManager` against `ReferenceManager`, a plain-Python version of
  the same policy (list-based LRU, per-token hashing), checked to make the
  same decisions;
- the hit rate per tier (device / host / disk / recomputed) for device caches
  of several sizes, with a real `TieredStore` (host tier + disk tier) planning
  and an `OffloadWorker` moving real pages.

`--quick` runs a smaller workload and writes `bench/results/manager_quick.json`
(and its figure beside it), never the committed `manager.json`.
"""

from __future__ import annotations

import hashlib
import json
import struct
import tempfile
import time
from pathlib import Path
from unittest import mock

import _common
import numpy as np

_common.setup_devices()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import jaxkv  # noqa: E402
from jaxkv._cli.workload import chat_workload  # noqa: E402
from jaxkv.prefix import hashing  # noqa: E402

PAGE = 16
FP = hashlib.sha256(b"bench-layout").digest()


# -- workload ----------------------------------------------------------------------
def serve(manager, events, worker=None, cache=None):
    """Admit each turn, load its outside hits, 'compute' prompt and reply, commit, store, finish.

    Without a store (`worker` None) there is nothing to load or store. Returns the cache.
    """
    for i, (c, prompt, reply) in enumerate(events):
        rid = f"{c}:{i}"
        req = manager.add_request(rid, prompt)
        if req.load is not None:
            cache, handle = worker.load(cache, req.load)
            manager.complete_load(handle.result())
        manager.append_tokens(rid, reply)
        plan = manager.commit(rid, len(prompt) + len(reply))
        if plan is not None:
            manager.complete_store(worker.store(cache, plan).result())
        manager.finish(rid)
    return cache


# -- plain-Python reference of the same policy -----------------------------------
def reference_hashes(tokens, page, parent):
    out = []
    for b in range(len(tokens) // page):
        data = b"".join(struct.pack("<i", t) for t in tokens[b * page : (b + 1) * page])
        parent = hashlib.sha256(parent + data).digest()
        out.append(parent)
    return out


class ReferenceManager:
    """The manager's policy in plain Python: list LRU (O(n) removal), per-token hashing."""

    def __init__(self, num_pages: int, page: int, fingerprint: bytes):
        self.page = page
        self.root = jaxkv.root_hash(0, fingerprint)
        self.free = list(range(1, num_pages))
        self.refs = [0] * num_pages
        self.page_hash = [None] * num_pages
        self.index = {}
        self.requests = {}
        self.hit_tokens = 0

    def add_request(self, rid, tokens):
        hashes = reference_hashes(tokens[:-1], self.page, self.root)
        hits = []
        for h in hashes:
            if h not in self.index:
                break
            hits.append(self.index[h])
        for p in hits:
            if self.refs[p] == 0:
                self.free.remove(p)
            self.refs[p] += 1
        pages = list(hits)
        for _ in range(-(-len(tokens) // self.page) - len(hits)):
            p = self.free.pop(0)
            if self.page_hash[p] is not None:
                del self.index[self.page_hash[p]]
                self.page_hash[p] = None
            self.refs[p] = 1
            pages.append(p)
        self.requests[rid] = [list(tokens), pages, len(hits)]
        self.hit_tokens += len(hits) * self.page

    def append_tokens(self, rid, tokens):
        r = self.requests[rid]
        r[0].extend(tokens)
        for _ in range(-(-len(r[0]) // self.page) - len(r[1])):
            p = self.free.pop(0)
            if self.page_hash[p] is not None:
                del self.index[self.page_hash[p]]
                self.page_hash[p] = None
            self.refs[p] = 1
            r[1].append(p)

    def commit(self, rid, n):
        tokens, pages, _ = self.requests[rid]
        for b, h in enumerate(reference_hashes(tokens[:n], self.page, self.root)):
            if h not in self.index and self.page_hash[pages[b]] is None:
                self.index[h] = pages[b]
                self.page_hash[pages[b]] = h

    def finish(self, rid):
        _, pages, _ = self.requests.pop(rid)
        for p in reversed(pages):
            self.refs[p] -= 1
            if self.refs[p] == 0:
                self.free.append(p)


def serve_reference(ref, events):
    for i, (c, prompt, reply) in enumerate(events):
        rid = f"{c}:{i}"
        ref.add_request(rid, prompt)
        ref.append_tokens(rid, reply)
        ref.commit(rid, len(prompt) + len(reply))
        ref.finish(rid)


# -- measurements --------------------------------------------------------------------
HASH_PAGES = (16, 128)
HASH_REQUEST_TOKENS = 2_560  # one chain per request of this many tokens: 160 or 20 blocks, a call each


class MaxHasher(_common.MaxProcess):
    """bench/max_hashing.py running under a Python with MAX: times one case per `seconds(i)` call."""

    def __init__(self, python: str, chains: list[np.ndarray], cases: list[dict], tmp: Path):
        npz, spec = tmp / "chains.npz", tmp / "spec.json"
        np.savez(npz, **{f"case{i}": c for i, c in enumerate(chains)})
        spec.write_text(json.dumps(dict(cases=cases)))
        super().__init__(python, "max_hashing.py", [str(npz), str(spec)], tmp)

    def seconds(self, case: int) -> float:
        """Seconds of one MAX run of hashing case `case`."""
        return self.ask(str(case))


def hash_case(i: int, case: dict, tokens: np.ndarray, root: bytes, theirs: MaxHasher | None, repeats: int) -> dict:
    """One hashing case: jaxkv, its hashlib path and MAX, runs interleaved, medians."""
    page, request_tokens = case["page_size"], case["request_tokens"]
    requests = [tokens] if request_tokens is None else np.split(tokens, len(tokens) // request_tokens)

    def ours():
        return [jaxkv.hash_blocks(r, page, root) for r in requests]

    def hashlib_path():
        with mock.patch.object(hashing, "_native_chain", lambda: None):
            return [jaxkv.hash_blocks(r, page, root) for r in requests]

    n_blocks = len(tokens) // page
    assert ours() == hashlib_path(), "native and hashlib chains disagree"
    contenders = {"jaxkv": _common.timed(ours), "hashlib": _common.timed(hashlib_path)}
    if theirs is not None:
        assert theirs.info["blocks"][i] == n_blocks, (i, theirs.info["blocks"][i], n_blocks)
        contenders["max"] = lambda: theirs.seconds(i)
    median = _common.interleaved(contenders, repeats=repeats)
    row = dict(
        case,
        chain="one chain" if request_tokens is None else f"{request_tokens}-token requests",
        blocks=n_blocks,
        blocks_per_s=n_blocks / median["jaxkv"],
        hashlib_blocks_per_s=n_blocks / median["hashlib"],
        vs_hashlib=median["hashlib"] / median["jaxkv"],
    )
    if theirs is not None:
        row["max_blocks_per_s"] = n_blocks / median["max"]
        row["vs_max"] = median["max"] / median["jaxkv"]
    return row


def bench_hashing(quick: bool) -> dict:
    """Chained SHA-256 blocks/s: jaxkv as installed, its hashlib path, MAX (if at hand), on the same tokens.

    Per case, the runs interleave (jaxkv, hashlib path, MAX, jaxkv, ...) so
    that every contender sees the same load on a shared machine; each figure
    is the median of its runs.
    """
    n_blocks = 2_560 if quick else 20_000  # both divide into whole 2,560-token requests at 16 and 128 tokens
    repeats = 5 if quick else 15
    rng = np.random.default_rng(0)
    root = jaxkv.root_hash(0, FP)
    cases, chains = [], []
    for page in HASH_PAGES:
        tokens = rng.integers(0, 32000, n_blocks * page, dtype=np.int32)
        for request_tokens in (None, HASH_REQUEST_TOKENS):
            cases.append(dict(page_size=page, request_tokens=request_tokens))
            chains.append(tokens)

    python = _common.max_python()
    theirs, max_info = None, dict(error=f"no Python with MAX (set JAXKV_MAX_PYTHON, or a venv at {_common.MAX_VENV})")
    with tempfile.TemporaryDirectory() as tmp:
        if python is not None:
            try:
                theirs = MaxHasher(python, chains, cases, Path(tmp))
                max_info = dict(theirs.info)
            except (OSError, RuntimeError, ValueError) as e:
                max_info = dict(interpreter=python, error=str(e))
        rows = [
            hash_case(i, case, tokens, root, theirs, repeats)
            for i, (case, tokens) in enumerate(zip(cases, chains, strict=True))
        ]
        if theirs is not None:
            theirs.close()
    # The plain-Python reference (token-by-token packing), on the first case only: it is slow.
    listed = chains[0].tolist()
    t_ref = _common.median_seconds(lambda: reference_hashes(listed, HASH_PAGES[0], root), repeats=3, warmup=1)
    assert jaxkv.hash_blocks(chains[0], HASH_PAGES[0], root) == reference_hashes(listed, HASH_PAGES[0], root)
    rows[0]["reference_blocks_per_s"] = n_blocks / t_ref
    max_info.pop("blocks", None)
    return dict(backend=hashing.backend(), token_dtype="int32", repeats=repeats, max=max_info, rows=rows)


def bench_cycles(events, num_pages: int) -> dict:
    params = jaxkv.KVCacheParams("bfloat16", 8, 128, 1, PAGE)

    def ours():
        m = jaxkv.PagedKVCacheManager(params, num_pages=num_pages, tp=1)
        serve(m, events)
        return m

    def reference():
        r = ReferenceManager(num_pages, PAGE, jaxkv.layout_fingerprint(params, tp=1))
        serve_reference(r, events)
        return r

    m, r = ours(), reference()
    device = m.metrics.tokens_from["device"]
    assert device == r.hit_tokens, (device, r.hit_tokens)
    t_ours = _common.median_seconds(ours, repeats=3, warmup=0)
    t_ref = _common.median_seconds(reference, repeats=3, warmup=0)
    tokens = sum(len(p) + len(r_) for _, p, r_ in events)
    return dict(
        requests=len(events),
        tokens=tokens,
        device_pages=num_pages,
        cycles_per_s=len(events) / t_ours,
        reference_cycles_per_s=len(events) / t_ref,
        speedup=t_ref / t_ours,
        device_hit_rate=device / m.metrics.prompt_tokens,
    )


def bench_hit_rates(events, device_pages: list[int], host_pages: int) -> list[dict]:
    params = jaxkv.KVCacheParams(jnp.bfloat16, n_kv_heads=4, head_dim=64, num_layers=2, page_size=PAGE)
    mesh = jax.make_mesh((4,), ("tp",), devices=jax.devices()[:4])
    rows = []
    for n in device_pages:
        with tempfile.TemporaryDirectory(dir=_common.RESULTS.parent) as tmp:
            cache = jaxkv.allocate_buffer(params, mesh, n)
            row = jaxkv.RowLayout.of(cache).row_bytes
            store, worker = jaxkv.open_tiers(
                cache, host_pages * row, disk_directory=Path(tmp) / "disk", disk_capacity_bytes=1 << 34
            )
            m = jaxkv.PagedKVCacheManager(cache, store)
            t0 = time.perf_counter()
            cache = serve(m, events, worker, cache)
            worker.flush()
            seconds = time.perf_counter() - t0
            mt = m.metrics
            total = mt.prompt_tokens
            assert sum(mt.tokens_from.values()) + mt.tokens_recomputed == total
            rows.append(
                dict(
                    device_pages=n,
                    host_pages=host_pages,
                    device=mt.tokens_from["device"] / total,
                    host=mt.tokens_from["host"] / total,
                    disk=mt.tokens_from["disk"] / total,
                    recomputed=mt.tokens_recomputed / total,
                    hit_rate=mt.hit_rate,
                    evictions=m.pool.evictions,
                    blocks_offloaded=mt.blocks_offloaded,
                    blocks_promoted=store.metrics["disk"].blocks_loaded,  # disk blocks pass through host memory
                    loads_refused=mt.loads_refused,
                    loads_failed=mt.loads_failed,
                    seconds=seconds,
                )
            )
            worker.close()
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    bottom = np.zeros(len(rows))
    for key, color in (("device", "C0"), ("host", "C1"), ("disk", "C2"), ("recomputed", "0.75")):
        vals = np.array([r[key] for r in rows])
        ax.bar(x, vals, bottom=bottom, label=key, color=color)
        bottom += vals
    ax.set_xticks(x, [f"{r['device_pages']} pages" for r in rows])
    ax.set_ylabel("fraction of prompt tokens")
    ax.set_title(f"where prompt tokens came from (host tier {rows[0]['host_pages']} pages, disk unbounded)")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    _common.save_figure(fig, path)


def main() -> None:
    parser = _common.parser(__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller workload (smoke run)")
    args = parser.parse_args()
    rng = np.random.default_rng(1)
    shape = dict(
        system_prompts=4,
        conversations=12 if args.quick else 40,
        turns=3 if args.quick else 5,
        system_tokens=512,
        user_tokens=48,
        reply_tokens=64,
    )
    events = chat_workload(rng, vocab=32000, **shape)
    cond = _common.conditions() | {"page_size": PAGE, **shape}
    _common.print_conditions(cond)
    t0 = time.perf_counter()

    hashing = bench_hashing(args.quick)
    mx = hashing["max"]
    against = (
        f"MAX {mx['max']} via {mx['entry']} (Python {mx['python']})"
        if "error" not in mx
        else f"no MAX: {mx['error']}; compared against jaxkv's hashlib path"
    )
    _common.print_table(
        f"block hashing (chained SHA-256, int32 tokens), jaxkv: {hashing['backend']}; {against}",
        hashing["rows"],
        [
            ("page_size", "page tokens", "d"),
            ("chain", "chains", "s"),
            ("blocks", "blocks", "d"),
            ("blocks_per_s", "jaxkv blocks/s", ",.0f"),
            ("hashlib_blocks_per_s", "hashlib path blocks/s", ",.0f"),
            ("max_blocks_per_s", "MAX blocks/s", ",.0f"),
            ("vs_max", "jaxkv/MAX", ".2f"),
            ("vs_hashlib", "jaxkv/hashlib", ".2f"),
            ("reference_blocks_per_s", "per-token reference blocks/s", ",.0f"),
        ],
    )
    cycles = [bench_cycles(events, n) for n in (256, 4096)]
    _common.print_table(
        "scheduler cycles: add_request + append + commit + finish per request (no store)",
        cycles,
        [
            ("requests", "requests", "d"),
            ("device_pages", "device pages", "d"),
            ("cycles_per_s", "jaxkv cycles/s", ",.0f"),
            ("reference_cycles_per_s", "reference cycles/s", ",.0f"),
            ("speedup", "speedup", ".1f"),
            ("device_hit_rate", "device hit rate", ".2f"),
        ],
    )
    device_pages = [128, 512] if args.quick else [128, 256, 512, 1024, 2048]
    hits = bench_hit_rates(events, device_pages, host_pages=256)
    _common.print_table(
        "hit rate per tier, TieredStore + OffloadWorker (host 256 pages, disk unbounded), real page moves",
        hits,
        [
            ("device_pages", "device pages", "d"),
            ("device", "device", ".2f"),
            ("host", "host", ".2f"),
            ("disk", "disk", ".2f"),
            ("recomputed", "recomputed", ".2f"),
            ("hit_rate", "hit rate", ".2f"),
            ("evictions", "evictions", "d"),
            ("blocks_promoted", "promoted", "d"),
            ("loads_refused", "refused", "d"),
            ("seconds", "s", ".1f"),
        ],
    )
    name = "manager_quick" if args.quick else "manager"
    path = _common.write_json(
        name,
        {
            "conditions": cond,
            "hashing": hashing,
            "cycles": cycles,
            "hit_rates": hits,
            "seconds": time.perf_counter() - t0,
        },
    )
    # The committed figure lives in docs/; a quick run's stays beside its JSON.
    docs = _common.RESULTS.parent.parent / "docs"
    png = _common.RESULTS / "hit_rates_quick.png" if args.quick else docs / "hit_rates.png"
    plot(hits, png)
    print(f"\nwrote {path} and {png} ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
