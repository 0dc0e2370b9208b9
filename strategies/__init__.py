"""Flower server side: strategies that aggregate low-rank adapters."""
