"""Adapter-only DP-SGD with Opacus, and a privacy accountant that survives rounds.

Only parameters with ``requires_grad`` are trained privately: the adapter factors
(and any head left trainable). The frozen base model is public: it was pretrained
elsewhere and is never updated, so it needs no protection and gets no gradients.

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
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from opacus import PrivacyEngine
from opacus.accountants import IAccountant, RDPAccountant, create_accountant
from opacus.accountants.analysis import rdp as rdp_analysis
from opacus.grad_sample import GradSampleModule
from opacus.optimizers import DPOptimizer
from opacus.validators import ModuleValidator
from torch import nn
from torch.utils.data import DataLoader

from fedlowrank.adapters import SVDAdapter

from .grad_sampler import _PENDING, track_group_weights

ACCOUNTANTS = ("rdp", "prv")
"""Accounting mechanisms offered: Renyi DP, and PRV (tighter, slower)."""

STATE_KEYS = ("mechanism", "noise_multiplier", "sample_rate", "steps")
"""Keys of an exported accountant state."""

_MAX_SIGMA = 1e6


# --------------------------------------------------------------------------- model


def _public_buffer(module: nn.Module, name: str) -> bool:
    # An adapter's group_share is a fixed mixing weight for rows of unknown group, and
    # fold_U/fold_V the server's base correction, all set from outside and never updated
    # by forward. Opacus forbids buffers on trainable layers because BatchNorm-style
    # running statistics would leak data unnoised; a constant does not.
    return isinstance(module, SVDAdapter) and name in ("group_share", "fold_U", "fold_V")


def validate_model(model: nn.Module) -> None:
    """Check that ``model`` can be trained with adapter-only DP-SGD.

    Runs Opacus' :class:`~opacus.validators.ModuleValidator` (BatchNorm and other
    layers that mix samples are refused) and Opacus' rule that trainable layers hold
    no buffers, with one exception: the adapters' constant buffers (``group_share``, folds).

    Raises
    ------
    ValueError
        If the model is not in training mode, has no trainable parameter, contains a
        layer Opacus refuses, or a trainable layer with a buffer.
    """
    problems = [str(e) for e in ModuleValidator.validate(model, strict=False)]
    for name, module in model.named_modules():
        if not any(p.requires_grad for p in module.parameters(recurse=False)):
            continue
        for buf_name, _ in module.named_buffers():
            if "." in buf_name:
                owner_name, _, leaf = buf_name.rpartition(".")
                owner = module.get_submodule(owner_name)
            else:
                owner, leaf = module, buf_name
            if not _public_buffer(owner, leaf):
                problems.append(
                    f"trainable layer {name or '<root>'} has buffer {buf_name!r}; its "
                    "value would escape the per-sample clipping and noise"
                )
    if not any(p.requires_grad for p in model.parameters()):
        problems.append("the model has no trainable parameters; inject adapters first")
    if problems:
        raise ValueError("model cannot be trained with DP-SGD: " + "; ".join(problems))


def wrap_model(
    model: nn.Module, *, loss_reduction: str = "mean", batch_first: bool = True
) -> GradSampleModule:
    """Wrap ``model`` in Opacus' hooks-mode ``GradSampleModule``.

    After each backward every trainable parameter holds ``grad_sample``, its
    per-sample gradient (batch, *shape). Adapter layers use
    :func:`~fedlowrank.privacy.grad_sampler.compute_svd_linear_grad_sample`, with the
    group weights of each forward recorded (:func:`track_group_weights`), so
    ``loss.backward()`` may run after the ``group_context`` has exited.

    Parameters
    ----------
    model : nn.Module
        The adapted model; put into training mode.
    loss_reduction : {"mean", "sum"}
        How the loss reduces over the batch.
    batch_first : bool (default: True)
        Whether inputs are (batch, ...).

    Returns
    -------
    GradSampleModule

    Raises
    ------
    ValueError
        See :func:`validate_model`; also on an unknown ``loss_reduction``.
    """
    if loss_reduction not in ("mean", "sum"):
        raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
    if isinstance(model, GradSampleModule):
        raise ValueError("model is already a GradSampleModule; pass the plain model")
    model.train()
    validate_model(model)
    # strict=False only skips Opacus' buffer rule, which validate_model has applied
    # with the group_share exception.
    gsm = GradSampleModule(
        model, batch_first=batch_first, loss_reduction=loss_reduction, strict=False
    )
    track_group_weights(gsm)
    return gsm


# ----------------------------------------------------------------------- accountant


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


# ------------------------------------------------------------------------ training


@dataclass
class PrivateTraining:
    """What :func:`make_private` returns: use these for the round, in place of the originals.

    Attributes
    ----------
    model : GradSampleModule
        The wrapped model (forward as usual; ``group_context`` works on it).
    optimizer : DPOptimizer
        Clips each per-sample gradient to ``max_grad_norm``, adds Gaussian noise of
        std ``noise_multiplier * max_grad_norm``, then steps the wrapped optimizer;
        each step is recorded by the accountant.
    data_loader : DataLoader
        Poisson-sampled loader (variable batch sizes, possibly empty batches).
    accountant : IAccountant
        History so far, including restored rounds.
    engine : PrivacyEngine
        The Opacus engine that set this up.
    noise_multiplier, max_grad_norm, sample_rate, delta : float
        The mechanism's parameters.
    """

    model: GradSampleModule
    optimizer: DPOptimizer
    data_loader: DataLoader
    accountant: IAccountant
    engine: PrivacyEngine
    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    delta: float

    def epsilon(self, delta: float | None = None) -> float:
        """Epsilon spent so far (all rounds) at ``delta`` (default: the setup's)."""
        return _epsilon(self.accountant, _check_delta(self.delta if delta is None else delta))

    def export_state(self) -> dict[str, Any]:
        """Accountant state to keep for the next round (:func:`export_accountant_state`)."""
        return export_accountant_state(self.accountant)

    def empty_batch_step(self) -> None:
        """Take the step of an empty Poisson batch: noise only, and accounted.

        Poisson sampling can draw no example. The accountant assumes a step (noise
        added, budget spent) happens anyway, so skipping it would misreport epsilon.
        Call this instead of forward/backward when a batch has no rows.
        """
        # A whole step of its own: clear what the last step left (Opacus checks).
        self.optimizer.zero_grad(set_to_none=True)
        for p in self.optimizer.params:
            p.grad_sample = torch.zeros((0, *p.shape), device=p.device, dtype=p.dtype)
        self.optimizer.step()

    def close(self) -> nn.Module:
        """Remove Opacus' hooks and per-sample attributes; return the plain model."""
        plain = self.model.to_standard_module()
        for module in plain.modules():
            for attr in ("activations", "max_batch_len", _PENDING):
                if hasattr(module, attr):
                    delattr(module, attr)
        return plain


def make_private(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data_loader: DataLoader,
    *,
    max_grad_norm: float,
    delta: float,
    noise_multiplier: float | None = None,
    target_epsilon: float | None = None,
    planned_steps: int | None = None,
    epochs: int = 1,
    accountant_state: IAccountant | Mapping[str, Any] | None = None,
    mechanism: str = "rdp",
    poisson_sampling: bool = True,
    loss_reduction: str = "mean",
    noise_generator: torch.Generator | None = None,
    secure_mode: bool = False,
) -> PrivateTraining:
    """Set up adapter-only DP-SGD for one round with Opacus' ``PrivacyEngine``.

    Parameters
    ----------
    model : nn.Module
        The adapted model; only parameters with ``requires_grad`` are trained.
    optimizer : torch.optim.Optimizer
        Optimizer over trainable parameters only (adapters, head).
    data_loader : DataLoader
        The client's training data.
    max_grad_norm : float
        Per-sample clipping bound (L2 over all trainable parameters).
    delta : float
        Target delta for the reported epsilon.
    noise_multiplier : float, optional
        Noise std over ``max_grad_norm``. Give this or ``target_epsilon``.
    target_epsilon : float, optional
        Total budget; the noise is calibrated (:func:`calibrate_noise`) so that the
        restored history plus ``planned_steps`` stays within it.
    planned_steps : int, optional
        Steps the budget must cover from now on (all remaining rounds); default
        ``epochs * len(data_loader)``, this round only.
    epochs : int (default: 1)
        Local epochs this round, for the default ``planned_steps``.
    accountant_state : IAccountant, exported state, or None
        History from earlier rounds (None on the first).
    mechanism : {"rdp", "prv"}
        Accountant of a fresh history.
    poisson_sampling : bool (default: True)
        Poisson-sample batches, as the accountant assumes. False keeps the given
        loader and makes the reported epsilon an approximation.
    loss_reduction : {"mean", "sum"}
        How the training loss reduces over the batch.
    noise_generator : torch.Generator, optional
        Seeded generator for the noise (reproducible tests; not for production).
    secure_mode : bool (default: False)
        Opacus' cryptographically secure noise and sampling (needs ``torchcsprng``).

    Returns
    -------
    PrivateTraining

    Raises
    ------
    ValueError
        On both or neither of ``noise_multiplier`` / ``target_epsilon``, a
        non-positive ``max_grad_norm``, optimizer parameters that are frozen or not
        in the model, an unsupported model (:func:`validate_model`), or a spent
        budget.
    """
    if (noise_multiplier is None) == (target_epsilon is None):
        raise ValueError("give exactly one of noise_multiplier and target_epsilon")
    if not max_grad_norm > 0 or not math.isfinite(max_grad_norm):
        raise ValueError(f"max_grad_norm must be a positive number, got {max_grad_norm}")
    delta = _check_delta(delta)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    model_params = {id(p) for p in model.parameters()}
    if any(id(p) not in model_params for p in params):
        raise ValueError("the optimizer holds parameters that are not in the model")
    in_optimizer = {id(p) for p in params}
    frozen = [
        n for n, p in model.named_parameters() if not p.requires_grad and id(p) in in_optimizer
    ]
    if frozen:
        raise ValueError(
            f"the optimizer holds frozen parameters {frozen[:5]}; DP-SGD trains only "
            "parameters with requires_grad (adapters, head): build the optimizer over those"
        )
    # A live accountant keeps counting; an exported state is rebuilt.
    if isinstance(accountant_state, IAccountant):
        accountant = accountant_state
        _check_mechanism(accountant.mechanism())
    else:
        accountant = load_accountant_state(accountant_state, mechanism)
    sample_rate, round_steps = round_plan(data_loader, epochs)
    if target_epsilon is not None:
        steps = round_steps if planned_steps is None else int(planned_steps)
        noise_multiplier = calibrate_noise(
            target_epsilon, delta, sample_rate, steps, state=accountant
        )
    if noise_multiplier < 0:
        raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}")

    gsm = wrap_model(model, loss_reduction=loss_reduction)
    engine = PrivacyEngine(accountant=accountant.mechanism(), secure_mode=secure_mode)
    # The engine attaches its accountant to the optimizer's step hook in make_private,
    # so the restored history must be in place before.
    engine.accountant = accountant
    module, dp_optimizer, dp_loader = engine.make_private(
        module=gsm,
        optimizer=optimizer,
        data_loader=data_loader,
        noise_multiplier=float(noise_multiplier),
        max_grad_norm=float(max_grad_norm),
        loss_reduction=loss_reduction,
        poisson_sampling=poisson_sampling,
        noise_generator=noise_generator,
    )
    return PrivateTraining(
        model=module,
        optimizer=dp_optimizer,
        data_loader=dp_loader,
        accountant=accountant,
        engine=engine,
        noise_multiplier=float(noise_multiplier),
        max_grad_norm=float(max_grad_norm),
        sample_rate=sample_rate,
        delta=delta,
    )


def per_sample_norms(params: Sequence[nn.Parameter]) -> torch.Tensor:
    """L2 norm of each sample's gradient over ``params`` (from ``grad_sample``).

    What Opacus' flat clipping bounds by ``max_grad_norm``.
    """
    norms = [
        p.grad_sample.reshape(p.grad_sample.shape[0], -1).norm(dim=1)
        for p in params
        if getattr(p, "grad_sample", None) is not None
    ]
    if not norms:
        raise ValueError("no parameter has grad_sample; run a backward through the wrapped model")
    return torch.stack(norms, dim=1).norm(dim=1)
