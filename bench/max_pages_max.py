"""MAX's page copy, timed on the cases bench/max_pages.py times jaxkv's OffloadEngine on.

    <python with MAX> bench/max_pages_max.py SPEC.json

Run by bench/max_pages.py under a Python that has MAX installed (MAX 26.7 wants
Python 3.12; this file imports neither jax nor jaxkv, only numpy and MAX).
SPEC.json is `{"cases": [{"shape": [pages, kv, layers, tokens, heads, dim],
"ids": [...], "slots": [...]}, ...]}`: a bfloat16 cache of that shape on MAX's
CPU device, viewed as pages by `KVCacheBuffer.to_memory()` (the uint8
`[pages, bytes_per_page]` views MAX's block manager and offload code copy), and
a host pool of `len(ids)` rows allocated with `Usage.STAGING` (MAX's host
staging memory; page-locked where the backend has it, which the CPU does not).

The copy timed is MAX's own: per transfer, build the row views
(`dst[i, :]`, `src[j, :]`) and hand them to one `max.driver.batch_inplace_copy`,
then wait for the device (as `BlockManager._copy_blocks_across_replicas`
does), so MAX pays its per-transfer view building as jaxkv pays its own.

Protocol, so that bench/max_pages.py can interleave MAX's runs with jaxkv's
and both see the same machine load: this checks every case once (random bytes
D2H then H2D, compared byte for byte), prints one JSON line (MAX's version,
the entry point, the host pool's `pinned` flag), then for each `OP CASE` line
read from stdin (OP one of d2h, h2d, copy) runs that once and prints the
seconds it took; EOF ends it. `copy` is a numpy copy of the same bytes between
two preallocated arrays in this process: the limit MAX's figures are read
against.
"""

from __future__ import annotations

import json
import sys
import time
from importlib import metadata
from pathlib import Path

import numpy as np
from max import driver
from max.dtype import DType
from max.nn.kv_cache.cache_params import KVCacheBuffer

OPS = ("d2h", "h2d", "copy")


class Case:
    """One cache, its host pool and the page ids / host slots of one batch."""

    def __init__(self, spec: dict, device: driver.Device, rng: np.random.Generator):
        self.device = device
        cache = driver.Buffer(DType.bfloat16, spec["shape"], device=device)
        (memory,) = KVCacheBuffer(leaf_id="values", replicates_kv_across_tp=False, values=[cache]).to_memory().values()
        self.pages = memory.buffers[0]  # [pages, bytes_per_page] uint8 view of `cache`
        self.ids, self.slots = spec["ids"], spec["slots"]
        row_bytes = memory.bytes_per_page
        self.host = driver.Buffer(DType.uint8, [len(self.ids), row_bytes], device=device, usage=driver.Usage.STAGING)
        self.nbytes = len(self.ids) * row_bytes
        self._src, self._dst = np.ones(self.nbytes, np.uint8), np.empty(self.nbytes, np.uint8)
        self._check(rng)

    def d2h(self) -> None:
        pages, host = self.pages, self.host
        driver.batch_inplace_copy([host[s, :] for s in self.slots], [pages[i, :] for i in self.ids])
        self.device.synchronize()

    def h2d(self) -> None:
        pages, host = self.pages, self.host
        driver.batch_inplace_copy([pages[i, :] for i in self.ids], [host[s, :] for s in self.slots])
        self.device.synchronize()

    def copy(self) -> None:
        np.copyto(self._dst, self._src)

    def _check(self, rng: np.random.Generator) -> None:
        """Random bytes D2H, then H2D into other pages: both compared with numpy."""
        pages, host = np.from_dlpack(self.pages), np.from_dlpack(self.host)
        pages[:] = rng.integers(0, 256, pages.shape, dtype=np.uint8)
        self.d2h()
        if not np.array_equal(host[self.slots], pages[self.ids]):
            raise SystemExit("MAX d2h: host rows differ from the device pages copied")
        host[:] = rng.integers(0, 256, host.shape, dtype=np.uint8)
        self.h2d()
        if not np.array_equal(pages[self.ids], host[self.slots]):
            raise SystemExit("MAX h2d: device pages differ from the host rows copied")


def main() -> None:
    cases_spec = json.loads(Path(sys.argv[1]).read_text())["cases"]
    device = driver.CPU()
    rng = np.random.default_rng(0)
    cases = [Case(spec, device, rng) for spec in cases_spec]
    header = {
        "max": metadata.version("max"),
        "python": sys.version.split()[0],
        "device": f"{device.label}:{device.id}",
        "entry": "max.driver.batch_inplace_copy over KVCacheBuffer.to_memory() page views",
        "host_usage": "Usage.STAGING",
        "host_pinned": bool(cases[0].host.pinned) if cases else None,
    }
    print(json.dumps(header), flush=True)
    for line in sys.stdin:
        op, i = line.split()
        if op not in OPS:
            raise SystemExit(f"unknown op {op!r}: expected one of {OPS}")
        run = getattr(cases[int(i)], op)
        t0 = time.perf_counter()
        run()
        print(time.perf_counter() - t0, flush=True)


if __name__ == "__main__":
    main()
