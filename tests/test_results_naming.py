"""Results files: one per run by default, and an existing one is never overwritten silently."""

import pytest

from fedlowrank.runconfig import RunSettings
from fedlowrank.strategies.serverapp import results_path as results_path_for, wait_for_sites

CFG = {"rank": 4, "seed": 0, "rule": "exact", "compression": "none"}


def results_path(cfg, strategy, app_name):
    return results_path_for(RunSettings.from_config(cfg), strategy, app_name)


def test_default_name_carries_the_configuration_and_time(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = results_path({**CFG, "results-file": ""}, "fedlowrank", "adult-married")
    assert path.parent == tmp_path / "results"
    assert path.name.startswith("adult_married-fedlowrank-exact-r4-seed0-") and path.suffix == ".json"
    other = results_path({**CFG, "results-file": "", "compression": "uniform:sq:3"}, "fairlora-exact", "adult-married")
    assert "fairlora-exact-r4-uniform-sq-3-seed0" in other.name


def test_runs_with_mixed_ranks_dp_robust_or_a_resume_are_told_apart_by_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = {**CFG, "results-file": "", "client-ranks": "2,4", "dp-noise-multiplier": 1.1, "robust": "clip", "resume-from": "ckpt"}
    assert "fedlowrank-exact-r4-ranks2-4-dp1.1-clip-resumed-seed0-" in results_path(cfg, "fedlowrank", "adult-married").name


def test_an_existing_results_file_is_refused_unless_the_run_resumes(tmp_path):
    existing = tmp_path / "r.json"
    existing.write_text("{}")
    with pytest.raises(ValueError, match="exists: pick another name"):
        results_path({**CFG, "results-file": str(existing)}, "fedlowrank", "adult-married")
    assert results_path({**CFG, "results-file": str(existing), "resume-from": "ckpt"}, "fedlowrank", "adult-married") == existing


class Grid:
    def __init__(self, nodes):
        self.nodes = nodes

    def get_node_ids(self):
        return list(range(self.nodes))


def test_a_simulated_federation_of_another_size_fails_at_once():
    """In simulation the SuperNodes exist from the start: no two-minute wait for sites that cannot come."""
    import time

    class InMemoryGrid(Grid):  # the name Flower's simulation grid has
        pass

    start = time.monotonic()
    with pytest.raises(ValueError, match="2 SuperNodes but the run config says num-sites = 5"):
        wait_for_sites(InMemoryGrid(2), 5, "adult-married")
    assert time.monotonic() - start < 10


def test_a_federation_of_another_size_is_an_error_that_says_how_to_fix_it():
    assert wait_for_sites(Grid(5), 5, "adult-married") == 5 and wait_for_sites(Grid(2), 0, "adult-married") == 2
    with pytest.raises(ValueError, match="2 SuperNodes but the run config says num-sites = 5.*adult-married --supernodes 5.*num-supernodes=5"):
        wait_for_sites(Grid(2), 5, "adult-married", timeout=0.1)
