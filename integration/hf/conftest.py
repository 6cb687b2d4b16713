"""integration/hf set-up: 8 simulated CPU devices (TP 1, 2, 4 meshes), torch on one thread, the Redis fixture."""

import sys
from pathlib import Path

import jax

# Must run before the backend starts: conftest is imported before any test module.
jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_platforms", "cpu")

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))  # tests/redis_server.py

import torch  # noqa: E402

torch.set_num_threads(1)  # tiny models: threads cost more than they save, and the JAX side shares the 2 cores

from redis_server import redis_server  # noqa: E402,F401  (a fresh redis-server per test)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a real model's checks (minutes on 2 cores); deselect with -m 'not slow'")
