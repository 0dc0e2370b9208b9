"""Privacy accounting that survives rounds.

A federated client is rebuilt every round, but its privacy loss accumulates over all
the rounds it trains in. The accountant's history, a list of
``(noise_multiplier, sample_rate, steps)`` entries, is therefore exported after each
round as plain Python lists (:func:`export_accountant_state`; a Flower
``ConfigRecord`` takes it as is), and restored before the next
(:func:`load_accountant_state`). A restored accountant reports the same epsilon as one
that was never interrupted. :func:`check_budget` tells, before a round, whether that
round's planned steps would take epsilon past a target, so the client can skip
training and say so instead of overspending.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from opacus.accountants import IAccountant, RDPAccountant, create_accountant
from opacus.accountants.analysis import rdp as rdp_analysis
from torch.utils.data import DataLoader

ACCOUNTANTS = ("rdp", "prv")
"""Accounting mechanisms offered: Renyi DP, and PRV (tighter, slower)."""

STATE_KEYS = ("mechanism", "noise_multiplier", "sample_rate", "steps")
"""Keys of an exported accountant state."""

_MAX_SIGMA = 1e6


def _check_mechanism(mechanism: str) -> str:
    if mechanism not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {mechanism!r}")
    return mechanism


def _check_delta(delta: float) -> float:
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    return float(delta)


def export_accountant_state(accountant: IAccountant) -> dict[str, Any]:
    """The accountant's history as plain Python values.

    Parameters
    ----------
    accountant : opacus.accountants.IAccountant
        An RDP or PRV accountant.

    Returns
    -------
    dict
        ``{"mechanism": str, "noise_multiplier": list[float],
        "sample_rate": list[float], "steps": list[int]}``, one list entry per history
        entry. Every value is a ``str`` or a list of Python ``float``/``int``, which a
        Flower ``ConfigRecord`` accepts directly.
    """
    mechanism = _check_mechanism(accountant.mechanism())
    history = list(accountant.history)
    return {
        "mechanism": mechanism,
        "noise_multiplier": [float(h[0]) for h in history],
        "sample_rate": [float(h[1]) for h in history],
        "steps": [int(h[2]) for h in history],
    }


def load_accountant_state(
    state: Mapping[str, Any] | None, mechanism: str = "rdp"
) -> IAccountant:
    """Rebuild an accountant from :func:`export_accountant_state`'s output.

    Parameters
    ----------
    state : mapping or None
        An exported state; lists or numpy arrays are accepted for the three history
        columns. None or an empty mapping gives a fresh accountant (first round).
    mechanism : {"rdp", "prv"}
        Mechanism of a fresh accountant; an exported state carries its own.

    Returns
    -------
    opacus.accountants.IAccountant

    Raises
    ------
    ValueError
        On missing keys, columns of different lengths, an unknown mechanism, or
        values out of range.
    """
    if not state:
        return create_accountant(mechanism=_check_mechanism(mechanism))
    missing = [k for k in STATE_KEYS if k not in state]
    if missing:
        raise ValueError(f"accountant state is missing keys {missing}; expected {STATE_KEYS}")
    accountant = create_accountant(mechanism=_check_mechanism(str(state["mechanism"])))
    sigma = np.asarray(state["noise_multiplier"], dtype=np.float64).reshape(-1)
    rate = np.asarray(state["sample_rate"], dtype=np.float64).reshape(-1)
    steps = np.asarray(state["steps"]).reshape(-1)
    if not len(sigma) == len(rate) == len(steps):
        raise ValueError(
            f"accountant state columns differ in length: noise_multiplier {len(sigma)}, "
            f"sample_rate {len(rate)}, steps {len(steps)}"
        )
    if len(steps) and (
        np.any(sigma < 0) or np.any(rate <= 0) or np.any(rate > 1) or np.any(steps < 1)
        or not np.all(np.equal(np.mod(steps, 1), 0))
    ):
        raise ValueError(
            "accountant state out of range: noise multipliers must be >= 0, sample "
            "rates in (0, 1], steps positive integers"
        )
    # Python scalars, so that the RDP/PRV accountants merge equal entries of later
    # steps exactly as they would have without the export.
    accountant.history = [
        (float(s), float(q), int(n)) for s, q, n in zip(sigma, rate, steps, strict=True)
    ]
    return accountant


def _as_accountant(
    state: IAccountant | Mapping[str, Any] | None, mechanism: str
) -> IAccountant:
    if isinstance(state, IAccountant):
        return load_accountant_state(export_accountant_state(state))
    return load_accountant_state(state, mechanism)


@functools.lru_cache(maxsize=256)
def _rdp_one_step(noise_multiplier: float, sample_rate: float) -> np.ndarray:
    # RDP of one subsampled Gaussian step at Opacus' default orders. RDP composes by
    # addition, so an entry of n steps is n times this; caching it makes budget checks
    # and noise calibration cost one evaluation per (sigma, q) instead of one per call.
    rdp = rdp_analysis.compute_rdp(
        q=sample_rate, noise_multiplier=noise_multiplier, steps=1,
        orders=RDPAccountant.DEFAULT_ALPHAS,
    )
    rdp.setflags(write=False)
    return rdp


def _epsilon(accountant: IAccountant, delta: float) -> float:
    if not accountant.history:
        return 0.0
    if isinstance(accountant, RDPAccountant):
        # Same sum, in the same order, as RDPAccountant.get_privacy_spent.
        rdp = sum(_rdp_one_step(float(s), float(q)) * n for s, q, n in accountant.history)
        eps, _ = rdp_analysis.get_privacy_spent(
            orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta
        )
        return float(eps)
    return float(accountant.get_epsilon(delta=delta))


def epsilon_spent(
    state: IAccountant | Mapping[str, Any] | None, delta: float, mechanism: str = "rdp"
) -> float:
    """Epsilon spent so far at ``delta``.

    Parameters
    ----------
    state : IAccountant, exported state, or None
        The accountant or its exported state; None means nothing spent.
    delta : float
        Target delta, in (0, 1); usually below 1 / (number of local examples).
    mechanism : {"rdp", "prv"}
        Used only when ``state`` is empty.

    Returns
    -------
    float
        0.0 before any step; ``inf`` if a step ran without noise.
    """
    return _epsilon(_as_accountant(state, mechanism), _check_delta(delta))


def _epsilon_with(
    accountant: IAccountant, delta: float, noise_multiplier: float, sample_rate: float,
    steps: int,
) -> float:
    # The would-be epsilon: the real history plus the planned entry, on a copy.
    trial = load_accountant_state(export_accountant_state(accountant))
    if steps > 0:
        trial.history.append((float(noise_multiplier), float(sample_rate), int(steps)))
    return _epsilon(trial, delta)


def _check_plan(noise_multiplier: float, sample_rate: float, steps: int) -> None:
    if noise_multiplier < 0:
        raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
    if not 0.0 < sample_rate <= 1.0:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
    if steps < 0 or int(steps) != steps:
        raise ValueError(f"steps must be a non-negative integer, got {steps}")


@dataclass(frozen=True)
class BudgetCheck:
    """Whether the next round fits the privacy budget.

    Attributes
    ----------
    stop : bool
        True when the planned steps would take epsilon past ``target_epsilon``:
        the client should skip training this round and report it.
    epsilon_spent : float
        Epsilon of the history so far.
    epsilon_after : float
        Epsilon if the planned steps ran.
    target_epsilon : float
        The budget.
    steps : int
        Planned steps of the round.
    """

    stop: bool
    epsilon_spent: float
    epsilon_after: float
    target_epsilon: float
    steps: int

    @property
    def decision(self) -> str:
        """``"stop"`` or ``"train"``."""
        return "stop" if self.stop else "train"

    def metrics(self, prefix: str = "dp_") -> dict[str, float | int]:
        """Flat numbers for a round's metrics (a Flower ``MetricRecord`` takes them)."""
        return {
            f"{prefix}epsilon": self.epsilon_spent,
            f"{prefix}epsilon_if_trained": self.epsilon_after,
            f"{prefix}target_epsilon": self.target_epsilon,
            f"{prefix}stopped": int(self.stop),
        }


def check_budget(
    state: IAccountant | Mapping[str, Any] | None,
    *,
    target_epsilon: float,
    delta: float,
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    mechanism: str = "rdp",
) -> BudgetCheck:
    """Decide before a round whether its steps would exceed the privacy budget.

    Parameters
    ----------
    state : IAccountant, exported state, or None
        History so far (None before the first round).
    target_epsilon : float
        Total budget over all rounds.
    delta : float
        Target delta.
    noise_multiplier, sample_rate, steps
        The round's plan; see :func:`round_plan` for ``sample_rate`` and ``steps``.
    mechanism : {"rdp", "prv"}
        Used only when ``state`` is empty.

    Returns
    -------
    BudgetCheck
        ``stop`` is True if ``epsilon_after > target_epsilon``.

    Raises
    ------
    ValueError
        On a non-positive target, delta outside (0, 1), or an invalid plan.
    """
    if not target_epsilon > 0:
        raise ValueError(f"target_epsilon must be positive, got {target_epsilon}")
    _check_plan(noise_multiplier, sample_rate, steps)
    delta = _check_delta(delta)
    accountant = _as_accountant(state, mechanism)
    spent = _epsilon(accountant, delta)
    after = _epsilon_with(accountant, delta, noise_multiplier, sample_rate, steps)
    return BudgetCheck(after > target_epsilon, spent, after, float(target_epsilon), int(steps))


def round_plan(data_loader: DataLoader, epochs: int) -> tuple[float, int]:
    """Sample rate and number of steps of one round, as Opacus will account them.

    With Poisson sampling Opacus samples each example with probability
    ``1 / len(data_loader)`` and runs ``len(data_loader)`` steps per epoch.

    Returns
    -------
    (float, int)
        ``(sample_rate, steps)``.
    """
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    batches = len(data_loader)
    if batches == 0:
        raise ValueError("the data loader is empty: no training data on this client")
    return 1.0 / batches, epochs * batches


def calibrate_noise(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    *,
    state: IAccountant | Mapping[str, Any] | None = None,
    mechanism: str = "rdp",
    epsilon_tolerance: float = 0.01,
) -> float:
    """Smallest noise multiplier (within tolerance) that keeps epsilon <= target.

    Unlike Opacus' ``get_noise_multiplier`` this counts the history already spent:
    epsilon(history + ``steps`` at ``sample_rate``) <= ``target_epsilon``. Pass the
    steps of all remaining rounds, and every round calibrates to the same noise.

    Raises
    ------
    ValueError
        If the history alone already reaches the target, or no noise below 1e6
        meets it.
    """
    if not target_epsilon > 0:
        raise ValueError(f"target_epsilon must be positive, got {target_epsilon}")
    _check_plan(0.0, sample_rate, steps)
    delta = _check_delta(delta)
    accountant = _as_accountant(state, mechanism)
    spent = _epsilon(accountant, delta)
    if spent >= target_epsilon:
        raise ValueError(
            f"the privacy budget is spent: epsilon so far {spent:.4g} >= target "
            f"{target_epsilon:g}"
        )
    if steps == 0:
        return 0.0

    def eps(sigma: float) -> float:
        return _epsilon_with(accountant, delta, sigma, sample_rate, steps)

    low, high = 0.0, 1.0
    eps_high = eps(high)
    while eps_high > target_epsilon:
        low, high = high, 2 * high
        if high > _MAX_SIGMA:
            raise ValueError(
                f"target epsilon {target_epsilon:g} cannot be met for {steps} steps at "
                f"sample rate {sample_rate:g}: the budget is too small"
            )
        eps_high = eps(high)
    # Bisection; the upper end always satisfies the budget.
    while target_epsilon - eps_high > epsilon_tolerance and high - low > 1e-6:
        mid = 0.5 * (low + high)
        e = eps(mid)
        if e <= target_epsilon:
            high, eps_high = mid, e
        else:
            low = mid
    return high
