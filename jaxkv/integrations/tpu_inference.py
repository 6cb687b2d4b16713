"""Route (a) for tpu-inference: `JaxkvCPUBackend`, a drop-in for its offload connector's `LocalCPUBackend`.

tpu-inference's `TPUOffloadConnector` keeps the KV blocks it offloads in a
`LocalCPUBackend`: an in-memory dict from *CPU chunk id* (a slot number its
scheduler hands out, at most `TPU_OFFLOAD_NUM_CPU_CHUNKS` of them) to the
value its worker copied off the device (one host `jax.Array` per chunk, or a
list of them for a hybrid model). Every chunk lives in RAM, so the chunk
count is bounded by host memory. `JaxkvCPUBackend` keeps the same contract
(`add`, `get`, `reclaim_unoccupied_chunks`, `num_saved_cpu_chunks`,
`current_size_bytes`, `cache`) but holds only `host_bytes` of chunks in
memory, least recently used out first, and the rest in a jaxkv `DiskTier`
(one verified file per chunk, the block format of `jaxkv.tiers.blockformat`):
a deployment holds as many chunks as its disk does.

Turn it on with one line, in the process that builds the connector's worker,
before the engine is built::

    jaxkv.integrations.tpu_inference.install(host_bytes=64 << 30, disk_directory="/local_nvme/kv", disk_bytes=1 << 40)

It replaces `LocalCPUBackend` in `tpu_inference.offload.tpu_offload_connector`'s
namespace, after checking that the class and the calls the worker makes on it
are the ones this module was written against (tpu-inference 0.25.0): if
tpu-inference changed them, `install` raises `TpuInferenceChanged` naming
each difference and replaces nothing.

What a value keeps: `get` returns arrays with the shapes, dtypes and
shardings (memory kind included) that `add` was given and the same bytes,
bit for bit (NaN payloads included): a chunk read back from disk is rebuilt
shard by shard (`jax.make_array_from_single_device_arrays`) from the bytes
of the addressable shards, one copy per distinct shard index.

Keys: chunk ids are slots, not content, so the disk key of a chunk is a hash
of a per-instance random namespace, the chunk id and a generation that every
`add` increments. An overwritten or reclaimed chunk's file is discarded at
once and its key is never asked for again: stale bytes cannot be served.

What route (a) cannot do: blocks do not outlive the instance. tpu-inference's
scheduler keeps its map from block hashes to chunk ids in memory; after a
restart (or at another TP degree) it knows none of the chunks, so the files
are garbage: a new backend deletes the previous run's files in
`disk_directory` when it first writes there. Reusing blocks across restarts,
instances and TP degrees needs a connector whose scheduler looks blocks up by
content hash in jaxkv's tiers (route (b), `jaxkv.integrations.vllm`). Route
(a) also has no remote tier: a shared store is useless when no other
instance can name a chunk.
"""

from __future__ import annotations

import fcntl
import hashlib
import inspect
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxkv._checks import check_positive_int
from jaxkv.tiers.blockformat import HEADER_BYTES, BlockKey, trailer_bytes
from jaxkv.tiers.disk import DiskTier

__all__ = ["JaxkvCPUBackend", "TpuInferenceChanged", "install", "uninstall"]

WRITTEN_AGAINST = "0.25.0"
"""The tpu-inference release whose `LocalCPUBackend` and connector worker this module was written and tested against."""

CONNECTOR_MODULE = "tpu_inference.offload.tpu_offload_connector"
"""The module whose `LocalCPUBackend` name `install` rebinds (the worker looks the class up there)."""

_EXPECTED_PARAMETERS = {
    "__init__": "(self, num_cpu_chunks)",
    "add": "(self, chunk_id, value)",
    "get": "(self, chunk_id)",
    "reclaim_unoccupied_chunks": "(self, occupied_chunk_ids)",
}
"""`LocalCPUBackend`'s methods in tpu-inference 0.25.0: their parameters, positional or keyword, no defaults
(annotations are not compared: tpu-inference spells chunk ids `CpuChunkId`, an alias of int)."""

_CONSTRUCTION = "LocalCPUBackend(num_cpu_chunks="
"""How `TPUOffloadConnectorWorker.__init__` builds its backend (the keyword `install`'s factory takes)."""

_LOCK_NAME = ".jaxkv-tpu-inference.lock"
"""A lock file in `disk_directory`: one live backend per directory (each deletes the files of the last)."""

_FINGERPRINT_TAG = b"jaxkv.integrations.tpu_inference route (a) v1\0"
"""Prefix of the disk fingerprint: these files are not jaxkv content-hashed blocks and never read as such."""


class TpuInferenceChanged(RuntimeError):
    """The installed tpu-inference's `LocalCPUBackend` or connector worker is not what `install` was written against."""


@dataclass(frozen=True)
class _ArraySpec:
    """One array of a chunk value: what `get` rebuilds and where its bytes lie in the disk row."""

    shape: tuple[int, ...]
    dtype: np.dtype
    sharding: jax.sharding.Sharding
    shards: tuple[tuple[Any, tuple], ...]
    """(device, index key) per addressable shard, in the order `make_array_from_single_device_arrays` takes."""
    offsets: tuple[tuple[tuple, int, int], ...]
    """(index key, byte offset in the row, bytes) per distinct shard index: replicas are stored once."""


def _index_key(index: tuple) -> tuple:
    return tuple((s.start, s.stop, s.step) if isinstance(s, slice) else s for s in index)


def _shard_shape(shape: tuple[int, ...], key: tuple) -> tuple[int, ...]:
    return tuple(
        len(range(*slice(*k).indices(n))) if isinstance(k, tuple) else 1 for n, k in zip(shape, key, strict=False)
    ) + tuple(shape[len(key) :])


@dataclass(frozen=True)
class _ChunkLayout:
    """The form every chunk of one backend shares: a single array or a list of them, each `_ArraySpec`."""

    is_list: bool
    arrays: tuple[_ArraySpec, ...]
    row_bytes: int

    @classmethod
    def of(cls, value) -> _ChunkLayout | None:
        """The layout of `value` (a `jax.Array` or a list of them), or None for anything else (it cannot be spilled)."""
        is_list = isinstance(value, list)
        arrays = value if is_list else [value]
        if not arrays or not all(isinstance(a, jax.Array) for a in arrays):
            return None
        specs, offset = [], 0
        for a in arrays:
            by_device = a.sharding.addressable_devices_indices_map(a.shape)
            shards = tuple((d, _index_key(i)) for d, i in by_device.items())
            offsets, seen = [], set()
            for _, key in shards:
                if key not in seen:
                    seen.add(key)
                    nbytes = int(np.prod(_shard_shape(a.shape, key), dtype=np.int64)) * a.dtype.itemsize
                    offsets.append((key, offset, nbytes))
                    offset += nbytes
            specs.append(_ArraySpec(tuple(a.shape), np.dtype(a.dtype), a.sharding, shards, tuple(offsets)))
        return cls(is_list, tuple(specs), offset)

    def mismatch(self, value) -> str | None:
        """Why `value` does not have this layout, or None."""
        arrays = value if isinstance(value, list) else [value]
        if isinstance(value, list) != self.is_list or len(arrays) != len(self.arrays):
            return f"{_describe(value)}, expected {'a list of' if self.is_list else 'one'} {len(self.arrays)} array(s)"
        for i, (a, spec) in enumerate(zip(arrays, self.arrays, strict=True)):
            if not isinstance(a, jax.Array):
                return f"element {i} is a {type(a).__name__}, expected a jax.Array"
            got = (tuple(a.shape), np.dtype(a.dtype), a.sharding)
            if got != (spec.shape, spec.dtype, spec.sharding):
                return f"array {i} is {got}, expected {(spec.shape, spec.dtype, spec.sharding)}"
        return None

    def fingerprint(self) -> bytes:
        """32 bytes naming this layout on disk (shapes, dtypes, shard indices: what the row's bytes mean)."""
        text = repr([(s.shape, s.dtype.str, s.offsets) for s in self.arrays]) + f" list={self.is_list}"
        return hashlib.sha256(_FINGERPRINT_TAG + text.encode()).digest()

    def to_row(self, value, row: np.ndarray) -> None:
        """Copy the bytes of every distinct shard of `value` into `row` (uint8, `row_bytes`)."""
        arrays = value if self.is_list else [value]
        for a, spec in zip(arrays, self.arrays, strict=True):
            by_key = {}  # one shard per distinct index: replicas hold the same bytes
            for shard in a.addressable_shards:
                by_key.setdefault(_index_key(shard.index), shard)
            for key, offset, nbytes in spec.offsets:
                data = np.ascontiguousarray(np.asarray(by_key[key].data))
                row[offset : offset + nbytes] = data.reshape(-1).view(np.uint8)

    def from_row(self, row: np.ndarray):
        """The value whose bytes `row` holds: arrays of this layout's shapes, dtypes and shardings."""
        arrays = []
        for spec in self.arrays:
            offsets = {key: (offset, nbytes) for key, offset, nbytes in spec.offsets}
            memory_kind = spec.sharding.memory_kind
            pieces = []
            for device, key in spec.shards:
                offset, nbytes = offsets[key]
                raw = row[offset : offset + nbytes]
                host = raw.view(spec.dtype).reshape(_shard_shape(spec.shape, key)).copy()
                pieces.append(jax.device_put(host, jax.sharding.SingleDeviceSharding(device, memory_kind=memory_kind)))
            arrays.append(jax.make_array_from_single_device_arrays(spec.shape, spec.sharding, pieces))
        return arrays if self.is_list else arrays[0]


def _describe(value) -> str:
    return f"a list of {len(value)}" if isinstance(value, list) else f"a {type(value).__name__}"


def _value_bytes(value) -> int:
    """Bytes a value occupies, counted as `LocalCPUBackend` counts them (`nbytes`, summed over a list)."""
    arrays = value if isinstance(value, list) else [value]
    return sum(int(getattr(a, "nbytes", 0)) for a in arrays)


def _metrics():
    """tpu-inference's metrics collector (host memory usage is reported to it), or None without tpu-inference."""
    try:
        from tpu_inference.offload.metrics import TPUKVCacheMetrics
    except ImportError:
        return None
    return TPUKVCacheMetrics.get_or_create()


class _Chunks(Mapping):
    """`backend.cache`: chunk id -> value of every chunk held, in memory or on disk (reading one reads it back)."""

    def __init__(self, backend: JaxkvCPUBackend):
        self._backend = backend

    def __getitem__(self, chunk_id):
        value = self._backend.get(chunk_id)
        if value is None:
            raise KeyError(chunk_id)
        return value

    def __contains__(self, chunk_id) -> bool:
        return chunk_id in self._backend._generation

    def __iter__(self) -> Iterator:
        return iter(list(self._backend._generation))

    def __len__(self) -> int:
        return len(self._backend._generation)


class JaxkvCPUBackend:
    """`LocalCPUBackend`'s contract over host memory within `host_bytes`, then a `DiskTier` (module docstring)."""

    def __init__(
        self,
        num_cpu_chunks: int,
        *,
        host_bytes: int,
        disk_directory: str | os.PathLike | None = None,
        disk_bytes: int | None = None,
    ):
        """`num_cpu_chunks`: the scheduler's chunk count (ids 0 .. num_cpu_chunks - 1), as for `LocalCPUBackend`.

        `host_bytes`: memory the chunks may hold (counted as `nbytes`); past it the least recently
        added or read chunks move to `disk_directory`, a `DiskTier` of at most `disk_bytes` of files.
        Without a directory every chunk must fit in `host_bytes`. The first `add` of a spillable value
        (a `jax.Array` or a list of them) fixes the chunk layout and checks the budgets: memory and
        disk together must hold `num_cpu_chunks` chunks, since the connector has no answer for a chunk
        its scheduler counts on and the backend lost (it stops that step's loads).
        """
        self.max_num_cpu_chunks = check_positive_int("num_cpu_chunks", num_cpu_chunks)
        """Chunk ids are 0 .. max_num_cpu_chunks - 1 (tpu-inference's name)."""
        self.host_bytes = check_positive_int("host_bytes", host_bytes)
        """Bytes of chunk values held in memory at most."""
        if disk_directory is None and disk_bytes is not None:
            raise ValueError(f"disk_bytes ({disk_bytes}) was given without disk_directory: give both or neither")
        if disk_directory is not None:
            if disk_bytes is None:
                raise ValueError(f"disk_directory ({str(disk_directory)!r}) needs disk_bytes: the disk budget in bytes")
            disk_bytes = check_positive_int("disk_bytes", disk_bytes)
        self.disk_directory = None if disk_directory is None else Path(disk_directory)
        self.disk_bytes = disk_bytes
        self.disk: DiskTier | None = None
        """The `DiskTier`, opened at the first spillable `add` (its row width is the chunk's size)."""
        self.layout: _ChunkLayout | None = None
        self.metrics_collector = _metrics()
        self._lock = threading.RLock()  # the connector adds from its save threads and gets from the model thread
        self._namespace = os.urandom(16)
        self._next_generation = 0
        self._generation: dict[int, int] = {}  # chunk id -> generation of its live value
        self._host: OrderedDict[int, Any] = OrderedDict()  # chunk id -> value, least recently used first
        self._sizes: dict[int, int] = {}  # chunk id -> bytes of its value, wherever it is
        self._host_used = 0
        self.current_size_bytes = 0
        """Bytes of every chunk held, in memory or on disk (`LocalCPUBackend` counts its one dict the same way)."""
        self.spills = 0
        """Chunks moved from memory to disk."""
        self.disk_reads = 0
        """Chunks read back from disk by `get`."""
        self._lock_file = None
        if self.disk_directory is not None:
            self._lock_directory()

    # -- LocalCPUBackend's contract -------------------------------------------
    @property
    def num_saved_cpu_chunks(self) -> int:
        """Chunks held now (`LocalCPUBackend`'s counter is not decremented by a reclaim; this one is)."""
        return len(self._generation)

    @property
    def cache(self) -> Mapping:
        """Chunk id -> value for every chunk held (`in`, `len`, iteration cost nothing; a lookup may read disk)."""
        return _Chunks(self)

    def add(self, chunk_id, value) -> bool:
        """Hold `value` under `chunk_id`, replacing what it held; True. ValueError for an id out of range."""
        self._check_chunk_id(chunk_id)
        with self._lock:
            self._first_value(value)
            self._forget(chunk_id)
            self._generation[chunk_id] = self._next_generation
            self._next_generation += 1
            size = _value_bytes(value)
            self._sizes[chunk_id] = size
            self.current_size_bytes += size
            if self.layout is not None and size > self.host_bytes:
                self._write(chunk_id, value)  # larger than memory's whole budget: straight to disk
            else:
                self._make_room(size)
                self._host[chunk_id] = value
                self._host_used += size
            self._report()
        return True

    def get(self, chunk_id):
        """The value held under `chunk_id` (exactly as added), or None."""
        with self._lock:
            if chunk_id in self._host:
                self._host.move_to_end(chunk_id)
                return self._host[chunk_id]
            if chunk_id not in self._generation:
                return None
            row = np.empty(self.layout.row_bytes, np.uint8)
            self.disk.get(self._key(chunk_id), row)
            self.disk_reads += 1
        return self.layout.from_row(row)

    def reclaim_unoccupied_chunks(self, occupied_chunk_ids) -> None:
        """Drop every chunk whose id is not in `occupied_chunk_ids` (its disk file too)."""
        keep = set(occupied_chunk_ids)
        with self._lock:
            for chunk_id in [c for c in self._generation if c not in keep]:
                self._forget(chunk_id)
            self._report()

    # -- the rest ----------------------------------------------------------------
    @property
    def host_used_bytes(self) -> int:
        """Bytes of the chunks held in memory now (at most `host_bytes`)."""
        return self._host_used

    def on_disk(self) -> list[int]:
        """Ids of the chunks held on disk (not in memory) now."""
        with self._lock:
            return [c for c in self._generation if c not in self._host]

    def close(self) -> None:
        """Delete this backend's files and release the directory (later calls may raise)."""
        with self._lock:
            if self.disk is not None:
                self.disk.clear()
                self.disk.close()
            if self._lock_file is not None:
                self._lock_file.close()
                self._lock_file = None

    def __repr__(self) -> str:
        disk = "" if self.disk is None else f", {self.disk!r}"
        return (
            f"JaxkvCPUBackend({len(self._generation)}/{self.max_num_cpu_chunks} chunks, "
            f"{self._host_used}/{self.host_bytes} host bytes{disk})"
        )

    def _check_chunk_id(self, chunk_id) -> None:
        if isinstance(chunk_id, bool) or not isinstance(chunk_id, (int, np.integer)):
            raise ValueError(f"chunk_id must be an int, got {chunk_id!r}")
        if not 0 <= chunk_id < self.max_num_cpu_chunks:
            raise ValueError(f"chunk_id ({chunk_id}) must be in [0, num_cpu_chunks ({self.max_num_cpu_chunks}))")

    def _first_value(self, value) -> None:
        """Fix the layout at the first value and check the budgets; later values must share it."""
        if self.layout is None:
            layout = _ChunkLayout.of(value)
            if layout is None:
                if self.disk_directory is not None:
                    raise ValueError(
                        f"value must be a jax.Array or a list of them to be stored on disk, got {_describe(value)}"
                    )
                return  # host only: any value, as LocalCPUBackend takes
            self._check_budgets(layout, _value_bytes(value))
            self.layout = layout
            if self.disk_directory is not None:
                self.disk = DiskTier(
                    self.disk_directory, self.disk_bytes, fingerprint=layout.fingerprint(), row_bytes=layout.row_bytes
                )
                self.disk.clear()  # an earlier run's chunks: no scheduler can name them any more
        elif self.disk is not None:
            why = self.layout.mismatch(value)
            if why is not None:
                raise ValueError(f"every chunk must share the first chunk's layout: {why}")

    def _check_budgets(self, layout: _ChunkLayout, chunk_bytes: int) -> None:
        in_memory = self.host_bytes // chunk_bytes if chunk_bytes else self.max_num_cpu_chunks
        if self.disk_directory is None:
            if in_memory < self.max_num_cpu_chunks:
                raise ValueError(
                    f"host_bytes ({self.host_bytes}) holds {in_memory} chunks of {chunk_bytes} bytes, "
                    f"fewer than num_cpu_chunks ({self.max_num_cpu_chunks}): give disk_directory and disk_bytes, "
                    f"or host_bytes >= {self.max_num_cpu_chunks * chunk_bytes}"
                )
            return
        # a DiskTier file: header, row, and a MAC when $JAXKV_BLOCK_KEY keys the blocks (DiskTier's default)
        file_bytes = HEADER_BYTES + layout.row_bytes + trailer_bytes(BlockKey.resolve(None))
        on_disk = self.disk_bytes // file_bytes
        if in_memory + on_disk < self.max_num_cpu_chunks:
            need = (self.max_num_cpu_chunks - in_memory) * file_bytes
            raise ValueError(
                f"host_bytes ({self.host_bytes}) holds {in_memory} chunks of {chunk_bytes} bytes and disk_bytes "
                f"({self.disk_bytes}) {on_disk} files of {file_bytes} bytes: {in_memory} + {on_disk} < "
                f"num_cpu_chunks ({self.max_num_cpu_chunks}); give disk_bytes >= {need}"
            )

    def _key(self, chunk_id: int) -> bytes:
        generation = self._generation[chunk_id]
        return hashlib.sha256(
            self._namespace + int(chunk_id).to_bytes(8, "little") + generation.to_bytes(8, "little")
        ).digest()

    def _forget(self, chunk_id) -> None:
        """Drop the chunk held under `chunk_id`, from memory or disk (nothing if none)."""
        if chunk_id not in self._generation:
            return
        size = self._sizes.pop(chunk_id)
        self.current_size_bytes -= size
        if chunk_id in self._host:
            del self._host[chunk_id]
            self._host_used -= size
        else:
            self.disk.discard(self._key(chunk_id))
        del self._generation[chunk_id]

    def _make_room(self, size: int) -> None:
        """Move least recently used chunks to disk until `size` more bytes fit in memory."""
        while self._host and self._host_used + size > self.host_bytes:
            if self.disk is None:
                raise ValueError(
                    f"host_bytes ({self.host_bytes}) is full ({self._host_used} bytes held) and there is no "
                    f"disk_directory: a chunk of {size} bytes does not fit"
                )
            chunk_id, value = next(iter(self._host.items()))
            self._write(chunk_id, value)
            del self._host[chunk_id]
            self._host_used -= self._sizes[chunk_id]
            self.spills += 1

    def _write(self, chunk_id: int, value) -> None:
        why = self.layout.mismatch(value)
        if why is not None:
            raise ValueError(f"chunk {chunk_id} cannot go to disk: {why}")
        row = np.empty(self.layout.row_bytes, np.uint8)
        self.layout.to_row(value, row)
        self.disk.put(self._key(chunk_id), row)
        lost = self.disk.take_evicted()
        if lost:  # the budget check makes this impossible; say so loudly if it is not
            raise RuntimeError(f"the disk tier evicted {len(lost)} live chunk(s): disk_bytes is too small")

    def _report(self) -> None:
        if self.metrics_collector is not None:
            self.metrics_collector.record_host_memory_usage(self._host_used)

    def _lock_directory(self) -> None:
        directory = self.disk_directory
        if directory.exists() and not directory.is_dir():
            raise ValueError(f"disk_directory ({str(directory)!r}) is not a directory")
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            lock = open(directory / _LOCK_NAME, "a+")  # noqa: SIM115 (held for the backend's life)
        except OSError as e:
            raise ValueError(f"disk_directory ({str(directory)!r}) cannot be used: {e}") from e
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.close()
            raise ValueError(
                f"disk_directory ({str(directory)!r}) is in use by another JaxkvCPUBackend: give each its own"
            ) from None
        self._lock_file = lock


# -- activation ------------------------------------------------------------------
_installed: dict[str, Any] = {}


def install(
    *, host_bytes: int, disk_directory: str | os.PathLike | None = None, disk_bytes: int | None = None
) -> list[JaxkvCPUBackend]:
    """Make tpu-inference's offload connector keep its chunks in a `JaxkvCPUBackend` with these budgets.

    Call it once, in the process that builds the connector's worker, before the engine is built.
    Checks first that tpu-inference's `LocalCPUBackend` and the worker's calls on it are what this
    module was written against; raises `TpuInferenceChanged` (nothing replaced) when they are not,
    and ValueError for a bad argument. Returns the list every backend built from now on joins (the
    connector builds one per worker). `uninstall()` puts the original back.
    """
    check_positive_int("host_bytes", host_bytes)
    if disk_directory is not None or disk_bytes is not None:
        if disk_directory is None or disk_bytes is None:
            raise ValueError(
                f"disk_directory ({disk_directory!r}) and disk_bytes ({disk_bytes!r}) go together: give both or neither"
            )
        check_positive_int("disk_bytes", disk_bytes)
        if os.path.exists(disk_directory) and not os.path.isdir(disk_directory):
            raise ValueError(f"disk_directory ({str(disk_directory)!r}) is not a directory")
    if _installed:
        raise RuntimeError("jaxkv's tpu-inference backend is installed already: call uninstall() first")
    connector = check_tpu_inference()
    original = connector.LocalCPUBackend
    backends: list[JaxkvCPUBackend] = []

    def build(num_cpu_chunks: int) -> JaxkvCPUBackend:
        backend = JaxkvCPUBackend(
            num_cpu_chunks, host_bytes=host_bytes, disk_directory=disk_directory, disk_bytes=disk_bytes
        )
        backends.append(backend)
        return backend

    build.__qualname__ = build.__name__ = "LocalCPUBackend"
    connector.LocalCPUBackend = build
    _installed.update(module=connector, original=original)
    return backends


def uninstall() -> None:
    """Put tpu-inference's own `LocalCPUBackend` back (backends already built keep running)."""
    if _installed:
        _installed["module"].LocalCPUBackend = _installed["original"]
        _installed.clear()


def _parameters(method) -> str:
    """`method`'s parameters as "(a, b)", or a description of what differs from plain ones."""
    parts = []
    for p in inspect.signature(method).parameters.values():
        plain = p.kind is p.POSITIONAL_OR_KEYWORD and p.default is p.empty
        parts.append(p.name if plain else str(p))
    return f"({', '.join(parts)})"


def check_tpu_inference():
    """The connector module, after checking that what `install` replaces is what it was written against.

    Raises `TpuInferenceChanged` listing every difference: the module or class gone, a method's
    signature, the worker building its backend some other way, or calling a method this backend lacks.
    """
    import importlib

    try:
        connector = importlib.import_module(CONNECTOR_MODULE)
    except ImportError as e:
        raise TpuInferenceChanged(f"cannot import {CONNECTOR_MODULE} ({e}): is tpu-inference installed?") from e
    changes = []
    cls = getattr(connector, "LocalCPUBackend", None)
    if not inspect.isclass(cls):
        changes.append(f"{CONNECTOR_MODULE}.LocalCPUBackend is {cls!r}, expected a class")
    else:
        for name, expected in _EXPECTED_PARAMETERS.items():
            method = getattr(cls, name, None)
            if method is None:
                changes.append(f"LocalCPUBackend.{name} is gone")
            elif _parameters(method) != expected:
                changes.append(f"LocalCPUBackend.{name}{inspect.signature(method)}, expected {name}{expected}")
        if not isinstance(getattr(cls, "num_saved_cpu_chunks", None), property):
            changes.append("LocalCPUBackend.num_saved_cpu_chunks is no longer a property")
    worker = getattr(connector, "TPUOffloadConnectorWorker", None)
    if worker is None:
        changes.append(f"{CONNECTOR_MODULE}.TPUOffloadConnectorWorker is gone")
    else:
        source = inspect.getsource(worker)
        if _CONSTRUCTION not in source:
            changes.append(f"TPUOffloadConnectorWorker no longer builds its backend as {_CONSTRUCTION}...)")
        for used in sorted(set(re.findall(r"self\.cpu_backend\.(\w+)", source))):
            if not hasattr(JaxkvCPUBackend, used):
                changes.append(f"TPUOffloadConnectorWorker calls cpu_backend.{used}, which JaxkvCPUBackend lacks")
    if changes:
        import importlib.metadata

        try:
            version = importlib.metadata.version("tpu-inference")
        except importlib.metadata.PackageNotFoundError:
            version = "unknown"
        raise TpuInferenceChanged(
            f"tpu-inference {version} is not what jaxkv's backend was written against ({WRITTEN_AGAINST}); "
            "nothing was replaced:\n  " + "\n  ".join(changes)
        )
    return connector
