"""Every party of a secure sum in one process: the protocol objects driven stage by stage, as the
messages would (tests and ``benchmarks/secure.py``; a real round is ``SecureLowRank`` and the client mod).

Each stage's payload is what its message carries, and :attr:`InProcessSecureSums.sent` counts its
bytes per node, both directions, so a benchmark measures what a deployment would send.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import numpy as np

from .secagg import SecureSetup, SecureSum, SecureSumClient

STAGES = ("keys", "shares", "mask", "unmask")


class InProcessSecureSums:
    """Server and clients of one round; ``drop[node]`` names the step (``"keys"``, ``"shares"``,
    ``"<label>:mask"``, ``"<label>:unmask"``) from which that node stops answering."""

    def __init__(self, nodes: list[int], labels: tuple[str, ...], share_num: int | None = None,
                 threshold: int | None = None, drop: Mapping[int, str] | None = None) -> None:
        self.drop = dict(drop or {})
        share_num = share_num or len(nodes)
        threshold = threshold or max(2, share_num // 2 + 1)
        self.setup = SecureSetup(list(nodes), tuple(labels), share_num, threshold)
        self.sent: dict[int, int] = {n: 0 for n in nodes}
        self.client_seconds: dict[int, float] = {n: 0.0 for n in nodes}
        self.server_seconds = 0.0
        config = self.setup.setup_config()
        self.clients = {n: SecureSumClient(n, tuple(config["labels"]), config["threshold"], config["share-num"]) for n in nodes}
        for n, client in self.clients.items():
            if self.alive(n, "keys"):
                keys = self._client(n, client.setup)
                self.sent[n] += sum(len(k) for k in keys.values())
                self._server(self.setup.add_keys, n, keys)
        for n, client in self.clients.items():
            if self.alive(n, "shares"):
                peers = self.setup.keys_for(n)
                self.sent[n] += sum(len(k) for keys in peers.values() for k in keys.values())
                out = self._client(n, client.share_keys, peers)
                commitments = client.commitments()
                self.sent[n] += sum(len(c) for c in out.values()) + sum(len(c) for c in commitments.values())
                self._server(self.setup.add_shares, n, out, commitments)
        for n in self.setup.sharing:
            incoming = self.setup.shares_for(n)
            self.sent[n] += sum(len(c) for c in incoming.values())
            self._client(n, self.clients[n].receive_shares, incoming)

    def alive(self, node: int, step: str) -> bool:
        order = ["keys", "shares", *(f"{label}:{s}" for label in self.setup.labels for s in ("mask", "unmask"))]
        return node not in self.drop or order.index(step) < order.index(self.drop[node])

    def _client(self, node, fn, *args):
        start = time.perf_counter()
        out = fn(*args)
        self.client_seconds[node] += time.perf_counter() - start
        return out

    def _server(self, fn, *args):
        start = time.perf_counter()
        out = fn(*args)
        self.server_seconds += time.perf_counter() - start
        return out

    def secure_sum(self, label: str, vectors: Mapping[int, list[np.ndarray]], bounds: list[float]) -> tuple[SecureSum, list[np.ndarray], list[int]]:
        """``vectors[node]``: that node's arrays for this sum (computed before the call). The sum over the nodes still answering."""
        summed = self._server(self.setup.secure_sum, label, bounds)
        for n in self.setup.sharing:
            if self.alive(n, f"{label}:mask"):
                masked, clipped = self._client(n, self.clients[n].mask, label, vectors[n], bounds, summed.bits)
                self.sent[n] += sum(m.nbytes for m in masked)
                self._server(summed.add, n, masked, clipped)
        survivors, dropped = summed.request()
        shares = {}
        for n in survivors:
            if self.alive(n, f"{label}:unmask"):
                shares[n] = self._client(n, self.clients[n].unmask, label, survivors, dropped)
                self.sent[n] += 8 * (len(survivors) + len(dropped)) + sum(len(s) for s in shares[n].values())
        total = self._server(summed.unmask, shares)
        return summed, total, survivors
