"""Test set-up: 8 simulated CPU devices, so TP meshes of 1, 2, 4 and 8 run without an accelerator."""

import jax

# Must run before the backend starts: conftest is imported before any test module.
jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_platforms", "cpu")
