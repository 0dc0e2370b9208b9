"""aggregate_svd against an independent dense reference (sum, full SVD, truncate)."""

import pytest
import torch

from fedlowrank.aggregation import aggregate_svd, balance_factors, dense_weighted_sum


def random_clients(seed, d_out, d_in, ranks, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    us = [torch.randn(d_out, r, generator=gen, dtype=dtype) for r in ranks]
    ss = [torch.randn(r, generator=gen, dtype=dtype).abs() + 0.1 for r in ranks]
    vs = [torch.randn(d_in, r, generator=gen, dtype=dtype) for r in ranks]
    weights = (torch.rand(len(ranks), generator=gen, dtype=dtype) + 0.05).tolist()
    return us, ss, vs, weights


def dense_truncated(us, ss, vs, weights, rank):
    dense = dense_weighted_sum(us, ss, vs, weights)
    u, s, vh = torch.linalg.svd(dense, full_matrices=False)
    best = (u[:, :rank] * s[:rank]) @ vh[:rank]
    return dense, best, s[rank:].square().sum().sqrt()


@pytest.mark.parametrize("method", ["qr", "gram"])
@pytest.mark.parametrize(
    "seed,d_out,d_in,ranks,rank",
    [
        (0, 40, 30, [4, 8, 2, 6], 5),
        (1, 64, 48, [8] * 8, 8),
        (2, 20, 70, [1, 3, 16, 2, 5], 12),
        (3, 33, 17, [6, 6, 9], 17),  # global rank = min(d_out, d_in)
    ],
)
def test_matches_dense_reference(seed, d_out, d_in, ranks, rank, method):
    us, ss, vs, weights = random_clients(seed, d_out, d_in, ranks)
    _, best, tail = dense_truncated(us, ss, vs, weights, rank)
    agg = aggregate_svd(us, ss, vs, weights, rank, method=method)
    approx = (agg.u * agg.s) @ agg.v.T
    assert (approx - best).norm() / best.norm() < 1e-5
    assert abs(agg.truncated_norm - tail) <= 1e-5 * max(tail.item(), 1e-12) + 1e-9
    eye = torch.eye(rank, dtype=torch.float64)
    assert torch.allclose(agg.u.T @ agg.u, eye, atol=1e-8)
    assert torch.allclose(agg.v.T @ agg.v, eye, atol=1e-8)
    assert bool((agg.s >= 0).all()) and bool((agg.s[:-1] >= agg.s[1:]).all())


def test_truncated_norm_is_the_residual_norm():
    us, ss, vs, weights = random_clients(7, 30, 25, [5, 5, 5])
    dense = dense_weighted_sum(us, ss, vs, weights)
    agg = aggregate_svd(us, ss, vs, weights, rank=4)
    residual = dense - (agg.u * agg.s) @ agg.v.T
    assert torch.isclose(residual.norm(), agg.truncated_norm, rtol=1e-8)


def test_rank_above_sum_rank_pads_with_zero_singular_values():
    us, ss, vs, weights = random_clients(4, 30, 20, [2, 3])
    agg = aggregate_svd(us, ss, vs, weights, rank=8)
    dense = dense_weighted_sum(us, ss, vs, weights)
    assert agg.s.shape == (8,) and torch.all(agg.s[5:] < 1e-10)
    assert torch.allclose((agg.u * agg.s) @ agg.v.T, dense, atol=1e-10)
    assert torch.allclose(agg.u.T @ agg.u, torch.eye(8, dtype=torch.float64), atol=1e-10)
    assert agg.truncated_norm < 1e-10


def test_identical_clients_average_to_themselves():
    # Clients that agree exactly: a degenerate stack that the Gram path must survive.
    us, ss, vs, _ = random_clients(5, 50, 40, [6])
    agg = aggregate_svd(us * 5, ss * 5, vs * 5, [0.2] * 5, rank=6, method="gram")
    dense = dense_weighted_sum(us, ss, vs, [1.0])
    assert (((agg.u * agg.s) @ agg.v.T) - dense).norm() / dense.norm() < 1e-6


def test_balance_keeps_product_and_equalises_columns():
    us, ss, vs, weights = random_clients(6, 30, 20, [4, 4])
    agg = aggregate_svd(us, ss, vs, weights, rank=6)
    big_u, big_s, big_v = balance_factors(agg.u, agg.s, agg.v)
    assert torch.allclose((big_u * big_s[0]) @ big_v.T, (agg.u * agg.s) @ agg.v.T, atol=1e-10)
    assert torch.allclose(big_u.norm(dim=0), big_v.norm(dim=0))
    assert torch.all(big_s == 1)


def test_lora_gauge_keeps_product_with_v_at_lora_init_size():
    from fedlowrank.aggregation import lora_gauge_factors

    us, ss, vs, weights = random_clients(7, 30, 20, [4, 4])
    agg = aggregate_svd(us, ss, vs, weights, rank=6)
    big_u, big_s, big_v = lora_gauge_factors(agg.u, agg.s, agg.v)
    assert torch.allclose((big_u * big_s[0]) @ big_v.T, (agg.u * agg.s) @ agg.v.T, atol=1e-10)
    assert torch.allclose(big_v.norm(dim=0), torch.full((6,), 3.0 ** -0.5, dtype=torch.float64))
    assert torch.allclose(big_u.norm(dim=0), agg.s * 3.0 ** 0.5) and torch.all(big_s == 1)


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda us, ss, vs, w: us.__setitem__(1, us[1][:-1]), "client 1: U has"),
        (lambda us, ss, vs, w: vs.__setitem__(2, vs[2][:, :-1]), "client 2: U has rank"),
        (lambda us, ss, vs, w: ss.__setitem__(0, ss[0][:-1]), "client 0: S has shape"),
        (lambda us, ss, vs, w: us[2].__setitem__((0, 0), float("nan")), "client 2: U contains NaN"),
        (lambda us, ss, vs, w: vs[1].__setitem__((3, 1), float("inf")), "client 1: V contains NaN or Inf"),
        (lambda us, ss, vs, w: w.__setitem__(1, -0.5), "client 1: weight"),
    ],
)
def test_bad_input_names_client_and_tensor(mutate, message):
    us, ss, vs, weights = random_clients(8, 12, 10, [3, 3, 3])
    mutate(us, ss, vs, weights)
    with pytest.raises(ValueError, match=message):
        aggregate_svd(us, ss, vs, weights, rank=3)
