"""Every registered rule against a dense float64 reference of its own published rule."""

import numpy as np
import pytest
import torch

from fedlowrank.aggregation.accumulate import WeightedSum, dense_top, top_rank
from fedlowrank.aggregation.ranks import Factors, split_at_rank
from fedlowrank.aggregation.rules import AggregationRule, get_rule, register_rule, registered_rules
from fedlowrank.strategies import FedLowRank
from fedlowrank.aggregation.state import LowRankState
from fedlowrank.strategies.testing import array_record, run_round, train_reply

F64 = torch.float64
D_OUT, D_IN = 13, 9  # non-square: a transposed result cannot pass


def rand_factors(gen, rank, groups=1, d_out=D_OUT, d_in=D_IN):
    return Factors(
        torch.randn(d_out, rank, generator=gen, dtype=F64),
        torch.rand(groups, rank, generator=gen, dtype=F64) + 0.5,
        torch.randn(d_in, rank, generator=gen, dtype=F64),
    )


def dense(f, g=0):
    return (f.u * f.s[g]) @ f.v.T


def best(m, rank):
    u, s, vt = torch.linalg.svd(m)
    return (u[:, :rank] * s[:rank]) @ vt[:rank]


def tail_dense(reference, rank):
    """Independent: the global minus its best rank-``rank`` approximation (G = 1)."""
    g = dense(reference)
    return g - best(g, rank)


def run(rule, reference, clients, weights, rank, group_weights=None, **kwargs):
    acc = rule.accumulator(reference, **kwargs)
    for k, (c, w) in enumerate(zip(clients, weights)):
        rule.check(c, reference)
        acc.add(c, w, None if group_weights is None else group_weights[k])
    return acc.result(rank)


def rel(a, b):
    return float((a - b).norm() / b.norm())


def test_registry_lists_every_documented_rule_and_refuses_clashes():
    assert registered_rules() == ["exact", "fairfedmed", "fairlora-exact", "fedit", "ffa", "flexlora-dense", "flora", "zero-pad"]
    with pytest.raises(ValueError, match="already registered"):
        register_rule("exact")(type("Other", (AggregationRule,), {"accumulator": lambda *a, **k: None}))
    with pytest.raises(ValueError, match="rule 'exact'"):
        get_rule("exact", bogus=1)


@pytest.mark.parametrize("rule_name", ["exact", "flexlora-dense"])
@pytest.mark.parametrize("dense_above", [None, 0])
@pytest.mark.parametrize("seed", range(3))
def test_exact_rules_equal_the_dense_svd_of_the_completed_sum(rule_name, dense_above, seed):
    gen = torch.Generator().manual_seed(seed)
    R = 6
    reference = rand_factors(gen, R)
    ranks = [2, 6, 4, 3]
    clients = [rand_factors(gen, r) for r in ranks]
    weights = [3.0, 1.0, 2.0, 4.0]
    shares = torch.tensor(weights, dtype=F64) / sum(weights)
    target = sum(p * (dense(c) + tail_dense(reference, c.rank)) for p, c in zip(shares, clients))
    for rank in (R, 4):
        res = run(get_rule(rule_name), reference, clients, weights, rank, dense_above=dense_above)
        assert res.factors.u.shape == (D_OUT, rank) and res.factors.v.shape == (D_IN, rank)
        want = best(target, rank)
        assert rel(dense(res.factors), want) < 1e-10
        assert torch.allclose(res.error_norms[0], (target - want).norm(), rtol=1e-8)
        assert torch.allclose(res.target_norms[0], target.norm(), rtol=1e-10)
        residual = res.residual[0] if isinstance(res.residual, torch.Tensor) else dense(res.residual)
        assert rel(dense(res.factors) + residual, target) < 1e-10
        # Orientation: the transpose of the answer is not the answer.
        assert res.factors.u.shape[0] != res.factors.v.shape[0]


def test_zero_pad_averages_zero_padded_factors_of_mixed_ranks():
    gen = torch.Generator().manual_seed(5)
    reference = rand_factors(gen, 4)
    clients = [rand_factors(gen, r) for r in (2, 4, 3)]
    weights = [1.0, 2.0, 3.0]
    p = torch.tensor(weights, dtype=F64) / 6

    def padded(c, leaf, fill):
        t = getattr(c, leaf)
        return torch.cat([t, torch.full((t.shape[0], 4 - c.rank), fill, dtype=F64)], 1)

    res = run(get_rule("zero-pad"), reference, clients, weights, 4)
    for leaf, fill in (("u", 0.0), ("s", 1.0), ("v", 0.0)):
        want = sum(w * padded(c, leaf, fill) for w, c in zip(p, clients))
        assert torch.allclose(getattr(res.factors, leaf), want, atol=1e-12), leaf
    # Not the mean of the products: the error against the exact sum is reported, each client
    # completed by the global columns it did not hold (HetLoRA's clients take the first r_k).
    def columns_tail(r):
        return (reference.u[:, r:] * reference.s[0, r:]) @ reference.v[:, r:].T

    target = sum(w * (dense(c) + columns_tail(c.rank)) for w, c in zip(p, clients))
    assert rel(dense(res.factors), target) > 0.05
    assert torch.allclose(res.error_norms[0], (target - dense(res.factors)).norm(), rtol=1e-8)


def test_fedit_is_the_mean_of_each_factor_and_reports_its_error_against_the_products():
    gen = torch.Generator().manual_seed(4)
    reference = rand_factors(gen, 3)
    clients = [rand_factors(gen, 3) for _ in range(4)]
    weights = [1.0, 2.0, 3.0, 4.0]
    p = torch.tensor(weights, dtype=F64) / 10
    res = run(get_rule("fedit"), reference, clients, weights, 3)
    u = sum(w * c.u for w, c in zip(p, clients))
    s = sum(w * c.s for w, c in zip(p, clients))
    v = sum(w * c.v for w, c in zip(p, clients))
    assert torch.allclose(res.factors.u, u) and torch.allclose(res.factors.s, s) and torch.allclose(res.factors.v, v)
    assert not res.magnitude_in_s
    target = sum(w * dense(c) for w, c in zip(p, clients))
    assert torch.allclose(res.error_norms[0], (target - (u * s[0]) @ v.T).norm(), rtol=1e-8)


def test_ffa_is_exact_with_v_frozen_and_rejects_a_moved_v():
    gen = torch.Generator().manual_seed(5)
    reference = rand_factors(gen, 5)
    ranks, weights = [5, 3, 2], [1.0, 1.0, 2.0]
    clients = [Factors(torch.randn(D_OUT, r, generator=gen, dtype=F64), torch.rand(1, r, generator=gen, dtype=F64),
                       reference.v[:, :r].clone()) for r in ranks]
    res = run(get_rule("ffa"), reference, clients, weights, 5)
    p = torch.tensor(weights, dtype=F64) / 4
    # Each client's B padded with the global's columns it does not hold, times the shared V.
    b = sum(w * torch.cat([c.u * c.s[0], reference.u[:, c.rank:] * reference.s[0, c.rank:]], 1) for w, c in zip(p, clients))
    target = sum(w * (dense(c) + dense(reference.columns(slice(c.rank, None)))) for w, c in zip(p, clients))
    assert rel(dense(res.factors), b @ reference.v.T) < 1e-12
    assert rel(dense(res.factors), target) < 1e-12 and float(res.error_norms[0]) < 1e-10
    moved = clients[0]._replace(v=clients[0].v + 1e-3)
    with pytest.raises(ValueError, match="V frozen"):
        get_rule("ffa").check(moved, reference)


@pytest.mark.parametrize("shared_fraction,momentum", [(0.0, 0.0), (0.5, 0.3)])
def test_fairfedmed_weights_each_s_row_by_its_groups_share(shared_fraction, momentum):
    gen = torch.Generator().manual_seed(6)
    reference = rand_factors(gen, 4, groups=2)
    clients = [rand_factors(gen, 4, groups=2) for _ in range(3)]
    weights = [10.0, 20.0, 30.0]
    counts = torch.tensor([[8.0, 2.0], [5.0, 15.0], [27.0, 3.0]], dtype=F64)
    res = run(get_rule("fairfedmed", shared_fraction=shared_fraction, server_momentum=momentum),
              reference, clients, weights, 4, group_weights=counts)
    p = torch.tensor(weights, dtype=F64) / 60
    q = counts / counts.sum(0)
    u = sum(w * c.u for w, c in zip(p, clients))
    v = sum(w * c.v for w, c in zip(p, clients))
    s = torch.stack([sum(q[k, g] * clients[k].s[g] for k in range(3)) for g in range(2)])
    shared = int(shared_fraction * 4)
    s[:, :shared] = sum(w * c.s[:, :shared] for w, c in zip(p, clients))
    u, s, v = (momentum * r + (1 - momentum) * x for r, x in zip(reference, (u, s, v)))
    for got, want in zip(res.factors, (u, s, v)):
        assert torch.allclose(got, want, atol=1e-12)


@pytest.mark.parametrize("dense_above", [None, 0])
def test_fairlora_exact_fits_each_groups_completed_sum(dense_above):
    gen = torch.Generator().manual_seed(7)
    R, G = 6, 2
    reference = rand_factors(gen, R, groups=G)
    clients = [rand_factors(gen, r, groups=G) for r in (6, 3, 6)]
    counts = torch.tensor([[8.0, 2.0], [5.0, 15.0], [27.0, 3.0]], dtype=F64)
    res = run(get_rule("fairlora-exact", rank=3), reference, clients, [1.0, 1.0, 1.0], R,
              group_weights=counts, dense_above=dense_above)
    q = counts / counts.sum(0)
    tail = split_at_rank(reference, 3)[1]  # grouped: the columns of smallest magnitude
    targets = [sum(q[k, g] * (dense(c, g) + (dense(tail, g) if c.rank < R else 0)) for k, c in enumerate(clients))
               for g in range(G)]
    for g in range(G):
        err = (targets[g] - dense(res.factors, g)).norm()
        assert torch.allclose(res.error_norms[g], err, rtol=1e-7)
        floor = torch.linalg.svdvals(targets[g])[3:].square().sum().sqrt()
        assert torch.allclose(res.floor_norms[g], floor, rtol=1e-7)
        assert err <= 1.01 * floor  # global rank G r = 6
        residual = res.residual[g] if isinstance(res.residual, torch.Tensor) else dense(res.residual, g)
        assert rel(dense(res.factors, g) + residual, targets[g]) < 1e-9


def test_streaming_switches_to_dense_midway_and_stays_exact():
    gen = torch.Generator().manual_seed(8)
    d_out, d_in, r = 40, 30, 4
    acc = WeightedSum(d_out, d_in, dense_above=20, chunk=12)
    clients = [rand_factors(gen, r, d_out=d_out, d_in=d_in) for _ in range(25)]
    weights = torch.rand(25, generator=gen, dtype=F64) + 0.1
    for c, w in zip(clients, weights):
        acc.add(c, w)
    assert acc.dense and acc.clients == 25
    target = sum(w * dense(c) for w, c in zip(weights, clients)) / weights.sum()
    assert rel(acc.matrices()[0], target) < 1e-12
    top = top_rank(acc, 5)
    assert rel(dense(top.factors), best(target, 5)) < 1e-8
    assert torch.allclose(top.truncated_norm, (target - best(target, 5)).norm(), rtol=1e-8)


def test_dense_top_switches_to_lanczos_when_iteration_cannot_converge():
    gen = torch.Generator().manual_seed(9)
    m = torch.randn(30, 20, generator=gen, dtype=F64)
    u, s, v = dense_top(m, 4, max_iter=1)  # one sweep cannot converge on a flat spectrum
    assert rel((u * s) @ v.T, best(m, 4)) < 1e-10
    u, s, v = dense_top(m, 4)
    assert rel((u * s) @ v.T, best(m, 4)) < 1e-6


def test_a_flat_spectrum_is_detected_early_and_solved_exactly(monkeypatch):
    """Independent random clients give a flat spectrum: Lanczos after a few sweeps, not 100."""
    import fedlowrank.aggregation.accumulate as accumulate

    gen = torch.Generator().manual_seed(15)
    m = torch.randn(300, 16 * 40, generator=gen, dtype=F64) @ torch.randn(16 * 40, 300, generator=gen, dtype=F64)
    sweeps = []
    real_qr = torch.linalg.qr
    monkeypatch.setattr(accumulate.torch.linalg, "qr", lambda a, *args, **kw: (sweeps.append(1), real_qr(a, *args, **kw))[1])
    u, s, v = accumulate.dense_top(m, 16)
    assert len(sweeps) <= 1 + 2 * 2  # the start and at most two sweeps of two QRs
    assert rel((u * s) @ v.T, best(m, 16)) < 1e-9
    assert torch.allclose(s, torch.linalg.svdvals(m)[:16], rtol=1e-10)


def test_a_spectrum_with_a_gap_converges_by_subspace_iteration_without_lanczos(monkeypatch):
    import fedlowrank.aggregation.accumulate as accumulate

    gen = torch.Generator().manual_seed(16)
    low = torch.randn(200, 8, generator=gen, dtype=F64) @ torch.randn(8, 150, generator=gen, dtype=F64)
    m = low + 1e-3 * torch.randn(200, 150, generator=gen, dtype=F64)
    monkeypatch.setattr(accumulate, "lanczos_top", lambda *a, **k: pytest.fail("Lanczos used on a spectrum with a gap"))
    u, s, v = accumulate.dense_top(m, 8)
    assert rel((u * s) @ v.T, best(m, 8)) < 1e-9


def test_float32_products_match_the_float64_sum_to_float32_rounding():
    """Chunk products in float32, summed in float64: the sum and its top-r within ~1e-6."""
    gen = torch.Generator().manual_seed(17)
    clients = [rand_factors(gen, 6, d_out=120, d_in=90) for _ in range(40)]
    weights = torch.rand(40, generator=gen, dtype=F64) + 0.5
    sums = {}
    for products in ("float64", "float32"):
        acc = WeightedSum(120, 90, dense_above=0, products=products, chunk=64)
        for c, w in zip(clients, weights):
            acc.add(c, w)
        sums[products] = acc
    target = sum(w * dense(c) for w, c in zip(weights, clients)) / weights.sum()
    assert rel(sums["float64"].matrices()[0], target) < 1e-12
    narrow = rel(sums["float32"].matrices()[0], target)
    assert 1e-10 < narrow < 1e-5  # float32 rounding, no more
    top = top_rank(sums["float32"], 6)
    assert rel(dense(top.factors), best(target, 6)) < 1e-5


def test_lanczos_with_float32_products_finds_the_top_of_a_flat_spectrum():
    import fedlowrank.aggregation.accumulate as accumulate

    gen = torch.Generator().manual_seed(18)
    m = torch.randn(400, 16 * 40, generator=gen, dtype=F64) @ torch.randn(16 * 40, 400, generator=gen, dtype=F64)
    u, s, v = accumulate.lanczos_top(m, 16, products="float32")
    assert u.dtype == F64 and rel((u * s) @ v.T, best(m, 16)) < 1e-4
    assert torch.allclose(s, torch.linalg.svdvals(m)[:16], rtol=1e-5)


def test_an_unknown_product_precision_is_refused_by_name():
    with pytest.raises(ValueError, match="products"):
        WeightedSum(4, 4, products="float16")
    with pytest.raises(ValueError, match="dense_products"):
        FedLowRank(dense_products="half")


def test_large_layers_take_float32_products_by_default_and_say_so(caplog):
    """2048 x 2048 (2^22 entries): float32 products, logged; a smaller layer keeps float64's bits."""
    results = {}
    for d, products in ((2048, "auto"), (2048, "float64"), (1024, "auto"), (1024, "float64")):
        start = {"fc.lora_U": np.zeros((d, 4), np.float32), "fc.lora_S": np.ones((1, 4), np.float32),
                 "fc.lora_V": (torch.randn(d, 4, generator=torch.Generator().manual_seed(d)) / d**0.5).numpy()}
        replies = []
        for i in range(3):
            g = torch.Generator().manual_seed(100 * d + i)
            arrays = {"fc.lora_U": torch.randn(d, 4, generator=g).numpy(), "fc.lora_S": np.ones((1, 4), np.float32),
                      "fc.lora_V": torch.randn(d, 4, generator=g).numpy()}
            replies.append(train_reply(i + 1, arrays, 10.0 + i))
        with caplog.at_level("INFO"):
            record, _ = run_round(FedLowRank(rank=4, dense_above=0, dense_products=products), start, replies, dtype=np.float32)
        u, s, v = (torch.from_numpy(record[f"fc.{k}"].numpy()).double() for k in ("lora_U", "lora_S", "lora_V"))
        results[d, products] = (u * s) @ v.T
    assert sum("float32 products" in r.getMessage() for r in caplog.records) == 1  # the 2048 layer, once
    assert torch.equal(results[1024, "auto"], results[1024, "float64"])
    assert 0 < rel(results[2048, "auto"], results[2048, "float64"]) < 1e-5


def test_all_zero_updates_aggregate_to_zero():
    gen = torch.Generator().manual_seed(10)
    reference = Factors(torch.zeros(D_OUT, 4, dtype=F64), torch.ones(1, 4, dtype=F64), torch.randn(D_IN, 4, generator=gen, dtype=F64))
    clients = [reference, reference]
    for rule in ("exact", "flexlora-dense", "fedit"):
        res = run(get_rule(rule), reference, clients, [1.0, 1.0], 4)
        assert float(dense(res.factors).abs().max()) == 0.0 and res.factors.u.shape == (D_OUT, 4)


@pytest.mark.parametrize("dense_above", [None, 10**6])  # dense (13 x 9 is narrow) and factored
def test_carry_loses_nothing_over_twenty_rounds(dense_above):
    """Applied updates plus the carried residual equal the cumulative exact sum (float64)."""
    gen = torch.Generator().manual_seed(11)
    R = 3
    strategy = FedLowRank(rank=R, residual="carry", align=False, dense_above=dense_above)
    arrays = {"fc.lora_U": np.zeros((D_OUT, R)), "fc.lora_S": np.ones((1, R)), "fc.lora_V": np.random.default_rng(0).normal(size=(D_IN, R))}
    start = dense(Factors(*(torch.from_numpy(arrays[k]) for k in ("fc.lora_U", "fc.lora_S", "fc.lora_V"))))
    exact_total = torch.zeros(D_OUT, D_IN, dtype=F64)
    for server_round in range(1, 21):
        current = dense(Factors(*(torch.from_numpy(arrays[k]) for k in ("fc.lora_U", "fc.lora_S", "fc.lora_V"))))
        replies, moves = [], []
        for node in range(3):  # each client: the global plus its own rank-2 move, at rank R
            move = rand_factors(gen, 2)
            sent = Factors(*(torch.from_numpy(arrays[k]) for k in ("fc.lora_U", "fc.lora_S", "fc.lora_V")))
            local = dense(sent) + 0.3 * dense(move)
            u, s, vt = torch.linalg.svd(local)
            moves.append(best(local, R) - current)
            replies.append(train_reply(node + 1, {"fc.lora_U": u[:, :R] * s[:R], "fc.lora_S": np.ones((1, R)),
                                                  "fc.lora_V": vt[:R].T.numpy()}, 1.0, dtype=np.float64))
        record, metrics = run_round(strategy, arrays, replies, server_round=server_round, dtype=np.float64)
        arrays = {k: record[k].numpy() for k in record.keys()}
        exact_total += sum(moves) / 3
        assert metrics["agg-truncation-rel"] > 0  # the rank really truncates
    final = dense(Factors(*(torch.from_numpy(arrays[k]) for k in ("fc.lora_U", "fc.lora_S", "fc.lora_V"))))
    residual = strategy.state.residuals["fc"]
    assert isinstance(residual, torch.Tensor) == (dense_above is None)
    carried = residual[0] if isinstance(residual, torch.Tensor) else dense(residual)
    assert rel(final + carried - start, exact_total) < 1e-6


def test_plain_arrays_keep_their_shape_and_integer_arrays_are_refused_not_averaged():
    gen = np.random.default_rng(12)
    arrays = {"fc.lora_U": gen.normal(size=(D_OUT, 2)), "fc.lora_S": np.ones((1, 2)), "fc.lora_V": gen.normal(size=(D_IN, 2)),
              "temperature": np.array(1.5)}
    other = dict(arrays, temperature=np.array(2.5))
    strategy = FedLowRank()
    current = array_record(arrays, dtype=None)
    for server_round in (1, 2):  # round 2 checks replies against round 1's output shapes
        replies = [train_reply(1, arrays, 1.0, dtype=None), train_reply(2, other, 3.0, dtype=None)]
        record, metrics = run_round(strategy, current, replies, server_round=server_round)
        assert metrics["agg-clients-dropped"] == 0
        assert record["temperature"].numpy().shape == () and float(record["temperature"].numpy()) == pytest.approx(2.25)
        current = record
    # A step counter's mean (3.75 steps) is no step counter: refused before any client trains.
    with pytest.raises(ValueError, match="'steps' has dtype int64"):
        run_round(FedLowRank(), array_record({**arrays, "steps": np.array([3, 4], dtype=np.int64)}, dtype=None), [])


def test_global_rank_above_a_layers_size_is_clamped_with_a_log_line(caplog):
    import logging

    gen = np.random.default_rng(13)
    arrays = {"fc.lora_U": gen.normal(size=(5, 3)), "fc.lora_S": np.ones((1, 3)), "fc.lora_V": gen.normal(size=(4, 3))}
    strategy = FedLowRank(rank=16)
    with caplog.at_level(logging.INFO, logger="flwr"):
        record, _ = run_round(strategy, arrays, [train_reply(1, arrays, 1.0, dtype=np.float64)], dtype=np.float64)
    assert record["fc.lora_U"].numpy().shape == (5, 4)
    assert "global rank 16 clamped to min(d_out, d_in) = 4" in caplog.text


def test_strategy_state_round_trips_through_plain_arrays():
    state = LowRankState(
        global_arrays={"a.lora_U": np.ones((3, 2)), "b": np.array(1.0)},
        residuals={"a": Factors(torch.ones(3, 1), torch.ones(1, 1), torch.ones(2, 1)), "c": torch.zeros(1, 2, 2)},
        group_shares=[0.25, 0.75],
        server_round=7,
    )
    flat = state.state_dict()
    assert all(isinstance(v, np.ndarray) and v.dtype != object for v in flat.values())
    restored = LowRankState()
    restored.load_state_dict(flat)
    assert restored.server_round == 7 and restored.group_shares == [0.25, 0.75]
    assert restored.global_arrays["b"].shape == () and np.array_equal(restored.global_arrays["a.lora_U"], np.ones((3, 2)))
    assert isinstance(restored.residuals["a"], Factors) and torch.equal(restored.residuals["c"], torch.zeros(1, 2, 2))


# --------------------------------------------------------------------------- fold and FLoRA


def global_factors(arrays, leaf_u="lora_U", leaf_v="lora_V", module="fc"):
    u, v = torch.from_numpy(np.asarray(arrays[f"{module}.{leaf_u}"], dtype=np.float64)), torch.from_numpy(np.asarray(arrays[f"{module}.{leaf_v}"], dtype=np.float64))
    s = torch.from_numpy(np.asarray(arrays[f"{module}.lora_S"], dtype=np.float64)) if leaf_u == "lora_U" else torch.ones(1, u.shape[1], dtype=F64)
    return Factors(u, s, v)


@pytest.mark.parametrize("rule", ["exact", "flora"])
def test_fold_loses_nothing_and_stays_within_the_layers_size(rule):
    """Adapter plus fold equals the start plus every round's exact update, over 20 rounds."""
    gen = torch.Generator().manual_seed(14)
    R = 3
    strategy = FedLowRank(rule=rule, rank=R, residual="fold", align=False)
    arrays = {"fc.lora_U": np.zeros((D_OUT, R)), "fc.lora_S": np.ones((1, R)), "fc.lora_V": np.random.default_rng(1).normal(size=(D_IN, R))}
    total = lambda a: dense(global_factors(a)) + (dense(global_factors(a, "fold_U", "fold_V")) if "fc.fold_U" in a else 0)  # noqa: E731
    start = total(arrays)
    exact = torch.zeros(D_OUT, D_IN, dtype=F64)
    for server_round in range(1, 21):
        replies, sent = [], dense(global_factors(arrays))
        for node, rank in enumerate((R, 2, R)):
            local = best(best(sent, rank) + 0.3 * dense(rand_factors(gen, rank)), rank)  # what rank r holds
            u, s, vt = torch.linalg.svd(local)
            exact += (local - best(sent, rank)) / 3  # each client's own change
            replies.append(train_reply(node + 1, {"fc.lora_U": (u[:, :rank] * s[:rank]).numpy(), "fc.lora_S": np.ones((1, rank)),
                                                  "fc.lora_V": vt[:rank].T.numpy()}, 1.0, dtype=np.float64))
        record, metrics = run_round(strategy, arrays, replies, server_round=server_round, dtype=np.float64)
        arrays = {k: record[k].numpy() for k in record.keys()}
        assert metrics["agg-clients-dropped"] == 0
        assert arrays["fc.fold_U"].shape[1] <= min(D_OUT, D_IN)
        if rule == "flora":  # the adapter restarts fresh each round
            assert np.all(arrays["fc.lora_U"] == 0) and np.abs(arrays["fc.lora_V"]).max() <= D_IN**-0.5
    assert rel(total(arrays) - start, exact) < 1e-6


def test_a_client_loads_the_fold_and_applies_it_in_the_forward():
    from torch import nn

    from fedlowrank.adapters import exchange_state, inject_adapters, load_exchange_state

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D_IN, D_OUT)).double()
    inject_adapters(model, r"0", rank=2)
    state = exchange_state(model)
    gen = torch.Generator().manual_seed(15)
    fold = rand_factors(gen, 4)
    state["0.fold_U"], state["0.fold_V"] = fold.u, fold.v
    state["0.lora_U"] = torch.randn(D_OUT, 2, generator=gen, dtype=F64)
    load_exchange_state(model, state)
    x = torch.randn(5, D_IN, generator=gen, dtype=F64)
    layer = model[0]
    want = x @ (layer.base.weight + layer.scale * (layer.lora_U * layer.lora_S[0]) @ layer.lora_V.T + fold.u @ fold.v.T).T + layer.base.bias
    assert torch.allclose(model(x), want, atol=1e-10)
    assert "0.fold_U" not in exchange_state(model)  # never sent back
    del state["0.fold_U"], state["0.fold_V"]
    load_exchange_state(model, state)  # a state without fold clears it
    assert layer.fold_U.shape == (D_OUT, 0)


def test_fold_is_refused_where_it_cannot_hold():
    with pytest.raises(ValueError, match="supports \\['fold'\\]"):
        FedLowRank(rule="flora", residual="drop")
    with pytest.raises(ValueError, match="needs an exact rule"):
        FedLowRank(rule="fedit", residual="fold")
