"""The conda environment, the pip requirements and the notebook's Colab installer list the same dependencies."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

from helpers import runtime

ROOT = Path(__file__).resolve().parents[1]
#: conda-only entries of environment.yml that are not Python requirements
CONDA_ONLY = {"python", "pip"}


def _pip_requirements(path: Path) -> dict[str, str]:
    """name -> normalised specifier of a requirements file, following ``-r`` includes."""
    out: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("-r"):
            out |= _pip_requirements(path.parent / line[2:].strip())
            continue
        req = Requirement(line)
        out[runtime.requirement_name(req.name)] = ",".join(sorted(str(s) for s in req.specifier))
    return out


def _conda_environment(path: Path) -> tuple[dict[str, str], dict[str, str]]:
    """(Python requirements as name -> specifier, conda-only entries) of an environment.yml."""
    env = yaml.safe_load(path.read_text())
    out: dict[str, str] = {}
    conda_only: dict[str, str] = {}
    for dep in env["dependencies"]:
        entries = dep["pip"] if isinstance(dep, dict) else [dep]
        for entry in entries:
            req = Requirement(entry.replace(" ", ""))
            name = runtime.requirement_name(req.name)
            spec = ",".join(sorted(str(s) for s in req.specifier))
            (conda_only if name in CONDA_ONLY else out)[name] = spec
    return out, conda_only


def test_environment_yml_lists_the_same_dependencies_as_the_requirements():
    pip = _pip_requirements(ROOT / "requirements-dev.txt")
    conda, _ = _conda_environment(ROOT / "environment.yml")
    assert "torch" in pip and "pytest" in pip, "requirements-dev.txt must include requirements.txt"
    missing, extra = sorted(set(pip) - set(conda)), sorted(set(conda) - set(pip))
    assert not missing and not extra, f"environment.yml lacks {missing}, has extra {extra}"
    differ = {n: (pip[n], conda[n]) for n in pip if pip[n] != conda[n]}
    assert not differ, f"version ranges differ (requirements, environment.yml): {differ}"


def test_environment_yml_python_matches_pyproject():
    _, conda_only = _conda_environment(ROOT / "environment.yml")
    requires = re.search(r'requires-python\s*=\s*"([^"]+)"', (ROOT / "pyproject.toml").read_text())
    assert requires is not None
    assert conda_only["python"] == requires.group(1)
    assert "pip" in conda_only


def test_notebook_installer_reads_exactly_the_runtime_requirements():
    expected = _pip_requirements(ROOT / "requirements.txt")
    found = {runtime.requirement_name(Requirement(s).name) for s in runtime.requirements()}
    assert found == set(expected)


@pytest.mark.parametrize(
    "spec, name",
    [("torch_xla[tpu]==2.9.0", "torch-xla"), ("Nibabel>=5.2,<6", "nibabel"), ("ruff", "ruff"),
     ("typing_extensions ; python_version<'3.11'", "typing-extensions")],
)  # fmt: skip
def test_requirement_name(spec, name):
    assert runtime.requirement_name(spec) == name
