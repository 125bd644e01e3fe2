"""Shared fixtures: the small phantom on disk and one random-weight network per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests never try to download ImageNet weights: a fresh TORCH_HOME per session keeps the
# behaviour the same on machines with and without a cached checkpoint.
os.environ.setdefault("KNEE_TEST", "1")


@pytest.fixture(scope="session", autouse=True)
def _isolated_torch_home(tmp_path_factory: pytest.TempPathFactory) -> None:
    os.environ["TORCH_HOME"] = str(tmp_path_factory.mktemp("torch_home"))


@pytest.fixture(scope="session")
def phantom_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(ct, mask) of the small synthetic knee, written once per session (read-only for tests)."""
    from helpers import phantom

    return phantom.write_phantom(tmp_path_factory.mktemp("phantom"), "small")


@pytest.fixture(scope="session")
def random_net():
    """DenseNet-121 inflated (mean) with torchvision's random init, seed 0, CPU."""
    from helpers import inflate

    return inflate.inflate_densenet121("random", "mean", seed=0)


@pytest.fixture(scope="session")
def cpu_model(random_net):
    """``random_net`` prepared for CPU fp32 extraction."""
    from helpers import extract

    return extract.prepare_model(random_net, "cpu", "fp32")
