"""Run settings are read once and every wrong value is named with its key and range, before round 1."""

import pytest

from fedlowrank.runconfig import RunSettings

APP = {"num-server-rounds": 8, "num-sites": 5, "strategy": "fedlowrank", "rank": 4, "client-ranks": "", "lr": 0.01,
       "local-epochs": 2, "robust": "clip", "central-evaluation": True, "dataset": "an app's own key"}


def test_the_apps_keys_become_typed_fields():
    settings = RunSettings.from_config({**APP, "client-ranks": "2,4,4,2,4", "seed": 3.0})
    assert (settings.num_server_rounds, settings.rank, settings.seed, settings.robust) == (8, 4, 3, "clip")
    assert settings.ranks == [2, 4, 4, 2, 4] and settings.central_evaluation is True
    assert RunSettings.from_config({**APP, "client-ranks": "2,4"}).ranks == [2, 4]  # they repeat over the sites
    assert RunSettings.from_config({}, groups=2).groups == 2  # a default the caller gives


@pytest.mark.parametrize("key,value,message", [
    ("rank", 0, "'rank' = 0 must be >= 1"),
    ("rank", 2.5, "'rank' = 2.5 must be a whole number"),
    ("lr", "fast", "'lr' = 'fast' must be a number"),
    ("lr", 0.0, "'lr' = 0.0 must be > 0"),
    ("fraction-train", 1.5, r"'fraction-train' = 1.5 must be in \[0, 1\]"),
    ("robust", "median", "'robust' = 'median' must be '', 'clip', 'reject' or 'auto'"),
    ("central-evaluation", "maybe", "'central-evaluation' = 'maybe' must be true or false"),
    ("dp-delta", 1.0, r"'dp-delta' = 1.0 must be in \(0, 1\)"),
    ("client-ranks", "2,x", "must be comma-separated integers"),
    ("client-ranks", "2,4,8,16,2,4", "gives 6 ranks for num-sites = 5: at most one rank per site"),
])
def test_a_wrong_value_is_named_with_its_key(key, value, message):
    with pytest.raises(ValueError, match=message):
        RunSettings.from_config({**APP, key: value})


@pytest.mark.parametrize("strategy,extra", [("fedit", {}), ("fedlowrank", {"rule": "fedit"}), ("fairfedmed", {"groups": 2})])
def test_a_strategy_whose_rule_cannot_mix_ranks_is_refused_before_round_one(strategy, extra):
    from fedlowrank.strategies.serverapp import check_strategy

    settings = RunSettings.from_config({**APP, "strategy": strategy, "client-ranks": "2,4", **extra})
    with pytest.raises(ValueError, match="cannot mix client ranks"):
        check_strategy(settings)
    for accepted in ("fedlowrank", "ffa"):  # their rules declare mixed ranks (ffa: the first columns)
        assert check_strategy(RunSettings.from_config({**APP, "strategy": accepted, "client-ranks": "2,4"}))[0] == accepted


def test_auto_robust_is_clip_in_plain_runs_and_off_under_secure_aggregation():
    assert RunSettings.from_config({**APP, "robust": "auto"}).robust_mode == "clip"
    assert RunSettings.from_config({**APP, "robust": "auto", "secure": True}).robust_mode is None
    assert RunSettings.from_config({**APP, "robust": ""}).robust_mode is None


@pytest.mark.parametrize("extra,message", [
    ({"robust": "clip"}, "'robust' = 'clip' cannot act with secure = true"),
    ({"robust": "auto", "compression": "lgreco"}, "'compression' = 'lgreco' with secure = true"),
    ({"robust": "auto", "secure-threshold": 0.0}, r"'secure-threshold' = 0.0 must be in \(0, 1\]"),
    ({"robust": "auto", "secure-weight-bound": -1.0}, "'secure-weight-bound' = -1.0 must be > 0"),
    ({"robust": "auto", "secure-sketch-width": -2}, "'secure-sketch-width' = -2 must be >= 0"),
])
def test_settings_secure_aggregation_cannot_honour_are_refused_by_name(extra, message):
    with pytest.raises(ValueError, match=message):
        RunSettings.from_config({**APP, "secure": True, **extra})


@pytest.mark.parametrize("strategy,extra", [("fedit", {}), ("fedlowrank", {"rule": "ffa"}), ("fairfedmed", {"groups": 2})])
def test_a_strategy_that_averages_factors_is_refused_under_secure_aggregation(strategy, extra):
    from fedlowrank.strategies.serverapp import check_strategy

    settings = RunSettings.from_config({**APP, "strategy": strategy, "robust": "auto", "secure": True, **extra})
    with pytest.raises(ValueError, match="averages factors, which a secure sum of products cannot give"):
        check_strategy(settings)
    ok = RunSettings.from_config({**APP, "strategy": "fedlowrank", "robust": "auto", "secure": True})
    assert check_strategy(ok)[0] == "fedlowrank"


def test_declared_node_weights_parse_and_each_malformed_entry_is_named():
    from fedlowrank.runconfig import RunSettings

    assert RunSettings.from_config({"node-max-weights": "12:500, 7:80.5"}).declared_weights == {12: 500.0, 7: 80.5}
    assert RunSettings.from_config({}).declared_weights is None
    for bad in ("12", "12:0", "x:5", "12:5,12:6", "-1:5", "12:nan"):
        with pytest.raises(ValueError, match="node-max-weights"):
            RunSettings.from_config({"node-max-weights": bad})
    with pytest.raises(ValueError, match="node-max-weights' cannot act with secure"):
        RunSettings.from_config({"node-max-weights": "1:5", "secure": True, "robust": "auto"})
