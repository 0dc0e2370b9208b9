"""FedLowRank: FedAvg whose adapter factors are aggregated exactly, in factored form."""

from __future__ import annotations

from collections.abc import Iterable
from logging import INFO

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedlowrank.adapters import split_factor_key
from fedlowrank.aggregation import aggregate_svd, balance_factors, procrustes_align

from .replies import screen_replies


def factor_modules(keys: Iterable[str]) -> list[str]:
    """Names of the adapted modules among ArrayRecord keys, in first-seen order."""
    seen: dict[str, None] = {}
    for key in keys:
        split = split_factor_key(key)
        if split is not None:
            seen.setdefault(split[0], None)
    return list(seen)


class FedLowRank(FedAvg):
    """Federated averaging of SVD-factored adapters, exact and without dense matrices.

    For every adapted layer the strategy takes the clients' factors ``(U_k, S_k, V_k)``
    (keys ``<module>.lora_U``, ``.lora_S``, ``.lora_V``, with ``dW_k = U_k diag(S_k) V_k^T``),
    forms the best rank-``rank`` approximation of ``sum_k w_k dW_k`` with
    :func:`fedlowrank.aggregation.aggregate_svd` (w_k the clients' shares of
    ``weighted_by_key``) and hands it back as ``U = u sqrt(s)``, ``S = 1``,
    ``V = v sqrt(s)``: the scale at which Adam keeps training stably across rounds
    (DESIGN.md, step 6). Every other array (heads, norms) is a weighted mean, as in
    FedAvg. Clients may use different ranks; a reply that fails the checks in
    :mod:`fedlowrank.strategies.replies` is logged and dropped, the round goes on.

    Parameters
    ----------
    rank : int, optional
        Global adapter rank. Defaults to the rank of the factors in the arrays passed to
        :meth:`start` (the initial global model).
    align : bool (default: True)
        Rotate each aggregate (``U R``, ``V R`` with ``R`` orthogonal, which leaves
        ``U V^T`` and ``S = 1`` unchanged) to match the factors sent last round as
        closely as possible (orthogonal Procrustes), so clients' parameters move
        smoothly across rounds instead of jumping to a new SVD basis. Measured on the
        two-scanner digits setting (5 paired seeds, 20 rounds): final AUC 0.956 aligned
        vs 0.942 unaligned, better on 5 of 5 seeds; no difference on Adult.
    aggregation_method : {"gram", "qr"} (default: "gram")
        How the stacked factors are orthonormalised; see
        :func:`fedlowrank.aggregation.aggregate_svd`.
    **kwargs
        Passed to :class:`flwr.serverapp.strategy.FedAvg` (sampling fractions, minimum
        nodes, ``weighted_by_key``, record keys, metric aggregation functions).

    Notes
    -----
    The train MetricRecord gains ``agg-truncation-rel``: the mean over layers of the
    relative Frobenius norm of what rank ``rank`` could not hold, and
    ``agg-clients-dropped``.
    """

    def __init__(
        self,
        *,
        rank: int | None = None,
        align: bool = True,
        aggregation_method: str = "gram",
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if rank is not None and rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        self.rank = rank
        self.align = align
        self.aggregation_method = aggregation_method
        self._global_arrays: ArrayRecord | None = None

    def summary(self) -> None:
        """Log the configuration, FedAvg's and ours."""
        super().summary()
        log(INFO, "\t└──> Low-rank aggregation: exact SVD, rank %s, %s", self.rank or "as sent", self.aggregation_method)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Remember the global arrays (replies are checked against them), then as FedAvg."""
        self._global_arrays = arrays
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate adapter factors exactly and the other arrays by weighted mean."""
        replies, kept = self.accepted_replies(replies)
        total = sum(weight for _, _, weight in kept)
        if not kept or total <= 0:
            return None, None
        shares = [weight / total for _, _, weight in kept]
        client_arrays = [arrays for _, arrays, _ in kept]
        aggregated, truncation = self.aggregate_arrays(client_arrays, shares)
        metrics = self.round_metrics(replies, kept)
        if truncation:
            metrics["agg-truncation-rel"] = float(np.mean(truncation))
        return aggregated, metrics

    def accepted_replies(self, replies: Iterable[Message]) -> tuple[list[Message], list]:
        """All replies, and ``(message, arrays, weight)`` of those that pass :meth:`screen`."""
        replies = list(replies)
        if self._global_arrays is None:
            raise RuntimeError("aggregate_train called before configure_train")
        kept = self.screen(replies)
        log(INFO, "aggregate_train: %d of %d replies accepted", len(kept), len(replies))
        return replies, kept

    def screen(self, replies: list[Message]) -> list:
        """Per-reply checks against the global arrays; subclasses add their own."""
        return screen_replies(replies, self._global_arrays, self.weighted_by_key)

    def round_metrics(self, replies: list[Message], kept: list) -> MetricRecord:
        """The accepted replies' train metrics, aggregated, plus how many were dropped."""
        metrics = self.train_metrics_aggr_fn([msg.content for msg, _, _ in kept], self.weighted_by_key)
        metrics = MetricRecord(dict(metrics)) if metrics is not None else MetricRecord()
        metrics["agg-clients-dropped"] = len(replies) - len(kept)
        return metrics

    def aggregate_arrays(
        self, client_arrays: list[dict[str, np.ndarray]], shares: list[float]
    ) -> tuple[ArrayRecord, list[float]]:
        """Aggregate one round's accepted arrays; returns the record and per-layer truncation."""
        keys = list(self._global_arrays.keys())
        out: dict[str, np.ndarray] = {}
        truncation = []
        for module in factor_modules(keys):
            factors, rel = self.aggregate_layer(module, client_arrays, shares)
            out.update(factors)
            truncation.append(rel)
        for key in keys:
            if key not in out:
                out[key] = sum(share * arrays[key].astype(np.float64) for share, arrays in zip(shares, client_arrays)).astype(
                    client_arrays[0][key].dtype
                )
        return ArrayRecord({key: Array(np.ascontiguousarray(out[key])) for key in keys}), truncation

    def previous_factors(self, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``U`` and ``V`` this round's clients received, in float64."""
        return tuple(
            torch.from_numpy(self._global_arrays[f"{module}.{leaf}"].numpy()).double() for leaf in ("lora_U", "lora_V")
        )

    def aligned(self, module: str, big_u: torch.Tensor, big_v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``U R, V R`` with the orthogonal ``R`` closest to last round's factors."""
        prev_u, prev_v = self.previous_factors(module)
        if prev_u.shape != big_u.shape:
            return big_u, big_v
        return procrustes_align(big_u, big_v, prev_u, prev_v)

    def aggregate_layer(
        self, module: str, client_arrays: list[dict[str, np.ndarray]], shares: list[float]
    ) -> tuple[dict[str, np.ndarray], float]:
        """Exact rank-``rank`` aggregate of one layer, balanced for the clients."""
        dtype = client_arrays[0][f"{module}.lora_U"].dtype
        us, ss, vs = [], [], []
        for k, arrays in enumerate(client_arrays):
            s = arrays[f"{module}.lora_S"]
            if s.shape[0] != 1:
                raise ValueError(
                    f"{module}: S has {s.shape[0]} group rows; FedLowRank aggregates G = 1 "
                    "adapters, use FairLoRA for grouped ones"
                )
            # float64 keeps the core's small singular values accurate at no real cost.
            us.append(torch.from_numpy(arrays[f"{module}.lora_U"]).double())
            ss.append(torch.from_numpy(s[0]).double())
            vs.append(torch.from_numpy(arrays[f"{module}.lora_V"]).double())
        rank = self.rank or self._global_arrays[f"{module}.lora_U"].shape[1]
        agg = aggregate_svd(us, ss, vs, shares, rank, method=self.aggregation_method)
        big_u, big_s, big_v = balance_factors(agg.u, agg.s, agg.v)
        if self.align:
            big_u, big_v = self.aligned(module, big_u, big_v)
        norm = float(torch.sqrt(agg.s.square().sum() + agg.truncated_norm**2))
        rel = float(agg.truncated_norm) / norm if norm > 0 else 0.0
        factors = {
            f"{module}.lora_U": big_u.numpy().astype(dtype),
            f"{module}.lora_S": big_s.numpy().astype(dtype),
            f"{module}.lora_V": big_v.numpy().astype(dtype),
        }
        return factors, rel
