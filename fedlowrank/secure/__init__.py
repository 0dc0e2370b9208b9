"""Secure aggregation's protocol layer: SecAgg+ sums over Flower's cryptographic primitives.

A Flower layer (it imports ``flwr``), shared by the server wrapper
(:mod:`fedlowrank.strategies.secure`) and the client mod (:mod:`fedlowrank.clients.secure`);
the sketch arithmetic it carries is core (:mod:`fedlowrank.aggregation.sketched`).
"""
