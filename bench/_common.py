"""Shared benchmark plumbing: device set-up, timing, conditions, JSON output."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import jax

# $JAXKV_BENCH_RESULTS redirects the JSON and a smoke run's figures (CI's smoke runs write to a temp dir).
RESULTS = Path(os.environ.get("JAXKV_BENCH_RESULTS") or Path(__file__).resolve().parent / "results")


def setup_devices(n_cpu: int = 8) -> None:
    """Simulate `n_cpu` CPU devices (ignored by GPU/TPU backends); call before any jax use."""
    jax.config.update("jax_num_cpu_devices", n_cpu)


def conditions() -> dict:
    """What the numbers were measured on, printed beside every table."""
    devices = jax.devices()
    return {
        "jax": jax.__version__,
        "backend": devices[0].platform,
        "device_kind": devices[0].device_kind,
        "devices": len(devices),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "machine": platform.machine(),
    }


def git_state() -> str:
    """The commit the benchmark ran on, '+dirty' when the tree has uncommitted changes."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        )
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def median_seconds(fn, *, repeats: int = 7, warmup: int = 2) -> float:
    """Median wall time of `fn()`; `fn` must block until its work is done."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def print_table(title: str, rows: list[dict], columns: list[tuple[str, str, str]]) -> None:
    """rows: dicts; columns: (key, header, format spec). A missing or None value prints as '-'."""
    print(f"\n{title}")
    headers = [h for _, h, _ in columns]
    cells = [["-" if r.get(k) is None else format(r[k], f) for k, _, f in columns] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    print("  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True)))
    for c in cells:
        print("  ".join(x.rjust(w) for x, w in zip(c, widths, strict=True)))


def write_json(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def save_figure(fig, path: Path, dpi: int = 110) -> None:
    """Lay out, write and close a matplotlib figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
