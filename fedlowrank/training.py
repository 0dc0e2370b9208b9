"""Local training and evaluation of an adapted model on one client's data.

Batches are ``(x, y, group_ids)``. The model's last dimension is one logit (binary
task, BCE loss) or one logit per class (cross-entropy). Group ids route each sample to
its row of singular values when the adapters are grouped.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from .adapters import adapter_layers, group_context
from .kernels import kernel_backend


PROGRESS_ENV = "FEDLOWRANK_PROGRESS"


def show_progress(stream=None, environ: Mapping[str, str] | None = None) -> bool:
    """Whether local training draws a progress bar.

    A bar helps a person watching a terminal and only clutters logs, so it is on when
    ``stream`` is a terminal, unless ``FEDLOWRANK_PROGRESS=0``; ``FEDLOWRANK_PROGRESS=1``
    forces it on (e.g. where the terminal is behind a pipe).

    Parameters
    ----------
    stream : file-like, optional
        Where the bar would go (default: ``sys.stderr``, tqdm's stream).
    environ : mapping, optional
        The environment (default: ``os.environ``).

    Returns
    -------
    bool
        True to show the bar.
    """
    environ = os.environ if environ is None else environ
    setting = environ.get(PROGRESS_ENV, "").strip()
    if setting in ("0", "1"):
        return setting == "1"
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream: not a terminal
        return False


def pick_device() -> torch.device:
    """CUDA when present, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """bf16 autocast on GPUs that support it (fp16 otherwise); none on CPU."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def precision(device: torch.device):
    """The autocast context for ``device`` (fp32 accumulation stays in the kernels)."""
    dtype = autocast_dtype(device)
    return torch.autocast(device_type="cuda", dtype=dtype) if dtype is not None else nullcontext()


def describe_compute(device: torch.device) -> str:
    """Which path a client trains on, e.g. ``"cuda, bf16 autocast, triton kernels"``."""
    dtype = autocast_dtype(device)
    backend = kernel_backend(torch.empty(0, device=device))
    mode = f"{str(dtype).removeprefix('torch.')} autocast" if dtype is not None else "fp32"
    return f"{device.type}, {mode}, {backend} kernels"


def routed(model: nn.Module, group_ids: torch.Tensor):
    """Group routing for grouped adapters; nothing to do for G = 1.

    Group ids must be ``-1`` (unknown) or ``0 .. G-1``: anything else is an error naming it.
    """
    groups = max((layer.groups for layer in adapter_layers(model).values()), default=1)
    if groups == 1:
        return nullcontext()
    bad = (group_ids < -1) | (group_ids >= groups)
    if bool(bad.any()):
        raise ValueError(f"group ids must be -1 (unknown) or 0..{groups - 1}; got {sorted(set(group_ids[bad].tolist()))[:5]}")
    return group_context(model, group_ids)


def check_labels(logits: torch.Tensor, y: torch.Tensor) -> None:
    """Labels the model can learn from: 0/1 for one logit, ``0 .. C-1`` for ``C`` logits.

    Raises ``ValueError`` naming the values found, instead of training on them silently
    (BCE takes any real target, so a label of 2 would just skew the model).
    """
    classes = logits.shape[-1]
    if classes == 1:
        bad = (y != 0) & (y != 1)
        want = "0 or 1 for a one-logit (binary) model"
    else:
        bad = (y < 0) | (y >= classes) | (y != y.round())
        want = f"integers in 0..{classes - 1} for a {classes}-logit model"
    if bool(bad.any()):
        raise ValueError(f"labels must be {want}; got {sorted(set(y[bad].tolist()))[:5]}")


def task_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """BCE on one logit, cross-entropy on several (labels checked first)."""
    check_labels(logits, y)
    if logits.shape[-1] == 1:
        return nn.functional.binary_cross_entropy_with_logits(logits.squeeze(-1), y.float())
    return nn.functional.cross_entropy(logits, y.long())


def freeze_frozen_norms(model: nn.Module) -> list[str]:
    """Put normalisation layers whose parameters are all frozen into eval mode.

    ``model.train()`` turns every BatchNorm back to batch statistics and lets it update
    its running mean and variance, even where its weights are frozen: the frozen base
    would then drift with every client's data (and differ between clients) although no
    parameter of it trains. Called right after ``model.train()``, this keeps such layers
    on the base's stored statistics. A norm with a trainable parameter (the user chose to
    adapt it) stays in training mode.

    Parameters
    ----------
    model : nn.Module
        The model, already in training mode.

    Returns
    -------
    list of str
        Names of the layers put into eval mode (BatchNorm, SyncBatchNorm, InstanceNorm).
    """
    frozen = []
    for name, module in model.named_modules():
        # _NormBase: the norms with running statistics (BatchNorm*, SyncBatchNorm, InstanceNorm*).
        if isinstance(module, nn.modules.batchnorm._NormBase) and not any(
            p.requires_grad for p in module.parameters(recurse=False)
        ):
            module.eval()
            frozen.append(name)
    return frozen


@dataclass
class TrainResult:
    """What a round of local training reports."""

    loss: float
    num_examples: int
    steps: int
    group_counts: dict[int, int] = field(default_factory=dict)
    """Samples per known group id in one epoch (FairLoRA weights its S rows by them)."""


def train_local(
    model: nn.Module,
    batches: Iterable,
    epochs: int,
    lr: float,
    device: torch.device,
    weight_decay: float = 0.0,
    optimizer: torch.optim.Optimizer | None = None,
    on_empty_batch: Callable[[], None] | None = None,
) -> TrainResult:
    """Train the trainable parameters with Adam for ``epochs`` passes over ``batches``.

    Normalisation layers of the frozen base stay in eval mode (:func:`freeze_frozen_norms`).
    The optimiser starts fresh each round, as usual in federated learning: its state
    belongs to the previous global model. A caller that needs its own optimiser (DP-SGD
    wraps it) passes it in, with ``on_empty_batch`` for the empty batches that Poisson
    sampling draws (they still count as a noisy step). A progress bar goes to stderr
    where :func:`show_progress` says a person watches it.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters; inject adapters first")
    if optimizer is None:
        optimizer = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    model.train()
    freeze_frozen_norms(model)  # the frozen base keeps its running statistics
    total, count, steps = 0.0, 0, 0
    seen: dict[int, int] = {}
    try:
        length = epochs * len(batches)
    except TypeError:  # a plain iterable: a bar without a total
        length = None
    # leave=False: one bar per round would otherwise pile up in the terminal.
    with tqdm(total=length, desc="local training", unit="batch", leave=False, disable=not show_progress()) as bar:
        for _ in range(epochs):
            for x, y, groups in batches:
                bar.update(1)
                if len(y) == 0 and on_empty_batch is not None:
                    on_empty_batch()
                    continue
                x, y, groups = x.to(device), y.to(device), groups.to(device)
                with routed(model, groups), precision(device):
                    loss = task_loss(model(x), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += loss.item() * len(y)
                count += len(y)
                steps += 1
                bar.set_postfix(loss=f"{total / count:.4f}", refresh=False)
                for g, n in zip(*torch.unique(groups[groups >= 0], return_counts=True)):
                    seen[int(g)] = seen.get(int(g), 0) + int(n)
    if count == 0:
        raise ValueError("no training data on this client")
    per_epoch = {g: n // max(epochs, 1) for g, n in sorted(seen.items())}
    return TrainResult(total / count, count // max(epochs, 1), steps, per_epoch)


@dataclass
class Predictions:
    """Scores, labels and groups of an evaluation pass (kept on the client)."""

    scores: np.ndarray
    labels: np.ndarray
    groups: np.ndarray
    loss: float


@torch.no_grad()
def predict(model: nn.Module, batches: Iterable, device: torch.device) -> Predictions:
    """Positive-class probabilities (binary) or class probabilities, with the mean loss."""
    model.eval()
    scores, labels, groups, total = [], [], [], 0.0
    for x, y, g in batches:
        x, y, g = x.to(device), y.to(device), g.to(device)
        with routed(model, g), precision(device):
            logits = model(x).float()
        total += float(task_loss(logits, y)) * len(y)
        probs = torch.sigmoid(logits.squeeze(-1)) if logits.shape[-1] == 1 else logits.softmax(-1)
        scores.append(probs.float().cpu().numpy())
        labels.append(y.cpu().numpy())
        groups.append(g.cpu().numpy())
    if not labels:
        raise ValueError("no evaluation data on this client")
    labels_np = np.concatenate(labels)
    return Predictions(np.concatenate(scores), labels_np, np.concatenate(groups), total / len(labels_np))
