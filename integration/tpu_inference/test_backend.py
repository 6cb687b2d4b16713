"""`JaxkvCPUBackend` against tpu-inference's own `LocalCPUBackend`: one contract, then what only jaxkv's does.

The contract tests run on both classes with the same assertions (tpu-inference 0.25.0's wheel ships
no tests/offload, so they are ours). Values are real host arrays: bf16 random bit patterns with NaN
payloads, sharded over a (data 2, model 4) mesh in pinned host memory, as the connector's worker
makes them; "equal" is byte equality of every addressable shard, never a tolerance.
"""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tpu_inference.offload.cpu_backend import LocalCPUBackend

from jaxkv.integrations import tpu_inference as route_a
from jaxkv.integrations.tpu_inference import JaxkvCPUBackend, TpuInferenceChanged

SHAPE = (1, 4, 16, 8, 2, 32)  # one chunk: [1, layers, block_size, kv heads, K/V, head_dim]
NAN_PAYLOADS = np.array(
    [0x7FC1, 0xFFC3, 0x7F81, 0xFF80, 0x7F80, 0x0001], np.uint16
)  # quiet/signalling NaNs, -inf, inf, a denormal


def mesh():
    return jax.make_mesh((2, 4), ("data", "model"))


def host_sharding(spec=None):
    return NamedSharding(mesh(), spec or P(None, None, None, "model"), memory_kind="pinned_host")


def chunk(seed: int, shape=SHAPE, dtype=jnp.bfloat16, sharding=None):
    """A host chunk of random bits (NaN payloads in its first row), as the worker's D2H leaves one."""
    itemsize = np.dtype(dtype).itemsize
    bits = np.random.default_rng(seed).integers(0, 1 << (8 * itemsize), size=shape, dtype=f"u{itemsize}")
    if itemsize == 2:
        bits.reshape(-1)[: NAN_PAYLOADS.size] = NAN_PAYLOADS
    return jax.device_put(bits.view(dtype), sharding or host_sharding())


def shard_bytes(value):
    arrays = value if isinstance(value, list) else [value]
    return [(s.device, s.index, np.asarray(s.data).tobytes()) for a in arrays for s in a.addressable_shards]


def assert_same(got, want):
    """Same structure, shapes, dtypes, shardings (memory kind included) and bytes of every shard."""
    assert isinstance(got, list) == isinstance(want, list)
    for g, w in zip(*(v if isinstance(v, list) else [v] for v in (got, want)), strict=True):
        assert (g.shape, g.dtype, g.sharding) == (w.shape, w.dtype, w.sharding)
    assert shard_bytes(got) == shard_bytes(want)


CHUNK_BYTES = chunk(0).nbytes


@pytest.fixture(params=["tpu-inference", "jaxkv-host", "jaxkv-disk"])
def make_backend(request, tmp_path):
    """Each backend under the contract: tpu-inference's, jaxkv's in memory only, jaxkv's with one chunk of memory."""

    def make(num_cpu_chunks: int):
        if request.param == "tpu-inference":
            return LocalCPUBackend(num_cpu_chunks=num_cpu_chunks)
        if request.param == "jaxkv-host":
            return JaxkvCPUBackend(num_cpu_chunks, host_bytes=num_cpu_chunks * 2 * CHUNK_BYTES)
        return JaxkvCPUBackend(
            num_cpu_chunks, host_bytes=CHUNK_BYTES, disk_directory=tmp_path / "kv", disk_bytes=1 << 24
        )

    return make


# -- the contract --------------------------------------------------------------------
def test_add_then_get_returns_the_value(make_backend):
    backend = make_backend(10)
    a = chunk(1)
    assert backend.add(0, a) is True
    assert_same(backend.get(0), a)
    assert backend.current_size_bytes == a.nbytes and backend.num_saved_cpu_chunks == 1
    assert backend.get(1) is None


def test_list_values_count_every_array(make_backend):
    backend = make_backend(10)
    if isinstance(backend, JaxkvCPUBackend) and backend.disk_directory is not None:
        pytest.skip("a backend with a disk takes one chunk layout; the list form is tested below")
    pair = [chunk(2), chunk(3)]
    backend.add(1, chunk(1))
    backend.add(2, pair)
    assert_same(backend.get(2), pair)
    assert backend.current_size_bytes == 3 * CHUNK_BYTES and backend.num_saved_cpu_chunks == 2


@pytest.mark.parametrize("chunk_id", [-1, 10])
def test_add_refuses_an_id_out_of_range(make_backend, chunk_id):
    backend = make_backend(10)
    with pytest.raises(ValueError, match=str(chunk_id)):
        backend.add(chunk_id, chunk(1))
    assert backend.num_saved_cpu_chunks == 0 and backend.current_size_bytes == 0


def test_add_over_an_id_replaces_its_value(make_backend):
    backend = make_backend(4)
    for i in range(4):
        backend.add(i, chunk(10 + i))
    backend.add(0, chunk(99))
    assert_same(backend.get(0), chunk(99))
    assert backend.num_saved_cpu_chunks == 4 and backend.current_size_bytes == 4 * CHUNK_BYTES
    for i in range(1, 4):
        assert_same(backend.get(i), chunk(10 + i))


def test_reclaim_keeps_only_the_occupied_chunks(make_backend):
    backend = make_backend(10)
    for i in range(3):
        backend.add(i, chunk(20 + i))
    backend.reclaim_unoccupied_chunks(occupied_chunk_ids=[0, 2])
    assert len(backend.cache) == 2 and 0 in backend.cache and 1 not in backend.cache and 2 in backend.cache
    assert backend.current_size_bytes == 2 * CHUNK_BYTES
    assert backend.get(1) is None
    assert_same(backend.get(2), chunk(22))
    backend.reclaim_unoccupied_chunks(occupied_chunk_ids=[])
    assert len(backend.cache) == 0 and backend.current_size_bytes == 0


# -- what only jaxkv's backend does ----------------------------------------------------------
def spilling(tmp_path, num_cpu_chunks=16, in_memory=3, **kw):
    return JaxkvCPUBackend(
        num_cpu_chunks,
        host_bytes=in_memory * CHUNK_BYTES,
        disk_directory=tmp_path / "kv",
        disk_bytes=num_cpu_chunks * (CHUNK_BYTES + 4096),
        **kw,
    )


def block_files(tmp_path):
    return sorted(p for p in (tmp_path / "kv").iterdir() if p.suffix == ".kvblock")


def test_chunks_past_the_host_budget_go_to_disk_and_come_back_bit_exact(tmp_path):
    backend = spilling(tmp_path)
    for i in range(16):
        backend.add(i, chunk(100 + i))
    assert backend.host_used_bytes == 3 * CHUNK_BYTES <= backend.host_bytes
    assert sorted(backend.on_disk()) == list(range(13)) and len(block_files(tmp_path)) == 13
    assert backend.spills == 13 and backend.current_size_bytes == 16 * CHUNK_BYTES
    for i in range(16):
        assert_same(backend.get(i), chunk(100 + i))
    assert backend.disk_reads == 13


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda s: chunk(s, dtype=jnp.float8_e4m3fn), id="fp8"),
        pytest.param(lambda s: chunk(s, sharding=host_sharding(P())), id="replicated"),
        pytest.param(
            lambda s: chunk(s, shape=(1, 4, 16, 6, 2, 32), sharding=host_sharding(P(None, None, None, "data"))),
            id="other-axis",
        ),
        pytest.param(
            lambda s: [chunk(s), chunk(s + 1, shape=(1, 2, 16, 4, 2, 64), sharding=host_sharding())], id="hybrid-list"
        ),
    ],
)
def test_other_layouts_round_trip_through_disk_bit_exact(tmp_path, make):
    first = make(0)
    size = sum(a.nbytes for a in (first if isinstance(first, list) else [first]))
    backend = JaxkvCPUBackend(8, host_bytes=size, disk_directory=tmp_path / "kv", disk_bytes=8 * (size + 4096))
    for i in range(8):
        backend.add(i, make(10 * i))
    assert len(backend.on_disk()) == 7
    for i in range(8):
        assert_same(backend.get(i), make(10 * i))


def test_a_float_nan_payload_survives_the_disk(tmp_path):
    backend = spilling(tmp_path, in_memory=1)
    a = chunk(5)
    backend.add(0, a)
    backend.add(1, chunk(6))  # pushes chunk 0 to disk
    assert backend.on_disk() == [0]
    got = np.asarray(backend.get(0)).reshape(-1)[: NAN_PAYLOADS.size]
    assert got.view(np.uint16).tolist() == NAN_PAYLOADS.tolist()
    assert got.dtype == ml_dtypes.bfloat16


def test_an_overwritten_chunk_never_serves_its_old_bytes(tmp_path):
    backend = spilling(tmp_path, in_memory=1)
    backend.add(5, chunk(1))
    backend.add(6, chunk(2))  # chunk 5 now on disk
    assert backend.on_disk() == [5]
    old_files = block_files(tmp_path)
    backend.add(5, chunk(3))  # the new value is in memory; the old file is gone at once
    assert set(block_files(tmp_path)).isdisjoint(old_files)
    assert_same(backend.get(5), chunk(3))
    backend.add(7, chunk(4))  # the new value of 5 goes to disk under a new key
    assert_same(backend.get(5), chunk(3))
    assert_same(backend.get(6), chunk(2))


def test_a_reclaimed_chunk_is_gone_from_memory_and_disk(tmp_path):
    backend = spilling(tmp_path, in_memory=1)
    for i in range(4):
        backend.add(i, chunk(30 + i))
    assert len(block_files(tmp_path)) == 3
    backend.reclaim_unoccupied_chunks([3])
    assert block_files(tmp_path) == [] and backend.get(0) is None and backend.num_saved_cpu_chunks == 1
    backend.add(0, chunk(40))
    assert_same(backend.get(0), chunk(40))


def test_a_new_backend_deletes_the_last_runs_files_and_two_cannot_share_a_directory(tmp_path):
    first = spilling(tmp_path, in_memory=1)
    for i in range(3):
        first.add(i, chunk(i))
    with pytest.raises(ValueError, match="in use by another JaxkvCPUBackend"):
        spilling(tmp_path)
    first._lock_file.close()  # the process that held it died: its lock went with it
    second = spilling(tmp_path, in_memory=1)
    second.add(0, chunk(50))
    assert block_files(tmp_path) == [] and second.get(1) is None
    second.add(1, chunk(51))
    assert len(block_files(tmp_path)) == 1
    second.close()
    assert block_files(tmp_path) == []


def test_a_disk_too_small_for_the_chunk_count_is_refused_with_the_arithmetic(tmp_path):
    backend = JaxkvCPUBackend(
        16, host_bytes=2 * CHUNK_BYTES, disk_directory=tmp_path / "kv", disk_bytes=10 * (CHUNK_BYTES + 96)
    )
    with pytest.raises(ValueError, match=r"2 \+ 10 < num_cpu_chunks \(16\); give disk_bytes >= "):
        backend.add(0, chunk(1))
    host_only = JaxkvCPUBackend(16, host_bytes=2 * CHUNK_BYTES)
    with pytest.raises(ValueError, match=r"holds 2 chunks .* fewer than num_cpu_chunks \(16\)"):
        host_only.add(0, chunk(1))


def test_a_chunk_of_another_layout_is_refused_once_a_disk_is_in_use(tmp_path):
    backend = spilling(tmp_path)
    backend.add(0, chunk(1))
    with pytest.raises(ValueError, match="share the first chunk's layout"):
        backend.add(1, chunk(2, dtype=jnp.float16))
    assert backend.num_saved_cpu_chunks == 1


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_cpu_chunks=0, host_bytes=1), r"num_cpu_chunks must be a positive int, got 0"),
        (dict(num_cpu_chunks=4, host_bytes=-5), r"host_bytes must be a positive int, got -5"),
        (dict(num_cpu_chunks=4, host_bytes=1, disk_bytes=9), r"disk_bytes \(9\) was given without disk_directory"),
        (dict(num_cpu_chunks=4, host_bytes=1, disk_directory="/tmp/x"), r"needs disk_bytes"),
        (dict(num_cpu_chunks=4, host_bytes=1, disk_directory="/tmp/x", disk_bytes=1.5), r"disk_bytes must be"),
    ],
)
def test_bad_arguments_name_the_argument_and_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        JaxkvCPUBackend(**kwargs)


def test_a_disk_directory_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("")
    with pytest.raises(ValueError, match="is not a directory"):
        JaxkvCPUBackend(4, host_bytes=1, disk_directory=tmp_path / "f", disk_bytes=1 << 20)
    with pytest.raises(ValueError, match="is not a directory"):
        route_a.install(host_bytes=1, disk_directory=tmp_path / "f", disk_bytes=1 << 20)


# -- activation ---------------------------------------------------------------------------
def test_install_replaces_the_class_the_worker_builds_and_uninstall_restores_it(tmp_path):
    from tpu_inference.offload import tpu_offload_connector as connector

    backends = route_a.install(host_bytes=1 << 20, disk_directory=tmp_path / "kv", disk_bytes=1 << 24)
    try:
        with pytest.raises(RuntimeError, match="installed already"):
            route_a.install(host_bytes=1 << 20)
        built = connector.LocalCPUBackend(num_cpu_chunks=7)
        assert isinstance(built, JaxkvCPUBackend) and backends == [built]
        assert built.max_num_cpu_chunks == 7 and built.disk_directory == tmp_path / "kv"
    finally:
        route_a.uninstall()
    assert connector.LocalCPUBackend is LocalCPUBackend


class _ChangedAdd(LocalCPUBackend):
    def add(self, chunk_id, value, pin=False) -> bool:  # a new parameter
        return super().add(chunk_id, value)


class _NoReclaim:
    def __init__(self, num_cpu_chunks: int):
        pass

    num_saved_cpu_chunks = property(lambda self: 0)


@pytest.mark.parametrize(
    "cls, named",
    [
        (_ChangedAdd, "LocalCPUBackend.add(self, chunk_id, value, pin=False) -> bool, expected add("),
        (_NoReclaim, "LocalCPUBackend.reclaim_unoccupied_chunks is gone"),
        (None, "LocalCPUBackend is None, expected a class"),
    ],
)
def test_install_refuses_a_changed_class_and_names_the_change(monkeypatch, cls, named):
    from tpu_inference.offload import tpu_offload_connector as connector

    monkeypatch.setattr(connector, "LocalCPUBackend", cls)
    with pytest.raises(TpuInferenceChanged, match="nothing was replaced") as raised:
        route_a.install(host_bytes=1 << 20)
    assert named in str(raised.value)
    assert connector.LocalCPUBackend is cls and not route_a._installed


def test_install_refuses_a_worker_that_calls_a_method_the_backend_lacks(monkeypatch):
    from tpu_inference.offload import tpu_offload_connector as connector

    class Worker(connector.TPUOffloadConnectorWorker):
        def evict(self):
            self.cpu_backend.pin_chunks([1])

    monkeypatch.setattr(connector, "TPUOffloadConnectorWorker", Worker)
    with pytest.raises(TpuInferenceChanged, match="calls cpu_backend.pin_chunks, which JaxkvCPUBackend lacks"):
        route_a.install(host_bytes=1 << 20)


def test_import_jaxkv_does_not_import_the_integration():
    code = "import sys, jaxkv; assert 'jaxkv.integrations.tpu_inference' not in sys.modules; assert 'tpu_inference' not in sys.modules"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)
