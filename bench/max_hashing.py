"""MAX's SHA-256 block hashing, timed on the token chains bench/manager.py times jaxkv on.

    <python with MAX> bench/max_hashing.py CHAINS.npz SPEC.json

Run by bench/manager.py under a Python that has MAX installed (MAX 26.7 wants
Python 3.12; jaxkv's venv may be another Python, so this file imports neither
jax nor jaxkv, only numpy and MAX). CHAINS.npz holds one int32 array per case
(`case0`, `case1`, ...); SPEC.json is `{"cases": [{"page_size": P,
"request_tokens": T or null}, ...]}`: a case hashes its array as one chain (T
null) or as chains of T tokens each, one call per chain, every chain from
MAX's default root.

Protocol, so that bench/manager.py can interleave MAX's runs with jaxkv's and
both see the same machine load: this prints one JSON line (MAX's version, the
entry point timed, the blocks each case yields), then for each case index read
from stdin hashes that case once and prints the seconds it took; EOF ends it.
"""

from __future__ import annotations

import json
import sys
import time
from importlib import metadata
from pathlib import Path

import numpy as np


def hasher():
    """(name, fn(tokens, page_size) -> list of digests): MAX's public wrapper, else its Rust entry point."""
    try:
        from max.pipelines.kv_cache.paged_kv_cache.block_utils import hash_request_tokens
    except ImportError:
        # max.pipelines imports serving dependencies (huggingface_hub, transformers,
        # pillow, ...) that a bare `pip install max` may lack; the Rust function the
        # wrapper calls needs none of them.
        from max import _kv_core

        def core(tokens, page_size):
            return _kv_core.hash_block_tokens(
                "sha256", tokens.tobytes(), tokens.itemsize, page_size, None, None, None, []
            )

        return "max._kv_core.hash_block_tokens('sha256', ...)", core

    def wrapper(tokens, page_size):
        return hash_request_tokens(tokens, page_size, None, algo="sha256")

    return "max.pipelines.kv_cache.paged_kv_cache.block_utils.hash_request_tokens(algo='sha256')", wrapper


def main() -> None:
    chains_path, spec_path = sys.argv[1:3]
    cases = json.loads(Path(spec_path).read_text())["cases"]
    chains = np.load(chains_path)
    name, fn = hasher()
    runs, blocks = [], []
    for i, case in enumerate(cases):
        tokens, page, per_request = chains[f"case{i}"], case["page_size"], case["request_tokens"]
        requests = [tokens] if per_request is None else np.split(tokens, len(tokens) // per_request)
        n_blocks = sum(len(fn(r, page)) for r in requests)
        if n_blocks != len(tokens) // page:
            raise SystemExit(f"MAX returned {n_blocks} hashes for {len(tokens) // page} full blocks of case {i}")
        runs.append(lambda requests=requests, page=page: [fn(r, page) for r in requests])
        blocks.append(n_blocks)
    header = {"max": metadata.version("max"), "python": sys.version.split()[0], "entry": name, "blocks": blocks}
    print(json.dumps(header), flush=True)
    for line in sys.stdin:
        run = runs[int(line)]
        t0 = time.perf_counter()
        run()
        print(time.perf_counter() - t0, flush=True)


if __name__ == "__main__":
    main()
