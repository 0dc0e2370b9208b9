"""FairLoRA on real Flower reply Messages, against dense numpy references."""

import logging

import numpy as np
import pytest
from flwr.app import ConfigRecord

from fedlowrank.strategies import FairLoRA
from fedlowrank.strategies.fairlora import grouped_residual_norms, reply_group_counts

from fedlowrank.strategies.testing import NodeGrid, array_record, train_reply

D_OUT, D_IN, R, G = 12, 9, 3, 2
# Per-group counts chosen so that per-group weights differ from sample weights.
COUNTS = np.array([[10.0, 0.0], [30.0, 10.0], [0.0, 50.0]])


GRID = NodeGrid([1, 2, 3])


pytestmark = pytest.mark.usefixtures("task_identity")


def _orthonormal(rng, rows, cols):
    return np.linalg.qr(rng.standard_normal((rows, cols)))[0]


def _global(rng):
    return {
        "fc.lora_U": rng.standard_normal((D_OUT, R)),
        "fc.lora_S": np.ones((G, R)),
        "fc.lora_V": rng.standard_normal((D_IN, R)),
        "head.weight": rng.standard_normal((1, D_OUT)),
    }


def _client(rng, u=None, v=None):
    return {
        "fc.lora_U": u if u is not None else rng.standard_normal((D_OUT, R)),
        "fc.lora_S": rng.uniform(0.5, 2.0, (G, R)),
        "fc.lora_V": v if v is not None else rng.standard_normal((D_IN, R)),
        "head.weight": rng.standard_normal((1, D_OUT)),
    }


def _reply(node, arrays, counts, num_examples=None):
    metrics = {f"group-count-g{g}": float(c) for g, c in enumerate(counts)}
    return train_reply(node, arrays, float(sum(counts) if num_examples is None else num_examples), **metrics)


def _round(strategy, global_arrays, replies):
    list(strategy.configure_train(1, array_record(global_arrays), ConfigRecord(), GRID))
    return strategy.aggregate_train(1, replies)


def _product(arrays, g):
    u, s, v = (arrays[f"fc.{x}"].numpy().astype(np.float64) for x in ("lora_U", "lora_S", "lora_V"))
    return u @ np.diag(s[g]) @ v.T


def _dense_targets(clients, counts):
    weights = counts / counts.sum(axis=0)
    return [
        sum(weights[k, g] * c["fc.lora_U"] @ np.diag(c["fc.lora_S"][g]) @ c["fc.lora_V"].T for k, c in enumerate(clients))
        for g in range(G)
    ]


def test_exact_recovers_per_group_weighted_sum_when_clients_share_a_basis():
    # Shared orthonormal U, V: every M_g is U diag(.) V^T, so rank-r CP is exact and the
    # handed-back product must equal the dense per-group weighted sum.
    rng = np.random.default_rng(0)
    u, v = _orthonormal(rng, D_OUT, R), _orthonormal(rng, D_IN, R)
    clients = [_client(rng, u, v) for _ in range(3)]
    start = _global(rng)
    # Default: |S| capped at 1, the rest of the magnitude in U and V; the same products.
    capped, _ = _round(FairLoRA(mode="exact", rank=R), start, [_reply(k + 1, c, COUNTS[k]) for k, c in enumerate(clients)])
    assert np.abs(capped["fc.lora_S"].numpy()).max() <= 1.0 + 1e-6
    strategy = FairLoRA(mode="exact", rank=R, balance_cap=None)
    arrays, metrics = _round(strategy, start, [_reply(k + 1, c, COUNTS[k]) for k, c in enumerate(clients)])
    targets = _dense_targets(clients, COUNTS)
    for g in range(G):
        np.testing.assert_allclose(_product(arrays, g), targets[g], atol=2e-5)
        np.testing.assert_allclose(_product(capped, g), targets[g], atol=2e-5)
    # Balanced without a cap: each column's group-share-weighted mean |S| is 1.
    shares = COUNTS.sum(axis=0) / COUNTS.sum()
    np.testing.assert_allclose(shares @ np.abs(arrays["fc.lora_S"].numpy()), 1.0, rtol=1e-5)
    assert metrics["agg-error-rel"] < 1e-5
    # Non-factor arrays: mean weighted by num-examples (10, 40, 50).
    p = COUNTS.sum(axis=1) / COUNTS.sum()
    head = sum(pk * c["head.weight"] for pk, c in zip(p, clients))
    np.testing.assert_allclose(arrays["head.weight"].numpy(), head, atol=1e-6)
    # Group shares reach the next round's configs: group 0 has 40 of 100 samples.
    np.testing.assert_allclose([metrics["group-share-g0"], metrics["group-share-g1"]], [0.4, 0.6])
    train = list(strategy.configure_train(2, arrays, ConfigRecord(), GRID))
    evaluate = list(strategy.configure_evaluate(2, arrays, ConfigRecord(), GRID))
    for msg in train + evaluate:
        np.testing.assert_allclose(msg.content["config"]["group-share"], [0.4, 0.6])


def test_exact_error_metric_matches_dense_error_and_floor_on_random_clients():
    rng = np.random.default_rng(1)
    clients = [_client(rng) for _ in range(3)]
    strategy = FairLoRA(mode="exact", rank=R, global_rank=G * R)
    arrays, metrics = _round(strategy, _global(rng), [_reply(k + 1, c, COUNTS[k]) for k, c in enumerate(clients)])
    targets = _dense_targets(clients, COUNTS)
    errors = [np.linalg.norm(targets[g] - _product(arrays, g)) / np.linalg.norm(targets[g]) for g in range(G)]
    np.testing.assert_allclose([metrics["agg-error-rel-g0"], metrics["agg-error-rel-g1"]], errors, rtol=1e-3)
    floors = [np.linalg.norm(np.linalg.svd(t, compute_uv=False)[R:]) / np.linalg.norm(t) for t in targets]
    np.testing.assert_allclose(metrics["agg-floor-rel"], np.mean(floors), rtol=1e-6)
    assert arrays["fc.lora_U"].shape == (D_OUT, G * R)


@pytest.mark.parametrize("shared_fraction, momentum", [(0.0, 0.0), (0.5, 0.0), (0.0, 0.5)])
def test_paper_rule_matches_independent_reference(shared_fraction, momentum):
    rng = np.random.default_rng(2)
    global_arrays = _global(rng)
    clients = [_client(rng) for _ in range(3)]
    examples = [12.0, 40.0, 60.0]  # 2 unknown-group samples at the first and last site
    strategy = FairLoRA(mode="paper", rank=R, shared_fraction=shared_fraction, server_momentum=momentum)
    replies = [_reply(k + 1, c, COUNTS[k], examples[k]) for k, c in enumerate(clients)]
    arrays, metrics = _round(strategy, global_arrays, replies)

    p = np.array(examples) / sum(examples)
    q = COUNTS / COUNTS.sum(axis=0)
    u = sum(pk * c["fc.lora_U"] for pk, c in zip(p, clients))
    v = sum(pk * c["fc.lora_V"] for pk, c in zip(p, clients))
    s = np.stack([sum(q[k, g] * c["fc.lora_S"][g] for k, c in enumerate(clients)) for g in range(G)])
    shared = int(shared_fraction * R)
    s[:, :shared] = sum(pk * c["fc.lora_S"][:, :shared] for pk, c in zip(p, clients))
    blend = lambda old, new: momentum * old + (1 - momentum) * new  # noqa: E731
    u, s, v = blend(global_arrays["fc.lora_U"], u), blend(global_arrays["fc.lora_S"], s), blend(global_arrays["fc.lora_V"], v)
    np.testing.assert_allclose(arrays["fc.lora_U"].numpy(), u, atol=1e-5)
    np.testing.assert_allclose(arrays["fc.lora_S"].numpy(), s, atol=1e-5)
    np.testing.assert_allclose(arrays["fc.lora_V"].numpy(), v, atol=1e-5)
    targets = _dense_targets(clients, COUNTS)
    errors = [np.linalg.norm(targets[g] - u @ np.diag(s[g]) @ v.T) / np.linalg.norm(targets[g]) for g in range(G)]
    np.testing.assert_allclose([metrics["agg-error-rel-g0"], metrics["agg-error-rel-g1"]], errors, rtol=1e-4)
    assert errors[0] > 0.05  # the naive rule is far from exact: the metric must show it


def test_grouped_residual_norms_matches_dense():
    import torch

    rng = np.random.default_rng(3)
    us = [torch.from_numpy(rng.standard_normal((D_OUT, r))) for r in (2, 3)]
    vs = [torch.from_numpy(rng.standard_normal((D_IN, r))) for r in (2, 3)]
    ss = [torch.from_numpy(rng.standard_normal((G, r))) for r in (2, 3)]
    w = torch.tensor([[0.3, 0.9], [0.7, 0.1]], dtype=torch.float64)
    u, v = torch.from_numpy(rng.standard_normal((D_OUT, 4))), torch.from_numpy(rng.standard_normal((D_IN, 4)))
    s = torch.from_numpy(rng.standard_normal((G, 4)))
    residual, target = grouped_residual_norms(us, ss, vs, w, u, s, v)
    for g in range(G):
        m = sum(w[k, g] * us[k] @ torch.diag(ss[k][g]) @ vs[k].T for k in range(2))
        assert float(target[g]) == pytest.approx(float(m.norm()), rel=1e-10)
        assert float(residual[g]) == pytest.approx(float((m - u @ torch.diag(s[g]) @ v.T).norm()), rel=1e-10)


@pytest.mark.parametrize("mode", ["exact", "paper"])
def test_bad_replies_are_dropped_with_a_logged_reason_and_the_round_goes_on(mode, caplog):
    rng = np.random.default_rng(4)
    u, v = _orthonormal(rng, D_OUT, R), _orthonormal(rng, D_IN, R)
    good = [_client(rng, u, v) for _ in range(2)]
    three_rows = _client(rng, u, v)
    three_rows["fc.lora_S"] = np.ones((3, R))
    replies = [
        _reply(1, good[0], COUNTS[0]),
        _reply(2, good[1], COUNTS[1]),
        _reply(7, _client(rng, u, v), [5.0, 5.0, 5.0]),  # counts for 3 groups, S has 2 rows
        _reply(8, three_rows, [5.0, 5.0, 5.0]),  # S with 3 rows
        _reply(9, _client(rng, u, v), [5.0]),  # counts for 1 group
        _reply(10, _client(rng, u, v), [5.0, -1.0]),  # negative count
    ]
    strategy = FairLoRA(mode=mode, rank=R)
    with caplog.at_level(logging.WARNING):
        arrays, metrics = _round(strategy, _global(rng), replies)
    assert metrics["agg-clients-dropped"] == 4
    text = caplog.text
    for node in (7, 8, 9, 10):
        assert f"Dropping reply from node {node}" in text
    assert "S has 2 rows" in text and "must be a finite number >= 0" in text
    if mode == "exact":  # the two good clients alone, exactly
        targets = _dense_targets(good, COUNTS[:2])
        for g in range(G):
            np.testing.assert_allclose(_product(arrays, g), targets[g], atol=2e-5)


def test_paper_drops_a_reply_of_another_rank(caplog):
    rng = np.random.default_rng(5)
    low = {"fc.lora_U": rng.standard_normal((D_OUT, 2)), "fc.lora_S": np.ones((G, 2)),
           "fc.lora_V": rng.standard_normal((D_IN, 2)), "head.weight": rng.standard_normal((1, D_OUT))}
    replies = [_reply(1, _client(rng), COUNTS[0]), _reply(2, low, COUNTS[1])]
    with caplog.at_level(logging.WARNING):
        arrays, metrics = _round(FairLoRA(mode="paper", rank=R), _global(rng), replies)
    assert metrics["agg-clients-dropped"] == 1 and "cannot mix ranks" in caplog.text
    assert arrays["fc.lora_U"].shape == (D_OUT, R)


def test_all_replies_bad_gives_no_update():
    rng = np.random.default_rng(6)
    arrays, metrics = _round(FairLoRA(rank=R), _global(rng), [_reply(1, _client(rng), [1.0])])
    assert arrays is None and metrics is None


def test_reply_group_counts_and_options_validate():
    from flwr.app import MetricRecord, RecordDict

    content = RecordDict({"m": MetricRecord({"num-examples": 3.0, "group-count-g1": 2.0, "group-count-g0": 1.0})})
    np.testing.assert_array_equal(reply_group_counts(content, 2), [1.0, 2.0])
    with pytest.raises(ValueError, match="S has 3 rows"):
        reply_group_counts(content, 3)
    with pytest.raises(ValueError, match="unknown FairLoRA mode"):
        FairLoRA(mode="median")
    with pytest.raises(ValueError, match="server_momentum"):
        FairLoRA(mode="paper", server_momentum=1.0)
    with pytest.raises(ValueError, match="balance_cap"):
        FairLoRA(balance_cap=0.5)
