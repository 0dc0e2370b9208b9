"""Where the aggregate's magnitude lives when it is handed back to clients.

Orthonormal ``u, v`` with all magnitude in ``s`` made Adam clients diverge across
rounds in a measured run (docs/design.md, step 6): Adam's per-parameter step is about
the learning rate whatever the gradient's scale, so a unit-norm column of ``u`` moves
relatively far while ``s`` is large. Splitting the magnitude evenly, ``U = u sqrt(s)``,
``V = v sqrt(s)``, ``S = 1``, gives factors of the size LoRA's own initialisation and
training produce, and the product is unchanged.
"""

from __future__ import annotations

import torch

# Column norm for directions the aggregate holds no magnitude in: LoRA's Kaiming-uniform
# init of A (entries U(-1/sqrt(d), 1/sqrt(d))) has rows of norm about 1/sqrt(3).
DEAD_COLUMN_NORM = 3.0 ** -0.5


def balance_factors(
    u: torch.Tensor, s: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split ``u diag(s) v^T`` into ``(U, S, V)`` with ``S = 1`` and equal column norms.

    Parameters
    ----------
    u, v : torch.Tensor
        Orthonormal columns (d_out x r, d_in x r).
    s : torch.Tensor
        Non-negative singular values (r,).

    Returns
    -------
    tuple of torch.Tensor
        ``U`` (d_out x r), ``S`` (1 x r) of ones, ``V`` (d_in x r) with
        ``U diag(S[0]) V^T == u diag(s) v^T``. Columns with ``s = 0`` get ``U = 0`` and
        ``V`` of LoRA-init size, so their gradient still reaches ``U`` (a zero ``V``
        would leave them dead forever).
    """
    if bool((s < 0).any()):
        raise ValueError("singular values must be non-negative to balance them")
    root = s.sqrt()
    dead = s <= s.max().clamp_min(torch.finfo(s.dtype).tiny) * torch.finfo(s.dtype).eps
    big_u = u * root
    big_v = torch.where(dead, v * DEAD_COLUMN_NORM, v * root)
    big_u = torch.where(dead, torch.zeros_like(big_u), big_u)
    return big_u, torch.ones(1, s.shape[0], dtype=s.dtype, device=s.device), big_v


def lora_gauge_factors(
    u: torch.Tensor, s: torch.Tensor, v: torch.Tensor, column_norm: float = DEAD_COLUMN_NORM
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split ``u diag(s) v^T`` as LoRA holds it: ``V`` at init size, the magnitude in ``U``.

    ``V = v * column_norm`` (every column the norm of LoRA's Kaiming-initialised ``A``
    rows), ``U = u * s / column_norm``, ``S = 1``: the same product, in the gauge that
    FedIT's clients keep (their ``V`` stays near its init, ``U`` grows), so that Adam's
    per-parameter steps move the product as they do under plain LoRA. Balanced factors
    (:func:`balance_factors`) instead give a component of singular value ``s`` columns of
    norm ``sqrt(s)`` on both sides, tiny for small ``s``.
    """
    if bool((s < 0).any()):
        raise ValueError("singular values must be non-negative")
    return u * (s / column_norm), torch.ones(1, s.shape[0], dtype=s.dtype, device=s.device), v * column_norm
