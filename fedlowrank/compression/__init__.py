"""fedlowrank.compression (in progress)."""
