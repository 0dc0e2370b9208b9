"""fedlowrank: exact federated aggregation of SVD-factored low-rank adapters.

The core (this package) depends on torch and numpy only; Flower types live in
``fedlowrank.strategies`` (server) and ``fedlowrank.clients`` (client).
"""

__version__ = "0.1.0"
