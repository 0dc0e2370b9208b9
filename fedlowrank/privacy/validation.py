"""Model checks and preparation for adapter-only DP-SGD: what Opacus may train, and hooks for grouped adapters."""

from __future__ import annotations


from opacus.grad_sample import GradSampleModule
from opacus.validators import ModuleValidator
from torch import nn

from fedlowrank.adapters import SVDAdapter

from .grad_sampler import track_group_weights

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
