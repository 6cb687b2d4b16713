"""The cache layout: params, TP-sharded buffers, byte-page memory units, page kernels."""
