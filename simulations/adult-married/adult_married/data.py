"""UCI Adult, married-civ-spouse population, split across hospitals-like sites.

The fine-tuning population (people in a civil marriage) is stored in
``assets/married.json`` as integer codes; the frozen base model was pretrained on a
different population (people under 40 not in a civil marriage, see ``prepare.py``).
Features are encoded here exactly as during pretraining. The demographic group is
``sex`` (0 = male, 1 = female); it stays a model input, as in the source data.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

ASSETS = Path(__file__).parent / "assets"
NUMERIC = ["age", "education_num", "capital_gain", "capital_loss", "hours_per_week"]
CATEGORICAL = ["workclass", "marital_status", "occupation", "relationship", "race", "sex"]
GROUP_NAMES = ("male", "female")


def encode_features(columns: dict, categories: dict, numeric_mean, numeric_std) -> np.ndarray:
    """Standardised numeric columns (capital columns log1p), one-hot categoricals, US flag."""
    numeric = np.stack([np.asarray(columns[c], dtype=np.float64) for c in NUMERIC], axis=1)
    numeric[:, 2:4] = np.log1p(numeric[:, 2:4])
    numeric = (numeric - np.asarray(numeric_mean)) / np.asarray(numeric_std)
    onehots = [np.eye(len(categories[c]))[np.asarray(columns[c], dtype=np.int64)] for c in CATEGORICAL]
    us = np.asarray(columns["us_born"], dtype=np.float64)[:, None]
    return np.concatenate([numeric, *onehots, us], axis=1).astype(np.float32)


@lru_cache(maxsize=2)
def load_population(group_attribute: str = "sex") -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Features, labels (income > 50K), groups (sex by default) and site codes of the married population."""
    base = json.loads((ASSETS / "base_model.json").read_text())
    data = json.loads((ASSETS / "married.json").read_text())
    columns = data["columns"]
    x = encode_features(columns, data["categories"], base["numeric_mean"], base["numeric_std"])
    y = np.asarray(columns["income_gt_50k"], dtype=np.float32)
    groups = group_ids(columns, data["categories"], group_attribute)
    occupation = np.asarray(columns["occupation"], dtype=np.int64)
    return x, y, groups, occupation


GROUP_ATTRIBUTES = {
    # attribute -> (its column, the category that is group 1); group 0 is everyone else
    "sex": ("sex", "Female"),
    "race": ("race", "White"),
}


def group_names(attribute: str = "sex") -> tuple[str, str]:
    """Readable names of groups 0 and 1 for a group attribute, e.g. ``("male", "female")``.

    Parameters
    ----------
    attribute : str (default: "sex")
        A key of :data:`GROUP_ATTRIBUTES`.

    Returns
    -------
    tuple of str
        Group 0's name, then group 1's (the attribute's marked category).

    Raises
    ------
    ValueError
        If the attribute is unknown, naming the choices.
    """
    if attribute not in GROUP_ATTRIBUTES:
        raise ValueError(f"group attribute {attribute!r} is not one of {sorted(GROUP_ATTRIBUTES)}")
    if attribute == "sex":
        return GROUP_NAMES  # two categories: "everyone else" is exactly the men
    marked = GROUP_ATTRIBUTES[attribute][1]
    return (f"non-{marked}", marked)


RAW_COLUMNS = [
    "age", "workclass", "fnlwgt", "education", "education_num", "marital_status", "occupation",
    "relationship", "race", "sex", "capital_gain", "capital_loss", "hours_per_week",
    "native_country", "income",
]


def group_ids(columns: dict, categories: dict, attribute: str) -> np.ndarray:
    """Group ids (0/1) for a group attribute; an unknown attribute is an error naming the choices."""
    if attribute not in GROUP_ATTRIBUTES:
        raise ValueError(f"group attribute {attribute!r} is not one of {sorted(GROUP_ATTRIBUTES)}")
    column, marked = GROUP_ATTRIBUTES[attribute]
    return (np.asarray(columns[column]) == categories[column].index(marked)).astype(np.int64)


def load_site_file(path: str | Path, group_attribute: str = "sex") -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """A site's own rows in UCI Adult's raw format (``adult.data``: 15 comma-separated columns,
    plain or ``.gz``), encoded as the base model expects.

    Rows with a missing value (``?``), another number of columns, or a category the base model
    never saw are skipped and counted (the last return value), never guessed.

    Raises
    ------
    FileNotFoundError
        Naming the path, if there is no such file.
    ValueError
        If no row can be used, or the group attribute is unknown.
    """
    import csv
    import gzip

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"site data file {path} does not exist (node config data-path)")
    base = json.loads((ASSETS / "base_model.json").read_text())
    categories = json.loads((ASSETS / "married.json").read_text())["categories"]
    opener = gzip.open if path.suffix == ".gz" else open
    rows, skipped = [], 0
    with opener(path, "rt") as handle:
        for record in csv.reader(handle, skipinitialspace=True):
            if not record:
                continue
            row = dict(zip(RAW_COLUMNS, record))
            usable = len(record) == len(RAW_COLUMNS) and "?" not in record and all(row[c] in categories[c] for c in CATEGORICAL)
            if not usable:
                skipped += 1
                continue
            rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no usable row ({skipped} skipped: missing values, wrong columns or unknown categories)")
    columns = {c: [float(r[c]) for r in rows] for c in NUMERIC}
    for c in CATEGORICAL:
        columns[c] = [categories[c].index(r[c]) for r in rows]
    columns["us_born"] = [int(r["native_country"] == "United-States") for r in rows]
    x = encode_features(columns, categories, base["numeric_mean"], base["numeric_std"])
    y = np.asarray([float(r["income"].startswith(">50K")) for r in rows], dtype=np.float32)
    return x, y, group_ids(columns, categories, group_attribute), skipped


def partition_indices(num_partitions: int, seed: int, concentration: float = 1.0) -> list[np.ndarray]:
    """Non-IID sites: each occupation's rows spread over sites by a Dirichlet draw.

    Occupations cluster at sites the way specialities cluster at hospitals, so sites
    differ in mix and base rate. Seeded: every node computes the same split.
    """
    _, _, _, occupation = load_population()
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[] for _ in range(num_partitions)]
    for code in np.unique(occupation):
        rows = rng.permutation(np.flatnonzero(occupation == code))
        shares = rng.dirichlet(np.full(num_partitions, concentration))
        cuts = (np.cumsum(shares)[:-1] * len(rows)).astype(int)
        for site, chunk in enumerate(np.split(rows, cuts)):
            parts[site].extend(chunk.tolist())
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def train_test_split(rows: np.ndarray, seed: int, test_fraction: float = 0.25) -> tuple[np.ndarray, np.ndarray]:
    """A site's own seeded split into train and test rows."""
    rows = np.random.default_rng(seed).permutation(rows)
    cut = int(round(len(rows) * test_fraction))
    return np.sort(rows[cut:]), np.sort(rows[:cut])


def site_rows(partition_id: int, num_partitions: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Train and test row indices of one site."""
    rows = partition_indices(num_partitions, seed)[partition_id]
    return train_test_split(rows, seed + 1000 + partition_id)


def loader(rows: np.ndarray, batch_size: int, shuffle: bool, seed: int = 0, group_attribute: str = "sex") -> DataLoader:
    """Batches of ``(x, y, group)`` for the given rows of the embedded population."""
    x, y, groups, _ = load_population(group_attribute)
    return tensor_loader(x[rows], y[rows], groups[rows], batch_size, shuffle, seed)


def tensor_loader(x: np.ndarray, y: np.ndarray, groups: np.ndarray, batch_size: int, shuffle: bool, seed: int = 0) -> DataLoader:
    """Batches of ``(x, y, group)`` from arrays."""
    dataset = TensorDataset(torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(groups))
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator)


def pooled_test_rows(num_partitions: int, seed: int) -> np.ndarray:
    """All sites' test rows: the server's view for central evaluation in simulation."""
    return np.concatenate([site_rows(p, num_partitions, seed)[1] for p in range(num_partitions)])


def pooled_train_rows(num_partitions: int, seed: int) -> np.ndarray:
    """All sites' train rows: for the central fine-tuning upper bound only."""
    return np.concatenate([site_rows(p, num_partitions, seed)[0] for p in range(num_partitions)])
