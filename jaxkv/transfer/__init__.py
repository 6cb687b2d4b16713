"""Moving pages: the offload engine, transfer handles, native page kernels, multi-process agreement."""
