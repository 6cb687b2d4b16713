"""Moving pages: the offload engine, transfer handles, multi-process agreement."""
