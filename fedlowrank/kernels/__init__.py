"""Fused grouped low-rank ops: Triton kernels on GPU, a torch reference elsewhere.

``y = x W0^T + b + scale * ((x V) * S_row) U^T`` with per-sample singular values
``S_row = group_weights @ S``; forward and backward never form ``U diag(S) V^T``.
"""

from .op import ENV_VAR, kernel_backend, lowrank_delta, lowrank_linear

__all__ = ["ENV_VAR", "kernel_backend", "lowrank_delta", "lowrank_linear"]
