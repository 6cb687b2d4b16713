"""Shared benchmark plumbing: device set-up, timing, conditions, JSON output."""

from __future__ import annotations

import argparse
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


def copy_policy() -> str:
    """The native page copy's policy with the L3 and cores it was chosen for, or why there is none."""
    from jaxkv import _native

    if not _native.available():
        return "native kernels off"
    try:
        return _native.copy_policy().describe()
    except RuntimeError as e:  # a library built before the policy existed
        return str(e)


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
        "copy_policy": copy_policy(),
    }


def print_conditions(cond: dict, *, skip: tuple[str, ...] = ()) -> None:
    """The conditions line every benchmark prints above its tables (`skip`: keys printed elsewhere)."""
    print("conditions:", ", ".join(f"{k}={v}" for k, v in cond.items() if k not in skip))


def parser(doc: str | None) -> argparse.ArgumentParser:
    """An argument parser described by the first paragraph of the module docstring.

    Each benchmark adds its own `--quick` (smoke run): .ci/run runs with it
    every bench/*.py whose text names "--quick".
    """
    return argparse.ArgumentParser(description=(doc or "").split("\n\n")[0])


def gbps(nbytes: int, seconds: float | None) -> float | None:
    """GB/s (10^9 bytes) of moving `nbytes` in `seconds`; None for a case that did not run."""
    return None if seconds is None else nbytes / seconds / 1e9


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, None when either is missing."""
    return None if a is None or b is None else a / b


def paired(fast: list[float], slow: list[float]) -> list[float]:
    """Per round: throughput of `fast` relative to `slow` (slow seconds / fast seconds; > 1: `fast` is faster).

    Ratios taken within a round, where both saw the same machine load, then
    summarized (median, `spread`), rather than a ratio of two medians.
    """
    return [s / f for f, s in zip(fast, slow, strict=True)]


def spread(xs: list[float]) -> str:
    """'min-max' of per-round ratios, two decimals."""
    return f"{min(xs):.2f}-{max(xs):.2f}"


def interleaved(contenders: dict, order: list[str] | None = None, *, repeats: int) -> dict[str, float]:
    """Median seconds of each contender (name -> a call returning its seconds), the runs interleaved.

    Each round calls every contender once in `order` (default: insertion
    order), so all of them see the same machine load; round 0 warms up and is
    dropped.
    """
    names = [n for n in (order or list(contenders)) if n in contenders]
    runs = [{n: contenders[n]() for n in names} for _ in range(repeats + 1)][1:]
    return {n: statistics.median(r[n] for r in runs) for n in names}


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


def rounds(cases: dict, *, repeats: int, warmup: int) -> dict[str, list[float]]:
    """Seconds of each case's `fn()` per timed round; cases: name -> (setup or None, fn).

    Each round runs every case once, `setup()` (not timed) right before its
    `fn()`; the order reverses every round, so a drift of the machine (page
    cache writeback, CPU clocks, a neighbour's load) spreads over the tier and
    its baseline alike, and ratios are taken within a round (`paired`).
    """
    names = list(cases)
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(warmup + repeats):
        for name in names if i % 2 == 0 else names[::-1]:
            setup, fn = cases[name]
            if setup is not None:
                setup()
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            if i >= warmup:
                times[name].append(dt)
    return times


def timed(fn):
    """fn, made to return the seconds it took."""

    def run() -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    return run


MAX_VENV = Path("/tmp/maxvenv")  # where docs/benchmarks.md's set-up puts MAX (pip install max, Python 3.12)


def max_python() -> str | None:
    """A Python with MAX installed: `JAXKV_MAX_PYTHON`, else /tmp/maxvenv's, else None (no MAX comparison)."""
    if os.environ.get("JAXKV_MAX_PYTHON"):
        return os.environ["JAXKV_MAX_PYTHON"]
    python = MAX_VENV / "bin" / "python"
    return str(python) if python.exists() else None


class MaxProcess:
    """A bench helper script running under a Python with MAX (it wants its own Python, 3.12).

    The script prints one JSON line of conditions, then answers each request line on stdin with the
    seconds of one timed run, so MAX's runs interleave with jaxkv's under the same machine load.
    """

    def __init__(self, python: str, script: str, args: list[str], tmp: Path):
        path = Path(__file__).with_name(script)
        stderr = tmp / "stderr.txt"  # MAX's import warnings must not fill a pipe nobody reads
        with stderr.open("w") as err:
            self.proc = subprocess.Popen(
                [python, str(path), *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True
            )
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            lines = stderr.read_text().strip().splitlines()
            raise RuntimeError(f"{python} {path.name} failed: {lines[-1] if lines else 'no output'}")
        self.info = dict(interpreter=python, **json.loads(line))

    def ask(self, request: str) -> float:
        """Seconds of one timed run of `request` (a line the script understands)."""
        self.proc.stdin.write(f"{request}\n")
        self.proc.stdin.flush()
        return float(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)
