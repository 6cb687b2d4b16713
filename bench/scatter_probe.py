"""Which in-place page scatter keeps every bit, and what it costs, on this backend.

    python bench/scatter_probe.py [--quick] [NAME]

jaxkv's portable H2D kernel scatters the cache as same-width unsigned words
(bitcast, scatter, bitcast back) so no float op touches the bytes. This probe
measures, on the backend at hand, for each cache dtype:

- whether a *typed* scatter (`cache.at[ids].set(pages)`) is bit-exact on random
  bit patterns (NaN payloads included),
- the time of the typed and the word scatter of 64 pages into caches of two
  sizes: a kernel whose time grows with the cache is doing whole-cache passes.

Baseline in the same run: `jax.device_put` of the 64 pages' rows alone, the
cost of moving just the bytes that change. Results: bench/results/NAME.json
(default scatter_probe_<backend>, or scatter_probe_<backend>_quick with
--quick: the smaller cache only, 3 repeats).
"""

from __future__ import annotations

import _common
import numpy as np

_common.setup_devices(1)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jaxkv.layout import pages as _pages  # noqa: E402

DTYPES = ["bfloat16", "float16", "float32", "float8_e4m3fn", "float8_e5m2", "int8"]
PAGE_BYTES = 256 * 1024
K = 64


def typed_scatter(cache, ids, pages):
    return cache.at[ids].set(pages, unique_indices=True, mode="drop")


def probe(dtype: str, num_pages: int, rng, repeats: int = 9) -> dict:
    dt = jnp.dtype(dtype)
    word = np.dtype(_pages.word_dtype(dt))
    n = PAGE_BYTES // dt.itemsize
    bits = rng.integers(0, np.iinfo(word).max, (num_pages, n), dtype=word, endpoint=True)
    new = rng.integers(0, np.iinfo(word).max, (K, n), dtype=word, endpoint=True)
    ids = np.sort(rng.permutation(num_pages)[:K]).astype(np.int32)
    want = bits.copy()
    want[ids] = new
    typed = jax.jit(typed_scatter, donate_argnums=0)
    words = jax.jit(_pages.scatter_page_bytes, donate_argnums=0)
    rows = jnp.asarray(new.view(np.uint8).reshape(K, -1))
    pages = jnp.asarray(new.view(dt))
    out = typed(jnp.asarray(bits.view(dt)), ids, pages)
    typed_exact = bool(np.array_equal(np.asarray(out).view(word), want))
    out = words(jnp.asarray(bits.view(dt)), ids, rows)
    words_exact = bool(np.array_equal(np.asarray(out).view(word), want))
    state = {"t": jnp.asarray(bits.view(dt)), "w": out}

    def run_typed():
        state["t"] = typed(state["t"], ids, pages)
        state["t"].block_until_ready()

    def run_words():
        state["w"] = words(state["w"], ids, rows)
        state["w"].block_until_ready()

    t_typed = _common.median_seconds(run_typed, repeats=repeats)
    t_words = _common.median_seconds(run_words, repeats=repeats)
    host_rows = np.asarray(rows)
    t_put = _common.median_seconds(lambda: jax.device_put(host_rows).block_until_ready(), repeats=repeats)
    return dict(
        dtype=dtype,
        cache_mib=num_pages * PAGE_BYTES / 2**20,
        typed_exact=typed_exact,
        words_exact=words_exact,
        typed_ms=t_typed * 1e3,
        words_ms=t_words * 1e3,
        put_rows_ms=t_put * 1e3,
    )


def main() -> None:
    parser = _common.parser(__doc__)
    parser.add_argument("--quick", action="store_true", help="the smaller cache only, 3 repeats (smoke run)")
    parser.add_argument("name", nargs="?", help="results name: bench/results/NAME.json")
    args = parser.parse_args()
    platform = jax.devices()[0].platform
    name = args.name or f"scatter_probe_{platform}" + ("_quick" if args.quick else "")
    cond = _common.conditions() | {"pages_scattered": K, "page_bytes": PAGE_BYTES, "quick": args.quick}
    _common.print_conditions(cond)
    rng = np.random.default_rng(0)
    sizes = [256, 4096] if platform != "cpu" else [256, 1024]
    if args.quick:
        sizes = sizes[:1]
    rows = [probe(d, n, rng, repeats=3 if args.quick else 9) for d in DTYPES for n in sizes]
    _common.print_table(
        f"scatter of {K} pages of {PAGE_BYTES // 1024} KiB: typed vs word kernel",
        rows,
        [
            ("dtype", "dtype", "s"),
            ("cache_mib", "cache MiB", ".0f"),
            ("typed_exact", "typed exact", ""),
            ("words_exact", "words exact", ""),
            ("typed_ms", "typed ms", ".2f"),
            ("words_ms", "words ms", ".2f"),
            ("put_rows_ms", "device_put rows ms", ".2f"),
        ],
    )
    print("wrote", _common.write_json(name, {"conditions": cond, "rows": rows}))


if __name__ == "__main__":
    main()
