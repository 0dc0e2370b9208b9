"""FedLowRank on real Flower reply Messages: exact aggregation, bad replies dropped."""

import logging

import numpy as np
import pytest

from fedlowrank.aggregation.round import RoundConfig, ServerRound
from fedlowrank.aggregation.state import LowRankState
from fedlowrank.strategies import FedLowRank
from fedlowrank.strategies.testing import configure_round, run_round, train_reply


def client_arrays(seed, rank, d_out=12, d_in=9):
    rng = np.random.default_rng(seed)
    return {
        "fc.lora_U": rng.normal(size=(d_out, rank)),
        "fc.lora_S": np.abs(rng.normal(size=(1, rank))) + 0.1,
        "fc.lora_V": rng.normal(size=(d_in, rank)),
        "head.weight": rng.normal(size=(1, d_out)),
        "head.bias": rng.normal(size=(1,)),
    }


def product(arrays):
    return (arrays["fc.lora_U"] * arrays["fc.lora_S"][0]) @ arrays["fc.lora_V"].T


def best_rank(m, rank):
    u, s, vt = np.linalg.svd(m, full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vt[:rank]


def completed_mean(clients, weights, global_arrays, rank):
    """Independent dense reference: each client's product plus the global components its
    rank could not hold (global minus its best approximation at the client's rank),
    weighted, then the best approximation at the global rank."""
    g = product(global_arrays)
    shares = np.asarray(weights, dtype=np.float64) / np.sum(weights)
    total = sum(w * (product(c) + g - best_rank(g, c["fc.lora_U"].shape[1])) for w, c in zip(shares, clients))
    return best_rank(total, rank)


def aggregate(strategy, replies, global_arrays):
    return run_round(strategy, global_arrays, replies)


def test_exact_weighted_mean_of_products_with_mixed_ranks():
    ranks, counts = [2, 4, 3], [10, 30, 60]
    clients = [client_arrays(k, r) for k, r in enumerate(ranks)]
    replies = [train_reply(k + 1, a, n) for k, (a, n) in enumerate(zip(clients, counts))]
    # Global rank 9 >= sum of client ranks: the aggregate must be the exact weighted mean.
    global_arrays = client_arrays(99, 9)
    arrays, metrics = aggregate(FedLowRank(rank=9), replies, global_arrays)
    shares = np.array(counts) / sum(counts)
    got = {k: arrays[k].numpy().astype(np.float64) for k in arrays.keys()}
    # Rank 9 < 9 + the clients' ranks, so the result is truncated; compare with the dense rule.
    want = completed_mean(clients, counts, global_arrays, 9)
    assert np.linalg.norm(product(got) - want) / np.linalg.norm(want) < 1e-5
    # Not the plain mean of the products: the low-rank clients' missing components count.
    plain = sum(w * product(c) for w, c in zip(shares, clients))
    assert np.linalg.norm(product(got) - plain) / np.linalg.norm(plain) > 1e-2
    for key in ("head.weight", "head.bias"):
        assert np.allclose(got[key], sum(w * c[key] for w, c in zip(shares, clients)), atol=1e-6)
    # Handed back balanced: S = 1 and U, V with the same Gram matrix (u sqrt(s) R, v sqrt(s) R).
    assert np.allclose(got["fc.lora_S"], 1.0)
    gram_u, gram_v = got["fc.lora_U"].T @ got["fc.lora_U"], got["fc.lora_V"].T @ got["fc.lora_V"]
    assert np.allclose(gram_u, gram_v, atol=1e-4 * np.abs(gram_u).max())
    assert metrics["agg-truncation-rel"] > 0 and metrics["agg-clients-dropped"] == 0


def test_alignment_rotates_towards_last_round_without_changing_the_product():
    clients = [client_arrays(k, 6) for k in range(3)]
    replies = [train_reply(k + 1, a, 10) for k, a in enumerate(clients)]
    # Last round's global factors: the aggregate itself in another rotation.
    plain, _ = aggregate(FedLowRank(rank=6, align=False), replies, client_arrays(99, 6))
    q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(6, 6)))
    previous = {k: plain[k].numpy().astype(np.float64) for k in plain.keys()}
    previous["fc.lora_U"], previous["fc.lora_V"] = previous["fc.lora_U"] @ q, previous["fc.lora_V"] @ q
    aligned, _ = aggregate(FedLowRank(rank=6, align=True), replies, previous)
    got = {k: aligned[k].numpy().astype(np.float64) for k in aligned.keys()}
    assert np.allclose(product(got), product(previous), atol=1e-5)
    # The rotation that maps the fresh SVD basis onto last round's factors is found exactly.
    assert np.allclose(got["fc.lora_U"], previous["fc.lora_U"], atol=1e-4)
    assert np.allclose(got["fc.lora_V"], previous["fc.lora_V"], atol=1e-4)
    assert not np.allclose(plain["fc.lora_U"].numpy(), previous["fc.lora_U"], atol=1e-2)


def test_truncation_reported_and_best_rank_kept():
    clients = [client_arrays(k, 4) for k in range(4)]
    replies = [train_reply(k + 1, a, 25) for k, a in enumerate(clients)]
    # The global sent had rank 4 (as the clients); the strategy's rank is 3.
    arrays, metrics = aggregate(FedLowRank(rank=3), replies, client_arrays(99, 4))
    want = sum(0.25 * product(c) for c in clients)
    u, s, vt = np.linalg.svd(want)
    best = (u[:, :3] * s[:3]) @ vt[:3]
    got = product({k: arrays[k].numpy().astype(np.float64) for k in arrays.keys()})
    assert np.linalg.norm(got - best) / np.linalg.norm(best) < 1e-5
    assert np.isclose(metrics["agg-truncation-rel"], np.linalg.norm(s[3:]) / np.linalg.norm(s), rtol=1e-4)


@pytest.mark.parametrize(
    "corrupt,reason",
    [
        (lambda a: a.update({"fc.lora_U": a["fc.lora_U"][:-1]}), "factor 'fc.lora_U' has shape"),
        (lambda a: a.update({"fc.lora_V": a["fc.lora_V"][:, :2]}), "disagree on rank"),
        (lambda a: a["fc.lora_S"].__setitem__((0, 0), np.nan), "'fc.lora_S' contains NaN or Inf"),
        (lambda a: a["head.weight"].__setitem__((0, 1), np.inf), "'head.weight' contains NaN or Inf"),
        (lambda a: a.update({"head.bias": np.zeros(2)}), "'head.bias' has shape"),
        (lambda a: a.pop("head.bias"), "missing \\['head.bias'\\]"),
    ],
)
def test_bad_reply_is_dropped_logged_and_round_goes_on(corrupt, reason, caplog):
    good = [client_arrays(k, 3) for k in range(2)]
    bad = client_arrays(7, 3)
    corrupt(bad)
    replies = [train_reply(1, good[0], 50), train_reply(66, bad, 1000), train_reply(2, good[1], 50)]
    global_arrays = client_arrays(99, 3)
    with caplog.at_level(logging.WARNING, logger="flwr"):
        arrays, metrics = aggregate(FedLowRank(rank=6), replies, global_arrays)
    assert any("node 66" in r.getMessage() and __import__("re").search(reason, r.getMessage()) for r in caplog.records)
    got = product({k: arrays[k].numpy().astype(np.float64) for k in arrays.keys()})
    want = 0.5 * product(good[0]) + 0.5 * product(good[1])
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-5
    assert metrics["agg-clients-dropped"] == 1


def test_negative_or_missing_weight_is_dropped(caplog):
    good = client_arrays(0, 3)
    replies = [train_reply(1, good, 10), train_reply(5, client_arrays(1, 3), -4)]
    with caplog.at_level(logging.WARNING, logger="flwr"):
        arrays, metrics = aggregate(FedLowRank(rank=3), replies, client_arrays(99, 3))
    assert any("node 5" in r.getMessage() and "must be a finite number >= 0" in r.getMessage() for r in caplog.records)
    got = product({k: arrays[k].numpy().astype(np.float64) for k in arrays.keys()})
    assert np.linalg.norm(got - product(good)) / np.linalg.norm(product(good)) < 1e-5


def test_all_replies_bad_keeps_global_model():
    bad = client_arrays(0, 3)
    bad["fc.lora_U"][0, 0] = np.nan
    arrays, metrics = aggregate(FedLowRank(rank=3), [train_reply(1, bad, 10)], client_arrays(99, 3))
    # Strategy.start keeps the previous global arrays when aggregate_train returns None.
    assert arrays is None and metrics is None


def test_grouped_factors_are_refused_with_a_pointer_to_fairlora():
    arrays = client_arrays(0, 3)
    arrays["fc.lora_S"] = np.ones((2, 3))
    strategy = FedLowRank(rank=3)
    with pytest.raises(ValueError, match="use FairLoRA"):
        configure_round(strategy, arrays)  # before any client trains


def test_peft_lora_factors_are_refused_not_averaged_factor_by_factor():
    """A PEFT model's lora_A/lora_B reaching FedLowRank: a clear error before any client trains."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(8, 8)), LoraConfig(r=2, target_modules=["0"]))
    arrays = {k: v.detach().numpy() for k, v in model.state_dict().items() if "lora_" in k}
    strategy = FedLowRank()
    with pytest.raises(ValueError, match="PEFT LoRA factors .* not the average of B A"):
        configure_round(strategy, arrays)


def svd_arrays(matrix, rank, head):
    """What a client of ``rank`` holds after loading ``matrix``: its best rank-r part, balanced."""
    u, s, vt = np.linalg.svd(matrix, full_matrices=False)
    root = np.sqrt(s[:rank])
    return {"fc.lora_U": u[:, :rank] * root, "fc.lora_S": np.ones((1, rank)), "fc.lora_V": vt[:rank].T * root, **head}


def test_server_learning_rate_moves_the_global_that_share_of_the_exact_change():
    ranks, counts = [2, 4, 3], [10, 30, 60]
    clients = [client_arrays(k, r) for k, r in enumerate(ranks)]
    replies = [train_reply(k + 1, a, n) for k, (a, n) in enumerate(zip(clients, counts))]
    global_arrays = client_arrays(99, 9)
    arrays, _ = aggregate(FedLowRank(rank=9, server_learning_rate=0.25), replies, global_arrays)
    got = {k: arrays[k].numpy().astype(np.float64) for k in arrays.keys()}
    g = product(global_arrays)
    shares = np.array(counts) / sum(counts)
    mean = sum(w * (product(c) + g - best_rank(g, c["fc.lora_U"].shape[1])) for w, c in zip(shares, clients))
    want = best_rank(g + 0.25 * (mean - g), 9)  # dense reference
    assert np.linalg.norm(product(got) - want) / np.linalg.norm(want) < 1e-5
    for key in ("head.weight", "head.bias"):
        plain_mean = sum(w * c[key] for w, c in zip(shares, clients))
        assert np.allclose(got[key], global_arrays[key] + 0.25 * (plain_mean - global_arrays[key]), atol=1e-6)


def test_server_learning_rate_leaves_an_unchanged_round_unchanged_at_mixed_ranks():
    global_arrays = client_arrays(7, 6)
    head = {k: global_arrays[k] for k in ("head.weight", "head.bias")}
    g = product(global_arrays)
    replies = [train_reply(k + 1, svd_arrays(g, r, head), 10 + k) for k, r in enumerate([2, 6, 4])]
    arrays, _ = aggregate(FedLowRank(rank=6, server_learning_rate=0.5), replies, global_arrays)
    got = {k: arrays[k].numpy().astype(np.float64) for k in arrays.keys()}
    assert np.linalg.norm(product(got) - g) / np.linalg.norm(g) < 1e-5
    assert np.allclose(got["head.weight"], head["head.weight"], atol=1e-6)


@pytest.mark.parametrize("rate", [0.0, -0.5, 1.5, float("nan")])
def test_server_learning_rate_outside_0_1_is_refused(rate):
    with pytest.raises(ValueError, match="server_learning_rate must be in"):
        FedLowRank(server_learning_rate=rate)


def test_metrics_combine_as_the_wire_contract_says():
    """Counts summed, group coverage the fewest, privacy the worst site's, the rest a weighted mean."""
    from flwr.app import MetricRecord, RecordDict

    from fedlowrank.strategies.replies import weighted_metrics
    from fedlowrank.wire import metric_reduction

    sites = [{"num-examples": 10, "eval-n": 10, "eval-n_g1": 4, "dp_epsilon": 0.5, "eval-es_auc_groups": 2, "eval-auc": 0.8},
             {"num-examples": 30, "eval-n": 30, "eval-n_g1": 6, "dp_epsilon": 2.0, "eval-es_auc_groups": 1, "eval-auc": 0.6}]
    out = weighted_metrics([RecordDict({"metrics": MetricRecord(m)}) for m in sites], "num-examples")
    assert [metric_reduction(k) for k in ("eval-n_g1", "dp_epsilon", "eval-es_auc_groups", "eval-auc")] == ["sum", "max", "min", "mean"]
    assert (out["eval-n"], out["eval-n_g1"], out["dp_epsilon"], out["eval-es_auc_groups"]) == (40, 10, 2.0, 1)
    assert out["eval-auc"] == pytest.approx((10 * 0.8 + 30 * 0.6) / 40)


def test_every_registered_rule_is_a_strategy_and_grouped_rules_are_fairlora():
    from fedlowrank.aggregation.rules import registered_rules
    from fedlowrank.strategies import FairLoRA, make_strategy, strategy_names

    assert set(registered_rules()) <= set(strategy_names())
    for name in registered_rules():
        strategy = make_strategy(name, rank=4)
        assert strategy.rule.name == name and isinstance(strategy, FairLoRA) == strategy.rule.grouped
    fedex = make_strategy("fedex", rank=4)
    assert (fedex.rule.name, fedex.config.residual) == ("exact", "fold")
    assert (make_strategy("fairlora-paper", rank=4).mode, make_strategy("fairlora-exact", rank=4).mode) == ("paper", "exact")
    with pytest.raises(ValueError, match="unknown strategy 'fedsvd'.*choose one of"):
        make_strategy("fedsvd")


def test_integer_or_bool_global_arrays_are_refused_before_any_client_trains():
    arrays = {"fc.lora_U": np.zeros((4, 2)), "fc.lora_S": np.ones((1, 2)), "fc.lora_V": np.ones((3, 2)),
              "bn.num_batches_tracked": np.array(7, dtype=np.int64)}
    with pytest.raises(ValueError, match="'bn.num_batches_tracked' has dtype int64: FedLowRank aggregates float arrays only"):
        ServerRound(RoundConfig(rank=2), LowRankState(), arrays, 1)
