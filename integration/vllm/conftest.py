"""vLLM integration tests: run in the integration venv (integration/vllm/setup.sh), not by the core suite.

JAX sees 8 simulated CPU devices (set before its backend starts); vLLM runs on
CPU with its CUDA wheel (no device work of its own here: the scheduler only).
"""

import os
import sys
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax

jax.config.update("jax_num_cpu_devices", 8)

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[1] / "tests")]  # harness; the core suite's redis server helper

from redis_server import redis_server  # noqa: E402,F401  (the core suite's fixture)
