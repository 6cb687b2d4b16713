"""`jaxkv demo --checkpoint DIR`: the demo's multi-turn workload on a checkpoint loaded by jaxkv.hf."""

from _reference import checkpoint

from jaxkv._cli.demo import DemoConfig, run_demo


def test_demo_on_a_checkpoint(tmp_path):
    directory = checkpoint("qwen3")
    # The demo's workload, shrunk (system prompt, message and reply lengths are DemoConfig fields, not options).
    cfg = DemoConfig(checkpoint=str(directory), tp=2, system_prompts=1, conversations=3, turns=2,
                     system_tokens=32, user_tokens=16, reply_tokens=4, device_pages=8, host_pages=8,
                     out=str(tmp_path / "demo"), progress=False)  # fmt: skip
    report = run_demo(cfg)
    identity = report["bit_identity"]
    # Turns whose prefix came back from host or disk give the same logits as the shadow stack's, bit for bit.
    assert identity["turns_compared"] > 0, report
    assert identity["identical"] == identity["turns_compared"], identity
    assert report["config"]["checkpoint"] == str(directory)
