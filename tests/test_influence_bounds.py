"""A client's influence on the global is bounded by the server, not by what the client claims.

Measured in "honest rounds": the size of the move one all-honest round makes. Every bound is
checked against a run of the same round without the attacker.
"""

import logging

import numpy as np
import pytest
import torch

from fedlowrank.aggregation.round import RoundConfig, ServerRound
from fedlowrank.aggregation.state import LowRankState

D_OUT, D_IN, RANK = 12, 10, 3


def start():
    gen = torch.Generator().manual_seed(0)
    return {"fc.lora_U": np.zeros((D_OUT, RANK)), "fc.lora_S": np.ones((1, RANK)),
            "fc.lora_V": torch.randn(D_IN, RANK, generator=gen, dtype=torch.float64).numpy() / D_IN**0.5}


def product(arrays):
    return arrays["fc.lora_U"] @ np.diag(arrays["fc.lora_S"][0]) @ arrays["fc.lora_V"].T


def honest(arrays, seed, scale=0.05):
    gen = torch.Generator().manual_seed(seed)
    return {**arrays, "fc.lora_U": arrays["fc.lora_U"] + scale * torch.randn(D_OUT, RANK, generator=gen, dtype=torch.float64).numpy()}


def attacker(arrays, size=1e4):
    """Pushes the adapter far in one direction: U set to a huge constant."""
    return {**arrays, "fc.lora_U": np.full((D_OUT, RANK), size)}


def one_round(config, state, arrays, replies):
    rnd = ServerRound(config, state, arrays, state.server_round + 1)
    for node, (reply, weight) in enumerate(replies):
        rnd.add(reply, weight, node=node)
    return rnd.finish().arrays


def move(before, after):
    return float(np.linalg.norm(product(after) - product(before)))


def honest_round_size(config, arrays, honest_count, state=None):
    state = state or LowRankState()
    replies = [(honest(arrays, s), 100.0) for s in range(honest_count)]
    return move(arrays, one_round(config, state, arrays, replies))


@pytest.mark.parametrize("robust", [None, "clip"])
def test_one_client_claiming_a_billion_examples_gets_at_most_its_capped_share(robust):
    """Share cap 10 x the median of 10 replies: the liar's weight is at most 10 / 19 of the round."""
    config, arrays = RoundConfig(rank=RANK, robust=robust), start()
    honest_replies = [(honest(arrays, s), 100.0) for s in range(9)]
    lie = {**arrays, "fc.lora_U": arrays["fc.lora_U"] + 1.0}  # a modest update, a huge claim
    out = one_round(config, LowRankState(), arrays, honest_replies + [(lie, 1e9)])
    # Exact reference: the same round with the liar's weight set to the cap.
    capped = one_round(RoundConfig(rank=RANK, robust=robust, share_cap=None), LowRankState(), arrays,
                       honest_replies + [(lie, 1000.0)])
    np.testing.assert_allclose(product(out), product(capped), atol=1e-12)
    uncapped = one_round(RoundConfig(rank=RANK, robust=robust, share_cap=None), LowRankState(), arrays,
                         honest_replies + [(lie, 1e9)])
    assert move(arrays, out) < 0.6 * move(arrays, uncapped)  # the claim bought 10/19 of the round, not all of it


def test_under_clip_one_client_moves_the_global_at_most_its_share_times_the_bound():
    config, arrays = RoundConfig(rank=RANK, robust="clip"), start()
    honest_size = honest_round_size(config, arrays, 9)
    replies = [(honest(arrays, s), 100.0) for s in range(9)] + [(attacker(arrays), 1e9)]
    out = one_round(config, LowRankState(), arrays, replies)
    # Its share is at most 10/19; its update at most 3 x the median honest update.
    single = float(np.median([move(arrays, r) for r, _ in replies[:9]]))
    assert move(arrays, out) <= honest_size + (10 / 19) * 3 * single * (1 + 1e-9)
    unbounded = one_round(RoundConfig(rank=RANK, share_cap=None), LowRankState(), arrays, replies)
    assert move(arrays, unbounded) > 1e4 * move(arrays, out)


@pytest.mark.parametrize("valid", [1, 2])
def test_the_bounds_carry_over_to_rounds_with_one_or_two_valid_replies(valid):
    """The medians of the last round with 3 or more replies bound a round with fewer."""
    config, arrays, state = RoundConfig(rank=RANK, robust="clip"), start(), LowRankState()
    after_first = one_round(config, state, arrays, [(honest(arrays, s), 100.0) for s in range(5)])
    assert state.median_weight == 100.0 and state.median_norm > 0
    honest_size = move(arrays, after_first)
    replies = [(honest(after_first, 10 + s), 100.0) for s in range(valid - 1)] + [(attacker(after_first), 1e9)]
    out = one_round(config, state, after_first, replies)
    # Alone, the attacker is clipped to 3 x the carried median norm: a few honest rounds, not 1e6.
    assert move(after_first, out) <= 3.5 * honest_size * 5, (move(after_first, out), honest_size)
    unbounded = one_round(RoundConfig(rank=RANK, share_cap=None), LowRankState(), after_first, replies)
    assert move(after_first, unbounded) > 1e4 * move(after_first, out)


def test_three_colluders_of_ten_stay_within_the_documented_bound():
    """k < K/2 colluders, each capped and clipped: together at most sum of their shares x the bound."""
    config, arrays = RoundConfig(rank=RANK, robust="clip"), start()
    honest_replies = [(honest(arrays, s), 100.0) for s in range(7)]
    norms = [move(arrays, r) for r, _ in honest_replies]
    direction = np.full((D_OUT, RANK), 1.0)
    colluders = [({**arrays, "fc.lora_U": arrays["fc.lora_U"] + 2.9 * np.median(norms) * direction / 50}, 1e9) for _ in range(3)]
    out = one_round(config, LowRankState(), arrays, honest_replies + colluders)
    baseline = one_round(config, LowRankState(), arrays, honest_replies)
    # Documented bound: each colluder's weight <= 10 x the median weight, its update <= 3 x the median norm.
    median_weight, median_norm = 100.0, float(np.median(norms + [move(arrays, c) for c, _ in colluders]))
    share = 3 * 10 * median_weight / (3 * 10 * median_weight + 7 * 100.0)
    assert move(baseline, out) <= share * 3 * median_norm + move(arrays, baseline) * share + 1e-9


def test_a_node_at_the_bound_round_after_round_is_logged(caplog):
    config, arrays, state = RoundConfig(rank=RANK, robust="clip"), start(), LowRankState()
    with caplog.at_level(logging.WARNING):
        for _ in range(4):
            replies = [(honest(arrays, s), 100.0) for s in range(4)] + [(attacker(arrays, 10.0), 1e9)]
            arrays = one_round(config, state, arrays, replies)
    steady = [r.getMessage() for r in caplog.records if "in its last" in r.getMessage()]
    assert steady == ["Node 4 has been at the share cap or clip bound in its last 3 rounds",
                      "Node 4 has been at the share cap or clip bound in its last 4 rounds"]
    assert state.at_bound == {"4": 4}


def test_medians_and_bound_counts_survive_a_checkpoint():
    config, arrays, state = RoundConfig(rank=RANK, robust="clip"), start(), LowRankState()
    one_round(config, state, arrays, [(honest(arrays, s), 100.0 + s) for s in range(4)] + [(attacker(arrays), 1e9)])
    restored = LowRankState()
    restored.load_state_dict(state.state_dict())
    assert (restored.median_weight, restored.median_norm, restored.at_bound) == (state.median_weight, state.median_norm, {"4": 1})


def test_clean_rounds_are_unchanged_by_the_share_cap():
    """Weights within 10x the median: the capped round is bit-identical to the uncapped one."""
    arrays = start()
    replies = [(honest(arrays, s), w) for s, w in enumerate([40.0, 100.0, 120.0, 300.0, 550.0])]
    capped = one_round(RoundConfig(rank=RANK), LowRankState(), arrays, replies)
    plain = one_round(RoundConfig(rank=RANK, share_cap=None), LowRankState(), arrays, replies)
    for key in capped:
        np.testing.assert_array_equal(capped[key], plain[key])


def test_a_share_cap_below_one_is_refused():
    with pytest.raises(ValueError, match="share_cap"):
        RoundConfig(share_cap=0.5)



def test_factors_within_the_entry_limit_whose_product_exceeds_it_are_refused_whatever_robust_says():
    """Every factor entry exactly 1e6: each entry is allowed, the product (entries 3e12) is not."""
    arrays = start()
    extreme = {**arrays, "fc.lora_U": np.full((D_OUT, RANK), 1e6), "fc.lora_V": np.full((D_IN, RANK), 1e6)}
    rnd = ServerRound(RoundConfig(rank=RANK), LowRankState(), arrays, 1)
    with pytest.raises(ValueError, match=r"its product can reach 3e\+12, above the 1e\+06"):
        rnd.add(extreme, 100.0, node=9)
    for s in range(9):
        rnd.add(honest(arrays, s), 100.0, node=s)
    out = rnd.finish().arrays
    assert np.abs(product(out)).max() < 1.0  # the global stays where honest clients put it


def test_two_site_federations_are_neither_capped_nor_frozen_by_a_site_without_data(caplog):
    """Fewer than 3 replies and no earlier median: no cap (a median of two says nothing)."""
    arrays = start()
    with caplog.at_level(logging.WARNING):
        out = one_round(RoundConfig(rank=RANK), LowRankState(), arrays, [(honest(arrays, 0), 100.0), (honest(arrays, 1), 2000.0)])
        plain = one_round(RoundConfig(rank=RANK, share_cap=None), LowRankState(), arrays,
                          [(honest(arrays, 0), 100.0), (honest(arrays, 1), 2000.0)])
        empty_site = one_round(RoundConfig(rank=RANK), LowRankState(), arrays, [(honest(arrays, 0), 0.0), (honest(arrays, 1), 500.0)])
    assert "Capping" not in caplog.text
    np.testing.assert_array_equal(product(out), product(plain))
    assert empty_site is not None and move(arrays, empty_site) > 0  # the site with data moved the global


def test_a_grouped_reply_cannot_buy_a_group_with_its_counts(caplog):
    """FairLoRA weighs each group by counts: a reply within the weight cap claiming one group
    wholly is capped at 10x that group's median count (50 here, not 1000)."""
    gen = torch.Generator().manual_seed(3)
    arrays = {"fc.lora_U": np.zeros((D_OUT, RANK)), "fc.lora_S": np.ones((2, RANK)),
              "fc.lora_V": torch.randn(D_IN, RANK, generator=gen, dtype=torch.float64).numpy() / D_IN**0.5}

    def aggregate(config, attacker_counts):
        rnd = ServerRound(config, LowRankState(), arrays, 1)
        for node in range(9):
            rnd.add(honest(arrays, node), 100.0, np.array([95.0, 5.0]), node=node)
        rnd.add(attacker(arrays, 1.0), 1000.0, np.array(attacker_counts), node=9)
        out = rnd.finish().arrays
        return out["fc.lora_U"] @ np.diag(out["fc.lora_S"][1]) @ out["fc.lora_V"].T  # group 1's product

    with caplog.at_level(logging.WARNING):
        capped = aggregate(RoundConfig(rule="fairlora-exact", rank=RANK), [0.0, 1000.0])
    assert "Capping the group counts of node 9: [0.0, 1000.0] claimed, at most [950.0, 50.0]" in caplog.text
    reference = aggregate(RoundConfig(rule="fairlora-exact", rank=RANK, share_cap=None), [0.0, 50.0])
    np.testing.assert_allclose(capped, reference, atol=1e-10)


def test_a_round_that_keeps_the_global_leaves_the_state_as_it_was():
    config, state = RoundConfig(rank=RANK, robust="clip", min_valid_replies=5), LowRankState()
    arrays = start()
    assert one_round(config, state, arrays, [(honest(arrays, s), 100.0) for s in range(3)] + [(attacker(arrays), 1e9)]) is None
    assert (state.median_weight, state.median_norm, state.at_bound) == (None, None, {})


@pytest.mark.parametrize(("field", "value"), [("step_scale", -1e6), ("step_scale", 2.0), ("median_weight", "abc"),
                                              ("median_norm", float("inf")), ("at_bound", [])])
def test_a_malformed_carried_field_is_refused_by_name(field, value):
    import json

    state = LowRankState()
    saved = state.state_dict()
    meta = json.loads(bytes(saved["meta"]).decode())
    meta[field] = value
    saved["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8).copy()
    with pytest.raises(ValueError, match=field):
        LowRankState().load_state_dict(saved)


def test_declared_sites_bound_a_two_site_round_that_no_median_can(caplog):
    """With 2 replies no median caps anything; a declared maximum per node does: a claim above it,
    or a node the operator did not declare, is dropped and named, and the round is the honest one."""
    from fedlowrank.strategies import FedLowRank
    from fedlowrank.strategies.testing import run_round, train_reply

    arrays = start()
    declared = {1: 200.0, 2: 200.0}
    good, lie = honest(arrays, 1), {**arrays, "fc.lora_U": arrays["fc.lora_U"] + 1.0}

    def aggregate(strategy, replies):
        out, metrics = run_round(strategy, arrays, replies, dtype=np.float64)
        return {k: v.numpy() for k, v in out.items()}, metrics

    alone, _ = aggregate(FedLowRank(rank=RANK), [train_reply(1, good, 100.0, np.float64)])
    for liar in (train_reply(2, lie, 1e9, np.float64), train_reply(7, lie, 100.0, np.float64)):
        with caplog.at_level(logging.WARNING):
            out, metrics = aggregate(FedLowRank(rank=RANK, node_max_weights=declared),
                                     [train_reply(1, good, 100.0, np.float64), liar])
        np.testing.assert_allclose(product(out), product(alone), atol=1e-12)
        assert metrics["agg-clients-dropped"] == 1
    assert "above node 2's declared maximum 200" in caplog.text
    assert "node 7 is not a declared site" in caplog.text
    # Without declarations the same two-site round is the liar's.
    taken, _ = aggregate(FedLowRank(rank=RANK), [train_reply(1, good, 100.0, np.float64), train_reply(2, lie, 1e9, np.float64)])
    assert np.linalg.norm(product(taken) - product(lie)) < 1e-5 * np.linalg.norm(product(lie))


def test_declared_sites_bound_the_evaluate_figures_too(caplog):
    from flwr.app import Message, MetricRecord, RecordDict

    from fedlowrank.strategies import FedLowRank
    from fedlowrank.strategies.testing import train_reply

    def reply(node, examples, auc):
        msg = train_reply(node, {}, examples)
        return Message(content=RecordDict({"metrics": MetricRecord({"num-examples": examples, "eval-auc": auc})}),
                       metadata=msg.metadata)

    strategy = FedLowRank(rank=RANK, node_max_weights={1: 50, 2: 50})
    with caplog.at_level(logging.WARNING):
        metrics = strategy.aggregate_evaluate(1, [reply(1, 10.0, 0.7), reply(2, 1e6, 0.1), reply(3, 10.0, 0.1)])
    assert metrics["eval-auc"] == pytest.approx(0.7) and metrics["eval-clients-dropped"] == 2
    assert "node 3 is not a declared site" in caplog.text


@pytest.mark.parametrize("declared,message", [
    ({}, "empty"), ({1: 0.0}, "must be a finite number > 0"), ({1: float("inf")}, "must be a finite number > 0"),
    ({1: "many"}, "must be a finite number > 0"), ({1: True}, "must be a finite number > 0"),
])
def test_a_malformed_declaration_is_refused_when_the_strategy_is_built(declared, message):
    with pytest.raises(ValueError, match=message):
        RoundConfig(rank=RANK, node_max_weights=declared)


def test_an_invented_evaluate_metric_is_left_out_and_every_metric_a_client_sends_is_kept(caplog):
    """The apps' servers keep the wire contract's evaluate metrics: what clients/app.py sends (the
    real fairness report's keys) passes, an invented key is left out with its node named."""
    from flwr.app import Message, MetricRecord, RecordDict

    from fedlowrank.fairness import group_fairness_report
    from fedlowrank.strategies import FedLowRank
    from fedlowrank.strategies.testing import train_reply
    from fedlowrank.wire import EVALUATE_METRICS

    rng = np.random.default_rng(0)
    y, groups = rng.integers(0, 2, 300), rng.integers(0, 2, 300)
    report = group_fairness_report(y, np.clip(0.4 * y + 0.6 * rng.random(300), 0, 1), groups)
    sent = {f"eval-{k}": float(v) for k, v in report.items() if k != "n"}  # as clients/app.py builds them
    sent.update({"eval-loss": 0.4, "num-examples": 300.0, "dp_epsilon": 1.5})

    def reply(node, **extra):
        return Message(content=RecordDict({"metrics": MetricRecord({**sent, **extra})}),
                       metadata=train_reply(node, {}, 300.0).metadata)

    strategy = FedLowRank(rank=RANK, evaluate_metric_keys=EVALUATE_METRICS)
    with caplog.at_level(logging.WARNING):
        metrics = strategy.aggregate_evaluate(1, [reply(1), reply(2), reply(3, **{"eval-backdoor": 0.99})])
    assert set(sent) - {"num-examples"} <= set(metrics.keys()) and "eval-backdoor" not in metrics
    assert "Ignoring metric 'eval-backdoor' from node 3" in caplog.text
    assert "node 1" not in caplog.text and "node 2" not in caplog.text
