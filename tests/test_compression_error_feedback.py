"""Error feedback: nothing is lost for good, state survives a round trip, tables are cheap and right."""

import numpy as np
import pytest

from fedlowrank.compression import (
    CANDIDATES_KEY,
    ENERGY_KEY,
    ERRORS_KEY,
    ErrorFeedback,
    decode_update,
    encode_update,
    read_tables,
    relative_errors,
    settings_from_config,
    settings_to_config,
    size_table,
)

SHAPES = {"layer.lora_U": (24, 16), "layer.lora_V": (20, 16), "bias": (16,)}


def _stream(rounds, seed=0):
    rng = np.random.default_rng(seed)
    # A persistent direction plus noise, like successive local updates.
    drift = {k: rng.standard_normal(s) for k, s in SHAPES.items()}
    for _ in range(rounds):
        yield {k: (0.5 * drift[k] + rng.standard_normal(s)).astype(np.float32) for k, s in SHAPES.items()}


@pytest.mark.parametrize("cand", ["none", "powersgd:2", "topk:0.05", "qsgd:2", "qsgd:4", "sq:2"])
def test_sum_of_decoded_updates_tracks_sum_of_true_updates(cand):
    ef = ErrorFeedback(seed=3)
    settings = {k: cand for k in SHAPES}
    sent = {k: np.zeros(s) for k, s in SHAPES.items()}
    true = {k: np.zeros(s) for k, s in SHAPES.items()}
    norms, update_norm = [], []
    for update in _stream(200):
        payload, _ = encode_update(update, settings, ef)
        decoded = decode_update(payload, SHAPES)
        for k in SHAPES:
            sent[k] += decoded[k]
            true[k] += update[k]
        norms.append(ef.residual_norm())
        update_norm.append(np.sqrt(sum(np.sum(u.astype(np.float64) ** 2) for u in update.values())))
    # Exact bookkeeping: what was meant minus what arrived is the residual.
    for k in SHAPES:
        np.testing.assert_allclose(true[k] - sent[k], ef.residuals[k], atol=1e-6 * (1 + np.abs(true[k]).max()))
    # Bounded: the residual stays at a constant multiple of one update, it does not grow with rounds.
    typical = float(np.mean(update_norm))
    assert max(norms) < 25 * typical
    assert np.mean(norms[-50:]) < 2 * np.mean(norms[50:100]) + 1e-9


def test_state_dict_round_trip_continues_identically():
    settings = {k: "powersgd:2" for k in SHAPES}
    settings["bias"] = "qsgd:4"
    updates = list(_stream(6, seed=1))
    a = ErrorFeedback(seed=5)
    for u in updates[:3]:
        encode_update(u, settings, a)
    b = ErrorFeedback.from_state_dict({k: v.copy() for k, v in a.state_dict().items()})
    assert all(isinstance(v, np.ndarray) for v in a.state_dict().values())
    for u in updates[3:]:
        pa, _ = encode_update(u, settings, a)
        pb, _ = encode_update(u, settings, b)
        assert pa.keys() == pb.keys()
        for k in pa:
            np.testing.assert_array_equal(pa[k], pb[k])
    with pytest.raises(ValueError, match="meta"):
        ErrorFeedback().load_state_dict({"residual/x": np.zeros(2)})
    with pytest.raises(ValueError, match="Unexpected key"):
        ErrorFeedback().load_state_dict({"meta": np.array([0, 0]), "junk": np.zeros(1)})


def test_tables_measure_update_plus_residual_and_change_nothing():
    ef = ErrorFeedback(seed=0)
    cands = ["none", "powersgd:1", "powersgd:4", "topk:0.1", "qsgd:4"]
    u1, u2 = list(_stream(2, seed=2))
    encode_update(u1, {k: "topk:0.1" for k in SHAPES}, ef)
    before = {k: v.copy() for k, v in ef.state_dict().items()}
    errors, sizes = ef.tables("layer.lora_U", u2["layer.lora_U"], cands)
    after = ef.state_dict()
    assert before.keys() == after.keys() and all(np.array_equal(before[k], after[k]) for k in before)
    target = u2["layer.lora_U"].astype(np.float64) + ef.residuals["layer.lora_U"]
    sv = np.linalg.svd(target, compute_uv=False) ** 2
    np.testing.assert_allclose(errors[1], sv[1:].sum(), rtol=1e-10)  # exact best-rank-1 tail
    np.testing.assert_allclose(errors[2], sv[4:].sum(), rtol=1e-10)
    assert errors[0] < 1e-9 and sizes[0] == target.size * 4
    assert sizes.tolist()[1:3] == [(24 + 16) * 4, (24 + 16) * 16]
    # Top-K's error is exact: compare with what compressing with it really loses.
    payload, decoded = ef.compress("layer.lora_U", u2["layer.lora_U"], "topk:0.1")
    np.testing.assert_allclose(errors[3], np.sum((target - decoded) ** 2), rtol=1e-5)


def test_encode_update_tables_and_config_helpers():
    cands = ["none", "powersgd:2", "qsgd:8"]
    config = settings_to_config({k: "powersgd:2" for k in SHAPES}, cands)
    assert config[CANDIDATES_KEY] == cands and config["lgreco.bias"] == "powersgd:2"
    settings, got_cands = settings_from_config(config)
    assert settings == {k: "powersgd:2" for k in SHAPES} and got_cands == cands
    update = next(_stream(1))
    ef = ErrorFeedback()
    ef.compress("bias", np.ones(16), "topk:0.1")  # a residual on one tensor only
    owed_bias = ef.residuals["bias"].copy()
    payload, tables = encode_update(update, settings, ef, candidates=got_cands)
    # Compact tables: float16 relative errors and two float32 energies per tensor; no sizes.
    assert set(tables) == {ERRORS_KEY, ENERGY_KEY}
    assert tables[ERRORS_KEY].shape == (3, 3) and tables[ENERGY_KEY].shape == (3, 2)
    assert tables[ERRORS_KEY].dtype == np.float16 and tables[ENERGY_KEY].dtype == np.float32
    rows = sorted(SHAPES)
    absolute, _ = read_tables(tables, 3, 3)
    for i, name in enumerate(rows):
        u = update[name].astype(np.float64)
        owed = owed_bias if name == "bias" else 0.0
        np.testing.assert_allclose(tables[ENERGY_KEY][i], [np.sum(u**2), np.sum((u + owed) ** 2)], rtol=1e-5)
        # PowerSGD's column is the best rank-2 tail of update + residual (dense SVD here).
        x = u + owed
        powersgd_tail = np.sum(np.linalg.svd(x.reshape(x.shape[0], -1), compute_uv=False)[2:] ** 2)
        assert absolute[i, 0] <= 1e-7 * np.sum(x**2)  # "none" loses only float32 rounding
        np.testing.assert_allclose(absolute[i, 1], powersgd_tail, rtol=2e-3, atol=1e-7 * np.sum(x**2))
        assert absolute[i, 1] >= powersgd_tail * (1 - 1e-6)  # rounded up, never optimistic
    assert set(decode_update({**payload, **tables}, SHAPES)) == set(SHAPES)  # table keys are ignored
    with pytest.raises(ValueError, match="No compression setting"):
        encode_update(update, {"bias": "none"}, ErrorFeedback())


def test_shape_change_resets_the_residual():
    ef = ErrorFeedback()
    ef.compress("w", np.ones((4, 4)), "topk:0.1")
    payload, decoded = ef.compress("w", np.ones((4, 6)), "none")
    assert ef.residuals["w"].shape == (4, 6)
    np.testing.assert_allclose(decoded, np.ones((4, 6)))


def test_size_table_equals_what_clients_encode():
    """The server's size table is exactly the payload nbytes of every candidate."""
    cands = ["none", "powersgd:1", "powersgd:4", "powersgd:64", "topk:0.01", "topk:0.3", "qsgd:2", "qsgd:3", "qsgd:5", "qsgd:8", "qsgd:12"]
    # Odd value counts (7 x 3, 1 x 1, 300) leave partly filled packed bytes.
    shapes = {**SHAPES, "big": (1100, 3), "conv": (4, 3, 5, 5), "scalar": (), "odd": (7, 3), "one": (1, 1), "row": (300,)}
    ef = ErrorFeedback(seed=3)
    rng = np.random.default_rng(0)
    table = size_table(shapes, cands)
    assert table.shape == (len(shapes), len(cands))
    for i, name in enumerate(sorted(shapes)):
        x = rng.standard_normal(shapes[name])
        sizes = ef.tables(name, x, cands)[1]
        for j, cand in enumerate(cands):
            payload, _ = ErrorFeedback().compress(name, x, cand)
            assert table[i, j] == sizes[j] == sum(a.nbytes for a in payload.values()), (name, cand)
    # Codec options the clients use change the size; the server takes them too.
    small = size_table({"big": (1100, 3)}, ["qsgd:4"], {"qsgd": {"bucket_size": 64}})
    assert small[0, 0] == 3300 * 4 // 8 + 4 * 52


def test_relative_errors_round_up_to_float16_and_handle_zero_and_huge():
    rng = np.random.default_rng(3)
    target = np.array([2.5, 0.0, 1e-6])
    errors = np.abs(rng.standard_normal((3, 50))) * target[:, None]
    errors[0, 0] = 1e9  # a ratio float16 cannot hold
    half = relative_errors(errors, target)
    assert half.dtype == np.float16 and half.shape == errors.shape
    ratio = np.divide(errors, target[:, None], out=np.zeros_like(errors), where=target[:, None] > 0)
    ok = ratio < 6e4
    assert np.all(half.astype(np.float64)[ok] >= ratio[ok])
    np.testing.assert_allclose(half.astype(np.float64)[ok], ratio[ok], rtol=1e-3)
    assert np.all(half[1] == 0) and half[0, 0] == np.finfo(np.float16).max
