"""Shared fixtures: the ServerApp identity strategies need outside a ServerApp, seeded generators.

The benchmark scripts are importable by their names (``import experiment_summary``): their
folder is appended to ``sys.path`` once, here, after every installed package, and
``tests/test_packaging.py`` checks that no script's name shadows an installed module.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fedlowrank.strategies.testing import task_identity as _task_identity

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
if str(BENCHMARKS) not in sys.path:
    sys.path.append(str(BENCHMARKS))


@pytest.fixture
def task_identity():
    """Run and node identity of a ServerApp: instruction messages read it."""
    with _task_identity():
        yield


@pytest.fixture
def rng() -> np.random.Generator:
    """A seeded numpy generator (each test gets the same stream)."""
    return np.random.default_rng(0)


@pytest.fixture
def torch_gen() -> torch.Generator:
    """A seeded torch generator."""
    return torch.Generator().manual_seed(0)
