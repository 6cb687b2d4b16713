"""Test set-up: 8 simulated CPU devices, so TP meshes of 1, 2, 4 and 8 run without an accelerator."""

import jax

# Must run before the backend starts: conftest is imported before any test module.
jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_platforms", "cpu")


import pytest  # noqa: E402
from redis_server import redis_server  # noqa: E402,F401  (a fresh redis-server per test)


@pytest.fixture(params=["native", "xla"])
def kernels(request, monkeypatch):
    """Run a test with the native CPU page kernels and with the pure-XLA ones (what GPUs/TPUs use)."""
    from jaxkv import _native as native

    if request.param == "xla":
        monkeypatch.setattr(native, "available", lambda: False)
    elif not native.available():
        pytest.skip("native CPU kernels unavailable (not built at install, or JAXKV_NATIVE=0)")
    return request.param


@pytest.fixture(params=["numpy", "arrays"])
def host_backend(request, monkeypatch):
    """Run a test with each HostTier backend as what backend="auto" picks (numpy is CPU's default, arrays GPU/TPU's)."""
    from jaxkv.tiers import host

    monkeypatch.setattr(host, "_auto_backend", lambda: request.param)
    return request.param


@pytest.fixture
def disk_threads(monkeypatch):
    """DiskTier batches on its writer threads whatever the row size (tests' rows are small), 2 threads at least."""
    from jaxkv.tiers import disk

    monkeypatch.setattr(disk, "PARALLEL_MIN_ROW_BYTES", 0)
    real = disk.DiskTier.__init__

    def init(self, *args, **kwargs):
        real(self, *args, **kwargs)
        self.writers = max(self.writers, 2)

    monkeypatch.setattr(disk.DiskTier, "__init__", init)


@pytest.fixture
def deadline():
    """Abort, not hang, a run whose test waits forever (a kernel waiting on a DMA that never comes).

    A blocked C call takes no Python signal, so a watchdog thread (faulthandler) prints every thread's
    stack and exits the process after `seconds`: the run fails loudly instead of stalling CI.
    """
    import faulthandler

    seconds = 300
    faulthandler.dump_traceback_later(seconds, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()
