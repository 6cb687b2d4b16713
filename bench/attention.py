"""Paged attention: decode and prefill tokens/s of the XLA path, the Pallas kernel and JAX's stock kernel.

    python bench/attention.py [--quick]

One layer of GQA attention (32 query heads over 8 KV heads, head_dim 128,
bfloat16 cache, 16-token pages, TP 1 on one device) over a batch of `B`
sequences of context `C`, their pages shuffled in the cache:

- **decode**: every sequence brings 1 token at position C - 1 (write + attend);
  tokens/s = B / step time.
- **prefill**: every sequence brings its last 128 tokens (a chunk at C - 128);
  tokens/s = B * 128 / step time.

Implementations, in the same run:

- `paged_attention(..., impl="xla")`: gathers the pages, then attends (jaxkv's default). The cache is
  donated and threaded through every call, as a serving loop does.
- `paged_attention(..., impl="pallas")`: jaxkv's kernel, reading pages where they lie.
- **dense** (the baseline without paging): the same attention on contiguous
  `[B, C, heads, dim]` K/V, no page table, no write: what paging costs.
- **stock**: JAX's Pallas GPU `paged_attention` (decode only) on its own layout,
  `[kv_heads, pages, page_size, dim]` with K and V apart: *native* (the cache
  already in that layout) and *transposed* (jaxkv's layer transposed into it
  on every step, what using it on jaxkv's layout would cost).

On CPU the Pallas kernels run in interpret mode, which says nothing about
speed: there the benchmark times the XLA path and the dense baseline, and for
the kernels reports correctness only (the largest difference from the XLA
path's output over the same cache). On a GPU it times everything and reports
the ratios the issue names (Pallas / XLA; Pallas / stock native). Results:
bench/results/attention.json (attention_quick.json with --quick).
"""

from __future__ import annotations

import functools
import statistics
import time

import _common
import numpy as np

_common.setup_devices()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import jaxkv  # noqa: E402

N_HEADS, KV_HEADS, HEAD_DIM, PAGE = 32, 8, 128, 16
CHUNK = 128  # prefill tokens per sequence per step
SCALE = 1 / HEAD_DIM**0.5


def setup(batch: int, context: int, rng) -> dict:
    """A cache holding `batch` sequences of `context` tokens on shuffled pages, and one step's inputs."""
    pages_per_seq = context // PAGE
    num_pages = batch * pages_per_seq + 1  # page 0: the null page
    params = jaxkv.KVCacheParams(jnp.bfloat16, n_kv_heads=KV_HEADS, head_dim=HEAD_DIM, num_layers=1, page_size=PAGE)
    mesh = jax.make_mesh((1,), ("tp",), devices=jax.devices()[:1])
    sharding = jaxkv.allocate_buffer(params, mesh, 1).values.sharding
    values = rng.standard_normal((num_pages, 2, 1, PAGE, KV_HEADS, HEAD_DIM), np.float32).astype(jnp.bfloat16)
    table = 1 + rng.permutation(batch * pages_per_seq).reshape(batch, pages_per_seq).astype(np.int32)
    cache = jaxkv.KVCacheBuffer(False, jax.device_put(values, sharding))
    return dict(params=params, mesh=mesh, cache=cache, values=values, table=table, rng=rng)


def step_inputs(s: dict, batch: int, context: int, tokens: int) -> tuple:
    rng = s["rng"]
    q = rng.standard_normal((batch, tokens, N_HEADS, HEAD_DIM), np.float32).astype(jnp.bfloat16)
    k = rng.standard_normal((batch, tokens, KV_HEADS, HEAD_DIM), np.float32).astype(jnp.bfloat16)
    v = rng.standard_normal((batch, tokens, KV_HEADS, HEAD_DIM), np.float32).astype(jnp.bfloat16)
    start = np.full(batch, context - tokens, np.int32)
    lens = np.full(batch, tokens, np.int32)
    return q, k, v, start, lens


@functools.cache
def paged_step(impl: str):
    fn = functools.partial(jaxkv.paged_attention, softmax_scale=SCALE, impl=impl)
    return jax.jit(
        lambda cache, q, k, v, table, start, lens: fn(cache, 0, q, k, v, table, start, lens), donate_argnums=0
    )


@functools.partial(jax.jit, static_argnums=4)
def dense_step(q, keys, vals, start, scale: float):
    """Causal GQA attention of q [B, T, H, d] at positions start.. over contiguous keys/vals [B, C, h, d]."""
    b, t, n_heads, d = q.shape
    c, h = keys.shape[1], keys.shape[2]
    qg = q.astype(jnp.float32).reshape(b, t, h, n_heads // h, d)
    scores = jnp.einsum("bthgd,bchd->bhgtc", qg, keys.astype(jnp.float32)) * scale
    pos = start[:, None] + jnp.arange(t)
    mask = jnp.arange(c)[None, None, :] <= pos[:, :, None]
    scores = jnp.where(mask[:, None, None], scores, -jnp.inf)
    p = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bhgtc,bchd->bthgd", p, vals.astype(jnp.float32))
    return out.reshape(b, t, n_heads, d)


def stock_kernel():
    """JAX's Pallas GPU paged attention, or None when this JAX does not ship it."""
    try:
        from jax.experimental.pallas.ops.gpu import paged_attention as stock
    except ImportError:
        return None
    return stock.paged_attention


def timed(fn, repeats: int) -> float:
    """Median seconds of `fn()` (blocked on), after one warm-up call (compiles)."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_one(batch: int, context: int, repeats: int, on_cpu: bool, rng) -> list[dict]:
    s = setup(batch, context, rng)
    return [bench_phase(s, phase, tokens, repeats, on_cpu) for phase, tokens in (("decode", 1), ("prefill", CHUNK))]


def bench_phase(s: dict, phase: str, tokens: int, repeats: int, on_cpu: bool) -> dict:
    batch, pages = s["table"].shape
    context = pages * PAGE
    q, k, v, start, lens = step_inputs(s, batch, context, tokens)
    table = s["table"]

    def paged(impl):
        # Write + attend, the cache donated as a server does (in place) and threaded through: every call
        # writes the same tokens at the same positions, so each implementation sees the same cache.
        def run():
            out, s["cache"] = paged_step(impl)(s["cache"], q, k, v, table, start, lens)
            return out

        return run

    outs = {impl: np.asarray(paged(impl)(), np.float32) for impl in ("xla", "pallas")}
    row = {"phase": phase, "batch": batch, "context": context, "tokens_per_step": batch * tokens}
    row["pallas_max_abs_diff"] = float(np.max(np.abs(outs["pallas"] - outs["xla"])))
    assert row["pallas_max_abs_diff"] < 1e-2, row  # same cache, same math in float32: rounding only
    keys = jnp.asarray(s["values"][:, 0, 0][table].reshape(batch, context, KV_HEADS, HEAD_DIM))
    vals = jnp.asarray(s["values"][:, 1, 0][table].reshape(batch, context, KV_HEADS, HEAD_DIM))
    cases = {"xla": paged("xla"), "dense": lambda: dense_step(q, keys, vals, jnp.asarray(start), SCALE)}
    if not on_cpu:
        cases["pallas"] = paged("pallas")
    stock = stock_kernel() if jax.default_backend() in ("cpu", "gpu") else None  # a GPU (Triton) kernel
    if phase == "decode" and stock is not None:
        cases.update(stock_cases(stock, s, q, keys, vals, start, row, on_cpu))
    for name, fn in cases.items():
        row[f"{name}_tokens_per_s"] = row["tokens_per_step"] / timed(fn, repeats)
    row["xla_vs_dense"] = row["xla_tokens_per_s"] / row["dense_tokens_per_s"]
    if "pallas_tokens_per_s" in row:
        row["pallas_vs_xla"] = row["pallas_tokens_per_s"] / row["xla_tokens_per_s"]
        if "stock_native_tokens_per_s" in row:
            row["pallas_vs_stock_native"] = row["pallas_tokens_per_s"] / row["stock_native_tokens_per_s"]
    return row


def stock_cases(stock, s: dict, q, keys, vals, start, row: dict, on_cpu: bool) -> dict:
    """Check the stock kernel on its layout against the dense baseline; its timed cases off CPU.

    It attends over the cache as it is (no write, no causal mask: all `context`
    slots, what the dense baseline computes for a query at position context - 1)
    and takes no softmax scale: the queries come scaled.
    """
    batch, pages = s["table"].shape
    table = s["table"]
    k_pages, v_pages = (np.ascontiguousarray(s["values"][:, kv, 0].transpose(2, 0, 1, 3)) for kv in (0, 1))
    k_splits = next(n for n in (16, 8, 4, 2, 1) if pages % n == 0)
    call = functools.partial(stock, k_splits=k_splits, interpret=on_cpu)
    lengths = np.full(batch, pages * PAGE, np.int32)
    q0 = (q[:, 0].astype(np.float32) * SCALE).astype(jnp.bfloat16)
    got = np.asarray(call(q0, k_pages, v_pages, table, lengths), np.float32)
    want = np.asarray(dense_step(q0[:, None], keys, vals, jnp.asarray(start), 1.0), np.float32)[:, 0]
    row["stock_max_abs_diff"] = float(np.max(np.abs(got - want)))
    assert row["stock_max_abs_diff"] < 5e-2, row  # bf16 kernel math: looser, but the layouts must line up
    if on_cpu:
        return {}
    jk, jv = jnp.asarray(k_pages), jnp.asarray(v_pages)

    @jax.jit
    def transposed(values, q0):
        return call(q0, jnp.moveaxis(values[:, 0, 0], 2, 0), jnp.moveaxis(values[:, 1, 0], 2, 0), table, lengths)

    return {
        "stock_native": lambda: call(q0, jk, jv, table, lengths),
        "stock_transposed": lambda: transposed(s["cache"].values, q0),
    }


def main() -> None:
    parser = _common.parser(__doc__)
    parser.add_argument("--quick", action="store_true", help="one small configuration, few repeats (smoke run)")
    args = parser.parse_args()
    cond = _common.conditions()
    on_cpu = cond["backend"] == "cpu"
    _common.print_conditions(cond)
    configs = [(2, 256)] if args.quick else [(1, 512), (8, 512), (1, 2048), (8, 2048)]
    repeats = 3 if args.quick else 9
    rng = np.random.default_rng(0)
    rows = [r for batch, context in configs for r in bench_one(batch, context, repeats, on_cpu, rng)]
    cols = [
        ("phase", "phase", "s"),
        ("batch", "B", "d"),
        ("context", "context", "d"),
        ("xla_tokens_per_s", "XLA tok/s", ".0f"),
        ("dense_tokens_per_s", "dense tok/s", ".0f"),
        ("xla_vs_dense", "XLA/dense", ".2f"),
        ("pallas_tokens_per_s", "Pallas tok/s", ".0f"),
        ("pallas_vs_xla", "Pallas/XLA", ".2f"),
        ("stock_native_tokens_per_s", "stock tok/s", ".0f"),
        ("stock_transposed_tokens_per_s", "stock+transpose", ".0f"),
        ("pallas_vs_stock_native", "Pallas/stock", ".2f"),
        ("pallas_max_abs_diff", "|Pallas-XLA|", ".1e"),
        ("stock_max_abs_diff", "|stock-dense|", ".1e"),
    ]
    mode = "interpret mode: kernels checked, not timed" if on_cpu else "compiled kernels"
    _common.print_table(f"paged attention, one layer ({mode})", rows, cols)
    path = _common.write_json(
        "attention_quick" if args.quick else "attention",
        {"conditions": cond, "git": _common.git_state(), "kernels_timed": not on_cpu, "rows": rows},
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
