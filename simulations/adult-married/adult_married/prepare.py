"""Rebuild ``assets/`` from the vendored UCI Adult files: the data and the frozen base.

Run from the app folder: ``python -m adult_married.prepare``. Deterministic (seeded).

- Pretraining population: people under 40 who are not in a civil marriage (16,343 rows).
  Few of them earn > 50K (4%), and the features that matter differ from those of
  married couples, so the base transfers imperfectly.
- Fine-tuning population (``married.json``): people in a civil marriage (21,055 rows,
  45% > 50K), which the federation's sites hold. No row is in both.
"""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .data import ASSETS, CATEGORICAL, NUMERIC, RAW_COLUMNS, encode_features
from .model import IncomeMLP

RAW = Path(__file__).resolve().parents[1] / "data"
COLUMNS = RAW_COLUMNS
MARRIED = "Married-civ-spouse"


def read_raw() -> list[dict]:
    """Rows of adult.data and adult.test without missing values (45,222 rows)."""
    rows = []
    for name in ("adult.data.gz", "adult.test.gz"):
        with gzip.open(RAW / name, "rt") as handle:
            for record in csv.reader(handle, skipinitialspace=True):
                if len(record) != len(COLUMNS) or "?" in record:
                    continue  # the test file's header line and rows with missing values
                rows.append(dict(zip(COLUMNS, record)))
    return rows


def to_columns(rows: list[dict], categories: dict) -> dict:
    """Integer-coded columns as stored in the assets."""
    columns = {c: [int(r[c]) for r in rows] for c in NUMERIC}
    for c in CATEGORICAL:
        columns[c] = [categories[c].index(r[c]) for r in rows]
    columns["us_born"] = [int(r["native_country"] == "United-States") for r in rows]
    columns["income_gt_50k"] = [int(r["income"].startswith(">50K")) for r in rows]
    return columns


def pretrain(x: np.ndarray, y: np.ndarray, seed: int = 0, epochs: int = 8) -> IncomeMLP:
    """Full training of the base on the pretraining population."""
    torch.manual_seed(seed)
    model = IncomeMLP(x.shape[1])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(xt), generator=generator)
        for start in range(0, len(xt), 256):
            idx = order[start : start + 256]
            loss = nn.functional.binary_cross_entropy_with_logits(model(xt[idx]).squeeze(1), yt[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model


def main() -> None:
    rows = read_raw()
    categories = {c: sorted({r[c] for r in rows}) for c in CATEGORICAL}
    pre = [r for r in rows if r["marital_status"] != MARRIED and int(r["age"]) < 40]
    married = [r for r in rows if r["marital_status"] == MARRIED]
    pre_cols = to_columns(pre, categories)
    numeric = np.stack([np.asarray(pre_cols[c], dtype=np.float64) for c in NUMERIC], axis=1)
    numeric[:, 2:4] = np.log1p(numeric[:, 2:4])
    mean, std = numeric.mean(0), numeric.std(0)
    x = encode_features(pre_cols, categories, mean, std)
    y = np.asarray(pre_cols["income_gt_50k"], dtype=np.float32)
    model = pretrain(x, y)
    ASSETS.mkdir(exist_ok=True)
    base = {
        "description": "IncomeMLP pretrained on UCI Adult, age < 40 and not married-civ-spouse",
        "num_features": int(x.shape[1]),
        "hidden": 64,
        "numeric_mean": mean.tolist(),
        "numeric_std": std.tolist(),
        "pretraining_rows": len(pre),
        "state_dict": {k: v.tolist() for k, v in model.state_dict().items()},
    }
    (ASSETS / "base_model.json").write_text(json.dumps(base))
    data = {
        "description": "UCI Adult (CC BY 4.0), married-civ-spouse rows, integer-coded",
        "categories": categories,
        "columns": to_columns(married, categories),
    }
    (ASSETS / "married.json").write_text(json.dumps(data, separators=(",", ":")))
    print(f"pretraining rows {len(pre)}, fine-tuning rows {len(married)}, features {x.shape[1]}")


if __name__ == "__main__":
    main()
