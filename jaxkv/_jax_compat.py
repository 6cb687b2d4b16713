"""The private JAX APIs jaxkv reaches, each in one function, behind a version check.

jaxkv uses a private JAX API only where no public one exists. Each is read
here and nowhere else, only on the JAX versions where it is known to be
present, through a lookup that answers None instead of raising; every caller
has a path that works when the answer is None.

- `coordination_client()`: the client that `jax.distributed.initialize()`
  connects to the coordination service. JAX has no public accessor (its own
  `jax.experimental.multihost_utils` and orbax read the same attribute).
  `GroupAgreement` uses its key-value store and barriers; without it the
  agreement takes its collective mechanism.
"""

from __future__ import annotations

import importlib

import jax

COORDINATION_CLIENT_JAX_VERSIONS = ((0, 10, 0), (0, 11, 0))
"""[lowest, highest) `jax.__version_info__` on which `coordination_client` looks.

Checked against jax 0.10.2's `jax/_src/distributed.py` (`global_state = State()`,
`State.client`, None until `initialize()`); the attribute dates back to jax
0.4. Raise the upper bound after checking a new release's file."""

_COORDINATION_CLIENT_PATH = ("jax._src.distributed", "global_state", "client")
"""Where jax keeps the client: module, then attributes."""


def coordination_client():
    """The `jax.distributed` coordination client, or None.

    None when `jax.distributed.initialize()` was not called, when the
    installed jax is outside `COORDINATION_CLIENT_JAX_VERSIONS`, or when jax
    no longer keeps the client where it did. `jax.distributed.is_initialized()`
    (public) tells the first case from the others.
    """
    low, high = COORDINATION_CLIENT_JAX_VERSIONS
    if not low <= tuple(jax.__version_info__) < high:
        return None
    module, *attributes = _COORDINATION_CLIENT_PATH
    try:
        found = importlib.import_module(module)
    except ImportError:
        return None
    for name in attributes:
        found = getattr(found, name, None)
    return found


def coordination_client_unavailable() -> str:
    """Why `coordination_client()` is None although jax.distributed is initialized (for messages)."""
    low, high = COORDINATION_CLIENT_JAX_VERSIONS
    if low <= tuple(jax.__version_info__) < high:
        where = ".".join(_COORDINATION_CLIENT_PATH)
        return f"jax {jax.__version__} keeps no coordination client at {where}, where jaxkv reads it (no public API)"
    low, high = (".".join(map(str, v)) for v in COORDINATION_CLIENT_JAX_VERSIONS)
    return (
        f"jaxkv reads the jax.distributed coordination client (no public API) only on jax >={low},<{high}, "
        f"where it was checked; this is jax {jax.__version__}"
    )
