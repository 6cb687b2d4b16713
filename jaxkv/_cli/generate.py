"""`jaxkv generate`: greedy text from a Hugging Face checkpoint on jaxkv's paged cache.

```
jaxkv generate --checkpoint ~/models/Qwen3-0.6B --prompt "The capital of France is" --max-tokens 32
```

The prompt is encoded with the checkpoint's own `tokenizer.json` (the
`tokenizers` library, in `jaxkv[hf]`), prefilled in one step, then decoded one
token at a time, greedily, through the same `prefill` the demo and the
reference tests use; the continuation is printed as it is produced. It stops at
the checkpoint's end-of-sequence token (config.json's `eos_token_id`) unless
`--ignore-eos`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from jaxkv._cli.errors import DemoError


def _tokenizer(directory: Path):
    path = directory / "tokenizer.json"
    if not path.is_file():
        raise DemoError(f"--checkpoint {str(directory)!r} has no tokenizer.json: generate encodes --prompt with it")
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise DemoError("generate needs the tokenizers package: pip install 'jaxkv[hf]'") from None
    return Tokenizer.from_file(str(path))


def _eos_ids(directory: Path) -> set[int]:
    config = json.loads((directory / "config.json").read_text())
    eos = config.get("eos_token_id")
    return set(eos) if isinstance(eos, list) else ({eos} if isinstance(eos, int) else set())


def generate(checkpoint: str, prompt: str, *, max_tokens: int, tp: int, ignore_eos: bool = False, out=sys.stdout):
    """Greedy continuation of `prompt`: returns its token ids (printed to `out` as they come)."""
    import jax

    import jaxkv.hf

    directory = Path(checkpoint).expanduser()
    if not (directory / "config.json").is_file():
        raise DemoError(f"--checkpoint {str(directory)!r} is not a checkpoint directory: it has no config.json")
    tokenizer = _tokenizer(directory)
    ids = np.asarray(tokenizer.encode(prompt).ids, np.int32)
    if ids.size == 0:
        raise DemoError(f"--prompt {prompt!r} encodes to no tokens")
    if tp > len(jax.devices()):
        raise DemoError(f"--tp {tp} needs {tp} devices; this machine has {len(jax.devices())}")
    mesh = jax.make_mesh((tp,), ("tp",), devices=jax.devices()[:tp])
    try:
        model = jaxkv.hf.load_checkpoint(directory, mesh)
    except ValueError as e:
        raise DemoError(str(e)) from None
    page_size = model.config.page_size
    pages = -(-(ids.size + max_tokens) // page_size)
    cache = model.allocate_cache(pages + 1)  # page 0 is the null page
    table = np.arange(1, pages + 1, dtype=np.int32)
    eos = set() if ignore_eos else _eos_ids(directory)
    logits, cache = model.prefill(cache, ids, 0, table)
    out.write(prompt)
    out.flush()
    produced: list[int] = []
    shown = ""
    pos = ids.size
    while len(produced) < max_tokens:
        token = int(np.argmax(np.asarray(logits)[-1]))
        produced.append(token)
        if token in eos:
            break
        # Decode the whole continuation and print what is new: a byte-level token may end inside a character.
        text = tokenizer.decode(produced)
        if not text.endswith("\ufffd"):
            out.write(text[len(shown) :])
            out.flush()
            shown = text
        if len(produced) == max_tokens:
            break
        logits, cache = model.prefill(cache, [token], pos, table)
        pos += 1
    out.write(tokenizer.decode([t for t in produced if t not in eos])[len(shown) :] + "\n")
    return produced
