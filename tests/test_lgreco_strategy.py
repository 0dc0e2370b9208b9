"""LGreCo wrapping Flower's FedAvg, driven with real Flower Message objects."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord
from flwr.serverapp.strategy import FedAvg

from fedlowrank.compression import (
    CANDIDATES_KEY,
    ErrorFeedback,
    encode_update,
    feedback_errors,
    get_codec,
    payload_nbytes,
    read_tables,
    relative_errors,
    settings_from_config,
    size_table,
)
from fedlowrank.strategies.lgreco import LGreCo
from fedlowrank.strategies.testing import NodeGrid, train_reply

SHAPES = {"fc.lora_U": (32, 4), "fc.lora_V": (24, 4), "head.weight": (20, 16), "head.bias": (20,)}
CANDS = ["none", "powersgd:1", "powersgd:4", "topk:0.1", "qsgd:8"]


GRID = NodeGrid([11, 12, 13])




def _global(seed=0):
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}


def _locals(glob, n=3, seed=1):
    rng = np.random.default_rng(seed)
    return [{k: (v + 0.1 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in glob.items()} for _ in range(n)]


def _reply(node, arrays, num_examples):
    # Encoded updates are uint8/float16: keep every array's dtype.
    return train_reply(node, arrays, num_examples, dtype=None, loss=float(node))


def _encoded(glob, local, settings, candidates=None, ef=None):
    update = {k: local[k] - glob[k] for k in glob}
    payload, tables = encode_update(update, settings, ef or ErrorFeedback(), candidates=candidates)
    return {**payload, **tables}


def _strategy(**kw):
    strat = LGreCo(FedAvg(), candidates=CANDS, default="powersgd:4", **kw)
    strat.current_arrays = ArrayRecord({k: Array(v) for k, v in _global().items()})
    strat.settings = {k: strat.default for k in SHAPES}
    return strat


def test_configure_train_sends_per_tensor_settings(task_identity):
    strat = LGreCo(FedAvg(), candidates=CANDS, warmup_rounds=1, reallocate_every=2)
    arrays = ArrayRecord({k: Array(v) for k, v in _global().items()})
    config = ConfigRecord({"lr": 0.1})
    msgs = list(strat.configure_train(1, arrays, config, GRID))
    assert len(msgs) == 3
    cfg = msgs[0].content["config"]
    settings, cands = settings_from_config(cfg)
    assert settings == {k: "powersgd:4" for k in SHAPES} and cands == CANDS
    assert cfg["lr"] == 0.1 and cfg["server-round"] == 1
    # Round 2 feeds no allocation: no tables asked for, even with a reused config.
    cfg2 = list(strat.configure_train(2, arrays, config, GRID))[0].content["config"]
    assert CANDIDATES_KEY not in cfg2 and strat.tables_wanted(3)


def test_none_codec_aggregates_like_fedavg_on_uncompressed_updates():
    glob = _global()
    locs = _locals(glob)
    strat = _strategy()
    strat.settings = {k: "none" for k in SHAPES}
    replies = [_reply(n, _encoded(glob, loc, strat.settings), 10 * n) for n, loc in zip([1, 2, 3], locs)]
    plain = [_reply(n, loc, 10 * n) for n, loc in zip([1, 2, 3], locs)]
    got, metrics = strat.aggregate_train(1, replies)
    want, want_metrics = FedAvg().aggregate_train(1, plain)
    assert list(got.keys()) == list(want.keys())
    for k in want.keys():
        np.testing.assert_allclose(got[k].numpy(), want[k].numpy(), rtol=0, atol=1e-6)
    assert metrics["loss"] == pytest.approx(want_metrics["loss"])
    assert metrics["lgreco-dropped"] == 0


def test_bytes_counted_are_the_arrays_nbytes():
    glob = _global()
    strat = _strategy(warmup_rounds=1)
    settings = {"fc.lora_U": "none", "fc.lora_V": "qsgd:8", "head.weight": "powersgd:4", "head.bias": "topk:0.1"}
    strat.settings = dict(settings)  # what configure_train would have sent
    arrays = [_encoded(glob, loc, settings, candidates=CANDS) for loc in _locals(glob)]
    _, metrics = strat.aggregate_train(1, [_reply(n, a, 5) for n, a in zip([1, 2, 3], arrays)])
    assert metrics["lgreco-dropped"] == 0
    expected = [payload_nbytes(a) for a in arrays]
    assert metrics["lgreco-bytes-per-client"] == expected
    assert metrics["lgreco-bytes"] == sum(expected)
    assert metrics["lgreco-node-ids"] == [1, 2, 3]
    assert metrics["lgreco-raw-bytes"] == 3 * 4 * sum(int(np.prod(s)) for s in SHAPES.values())
    assert metrics["lgreco-serialized-bytes"] > metrics["lgreco-bytes"]  # npy headers travel too
    assert strat.bytes_history[1] == dict(zip([1, 2, 3], expected))


CORRUPT_SETTINGS = {"fc.lora_U": "none", "fc.lora_V": "none", "head.weight": "powersgd:4", "head.bias": "topk:0.1"}


def _offset(name):
    """Where ``name``'s fields start in the payload stream (tensors in sorted order)."""
    before = [n for n in sorted(SHAPES) if n < name]
    return sum(get_codec(CORRUPT_SETTINGS[n]).encoded_size(SHAPES[n]) for n in before)


def _set_bytes(a, offset, values):
    payload = a["lgreco-payload"].copy()
    payload[offset : offset + len(values)] = values
    a["lgreco-payload"] = payload


def _spec_lines(a, edit):
    lines = a["lgreco-spec"].tobytes().split(b"\n")
    a["lgreco-spec"] = np.frombuffer(b"\n".join(edit(lines)), dtype=np.uint8).copy()


@pytest.mark.parametrize(
    "corrupt",
    [
        # head.bias (20 entries, topk:0.1): two uint8 indices, then two float32 values.
        lambda a: _set_bytes(a, _offset("head.bias"), [250, 251]),
        lambda a: a.update({"lgreco-payload": a["lgreco-payload"][:-8]}),
        lambda a: a.pop("lgreco-spec"),
        # head.weight declared at another rank than it was encoded with.
        lambda a: _spec_lines(a, lambda ls: [*ls[:3], b"powersgd:2|20,16|"]),
        lambda a: _spec_lines(a, lambda ls: ls[:3]),
    ],
)
def test_corrupt_reply_is_dropped_and_the_round_goes_on(corrupt):
    glob = _global()
    locs = _locals(glob)
    strat, reference = _strategy(), _strategy()
    strat.settings = dict(CORRUPT_SETTINGS)
    reference.settings = dict(CORRUPT_SETTINGS)
    arrays = [_encoded(glob, loc, CORRUPT_SETTINGS) for loc in locs]
    corrupt(arrays[1])
    good = [_encoded(glob, loc, CORRUPT_SETTINGS) for loc in locs]
    got, metrics = strat.aggregate_train(1, [_reply(n, a, 10) for n, a in zip([1, 2, 3], arrays)])
    want, _ = reference.aggregate_train(1, [_reply(n, good[i], 10) for i, n in [(0, 1), (2, 3)]])
    for k in want.keys():
        np.testing.assert_allclose(got[k].numpy(), want[k].numpy(), atol=1e-6)
    assert metrics["lgreco-dropped"] == 1
    assert len(metrics["lgreco-bytes-per-client"]) == 3  # the dropped reply's bytes travelled too


def test_error_reply_and_all_dropped_do_not_crash():
    strat = _strategy()
    bad = _reply(1, {"junk": np.zeros(3, np.float32)}, 10)
    arrays, metrics = strat.aggregate_train(1, [bad])
    assert arrays is None and metrics["lgreco-dropped"] == 1


def test_reallocation_uses_the_tables_that_came_and_respects_the_budget():
    glob = _global()
    locs = _locals(glob)
    strat = _strategy(warmup_rounds=1, reallocate_every=1, alpha=1.0)
    settings = dict(strat.settings)
    with_tables = [_encoded(glob, loc, settings, candidates=CANDS) for loc in locs[:2]]
    without = _encoded(glob, locs[2], settings)  # a client that never sends tables
    replies = [_reply(1, with_tables[0], 10), _reply(2, with_tables[1], 10), _reply(3, without, 10)]
    strat.aggregate_train(1, replies)
    assert 1 in strat.allocation_history
    # The server budgets settled errors under error feedback, per client, and
    # computes the sizes from the global shapes.
    errors = np.mean([feedback_errors(*read_tables(t, len(SHAPES), len(CANDS))) for t in with_tables], axis=0)
    sizes = size_table(SHAPES, CANDS)
    assert sizes.sum() > 0 and "lgreco-sizes" not in with_tables[0]
    rows = sorted(SHAPES)
    chosen = np.array([CANDS.index(strat.settings[r]) for r in rows])
    default = CANDS.index("powersgd:4")
    assert errors[np.arange(len(rows)), chosen].sum() <= errors[:, default].sum()
    assert sizes[np.arange(len(rows)), chosen].sum() <= sizes[:, default].sum()


def test_no_tables_keeps_current_settings():
    glob = _global()
    strat = _strategy(warmup_rounds=1, reallocate_every=1)
    before = dict(strat.settings)
    strat.aggregate_train(1, [_reply(n, _encoded(glob, loc, before), 10) for n, loc in zip([1, 2], _locals(glob, 2))])
    assert strat.settings == before and strat.allocation_history == {}


def test_a_missed_allocation_asks_again_next_round():
    """No tables in an allocation round: the next round asks again instead of waiting a period."""
    glob = _global()
    strat = _strategy(warmup_rounds=1, reallocate_every=5)
    assert strat.tables_wanted(1) and not strat.tables_wanted(2)
    strat.aggregate_train(1, [_reply(1, _encoded(glob, _locals(glob, 1)[0], strat.settings), 10)])
    assert strat.tables_wanted(2) and 1 not in strat.allocation_history
    with_tables = _encoded(glob, _locals(glob, 1)[0], strat.settings, candidates=CANDS)
    strat.aggregate_train(2, [_reply(1, with_tables, 10)])
    assert 2 in strat.allocation_history and not strat.tables_wanted(3) and strat.tables_wanted(6)


@pytest.mark.parametrize(
    "bad",
    [
        lambda t: t.pop("lgreco-energy"),
        lambda t: t.update({"lgreco-errors": t["lgreco-errors"][:, :-1]}),
        lambda t: t.update({"lgreco-energy": np.full_like(t["lgreco-energy"], np.nan)}),
        lambda t: t.update({"lgreco-errors": -t["lgreco-errors"] - 1}),
    ],
)
def test_bad_tables_are_ignored_not_the_update(bad):
    glob = _global()
    strat = _strategy(warmup_rounds=1, reallocate_every=1)
    payload = _encoded(glob, _locals(glob, 1)[0], strat.settings, candidates=CANDS)
    bad(payload)
    _, metrics = strat.aggregate_train(1, [_reply(1, payload, 10)])
    assert metrics["lgreco-dropped"] == 0 and strat.allocation_history == {} and strat.tables_wanted(2)


def test_oneshot_error_model_budgets_the_measured_errors():
    glob = _global()
    strat = _strategy(warmup_rounds=1, reallocate_every=1, error_model="oneshot")
    tables = [_encoded(glob, loc, strat.settings, candidates=CANDS) for loc in _locals(glob, 2)]
    strat.aggregate_train(1, [_reply(n, t, 10) for n, t in zip([1, 2], tables)])
    errors = np.mean([read_tables(t, len(SHAPES), len(CANDS))[0] for t in tables], axis=0)
    chosen = np.array([CANDS.index(strat.settings[r]) for r in sorted(SHAPES)])
    default = CANDS.index("powersgd:4")
    assert errors[np.arange(len(SHAPES)), chosen].sum() <= errors[:, default].sum() * (1 + 1e-6)
    with pytest.raises(ValueError, match="error_model"):
        _strategy(error_model="guess")


def test_compressed_rounds_with_error_feedback_approach_fedavg():
    """Several rounds of the same local targets: with error feedback the compressed run catches up.

    Clients move 10% of the way to their targets per round. With 50% per
    round the same loop oscillated and diverged under topk:0.1 and
    powersgd:1 (the residual re-sends old update mass after the model has
    already moved: delayed feedback), so large local steps need care.
    """
    glob = _global()
    targets = _locals(glob, 2, seed=5)
    strat = LGreCo(FedAvg(), candidates=CANDS, default="topk:0.1", warmup_rounds=100)
    efs = [ErrorFeedback(seed=i) for i in range(2)]
    current = {k: v.copy() for k, v in glob.items()}
    want = {k: (targets[0][k] + targets[1][k]) / 2 for k in glob}
    for rnd in range(1, 61):
        strat.current_arrays = ArrayRecord({k: Array(v) for k, v in current.items()})
        strat.settings = {k: strat.default for k in SHAPES}
        # Each client moves 10% of the way to its target from the global model.
        replies = []
        for i, (tgt, ef) in enumerate(zip(targets, efs)):
            local = {k: current[k] + 0.1 * (tgt[k] - current[k]) for k in current}
            replies.append(_reply(i + 1, _encoded(current, local, strat.settings, ef=ef), 10))
        agg, _ = strat.aggregate_train(rnd, replies)
        current = {k: agg[k].numpy() for k in agg.keys()}
    gap = sum(np.sum((current[k] - want[k]) ** 2) for k in want)
    start = sum(np.sum((glob[k] - want[k]) ** 2) for k in want)
    assert gap < 0.05 * start


def test_constructor_validates():
    with pytest.raises(ValueError, match="default"):
        LGreCo(FedAvg(), candidates=["none", "topk:0.1"], default="powersgd:4")
    with pytest.raises(ValueError, match="distinct"):
        LGreCo(FedAvg(), candidates=["none", ("none", None)], default="none")
    with pytest.raises(ValueError, match="Unknown codec"):
        LGreCo(FedAvg(), candidates=["zip:1"], default="zip:1")
    with pytest.raises(ValueError, match="max_interval_factor"):
        LGreCo(FedAvg(), candidates=CANDS, max_interval_factor=0)


def test_wraps_fedlowrank_unchanged(task_identity):
    from fedlowrank.strategies.fedlowrank import FedLowRank

    rng = np.random.default_rng(0)
    glob = {
        "l.lora_U": rng.standard_normal((16, 4)).astype(np.float32),
        "l.lora_S": np.abs(rng.standard_normal((1, 4))).astype(np.float32),
        "l.lora_V": rng.standard_normal((12, 4)).astype(np.float32),
        "b": rng.standard_normal(5).astype(np.float32),
    }
    locs = _locals(glob, 3, seed=2)
    arrays = ArrayRecord({k: Array(v) for k, v in glob.items()})
    ref = FedLowRank()
    list(ref.configure_train(1, arrays, ConfigRecord(), GRID))
    want, _ = ref.aggregate_train(1, [_reply(n, loc, 10 * n) for n, loc in zip([1, 2, 3], locs)])
    strat = LGreCo(FedLowRank(), candidates=["none", "powersgd:2"], default="none")
    list(strat.configure_train(1, arrays, ConfigRecord(), GRID))
    replies = [_reply(n, _encoded(glob, loc, strat.settings), 10 * n) for n, loc in zip([1, 2, 3], locs)]
    got, _ = strat.aggregate_train(1, replies)
    for k in want.keys():
        np.testing.assert_allclose(got[k].numpy(), want[k].numpy(), atol=1e-6)


def _fixed_allocator(monkeypatch, picks):
    """Make the allocator return ``picks[i]`` (one candidate for every tensor) on its i-th call."""
    calls = iter(picks)

    def allocate(errors, sizes, budget, table_cost, num_bins):
        return np.full(errors.shape[0], CANDS.index(next(calls))), None

    monkeypatch.setattr("fedlowrank.compression.controller.allocate_or_uniform", allocate)


def _drive(strat, glob, rounds, silent=()):
    """Run configure_train/aggregate_train; return the rounds that asked for tables.

    Clients answer with tables exactly when the config asks for them, except
    the ``silent`` rounds, where no client sends any.
    """
    asked = []
    arrays = ArrayRecord({k: Array(v) for k, v in glob.items()})
    for rnd in rounds:
        cfg = list(strat.configure_train(rnd, arrays, ConfigRecord({}), GRID))[0].content["config"]
        settings, cands = settings_from_config(cfg)
        if cands:
            asked.append(rnd)
        send = cands if rnd not in silent else None
        replies = [_reply(n, _encoded(glob, loc, settings, candidates=send), 10) for n, loc in zip([11, 12], _locals(glob, 2))]
        strat.aggregate_train(rnd, replies)
    return asked


def test_unchanged_allocations_double_the_interval_up_to_the_cap(task_identity, monkeypatch):
    """Tables only on the schedule; the interval doubles while settings repeat, resets on a change."""
    # 1st allocation returns the default (unchanged: 2 -> 4), 2nd the same (4 -> 8, the
    # cap 4 x 2), 3rd the same (stays 8), 4th changes (back to 2), 5th the same (4).
    _fixed_allocator(monkeypatch, ["powersgd:4", "powersgd:4", "powersgd:4", "qsgd:8", "qsgd:8"])
    strat = LGreCo(FedAvg(), candidates=CANDS, default="powersgd:4", reallocate_every=2, max_interval_factor=4)
    asked = _drive(strat, _global(), range(1, 26))
    assert asked == [1, 5, 13, 21, 23]
    assert sorted(strat.allocation_history) == asked
    assert [strat.allocation_details[r]["changed"] for r in asked] == [False, False, False, True, False]
    assert strat.allocation_details[23]["next_allocation"] == 27 and strat.interval == 4


def test_max_interval_factor_one_keeps_the_fixed_schedule(task_identity, monkeypatch):
    _fixed_allocator(monkeypatch, ["powersgd:4"] * 5)
    strat = LGreCo(FedAvg(), candidates=CANDS, default="powersgd:4", reallocate_every=2, max_interval_factor=1)
    assert _drive(strat, _global(), range(1, 10)) == [1, 3, 5, 7, 9]


def test_silent_clients_delay_but_do_not_stall_a_backed_off_allocation(task_identity, monkeypatch):
    """No tables in a scheduled round: ask every round until some come, then keep the grid."""
    _fixed_allocator(monkeypatch, ["powersgd:4", "powersgd:4", "powersgd:4"])
    strat = LGreCo(FedAvg(), candidates=CANDS, default="powersgd:4", reallocate_every=2, max_interval_factor=4)
    # Allocation at 1 (unchanged -> next at 5); 5 and 6 are silent, 7 allocates
    # (unchanged -> interval 8 on the grid of 5, next at 13).
    asked = _drive(strat, _global(), range(1, 15), silent=(5, 6))
    assert asked == [1, 5, 6, 7, 13]
    assert sorted(strat.allocation_history) == [1, 7, 13]
    assert strat.allocation_details[7]["next_allocation"] == 13


def _with_tables(payload, relative, update_energy):
    """A reply payload carrying hand-made tables (relative errors, ||u||^2 = ||x||^2)."""
    energy = np.stack([update_energy, update_energy], axis=1).astype(np.float32)
    return {**payload, "lgreco-errors": relative_errors(relative * update_energy[:, None], update_energy), "lgreco-energy": energy}


@pytest.mark.parametrize("anchor", ["warmup", "current"])
def test_budget_stays_anchored_to_the_warmup_default(anchor):
    """Later tables describe L-GreCo's own residual state; the default's error on it must not raise the budget."""
    glob = _global()
    strat = _strategy(warmup_rounds=1, reallocate_every=1, alpha=1.0, budget_anchor=anchor)
    energy = np.array([4.0, 3.0, 2.0, 1.0])
    # Columns: none, powersgd:1, powersgd:4 (default), topk:0.1, qsgd:8.
    rel = np.tile([0.0, 0.5, 0.1, 0.15, 0.04], (4, 1))
    first = _with_tables(_encoded(glob, _locals(glob, 1)[0], strat.settings), rel, energy)
    strat.aggregate_train(1, [_reply(1, first, 10)])
    budget_1 = feedback_errors(rel * energy[:, None], np.stack([energy, energy], 1))[:, 2].sum()
    # Round 2: every setting loses 2x as much on the (worse) state, same update energy.
    worse = rel * 2
    second = _with_tables(_encoded(glob, _locals(glob, 1)[0], strat.settings), worse, energy)
    strat.aggregate_train(2, [_reply(1, second, 10)])
    settled = feedback_errors(np.minimum(worse, 0.99) * energy[:, None], np.stack([energy, energy], 1))
    chosen = np.array([CANDS.index(strat.settings[r]) for r in sorted(SHAPES)])
    total = settled[np.arange(4), chosen].sum()
    if anchor == "warmup":
        assert total <= budget_1 * (1 + 1e-3)
        assert strat.allocation_details[2]["error_ratio"] <= 1 + 1e-3
    else:
        # Budgeted against the default on the worse state: more error than the warm-up default had.
        assert total > budget_1


def test_budget_anchor_is_validated():
    with pytest.raises(ValueError, match="budget_anchor"):
        _strategy(budget_anchor="later")


def test_a_uniform_fallback_stops_the_tables_and_survives_a_checkpoint(task_identity):
    """When the best allocation costs no less than a uniform candidate within budget, the
    tables are pure overhead: the uniform candidate is taken, for good."""
    glob = _global()
    strat = _strategy(reallocate_every=1, max_interval_factor=1)
    energy = np.array([4.0, 3.0, 2.0, 1.0])
    # Columns: none, powersgd:1, powersgd:4 (default), topk:0.1, qsgd:8. Only "none" and
    # qsgd:8 are within the default's error, and qsgd:8 is the smaller one for every tensor.
    rel = np.tile([0.0, 0.9, 0.1, 0.9, 0.01], (4, 1))
    reply = _with_tables(_encoded(glob, _locals(glob, 1)[0], strat.settings), rel, energy)
    strat.aggregate_train(1, [_reply(1, reply, 10)])
    assert strat.uniform_fallback == "qsgd:8" and set(strat.settings.values()) == {"qsgd:8"}
    assert strat.allocation_details[1]["table_bytes_per_client"] > 0
    arrays = ArrayRecord({k: Array(v) for k, v in glob.items()})
    cfg = list(strat.configure_train(2, arrays, ConfigRecord({}), GRID))[0].content["config"]
    assert settings_from_config(cfg)[1] is None  # no more tables asked for
    restored = LGreCo(FedAvg(), candidates=CANDS, default="powersgd:4", reallocate_every=1, max_interval_factor=1)
    restored.load_state_dict(strat.state_dict())
    assert restored.uniform_fallback == "qsgd:8" and not restored.tables_wanted(7)
    # The paper's L-GreCo (no fallback) keeps asking.
    plain = _strategy(reallocate_every=1, max_interval_factor=1, fallback_to_uniform=False)
    plain.aggregate_train(1, [_reply(1, reply, 10)])
    assert plain.uniform_fallback is None and plain.tables_wanted(2)
