"""Per-sample gradients of the adapter layers (linear, conv, GPT-2 Conv1D) for Opacus.

Opacus computes per-sample gradients layer by layer from what a forward hook saved
(the layer's input, "activations") and what a backward hook sees (the gradient of the
loss with respect to the layer's output, "backprops"). This module registers the rule
for each adapter type with :func:`opacus.grad_sample.register_grad_sampler`, so that
Opacus' hooks-mode ``GradSampleModule`` handles the layer without falling back to
functorch (whose ``vmap`` would re-run the forward per sample). A convolution is the
same computation over its input patches (``unfold``), one row ``t`` per output position.

For one sample ``n`` with rows ``t`` (a sequence; one row for 2-D input), input
``x[n, t]`` (d_in), output gradient ``g[n, t]`` (d_out) and singular values
``s_n = w_n @ S`` (``w_n`` the sample's group weights, (G,)), the adapter computes
``h = x V``, ``y = scale * (h * s_n) U^T``, so::

    dU[n] = scale * sum_t g[n, t]^T (h[n, t] * s_n)          (d_out, r)
    dV[n] = scale * sum_t x[n, t]^T ((g[n, t] U) * s_n)      (d_in, r)
    dS[n] = w_n^T (x) scale * sum_t h[n, t] * (g[n, t] U)    (G, r)

Everything runs through rank-``r`` intermediates; no per-sample ``d_out x d_in``
matrix is formed. The frozen ``base`` has no trainable parameters and gets none.

Group weights are not an input of ``forward`` (they are set on the layer by
:func:`fedlowrank.adapters.group_context`), so Opacus' activation capture does not
see them, and the context has usually exited by the time ``loss.backward()`` runs.
:func:`track_group_weights` therefore adds the weights in effect at forward time to
the very activation record Opacus saved for that forward; the grad sampler reads them
from there, so a record and its weights can never be mismatched.
"""

from __future__ import annotations

from typing import Any

import torch
from opacus.grad_sample import register_grad_sampler
from opacus.grad_sample.gsm_base import AbstractGradSampleHooks
from torch import nn
from torch.utils.hooks import RemovableHandle

import torch.nn.functional as F
from opacus.utils.tensor_utils import unfold3d

from fedlowrank.adapters import SVDAdapter, SVDConv, SVDConv1D, SVDLinear

_PENDING = "_fedlowrank_records_before"
"""Attribute holding how many activation records a layer had before its forward."""


def forward_group_weights(layer: SVDAdapter, batch: int) -> torch.Tensor:
    """The (batch, G) group weights the layer's forward uses for a batch.

    Parameters
    ----------
    layer : SVDAdapter
        The adapter layer.
    batch : int
        Number of samples in the batch.

    Returns
    -------
    torch.Tensor
        ``layer.group_weights`` when a group context is active; otherwise the
        group-share mix (G > 1) or ones (G = 1), repeated for each sample, exactly as
        the adapter's forward mixes ``S`` without a context.
    """
    if layer.group_weights is not None:
        return layer.group_weights.detach().clone()
    if layer.groups == 1:
        return torch.ones(batch, 1, device=layer.lora_S.device, dtype=layer.lora_S.dtype)
    return layer.group_share.detach().expand(batch, layer.groups).clone()


def _record_count(layer: SVDAdapter, _inputs: Any) -> None:
    # Remember how many records Opacus holds before this forward, to find the new one.
    setattr(layer, _PENDING, len(getattr(layer, "activations", ())))


def _attach_weights(layer: SVDAdapter, inputs: tuple, _output: Any) -> None:
    before = getattr(layer, _PENDING, None)
    records = getattr(layer, "activations", None)
    # Opacus skips its capture in eval mode, under no_grad, or with hooks disabled;
    # then there is no new record and nothing to attach.
    if before is None or records is None or len(records) != before + 1:
        return
    x = inputs[0]
    if x.dim() < 2:
        return  # the grad sampler raises a clear error on this record
    records[-1].append(forward_group_weights(layer, x.shape[0]))


def track_group_weights(hooks: AbstractGradSampleHooks) -> list[RemovableHandle]:
    """Record each forward's group weights next to Opacus' saved activations.

    Parameters
    ----------
    hooks : opacus.grad_sample.GradSampleModule or GradSampleHooks
        The Opacus wrapper (hooks mode) already attached to the model. It must be
        attached first: these hooks run after Opacus' capture hook and append to the
        record it just made.

    Returns
    -------
    list of RemovableHandle
        Handles of the added hooks (remove them with the Opacus hooks).

    Raises
    ------
    ValueError
        If ``hooks`` is not an Opacus hooks-mode wrapper.
    """
    if not isinstance(hooks, AbstractGradSampleHooks) or not hasattr(
        hooks, "autograd_grad_sample_hooks"
    ):
        raise ValueError(
            "track_group_weights needs an Opacus GradSampleModule/GradSampleHooks "
            f"(hooks mode) already attached to the model, got {type(hooks).__name__}"
        )
    handles: list[RemovableHandle] = []
    for module in hooks._module.modules():
        if isinstance(module, SVDAdapter) and any(
            p.requires_grad for p in module.parameters(recurse=False)
        ):
            handles.append(module.register_forward_pre_hook(_record_count))
            handles.append(module.register_forward_hook(_attach_weights))
    # Opacus' remove_hooks pops this list, so ours go with its own.
    hooks.autograd_grad_sample_hooks.extend(handles)
    return handles


def _sample_major(t: torch.Tensor, batch: int) -> torch.Tensor:
    # (batch, ..., d) -> (batch, T, d): middle dimensions share their sample's group.
    return t.reshape(batch, -1, t.shape[-1])


def _group_weights(layer: SVDAdapter, activations: list[torch.Tensor], batch: int, device) -> torch.Tensor:
    if len(activations) > 1:
        return activations[1]
    if layer.groups == 1:
        # One row of S: every sample uses it whatever the routing said.
        return torch.ones(batch, 1, device=device)
    raise ValueError(
        f"{type(layer).__name__} with G = {layer.groups} groups: the group weights of the forward "
        "were not recorded, so per-sample gradients of S cannot be attributed. Wrap "
        "the model with fedlowrank.privacy.wrap_model (or call track_group_weights "
        "on the Opacus wrapper) before the forward."
    )


def _check_batched(layer: SVDAdapter, x: torch.Tensor, min_dim: int, expected: str) -> None:
    if x.dim() < min_dim:
        raise ValueError(
            f"per-sample gradients need a batch dimension: {type(layer).__name__} got input of "
            f"shape {tuple(x.shape)}, expected {expected}"
        )


def factored_grad_sample(
    layer: SVDAdapter, x: torch.Tensor, g: torch.Tensor, weights: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradients of ``lora_U``, ``lora_V``, ``lora_S`` from rows of one sample.

    Parameters
    ----------
    layer : SVDAdapter
        The adapter layer.
    x : torch.Tensor
        Inputs as rows, (batch, T, d_in) (a linear layer's tokens, a conv's patches).
    g : torch.Tensor
        Output gradients for the same rows, (batch, T, d_out).
    weights : torch.Tensor
        Each sample's group weights, (batch, G).
    """
    dtype = g.dtype
    x = x.to(dtype)
    U = layer.lora_U.detach().to(dtype)
    V = layer.lora_V.detach().to(dtype)
    w = weights.to(device=g.device, dtype=dtype)
    s_rows = w @ layer.lora_S.detach().to(dtype)  # (batch, r)
    scale = layer.scale

    h = x @ V  # (batch, T, r)
    gu = g @ U  # (batch, T, r)
    out: dict[nn.Parameter, torch.Tensor] = {}
    if layer.lora_U.requires_grad:
        z = h * (s_rows * scale)[:, None, :]
        out[layer.lora_U] = torch.einsum("ntk,ntr->nkr", g, z).to(layer.lora_U.dtype)
    if layer.lora_V.requires_grad:
        dh = gu * (s_rows * scale)[:, None, :]
        out[layer.lora_V] = torch.einsum("nti,ntr->nir", x, dh).to(layer.lora_V.dtype)
    if layer.lora_S.requires_grad:
        ds_row = (h * gu).sum(dim=1) * scale  # (batch, r)
        out[layer.lora_S] = torch.einsum("ng,nr->ngr", w, ds_row).to(layer.lora_S.dtype)
    return out


@register_grad_sampler([SVDLinear, SVDConv1D])
def compute_svd_linear_grad_sample(
    layer: SVDAdapter, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradients of ``lora_U``, ``lora_V`` and ``lora_S`` of a linear adapter.

    Parameters
    ----------
    layer : SVDLinear or SVDConv1D
        The adapter layer.
    activations : list of torch.Tensor
        ``[x]`` as Opacus captured it, plus the (batch, G) group weights of that
        forward when :func:`track_group_weights` is attached.
    backprops : torch.Tensor
        Gradient of the loss with respect to the layer output, (batch, ..., d_out),
        already rescaled by Opacus for the loss reduction.

    Returns
    -------
    dict
        Parameter -> per-sample gradient (batch, *param.shape), for the trainable
        adapter factors only.

    Raises
    ------
    ValueError
        If the input has no batch dimension, or G > 1 and the forward's group
        weights were not recorded.
    """
    x = activations[0]
    _check_batched(layer, x, 2, "(batch, d_in) or (batch, ..., d_in)")
    batch = x.shape[0]
    weights = _group_weights(layer, activations, batch, x.device)
    return factored_grad_sample(layer, _sample_major(x, batch), _sample_major(backprops, batch), weights)


def conv_patches(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Input patches of a convolution, (batch, c_in * prod(k), positions), in the kernel's order.

    Pads as the convolution's own forward does (``padding_mode`` and ``"same"``
    included), then unfolds without padding.
    """
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    x = F.pad(x, conv._reversed_padding_repeated_twice, mode=mode)
    if isinstance(conv, nn.Conv1d):
        return F.unfold(x.unsqueeze(-2), (1, *conv.kernel_size), dilation=(1, *conv.dilation), stride=(1, *conv.stride))
    if isinstance(conv, nn.Conv2d):
        return F.unfold(x, conv.kernel_size, dilation=conv.dilation, stride=conv.stride)
    return unfold3d(x, kernel_size=conv.kernel_size, padding=0, stride=conv.stride, dilation=conv.dilation)


@register_grad_sampler(SVDConv)
def compute_svd_conv_grad_sample(
    layer: SVDConv, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradients of a conv adapter's factors: the linear rule over input patches.

    Parameters and returns as :func:`compute_svd_linear_grad_sample`; ``activations[0]``
    is (batch, c_in, *spatial), ``backprops`` (batch, c_out, *out_spatial).
    """
    x = activations[0]
    _check_batched(layer, x, layer.base.weight.dim(), "(batch, c_in, *spatial)")
    batch = x.shape[0]
    weights = _group_weights(layer, activations, batch, x.device)
    patches = conv_patches(layer.base, x.to(backprops.dtype)).transpose(1, 2)  # (batch, L, d_in)
    g = backprops.reshape(batch, backprops.shape[1], -1).transpose(1, 2)  # (batch, L, d_out)
    return factored_grad_sample(layer, patches, g, weights)
