"""FairLoRA: shared adapter factors with one row of singular values per demographic group.

Clients train ``dW_g = U diag(S[g]) V^T`` (S is G x r) and send, next to the factors,
how many training samples of each group they used: metrics ``group-count-g0`` ..
``group-count-g{G-1}`` in the train reply's MetricRecord. The server turns them into
per-group weights ``w_kg = n_kg / sum_j n_jg`` and aggregates every adapted layer with
one of two rules:

``exact``
    rule ``fairlora-exact`` (:mod:`fedlowrank.aggregation.rules`): shared ``u, v``
    and per-group ``s`` fitted by CP-ALS to ``M_g = sum_k w_kg U_k diag(S_k[g]) V_k^T``
    at global rank ``R`` (default the adapter rank), from the better of the pooled and
    the block start, handed back with
    :func:`fedlowrank.aggregation.balance_grouped_factors` (magnitude moved into
    ``U, V``; ``|S| <= cap``), the scale Adam clients train stably at (docs/design.md step 6,
    measured in ``docs/fairlora.md``).
``paper``
    FairFedMed's rule (rule ``fairfedmed``): ``U, V``
    averaged by sample share, each ``S`` row by that group's sample share, optionally
    the first columns of ``S`` shared, optionally a server moving average.

Both report the measured aggregation error per group, ``||M_g - dW_g|| / ||M_g||``,
computed in factored form against the same exact sums. The round's group shares ``pi_g`` go to the clients in the
train and evaluate configs (key ``group-share``, a list of G floats), where they set
each layer's ``group_share`` buffer: the mix of ``S`` rows used for unknown groups.
"""

from __future__ import annotations

from collections.abc import Sequence
from logging import INFO

import numpy as np
import torch
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common import log

from fedlowrank.aggregation.round import ServerRound
from fedlowrank.wire import GROUP_COUNT_PREFIX, GROUP_SHARE_KEY

from .fedlowrank import FedLowRank
from .replies import finite_number, reply_metrics

COUNT_PREFIX = GROUP_COUNT_PREFIX
MODES = ("exact", "paper")


def reply_group_counts(content: RecordDict, groups: int, prefix: str = COUNT_PREFIX) -> np.ndarray:
    """Per-group sample counts ``prefix{g}`` from a reply's MetricRecord, shape (G,).

    Raises
    ------
    ValueError
        If the groups counted are not exactly ``0..groups-1`` (the rows of ``S``), or a
        count is not a finite number >= 0.
    """
    metrics = reply_metrics(content)
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
    counts = []
    for g in range(groups):
        try:
            value = finite_number(found[g], f"count '{prefix}{g}'")
        except ValueError:
            value = -1.0
        if value < 0:
            raise ValueError(f"count '{prefix}{g}' = {found[g]!r} must be a finite number >= 0")
        counts.append(value)
    return np.array(counts, dtype=np.float64)


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
        Aggregation rule (module docstring): ``fairlora-exact`` or ``fairfedmed``.
    rank : int, optional
        Per-group adapter rank ``r`` of the reported floor (default: the rank of the
        initial arrays).
    global_rank : int, optional
        ``exact`` only: shared columns ``R`` (default ``rank``). ``G * rank`` reaches the
        per-group floor. Clients of lower rank load the ``r_k`` columns of largest
        share-weighted magnitude, and the server completes their replies with the rest.
    balance_cap : float or None (default: 1.0)
        ``exact`` only: bound on ``|S|`` in the hand-back, see
        :func:`fedlowrank.aggregation.balance_grouped_factors`. None moves only the
        share-weighted mean of ``|S|`` per column into ``U, V``. Measured on the per-group
        Fashion-MNIST setting (``docs/results.md``, 10 paired seeds, 8 rounds): a cap of 1
        ends at AUC 98.98 against 98.37 uncapped (+0.61 [+0.17, +1.05], 10/10 seeds), and
        the largest adapter product norm at 25 against 123 (uncapped it grew about 1.5x per
        round). An earlier measurement that favoured None was on a setting that turned out
        not to be per-group.
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
    the checks of :class:`FedLowRank` (including an ``S`` with another number of rows
    than the global one, or, in ``paper`` mode, another rank) or its counts do not cover
    exactly the rows of ``S``. The train MetricRecord gains ``agg-error-rel`` (mean over
    layers and groups of the relative aggregation error), ``agg-error-rel-g{g}``,
    ``agg-floor-rel`` (``exact``: the same for the best separate rank-``r`` truncation
    per group), ``group-share-g{g}``, ``agg-clients-dropped`` and ``agg-clients-kept``.
    """

    RULES = {"exact": "fairlora-exact", "paper": "fairfedmed"}
    """Each mode's aggregation rule."""

    def __init__(
        self,
        *,
        mode: str = "exact",
        rank: int | None = None,
        global_rank: int | None = None,
        balance_cap: float | None = 1.0,
        shared_fraction: float = 0.0,
        server_momentum: float = 0.0,
        group_shares: Sequence[float] | None = None,
        count_prefix: str = COUNT_PREFIX,
        als_iterations: int = 200,
        **kwargs,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown FairLoRA mode {mode!r}; choose one of {MODES}")
        if global_rank is not None and global_rank < 1:
            raise ValueError(f"global_rank must be >= 1, got {global_rank}")
        if mode == "exact":
            options = {"rank": rank, "iterations": als_iterations}
        else:
            options = {"shared_fraction": shared_fraction, "server_momentum": server_momentum}
        rule = self.RULES[mode]
        kwargs.setdefault("rule", rule)
        kwargs.setdefault("rule_options", options)
        super().__init__(rank=global_rank or rank, balance_cap=balance_cap, **kwargs)
        self.mode = mode
        self.global_rank = global_rank
        self.count_prefix = count_prefix
        self.state.group_shares = None if group_shares is None else [float(x) for x in group_shares]

    def summary(self) -> None:
        """Log the configuration."""
        super().summary()
        log(INFO, "\t└──> FairLoRA mode '%s', global rank %s, |S| cap %s", self.mode, self.global_rank or "= adapter rank", self.config.balance_cap)

    def client_config(self, config: ConfigRecord) -> ConfigRecord:
        """FedLowRank's, plus the group shares for unknown-group inference and column order."""
        config = super().client_config(config)
        if self.state.group_shares is not None:
            config[GROUP_SHARE_KEY] = list(self.state.group_shares)
        return config

    def reply_counts(self, msg: Message, rnd: ServerRound) -> np.ndarray:
        """The reply's per-group sample counts (its weights in each group's sum; the round
        checks them against the cap and the reply's weight)."""
        groups = int(np.shape(rnd.sent[f"{rnd.modules[0]}.lora_S"])[0]) if rnd.modules else 1
        return reply_group_counts(msg.content, groups, self.count_prefix)
