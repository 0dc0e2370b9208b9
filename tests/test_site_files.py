"""A site's own data file (node config data-path) for the adult-married app."""

import gzip
import sys
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, RecordDict

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "simulations" / "adult-married"))
from adult_married.client_app import site_data  # noqa: E402
from adult_married.data import load_population, load_site_file  # noqa: E402

RAW = Path(__file__).resolve().parents[1] / "simulations" / "adult-married" / "data" / "adult.data.gz"


def raw_lines(n):
    with gzip.open(RAW, "rt") as handle:
        return [next(handle) for _ in range(n)]


def context(node_config):
    return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config={"seed": 0, "batch-size": 16})


def test_a_site_file_in_the_raw_format_loads_with_the_chosen_group_attribute(tmp_path):
    lines = raw_lines(60)
    path = tmp_path / "site.csv"
    path.write_text("".join(lines) + "39, State-gov, 1, Bachelors, 13, Never-married, Astronaut, Not-in-family, White, Male, 0, 0, 40, United-States, <=50K\n"
                    + "50, ?, 1, HS-grad, 9, Married-civ-spouse, Sales, Husband, White, Male, 0, 0, 40, United-States, >50K\n")
    x, y, groups, skipped = load_site_file(path, "sex")
    assert skipped >= 2  # the unknown occupation and the missing value, never guessed
    assert x.shape[1] == load_population()[0].shape[1] and set(np.unique(y)) <= {0.0, 1.0}
    _, _, race, _ = load_site_file(path, "race")
    assert not np.array_equal(groups, race)
    data = site_data(context({"data-path": str(path), "group-attribute": "race"}))
    batch = next(iter(data.train))
    assert batch[0].shape[1] == x.shape[1] and data.num_groups == 2


def test_missing_file_unknown_attribute_and_missing_node_config_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.csv does not exist"):
        load_site_file(tmp_path / "nowhere.csv")
    (tmp_path / "bad.csv").write_text("not, a, row\n")
    with pytest.raises(ValueError, match="no usable row"):
        load_site_file(tmp_path / "bad.csv")
    (tmp_path / "ok.csv").write_text("".join(raw_lines(5)))
    with pytest.raises(ValueError, match="group attribute 'age' is not one of"):
        load_site_file(tmp_path / "ok.csv", "age")
    with pytest.raises(ValueError, match="lacks \\['partition-id', 'num-partitions'\\] \\(and has no data-path\\)"):
        site_data(context({}))
