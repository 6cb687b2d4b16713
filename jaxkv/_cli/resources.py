"""What this machine can hold, checked before the CLI allocates anything.

A cache too large for the machine must be refused up front with a line that
names the option to change: allocating it instead fails late (a MemoryError
after the setup work), inside numpy (a multi-TiB allocation error), or not at
all (device allocation is asynchronous and a failure surfaces only when the
buffer is used).
"""

from __future__ import annotations

import os
from pathlib import Path

CGROUP = Path("/sys/fs/cgroup")
"""cgroup v2 mount: a container's memory limit is `memory.max`, its use `memory.current`."""


def host_available_bytes() -> int:
    """Host memory this process can still allocate: MemAvailable, capped by the cgroup's headroom."""
    available = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024  # the kernel reports kB (KiB)
                break
    except (OSError, ValueError, IndexError):
        pass
    if available is None:  # not Linux, or an old kernel: free pages only (ignores reclaimable cache)
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    try:
        limit = (CGROUP / "memory.max").read_text().strip()
        if limit != "max":
            used = int((CGROUP / "memory.current").read_text())
            available = min(available, max(0, int(limit) - used))
    except (OSError, ValueError):
        pass
    return available


def shares_host_memory(devices) -> bool:
    """Whether the devices' memory is host memory (CPU devices): caches and host pools then compete."""
    return all(d.platform == "cpu" for d in devices)


def device_budget(devices) -> tuple[int, str] | None:
    """Bytes a cache spread evenly over `devices` may take in total, and a phrase saying why; None if unknown.

    CPU devices share the host's available memory. A GPU or TPU reports its
    limit in `memory_stats()["bytes_limit"]`; the smallest free amount over
    the devices bounds every shard, so the total is that times the device count.
    """
    n = len(devices)
    if shares_host_memory(devices):
        host = host_available_bytes()
        return host, f"the {n} cpu devices share the host's {fmt_bytes(host)} of available memory"
    free = []
    for d in devices:
        stats = d.memory_stats() or {}
        if "bytes_limit" not in stats:
            return None
        free.append(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    platform = devices[0].platform
    return n * min(free), f"the {n} {platform} devices have {fmt_bytes(min(free))} free each"


def fmt_bytes(n: int) -> str:
    """`n` bytes in binary units, e.g. '23.2 GiB'."""
    if n < 1024:
        return f"{n} B"
    size = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        size /= 1024
        if size < 1024 or unit == "PiB":
            break
    return f"{size:.1f} {unit}"
