"""Exact factored aggregation of low-rank adapters."""
