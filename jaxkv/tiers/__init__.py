"""Storage outside the device: the Tier protocol, host memory, disk, and their composition."""
