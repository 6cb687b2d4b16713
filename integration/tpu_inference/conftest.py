"""Set-up for the tpu-inference tests: CPU only, 8 simulated devices, libtpu hidden.

tpu-inference pins `libtpu`, and vLLM picks the TPU platform whenever `import libtpu`
succeeds; on a machine without a TPU that platform cannot start. Hiding the module
(`sys.modules["libtpu"] = None` makes its import fail) leaves jax on CPU and vLLM on
no platform, which is all the offload connector's code paths need.
"""

import os
import sys

sys.modules["libtpu"] = None  # must precede every import of jax, vllm and tpu_inference
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_platforms", "cpu")
