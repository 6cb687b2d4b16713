"""The `jaxkv` command line: one-line errors naming the option, sizes checked before allocating, --version.

No demo runs here: every demo case fails validation before any work.
"""

import io

import pytest

import jaxkv
from jaxkv._cli import main

HUGE = "100000000"


def run(capsys, *argv) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `jaxkv argv`."""
    try:
        rc = main(list(argv))
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def one_line_error(capsys, command: str, *argv) -> str:
    """Run a failing command; check it fails with one line `jaxkv <command>: error: ...`; return that line."""
    rc, out, err = run(capsys, command, *argv)
    lines = err.strip().splitlines()
    assert rc == 2 and out == "" and len(lines) == 1, (rc, out, err)
    assert lines[0].startswith(f"jaxkv {command}: error: "), lines[0]
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("tp", ["0", "-1"])
def test_layout_rejects_a_non_positive_tp(tp, capsys):
    line = one_line_error(capsys, "layout", "--tp", tp)
    assert f"argument --tp: must be a positive int, got {tp}" in line


def test_layout_rejects_tp_beyond_the_devices(capsys):
    assert "--tp (9) exceeds the 8 available devices" in one_line_error(capsys, "layout", "--tp", "9")


def test_layout_rejects_heads_that_do_not_split(capsys):
    line = one_line_error(capsys, "layout", "--tp", "3")
    assert "--heads (8) must be divisible by --tp (3), but 8 % 3 = 2" in line


def test_layout_refuses_a_cache_larger_than_memory(capsys):
    line = one_line_error(capsys, "layout", "--pages", HUGE)
    assert "--pages (100,000,000) needs" in line and "lower --pages to at most" in line


def test_layout_refuses_a_page_larger_than_memory(capsys):
    line = one_line_error(capsys, "layout", "--head-dim", "1000000000")
    assert "one page needs" in line and "--head-dim" in line


def test_layout_mla_rejects_heads(capsys):
    line = one_line_error(capsys, "layout", "--mla", "--heads", "16")
    assert "--heads (16) does not apply to --mla" in line


def test_layout_granularity(capsys):
    line = one_line_error(capsys, "layout", "--mla", "--fp8", "--head-dim", "576")
    assert "--granularity (128, the default) must divide --head-dim (576), but 576 % 128 = 64" in line
    assert "--granularity 64" in line
    line = one_line_error(capsys, "layout", "--granularity", "64")
    assert "--granularity applies to --fp8 caches only" in line
    rc, out, _ = run(capsys, "layout", "--mla", "--fp8", "--head-dim", "576", "--granularity", "64", "--pages", "4")
    assert rc == 0
    assert "page shape per shard: (1, 4, 16, 1, 576) + scales (1, 4, 16, 1, 9)" in out


def test_layout_labels_replicated_device_bytes(capsys):
    rc, out, _ = run(capsys, "layout", "--mla", "--tp", "4", "--pages", "4")
    assert rc == 0
    (line,) = [x for x in out.splitlines() if "bytes per page" in x]
    assert "65,536 on devices (16,384 on each of 4 devices: every device holds a replica)" in line
    assert "16,384 on host (one copy)" in line
    rc, out, _ = run(capsys, "layout", "--tp", "4", "--pages", "4")
    (line,) = [x for x in out.splitlines() if "bytes per page" in x]
    assert "262,144 on devices (65,536 on each of 4 shards)" in line


def test_version(capsys):
    rc, out, _ = run(capsys, "--version")
    assert rc == 0 and out == f"jaxkv {jaxkv.__version__}\n"


def test_help_describes_the_tool(capsys):
    rc, out, _ = run(capsys, "--help")
    assert rc == 0
    assert "The `jaxkv` command line" not in out
    assert "KV cache" in out and "layout" in out and "demo" in out


def test_errors_name_the_subcommand(capsys):
    assert "unrecognized arguments: --bogus" in one_line_error(capsys, "layout", "--bogus")
    assert "argument --model: invalid choice: 'gpt'" in one_line_error(capsys, "demo", "--model", "gpt")


def test_demo_error_names_the_subcommand(capsys, tmp_path):
    line = one_line_error(capsys, "demo", "--turns", "0", "--out", str(tmp_path))
    assert "--turns must be >= 1, got 0" in line


def test_demo_tp_that_does_not_split_the_model_says_what_works(capsys, tmp_path):
    line = one_line_error(capsys, "demo", "--tp", "8", "--out", str(tmp_path))
    assert "n_kv_heads (4) must be divisible by the TP degree (8)" in line
    assert "use --tp 1, 2 or 4, or --model mla" in line
    line = one_line_error(capsys, "demo", "--tp", "3", "--model", "mla", "--out", str(tmp_path))
    assert "use --tp 1, 2, 4 or 8" in line and "--model mha" not in line


@pytest.mark.parametrize("option", ["--device-pages", "--host-pages"])
def test_demo_refuses_sizes_larger_than_memory(option, capsys, tmp_path):
    line = one_line_error(capsys, "demo", option, HUGE, "--out", str(tmp_path))
    assert f"{option} (100,000,000) needs" in line and f"lower {option} to at most" in line


def test_demo_refuses_a_workload_larger_than_memory(capsys, tmp_path):
    line = one_line_error(capsys, "demo", "--conversations", "1000000000", "--out", str(tmp_path))
    assert "--conversations (1,000,000,000) x --turns (4) need" in line and "lower --conversations or --turns" in line


def test_progress_off_a_terminal_writes_a_line_every_tenth(monkeypatch):
    from jaxkv._cli.demo import Progress

    stderr = io.StringIO()  # not a terminal
    monkeypatch.setattr("sys.stderr", stderr)
    progress = Progress(20, enabled=True)
    for done in range(1, 21):
        progress.update(done, "hit rate 50%")
    text = stderr.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert len(lines) == 10 and text.endswith("\n")
    assert lines[0].startswith("[") and "2/20 turns" in lines[0] and lines[0] == lines[0].rstrip()


def test_demo_refuses_an_attention_the_kernel_cannot_run_before_any_work(capsys, tmp_path, monkeypatch):
    """A layout the Pallas kernel cannot load is one line naming --attention, before anything runs."""
    from jaxkv._cli import demo
    from jaxkv.attention import pallas

    monkeypatch.setattr(pallas, "unsupported", lambda **kw: f"impl='pallas' cannot load value_dim {kw['value_dim']}")
    monkeypatch.setattr(demo, "run_demo", lambda cfg: pytest.fail("the demo ran"))
    line = one_line_error(
        capsys, "demo", "--model", "mla", "--attention", "pallas", "--tp", "2", "--out", str(tmp_path)
    )
    assert line == (
        "jaxkv demo: error: --attention pallas cannot run --model mla --dtype bf16: impl='pallas' cannot load "
        "value_dim 96; use --attention xla"
    )


def test_demo_modules_do_not_import_each_other():
    """`DemoError` lives below both demo modules (issue 24 item 3): importing demo_remote leaves demo unloaded."""
    import subprocess
    import sys

    code = "import sys, jaxkv._cli.demo_remote; print('jaxkv._cli.demo' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"


def test_layout_spells_the_cache_as_demo_does(capsys):
    """`layout --model mla --dtype fp8` is `layout --mla --fp8` (demo's spelling; issue 24 item 5), and one unit
    is 'unit', not 'units'."""
    common = ("--head-dim", "576", "--granularity", "64", "--pages", "4", "--tp", "2")
    rc, out, _ = run(capsys, "layout", "--model", "mla", "--dtype", "fp8", *common)
    rc_short, out_short, _ = run(capsys, "layout", "--mla", "--fp8", *common)
    assert rc == rc_short == 0 and out == out_short
    assert "to_memory(): 2 units (no copies)" in out  # values and scales, one replica each
    rc, out, _ = run(capsys, "layout", "--model", "mla", "--tp", "2", "--pages", "4")
    assert rc == 0 and "to_memory(): 1 unit (no copies)" in out
    line = one_line_error(capsys, "layout", "--model", "mla", "--heads", "16")
    assert "--heads (16) does not apply to --model mla" in line
    line = one_line_error(capsys, "layout", "--model", "gqa")
    assert "argument --model: invalid choice: 'gqa'" in line


def test_ctrl_c_in_demo_is_one_line_and_status_130(capsys, tmp_path, monkeypatch):
    """Ctrl-C during `jaxkv demo` prints one line, no traceback (issue 24 item 5)."""
    from jaxkv._cli import demo

    def interrupted(cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "run_demo", interrupted)
    rc, out, err = run(capsys, "demo", "--tp", "2", "--out", str(tmp_path))
    assert rc == 130 and out == "" and err == "jaxkv demo: interrupted\n"


def test_a_cache_dir_that_is_a_file_is_reported(capsys, tmp_path, monkeypatch):
    """JAXKV_CACHE_DIR naming a file used to disable the compilation cache silently; now one warning line."""
    import types

    from jaxkv._cli import _use_compilation_cache

    updates = []
    jax = types.SimpleNamespace(
        config=types.SimpleNamespace(jax_compilation_cache_dir=None, update=lambda *a: updates.append(a))
    )
    not_a_dir = tmp_path / "cache"
    not_a_dir.write_text("")
    monkeypatch.setenv("JAXKV_CACHE_DIR", str(not_a_dir))
    _use_compilation_cache(jax)
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert err.startswith(f"jaxkv demo: warning: no compilation cache: $JAXKV_CACHE_DIR {str(not_a_dir)!r} cannot hold")
    assert err.rstrip().endswith("Point JAXKV_CACHE_DIR at a writable directory")
    assert updates == []  # JAX's configuration untouched
