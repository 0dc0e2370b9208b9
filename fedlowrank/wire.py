"""The message contract both sides import: array names, config keys the server sets for clients.

Keys are spelled once, here, and imported by ``fedlowrank.strategies`` and
``fedlowrank.clients`` alike.
"""

import re

FACTOR_SUFFIXES = ("lora_U", "lora_S", "lora_V")
"""An adapted layer ``m`` travels as ``m.lora_U`` (d_out x r), ``m.lora_S`` (G x r) and
``m.lora_V`` (d_in x r): ``dW_g = U diag(S[g]) V^T`` with the layer's scale folded in."""
FOLD_SUFFIXES = ("fold_U", "fold_V")
"""Server -> client only: ``m.fold_U`` (d_out x f) and ``m.fold_V`` (d_in x f), the base
correction ``fold_U fold_V^T`` that the residual mode ``fold`` and the rule ``flora``
maintain. Clients load them into the layer and never send them back."""


def is_fold_key(key: str) -> bool:
    """Whether ``key`` names a fold factor (``"a.b.fold_U"``)."""
    return key.rpartition(".")[2] in FOLD_SUFFIXES


def split_factor_key(key: str) -> tuple[str, str] | None:
    """``"a.b.lora_U"`` -> ``("a.b", "lora_U")``; None for a non-factor key."""
    module, _, leaf = key.rpartition(".")
    return (module, leaf) if leaf in FACTOR_SUFFIXES else None


TRUNCATION_KEY = "fedlowrank-truncation"
"""Train/evaluate config: how a client of lower rank than the global adapter holds it
(``"svd"``: the best approximation at its rank; ``"columns"``: the first columns)."""

FROZEN_KEY = "fedlowrank-frozen"
"""Train config: factor names (e.g. ``["lora_V"]``) the client must not train (FFA-LoRA)."""

FAIRNESS_STATS_KEY = "fairness-stats"
"""Evaluate reply: the ArrayRecord of mergeable fairness statistics (score histograms and
confusion counts per group and label) the server merges into federation-wide figures."""

METRIC_REDUCTIONS = {
    "eval-n": "sum",
    "eval-es_auc_groups": "min",
    "eval-es_acc_groups": "min",
    "dp_epsilon": "max",
    "dp_epsilon_if_trained": "max",
    "dp_target_epsilon": "max",
}
"""How the server combines a reply metric over replies where a weighted mean means nothing:
sample counts are summed (a mean of counts is no count), group coverage takes the fewest, and
privacy spent the worst site's. Per-group variants (``eval-n_g0``) follow their base name;
every other metric is the mean weighted by the replies' sample counts."""

_PER_GROUP = re.compile(r"_g\d+$")

UNIT_INTERVAL_METRICS = re.compile(
    r"^eval-(acc|auc|dpd|eod|es_acc|es_auc|worst_group_acc|worst_group_auc)(_g\d+)?$|^eval-xauc_g\d+_g\d+$"
)
"""Evaluate metrics in [0, 1] by definition (:func:`fedlowrank.fairness.group_fairness_report`):
a site's value outside it is left out, not averaged (one ``eval-auc = 1e300`` would be the mean)."""

EVALUATE_METRICS = re.compile(
    r"num-examples|eval-loss"
    r"|eval-(n|acc|auc|dpd|eod|es_acc|es_auc|es_acc_groups|es_auc_groups|worst_group_acc|worst_group_auc)(_g\d+)?"
    r"|eval-xauc_g\d+_g\d+|dp_\w+"
)
"""The evaluate metrics a fedlowrank client sends (``clients/app.py``: the loss, the examples and
:func:`fedlowrank.fairness.group_fairness_report` under ``eval-``); the apps' servers keep only these
(``FedLowRank(evaluate_metric_keys=...)``): an invented key is left out with its node named."""

SERVER_METRICS = re.compile(
    r"^(agg-|group-share-|secure-|fed-|eval-clients-)"
    r"|^lgreco-(bytes|bytes-per-client|node-ids|serialized-bytes|raw-bytes|dropped)$"
)
"""Names of the figures the server computes itself (aggregation diagnostics, group shares, secure and
L-GreCo byte counts, the federation-wide fairness report): a client's metric of such a name is left
out, so it cannot pass for the server's in a round where the server did not set it."""


def metric_reduction(name: str) -> str:
    """``"mean"``, ``"sum"``, ``"min"`` or ``"max"``: how metric ``name`` combines over replies."""
    return METRIC_REDUCTIONS.get(name, METRIC_REDUCTIONS.get(_PER_GROUP.sub("", name), "mean"))


GROUP_COUNT_PREFIX = "group-count-g"
"""Train reply metrics ``group-count-g0`` .. ``group-count-g{G-1}``: the samples of each group
a client trained on (FairLoRA weighs each group's sum by them)."""

GROUP_SHARE_KEY = "group-share"
"""Train/evaluate config: the group shares (unknown-group mix of ``S`` rows, and the
order of grouped columns for clients of lower rank)."""

REPLY_NODE_KEY = "fedlowrank-reply"
"""Server-internal: a ConfigRecord ``{"node-id": ...}`` the strategy adds to each evaluate
reply's content before metric aggregation, so aggregation functions can name the node."""


MAX_RECORD_KEYS = 1024
"""Most metric and config keys one reply may carry in all (ours send a few dozen): more is
refused with the node named, before any value is read."""

MAX_RECORD_BYTES = 1 << 20
"""Most bytes one reply's metric and config records may hold in all (keys, strings, bytes,
lists), on top of its arrays' budget."""
