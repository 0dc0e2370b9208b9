"""fedlowrank.fairness (in progress)."""
