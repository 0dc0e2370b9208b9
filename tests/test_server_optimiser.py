"""Server optimisation on the exact update, in the core round: momentum against a dense FedAvgM reference,
the unchanged-round invariant at mixed ranks, checkpoint and resume, bounded state; the tail weight."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedlowrank.aggregation.ranks import Factors
from fedlowrank.aggregation.round import RoundConfig, ServerRound
from fedlowrank.aggregation.state import LowRankState

D_OUT, D_IN, R = 14, 10, 8
RANKS = (2, 4, 8)
WEIGHTS = (30.0, 50.0, 20.0)


def product(arrays):
    return arrays["fc.lora_U"] @ np.diag(arrays["fc.lora_S"][0]) @ arrays["fc.lora_V"].T


def best(m, rank):
    u, s, vt = np.linalg.svd(m, full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vt[:rank]


def head_arrays(g, rank):
    """What a client of ``rank`` loads of the global product ``g``: its best rank-r part, balanced."""
    u, s, vt = np.linalg.svd(g, full_matrices=False)
    root = np.sqrt(s[:rank])
    return {"fc.lora_U": u[:, :rank] * root, "fc.lora_S": np.ones((1, rank)), "fc.lora_V": vt[:rank].T * root}


def client_reply(g, rank, rng, scale):
    """The client's head plus a change of its own rank (``scale`` 0: it sends the head back)."""
    head = head_arrays(g, rank)
    local = product(head) + scale * rng.normal(size=(D_OUT, rank)) @ rng.normal(size=(rank, D_IN))
    return head_arrays(local, rank)


def start_arrays(seed=0):
    rng = np.random.default_rng(seed)
    return {"fc.lora_U": rng.normal(size=(D_OUT, R)), "fc.lora_S": np.ones((1, R)), "fc.lora_V": rng.normal(size=(D_IN, R))}


def round_replies(g, server_round, scale, seed=1):
    """Round ``server_round``'s replies to the global product ``g`` (drawn per round: a resumed run draws the same)."""
    rng = np.random.default_rng([seed, server_round])
    return [client_reply(g, rank, rng, scale) for rank in RANKS]


def run(config, rounds, scale, state=None, arrays=None, first=1):
    state = state or LowRankState()
    arrays = arrays or start_arrays()
    for server_round in range(first, first + rounds):
        rnd = ServerRound(config, state, arrays, server_round)
        for reply, weight in zip(round_replies(product(arrays), server_round, scale), WEIGHTS):
            rnd.add(reply, weight)
        arrays = rnd.finish().arrays
    return arrays, state


@pytest.mark.parametrize("dense_above", [None, 10**6])  # 14 x 10 is narrow: dense; and kept factored
def test_momentum_is_fedavgm_on_the_exact_update(dense_above):
    """Against a dense reference: v <- b v + (M - G), G <- best_R(G + lr v), M the completed mean."""
    beta, lr, rounds = 0.6, 0.7, 5
    config = RoundConfig(rank=R, momentum=beta, server_learning_rate=lr, align=False, dense_above=dense_above)
    got, _ = run(config, rounds, scale=0.3)
    g, v = product(start_arrays()), np.zeros((D_OUT, D_IN))
    shares = np.array(WEIGHTS) / sum(WEIGHTS)
    for server_round in range(1, rounds + 1):
        # Each client's product, completed with the part of g its rank could not hold.
        replies = round_replies(g, server_round, 0.3)
        mean = sum(w * (product(c) + g - best(g, r)) for w, r, c in zip(shares, RANKS, replies))
        v = beta * v + (mean - g)
        g = best(g + lr * v, R)
    assert np.linalg.norm(product(got) - g) / np.linalg.norm(g) < 1e-9


@pytest.mark.parametrize("dense_above", [None, 10**6])
def test_a_round_where_nobody_changes_anything_leaves_the_global_unchanged(dense_above):
    start = start_arrays()
    config = RoundConfig(rank=R, momentum=0.9, server_learning_rate=0.5, dense_above=dense_above)
    arrays, state = run(config, 10, scale=0.0)
    assert np.linalg.norm(product(arrays) - product(start)) / np.linalg.norm(product(start)) < 1e-9
    velocity = state.momentum["fc"]
    dense = (velocity.u * velocity.s) @ velocity.v.T if isinstance(velocity, Factors) else velocity
    assert float(torch.linalg.norm(dense)) < 1e-9 * np.linalg.norm(product(start))


def test_momentum_survives_a_checkpoint_bit_for_bit():
    config = RoundConfig(rank=R, momentum=0.9)
    straight, _ = run(config, 6, scale=0.2)
    half, state = run(config, 3, scale=0.2)
    assert state.momentum  # there is a velocity to lose
    restored = LowRankState()
    restored.load_state_dict({k: np.array(v) for k, v in state.state_dict().items()})
    resumed, _ = run(config, 3, scale=0.2, state=restored, arrays=half, first=4)
    assert all(np.array_equal(resumed[k], straight[k]) for k in straight)
    without, _ = run(config, 3, scale=0.2, state=LowRankState(), arrays=half, first=4)
    assert not np.allclose(product(without), product(straight))  # the velocity mattered


def test_momentum_memory_is_bounded_by_the_layer_over_200_rounds():
    config = RoundConfig(rank=R, momentum=0.9, server_learning_rate=0.5, dense_above=10**6)  # factored throughout
    state, arrays = LowRankState(), start_arrays()
    for server_round in range(1, 201):
        arrays, _ = run(config, 1, scale=0.05, state=state, arrays=arrays, first=server_round)
        velocity = state.momentum["fc"]
        size = sum(t.numel() for t in velocity) if isinstance(velocity, Factors) else velocity.numel()
        assert size <= (D_OUT + D_IN + 1) * min(D_OUT, D_IN), (server_round, size)
    assert np.all(np.isfinite(product(arrays)))


def oscillating_replies(g, server_round, seed=3):
    """Clients that all pull towards +T in odd rounds and -T in even ones: each change opposes the last."""
    rng = np.random.default_rng([seed, server_round])
    sign = 1.0 if server_round % 2 else -1.0
    target = np.random.default_rng(seed).normal(size=(D_OUT, 3)) @ np.random.default_rng(seed + 1).normal(size=(3, D_IN))
    replies = []
    for rank in RANKS:
        head = head_arrays(g, rank)
        replies.append(head_arrays(product(head) + sign * 0.2 * target + 0.01 * rng.normal(size=(D_OUT, D_IN)), rank))
    return replies


@pytest.mark.parametrize("dense_above", [None, 10**6])
@pytest.mark.parametrize("replies_of", [lambda g, rnd: round_replies(g, rnd, 0.3), oscillating_replies], ids=["random", "oscillating"])
def test_step_decay_is_kestens_rule_with_a_restart_against_a_dense_reference(dense_above, replies_of):
    """v restarts and the step shrinks by the decay whenever <M - G, v> < 0; otherwise FedAvgM."""
    beta, lr, decay, rounds = 0.6, 0.8, 0.5, 6
    config = RoundConfig(rank=R, momentum=beta, server_learning_rate=lr, step_decay=decay, align=False, dense_above=dense_above)
    state, arrays, restarts = LowRankState(), start_arrays(), 0
    for server_round in range(1, rounds + 1):
        rnd = ServerRound(config, state, arrays, server_round)
        for reply, weight in zip(replies_of(product(arrays), server_round), WEIGHTS):
            rnd.add(reply, weight)
        result = rnd.finish()
        arrays, restarts = result.arrays, restarts + int(result.metrics.get("agg-momentum-restart", 0))
    g, v, step, expected = product(start_arrays()), None, lr, 0
    shares = np.array(WEIGHTS) / sum(WEIGHTS)
    for server_round in range(1, rounds + 1):
        replies = replies_of(g, server_round)
        change = sum(w * (product(c) + g - best(g, r)) for w, r, c in zip(shares, RANKS, replies)) - g
        if v is not None and np.sum(change * v) < 0:
            v, step, expected = None, step * decay, expected + 1
        v = change if v is None else beta * v + change
        g = best(g + step * v, R)
    assert restarts == expected
    if replies_of is oscillating_replies:
        assert expected >= 3
    assert state.step_scale == decay**expected
    assert np.linalg.norm(product(arrays) - g) / np.linalg.norm(g) < 1e-9


def test_step_decay_survives_a_checkpoint_and_leaves_an_unchanged_round_unchanged():
    config = RoundConfig(rank=R, momentum=0.5, step_decay=0.5)
    arrays, state = run(config, 10, scale=0.0)
    assert np.linalg.norm(product(arrays) - product(start_arrays())) < 1e-9 * np.linalg.norm(product(start_arrays()))
    state.step_scale = 0.25
    restored = LowRankState()
    restored.load_state_dict(state.state_dict())
    assert restored.step_scale == 0.25
    with pytest.raises(ValueError, match="momentum > 0"):
        RoundConfig(step_decay=0.5)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        RoundConfig(momentum=0.5, step_decay=0.0)


def test_momentum_is_refused_where_it_has_no_exact_update():
    with pytest.raises(ValueError, match="exact G = 1 rule"):
        RoundConfig(rule="fedit", momentum=0.9)
    with pytest.raises(ValueError, match="fold"):
        RoundConfig(rule="exact", residual="fold", momentum=0.9)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        RoundConfig(momentum=1.0)


@pytest.mark.parametrize("tail_weight", [0.0, 0.5, 1.0])
def test_tail_weight_decays_what_lower_rank_clients_could_not_hold(tail_weight):
    """The new global is best_R(sum_k w_k (P_k + tail_weight T_k)), T_k = G - H_k (dense reference)."""
    start = start_arrays()
    config = RoundConfig(rank=R, tail_weight=tail_weight, align=False)
    got, _ = run(config, 1, scale=0.3, arrays=start)
    g, shares = product(start), np.array(WEIGHTS) / sum(WEIGHTS)
    replies = round_replies(g, 1, 0.3)
    want = best(sum(w * (product(c) + tail_weight * (g - best(g, r))) for w, r, c in zip(shares, RANKS, replies)), R)
    assert np.linalg.norm(product(got) - want) / np.linalg.norm(want) < 1e-9
    if tail_weight < 1:  # what the rank-2 and rank-4 clients could not hold shrinks
        assert np.linalg.norm(product(got)) < np.linalg.norm(best(sum(w * (product(c) + g - best(g, r))
                                                                      for w, r, c in zip(shares, RANKS, replies)), R))


def flower_adaptive_reference(kind, lr, betas, tau, rounds, scale):
    """Flower's FedAdam / FedYogi formulas (flwr.serverapp.strategy) on the dense product, then best_R."""
    (b1, b2), g = betas, product(start_arrays())
    m, v = np.zeros((D_OUT, D_IN)), np.zeros((D_OUT, D_IN))
    shares = np.array(WEIGHTS) / sum(WEIGHTS)
    for t in range(1, rounds + 1):
        replies = round_replies(g, t, scale)
        delta = sum(w * (product(c) + g - best(g, r)) for w, r, c in zip(shares, RANKS, replies)) - g
        m = b1 * m + (1 - b1) * delta
        if kind == "adam":
            v = b2 * v + (1 - b2) * delta**2
            eta = lr * np.sqrt(1 - b2**t) / (1 - b1**t)
        else:
            v = v - (1 - b2) * delta**2 * np.sign(v - delta**2)
            eta = lr
        g = best(g + eta * m / (np.sqrt(v) + tau), R)
    return g


@pytest.mark.parametrize("dense_above", [None, 10**6])
@pytest.mark.parametrize("kind", ["adam", "yogi"])
def test_the_adaptive_server_step_is_flowers_fedadam_and_fedyogi_on_the_exact_update(kind, dense_above):
    lr, betas, tau, rounds = 0.05, (0.8, 0.95), 1e-2, 5
    config = RoundConfig(rank=R, server_optimizer=kind, server_learning_rate=lr, server_betas=betas, server_tau=tau,
                         align=False, dense_above=dense_above)
    got, state = run(config, rounds, scale=0.3)
    g = flower_adaptive_reference(kind, lr, betas, tau, rounds, 0.3)
    assert np.linalg.norm(product(got) - g) / np.linalg.norm(g) < 1e-9
    assert state.optimizer_steps == rounds and state.moments["fc"].shape == (2, D_OUT, D_IN)  # bounded by the layer


@pytest.mark.parametrize("kind", ["adam", "yogi"])
def test_an_adaptive_step_leaves_an_unchanged_round_unchanged_and_survives_a_checkpoint(kind):
    start = start_arrays()
    config = RoundConfig(rank=R, server_optimizer=kind, server_learning_rate=0.1)
    unchanged, _ = run(config, 5, scale=0.0)
    assert np.linalg.norm(product(unchanged) - product(start)) / np.linalg.norm(product(start)) < 1e-9
    straight, _ = run(config, 6, scale=0.2)
    half, state = run(config, 3, scale=0.2)
    restored = LowRankState()
    restored.load_state_dict({k: np.array(v) for k, v in state.state_dict().items()})
    resumed, _ = run(config, 3, scale=0.2, state=restored, arrays=half, first=4)
    assert all(np.array_equal(resumed[k], straight[k]) for k in straight)
    fresh, _ = run(config, 3, scale=0.2, state=LowRankState(), arrays=half, first=4)
    assert not np.allclose(product(fresh), product(straight))  # the moments mattered


def test_an_adaptive_step_is_refused_where_it_cannot_act():
    for bad in (dict(server_optimizer="sgd"), dict(server_optimizer="adam", momentum=0.5),
                dict(server_optimizer="adam", rule="fedit"), dict(server_optimizer="adam", server_betas=(1.0, 0.9)),
                dict(server_optimizer="adam", server_tau=0.0), dict(server_optimizer="adam", residual="fold")):
        with pytest.raises(ValueError):
            RoundConfig(rank=R, **bad)
