"""Alignment keeps every product exactly and recovers a known rotation or signed permutation."""

import torch

from fedlowrank.aggregation import procrustes_align, signed_permutation_align


def test_procrustes_recovers_rotation_and_keeps_product():
    gen = torch.Generator().manual_seed(0)
    u, v = torch.randn(20, 5, generator=gen, dtype=torch.float64), torch.randn(15, 5, generator=gen, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(5, 5, generator=gen, dtype=torch.float64))
    got_u, got_v = procrustes_align(u, v, u @ q, v @ q)
    assert torch.allclose(got_u @ got_v.T, u @ v.T, atol=1e-10)
    assert torch.allclose(got_u, u @ q, atol=1e-10) and torch.allclose(got_v, v @ q, atol=1e-10)


def test_signed_permutation_recovers_order_and_signs_and_keeps_group_products():
    gen = torch.Generator().manual_seed(1)
    u, v = torch.randn(30, 4, generator=gen, dtype=torch.float64), torch.randn(12, 4, generator=gen, dtype=torch.float64)
    s = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    perm, signs = torch.tensor([2, 0, 3, 1]), torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=torch.float64)
    prev_u, prev_v = (u[:, perm] * signs) + 0.01 * torch.randn(30, 4, generator=gen, dtype=torch.float64), v[:, perm] * signs
    got_u, got_s, got_v = signed_permutation_align(u, s, v, prev_u, prev_v)
    for g in range(3):
        assert torch.allclose((got_u * got_s[g]) @ got_v.T, (u * s[g]) @ v.T, atol=1e-10)
    assert torch.allclose(got_u, u[:, perm] * signs) and torch.allclose(got_s, s[:, perm])
