"""The scheduler side: block hashing, the device block pool, the prefix-caching manager."""
