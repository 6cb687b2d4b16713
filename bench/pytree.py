"""Pytree cost of the cache containers: jaxkv's registration against `jax.tree_util.register_dataclass`.

    python bench/pytree.py [--quick]

Results: bench/results/pytree.json (pytree_quick.json with --quick).

Every jitted step flattens the cache it is given and unflattens the one it
returns. jaxkv registers `KVCacheBuffer` with `register_pytree_node_class`:
its `tree_unflatten` rebuilds a buffer without validation, because inside
`jit` the leaves are tracers (which have no sharding) and `jax.tree.map` may
put placeholders (PartitionSpecs) in their place. `register_dataclass`
unflattens by calling the class, so the constructor's checks would run on
every unflatten; they can then only run for concrete arrays. Three variants
of the same buffer, timed interleaved in one run:

- `jaxkv`: `KVCacheBuffer` as it is (the baseline);
- `dataclass_checked`: a dataclass registered with `register_dataclass`
  whose `__post_init__` runs `KVCacheBuffer`'s own checks when every leaf is
  a concrete `jax.Array` (so a jit output is validated again);
- `dataclass_unchecked`: the same without checks: the registration's own
  cost, which is what the buffer would pay if it gave up validation.

And `MultiKVCacheBuffer` (two children) against a dataclass with a
`children` dict field. Each figure is the median over rounds of the mean
time per call in a loop of calls; every round runs every variant.
"""

from __future__ import annotations

import dataclasses
import statistics
import time

import _common
import numpy as np

_common.setup_devices()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jaxkv  # noqa: E402
from jaxkv.layout.buffer import KVCacheBuffer, MultiKVCacheBuffer  # noqa: E402

TP = 4


def _concrete(*leaves) -> bool:
    return all(isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer) for x in leaves if x is not None)


@dataclasses.dataclass(eq=False, repr=False)
class CheckedBuffer:
    """`KVCacheBuffer` as a `register_dataclass` node: checks run whenever the leaves are concrete arrays."""

    replicates_kv_across_tp: bool
    values: jax.Array
    scales: jax.Array | None = None

    def __post_init__(self):
        if _concrete(self.values, self.scales):
            KVCacheBuffer._validate(self)  # type: ignore[arg-type]  # KVCacheBuffer's checks, on the same fields


@dataclasses.dataclass(eq=False, repr=False)
class UncheckedBuffer:
    """`KVCacheBuffer` as a `register_dataclass` node, no checks at all."""

    replicates_kv_across_tp: bool
    values: jax.Array
    scales: jax.Array | None = None


@dataclasses.dataclass(eq=False, repr=False)
class CheckedMulti:
    """`MultiKVCacheBuffer` as a `register_dataclass` node (a dict of children), with its constructor's checks."""

    children: dict

    def __post_init__(self):
        if not isinstance(self.children, dict) or not self.children:
            raise ValueError("children must be a non-empty dict")
        for child in self.children.values():
            if not isinstance(child, CheckedBuffer):
                raise ValueError("children must be buffers")


for cls in (CheckedBuffer, UncheckedBuffer):
    jax.tree_util.register_dataclass(cls, data_fields=["values", "scales"], meta_fields=["replicates_kv_across_tp"])
jax.tree_util.register_dataclass(CheckedMulti, data_fields=["children"], meta_fields=[])


def per_call_us(fn, calls: int) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls * 1e6


def time_variants(variants: dict, calls: int, rounds: int) -> dict[str, dict[str, float]]:
    """{variant: {"flatten_us", "unflatten_us"}}: medians over `rounds`, variants interleaved, order rotated."""
    names = list(variants)
    samples = {n: {"flatten_us": [], "unflatten_us": []} for n in names}
    prepared = {}
    for name, obj in variants.items():
        leaves, treedef = jax.tree.flatten(obj)
        rebuilt = jax.tree.unflatten(treedef, leaves)
        assert type(rebuilt) is type(obj) and jax.tree.leaves(rebuilt) == leaves
        prepared[name] = (obj, leaves, treedef)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            obj, leaves, treedef = prepared[name]
            samples[name]["flatten_us"].append(per_call_us(lambda obj=obj: jax.tree.flatten(obj), calls))
            samples[name]["unflatten_us"].append(
                per_call_us(lambda t=treedef, x=leaves: jax.tree.unflatten(t, x), calls)
            )
    return {n: {k: statistics.median(v) for k, v in s.items()} for n, s in samples.items()}


def time_jit_calls(variants: dict, calls: int, rounds: int) -> dict[str, float]:
    """Per-call time of a jitted step that takes the cache and returns it (flatten in, unflatten out)."""
    step = jax.jit(lambda cache, x: (cache, x + 1))
    x = jnp.zeros((), jnp.int32)
    for obj in variants.values():
        jax.block_until_ready(step(obj, x))
    samples = {n: [] for n in variants}
    names = list(variants)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            obj = variants[name]
            samples[name].append(per_call_us(lambda obj=obj: jax.block_until_ready(step(obj, x)), calls))
    return {n: statistics.median(s) for n, s in samples.items()}


def semantics(buffer: KVCacheBuffer) -> dict[str, dict[str, bool]]:
    """What each registration keeps of the constructor's checks, and whether jit and placeholder leaves work."""
    bad = jax.device_put(np.zeros((2, 2), np.float32))  # rank 2: every variant that checks must reject it
    out = {}
    for name, cls in (("jaxkv", KVCacheBuffer), ("dataclass_checked", CheckedBuffer)):
        obj = cls(buffer.replicates_kv_across_tp, buffer.values, buffer.scales)
        row = {}
        for what, values in (("rejects a rank-2 jax.Array", bad), ("rejects a numpy array", np.asarray(bad))):
            try:
                cls(False, values)
                row[what] = False
            except ValueError:
                row[what] = True
        try:
            jax.tree.map(lambda _: P(), obj)  # placeholders, as paged_attention builds its shard_map specs
            row["PartitionSpec leaves (tree.map)"] = True
        except ValueError:
            row["PartitionSpec leaves (tree.map)"] = False
        try:
            jax.jit(lambda c: jax.tree.map(lambda a: a + 0, c))(obj)
            row["unflatten inside jit (tracers)"] = True
        except Exception:
            row["unflatten inside jit (tracers)"] = False
        out[name] = row
    return out


def main() -> None:
    parser = _common.parser(__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer calls and rounds (smoke run)")
    args = parser.parse_args()
    calls, rounds = (500, 5) if args.quick else (20_000, 15)
    jit_calls, jit_rounds = (50, 3) if args.quick else (500, 11)
    mesh = jax.make_mesh((TP,), ("tp",), devices=jax.devices()[:TP])
    cond = _common.conditions() | {
        "tp": TP,
        "calls_per_sample": calls,
        "rounds": rounds,
        "layouts": "bf16: MHA 8 KV heads x 128, bf16; fp8: the same in float8_e4m3fn with float32 scales",
    }
    _common.print_conditions(cond)
    t0 = time.perf_counter()

    bf16 = jaxkv.KVCacheParams(jnp.bfloat16, n_kv_heads=8, head_dim=128, num_layers=2, page_size=16)
    fp8 = jaxkv.KVCacheParams(
        jnp.float8_e4m3fn, n_kv_heads=8, head_dim=128, num_layers=2, page_size=16, quant=jaxkv.KVCacheQuantConfig()
    )
    rows, jit_rows = [], []
    buffers = {}
    for layout, params in (("bf16", bf16), ("fp8", fp8)):
        buf = jaxkv.allocate_buffer(params, mesh, 8)
        buffers[layout] = buf
        args3 = (buf.replicates_kv_across_tp, buf.values, buf.scales)
        variants = {
            "jaxkv": buf,
            "dataclass_checked": CheckedBuffer(*args3),
            "dataclass_unchecked": UncheckedBuffer(*args3),
        }
        timed = time_variants(variants, calls, rounds)
        jit = time_jit_calls(variants, jit_calls, jit_rounds)
        for name, t in timed.items():
            base = timed["jaxkv"]
            rows.append(
                dict(
                    layout=layout,
                    variant=name,
                    **t,
                    flatten_ratio=t["flatten_us"] / base["flatten_us"],
                    unflatten_ratio=t["unflatten_us"] / base["unflatten_us"],
                )
            )
            jit_rows.append(dict(layout=layout, variant=name, jit_call_us=jit[name], ratio=jit[name] / jit["jaxkv"]))

    a, b = buffers["bf16"], jaxkv.allocate_buffer(bf16, mesh, 8)
    multi = {
        "jaxkv": MultiKVCacheBuffer({"target": a, "draft": b}),
        "dataclass_checked": CheckedMulti(
            {n: CheckedBuffer(c.replicates_kv_across_tp, c.values, c.scales) for n, c in (("target", a), ("draft", b))}
        ),
    }
    timed = time_variants(multi, calls, rounds)
    for name, t in timed.items():
        base = timed["jaxkv"]
        rows.append(
            dict(
                layout="multi (2 x bf16)",
                variant=name,
                **t,
                flatten_ratio=t["flatten_us"] / base["flatten_us"],
                unflatten_ratio=t["unflatten_us"] / base["unflatten_us"],
            )
        )

    columns = [
        ("layout", "cache", "s"),
        ("variant", "registration", "s"),
        ("flatten_us", "flatten us", ".2f"),
        ("flatten_ratio", "x jaxkv", ".2f"),
        ("unflatten_us", "unflatten us", ".2f"),
        ("unflatten_ratio", "x jaxkv", ".2f"),
    ]
    _common.print_table("jax.tree.flatten / jax.tree.unflatten per call (median of rounds)", rows, columns)
    _common.print_table(
        "jitted step taking and returning the cache, per call",
        jit_rows,
        [
            ("layout", "cache", "s"),
            ("variant", "registration", "s"),
            ("jit_call_us", "us", ".1f"),
            ("ratio", "x jaxkv", ".2f"),
        ],
    )
    sem = semantics(buffers["fp8"])
    print("\nwhat each registration keeps")
    for name, row in sem.items():
        print(f"  {name}: " + ", ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in row.items()))
    path = _common.write_json(
        "pytree_quick" if args.quick else "pytree",
        {
            "conditions": cond,
            "git": _common.git_state(),
            "tree": rows,
            "jit": jit_rows,
            "semantics": sem,
            "seconds": time.perf_counter() - t0,
        },
    )
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
