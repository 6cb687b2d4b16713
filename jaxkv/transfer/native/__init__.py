"""Native page kernels for XLA:CPU (memcpy per page), built on first use.

The C++ source sits beside this file. On first use it is compiled with the
system C++ compiler against the XLA FFI headers shipped with jaxlib, cached
under `$JAXKV_CACHE_DIR` (default `~/.cache/jaxkv`), and registered as the
FFI targets in `TARGETS` for the CPU
platform. Without a compiler, `available()` is False and jaxkv falls back to
its pure-XLA kernels (bit-exact, slower); set `JAXKV_NATIVE=0` to force that.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import subprocess
import tempfile
import warnings
from pathlib import Path

import jax
import jaxlib
import numpy as np

SOURCE = Path(__file__).with_name("page_copy.cc")
TARGETS = ("jaxkv_page_gather", "jaxkv_page_scatter", "jaxkv_page_scatter_from_pool")


def _cache_dir() -> Path:
    return Path(os.environ.get("JAXKV_CACHE_DIR", Path.home() / ".cache" / "jaxkv"))


def _build() -> Path:
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + jaxlib.__version__.encode()).hexdigest()[:16]
    lib = _cache_dir() / f"libjaxkv_pages-{key}.so"
    if lib.exists():
        return lib
    lib.parent.mkdir(parents=True, exist_ok=True)
    compiler = os.environ.get("CXX", "c++")
    with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:
        out = Path(tmp) / lib.name
        cmd = [
            compiler,
            "-O3",
            "-std=c++17",
            "-shared",
            "-fPIC",
            f"-I{jax.ffi.include_dir()}",
            str(SOURCE),
            "-o",
            str(out),
        ]
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        os.replace(out, lib)  # atomic: concurrent builders never see a partial file
    return lib


@functools.cache
def _library() -> ctypes.CDLL | None:
    if os.environ.get("JAXKV_NATIVE", "1") == "0":
        return None
    try:
        lib = ctypes.cdll.LoadLibrary(str(_build()))
    except (OSError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        warnings.warn(f"jaxkv: native CPU page kernels unavailable, using XLA kernels: {detail[:500]}", stacklevel=2)
        return None
    for name in TARGETS:
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, name)), platform="cpu")
    lib.jaxkv_copy_rows.restype = None
    lib.jaxkv_copy_rows.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64]
    lib.jaxkv_copy_rows.argtypes += [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    return lib


def available() -> bool:
    """Whether the native CPU kernels are built and registered (built on first call)."""
    return _library() is not None


def copy_rows(dst: np.ndarray, dst_rows: np.ndarray, src: np.ndarray, src_rows: np.ndarray) -> None:
    """dst[dst_rows[i]] = src[src_rows[i]] for 2-D uint8 arrays whose rows are contiguous.

    `dst` and `src` may be column slices of wider arrays (row strides differ
    from the width); rows are int32 and in range (the caller validated them).
    """
    lib = _library()
    width = dst.shape[1]
    assert src.shape[1] == width and dst.strides[1] == src.strides[1] == 1
    assert dst.flags.writeable and dst_rows.dtype == src_rows.dtype == np.int32 and dst_rows.size == src_rows.size
    d, s = np.ascontiguousarray(dst_rows), np.ascontiguousarray(src_rows)
    lib.jaxkv_copy_rows(
        dst.ctypes.data, dst.strides[0], src.ctypes.data, src.strides[0], width, d.ctypes.data, s.ctypes.data, d.size
    )
