"""jaxkv._jax_compat: private JAX APIs answer None, never raise, outside what was checked.

The fallbacks that run on None are tested where they live (the agreement's
collective: tests/test_multihost.py).
"""

import jax
import pytest

from jaxkv import _jax_compat


def test_coordination_client_is_none_without_jax_distributed():
    assert not jax.distributed.is_initialized()
    assert _jax_compat.coordination_client() is None


def test_coordination_client_walks_its_path(monkeypatch):
    monkeypatch.setattr(_jax_compat, "_COORDINATION_CLIENT_PATH", ("jax", "distributed", "is_initialized"))
    assert _jax_compat.coordination_client() is jax.distributed.is_initialized


@pytest.mark.parametrize(
    "path",
    [("jax._src.no_such_module", "global_state", "client"), ("jax._src.distributed", "no_such_state", "client")],
    ids=["module", "attribute"],
)
def test_coordination_client_is_none_where_jax_moved_it(monkeypatch, path):
    monkeypatch.setattr(_jax_compat, "_COORDINATION_CLIENT_PATH", path)
    assert _jax_compat.coordination_client() is None
    assert "keeps no coordination client at " + ".".join(path) in _jax_compat.coordination_client_unavailable()


@pytest.mark.parametrize("version", [(0, 9, 9), (0, 11, 0), (1, 0, 0)])
def test_coordination_client_is_not_read_outside_the_checked_versions(monkeypatch, version):
    # Where it would be found: only the version check keeps the lookup from running.
    monkeypatch.setattr(_jax_compat, "_COORDINATION_CLIENT_PATH", ("jax", "distributed", "is_initialized"))
    monkeypatch.setattr(jax, "__version_info__", version)
    assert _jax_compat.coordination_client() is None
    assert "only on jax >=0.10.0,<0.11.0" in _jax_compat.coordination_client_unavailable()
