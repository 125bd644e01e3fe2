"""The torch_xla path for real, on XLA's CPU backend (``PJRT_DEVICE=CPU``): ``make test-xla``.

Runs in the XLA environment (torch 2.9.0 + torch_xla 2.9.0, ``.venv-xla``). Without torch_xla
these tests skip, except with ``KNEE_REQUIRE_XLA=1`` (set by ``make test-xla``, which CI runs),
where a missing torch_xla is a failure: CI cannot pass without the XLA path having run.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.xla

ROOT = Path(__file__).resolve().parents[1]
REQUIRED = os.environ.get("KNEE_REQUIRE_XLA") == "1"


@pytest.fixture(scope="module")
def torch_xla():
    """torch_xla on its CPU backend (PJRT_DEVICE=CPU unless set); skip, or fail where required."""
    os.environ.setdefault("PJRT_DEVICE", "CPU")
    try:
        import torch_xla
    except ImportError as exc:
        if REQUIRED:
            pytest.fail(f"KNEE_REQUIRE_XLA=1 but torch_xla cannot be imported ({exc}): the XLA path was not tested")
        pytest.skip(f"torch_xla is not installed ({exc}); run make test-xla")
    return torch_xla


def _run_cli(args: list[str], env: dict[str, str]) -> None:
    proc = subprocess.run([sys.executable, "pipeline.py", "--no-progress", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]


def _read_csv(path: Path) -> dict[str, list[float]]:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["pair", "layer_1", "layer_2", "layer_3"]
    return {r[0]: [float(v) for v in r[1:]] for r in rows[1:]}


def test_pipeline_on_xla_matches_the_eager_cpu_run(torch_xla, phantom_files, random_checkpoint, tmp_path):
    """``pipeline.py --device xla`` (default bucketing, 32) on the small phantom gives the
    results.csv of the eager CPU run with the same settings within 1e-4 (fp32), and also the
    unbucketed CPU run's (bucketing is exact); tibia and femur share one compiled graph."""
    ct, mask = phantom_files
    common = ["--volume", str(ct), "--mask", str(mask), "--weights", str(random_checkpoint), "--precision", "fp32"]
    env = {**os.environ, "PJRT_DEVICE": "CPU"}
    _run_cli([*common, "--device", "xla", "--output", str(tmp_path / "xla" / "results.csv")], env)
    _run_cli([*common, "--device", "cpu", "--bucket", "32", "--output", str(tmp_path / "cpu32" / "results.csv")], env)
    _run_cli([*common, "--device", "cpu", "--output", str(tmp_path / "cpu" / "results.csv")], env)

    xla = _read_csv(tmp_path / "xla" / "results.csv")
    for reference in ("cpu32", "cpu"):
        ref = _read_csv(tmp_path / reference / "results.csv")
        assert list(ref) == list(xla) == ["tibia_femur", "tibia_background", "femur_background"]
        diff = max(abs(a - b) for pair in ref for a, b in zip(ref[pair], xla[pair]))
        assert diff <= 1e-4, f"xla vs {reference}: max |difference| {diff:.2e}"

    record = json.loads((tmp_path / "xla" / "results.json").read_text())
    device = record["device"]
    assert device["type"] == "xla" and device["xla_device_type"] == "CPU" and device["pjrt_device"] == "CPU"
    assert device["torch_xla"] == torch_xla.__version__ and record["versions"]["torch_xla"] == torch_xla.__version__
    assert device["bucket"] == 32 and device["mat_mul_precision"] == "highest"
    shapes = {name: r["network_input_shape"] for name, r in record["regions"].items()}
    assert shapes == {"tibia": [64, 64, 64], "femur": [64, 64, 64], "background": [64, 96, 96]}
    assert device["xla_compilations"] == 2  # 64^3 (tibia, femur) and 64x96x96 (background)
    assert device["xla_compile_time_s"] > 0


def test_hooks_transfer_once_per_region_and_bucketed_crops_share_a_graph(torch_xla, random_checkpoint):
    """No device -> host sync per layer: per region one graph execution and one transfer from
    the device (torch_xla's ExecuteComputation counter and TransferFromDeviceTime metric); two
    crops of one bucket compile once. The vectors match the eager CPU ones (unbucketed)."""
    import torch_xla.debug.metrics as met

    from helpers import extract, inflate, regions

    rng = np.random.default_rng(0)
    crops = [regions.Region(name, 1, ((0, s[0]), (0, s[1]), (0, s[2])), rng.normal(size=s).astype(np.float32), s, 1)
             for name, s in [("a", (30, 31, 29)), ("b", (32, 29, 30)), ("c", (33, 30, 31))]]  # fmt: skip
    on_xla = extract.prepare_model(inflate.inflate_densenet121(str(random_checkpoint)), "xla", "fp32", bucket=32)
    on_cpu = extract.prepare_model(inflate.inflate_densenet121(str(random_checkpoint)), "cpu", "fp32", bucket=0)

    def counts() -> tuple[int, int, int]:
        transfers = met.metric_data("TransferFromDeviceTime")
        return (met.counter_value("ExecuteComputation") or 0, transfers[0] if transfers else 0,
                met.counter_value("UncachedCompile") or 0)  # fmt: skip

    before = counts()
    feats = extract.extract_features(on_xla, crops, progress=False)
    executions, transfers, compiles = (b - a for a, b in zip(before, counts()))
    assert feats.input_shapes == {"a": (32, 32, 32), "b": (32, 32, 32), "c": (64, 32, 32)}
    assert transfers == len(crops), f"{transfers} device->host transfers for {len(crops)} regions"
    assert executions == len(crops), f"{executions} graph executions for {len(crops)} regions"
    assert compiles == 2 == feats.device_info["xla_compilations"]

    ref = extract.extract_features(on_cpu, crops, progress=False)
    assert feats.layer_names == ref.layer_names and len(feats.layer_names) == 120
    for crop in crops:
        for name, a, b in zip(ref.layer_names, ref.vectors[crop.name], feats.vectors[crop.name]):
            err = float(np.abs(a - b).max() / np.abs(a).max())
            assert err < 1e-4, f"{crop.name} {name}: relative error {err:.2e}"
