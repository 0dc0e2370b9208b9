"""Secure aggregation: SecAgg+ sums over Flower's primitives (dropouts, clipping, what the server holds) and
exact low-rank aggregation from two such sums, against the plain exact round and dense references."""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch

from fedlowrank.aggregation.round import RoundConfig, ServerRound
from fedlowrank.aggregation.state import LowRankState
from fedlowrank.aggregation.sketched import CORANGE, LABELS, RANGE, add_to_round, bases_from_range, corange_contribution, plan_round, range_contribution
from fedlowrank.secure.secagg import (
    SecureSetup,
    SecureSumError,
    quantisation_bits,
    quantise,
)
from fedlowrank.secure.simulate import InProcessSecureSums
from fedlowrank.aggregation.sketch import corange_sketch, range_basis, range_sketch, recover, sketch_matrix

from test_server_optimiser import D_IN, D_OUT, R, best, client_reply, head_arrays, product, start_arrays


def Federation(nodes, share_num=None, threshold=None, labels=("a",), drop=None):
    return InProcessSecureSums(list(nodes), tuple(labels), share_num, threshold, drop)


def random_vectors(nodes, shapes, seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    return {n: [scale * rng.normal(size=s) for s in shapes] for n in nodes}


# -- secure sums ------------------------------------------------------------------------------------------
def test_secure_sum_equals_the_plain_sum_to_quantisation_error():
    nodes = [11, 4, 27, 8, 15, 3]
    shapes = [(5, 3), (7,)]
    vectors = random_vectors(nodes, shapes)
    fed = Federation(nodes)
    summed, total, survivors = fed.secure_sum("a", vectors, [10.0, 10.0])
    assert survivors == sorted(nodes) and summed.clipped == 0
    step = 10.0 / 2**summed.bits
    for got, want in zip(total, [sum(vectors[n][i] for n in nodes) for i in range(2)]):
        # Each value within half a step, plus float64's own rounding of the sum.
        assert np.max(np.abs(got - want)) <= len(nodes) * step / 2 + 4 * np.finfo(float).eps * np.max(np.abs(want))
    # Small values keep their own precision (signed integers, no offset by the bound): 1e-6 summed under a bound of 1e6.
    tiny = {n: [np.full(3, 1e-6 * (i + 1))] for i, n in enumerate(nodes)}
    summed, small, _ = Federation(nodes).secure_sum("a", tiny, [1e6])
    error = np.max(np.abs(small[0] - 1e-6 * sum(range(1, len(nodes) + 1))))
    offset_resolution = 2e6 * 2.0**-53  # what x + bound in float64 could resolve
    assert error <= len(nodes) * 1e6 / 2 ** (summed.bits + 1) < offset_resolution / 10
    # Every masked vector alone is uniform noise: none is near its client's quantised values.
    q, _ = quantise(vectors[4], [10.0, 10.0], summed.bits)
    again = Federation(nodes)
    masked, _ = again.clients[4].mask("a", vectors[4], [10.0, 10.0], summed.bits)
    assert np.mean(np.abs(masked[0].astype(np.float64) - q[0].astype(np.float64)) > 2**40) > 0.9


@pytest.mark.parametrize("stage", ["shares", "a:mask", "a:unmask"])
def test_dropouts_still_give_the_sum_of_those_who_finished(stage):
    nodes = list(range(1, 8))
    vectors = random_vectors(nodes, [(4, 4)], seed=3)
    fed = Federation(nodes, share_num=5, threshold=3, drop={2: stage, 6: stage})
    _, total, survivors = fed.secure_sum("a", vectors, [10.0])
    # Dropped after masking but before unmasking: its vector is in the sum (its masks removed with others' shares).
    expected = sorted(nodes) if stage == "a:unmask" else [1, 3, 4, 5, 7]
    assert survivors == expected
    assert np.allclose(total[0], sum(vectors[n][0] for n in expected), atol=1e-9)


def test_too_many_dropouts_fail_by_name():
    nodes = list(range(1, 6))
    vectors = random_vectors(nodes, [(3,)])
    fed = Federation(nodes, share_num=5, threshold=4, drop={1: "a:mask", 2: "a:mask"})
    with pytest.raises(SecureSumError, match="survivors, fewer than the threshold 4"):
        fed.secure_sum("a", vectors, [10.0])


def test_a_client_never_reveals_both_shares_of_one_node():
    fed = Federation([1, 2, 3, 4], labels=("a",))
    fed.clients[1].unmask("a", [1, 2, 3], [4])
    with pytest.raises(SecureSumError, match="both kinds of share of node 4"):
        fed.clients[1].unmask("a", [1, 2, 3, 4], [])


def test_a_client_dropping_between_two_sums_abandons_the_round_before_anything_of_it_is_revealed():
    """Node 3 finishes sum 'a' and drops before 'b': the difference of the two sums would be its sketch, so the
    server does not ask for 'b''s shares and every client refuses to give node 3's pairwise secret of 'b'."""
    nodes = [1, 2, 3, 4, 5]
    vectors = random_vectors(nodes, [(6,)], seed=5)
    fed = Federation(nodes, threshold=3, labels=("a", "b"), drop={3: "b:mask"})
    fed.secure_sum("a", vectors, [10.0])
    with pytest.raises(SecureSumError, match=r"node\(s\) \[3\] finished an earlier sum"):
        fed.secure_sum("b", vectors, [10.0])
    for n in (1, 2, 4, 5):  # a server that asks anyway gets nothing
        with pytest.raises(SecureSumError, match=r"nodes \[3\] finished an earlier sum"):
            fed.clients[n].unmask("b", [1, 2, 4, 5], [3])
    # Each sum has its own pairwise key: even node 3's secret of 'b' would not unmask its vector of 'a'.
    assert fed.clients[3].pair_secret["b"] != fed.clients[3].pair_secret["a"]


def test_values_beyond_the_bound_are_clipped_and_counted_never_wrapped():
    nodes = [1, 2, 3]
    vectors = {1: [np.array([5.0, 1e7, -3e6])], 2: [np.array([1.0, 1.0, 1.0])], 3: [np.array([0.0, -2.0, 2.0])]}
    fed = Federation(nodes)
    summed, total, _ = fed.secure_sum("a", vectors, [1e6])
    assert summed.clipped == 2
    assert np.allclose(total[0], [6.0, 1e6 - 1.0, -1e6 + 3.0], atol=1e-6)
    # Even every client at the top of the range sums below 2^63: no wrap for any values.
    for clients in (1, 7, 1000, 100_000):
        assert clients * 2 ** quantisation_bits(clients) <= 2**62


def test_a_client_sending_values_beyond_the_bound_gets_the_sum_refused():
    """A masked vector cannot be checked alone: a client that skips the clipping shows in the sum, which is refused."""
    nodes = [1, 2, 3, 4]
    vectors = random_vectors(nodes, [(5,)])
    fed = Federation(nodes)
    summed = fed.setup.secure_sum("a", [1.0])
    for n in nodes:
        masked, _ = fed.clients[n].mask("a", vectors[n], [1.0], summed.bits)
        if n == 3:  # node 3 adds what no value within the bound quantises to
            masked[0] += np.uint64(2**62)  # 8 x the bound at 59 bits
        summed.add(n, masked, 0)
    survivors, dropped = summed.request()
    shares = {n: fed.clients[n].unmask("a", survivors, dropped) for n in survivors}
    with pytest.raises(SecureSumError, match="exceeds what 4 clients within"):
        summed.unmask(shares)


def test_setup_refuses_keys_or_shares_that_do_not_fit():
    setup = SecureSetup([1, 2, 3], ("a",), 3, 2)
    with pytest.raises(ValueError, match="was not sampled"):
        setup.add_keys(9, {"enc": b"x", "a": b"y"})
    with pytest.raises(ValueError, match="public keys must be"):
        setup.add_keys(1, {"enc": b"x"})
    with pytest.raises(ValueError, match="threshold"):
        SecureSetup([1, 2, 3], ("a",), 3, 4)


# -- the sketch --------------------------------------------------------------------------------------------
def random_factors(rng, rank, groups=1, d_out=D_OUT, d_in=D_IN):
    return rng.normal(size=(d_out, rank)), rng.uniform(0.5, 2.0, size=(groups, rank)), rng.normal(size=(d_in, rank))


def dense(u, s, v):
    return np.stack([(u * row) @ v.T for row in np.atleast_2d(s)])


def test_sketch_at_the_sum_of_ranks_recovers_the_weighted_sum_exactly():
    rng = np.random.default_rng(0)
    clients = [random_factors(rng, r) for r in (2, 3, 1)]
    weights = [0.5, 0.2, 0.3]
    want = sum(w * dense(*f) for w, f in zip(weights, clients))
    omega = sketch_matrix(7, "fc", D_IN, 6)
    y = sum(range_sketch(*f, omega, np.array([w])) for w, f in zip(weights, clients))
    q = range_basis(y, 6)
    z = sum(corange_sketch(*f, q, np.array([w])) for w, f in zip(weights, clients))
    got = recover(q, z, y)
    assert np.linalg.norm(dense(*(t.numpy() for t in got.factors)) - want) / np.linalg.norm(want) < 1e-12
    assert got.error < 1e-12


def test_a_narrow_sketch_reports_the_error_a_dense_reference_measures():
    rng = np.random.default_rng(1)
    d = 60
    clients = [random_factors(rng, 8, d_out=d, d_in=d) for _ in range(4)]
    want = sum(dense(*f) for f in clients)[0]
    estimates, actual = [], []
    for seed in range(20):
        omega = sketch_matrix(seed, "fc", d, 12, probes=16)
        y = sum(range_sketch(*f, omega, np.array([1.0])) for f in clients)
        q = range_basis(y, 12)
        z = sum(corange_sketch(*f, q, np.array([1.0])) for f in clients)
        got = recover(q, z, y)
        actual.append(np.linalg.norm(dense(*(t.numpy() for t in got.factors))[0] - want) / np.linalg.norm(want))
        estimates.append(got.error)
    assert min(actual) > 0.05  # rank 32 into width 12: a real error to report
    ratio = np.array(estimates) / np.array(actual)
    assert 0.8 < np.median(ratio) < 1.25 and np.all((ratio > 0.5) & (ratio < 2.0)), ratio


# -- a whole round: secure against plain --------------------------------------------------------------------
RANKS_MIXED = (2, 4, 8, 4)
WEIGHTS_MIXED = (30.0, 50.0, 20.0, 45.0)


def with_head(arrays):
    return {**arrays, "head.weight": np.arange(6.0).reshape(2, 3), "head.bias": np.zeros(2)}


def replies_for(arrays, scale, seed, ranks=RANKS_MIXED):
    rng = np.random.default_rng(seed)
    g = product(arrays)
    out = []
    for rank in ranks:
        reply = client_reply(g, rank, rng, scale)
        reply["head.weight"] = arrays["head.weight"] + scale * rng.normal(size=(2, 3))
        reply["head.bias"] = arrays["head.bias"] + scale * rng.normal(size=2)
        out.append(reply)
    return out


def secure_round(config, state, arrays, replies, weights, drop=None, width=None, server_round=1, ranks=RANKS_MIXED):
    nodes = [101 + i for i in range(len(replies))]
    plan = plan_round(arrays, ranks, seed=server_round, weight_bound=1000.0, width=width)
    fed = Federation(nodes, threshold=3, labels=LABELS, drop=drop)
    by_node = dict(zip(nodes, zip(replies, weights)))
    range_vectors = {n: range_contribution(plan, r, w)[0] for n, (r, w) in by_node.items()}
    _, range_sum, _ = fed.secure_sum(RANGE, range_vectors, plan.range_bounds())
    bases = bases_from_range(plan, range_sum)
    corange_vectors = {n: corange_contribution(plan, r, w, bases)[0] for n, (r, w) in by_node.items()}
    summed, corange_sum, survivors = fed.secure_sum(CORANGE, corange_vectors, plan.corange_bounds())
    rnd = ServerRound(config, state, arrays, server_round)
    metrics = add_to_round(rnd, plan, range_sum, bases, corange_sum, len(survivors))
    result = rnd.finish()
    return result, metrics, survivors, (fed, summed, rnd)


def plain_round(config, state, arrays, replies, weights, server_round=1):
    rnd = ServerRound(config, state, arrays, server_round)
    for reply, weight in zip(replies, weights):
        rnd.add(reply, weight)
    return rnd.finish()


def close(a, b, tol=1e-6):
    for key in ("head.weight", "head.bias"):
        assert np.allclose(a[key], b[key], atol=tol * (1 + np.abs(b[key]).max())), key
    assert np.linalg.norm(product(a) - product(b)) <= tol * np.linalg.norm(product(b))


@pytest.mark.parametrize("options", [{}, {"server_learning_rate": 0.5, "momentum": 0.5}, {"tail_weight": 0.5}])
def test_secure_round_equals_the_plain_exact_round_at_mixed_ranks(options):
    config = dict(rank=R, share_cap=None, align=False, **options)
    arrays = with_head(start_arrays())
    plain_state, secure_state = LowRankState(), LowRankState()
    plain_arrays = secure_arrays = arrays
    for server_round in (1, 2, 3):
        replies = replies_for(secure_arrays, 0.3, server_round)
        plain = plain_round(RoundConfig(**config), plain_state, plain_arrays, replies, WEIGHTS_MIXED, server_round)
        secure, metrics, _, _ = secure_round(RoundConfig(**config), secure_state, secure_arrays, replies, WEIGHTS_MIXED, server_round=server_round)
        close(secure.arrays, plain.arrays, 1e-7)
        assert metrics["agg-sketch-error-rel"] < 1e-7
        assert secure.metrics["agg-clients-kept"] == len(replies)
        plain_arrays, secure_arrays = plain.arrays, secure.arrays


@pytest.mark.parametrize("step,kept", [("range:mask", [0, 2, 3]), ("corange:unmask", [0, 1, 2, 3])])
def test_dropouts_within_a_sum_give_the_plain_round_of_those_whose_vectors_are_in(step, kept):
    """Dropping before the first masked vector: out of both sums; after the last one: in both (its masks removed
    with the others' shares). Either way the round equals the plain round over those sites."""
    arrays = with_head(start_arrays())
    replies = replies_for(arrays, 0.3, 4)
    config = dict(rank=R, share_cap=None, align=False)
    secure, metrics, survivors, _ = secure_round(RoundConfig(**config), LowRankState(), arrays, replies, WEIGHTS_MIXED,
                                                 drop={102: step})
    assert survivors == [101 + i for i in kept]
    plain = plain_round(RoundConfig(**config), LowRankState(), arrays, [replies[i] for i in kept], [WEIGHTS_MIXED[i] for i in kept])
    close(secure.arrays, plain.arrays, 1e-7)
    assert metrics["agg-sketch-error-rel"] < 1e-6


def test_a_site_dropping_between_the_two_sums_fails_the_round():
    arrays = with_head(start_arrays())
    replies = replies_for(arrays, 0.3, 4)
    with pytest.raises(SecureSumError, match="finished an earlier sum"):
        secure_round(RoundConfig(rank=R, share_cap=None), LowRankState(), arrays, replies, WEIGHTS_MIXED, drop={102: "corange:mask"})


def test_a_round_where_nobody_changes_anything_leaves_the_global_unchanged():
    arrays = with_head(start_arrays())
    g = product(arrays)
    replies = [{**head_arrays(g, r), "head.weight": arrays["head.weight"], "head.bias": arrays["head.bias"]} for r in RANKS_MIXED]
    secure, _, _, _ = secure_round(RoundConfig(rank=R, share_cap=None), LowRankState(), arrays, replies, WEIGHTS_MIXED)
    close(secure.arrays, arrays, 1e-7)


def test_a_narrow_secure_sketch_reports_its_error_against_the_plain_round():
    arrays = with_head(start_arrays())
    replies = replies_for(arrays, 1.0, 5)
    config = dict(rank=R, share_cap=None, align=False)
    secure, metrics, _, _ = secure_round(RoundConfig(**config), LowRankState(), arrays, replies, WEIGHTS_MIXED, width=6)
    assert 0.01 < metrics["agg-sketch-error-rel"] < 1.0


def test_the_server_holds_only_sums_after_a_secure_round():
    """No array reachable from the server's objects equals one client's contribution (or its quantised form)."""
    arrays = with_head(start_arrays())
    replies = replies_for(arrays, 0.3, 6)
    config = RoundConfig(rank=R, share_cap=None, align=False)
    _, _, _, server_objects = secure_round(config, LowRankState(), arrays, replies, WEIGHTS_MIXED, drop={103: "corange:unmask"})
    fed, summed, rnd = server_objects
    plan = plan_round(arrays, RANKS_MIXED, seed=1, weight_bound=1000.0)
    # What a client sent that differs from what the server sent it (an echoed S of ones is public).
    singles = [np.asarray(reply[k], dtype=np.float64).ravel() for reply in replies for k in reply
               if reply[k].shape != np.shape(arrays[k]) or not np.allclose(reply[k], arrays[k])]
    for reply, weight in zip(replies, WEIGHTS_MIXED):
        singles += [v.ravel() for v in range_contribution(plan, reply, weight)[0]]
    held = [a for a in reachable_arrays((fed.setup, summed, rnd)) if a.size > 1]
    assert summed.total is None  # the masked total is dropped once unmasked
    for array in held:
        flat = np.asarray(array, dtype=np.float64).ravel()
        for single in singles:
            if single.size == flat.size and np.any(single != 0):
                assert not np.allclose(flat, single, rtol=1e-6, atol=1e-9), "the server holds one client's values"


def reachable_arrays(roots):
    seen, out, stack = set(), [], list(roots)
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, np.ndarray):
            out.append(obj)
        elif isinstance(obj, torch.Tensor):
            out.append(obj.detach().numpy())
        elif isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set)):
            stack.extend(obj)
        elif hasattr(obj, "__dict__") and not isinstance(obj, type) and type(obj).__module__.startswith(("fedlowrank", "test_")):
            stack.extend(vars(obj).values())
    gc.collect()
    return out


def test_grouped_secure_round_equals_the_plain_fairlora_round():
    rng = np.random.default_rng(8)
    groups = 3
    arrays = {"fc.lora_U": rng.normal(size=(D_OUT, R)), "fc.lora_S": rng.uniform(0.5, 1.5, size=(groups, R)),
              "fc.lora_V": rng.normal(size=(D_IN, R)), "head.bias": np.zeros(2)}
    replies, counts = [], []
    for _ in range(4):
        replies.append({"fc.lora_U": arrays["fc.lora_U"] + 0.2 * rng.normal(size=(D_OUT, R)),
                        "fc.lora_S": arrays["fc.lora_S"] + 0.2 * rng.normal(size=(groups, R)),
                        "fc.lora_V": arrays["fc.lora_V"] + 0.2 * rng.normal(size=(D_IN, R)), "head.bias": rng.normal(size=2)})
        counts.append(rng.integers(5, 40, size=groups).astype(float))
    weights = [float(c.sum()) for c in counts]
    config = dict(rule="fairlora-exact", rank=R, share_cap=None, align=False)
    rnd = ServerRound(RoundConfig(**config), LowRankState(), arrays, 1)
    for reply, weight, c in zip(replies, weights, counts):
        rnd.add(reply, weight, c)
    plain = rnd.finish()
    nodes = [1, 2, 3, 4]
    plan = plan_round(arrays, [R] * 4, seed=1, weight_bound=1000.0)
    fed = Federation(nodes, threshold=3, labels=LABELS)
    _, range_sum, _ = fed.secure_sum(RANGE, {n: range_contribution(plan, r, w, c)[0] for n, r, w, c in zip(nodes, replies, weights, counts)}, plan.range_bounds())
    bases = bases_from_range(plan, range_sum)
    _, corange_sum, _ = fed.secure_sum(CORANGE, {n: corange_contribution(plan, r, w, bases, c)[0] for n, r, w, c in zip(nodes, replies, weights, counts)}, plan.corange_bounds())
    rnd = ServerRound(RoundConfig(**config), LowRankState(), arrays, 1)
    add_to_round(rnd, plan, range_sum, bases, corange_sum, 4)
    secure = rnd.finish()
    for g in range(groups):
        def prod(a):
            return (a["fc.lora_U"] * a["fc.lora_S"][g]) @ a["fc.lora_V"].T
        assert np.linalg.norm(prod(secure.arrays) - prod(plain.arrays)) <= 1e-7 * np.linalg.norm(prod(plain.arrays))
    assert np.allclose(secure.arrays["head.bias"], plain.arrays["head.bias"], atol=1e-8)


def test_the_plan_declares_the_shapes_of_what_clients_send():
    arrays = with_head(start_arrays())
    plan = plan_round(arrays, RANKS_MIXED, seed=1, weight_bound=1000.0)
    reply = replies_for(arrays, 0.3, 3)[1]
    ranged = range_contribution(plan, reply, 50.0)[0]
    bases = bases_from_range(plan, ranged)
    coranged = corange_contribution(plan, reply, 50.0, bases, extras={})[0]
    assert [v.shape for v in ranged] == plan.range_shapes() and [v.shape for v in coranged] == plan.corange_shapes()
    assert len(plan.range_bounds()) == len(ranged) and len(plan.corange_bounds()) == len(coranged)


def test_a_secure_sum_refuses_rules_that_average_factors_and_per_reply_bounds():
    arrays = with_head(start_arrays())
    replies = replies_for(arrays, 0.3, 7)
    with pytest.raises(ValueError, match="share_cap=None, node_max_weights=None and robust=None"):
        secure_round(RoundConfig(rank=R), LowRankState(), arrays, replies, WEIGHTS_MIXED)
    with pytest.raises(ValueError, match="needs each reply's factors"):
        secure_round(RoundConfig(rule="fedit", rank=R, share_cap=None), LowRankState(), arrays, replies, WEIGHTS_MIXED)


def test_best_rank_reference_is_what_the_plain_round_gives():
    """The plain round itself is the exact rule: its product is best_R of the completed mean (reference for the above)."""
    arrays = with_head(start_arrays())
    replies = replies_for(arrays, 0.3, 9)
    plain = plain_round(RoundConfig(rank=R, share_cap=None), LowRankState(), arrays, replies, WEIGHTS_MIXED)
    g = product(arrays)
    shares = np.array(WEIGHTS_MIXED) / sum(WEIGHTS_MIXED)
    mean = sum(w * (product(c) + g - best(g, r)) for w, r, c in zip(shares, RANKS_MIXED, replies))
    assert np.linalg.norm(product(plain.arrays) - best(mean, R)) <= 1e-9 * np.linalg.norm(mean)
