"""aggregate_grouped_svd, the factor-averaging baselines (fedit, fairfedmed) and the grouped magnitude policy.

Every expectation is checked against a dense reference formed here only: the per-group
weighted sums ``M_g`` as d_out x d_in matrices, their SVDs and projections.
"""

import numpy as np
import pytest
import torch

from fedlowrank.aggregation import aggregate_svd, balance_factors
from fedlowrank.aggregation import (
    aggregate_grouped_svd,
    balance_grouped_factors,
    group_weights_from_counts,
)
from fedlowrank.aggregation.ranks import Factors
from fedlowrank.aggregation.rules import get_rule

F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # The matrices here are tiny: extra threads only contend on shared CPUs (3x slower).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def gaussian_clients(seed, d_out=64, d_in=48, clients=8, groups=2, rank=4, ranks=None):
    """Independent random factors: groups pull in unrelated directions."""
    gen = torch.Generator().manual_seed(seed)
    ranks = ranks or [rank] * clients
    us = [torch.randn(d_out, r, generator=gen, dtype=F64) for r in ranks]
    vs = [torch.randn(d_in, r, generator=gen, dtype=F64) for r in ranks]
    ss = [torch.randn(groups, r, generator=gen, dtype=F64) for r in ranks]
    weights = torch.rand(len(ranks), groups, generator=gen, dtype=F64) + 0.1
    return us, ss, vs, weights / weights.sum(dim=0)


def structured_clients(seed, d_out=64, d_in=48, clients=8, groups=2, rank=4, noise=0.1):
    """Each group owns ``rank`` true directions; each client trains a noisy subset of all of them."""
    gen = torch.Generator().manual_seed(seed)
    u_true = torch.linalg.qr(torch.randn(d_out, groups * rank, generator=gen, dtype=F64))[0]
    v_true = torch.linalg.qr(torch.randn(d_in, groups * rank, generator=gen, dtype=F64))[0]
    us, ss, vs = [], [], []
    for _ in range(clients):
        cols = torch.randperm(groups * rank, generator=gen)[:rank]
        us.append(u_true[:, cols] + noise * torch.randn(d_out, rank, generator=gen, dtype=F64))
        vs.append(v_true[:, cols] + noise * torch.randn(d_in, rank, generator=gen, dtype=F64))
        owns = torch.arange(groups)[:, None] == (cols // rank)[None]
        strength = 1 + 0.3 * torch.rand(groups, rank, generator=gen, dtype=F64)
        ss.append(torch.where(owns, 1.0, 0.1).to(F64) * strength)
    weights = torch.rand(clients, groups, generator=gen, dtype=F64) + 0.1
    return us, ss, vs, weights / weights.sum(dim=0)


def dense_targets(us, ss, vs, weights):
    """``M_g = sum_k w_kg U_k diag(S_k[g]) V_k^T`` as a (G x d_out x d_in) stack."""
    groups = ss[0].shape[0]
    clients = list(zip(us, ss, vs))
    return torch.stack(
        [sum(float(weights[k][g]) * (u * s[g]) @ v.T for k, (u, s, v) in enumerate(clients)) for g in range(groups)]
    )


def dense_floor(targets, rank):
    """Per-group error of the best separate rank-``rank`` truncation."""
    return torch.stack([torch.linalg.svdvals(m)[rank:].square().sum().sqrt() for m in targets])


def dense_pooled_errors(targets, shares, global_rank):
    """Per-group error on the pooled SVD's top-R basis with each group's best diagonal."""
    pooled = torch.einsum("g,gab->ab", shares, targets)
    left, _, right_t = torch.linalg.svd(pooled, full_matrices=False)
    left, right = left[:, :global_rank], right_t[:global_rank].T
    errors = []
    for m in targets:
        s = torch.diagonal(left.T @ m @ right)
        errors.append((m - (left * s) @ right.T).norm())
    return torch.stack(errors)


def dense_residuals(agg, targets):
    return torch.stack([(m - (agg.u * agg.s[g]) @ agg.v.T).norm() for g, m in enumerate(targets)])


def assert_orthonormal(a, atol=1e-9):
    assert torch.allclose(a.T @ a, torch.eye(a.shape[1], dtype=a.dtype), atol=atol)


def assert_unit_columns(a, atol=1e-9):
    assert torch.allclose(a.norm(dim=0), torch.ones(a.shape[1], dtype=a.dtype), atol=atol)


# --------------------------------------------------------------------------- (a) G = 1


@pytest.mark.parametrize("ranks,rank", [([4, 8, 2, 6], 5), ([3, 3, 3], 12)])
def test_single_group_equals_aggregate_svd(ranks, rank):
    us, ss, vs, weights = gaussian_clients(11, d_out=40, d_in=30, groups=1, ranks=ranks)
    flat = weights[:, 0].tolist()
    plain = aggregate_svd(us, [s[0] for s in ss], vs, flat, rank)
    grouped = aggregate_grouped_svd(us, ss, vs, weights, rank)
    assert grouped.s.shape == (1, rank) and grouped.iterations == 0
    assert torch.allclose(grouped.s[0], plain.s, atol=1e-10)
    live = plain.s > 1e-8  # padded columns are arbitrary completions
    signs = torch.sign((grouped.u * plain.u).sum(dim=0))
    assert torch.allclose((grouped.u * signs)[:, live], plain.u[:, live], atol=1e-8)
    assert torch.allclose((grouped.v * signs)[:, live], plain.v[:, live], atol=1e-8)
    assert torch.isclose(grouped.residual_norms[0], plain.truncated_norm, rtol=1e-8, atol=1e-12)
    assert torch.isclose(grouped.floor_norms[0], plain.truncated_norm, rtol=1e-8, atol=1e-12)


# --------------------------------------------------------------------------- (b) shared basis


@pytest.mark.parametrize("groups,global_rank", [(2, 5), (3, 5), (3, 15)])
def test_shared_basis_recovers_each_group_exactly(groups, global_rank):
    # All clients train the same directions (orthogonal columns of any norm, as balanced
    # factors U sqrt(s) have) with different per-group singular values.
    gen = torch.Generator().manual_seed(3)
    d_out, d_in, rank, clients = 50, 40, 5, 6
    u = torch.linalg.qr(torch.randn(d_out, rank, generator=gen, dtype=F64))[0] * torch.linspace(0.5, 2, rank, dtype=F64)
    v = torch.linalg.qr(torch.randn(d_in, rank, generator=gen, dtype=F64))[0] * torch.linspace(1, 3, rank, dtype=F64)
    ss = [torch.randn(groups, rank, generator=gen, dtype=F64) for _ in range(clients)]
    weights, shares = group_weights_from_counts(torch.randint(1, 50, (clients, groups), generator=gen))
    targets = dense_targets([u] * clients, ss, [v] * clients, weights)
    agg = aggregate_grouped_svd([u] * clients, ss, [v] * clients, weights, rank, global_rank, group_shares=shares)
    for g, m in enumerate(targets):
        assert ((agg.u * agg.s[g]) @ agg.v.T - m).norm() / m.norm() <= 1e-6
    assert torch.all(agg.residual_norms <= 1e-6 * agg.target_norms)
    assert_orthonormal(agg.u)
    assert_orthonormal(agg.v)


# --------------------------------------------------------------------------- (c) near the floor


@pytest.mark.parametrize("make", [gaussian_clients, structured_clients])
@pytest.mark.parametrize("seed", range(3))
def test_global_rank_g_times_r_reaches_per_group_floor(make, seed):
    us, ss, vs, weights = make(seed)
    targets = dense_targets(us, ss, vs, weights)
    agg = aggregate_grouped_svd(us, ss, vs, weights, rank=4, global_rank=8)
    floor = dense_floor(targets, 4)
    errors = dense_residuals(agg, targets)
    # The block start reaches every group's floor; CP-ALS from it can only lower the total.
    assert torch.all(errors <= 1.01 * floor), (errors / floor).tolist()
    assert torch.allclose(agg.floor_norms, floor, rtol=1e-8)
    assert torch.allclose(agg.residual_norms, errors, rtol=1e-7)
    assert_unit_columns(agg.u)
    assert_unit_columns(agg.v)
    pooled_start = aggregate_grouped_svd(us, ss, vs, weights, rank=4, global_rank=8, start="pooled")
    assert_orthonormal(pooled_start.u)
    assert_orthonormal(pooled_start.v)
    assert agg.residual_norms.square().sum() <= pooled_start.residual_norms.square().sum() * (1 + 1e-10)


@pytest.mark.parametrize("seed", range(10))
def test_drifting_clients_at_global_rank_g_r_stay_within_one_percent_of_the_floor(seed):
    """Clients fine-tuned from one shared start drift apart: the hard case for a pooled basis."""
    gen = torch.Generator().manual_seed(seed)
    d_out, d_in, rank, groups, clients = 40, 30, 3, 2, 6
    start = [torch.randn(d_out, rank, generator=gen, dtype=F64), torch.rand(groups, rank, generator=gen, dtype=F64) + 0.5,
             torch.randn(d_in, rank, generator=gen, dtype=F64)]
    drift = lambda t: t + 0.3 * torch.randn(t.shape, generator=gen, dtype=F64)  # noqa: E731
    us, ss, vs = ([drift(start[i]) for _ in range(clients)] for i in range(3))
    weights, shares = group_weights_from_counts(torch.randint(1, 50, (clients, groups), generator=gen))
    targets = dense_targets(us, ss, vs, weights)
    agg = aggregate_grouped_svd(us, ss, vs, weights, rank, groups * rank, group_shares=shares)
    errors = dense_residuals(agg, targets)
    assert torch.all(errors <= 1.01 * dense_floor(targets, rank)), (errors / dense_floor(targets, rank)).tolist()
    at_r = aggregate_grouped_svd(us, ss, vs, weights, rank, rank, group_shares=shares)
    pooled = dense_pooled_errors(targets, shares / shares.sum(), rank)
    assert dense_residuals(at_r, targets).square().sum() <= pooled.square().sum() * (1 + 1e-10)


# --------------------------------------------------------------------------- (d) vs pooled basis


@pytest.mark.parametrize("global_rank", [4, 8, 16])
def test_never_worse_than_one_shot_pooled_basis(global_rank):
    for seed in range(4):
        for make in (gaussian_clients, structured_clients):
            us, ss, vs, weights = make(100 + seed)
            shares = torch.tensor([0.7, 0.3], dtype=F64)
            targets = dense_targets(us, ss, vs, weights)
            pooled = dense_pooled_errors(targets, shares, global_rank)
            agg = aggregate_grouped_svd(us, ss, vs, weights, 4, global_rank, group_shares=shares, iterations=60)
            assert torch.allclose(agg.pooled_norms, pooled, rtol=1e-8)
            total = dense_residuals(agg, targets).square().sum()
            assert total <= pooled.square().sum() * (1 + 1e-10)


def test_procrustes_sweeps_never_increase_the_error():
    us, ss, vs, weights = structured_clients(5)
    totals = [
        aggregate_grouped_svd(us, ss, vs, weights, 4, 8, iterations=n, tol=0, start="pooled").residual_norms.square().sum()
        for n in (1, 2, 4, 8, 16)
    ]
    assert all(b <= a * (1 + 1e-12) for a, b in zip(totals, totals[1:]))


def test_lstsq_variant_is_never_worse_than_its_start_and_not_better_than_procrustes():
    worse = 0
    for seed in range(3):
        us, ss, vs, weights = gaussian_clients(seed)
        proc = aggregate_grouped_svd(us, ss, vs, weights, 4, 8, start="pooled")
        lstsq = aggregate_grouped_svd(us, ss, vs, weights, 4, 8, update="lstsq", start="pooled")
        assert lstsq.residual_norms.square().sum() <= lstsq.pooled_norms.square().sum() * (1 + 1e-10)
        worse += int(lstsq.residual_norms.square().sum() >= proc.residual_norms.square().sum() * (1 - 1e-6))
    assert worse >= 2  # the documented reason Procrustes is the default


# --------------------------------------------------------------------------- (e) reported norms


@pytest.mark.parametrize("method", ["qr", "gram"])
def test_reported_norms_equal_dense_norms(method):
    us, ss, vs, weights = gaussian_clients(7, d_out=35, d_in=28, groups=3, ranks=[3, 5, 2, 4])
    targets = dense_targets(us, ss, vs, weights)
    agg = aggregate_grouped_svd(us, ss, vs, weights, rank=3, global_rank=6, method=method)
    assert torch.allclose(agg.residual_norms, dense_residuals(agg, targets), rtol=1e-7)
    assert torch.allclose(agg.floor_norms, dense_floor(targets, 3), rtol=1e-7)
    assert torch.allclose(agg.target_norms, targets.flatten(1).norm(dim=1), rtol=1e-9)
    assert agg.s.shape == (3, 6)


def test_global_rank_beyond_the_stack_pads_with_zero_columns():
    us, ss, vs, weights = gaussian_clients(8, d_out=30, d_in=20, groups=2, ranks=[2, 3])
    targets = dense_targets(us, ss, vs, weights)
    agg = aggregate_grouped_svd(us, ss, vs, weights, rank=2, global_rank=12)
    assert agg.u.shape == (30, 12) and agg.v.shape == (20, 12) and agg.s.shape == (2, 12)
    assert torch.all(agg.s[:, 5:] == 0)
    assert_unit_columns(agg.u)
    assert_unit_columns(agg.v)
    assert torch.allclose(agg.residual_norms, dense_residuals(agg, targets), rtol=1e-7, atol=1e-12)


def test_float32_inputs_stay_float32():
    us, ss, vs, weights = structured_clients(9)
    single = [[t.float() for t in ts] for ts in (us, ss, vs)]
    agg32 = aggregate_grouped_svd(*single, weights.float(), 4, 8)
    agg64 = aggregate_grouped_svd(us, ss, vs, weights, 4, 8)
    assert agg32.u.dtype == torch.float32
    assert torch.allclose(agg32.residual_norms.double(), agg64.residual_norms, rtol=1e-3)


def test_group_weights_from_counts():
    weights, shares = group_weights_from_counts([[10, 0], [30, 5], [0, 0]])
    assert torch.allclose(weights, torch.tensor([[0.25, 0.0], [0.75, 1.0], [0.0, 0.0]], dtype=F64))
    assert torch.allclose(shares, torch.tensor([40 / 45, 5 / 45], dtype=F64))
    with pytest.raises(ValueError, match="non-negative"):
        group_weights_from_counts([[1, -1]])


# --------------------------------------------------------------------------- (f) bad input


def _bad(case):
    us, ss, vs, weights = gaussian_clients(1, d_out=12, d_in=10, clients=3, groups=2, rank=2)
    weights = [w.clone() for w in weights]
    if case == "s_rows":
        ss[2] = torch.ones(3, 2, dtype=F64)
    elif case == "weight_length":
        weights[1] = torch.ones(3, dtype=F64)
    elif case == "negative":
        weights[2] = torch.tensor([0.5, -0.1], dtype=F64)
    elif case == "nan_s":
        ss[1] = ss[1].clone()
        ss[1][0, 0] = float("nan")
    elif case == "nan_weight":
        weights[2] = torch.tensor([float("nan"), 0.1], dtype=F64)
    return us, ss, vs, weights


@pytest.mark.parametrize(
    "case,client",
    [("s_rows", 2), ("weight_length", 1), ("negative", 2), ("nan_s", 1), ("nan_weight", 2)],
)
def test_bad_input_names_the_client(case, client):
    with pytest.raises(ValueError, match=f"client {client}"):
        aggregate_grouped_svd(*_bad(case), rank=2)


def test_bad_options():
    us, ss, vs, weights = gaussian_clients(1, d_out=12, d_in=10, clients=3, groups=2, rank=2)
    with pytest.raises(ValueError, match="global_rank"):
        aggregate_grouped_svd(us, ss, vs, weights, 2, global_rank=11)
    with pytest.raises(ValueError, match="group_shares"):
        aggregate_grouped_svd(us, ss, vs, weights, 2, group_shares=[1.0])
    with pytest.raises(ValueError, match="S must be"):
        aggregate_grouped_svd(us, [s[0] for s in ss], vs, weights, 2)


# --------------------------------------------------------------------------- baselines


def rule_means(rule, us, ss, vs, weights, counts=None):
    """The factors a factor-averaging rule returns for these clients (reference: the first client's shapes)."""
    acc = get_rule(rule).accumulator(Factors(us[0] * 0, ss[0] * 0, vs[0] * 0))
    for k in range(len(us)):
        acc.add(Factors(us[k], ss[k], vs[k]), weights[k], None if counts is None else torch.tensor(counts[k], dtype=F64))
    return acc.result(us[0].shape[1]).factors


def test_fedit_averages_each_factor_by_sample_share():
    us, ss, vs, _ = gaussian_clients(2, d_out=10, d_in=8, clients=4, groups=1, rank=3)
    counts = [5.0, 1.0, 2.0, 2.0]
    big_u, big_s, big_v = rule_means("fedit", us, ss, vs, counts)
    want_u, want_s, want_v = torch.zeros_like(us[0]), torch.zeros_like(ss[0]), torch.zeros_like(vs[0])
    for k in range(4):
        want_u += counts[k] / 10 * us[k]
        want_s += counts[k] / 10 * ss[k]
        want_v += counts[k] / 10 * vs[k]
    assert torch.allclose(big_u, want_u) and torch.allclose(big_s, want_s) and torch.allclose(big_v, want_v)
    with pytest.raises(ValueError, match="cannot mix ranks"):
        get_rule("fedit").check(Factors(us[1][:, :2], ss[1][:, :2], vs[1][:, :2]), Factors(us[0], ss[0], vs[0]))


@pytest.mark.parametrize("shared_fraction", [0.0, 0.5])
def test_fairfedmed_averages_u_v_by_sample_share_and_each_s_row_by_its_groups(shared_fraction):
    us, ss, vs, _ = gaussian_clients(3, d_out=10, d_in=8, clients=3, groups=2, rank=4)
    counts = [[4.0, 1.0], [0.0, 3.0], [2.0, 2.0]]  # client x group
    acc = get_rule("fairfedmed", shared_fraction=shared_fraction).accumulator(Factors(us[0] * 0, ss[0] * 0, vs[0] * 0))
    for k, weight in enumerate([5.0, 3.0, 4.0]):
        acc.add(Factors(us[k], ss[k], vs[k]), weight, torch.tensor(counts[k], dtype=F64))
    big_u, big_s, big_v = acc.result(4).factors
    want_s = torch.zeros(2, 4, dtype=F64)
    for g in range(2):
        group_total = sum(counts[k][g] for k in range(3))
        for j in range(4):
            for k in range(3):
                share = [5 / 12, 3 / 12, 4 / 12][k] if j < int(shared_fraction * 4) else counts[k][g] / group_total
                want_s[g, j] += share * ss[k][g, j]
    assert torch.allclose(big_s, want_s)
    assert torch.allclose(big_u, (5 * us[0] + 3 * us[1] + 4 * us[2]) / 12)
    assert torch.allclose(big_v, (5 * vs[0] + 3 * vs[1] + 4 * vs[2]) / 12)


def test_negative_group_counts_are_refused_by_the_round():
    from fedlowrank.aggregation.round import RoundConfig, ServerRound
    from fedlowrank.aggregation.state import LowRankState

    us, ss, vs, _ = gaussian_clients(3, d_out=10, d_in=8, clients=1, groups=2, rank=4)
    arrays = {"fc.lora_U": us[0].numpy(), "fc.lora_S": ss[0].numpy(), "fc.lora_V": vs[0].numpy()}
    rnd = ServerRound(RoundConfig(rule="fairfedmed"), LowRankState(), arrays, 1)
    with pytest.raises(ValueError, match=r"group counts \[-1.0, 1.0\] must be finite numbers >= 0"):
        rnd.add(arrays, 5.0, np.array([-1.0, 1.0]))


# --------------------------------------------------------------------------- magnitude policy


def _grouped_aggregate():
    us, ss, vs, weights = structured_clients(4)
    return aggregate_grouped_svd(us, ss, vs, weights, 4, 8)


@pytest.mark.parametrize("cap", [1.0, 2.0, None])
def test_balance_grouped_keeps_every_groups_product(cap):
    agg = _grouped_aggregate()
    shares = torch.tensor([0.8, 0.2], dtype=F64)
    big_u, big_s, big_v = balance_grouped_factors(agg.u, agg.s, agg.v, shares, cap=cap)
    for g in range(2):
        assert torch.allclose((big_u * big_s[g]) @ big_v.T, (agg.u * agg.s[g]) @ agg.v.T, atol=1e-12)
    assert torch.allclose(big_u.norm(dim=0), big_v.norm(dim=0))
    if cap is None:  # pooled magnitude moved out: share-weighted mean of |S| per column is 1
        assert torch.allclose(shares @ big_s.abs(), torch.ones(8, dtype=F64))
    else:
        assert torch.all(big_s.abs().amax(dim=0) <= cap * (1 + 1e-12))
        if cap == 1.0:
            assert torch.allclose(big_s.abs().amax(dim=0), torch.ones(8, dtype=F64))


def test_balance_grouped_single_group_equals_balance_factors():
    gen = torch.Generator().manual_seed(0)
    u = torch.linalg.qr(torch.randn(12, 4, generator=gen, dtype=F64))[0]
    v = torch.linalg.qr(torch.randn(9, 4, generator=gen, dtype=F64))[0]
    s = torch.tensor([3.0, 1.5, 0.2, 0.0], dtype=F64)
    got = balance_grouped_factors(u, s[None], v)
    want = balance_factors(u, s, v)
    for a, b in zip(got, want):
        assert torch.allclose(a, b)


def test_balance_grouped_rejects_cap_below_one():
    agg = _grouped_aggregate()
    with pytest.raises(ValueError, match="cap"):
        balance_grouped_factors(agg.u, agg.s, agg.v, cap=0.5)
