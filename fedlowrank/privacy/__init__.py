"""fedlowrank.privacy (in progress)."""
