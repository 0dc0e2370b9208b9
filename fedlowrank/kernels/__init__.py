"""fedlowrank.kernels (in progress)."""
