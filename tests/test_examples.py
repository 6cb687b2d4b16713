"""The README's "Using it" section is examples/serving_loop.py, and it runs."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_using_it_is_the_serving_loop_example():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Using it", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```python\n(.*?)```", section, re.S)
    assert block == (ROOT / "examples" / "serving_loop.py").read_text()


def test_serving_loop_example_runs_and_serves_from_outside_the_device():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "serving_loop.py")], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    # The last two requests come back after eviction: part of their prefix from host memory or disk
    # (the example itself asserts their outputs are bit-identical to the first time).
    last = proc.stdout.strip().splitlines()[-3]
    assert "request r7" in last and ("'disk'" in last or "'host'" in last), proc.stdout


def test_readme_demo_sample_adds_up():
    """The sample output in the README: sources + recomputed == prompt tokens, percentages match."""
    readme = (ROOT / "README.md").read_text()
    sample = readme.split("### What the demo prints", 1)[1].split("```", 2)[1]
    total = int(re.search(r"([\d,]+) prompt tokens", sample).group(1).replace(",", ""))
    rows = re.findall(r"tokens (?:served from [\w ]+?|recomputed)\s+([\d,]+)\s+([\d.]+)%", sample)
    assert len(rows) == 4, sample
    counts = [int(n.replace(",", "")) for n, _ in rows]
    assert sum(counts) == total
    for n, pct in zip(counts, (float(p) for _, p in rows), strict=True):
        assert abs(100 * n / total - pct) < 0.051
