"""Shared fixtures: the small phantom on disk and one random-weight network per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def _isolated_torch_home(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Tests never find (or try to download into) the user's cached ImageNet weights: the same
    behaviour on machines with and without a cached checkpoint."""
    os.environ["TORCH_HOME"] = str(tmp_path_factory.mktemp("torch_home"))


@pytest.fixture(scope="session")
def phantom_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(ct, mask) of the small synthetic knee, written once per session (read-only for tests)."""
    from helpers import phantom

    return phantom.write_phantom(tmp_path_factory.mktemp("phantom"), "small")


@pytest.fixture(scope="session")
def random_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A torchvision-format DenseNet-121 checkpoint with random weights AND non-trivial BatchNorm
    statistics (torchvision's init leaves every BatchNorm an identity, which would hide BN bugs)."""
    import torch
    import torchvision

    gen = torch.Generator().manual_seed(1234)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        model = torchvision.models.densenet121(weights=None)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=gen) - 0.5)
                m.running_var.copy_(torch.rand(n, generator=gen) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                m.bias.copy_(torch.rand(n, generator=gen) - 0.5)
    path = tmp_path_factory.mktemp("weights") / "densenet121_random_bn.pth"
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="session")
def random_net(random_checkpoint):
    """DenseNet-121 inflated (mean) from ``random_checkpoint``, CPU."""
    from helpers import inflate

    return inflate.inflate_densenet121(str(random_checkpoint), "mean")


@pytest.fixture(scope="session")
def cpu_model(random_net):
    """``random_net`` prepared for CPU fp32 extraction."""
    from helpers import extract

    return extract.prepare_model(random_net, "cpu", "fp32")
