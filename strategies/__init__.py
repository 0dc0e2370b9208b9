"""Flower server side: strategies that aggregate low-rank adapters."""

from .fedlowrank import FedLowRank

__all__ = ["FedLowRank"]
