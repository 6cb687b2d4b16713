"""End to end: manager -> tiered connector -> engine -> tiny model, on a small workload."""

import json
import subprocess
import sys

import pytest

from jaxkv._cli.demo import DemoConfig, DemoError, run_demo

# Small enough for CI, tight enough that pages go to host and disk and come back.
SMALL = dict(
    system_prompts=2,
    conversations=6,
    turns=3,
    system_tokens=32,
    user_tokens=16,
    reply_tokens=3,
    device_pages=7,
    host_pages=6,
    disk_mib=64,
    progress=False,
)


@pytest.mark.parametrize("dtype", ["bf16", "fp8"])
@pytest.mark.parametrize("model", ["mha", "mla"])
def test_demo_end_to_end_uses_every_tier_bit_exactly(model, dtype, tmp_path):
    report = run_demo(DemoConfig(model=model, dtype=dtype, tp=2, out=str(tmp_path), **SMALL))
    tokens = report["tokens"]
    assert tokens["device"] > 0 and tokens["host"] > 0 and tokens["disk"] > 0, tokens
    assert sum(tokens.values()) == report["prompt_tokens"]
    bi = report["bit_identity"]
    assert bi["turns_compared"] > 0 and bi["identical"] == bi["turns_compared"], bi
    assert report["bytes"]["device_to_host"] > 0 and report["bytes"]["disk_to_host"] > 0
    assert json.loads((tmp_path / "report.json").read_text())["requests"] == 18
    assert (tmp_path / "demo.png").stat().st_size > 0


def test_demo_rejects_sizes_that_cannot_fit(tmp_path):
    with pytest.raises(DemoError, match=r"--device-pages \(3\) cannot hold one conversation's last turn"):
        run_demo(DemoConfig(out=str(tmp_path), **(SMALL | {"device_pages": 3})))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "gpt"], "argument --model: invalid choice: 'gpt'"),
        (["--device-pages", "2"], "--device-pages (2) cannot hold"),
        (["--out", "/proc/jaxkv-demo"], "--out '/proc/jaxkv-demo' is not a writable directory"),
        (["--turns", "0"], "--turns must be >= 1, got 0"),
    ],
)
def test_cli_bad_input_is_one_line_and_nonzero(args, message):
    proc = subprocess.run(
        [sys.executable, "-m", "jaxkv", "demo", "--no-progress", *args], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in proc.stderr, proc.stderr
