"""Error feedback: nothing is lost for good, state survives a round trip, tables are cheap and right."""

import numpy as np
import pytest

from fedlowrank.compression import (
    CANDIDATES_KEY,
    ERRORS_KEY,
    SIZES_KEY,
    ErrorFeedback,
    decode_update,
    encode_update,
    settings_from_config,
    settings_to_config,
)

SHAPES = {"layer.lora_U": (24, 16), "layer.lora_V": (20, 16), "bias": (16,)}


def _stream(rounds, seed=0):
    rng = np.random.default_rng(seed)
    # A persistent direction plus noise, like successive local updates.
    drift = {k: rng.standard_normal(s) for k, s in SHAPES.items()}
    for _ in range(rounds):
        yield {k: (0.5 * drift[k] + rng.standard_normal(s)).astype(np.float32) for k, s in SHAPES.items()}


@pytest.mark.parametrize("cand", ["none", "powersgd:2", "topk:0.05", "qsgd:2", "qsgd:4"])
def test_sum_of_decoded_updates_tracks_sum_of_true_updates(cand):
    ef = ErrorFeedback(seed=3)
    settings = {k: cand for k in SHAPES}
    sent = {k: np.zeros(s) for k, s in SHAPES.items()}
    true = {k: np.zeros(s) for k, s in SHAPES.items()}
    norms, update_norm = [], []
    for update in _stream(200):
        payload, _ = encode_update(update, settings, ef)
        decoded = decode_update(payload)
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
    payload, tables = encode_update(update, settings, ErrorFeedback(), candidates=got_cands)
    assert tables[ERRORS_KEY].shape == tables[SIZES_KEY].shape == (3, 3)
    assert tables[ERRORS_KEY].dtype == np.float64 and tables[SIZES_KEY].dtype == np.int64
    assert set(decode_update({**payload, **tables})) == set(SHAPES)  # table keys are ignored
    with pytest.raises(ValueError, match="No compression setting"):
        encode_update(update, {"bias": "none"}, ErrorFeedback())


def test_shape_change_resets_the_residual():
    ef = ErrorFeedback()
    ef.compress("w", np.ones((4, 4)), "topk:0.1")
    payload, decoded = ef.compress("w", np.ones((4, 6)), "none")
    assert ef.residuals["w"].shape == (4, 6)
    np.testing.assert_allclose(decoded, np.ones((4, 6)))
