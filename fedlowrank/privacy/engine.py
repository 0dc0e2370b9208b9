"""Adapter-only DP-SGD with Opacus: the private training setup of one client round.

Only parameters with ``requires_grad`` are trained privately: the adapter factors
(and any head left trainable). The frozen base model is public: it was pretrained
elsewhere and is never updated, so it needs no protection and gets no gradients.
Model checks live in :mod:`.validation`, the accountant in :mod:`.accounting`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from opacus import PrivacyEngine
from opacus.accountants import IAccountant
from opacus.grad_sample import GradSampleModule
from opacus.optimizers import DPOptimizer
from torch import nn
from torch.utils.data import DataLoader

from .accounting import (
    _check_delta,
    _check_mechanism,
    _epsilon,
    calibrate_noise,
    export_accountant_state,
    load_accountant_state,
    round_plan,
)
from .grad_sampler import _PENDING
from .validation import wrap_model

# Opacus' per-sample hooks on the first adapted layer fire on its output alone, since the frozen
# base's input needs no gradient: correct here, and torch says so at every backward of every round.
warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed with respect to "
                        "module outputs since no inputs require gradients", category=UserWarning)


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
