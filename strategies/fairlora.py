"""FairLoRA: shared adapter factors with one row of singular values per demographic group.

Clients train ``dW_g = U diag(S[g]) V^T`` (S is G x r) and send, next to the factors,
how many training samples of each group they used: metrics ``group-count-g0`` ..
``group-count-g{G-1}`` in the train reply's MetricRecord. The server turns them into
per-group weights ``w_kg = n_kg / sum_j n_jg`` and aggregates every adapted layer with
one of two rules:

``exact``
    :func:`fedlowrank.aggregation.aggregate_grouped_svd`: shared orthonormal ``u, v``
    and per-group ``s`` fitted by CP-ALS to ``M_g = sum_k w_kg U_k diag(S_k[g]) V_k^T``
    at global rank ``R`` (default the adapter rank), handed back with
    :func:`fedlowrank.aggregation.balance_grouped_factors` (magnitude moved into
    ``U, V``; ``|S| <= cap``), the scale Adam clients train stably at (DESIGN.md step 6,
    measured in ``docs/fairlora.md``).
``paper``
    FairFedMed's rule, :func:`fedlowrank.aggregation.fairfedmed_average`: ``U, V``
    averaged by sample share, each ``S`` row by that group's sample share, optionally
    the first columns of ``S`` shared, optionally a server moving average.

Both report the measured aggregation error per group, ``||M_g - dW_g|| / ||M_g||``,
computed in factored form. The round's group shares ``pi_g`` go to the clients in the
train and evaluate configs (key ``group-share``, a list of G floats), where they set
each layer's ``group_share`` buffer: the mix of ``S`` rows used for unknown groups.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from logging import INFO, WARNING

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid

from fedlowrank.aggregation import (
    aggregate_grouped_svd,
    balance_grouped_factors,
    fairfedmed_average,
    group_weights_from_counts,
    signed_permutation_align,
)

from .fedlowrank import FedLowRank, factor_modules

COUNT_PREFIX = "group-count-g"
SHARE_KEY = "group-share"
MODES = ("exact", "paper")


def reply_group_counts(content: RecordDict, groups: int, prefix: str = COUNT_PREFIX) -> np.ndarray:
    """Per-group sample counts ``prefix{g}`` from a reply's MetricRecord, shape (G,).

    Raises
    ------
    ValueError
        If the groups counted are not exactly ``0..groups-1`` (the rows of ``S``), or a
        count is not a finite number >= 0.
    """
    metrics = next(iter(content.metric_records.values()))
    found = {}
    for key, value in metrics.items():
        if key.startswith(prefix):
            suffix = key[len(prefix):]
            if not suffix.isdigit():
                raise ValueError(f"metric '{key}' is not of the form '{prefix}<group>'")
            found[int(suffix)] = value
    if sorted(found) != list(range(groups)):
        raise ValueError(
            f"per-group counts given for groups {sorted(found)}, but S has {groups} rows "
            f"(expected metrics {prefix}0 .. {prefix}{groups - 1})"
        )
    counts = np.array([found[g] for g in range(groups)], dtype=object)
    for g, value in enumerate(counts):
        if isinstance(value, list) or not np.isfinite(value) or value < 0:
            raise ValueError(f"count '{prefix}{g}' = {value!r} must be a finite number >= 0")
    return counts.astype(np.float64)


def grouped_residual_norms(
    us: Sequence[torch.Tensor],
    ss: Sequence[torch.Tensor],
    vs: Sequence[torch.Tensor],
    weights: torch.Tensor,
    u: torch.Tensor,
    s: torch.Tensor,
    v: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``||M_g - u diag(s[g]) v^T||`` and ``||M_g||`` per group, without forming d_out x d_in.

    ``M_g = sum_k weights[k, g] U_k diag(S_k[g]) V_k^T``. With ``[U_1 .. U_K, u] = Q_u R_u``
    (and likewise for V) the difference is ``Q_u R_u diag(d_g) R_v^T Q_v^T`` with
    ``d_g = (w_1g S_1[g], .., w_Kg S_K[g], -s[g])``, whose norm is that of the small core.
    Used to measure any rule's aggregation error on the same footing.
    """
    r_u = torch.linalg.qr(torch.cat([*us, u], dim=1), mode="r")[1]
    r_v = torch.linalg.qr(torch.cat([*vs, v], dim=1), mode="r")[1]
    diag = torch.cat([weights[k][:, None] * ss[k] for k in range(len(ss))] + [-s], dim=1)  # G x m
    target = diag.clone()
    target[:, -s.shape[1]:] = 0.0
    residual = torch.einsum("am,gm,bm->gab", r_u, diag, r_v).flatten(1).norm(dim=1)
    norms = torch.einsum("am,gm,bm->gab", r_u, target, r_v).flatten(1).norm(dim=1)
    return residual, norms


class FairLoRA(FedLowRank):
    """Federated grouped adapters: shared ``U, V``, one row of ``S`` per group.

    Parameters
    ----------
    mode : {"exact", "paper"} (default: "exact")
        Aggregation rule (module docstring).
    rank : int, optional
        Per-group adapter rank ``r`` (default: the rank of the initial arrays).
    global_rank : int, optional
        ``exact`` only: shared columns ``R`` (default ``rank``). ``G * rank`` reaches the
        per-group floor; clients keep only their first ``r_k`` columns (the largest),
        so give clients rank ``R`` when ``R > rank``.
    balance_cap : float or None (default: None)
        ``exact`` only: bound on ``|S|`` in the hand-back, see
        :func:`fedlowrank.aggregation.balance_grouped_factors`. None moves the
        share-weighted mean of ``|S|`` per column into ``U, V``. Measured on the
        two-scanner digits setting (5 paired seeds, 20 rounds): final AUC 0.956 with None
        vs 0.949 with a cap of 1, better on 5 of 5 seeds, with the same adapter-norm
        growth over 32 rounds (``tests/test_fairlora_stability.py`` runs both).
    shared_fraction : float (default: 0.0)
        ``paper`` only: leading fraction of the columns of ``S`` averaged by sample share
        for all groups (FairFedMed's shared singular values).
    server_momentum : float in [0, 1) (default: 0.0)
        ``paper`` only: the new global factors are ``m * previous + (1 - m) * average``.
    group_shares : sequence of float, optional
        Group shares sent before the first aggregation (default: none sent; clients use
        their uniform default).
    count_prefix : str (default: "group-count-g")
        Prefix of the per-group count metrics in train replies.
    als_iterations : int (default: 200)
        ``exact`` only: maximum ALS sweeps.
    **kwargs
        Passed to :class:`FedLowRank` and Flower's ``FedAvg``.

    Notes
    -----
    A reply is dropped with a logged reason (and the round goes on) when its arrays fail
    :func:`fedlowrank.strategies.replies.reply_arrays` (including an ``S`` with another
    number of rows than the global one) or its counts do not cover exactly the rows of
    ``S``. The train MetricRecord gains ``agg-error-rel`` (mean over layers and groups of
    the relative aggregation error), ``agg-error-rel-g{g}``, ``agg-floor-rel`` (``exact``:
    the same for the best separate rank-``r`` truncation per group), ``group-share-g{g}``
    and ``agg-clients-dropped``.
    """

    def __init__(
        self,
        *,
        mode: str = "exact",
        rank: int | None = None,
        global_rank: int | None = None,
        balance_cap: float | None = None,
        shared_fraction: float = 0.0,
        server_momentum: float = 0.0,
        group_shares: Sequence[float] | None = None,
        count_prefix: str = COUNT_PREFIX,
        als_iterations: int = 200,
        **kwargs,
    ) -> None:
        super().__init__(rank=rank, **kwargs)
        if mode not in MODES:
            raise ValueError(f"unknown FairLoRA mode {mode!r}; choose one of {MODES}")
        if global_rank is not None and global_rank < 1:
            raise ValueError(f"global_rank must be >= 1, got {global_rank}")
        if balance_cap is not None and not balance_cap >= 1.0:
            raise ValueError(f"balance_cap {balance_cap} must be >= 1 (or None)")
        if not 0.0 <= shared_fraction <= 1.0:
            raise ValueError(f"shared_fraction {shared_fraction} must be in [0, 1]")
        if not 0.0 <= server_momentum < 1.0:
            raise ValueError(f"server_momentum {server_momentum} must be in [0, 1)")
        self.mode = mode
        self.global_rank = global_rank
        self.balance_cap = balance_cap
        self.shared_fraction = shared_fraction
        self.server_momentum = server_momentum
        self.count_prefix = count_prefix
        self.als_iterations = als_iterations
        self.group_shares = None if group_shares is None else [float(x) for x in group_shares]
        # Per-round state handed from aggregate_train to aggregate_layer.
        self._round_counts: torch.Tensor | None = None
        self._round_count_rows: list[np.ndarray] = []
        self._layer_errors: list[tuple[np.ndarray, np.ndarray | None]] = []

    def summary(self) -> None:
        """Log the configuration."""
        super().summary()
        extra = (
            f"global rank {self.global_rank or 'rank'}, |S| cap {self.balance_cap}"
            if self.mode == "exact"
            else f"shared S fraction {self.shared_fraction}, server momentum {self.server_momentum}"
        )
        log(INFO, "\t└──> FairLoRA mode '%s': %s", self.mode, extra)

    # ------------------------------------------------------------------ configure

    def _with_shares(self, config: ConfigRecord) -> ConfigRecord:
        """The round's config plus the group shares for unknown-group inference."""
        if self.group_shares is not None:
            config[SHARE_KEY] = list(self.group_shares)
        return config

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """As :class:`FedLowRank`, with the group shares in the config."""
        return super().configure_train(server_round, arrays, self._with_shares(config), grid)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """As FedAvg, with the group shares in the config (evaluation routes unknowns too)."""
        return super().configure_evaluate(server_round, arrays, self._with_shares(config), grid)

    # ------------------------------------------------------------------ aggregate

    def num_groups(self) -> int:
        """G: the rows of ``S`` in the global arrays (equal for every layer)."""
        rows = {self._global_arrays[f"{m}.lora_S"].shape[0] for m in factor_modules(self._global_arrays.keys())}
        if len(rows) != 1:
            raise ValueError(f"global adapter layers disagree on the number of groups: {sorted(rows)}")
        return rows.pop()

    def screen(self, replies: list[Message]) -> list:
        """FedLowRank's checks, then the per-group counts (kept for this round's weights)."""
        kept, self._round_count_rows = self.screen_counts(super().screen(replies), self.num_groups())
        return kept

    def screen_counts(self, kept: list, groups: int) -> tuple[list, list[np.ndarray]]:
        """Keep the replies whose per-group counts match their ``S`` rows; log the others.

        In ``paper`` mode the factors are averaged entry by entry, so a reply must also
        keep the global rank.
        """
        accepted, counts = [], []
        for msg, arrays, weight in kept:
            try:
                if self.mode == "paper":
                    self._check_global_rank(arrays)
                counts.append(reply_group_counts(msg.content, groups, self.count_prefix))
            except ValueError as err:
                log(WARNING, "Dropping reply from node %s: %s", msg.metadata.src_node_id, err)
                continue
            accepted.append((msg, arrays, weight))
        return accepted, counts

    def _check_global_rank(self, arrays: dict[str, np.ndarray]) -> None:
        for module in factor_modules(self._global_arrays.keys()):
            want = self._global_arrays[f"{module}.lora_U"].shape[1]
            got = arrays[f"{module}.lora_U"].shape[1]
            if got != want:
                raise ValueError(
                    f"'{module}' has rank {got}; FairLoRA 'paper' averages factors entry by "
                    f"entry and needs the global rank {want} (use mode 'exact' for mixed ranks)"
                )

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate grouped factors with per-group weights; other arrays by sample share."""
        replies, kept = self.accepted_replies(replies)
        counts = self._round_count_rows
        total = sum(weight for _, _, weight in kept)
        if not kept or total <= 0 or float(np.sum(counts)) <= 0:
            return None, None
        self._round_counts = torch.as_tensor(np.stack(counts), dtype=torch.float64)
        _, shares_g = group_weights_from_counts(self._round_counts)
        self._layer_errors = []
        aggregated, _ = self.aggregate_arrays(
            [arrays for _, arrays, _ in kept], [weight / total for _, _, weight in kept]
        )
        self.group_shares = shares_g.tolist()
        metrics = self.round_metrics(replies, kept)
        metrics.update(self.error_metrics())
        for g, share in enumerate(self.group_shares):
            metrics[f"group-share-g{g}"] = share
        return aggregated, metrics

    def error_metrics(self) -> dict[str, float]:
        """Mean relative aggregation error over layers (per group and overall), and the floor."""
        errors = np.stack([e for e, _ in self._layer_errors])  # layers x G
        out = {"agg-error-rel": float(np.nanmean(errors))}
        for g in range(errors.shape[1]):
            out[f"agg-error-rel-g{g}"] = float(np.nanmean(errors[:, g]))
        floors = [f for _, f in self._layer_errors if f is not None]
        if floors:
            out["agg-floor-rel"] = float(np.nanmean(np.stack(floors)))
        return out

    def aggregate_layer(
        self, module: str, client_arrays: list[dict[str, np.ndarray]], shares: list[float]
    ) -> tuple[dict[str, np.ndarray], float]:
        """One layer by the configured rule; records its per-group relative error."""
        dtype = client_arrays[0][f"{module}.lora_U"].dtype
        # float64: the small cores' singular values stay accurate at no real cost.
        us = [torch.from_numpy(a[f"{module}.lora_U"]).double() for a in client_arrays]
        ss = [torch.from_numpy(a[f"{module}.lora_S"]).double() for a in client_arrays]
        vs = [torch.from_numpy(a[f"{module}.lora_V"]).double() for a in client_arrays]
        weights, shares_g = group_weights_from_counts(self._round_counts)
        rank = self.rank or self._global_arrays[f"{module}.lora_U"].shape[1]
        if self.mode == "exact":
            (u, s, v), floor = self._exact(us, ss, vs, weights, shares_g, rank)
            prev_u, prev_v = self.previous_factors(module)
            if self.align and prev_u.shape == u.shape:
                u, s, v = signed_permutation_align(u, s, v, prev_u, prev_v)
        else:
            u, s, v = self._paper(module, us, ss, vs, shares)
            floor = None
        residual, target = grouped_residual_norms(us, ss, vs, weights, u, s, v)
        rel = torch.where(target > 0, residual / target.clamp_min(1e-300), torch.zeros_like(residual))
        self._layer_errors.append((rel.numpy(), floor))
        factors = {
            f"{module}.lora_U": u.numpy().astype(dtype),
            f"{module}.lora_S": s.numpy().astype(dtype),
            f"{module}.lora_V": v.numpy().astype(dtype),
        }
        return factors, float(rel.mean())

    def _exact(self, us, ss, vs, weights, shares_g, rank):
        """CP-ALS aggregate, balanced for Adam clients; also the per-group floor (relative)."""
        agg = aggregate_grouped_svd(
            us, ss, vs, weights, rank,
            global_rank=self.global_rank,
            group_shares=shares_g,
            iterations=self.als_iterations,
            method=self.aggregation_method,
        )
        factors = balance_grouped_factors(agg.u, agg.s, agg.v, shares_g, cap=self.balance_cap)
        target = agg.target_norms.clamp_min(1e-300)
        floor = torch.where(agg.target_norms > 0, agg.floor_norms / target, torch.zeros_like(target))
        return factors, floor.numpy()

    def _paper(self, module, us, ss, vs, shares):
        """FairFedMed's averaging, optionally blended with the previous global factors."""
        u, s, v = fairfedmed_average(us, ss, vs, shares, self._round_counts, self.shared_fraction)
        if self.server_momentum > 0:
            m = self.server_momentum
            previous = [torch.from_numpy(self._global_arrays[f"{module}.{leaf}"].numpy()).double()
                        for leaf in ("lora_U", "lora_S", "lora_V")]
            u, s, v = (m * p + (1 - m) * x for p, x in zip(previous, (u, s, v)))
        return u, s, v
