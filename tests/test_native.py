"""The native CPU kernels: built at install, loaded without compiling, refused when stale, optional."""

import os
import subprocess
import sys
import warnings

import chex
import numpy as np
import pytest
from cachegen import random_buffer, tp_mesh
from test_memory import make_params

from jaxkv import OffloadEngine, allocate_buffer
from jaxkv import _native as native
from jaxkv.transfer import paths as paths_module

DISABLED = os.environ.get("JAXKV_NATIVE") == "0"


@pytest.fixture
def reload_library():
    """Forget the loaded library before and after the test: the next use loads (and registers) it again."""
    native.library.cache_clear()
    yield
    native.library.cache_clear()


@pytest.mark.skipif(DISABLED, reason="JAXKV_NATIVE=0")
def test_install_built_the_library_for_this_jaxlib():
    import jaxlib

    path = native.library_path()
    assert path is not None, f"no {native.LIBRARY} in {list(native.__path__)}: the install did not build it"
    assert native.available()
    built = native.library().jaxkv_built_with_jaxlib().decode()
    assert built.split(".")[:2] == jaxlib.__version__.split(".")[:2]


@pytest.mark.skipif(DISABLED, reason="JAXKV_NATIVE=0")
def test_loading_compiles_nothing():
    """With no compiler reachable, a fresh process still loads the kernels: they were built at install."""
    code = "import jaxkv._native as n; assert n.available(), n.library_path()"
    env = {**os.environ, "PATH": "/nonexistent", "CXX": "/bin/false", "CC": "/bin/false", "HOME": "/nonexistent"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def round_trip(tp: int = 2) -> OffloadEngine:
    """d2h then h2d on CPU; checks the pages came back bit for bit."""
    params = make_params("bfloat16", None, mla=False)
    src, values, _ = random_buffer(params, tp, num_pages=8, seed=3)
    engine = OffloadEngine(src, num_host_pages=4)
    engine.d2h(src, [5, 0, 7], [3, 1, 2]).synchronize()
    dst, transfer = engine.h2d(allocate_buffer(params, tp_mesh(tp), num_pages=8), [3, 1, 2], [1, 6, 3])
    transfer.synchronize()
    want = np.zeros_like(values).view(np.uint8)
    want[[1, 6, 3]] = values.view(np.uint8)[[5, 0, 7]]
    chex.assert_trees_all_equal(np.asarray(dst.values).view(np.uint8), want)
    return engine


def test_missing_library_warns_once_and_takes_the_portable_path(monkeypatch, reload_library):
    monkeypatch.delenv("JAXKV_NATIVE", raising=False)
    monkeypatch.setattr(native, "library_path", lambda: None)
    with pytest.warns(UserWarning, match=r"libjaxkv_native\.\w+ was not built when jaxkv was installed"):
        assert not native.available()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one warning per process, not one per call
        assert not native.available()
        engine = round_trip()
    assert (engine.d2h_path, engine.h2d_path) == ("host", "staged")


def test_library_built_for_another_jaxlib_is_refused(monkeypatch, reload_library):
    if native.library_path() is None or DISABLED:
        pytest.skip("no native library built")
    monkeypatch.setattr(native, "_jaxlib_version", lambda: "0.99.0")
    with pytest.warns(UserWarning, match=r"built against jaxlib \S+, but jaxlib 0\.99\.0 is running"):
        assert not native.available()
    assert round_trip(tp=1).h2d_path == "staged"

    native.library.cache_clear()  # another patch release of the same minor: loads
    built = _built_version()
    monkeypatch.setattr(native, "_jaxlib_version", lambda: ".".join([*built.split(".")[:2], "999"]))
    assert native.available()


def _built_version() -> str:
    import ctypes

    lib = ctypes.CDLL(str(native.library_path()))
    lib.jaxkv_built_with_jaxlib.restype = ctypes.c_char_p
    return lib.jaxkv_built_with_jaxlib().decode()


def test_jaxkv_native_0_turns_the_kernels_off_silently(monkeypatch, reload_library):
    monkeypatch.setenv("JAXKV_NATIVE", "0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not native.available()


def test_engine_off_cpu_never_touches_the_library(monkeypatch):
    """The staged H2D path on GPU/TPU copies rows with numpy: no native load in a GPU process."""

    def fail():
        raise AssertionError("native library used by a non-CPU engine")

    monkeypatch.setattr(native, "library", fail)
    monkeypatch.setattr(native, "available", fail)
    for width in (16, paths_module._LOOP_MIN_PAGE_BYTES):  # both numpy branches
        src = np.resize(np.arange(251, dtype=np.uint8), (6, width))
        dst = np.zeros((3, width), np.uint8)
        rows = np.array([4, 0, 5], np.int32)
        paths_module.copy_rows(dst, np.arange(3, dtype=np.int32), src, rows, on_cpu=False)
        chex.assert_trees_all_equal(dst, src[rows])


# -- copy_rows arguments -----------------------------------------------------------


needs_library = pytest.mark.skipif(DISABLED or native.library_path() is None, reason="no native library built")


@needs_library
def test_copy_rows_copies_between_column_slices():
    pool = np.zeros((4, 48), np.uint8)
    src = np.arange(5 * 16, dtype=np.uint8).reshape(5, 16)
    native.copy_rows(pool[:, 16:32], np.array([3, 0], np.int32), src, np.array([1, 4], np.int32))
    want = np.zeros((4, 48), np.uint8)
    want[[3, 0], 16:32] = src[[1, 4]]
    chex.assert_trees_all_equal(pool, want)


@needs_library
@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(dst=np.zeros((4, 16), np.int8)), r"dst must be a 2-D uint8 numpy array"),
        (dict(dst=[[0] * 16] * 4), r"dst must be a 2-D uint8 numpy array"),
        (dict(src=np.zeros((5, 16, 1), np.uint8)), r"src must be a 2-D uint8 numpy array"),
        (dict(src=np.zeros((5, 32), np.uint8)[:, ::2]), r"src must be a 2-D uint8 numpy array with contiguous rows"),
        (dict(src=np.zeros((5, 8), np.uint8)), r"dst and src rows must have one width, got 16 and 8 bytes"),
        (dict(dst_rows=np.array([0, 1], np.int64)), r"dst_rows must be a 1-D int32 numpy array, got int64"),
        (dict(src_rows=[0, 1]), r"src_rows must be a 1-D int32 numpy array, got list"),
        (dict(src_rows=np.array([0], np.int32)), r"dst_rows and src_rows must have one length, got 2 and 1"),
        (dict(dst_rows=np.array([0, 4], np.int32)), r"dst_rows\[1\] is 4, outside the valid range \[0, 4\)"),
        (dict(src_rows=np.array([-1, 0], np.int32)), r"src_rows\[0\] is -1, outside the valid range \[0, 5\)"),
    ],
)
def test_copy_rows_argument_errors_name_the_argument(change, message):
    args = dict(
        dst=np.zeros((4, 16), np.uint8),
        dst_rows=np.array([0, 1], np.int32),
        src=np.ones((5, 16), np.uint8),
        src_rows=np.array([2, 3], np.int32),
    )
    args.update(change)
    with pytest.raises(ValueError, match=message):
        native.copy_rows(**args)
    if isinstance(args["dst"], np.ndarray) and args["dst"].dtype == np.uint8:
        assert not args["dst"].any(), "a refused copy moved bytes"


@needs_library
def test_copy_pages_moves_every_pair_in_one_batch_and_refuses_before_moving(copy_policy):
    rng = np.random.default_rng(4)
    srcs = [rng.integers(0, 256, size=(9, w), dtype=np.uint8) for w in (48, 16)]
    pool = np.zeros((5, 64), np.uint8)
    dsts = [pool[:, :48], pool[:, 48:]]  # a host row's units side by side, as the D2H fills them
    ids, slots = np.array([7, 0, 3], np.int32), np.array([4, 1, 2], np.int32)
    copy_policy("stream=never,split=never")
    before = native.copy_stats()
    assert native.copy_pages([(d, slots) for d in dsts], [(s, ids) for s in srcs])
    assert (native.copy_stats() - before).batches == 1
    want = np.zeros_like(pool)
    want[slots] = np.concatenate([s[ids] for s in srcs], axis=1)
    assert pool.tobytes() == want.tobytes()

    fresh = np.zeros_like(pool)
    bad = np.array([7, 9, 3], np.int32)
    with pytest.raises(ValueError, match=r"src_rows\[1\]\[1\] is 9, outside the valid range \[0, 9\)"):
        native.copy_pages([(fresh[:, :48], slots), (fresh[:, 48:], slots)], [(srcs[0], ids), (srcs[1], bad)])
    with pytest.raises(ValueError, match=r"dst\[0\] and src\[0\] rows must have one width"):
        native.copy_pages([(fresh[:, :40], slots)], [(srcs[0], ids)])
    assert not fresh.any(), "a refused copy moved bytes"


@needs_library
def test_copy_rows_refuses_a_read_only_dst():
    dst = np.zeros((2, 8), np.uint8)
    dst.flags.writeable = False
    with pytest.raises(ValueError, match="dst must be writeable"):
        native.copy_rows(dst, np.array([0], np.int32), np.ones((1, 8), np.uint8), np.array([0], np.int32))


# Rows of 87,108 bytes per shard (odd head_dim: not a multiple of 16, so the streaming copies' unaligned
# head and tail run too) and 64 pages per batch: 5.6 MB per unit, above the 4 MiB streaming threshold of
# page_copy.cc, so every native path below copies with non-temporal stores.
STREAMED = dict(n_kv_heads=2, head_dim=21, num_layers=61, page_size=17)


@pytest.fixture
def copy_policy():
    """Set the native copy policy with `copy_policy(spec)` in a test; the machine's (and the environment's) after it."""
    yield native.set_copy_policy
    native.set_copy_policy(None)


@needs_library
@pytest.mark.parametrize("d2h_path", ["host", "xla"])
def test_batches_above_the_streaming_threshold_are_bit_exact(d2h_path, copy_policy):
    # The machine's threshold is an eighth of its L3 (6 MiB on a 48 MiB L3, 32.5 MiB on 260 MiB): fix it at
    # 4 MiB, under this batch, so the streaming and two-thread paths run whatever the L3.
    # Four cores: the two shards' load kernels may each split too.
    assert copy_policy("stream=4M,split=4M,cores=4").stream_min_bytes == 4 << 20
    import jax.numpy as jnp

    import jaxkv

    assert native.available()
    params = jaxkv.KVCacheParams(jnp.bfloat16, **STREAMED)
    assert params.shard_bytes_per_page(2) % 16 and 64 * params.shard_bytes_per_page(2) > 4 << 20
    src, _, _ = random_buffer(params, 2, num_pages=80, seed=3)
    rng = np.random.default_rng(0)
    ids = rng.permutation(80)[:64].astype(np.int32)
    slots = rng.permutation(64).astype(np.int32)
    engine = OffloadEngine(src, 64, d2h_path=d2h_path)
    assert engine.h2d_path == "pool"
    before = native.copy_stats()
    engine.d2h(src, ids, slots).synchronize()
    streamed(before, 2 * 64 * params.shard_bytes_per_page(2))
    # The host path copies both shards' pages in one batch; the xla path gathers per shard.
    assert (native.copy_stats() - before).batches == (1 if d2h_path == "host" else 2)

    def by_tp(array):  # each shard's bytes, in TP order (the order of a host row's units)
        pieces = sorted(array.addressable_shards, key=lambda s: s.index[4].start or 0)
        return [np.asarray(s.data).view(np.uint8).reshape(80, -1) for s in pieces]

    shards = by_tp(src.values)
    want = np.concatenate([np.stack([sh[i] for i in ids]) for sh in shards], axis=1)
    assert engine.host_pool[slots].tobytes() == want.tobytes()  # D2H: copy_rows / the gather kernel

    dst = allocate_buffer(params, tp_mesh(2), 80)
    before = native.copy_stats()
    dst, t = engine.h2d(dst, slots, ids)  # H2D: scatter_from_pool, streaming
    t.synchronize()
    streamed(before, 2 * 64 * params.shard_bytes_per_page(2))
    got = by_tp(dst.values)
    for sh_src, sh_dst in zip(shards, got, strict=True):
        assert sh_dst[ids].tobytes() == sh_src[ids].tobytes()
    del shards, got

    # The plain scatter kernel (KVCacheMemory.write_pages), streaming too.
    unit = dst.to_memory()[0]
    rows = rng.integers(0, 256, size=(64, unit.bytes_per_page), dtype=np.uint8)
    before = native.copy_stats()
    new_unit = unit.write_pages(ids, rows)
    assert np.asarray(new_unit.read_pages(ids)).tobytes() == rows.tobytes()
    streamed(before, 2 * rows.nbytes)  # the scatter, then the gather that reads it back


class ShardedLoad:
    """A TP-2 cache of `num_pages` random pages offloaded at `ids` -> `slots`, and a fresh cache to load them into."""

    def __init__(self, num_pages: int, ids: np.ndarray, slots: np.ndarray, seed: int):
        import jax.numpy as jnp

        import jaxkv

        self.params = jaxkv.KVCacheParams(jnp.bfloat16, **STREAMED)
        self.page = self.params.shard_bytes_per_page(2)  # one shard's page
        self.num_pages, self.ids, self.slots = num_pages, ids, slots
        self.src, _, _ = random_buffer(self.params, 2, num_pages=num_pages, seed=seed)
        self.engine = OffloadEngine(self.src, len(slots))
        self.engine.d2h(self.src, ids, slots).synchronize()
        self.dst = allocate_buffer(self.params, tp_mesh(2), num_pages)

    def load(self) -> native.CopyStats:
        """Load the rows back into `dst`; what the native copies did. Asserts every shard's pages bit-exact."""
        before = native.copy_stats()
        self.dst, t = self.engine.h2d(self.dst, self.slots, self.ids)
        t.synchronize()
        done = native.copy_stats() - before
        pages = zip(self.src.values.addressable_shards, self.dst.values.addressable_shards, strict=True)
        for a, b in pages:
            want = np.asarray(a.data).view(np.uint8).reshape(self.num_pages, -1)[self.ids]
            assert np.asarray(b.data).view(np.uint8).reshape(self.num_pages, -1)[self.ids].tobytes() == want.tobytes()
        return done


@needs_library
def test_a_padded_load_copies_and_splits_only_its_real_pages(copy_policy):
    # 40 pages pad to a bucket of 64. The kernel used to run the policy over all 64: padding counted toward the
    # streaming threshold, and the two-thread split gave one thread pages 0-31 and the other 8 real pages and
    # 24 of padding (a 96-page load split 64 / 32: 0.75x of memcpy instead of 1.2x).
    rng = np.random.default_rng(2)
    load = ShardedLoad(80, rng.permutation(80)[:40].astype(np.int32), rng.permutation(40).astype(np.int32), 5)
    # Streams from 48 pages' bytes a shard (the policy reads a load's bytes over both shards): the padded
    # batch (64 pages) would stream, the real one (40) must not. 4 cores: the two shards' kernels may split.
    copy_policy(f"stream={2 * 48 * load.page},split=1,cores=4")
    done = load.load()
    assert done.batches == done.split_batches == 2 and done.streamed_batches == 0, done  # one batch per shard
    # Exactly the real load: streams, and counts its 40 pages only.
    copy_policy(f"stream={2 * 40 * load.page},split=1,cores=4")
    done = load.load()
    assert done.streamed_batches == done.split_batches == 2 and done.streamed_bytes == 2 * 40 * load.page, done


@needs_library
def test_a_sharded_load_streams_by_the_whole_loads_bytes_and_splits_only_below_the_cores(copy_policy):
    # Two shards, one kernel each: each copies half the load. Streaming is chosen from the whole load, so a
    # threshold between one shard's bytes and both shards' streams both kernels.
    ids = np.arange(32, dtype=np.int32)[::-1].copy()
    load = ShardedLoad(40, ids, ids, 6)
    shard_batch = 32 * load.page
    # Two cores, which the two shards' kernels (run at once by XLA:CPU) already fill: neither adds a thread.
    copy_policy(f"stream={shard_batch + 1},split=1,cores=2")
    done = load.load()
    assert done.batches == done.streamed_batches == 2 and done.streamed_bytes == 2 * shard_batch, done
    assert done.split_batches == 0, done


def streamed(before: native.CopyStats, nbytes: int) -> None:
    """The copies since `before` streamed `nbytes` in batches split over two threads (the paths under test)."""
    done = native.copy_stats() - before
    assert done.streamed_bytes == nbytes and done.streamed_batches == done.batches > 0, done
    assert done.split_batches == done.batches, done


@needs_library
def test_batches_below_the_threshold_neither_stream_nor_split(copy_policy):
    copy_policy("stream=never,split=never")
    before = native.copy_stats()
    rows = np.random.default_rng(1).integers(0, 256, size=(64, 1 << 16), dtype=np.uint8)
    out = np.zeros_like(rows)
    native.copy_rows(out, np.arange(64, dtype=np.int32), rows, np.arange(64, dtype=np.int32)[::-1].copy())
    assert out.tobytes() == rows[::-1].tobytes()
    done = native.copy_stats() - before
    assert done.batches == 1 and done.streamed_batches == done.split_batches == done.streamed_bytes == 0, done


MIB = 2**20


@needs_library
@pytest.mark.parametrize(
    ("l3", "cores", "stream", "split"),
    [
        (260 * MIB, 2, 260 * MIB // 8, 8 * MIB),  # the machine the rule was measured on
        (48 * MIB, 2, 6 * MIB, 8 * MIB),
        (32 * MIB, 2, 4 * MIB, 8 * MIB),  # an eighth is the floor: AMD EPYC's per-CCX L3
        (8 * MIB, 16, 4 * MIB, 8 * MIB),  # never below 4 MiB
        (0, 2, 4 * MIB, 8 * MIB),  # L3 unknown: the floor
        (32 * MIB, 1, 4 * MIB, None),  # one core: no second thread
    ],
)
def test_copy_policy_follows_the_l3_and_the_cores(l3, cores, stream, split):
    policy = native.choose_copy_policy(l3, cores)
    assert (policy.l3_bytes, policy.cores, policy.stream_min_bytes, policy.split_min_bytes) == (
        l3,
        cores,
        stream,
        split,
    )


@needs_library
@pytest.mark.parametrize(
    ("spec", "want"),
    [
        ("", (48 * MIB, 2, 6 * MIB, 8 * MIB)),
        ("l3=32M", (32 * MIB, 2, 4 * MIB, 8 * MIB)),
        ("l3=262144K,cores=1", (256 * MIB, 1, 32 * MIB, None)),
        ("l3=1G", (2**30, 2, 128 * MIB, 8 * MIB)),
        ("stream=never,split=16MiB", (48 * MIB, 2, None, 16 * MIB)),
        ("stream=0,split=0", (48 * MIB, 2, 0, 0)),
        ("stream=1048576,split=never,l3=32M", (32 * MIB, 2, MIB, None)),
    ],
)
def test_copy_policy_overrides(spec, want):
    p = native.choose_copy_policy(48 * MIB, 2, spec)
    assert (p.l3_bytes, p.cores, p.stream_min_bytes, p.split_min_bytes) == want


@needs_library
@pytest.mark.parametrize(
    ("spec", "at"),
    [("l3", "'l3'"), ("l3=x", "'l3=x'"), ("l3=32M,threads=2", "'threads=2'"), ("cores=-1", "'cores=-1'"),
     ("l3=32Q", "'l3=32Q'"), ("l3=never", "'l3=never'"), ("store=48", "'store=48'")],
)  # fmt: skip
def test_copy_policy_refuses_what_it_cannot_read(spec, at):
    with pytest.raises(ValueError, match=f"cannot read the entry at offset \\d+ \\({at}\\)"):
        native.choose_copy_policy(48 * MIB, 2, spec)


@needs_library
def test_copy_policy_describes_itself():
    assert (
        native.choose_copy_policy(32 * MIB, 2).describe()
        == "L3 32 MiB, 2 cores: stream >= 4 MiB (64-byte stores), 2 threads >= 8 MiB"
    )
    assert (
        native.choose_copy_policy(0, 1, "stream=never").describe()
        == "L3 unknown, 1 cores: stream never (64-byte stores), 2 threads never"
    )


@needs_library
def test_the_process_policy_is_the_machines_with_the_environment_applied():
    code = "import jaxkv._native as n; p = n.copy_policy(); print(p.l3_bytes, p.cores, p.stream_min_bytes)"
    env = {**os.environ, "JAXKV_COPY_POLICY": "l3=32M,cores=1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [str(32 * MIB), "1", str(4 * MIB)]
    env["JAXKV_COPY_POLICY"] = "l3=lots"
    proc = subprocess.run(
        [sys.executable, "-W", "always", "-c", code], capture_output=True, text=True, timeout=120, env=env
    )
    assert proc.returncode == 0, proc.stderr
    assert "ignored JAXKV_COPY_POLICY: copy policy 'l3=lots'" in proc.stderr


@needs_library
@pytest.mark.parametrize(
    "spec", ["stream=never,split=never", "stream=0,split=never", "stream=0,split=0", "stream=never,split=0"]
)
@pytest.mark.parametrize("store", [16, 32, 64])  # SSE2, AVX2, AVX-512: at most what this CPU runs
@pytest.mark.parametrize("width", [100, 4099, 3 * 16384 + 4099])  # under one 128-byte store; under, over 16 KiB
def test_every_copy_policy_copies_the_same_bytes(spec, store, width, copy_policy):
    """copy_rows under each store and thread choice, rows of odd widths at odd addresses.

    A streaming copy aligns its stores to a line, walks 16 KiB spans as four
    interleaved 4 KiB streams, then 128-byte stores, then a tail: each part runs.
    """
    widest = copy_policy("").store_bytes
    assert copy_policy(f"{spec},store={store}").store_bytes == min(store, widest)
    rng = np.random.default_rng(1)
    src = rng.integers(0, 256, size=(40, width), dtype=np.uint8)
    dst = np.zeros((48, width + 5), np.uint8)[:, 3:-2]  # rows at odd addresses
    src_rows = rng.permutation(40)[:33].astype(np.int32)
    dst_rows = rng.permutation(48)[:33].astype(np.int32)
    native.copy_rows(dst, dst_rows, src, src_rows)
    assert dst[dst_rows].tobytes() == src[src_rows].tobytes()
    untouched = np.setdiff1d(np.arange(48), dst_rows)
    assert not dst[untouched].any()


@needs_library
@pytest.mark.parametrize(("spec", "widest", "want"), [("", 64, 64), ("", 32, 32), ("store=16", 64, 16),
                                                      ("store=64", 32, 32), ("store=32", 16, 16)])  # fmt: skip
def test_copy_policy_store_width_is_held_to_what_the_cpu_runs(spec, widest, want):
    assert native.choose_copy_policy(48 * MIB, 2, spec, widest).store_bytes == want
