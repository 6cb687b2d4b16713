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
