"""The server round: one round of low-rank aggregation, usable without Flower.

A round takes the global arrays clients received and the persistent
:class:`~fedlowrank.aggregation.state.LowRankState`, checks and adds each client's arrays
as they arrive (:meth:`ServerRound.add`), and returns the new arrays, the round's
metrics and the updated state (:meth:`ServerRound.finish`). Everything a round does
lives here: the rule, completion of mixed ranks (in the rule's accumulator), residual
modes, robust clipping, the server optimiser (learning rate, momentum), the hand-back gauge and alignment.
A Flower strategy is message handling around it (``fedlowrank.strategies.FedLowRank``);
a notebook or a ``torch.distributed`` job drives it with plain arrays::

    config = RoundConfig(rule="exact", rank=4)
    state = LowRankState()
    for server_round in range(1, rounds + 1):
        rnd = ServerRound(config, state, arrays, server_round)
        for client_arrays, examples in train_clients(arrays):
            rnd.add(client_arrays, examples)
        arrays = rnd.finish().arrays or arrays

Arrays are a mapping ``name -> np.ndarray``; adapted layers are the keys
``<module>.lora_U``, ``.lora_S``, ``.lora_V`` (``dW = U diag(S) V^T``), every other array
(heads, norms) is a weighted mean, as in FedAvg.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch

from ..wire import FACTOR_SUFFIXES, is_fold_key, split_factor_key
from .accumulate import FLOAT32_PRODUCTS_ENTRIES, PRODUCT_PRECISIONS, WeightedSum, compact
from .align import procrustes_align, signed_permutation_align
from .balance import balance_factors, lora_gauge_factors
from .grouped import balance_grouped_factors
from .ranks import Factors
from .rules import Accumulator, AggregationRule, RuleResult, get_rule
from .state import LowRankState
from .validate import MAX_WEIGHT, check_declared_weight, check_reply_arrays, check_weight, declared_weights

RESIDUAL_MODES = ("drop", "carry", "fold")
GAUGES = ("balanced", "lora")
ROBUST_MODES = (None, "clip", "reject")
SERVER_OPTIMIZERS = ("adam", "yogi")
PEFT_FACTOR = re.compile(r"\.lora_[AB](\.[^.]+)?\.weight$|\.lora_embedding_[AB]")
"""PEFT's LoRA parameter names (``...q_proj.lora_A.default.weight``)."""

Log = Callable[..., None]
"""``log(level, message, *args)``, as :func:`logging.Logger.log` (Flower passes its own)."""

_logger = logging.getLogger(__name__)


def factor_modules(keys: Iterable[str]) -> list[str]:
    """Names of the adapted modules among array keys, in first-seen order."""
    seen: dict[str, None] = {}
    for key in keys:
        split = split_factor_key(key)
        if split is not None:
            seen.setdefault(split[0], None)
    return list(seen)


def layer_factors(arrays: Mapping[str, np.ndarray], module: str) -> Factors:
    """``(U, S, V)`` of one module from a mapping of numpy arrays, as float64 tensors."""
    u, s, v = (torch.from_numpy(np.array(arrays[f"{module}.{leaf}"], dtype=np.float64)) for leaf in FACTOR_SUFFIXES)
    return Factors(u, s.reshape(-1, u.shape[1]) if s.ndim != 2 else s, v)


@dataclass
class RoundConfig:
    """What a round does; the same every round of a run.

    Parameters
    ----------
    rule : str or AggregationRule (default: "exact")
        A registered rule (:func:`fedlowrank.aggregation.rules.registered_rules`).
    rule_options : dict, optional
        Options of a rule given by name.
    residual : {"drop", "carry", "fold"}, optional
        What the global rank could not hold: dropped (its norm is reported); carried into
        the next round's sum on the server, so that over rounds nothing is lost; or folded
        into the clients' frozen base (FedEx-LoRA style: sent as ``<module>.fold_U`` /
        ``.fold_V`` factors, rank at most the layer's size). Exact rules only; the default
        is the rule's first mode (``drop``; ``fold`` for ``flora``). See ``docs/aggregation.md``.
    rank : int, optional
        Global adapter rank; defaults to the rank of the initial arrays. Clamped per layer
        to ``min(d_out, d_in)``, with a log line.
    align : bool (default: True)
        Rotate each balanced G = 1 aggregate (``U R``, ``V R``, same product) to match the
        factors sent last round (orthogonal Procrustes), so clients' parameters move
        smoothly instead of jumping to a new SVD basis. Measured on the two-scanner digits
        setting (5 paired seeds, 20 rounds): final AUC 0.956 aligned vs 0.942 unaligned.
    gauge : {"balanced", "lora"} (default: "balanced")
        How an orthonormal G = 1 aggregate ``u diag(s) v^T`` is split for clients (the
        product is the same): ``"balanced"``, ``U = u sqrt(s)``, ``V = v sqrt(s)``; or
        ``"lora"``, ``V = v / sqrt(3)`` (LoRA's init size for every column) and
        ``U = u s sqrt(3)``, the gauge FedIT's clients keep. Measured in
        ``docs/results.md``.
    balance_cap : float or None (default: 1.0)
        Grouped rules: the bound on ``|S|`` in the hand-back
        (:func:`~fedlowrank.aggregation.balance_grouped_factors`; measured in ``docs/results.md``).
    dense_above : int, optional
        Stacked width beyond which a layer's sum is accumulated densely (default half the
        layer's smaller side; see :mod:`fedlowrank.aggregation.accumulate`).
    dense_products : {"auto", "float64", "float32"} (default: "auto")
        Precision of the chunk products of a dense sum (always summed in float64; see
        :mod:`fedlowrank.aggregation.accumulate`). ``"auto"``: float32 for layers of
        ``FLOAT32_PRODUCTS_ENTRIES`` (2^22) entries or more, where the float64 GEMM would
        dominate the round (about 1e-6 relative error in the result, logged once per
        layer), float64 below.
    max_weight : float (default: 1e9)
        Largest accepted weight (``num-examples``) and per-group count; a reply above it is
        dropped (one site claiming 1e30 examples would otherwise become the global model).
    share_cap : float or None (default: 10.0)
        Each reply's weight is capped at ``share_cap`` times the median positive weight of
        the round's valid replies (with fewer than 3, the median of the last round that had
        3 or more; none yet: no cap), and for grouped rules each group count at
        ``share_cap`` times that group's median count, so that no claimed sample count buys
        a client more than ``share_cap / (share_cap + K - 1)`` of a round of K. Capped
        replies are logged with their node. On Dirichlet splits (alpha 0.5, 5 to 100 sites)
        the largest weight was at most 5.5x the median (``docs/reliability.md``), so 10 did
        not act there; a federation whose largest site is more than 10x its median site is
        capped (and logged every round): raise it, or None for weights as claimed (up to
        ``max_weight``).
    node_max_weights : mapping of node id to float, optional
        Where a deployment knows its sites: the largest weight each node may claim, keyed
        on the node id Flower authenticated (``src_node_id``; with node authentication,
        the id ``flwr supernode register`` gave the site's key). A reply from a node not
        listed, or claiming more than its entry, is dropped with the node named (before
        ``share_cap``, which still applies). A federation of declared sites then bounds
        each site's share by the declarations alone, whatever it claims.
    robust : {None, "clip", "reject"} (default: None)
        Bound each client's update norm (its completed adapter products and other arrays,
        relative to the global sent) by ``robust_factor`` times the round's median: clip
        it to the bound, or drop the reply. With fewer than 3 valid replies the median of
        the last round that had 3 or more is used (none yet: nothing is clipped). A
        client's pull on the global is then at most its share times the bound. A node at a
        bound (capped, clipped or dropped) 3 rounds in a row is logged as such every round
        after. Cost on clean runs: ``docs/reliability.md``.
    robust_factor : float (default: 3.0)
    min_valid_replies : int (default: 1)
        Fewer valid replies than this keep the previous global (and the log says so).
    server_learning_rate : float (default: 1.0)
        The share of the round's aggregate change the global takes, in ``(0, 1]`` (as in
        Flower's ``FedAvgM``, without momentum): every client's change is scaled by it
        before aggregation (its completed product becomes ``G + lr (P + T - G)``, its other
        arrays ``g + lr (a - g)``), so under an exact rule the new global is the best
        rank-r approximation of ``G + lr (M - G)``, ``M`` the exact weighted mean.
    tail_weight : float in [0, 1] (default: 1.0)
        How much of the global adapter a lower-rank client could not hold completes its
        reply. 1: all of it (the exact update sum: a round in which nobody changes anything
        leaves the global unchanged at any mix of ranks). 0: none (the plain sum of what
        clients sent, zero-padding's decay: each component shrinks by the share of clients
        that could not hold it). Between: that decay, scaled. Measured in ``docs/results.md``.
    momentum : float (default: 0.0)
        Server momentum on the exact update, as Flower's ``FedAvgM``: the velocity
        ``v <- momentum v + D`` with ``D = M - G`` the round's exact change (clipped as
        ``robust`` says), and the new global the best rank-r approximation of
        ``G + server_learning_rate v``. ``v`` is kept exactly and bounded by the layer, not
        by rounds: its non-zero singular triplets while they are narrow, a dense matrix past
        ``dense_above`` (where that is cheaper). Exact G = 1 rules only; not with ``fold``.
    server_optimizer : {None, "adam", "yogi"} (default: None)
        An adaptive server step on the exact update, as Flower's ``FedAdam`` / ``FedYogi``
        (Reddi et al. 2021) with ``eta = server_learning_rate``: ``m <- b1 m + (1 - b1) D``,
        ``v <- b2 v + (1 - b2) D^2`` (Yogi: ``v <- v - (1 - b2) D^2 sign(v - D^2)``), and the
        new global the best rank-r approximation of ``G + eta_t m / (sqrt(v) + tau)`` with
        ``eta_t`` bias-corrected for Adam as Flower's is (Yogi: ``eta``). The second moment is elementwise, so both moments
        are kept dense, ``d_out x d_in`` per adapted layer (bounded by the layer, not by
        rounds). Exact G = 1 rules only; not with ``momentum`` or ``fold``.
    server_betas : (float, float) (default: (0.9, 0.99))
    server_tau : float (default: 1e-3)
        The adaptive step's moment decays and its floor on ``sqrt(v)`` (Flower's defaults).
    step_decay : float in (0, 1] (default: 1.0, off)
        With ``momentum``: Kesten's rule with an adaptive restart. When a round's exact
        change points against the velocity (their inner product over all adapted layers is
        negative: the server overshot, or the sampled clients' noise dominates), the
        velocity restarts from this round's change and the server step (``lr``, then
        ``lr`` times the decays so far) is multiplied by ``step_decay``; while changes keep
        agreeing the step stays. The step is kept in the state (``step_scale``) and
        reported as ``agg-server-step``.
    """

    rule: str | AggregationRule = "exact"
    rule_options: dict[str, Any] | None = None
    residual: str | None = None
    rank: int | None = None
    align: bool = True
    gauge: str = "balanced"
    balance_cap: float | None = 1.0
    dense_above: int | None = None
    dense_products: str = "auto"
    max_weight: float = MAX_WEIGHT
    share_cap: float | None = 10.0
    node_max_weights: Mapping[Any, float] | None = None
    robust: str | None = None
    robust_factor: float = 3.0
    min_valid_replies: int = 1
    server_learning_rate: float = 1.0
    momentum: float = 0.0
    server_optimizer: str | None = None
    server_betas: tuple[float, float] = (0.9, 0.99)
    server_tau: float = 1e-3
    step_decay: float = 1.0
    tail_weight: float = 1.0
    clamped: set[str] = field(default_factory=set, init=False, repr=False, compare=False)
    """Layers whose clamped rank was logged (once per run)."""
    narrowed: set[str] = field(default_factory=set, init=False, repr=False, compare=False)
    """Layers whose float32 dense products were logged (once per run)."""

    def __post_init__(self) -> None:
        if isinstance(self.rule, str) or self.rule_options:
            self.rule = get_rule(self.rule, **(self.rule_options or {}))
            self.rule_options = None
        if not 0.0 < self.server_learning_rate <= 1.0:
            raise ValueError(f"server_learning_rate must be in (0, 1], got {self.server_learning_rate}")
        if self.dense_products not in ("auto", *PRODUCT_PRECISIONS):
            raise ValueError(f"dense_products must be 'auto', 'float64' or 'float32', got {self.dense_products!r}")
        if self.gauge not in GAUGES:
            raise ValueError(f"gauge must be 'balanced' or 'lora', got {self.gauge!r}")
        if self.robust not in ROBUST_MODES:
            raise ValueError(f"robust must be None, 'clip' or 'reject', got {self.robust!r}")
        if self.share_cap is not None and not self.share_cap >= 1.0:
            raise ValueError(f"share_cap must be >= 1 (a multiple of the median weight) or None, got {self.share_cap}")
        self.node_max_weights = declared_weights(self.node_max_weights)
        if not self.robust_factor > 0 or not self.max_weight > 0 or self.min_valid_replies < 1:
            raise ValueError("need robust_factor > 0, max_weight > 0 and min_valid_replies >= 1")
        if self.rank is not None and self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        if not 0.0 <= self.tail_weight <= 1.0:
            raise ValueError(f"tail_weight must be in [0, 1], got {self.tail_weight}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if not 0.0 < self.step_decay <= 1.0:
            raise ValueError(f"step_decay must be in (0, 1], got {self.step_decay}")
        if self.step_decay < 1.0 and not self.momentum:
            raise ValueError("step_decay tests the change against the server momentum: set momentum > 0")
        if self.momentum and (not self.rule.residual or self.rule.grouped):
            raise ValueError(f"momentum needs an exact G = 1 rule; rule '{self.rule.name}' is not one")
        if self.server_optimizer is not None:
            if self.server_optimizer not in SERVER_OPTIMIZERS:
                raise ValueError(f"server_optimizer must be None or one of {SERVER_OPTIMIZERS}, got {self.server_optimizer!r}")
            if not self.rule.residual or self.rule.grouped:
                raise ValueError(f"server_optimizer needs an exact G = 1 rule; rule '{self.rule.name}' is not one")
            if self.momentum:
                raise ValueError("server_optimizer keeps its own first moment: set momentum = 0")
            b1, b2 = self.server_betas = tuple(float(b) for b in self.server_betas)
            if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0) or not self.server_tau > 0:
                raise ValueError(f"server_betas must be in [0, 1) and server_tau > 0, got {self.server_betas}, {self.server_tau}")
        if self.balance_cap is not None and not self.balance_cap >= 1.0:
            raise ValueError(f"balance_cap {self.balance_cap} must be >= 1 (or None)")
        rule = self.rule
        self.residual = rule.residual_modes[0] if self.residual is None else self.residual
        if (self.momentum or self.server_optimizer) and self.residual == "fold":
            raise ValueError("momentum does not combine with residual mode 'fold' (the fold takes what the rank cannot hold)")
        if self.residual not in RESIDUAL_MODES:
            raise ValueError(f"unknown residual mode {self.residual!r}; choose one of {RESIDUAL_MODES}")
        if self.residual not in rule.residual_modes:
            needs = "needs an exact rule" if not rule.residual else "is not available"
            raise ValueError(
                f"residual mode {self.residual!r} {needs}; rule '{rule.name}' supports {list(rule.residual_modes)}"
            )

    def fingerprint(self) -> dict[str, Any]:
        """The settings a checkpoint must share with the run resuming it (JSON-able)."""
        return {
            "rule": self.rule.name, "residual": self.residual, "rank": self.rank, "gauge": self.gauge,
            "server_learning_rate": self.server_learning_rate, "momentum": self.momentum,
            "step_decay": self.step_decay, "tail_weight": self.tail_weight,
            # Only when set: checkpoints written before the option existed still match.
            **({"server_optimizer": self.server_optimizer} if self.server_optimizer else {}),
        }

    def check_fits(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Refuse, before any client trains, global arrays this round cannot aggregate."""
        peft = sorted(k for k in arrays if PEFT_FACTOR.search(k))
        if peft:
            raise ValueError(
                f"PEFT LoRA factors ({peft[0]}, ...) reached FedLowRank: averaging lora_A and lora_B "
                "separately is not the average of B A, and FedLowRank does not do that silently. Send "
                "fedlowrank.adapters.exchange_state(peft_model) instead: it reads each layer's (B, A, "
                "scaling) as exact factors, and load_exchange_state writes the aggregate back into PEFT"
            )
        # A mean of integer or bool arrays (a step counter, a mask) is not one; cast, it changes type.
        other = sorted(k for k, a in arrays.items() if np.asarray(a).dtype.kind != "f")
        if other:
            raise ValueError(
                f"array '{other[0]}' has dtype {np.asarray(arrays[other[0]]).dtype}{f' (and {len(other) - 1} more)' if len(other) > 1 else ''}: "
                "FedLowRank aggregates float arrays only; keep integer and bool state (e.g. BatchNorm's "
                "num_batches_tracked) out of the exchanged arrays"
            )
        for module in factor_modules(arrays):
            rows = np.shape(arrays[f"{module}.lora_S"])[0]
            if rows > 1 and not self.rule.grouped:
                raise ValueError(
                    f"{module}: S has {rows} group rows; rule '{self.rule.name}' aggregates G = 1 "
                    "adapters (use FairLoRA for grouped ones)"
                )
            if rows > 1 and self.residual == "fold":
                raise ValueError(f"{module}: residual mode 'fold' needs G = 1 (one base for every group)")


class RoundResult(NamedTuple):
    """What a round gives back."""

    arrays: dict[str, np.ndarray] | None
    """The new global arrays (fold factors included), or None: the previous global is kept."""
    metrics: dict[str, float]
    """``agg-clients-kept``, the aggregation error (``agg-error-rel``, ...), group shares."""
    state: LowRankState
    """The persistent state, updated (residuals, group shares)."""


@dataclass
class _Reply:
    arrays: Mapping[str, np.ndarray]
    weight: float
    counts: np.ndarray | None
    node: Any
    norm: float = 0.0


@dataclass
class ServerRound:
    """One round of aggregation: add client arrays one at a time, then :meth:`finish`.

    Parameters
    ----------
    config : RoundConfig
    state : LowRankState
        The persistent state; updated in place by :meth:`finish`.
    global_arrays : mapping, optional
        What clients received this round (recorded in the state); default the state's.
    server_round : int, optional
        Recorded in the state (seeds rules that draw, such as FLoRA's fresh init).
    log : callable, optional
        ``log(level, message, *args)`` for the round's lines (clipping, clamped ranks);
        default this module's logger.
    """

    config: RoundConfig
    state: LowRankState
    global_arrays: Mapping[str, np.ndarray] | None = None
    server_round: int | None = None
    log: Log | None = None
    _accs: dict[str, Accumulator] = field(init=False, repr=False)
    _held: list[_Reply] = field(init=False, repr=False, default_factory=list)
    _kept: list[_Reply] = field(init=False, repr=False, default_factory=list)
    _sums: dict[str, np.ndarray] = field(init=False, repr=False, default_factory=dict)
    _total: float = field(init=False, repr=False, default=0.0)
    _failure: str | None = field(init=False, repr=False, default=None)
    _summed: int = field(init=False, repr=False, default=0)
    _summed_counts: list[np.ndarray] = field(init=False, repr=False, default_factory=list)
    weight_cap: float | None = field(init=False, default=None)
    """The round's cap on a reply's weight once :meth:`finish` ran (``share_cap`` x the median), or None."""

    def __post_init__(self) -> None:
        self.log = self.log or _logger.log
        if self.global_arrays is not None:
            self.config.check_fits(self.global_arrays)
            self.state.global_arrays = {k: np.asarray(v) for k, v in self.global_arrays.items()}
        if self.server_round is not None:
            self.state.server_round = int(self.server_round)
        if self.state.global_arrays is None:
            raise ValueError("no global arrays: pass the arrays clients received (or a state that holds them)")
        # Fold factors travel server -> client only: replies carry everything else.
        self.sent = {k: v for k, v in self.state.global_arrays.items() if not is_fold_key(k)}
        self.plain_keys = [k for k in self.sent if split_factor_key(k) is None]
        shares = self.state.group_shares
        shares = None if shares is None else torch.as_tensor(shares, dtype=torch.float64)
        self._accs = {}
        for index, module in enumerate(factor_modules(self.sent)):
            seed = self.state.server_round * 100_003 + index
            reference = layer_factors(self.sent, module)
            self._accs[module] = self.config.rule.accumulator(
                reference, shares, dense_above=self.config.dense_above, seed=seed, tail_weight=self.config.tail_weight,
                products=self.products(module, reference),
            )

    def products(self, module: str, reference: Factors) -> str:
        """The precision of the layer's dense chunk products (``dense_products``, resolved)."""
        if self.config.dense_products != "auto":
            return self.config.dense_products
        entries = reference.u.shape[0] * reference.v.shape[0]
        if entries < FLOAT32_PRODUCTS_ENTRIES:
            return "float64"
        if module not in self.config.narrowed:
            self.config.narrowed.add(module)
            self.log(logging.INFO, "%s: a dense sum takes float32 products (%d entries >= 2^22; about 1e-6 relative "
                     "error; dense_products='float64' keeps float64)", module, entries)
        return "float32"

    @property
    def modules(self) -> list[str]:
        """The adapted layers, in the arrays' order."""
        return list(self._accs)

    @property
    def accepted(self) -> list[Any]:
        """The nodes whose replies were accepted so far (``node`` as given to :meth:`add`)."""
        return [r.node for r in self._held + self._kept]

    # -- adding replies -------------------------------------------------------
    def check(
        self, arrays: Mapping[str, np.ndarray], weight: float, group_counts: np.ndarray | None = None
    ) -> tuple[float, dict[str, Factors]]:
        """Raise ``ValueError`` naming what is wrong with a reply; its weight and its layers' factors (float64)."""
        check_reply_arrays(arrays, self.sent)
        weight = check_weight(weight, "weight", self.config.max_weight)
        factors = {module: layer_factors(arrays, module) for module in self._accs}
        for module, acc in self._accs.items():
            try:
                self.config.rule.check(factors[module], acc.reference)
            except ValueError as err:
                raise ValueError(f"'{module}': {err}") from None
        if group_counts is not None:
            counts = np.asarray(group_counts, dtype=np.float64)
            groups = next(iter(self._accs.values())).groups if self._accs else counts.shape[0]
            if counts.shape != (groups,):
                raise ValueError(f"{counts.shape[0] if counts.ndim == 1 else counts.shape} group counts for {groups} groups")
            if not np.all(np.isfinite(counts)) or np.any(counts < 0):
                raise ValueError(f"group counts {counts.tolist()} must be finite numbers >= 0")
            if np.any(counts > self.config.max_weight):
                raise ValueError(f"group counts {counts.tolist()} exceed the cap {self.config.max_weight:g}")
            # Samples of unknown group are in the weight but in no count.
            if counts.sum() > weight + 0.5:
                raise ValueError(f"group counts sum to {counts.sum():g}, more than the weight {weight:g}")
        return weight, factors

    def add(
        self, arrays: Mapping[str, np.ndarray], weight: float, group_counts: np.ndarray | None = None, node: Any = None
    ) -> None:
        """Check one client's arrays and add them; ``ValueError`` (nothing added) if they fail.

        ``weight`` is the client's sample count; ``group_counts`` its per-group counts
        (grouped rules weigh each group's sum by them). With neither ``share_cap`` nor
        ``robust`` the reply is folded in at once; with either, it waits for the round's
        medians (the arrays are kept as given, typically views into the messages).
        """
        if self._failure is not None:
            raise RuntimeError(f"the round already failed: {self._failure}")
        weight, factors = self.check(arrays, weight, group_counts)
        check_declared_weight(node, weight, self.config.node_max_weights)
        counts = None if group_counts is None else np.asarray(group_counts, dtype=np.float64)
        reply = _Reply(arrays, weight, counts, node)
        if self.config.robust is None and self.config.share_cap is None:
            self._fold(reply, self.config.server_learning_rate, factors)
        else:
            if self.config.robust is not None:
                reply.norm = self.update_norm(arrays, factors)
            self._held.append(reply)  # its arrays as given (views); factors are formed again when folded

    def add_sum(
        self,
        products: Mapping[str, Factors],
        weight: float,
        rank_weights: Mapping[int, float | np.ndarray],
        plain: Mapping[str, np.ndarray],
        clients: int,
        group_counts: np.ndarray | None = None,
    ) -> None:
        """Add replies that arrive already summed (secure aggregation: the server sees no single reply).

        ``products[module]`` is ``sum_k w_k P_k`` as factors (per group row: ``sum_k c_kg P_k,g``),
        ``weight`` the replies' total weight, ``rank_weights[r]`` the total weight (per group:
        counts) of the replies of rank ``r``, whose tails the server adds itself, ``plain[key]``
        ``sum_k w_k a_k``, ``group_counts`` the total group counts (grouped rules). The sum
        enters the round exactly as the ``clients`` replies would have, server learning rate
        and momentum included. Nothing here looks at one reply, so neither ``share_cap`` nor
        ``robust`` can act: both must be off, and only rules that aggregate products take sums.
        """
        if self._failure is not None:
            raise RuntimeError(f"the round already failed: {self._failure}")
        if self.config.share_cap is not None or self.config.robust is not None or self.config.node_max_weights is not None:
            raise ValueError("a summed contribution has no single reply to cap or clip: set share_cap=None, "
                             "node_max_weights=None and robust=None")
        if not self.config.rule.sums_products:
            raise ValueError(f"rule {self.config.rule!r} needs each reply's factors; a secure sum gives products only")
        weight = check_weight(weight, "weight", self.config.max_weight * max(clients, 1))
        lr = self.config.server_learning_rate
        totals = None if group_counts is None else torch.as_tensor(group_counts, dtype=torch.float64)
        for module, acc in self._accs.items():
            w = acc.product_weights(weight, totals)
            acc.sum.count(w)
            acc.sum.add(products[module], lr, count=False)
            for rank, rank_weight in rank_weights.items():
                if rank < acc.reference.rank and acc.tail_weight:
                    part = acc.product_weights(float(np.sum(rank_weight)), None if totals is None else torch.as_tensor(rank_weight, dtype=torch.float64))
                    acc.sum.add(acc.tail(rank), lr * acc.tail_weight * part, count=False)
            if lr < 1.0:
                acc.sum.add(acc.reference, (1.0 - lr) * w, count=False)
        for key in self.plain_keys:
            ref = np.asarray(self.sent[key], dtype=np.float64)
            term = (1.0 - lr) * weight * ref + lr * np.asarray(plain[key], dtype=np.float64)
            self._sums[key] = term if key not in self._sums else self._sums[key] + term
        self._total += weight
        self._summed += clients
        if totals is not None:
            self._summed_counts.append(totals.numpy())

    def update_norm(self, arrays: Mapping[str, np.ndarray], factors: dict[str, Factors] | None = None) -> float:
        """The norm of a reply's change: adapter products (completed) and plain arrays."""
        factors = factors or {module: layer_factors(arrays, module) for module in self._accs}
        square = sum(acc.change_norm(factors[module]) ** 2 for module, acc in self._accs.items())
        square += sum(
            float(np.sum((np.asarray(arrays[k], dtype=np.float64) - np.asarray(self.sent[k], dtype=np.float64)) ** 2))
            for k in self.plain_keys
        )
        return float(np.sqrt(square))

    def _fold(self, reply: _Reply, shrink: float, factors: dict[str, Factors] | None = None) -> None:
        try:
            self._fold_unguarded(reply, shrink, factors or {m: layer_factors(reply.arrays, m) for m in self._accs})
        except Exception as err:
            # A reply half folded into some layers leaves no valid sum: the round is lost.
            self._failure = f"{type(err).__name__}: {err}"
            raise

    def _fold_unguarded(self, reply: _Reply, shrink: float, factors: dict[str, Factors]) -> None:
        group_weights = None if reply.counts is None else torch.as_tensor(reply.counts, dtype=torch.float64)
        for module, acc in self._accs.items():
            acc.add(factors[module], reply.weight, group_weights, shrink)
        for key in self.plain_keys:
            ref = np.asarray(self.sent[key], dtype=np.float64)
            term = reply.weight * (ref + shrink * (np.asarray(reply.arrays[key], dtype=np.float64) - ref))
            self._sums[key] = term if key not in self._sums else self._sums[key] + term
        self._total += reply.weight
        self._kept.append(_Reply(None, reply.weight, reply.counts, reply.node))  # arrays released

    def _fold_held(self) -> None:
        """Cap weights and group counts (``share_cap``), clip or drop updates (``robust``), then fold in order."""
        held, self._held = self._held, []
        state, config = self.state, self.config
        positive = [r.weight for r in held if r.weight > 0]  # a site with no data says nothing of the others
        if len(positive) >= 3:  # a median of fewer says nothing: carry the last one that did
            state.median_weight = float(np.median(positive))
            if config.robust is not None:
                state.median_norm = float(np.median([r.norm for r in held]))
        if config.share_cap is not None and state.median_weight:
            self.weight_cap = config.share_cap * state.median_weight
        group_caps = self._group_caps(held)
        norm_bound = None if config.robust is None or state.median_norm is None else config.robust_factor * state.median_norm
        for reply in held:
            shrink, bounded = 1.0, False
            if self.weight_cap is not None and reply.weight > self.weight_cap:
                self.log(logging.WARNING, "Capping the weight of node %s: %.6g claimed, %.6g allowed (%g x the median)",
                         reply.node, reply.weight, self.weight_cap, config.share_cap)
                reply.weight, reply.counts, bounded = self.weight_cap, _capped_counts(reply.counts, self.weight_cap), True
            if group_caps is not None and reply.counts is not None and np.any(reply.counts > group_caps):
                self.log(logging.WARNING, "Capping the group counts of node %s: %s claimed, at most %s (%g x each group's median)",
                         reply.node, reply.counts.tolist(), group_caps.tolist(), config.share_cap)
                reply.counts, bounded = np.minimum(reply.counts, group_caps), True
            if norm_bound is not None and reply.norm > norm_bound and reply.norm != 0:
                bounded = True
                if config.robust == "reject":
                    self.log(logging.WARNING, "Dropping reply from node %s: update norm %.3g above %.3g", reply.node, reply.norm, norm_bound)
                    self._count_bound(reply.node, True)
                    continue
                self.log(logging.WARNING, "Clipping update of node %s: norm %.3g above %.3g", reply.node, reply.norm, norm_bound)
                shrink = norm_bound / reply.norm
            self._count_bound(reply.node, bounded)
            self._fold(reply, config.server_learning_rate * shrink)

    def _group_caps(self, held: list[_Reply]) -> np.ndarray | None:
        """Grouped rules weigh each group by the replies' counts: ``share_cap`` times each group's
        median count (3 or more replies with counts; a group most sites lack is not capped)."""
        counts = [r.counts for r in held if r.counts is not None]
        if self.config.share_cap is None or len(counts) < 3:
            return None
        medians = np.median(np.stack(counts), axis=0)
        return np.where(medians > 0, self.config.share_cap * medians, np.inf)

    def _count_bound(self, node: Any, bounded: bool) -> None:
        """Consecutive rounds (of those it took part in) a node sat at a bound; logged from the third on
        (a steady push, not noise)."""
        key = str(node)
        if not bounded:
            self.state.at_bound.pop(key, None)
            return
        rounds = self.state.at_bound.get(key, 0) + 1
        self.state.at_bound[key] = rounds
        if rounds >= 3:
            self.log(logging.WARNING, "Node %s has been at the share cap or clip bound in its last %d rounds", node, rounds)

    # -- the result -----------------------------------------------------------
    def layer_rank(self, module: str) -> int:
        """The global rank of one layer: ``rank`` (or the sent width), clamped to its size."""
        u, v = self.sent[f"{module}.lora_U"], self.sent[f"{module}.lora_V"]
        want = self.config.rank or u.shape[1]
        limit = min(u.shape[0], v.shape[0])
        if want > limit and module not in self.config.clamped:
            self.config.clamped.add(module)
            self.log(logging.INFO, "%s: global rank %d clamped to min(d_out, d_in) = %d", module, want, limit)
        return min(want, limit)

    def finish(self) -> RoundResult:
        """The round's new global arrays, metrics and state.

        With fewer accepted replies than ``min_valid_replies`` (or no positive weight) the
        arrays are None and the state is unchanged: the previous global is kept. If the
        aggregation raises, the state is left as it was too.
        """
        before = self.state.snapshot()
        try:
            result = self._finish()
        except Exception:
            self.state.restore(before)
            raise
        if result.arrays is None:
            self.state.restore(before)
        return result

    def _finish(self) -> RoundResult:
        self._fold_held()
        if self._failure is not None:
            raise RuntimeError(f"aggregation failed while adding a reply ({self._failure})")
        kept = len(self._kept) + self._summed
        metrics: dict[str, float] = {"agg-clients-kept": kept}
        if kept < self.config.min_valid_replies or self._total <= 0:
            self.log(
                logging.WARNING, "aggregate: %d valid replies of total weight %g (at least %d and a positive weight "
                "needed); the global model is kept", kept, self._total, self.config.min_valid_replies,
            )
            return RoundResult(None, metrics, self.state)
        out: dict[str, np.ndarray] = {}
        errors, floors = [], []
        residual_mode = self.config.residual
        if self.config.step_decay < 1.0:
            if self.state.momentum and self._against_velocity():
                self.state.step_scale *= self.config.step_decay
                self.state.momentum.clear()  # the velocity restarts from this round's change
                metrics["agg-momentum-restart"] = 1
            metrics["agg-server-step"] = self.config.server_learning_rate * self.state.step_scale
        if self.config.server_optimizer:
            self.state.optimizer_steps += 1
        for module, acc in self._accs.items():
            if self.config.momentum:
                self._step_momentum(module, acc)
            if self.config.server_optimizer:
                self._step_adaptive(module, acc)
            if residual_mode == "carry" and module in self.state.residuals:
                acc.add_carried(self.state.residuals[module])
            result = acc.result(self.layer_rank(module))
            if residual_mode == "carry":
                self.state.residuals[module] = result.residual
            elif residual_mode == "fold":
                out.update(self._folded(module, result.residual))
            out.update(self._hand_back(module, result, acc))
            target = result.target_norms.clamp_min(1e-300)
            errors.append(torch.where(result.target_norms > 0, result.error_norms / target, 0.0).numpy())
            if result.floor_norms is not None:
                floors.append(torch.where(result.target_norms > 0, result.floor_norms / target, 0.0).numpy())
        for key in self.plain_keys:
            dtype = self.sent[key].dtype
            mean = self._sums[key] / self._total
            out[key] = mean.astype(dtype) if np.issubdtype(dtype, np.floating) else mean
        arrays = {k: out[k] for k in [*self.sent, *(k for k in out if is_fold_key(k))]}
        metrics.update(error_metrics(errors, floors))
        counts = [r.counts for r in self._kept if r.counts is not None] + self._summed_counts
        if counts and float(np.sum(counts)) > 0:
            total = np.sum(counts, axis=0)
            self.state.group_shares = (total / total.sum()).tolist()
        if self.config.rule.grouped and self.state.group_shares is not None:
            metrics.update({f"group-share-g{g}": share for g, share in enumerate(self.state.group_shares)})
        return RoundResult(arrays, metrics, self.state)

    def _step_momentum(self, module: str, acc: Accumulator) -> None:
        """``v <- momentum v + D``; the global's target gains ``lr momentum v_previous``.

        The accumulator holds ``G + lr D`` (each client's change scaled by the server
        learning rate), so ``D`` is read off it exactly; adding ``lr momentum v_previous``
        makes its target ``G + lr v``.
        """
        lr, beta = self.config.server_learning_rate, self.config.momentum
        reference = acc.reference
        velocity = WeightedSum(reference.u.shape[0], reference.v.shape[0], dense_above=acc.sum.dense_above)
        if acc.sum.dense:
            velocity.add_normalised(acc.sum.matrices() / lr)
        else:
            part = acc.sum.stacked()
            velocity.add_normalised(Factors(part.u, part.s / lr, part.v))
        velocity.add_normalised(Factors(reference.u, -reference.s / lr, reference.v))
        previous = self.state.momentum.get(module)
        scale = self.state.step_scale  # 1 unless step_decay acted: then the target is G + lr scale v
        change = self._change(acc) if scale != 1.0 else None
        if previous is not None:
            velocity.add_normalised(_scaled(previous, beta))
            acc.add_carried(_scaled(previous, lr * beta * scale))
        if change is not None:
            acc.add_carried(_scaled(change, lr * (scale - 1.0)))
        self.state.momentum[module] = velocity.matrices() if velocity.dense else compact(velocity)

    def _step_adaptive(self, module: str, acc: Accumulator) -> None:
        """Flower's FedAdam / FedYogi step on the layer's exact change; the target becomes
        ``G + eta_t m / (sqrt(v) + tau)`` (the accumulator holds ``G + lr D``)."""
        config, lr = self.config, self.config.server_learning_rate
        (b1, b2), tau = config.server_betas, config.server_tau
        change = self._change(acc)
        d = change[0] if not isinstance(change, Factors) else (change.u * change.s[0]) @ change.v.T
        moments = self.state.moments.get(module)
        m, v = (moments[0], moments[1]) if moments is not None else (torch.zeros_like(d), torch.zeros_like(d))
        m = b1 * m + (1.0 - b1) * d
        square = d * d
        t = self.state.optimizer_steps
        adam = config.server_optimizer == "adam"
        eta = lr * math.sqrt(1.0 - b2**t) / (1.0 - b1**t) if adam else lr  # as Flower's FedAdam / FedYogi
        v = b2 * v + (1.0 - b2) * square if adam else v - (1.0 - b2) * square * torch.sign(v - square)
        acc.add_carried((eta * m / (v.clamp_min(0).sqrt() + tau) - lr * d)[None])
        self.state.moments[module] = torch.stack([m, v])

    def _change(self, acc: Accumulator) -> Factors | torch.Tensor:
        """The round's exact change ``D = M - G`` of one layer (the accumulator holds ``G + lr D``)."""
        lr, reference = self.config.server_learning_rate, acc.reference
        if acc.sum.dense:
            return (acc.sum.matrices()[0] - (reference.u * reference.s[0]) @ reference.v.T)[None] / lr
        part = acc.sum.stacked()
        return Factors(torch.cat([part.u, reference.u], 1), torch.cat([part.s, -reference.s], 1) / lr,
                       torch.cat([part.v, reference.v], 1))

    def _against_velocity(self) -> bool:
        """Kesten's test: does this round's change point against the velocity, over all adapted layers?"""
        total = 0.0
        for module, acc in self._accs.items():
            previous = self.state.momentum.get(module)
            if previous is not None:
                total += _inner(self._change(acc), previous)
        return total < 0.0

    def _folded(self, module: str, residual: Factors | torch.Tensor) -> dict[str, np.ndarray]:
        """Add this round's residual to the layer's fold; its factors as sent to clients.

        The fold is re-factored exactly each round (its non-zero singular triplets), so its
        rank never exceeds ``min(d_out, d_in)``; it goes out balanced, ``u sqrt(s)``, ``v sqrt(s)``.
        """
        ref_u, ref_v = self.sent[f"{module}.lora_U"], self.sent[f"{module}.lora_V"]
        acc = WeightedSum(ref_u.shape[0], ref_v.shape[0])
        previous = self.state.residuals.get(module)
        if previous is not None:
            acc.add_normalised(previous)
        acc.add_normalised(residual)
        fold = compact(acc)
        self.state.residuals[module] = fold
        root = fold.s[0].clamp_min(0).sqrt()
        return {f"{module}.fold_U": (fold.u * root).numpy().astype(ref_u.dtype), f"{module}.fold_V": (fold.v * root).numpy().astype(ref_u.dtype)}

    def _hand_back(self, module: str, result: RuleResult, acc: Accumulator) -> dict[str, np.ndarray]:
        """The layer's factors as sent to clients: balanced and aligned if orthonormal.

        G = 1: ``gauge``, then the rotation nearest last round's factors (Procrustes).
        Grouped rules: magnitude moved into ``U, V`` per column (``|S| <= balance_cap``),
        then the signed permutation nearest last round's factors.
        """
        u, s, v = result.factors
        if result.magnitude_in_s:
            previous = acc.reference
            if self.config.rule.grouped:
                total = acc.sum.total
                shares = total / total.sum() if float(total.sum()) > 0 else None
                u, s, v = balance_grouped_factors(u, s, v, shares, cap=self.config.balance_cap)
                if self.config.align and previous.u.shape == u.shape:
                    u, s, v = signed_permutation_align(u, s, v, previous.u, previous.v)
            else:
                u, s, v = (lora_gauge_factors if self.config.gauge == "lora" else balance_factors)(u, s[0], v)
                if self.config.align and previous.u.shape == u.shape:
                    u, v = procrustes_align(u, v, previous.u, previous.v)
        dtype = self.sent[f"{module}.lora_U"].dtype
        return {f"{module}.{leaf}": t.numpy().astype(dtype) for leaf, t in zip(FACTOR_SUFFIXES, (u, s, v))}


def _capped_counts(counts: np.ndarray | None, weight: float) -> np.ndarray | None:
    """Per-group counts scaled down with a capped weight (they may not sum above it)."""
    if counts is None or counts.sum() <= weight:
        return counts
    return counts * (weight / counts.sum())


def _inner(a: Factors | torch.Tensor, b: Factors | torch.Tensor) -> float:
    """Frobenius inner product of two G = 1 terms, each factored or dense (``1 x d_out x d_in``)."""
    if isinstance(a, Factors) and isinstance(b, Factors):
        return float(((a.s[0][:, None] * b.s[0][None, :]) * (a.u.T @ b.u) * (a.v.T @ b.v)).sum())
    if isinstance(a, Factors):
        a, b = b, a
    if isinstance(b, Factors):
        return float((((a[0] @ b.v) * b.u).sum(0) * b.s[0]).sum())
    return float((a * b).sum())


def _scaled(term: Factors | torch.Tensor, factor: float) -> Factors | torch.Tensor:
    """``factor`` times a factored or dense term."""
    return Factors(term.u, term.s * factor, term.v) if isinstance(term, Factors) else term * factor


def error_metrics(errors: list[np.ndarray], floors: list[np.ndarray]) -> dict[str, float]:
    """Mean relative aggregation error over layers (per group when grouped), and the floor."""
    if not errors:
        return {}
    table = np.stack(errors)  # layers x G
    out = {"agg-error-rel": float(np.mean(table))}
    if table.shape[1] == 1:
        out["agg-truncation-rel"] = out["agg-error-rel"]
    else:
        for g in range(table.shape[1]):
            out[f"agg-error-rel-g{g}"] = float(np.mean(table[:, g]))
    if floors:
        out["agg-floor-rel"] = float(np.mean(np.stack(floors)))
    return out
