"""jaxkv's native CPU kernels: one shared library, built when jaxkv is installed.

The build (CMakeLists.txt at the repository root, run by scikit-build-core at
`pip install`) compiles every `*.cc` beside this file into `LIBRARY` and puts it
in this package's directory; nothing compiles at import or first use. This
module finds it, checks that it was built against this jaxlib (major.minor:
its XLA FFI headers come from jaxlib), loads it with ctypes, and registers its
XLA FFI handlers (`FFI_TARGETS`) for the CPU platform.

The page kernels serve XLA:CPU only: the engine checks the platform before
asking `available()`, so a GPU or TPU process never moves pages through them.
Block hashing (jaxkv.prefix.hashing, scheduler-side CPU work in any process)
loads the library too; registering CPU FFI handlers in a GPU process costs
nothing and changes nothing there. Where it was
not built (no C++ compiler, `JAXKV_NATIVE=0` at install), does not load, or was
built for another jaxlib, `available()` is False, one warning says why, and
jaxkv runs its pure-XLA kernels (bit-exact, slower). `JAXKV_NATIVE=0` at run
time turns the kernels off without a warning.

The page copies follow a copy policy (`CopyPolicy`) chosen at start-up from
the L3 size and the cores this process may use: a batch that touches a quarter
of the L3 or more (source and destination: batch >= L3 / 8, 4 MiB at least) is
copied with streaming stores, a batch of 8 MiB or more on two threads when
there are two cores or more.
`JAXKV_COPY_POLICY` overrides it: comma-separated `key=value` entries,
`l3=SIZE` and `cores=N` (choose as if the machine had these), `stream=SIZE`
and `split=SIZE` (the thresholds themselves; `never`, or 0 for always),
`store=16|32|64` (the streaming store's width: SSE2, AVX2, AVX-512; at most
what the CPU runs, the default); SIZE is bytes with an optional K/M/G suffix. Example: `JAXKV_COPY_POLICY=l3=32M`,
`JAXKV_COPY_POLICY=stream=never,split=16M`. A value it cannot read is
ignored with one warning.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import os
import sys
import warnings
from pathlib import Path

import jax
import numpy as np

LIBRARY = {"darwin": "libjaxkv_native.dylib", "win32": "jaxkv_native.dll"}.get(sys.platform, "libjaxkv_native.so")
"""File name of the built library (CMake's name for the `jaxkv_native` target on this platform)."""

FFI_TARGETS = (
    "jaxkv_page_gather",
    "jaxkv_page_scatter",
    "jaxkv_page_scatter_from_pool",
    "jaxkv_token_scatter",
    "jaxkv_done",
)
"""XLA FFI handlers in page_copy.cc, registered under these names for platform 'cpu'."""


def library_path() -> Path | None:
    """The built library, or None when the install built none.

    Searched in every directory of this package's `__path__`: the package
    directory of a regular install; for an editable install (scikit-build-core's
    redirect mode) the source tree and the tree the build installed into.
    """
    for directory in __path__:
        path = Path(directory) / LIBRARY
        if path.is_file():
            return path
    return None


def _jaxlib_version() -> str:
    import jaxlib

    return getattr(jaxlib, "__version__", "unknown")


def _major_minor(version: str) -> tuple[str, ...]:
    return tuple(version.split(".")[:2])


def _unavailable(reason: str) -> None:
    # Called once per process: library() is cached.
    warnings.warn(f"jaxkv: native CPU kernels unavailable, using the pure-XLA kernels: {reason}", stacklevel=3)


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded library with its FFI handlers registered, or None (see the module docstring).

    Other native entry points (plain C functions called through ctypes) are
    attributes of it; test one with `hasattr`, since a build may lack a source
    whose dependency it did not find.
    """
    if os.environ.get("JAXKV_NATIVE", "1") == "0":
        return None
    path = library_path()
    if path is None:
        _unavailable(
            f"{LIBRARY} was not built when jaxkv was installed (no C++ compiler, or JAXKV_NATIVE=0); "
            "reinstall jaxkv with a C++ compiler to build it"
        )
        return None
    try:
        lib = ctypes.CDLL(str(path))
        lib.jaxkv_built_with_jaxlib.restype = ctypes.c_char_p
        built = lib.jaxkv_built_with_jaxlib().decode()
    except (OSError, AttributeError) as e:
        _unavailable(f"cannot load {path}: {e}")
        return None
    running = _jaxlib_version()
    if _major_minor(built) != _major_minor(running):
        _unavailable(
            f"{path} was built against jaxlib {built}, but jaxlib {running} is running; "
            "reinstall jaxkv to rebuild it against this jaxlib"
        )
        return None
    for name in FFI_TARGETS:
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, name)), platform="cpu")
    lib.jaxkv_copy_rows.restype = ctypes.c_int64
    lib.jaxkv_copy_rows.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64]  # dst, stride, rows
    lib.jaxkv_copy_rows.argtypes += [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64]  # src, stride, rows
    lib.jaxkv_copy_rows.argtypes += [ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    if hasattr(lib, "jaxkv_copy_pages"):
        lib.jaxkv_copy_pages.restype = None
        lib.jaxkv_copy_pages.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64]
    if hasattr(lib, "jaxkv_copy_policy_choose"):  # absent from a library built before the copy policy
        lib.jaxkv_copy_policy_choose.restype = ctypes.c_int
        lib.jaxkv_copy_policy_choose.argtypes = [ctypes.c_char_p] + [ctypes.c_int64] * 3 + [ctypes.c_void_p]
        lib.jaxkv_copy_policy_set.restype = ctypes.c_int
        lib.jaxkv_copy_policy_set.argtypes = [ctypes.c_char_p]
        lib.jaxkv_copy_policy_current.restype = None
        lib.jaxkv_copy_policy_current.argtypes = [ctypes.c_void_p]
    if hasattr(lib, "jaxkv_copy_stats"):
        lib.jaxkv_copy_stats.restype = None
        lib.jaxkv_copy_stats.argtypes = [ctypes.c_void_p]
        spec = os.environ.get("JAXKV_COPY_POLICY", "")
        if _choose(lib, spec, 0, 1, 64) is None:
            warnings.warn(f"jaxkv: ignored JAXKV_COPY_POLICY: {_bad_spec(lib, spec)}", stacklevel=2)
    if hasattr(lib, "jaxkv_transpose_chunks"):
        lib.jaxkv_transpose_chunks.restype = None
        lib.jaxkv_transpose_chunks.argtypes = [ctypes.c_void_p, ctypes.c_void_p] + [ctypes.c_int64] * 3
    return lib


def available() -> bool:
    """Whether the native CPU kernels are built, match this jaxlib, and are registered with XLA."""
    return library() is not None


_NEVER = 2**63 - 1  # the native library's "never" threshold


@dataclasses.dataclass(frozen=True)
class CopyPolicy:
    """How the native page copies move a batch (see the module docstring for the rule and its override)."""

    l3_bytes: int
    """The L3 size the policy was chosen for (0: the machine did not say)."""
    cores: int
    """The cores the policy was chosen for (the process's affinity mask: `taskset` counts)."""
    stream_min_bytes: int | None
    """Batches of at least this many bytes are copied with streaming (non-temporal) stores; None: never."""
    split_min_bytes: int | None
    """Batches of at least this many bytes are split between two threads; None: never."""
    store_bytes: int
    """Bytes of one streaming store: 64 (AVX-512), 32 (AVX2), 16 (SSE2); 0 where there are none (not x86-64)."""

    def describe(self) -> str:
        """One line for a benchmark's conditions: 'L3 48 MiB, 2 cores: stream >= 12 MiB, 2 threads >= 8 MiB'."""

        def mib(n: int | None) -> str:
            return "never" if n is None else f">= {n / 2**20:g} MiB"

        l3 = f"L3 {self.l3_bytes / 2**20:g} MiB" if self.l3_bytes else "L3 unknown"
        return (
            f"{l3}, {self.cores} cores: stream {mib(self.stream_min_bytes)} ({self.store_bytes}-byte stores), "
            f"2 threads {mib(self.split_min_bytes)}"
        )


def _policy(out) -> CopyPolicy:
    stream, split = (None if int(v) == _NEVER else int(v) for v in out[2:4])
    return CopyPolicy(int(out[0]), int(out[1]), stream, split, int(out[4]))


def _choose(lib: ctypes.CDLL, spec: str, l3_bytes: int, cores: int, widest_store: int) -> CopyPolicy | None:
    out = (ctypes.c_int64 * 5)()
    if lib.jaxkv_copy_policy_choose(spec.encode(), l3_bytes, cores, widest_store, out) != 0:
        return None
    return _policy(out)


def _bad_spec(lib: ctypes.CDLL, spec: str) -> str:
    out = (ctypes.c_int64 * 5)()
    at = lib.jaxkv_copy_policy_choose(spec.encode(), 0, 1, 64, out) - 1
    return (
        f"copy policy {spec!r}: cannot read the entry at offset {at} ({spec[at:]!r}); expected comma-separated "
        "l3=SIZE, cores=N, stream=SIZE|never, split=SIZE|never, store=16|32|64 (SIZE: bytes, optional K/M/G suffix)"
    )


def _library_or_raise() -> ctypes.CDLL:
    lib = library()
    if lib is None:
        raise RuntimeError("jaxkv's native library is not available; check jaxkv._native.available() first")
    if not hasattr(lib, "jaxkv_copy_policy_choose"):
        raise RuntimeError(f"{library_path()} predates the copy policy; reinstall jaxkv to rebuild it")
    return lib


def choose_copy_policy(l3_bytes: int, cores: int, spec: str = "", widest_store: int = 64) -> CopyPolicy:
    """The policy the native copies would use with an L3 of `l3_bytes` (0: unknown) and `cores`, `spec` applied.

    `widest_store`: the widest streaming store the CPU runs (64, 32, 16); a
    `store=` override is held to it.

    A pure function of its arguments (the machine is not read, nothing
    changes): tests and benchmarks inject cache sizes through it. `spec` has
    `JAXKV_COPY_POLICY`'s syntax; `ValueError` names the entry it cannot read.
    """
    lib = _library_or_raise()
    policy = _choose(lib, spec, l3_bytes, cores, widest_store)
    if policy is None:
        raise ValueError(_bad_spec(lib, spec))
    return policy


def copy_policy() -> CopyPolicy:
    """The policy the native copies use now (chosen at start-up from this machine and `JAXKV_COPY_POLICY`)."""
    lib = _library_or_raise()
    out = (ctypes.c_int64 * 5)()
    lib.jaxkv_copy_policy_current(out)
    return _policy(out)


@dataclasses.dataclass(frozen=True)
class CopyStats:
    """What the native page copies did since the process started (`copy_stats`)."""

    batches: int
    """Batches copied (one per gather, scatter or row copy call)."""
    streamed_batches: int
    """Of them, copied with streaming (non-temporal) stores."""
    streamed_bytes: int
    """Bytes of the streamed batches."""
    split_batches: int
    """Of them, split between two threads."""

    def __sub__(self, other: CopyStats) -> CopyStats:
        return CopyStats(*(a - b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other), strict=True)))


def copy_stats() -> CopyStats:
    """Counters of the native page copies: which path each batch took (subtract two snapshots for one call's)."""
    lib = _library_or_raise()
    if not hasattr(lib, "jaxkv_copy_stats"):
        raise RuntimeError(f"{library_path()} predates copy_stats; reinstall jaxkv to rebuild it")
    out = (ctypes.c_int64 * 4)()
    lib.jaxkv_copy_stats(out)
    return CopyStats(*(int(v) for v in out))


def set_copy_policy(spec: str | None = None) -> CopyPolicy:
    """Rechoose the policy from this machine with `spec` (`JAXKV_COPY_POLICY`'s syntax; None: that variable's value).

    For tests and benchmarks that compare policies in one process; returns the
    new policy. `ValueError` (policy unchanged) for an entry it cannot read.
    """
    lib = _library_or_raise()
    spec = os.environ.get("JAXKV_COPY_POLICY", "") if spec is None else spec
    if lib.jaxkv_copy_policy_set(spec.encode()) != 0:
        raise ValueError(_bad_spec(lib, spec))
    return copy_policy()


def _check_rows_array(name: str, a) -> None:
    if not isinstance(a, np.ndarray) or a.ndim != 2 or a.dtype != np.uint8 or a.strides[1] != 1:
        got = f"{a.dtype} array of shape {a.shape}, strides {a.strides}" if isinstance(a, np.ndarray) else type(a)
        raise ValueError(f"{name} must be a 2-D uint8 numpy array with contiguous rows, got {got}")


def _check_row_ids(name: str, ids) -> None:
    if not isinstance(ids, np.ndarray) or ids.ndim != 1 or ids.dtype != np.int32:
        got = f"{ids.dtype} array of shape {ids.shape}" if isinstance(ids, np.ndarray) else type(ids).__name__
        raise ValueError(f"{name} must be a 1-D int32 numpy array, got {got}")


def _check_pair(dst, dst_rows, src, src_rows, at: str = "") -> None:
    """What `copy_rows` (and each pair of `copy_pages`, `at` = "[i]") checks before any byte moves, but ranges."""
    _check_rows_array(f"dst{at}", dst)
    _check_rows_array(f"src{at}", src)
    if dst.shape[1] != src.shape[1]:
        raise ValueError(f"dst{at} and src{at} rows must have one width, got {dst.shape[1]} and {src.shape[1]} bytes")
    if not dst.flags.writeable:
        raise ValueError(f"dst{at} must be writeable")
    _check_row_ids(f"dst_rows{at}", dst_rows)
    _check_row_ids(f"src_rows{at}", src_rows)
    if dst_rows.size != src_rows.size:
        raise ValueError(f"dst_rows{at} and src_rows{at} must have one length, got {dst_rows.size} and {src_rows.size}")


def copy_rows(dst: np.ndarray, dst_rows: np.ndarray, src: np.ndarray, src_rows: np.ndarray) -> None:
    """dst[dst_rows[i]] = src[src_rows[i]] for 2-D uint8 arrays whose rows are contiguous: one memcpy per row.

    `dst` and `src` may be column slices of wider arrays (row strides differ
    from the width). Raises `ValueError` naming the argument at fault, before
    any byte moves: a wrong array kind, widths that differ, a read-only `dst`,
    row ids that are not 1-D int32 of one length, or a row id out of range.
    Raises `RuntimeError` if the library is not available (check `available()`).
    """
    _check_pair(dst, dst_rows, src, src_rows)
    lib = library()
    if lib is None:
        raise RuntimeError("jaxkv's native library is not available; check jaxkv._native.available() first")
    d, s = np.ascontiguousarray(dst_rows), np.ascontiguousarray(src_rows)
    bad = lib.jaxkv_copy_rows(
        dst.ctypes.data, dst.strides[0], len(dst), src.ctypes.data, src.strides[0], len(src), dst.shape[1],
        d.ctypes.data, s.ctypes.data, d.size,
    )  # fmt: skip
    if bad >= 0:
        name, rows, limit = ("dst_rows", d, len(dst)) if not 0 <= d[bad] < len(dst) else ("src_rows", s, len(src))
        raise ValueError(f"{name}[{bad}] is {int(rows[bad])}, outside the valid range [0, {limit})")


def copy_pages(dst: list[tuple[np.ndarray, np.ndarray]], src: list[tuple[np.ndarray, np.ndarray]]) -> bool:
    """`copy_rows` for several (dst, dst_rows) / (src, src_rows) pairs at once, as one batch; False without it.

    Pair i copies `dst_i[dst_rows_i[j]] = src_i[src_rows_i[j]]`. One batch, so
    the copy policy (streaming stores, a second thread) is chosen from the
    bytes of every pair together, and the two threads split them all. Checked
    as `copy_rows` checks (ValueError naming the argument, before any byte
    moves). False when the library lacks the entry point (the caller copies
    pair by pair).
    """
    lib = library()
    if lib is None or not hasattr(lib, "jaxkv_copy_pages"):
        return False
    if len(dst) != len(src):
        raise ValueError(f"dst and src must pair up, got {len(dst)} and {len(src)} pairs")
    dst_addresses, src_addresses, sizes = [], [], []
    for i, ((d, d_rows), (s, s_rows)) in enumerate(zip(dst, src, strict=True)):
        _check_pair(d, d_rows, s, s_rows, f"[{i}]")
        for name, rows, a in ((f"dst_rows[{i}]", d_rows, d), (f"src_rows[{i}]", s_rows, s)):
            bad = np.flatnonzero((rows < 0) | (rows >= len(a)))
            if bad.size:
                j = int(bad[0])
                raise ValueError(f"{name}[{j}] is {int(rows[j])}, outside the valid range [0, {len(a)})")
        dst_addresses.append(np.uint64(d.ctypes.data) + d_rows.astype(np.uint64) * np.uint64(d.strides[0]))
        src_addresses.append(np.uint64(s.ctypes.data) + s_rows.astype(np.uint64) * np.uint64(s.strides[0]))
        sizes.append(np.full(d_rows.size, d.shape[1], np.int64))
    if not sizes:
        return True
    d_all, s_all, n_all = (np.ascontiguousarray(np.concatenate(x)) for x in (dst_addresses, src_addresses, sizes))
    lib.jaxkv_copy_pages(d_all.ctypes.data, s_all.ctypes.data, n_all.ctypes.data, n_all.size)
    return True


def transpose_chunks(dst: np.ndarray, src: np.ndarray, rows: int, cols: int, chunk_bytes: int) -> bool:
    """`dst[c, r] = src[r, c]` for a `[rows, cols]` matrix of `chunk_bytes`-byte elements, in one native pass.

    Contiguous uint8 buffers of exactly `rows * cols * chunk_bytes` bytes
    (ValueError otherwise, before any byte moves), not overlapping. Returns
    False, copying nothing, when the library lacks the kernel (the caller
    falls back to numpy). The GIL is released while it runs.
    """
    n = rows * cols * chunk_bytes
    for name, a in (("dst", dst), ("src", src)):
        if not isinstance(a, np.ndarray) or a.dtype != np.uint8 or a.size != n or not a.flags.c_contiguous:
            got = f"{a.dtype} array of {a.size} bytes" if isinstance(a, np.ndarray) else type(a).__name__
            raise ValueError(f"{name} must be a contiguous uint8 array of {n} bytes, got {got}")
    if not dst.flags.writeable:
        raise ValueError("dst must be writeable")
    lib = library()
    if lib is None or not hasattr(lib, "jaxkv_transpose_chunks"):
        return False
    lib.jaxkv_transpose_chunks(dst.ctypes.data, src.ctypes.data, rows, cols, chunk_bytes)
    return True
