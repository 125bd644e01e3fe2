"""End to end through the CLI on the small phantom: files, consistency, reproducibility."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.spatial.distance import cosine as scipy_cosine

from helpers import cli, outputs, pipeline

ROOT = Path(__file__).resolve().parents[1]


def _run(phantom_files, out: Path, *extra: str) -> int:
    ct, mask = phantom_files
    return cli.main(["--volume", str(ct), "--mask", str(mask), "--output", str(out), "--device", "cpu",
                     "--weights", "random", "--no-progress", *extra])  # fmt: skip


@pytest.fixture(scope="module")
def first_run(phantom_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("run1") / "results.csv"
    assert _run(phantom_files, out) == 0
    return out


def test_csv_has_exactly_the_seed_format(first_run):
    lines = first_run.read_text().splitlines()
    assert lines[0] == "pair,layer_1,layer_2,layer_3"
    assert [line.split(",")[0] for line in lines[1:]] == ["tibia_femur", "tibia_background", "femur_background"]
    _, values = outputs.read_csv(first_run)
    assert values.shape == (3, 3) and np.all(np.abs(values) <= 1.0)
    assert len({tuple(values[:, j]) for j in range(3)}) == 3, "the three layer columns must differ"


def test_json_and_npz_agree_with_the_csv(first_run, phantom_files):
    pairs, values = outputs.read_csv(first_run)
    record = json.loads(first_run.with_suffix(".json").read_text())
    for pair, row in zip(pairs, values):
        assert [record["results"][pair][c] for c in ("layer_1", "layer_2", "layer_3")] == pytest.approx(row, abs=1e-8)
    assert record["random_weights"] is True and "RANDOM WEIGHTS" in record["WARNING"]
    assert record["model"]["selected_layers"]["layer_1"] == "denseblock4.denselayer16.conv2"
    assert record["model"]["conv_layers"] == 120
    import hashlib

    assert record["inputs"]["volume"]["sha256"] == hashlib.sha256(phantom_files[0].read_bytes()).hexdigest()
    assert record["inputs"]["mask"]["sha256"] == hashlib.sha256(phantom_files[1].read_bytes()).hexdigest()
    for key in ("spacing_mm", "shape", "label_counts"):
        assert key in record["scan"]
    assert set(record["regions"]) == {"tibia", "femur", "background"}
    assert record["versions"]["torch"] and record["device"]["type"] == "cpu"

    npz = pipeline.load_npz(first_run.with_suffix(".npz"))
    assert len(npz["layer_names"]) == 120
    np.testing.assert_allclose(npz["values"], values, atol=1e-8)
    names = npz["layer_names"]
    for i, (a, b) in enumerate([("tibia", "femur"), ("tibia", "background"), ("femur", "background")]):
        for j, col in enumerate(("layer_1", "layer_2", "layer_3")):
            k = names.index(record["model"]["selected_layers"][col])
            expected = 1 - scipy_cosine(npz["vectors"][a][k].astype(np.float64), npz["vectors"][b][k].astype(np.float64))
            assert values[i, j] == pytest.approx(expected, abs=1e-7)


def test_two_runs_give_byte_identical_csv(first_run, phantom_files, tmp_path):
    out = tmp_path / "again.csv"
    assert _run(phantom_files, out) == 0
    assert out.read_bytes() == first_run.read_bytes()


def test_settings_change_the_numbers(first_run, phantom_files, tmp_path):
    out = tmp_path / "bbox.csv"
    assert _run(phantom_files, out, "--crop", "bbox", "--inflation", "center") == 0
    _, a = outputs.read_csv(first_run)
    _, b = outputs.read_csv(out)
    assert not np.allclose(a, b, atol=1e-4)
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["settings"]["crop"] == "bbox" and record["model"]["inflation"] == "center"


def test_seed_command_line_in_a_subprocess(phantom_files, tmp_path):
    ct, mask = phantom_files
    out = tmp_path / "results.csv"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "pipeline.py"), "--volume", str(ct), "--mask", str(mask), "--output", str(out),
         "--device", "cpu", "--weights", "random"],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "RANDOM WEIGHTS" in proc.stderr
    assert "tibia_femur" in proc.stdout and out.exists()


def test_phantom_is_the_default_input(tmp_path):
    out = tmp_path / "out" / "results.csv"
    code = cli.main(["--output", str(out), "--data-dir", str(tmp_path / "data"), "--weights", "random",
                     "--device", "cpu", "--no-progress"])  # fmt: skip
    assert code == 0
    assert (tmp_path / "data" / "knee_small_ct.nii.gz").exists()
    assert out.exists() and out.with_suffix(".npz").exists() and out.with_suffix(".json").exists()


def test_one_model_serves_several_runs(phantom_files, first_run, tmp_path):
    ct, mask = phantom_files
    config = pipeline.Config(volume=str(ct), mask=str(mask), output=str(tmp_path / "a.csv"), device="cpu",
                             weights="random", progress=False)  # fmt: skip
    model = pipeline.build_model(config)
    r1 = pipeline.run(config, model)
    config.output = str(tmp_path / "b.csv")
    r2 = pipeline.run(config, model)
    assert r1.paths["csv"].read_bytes() == r2.paths["csv"].read_bytes() == first_run.read_bytes()
    assert "model_build" not in r2.provenance["timings_s"]


@pytest.mark.parametrize("bad", ["results.txt", "afile/results.csv"])
def test_bad_output_path_fails_fast_with_exit_2(phantom_files, tmp_path, capsys, bad):
    (tmp_path / "afile").write_text("a file where the output folder should be")
    assert _run(phantom_files, tmp_path / bad) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and bad.split("/")[0] in err[0]
    assert "RANDOM WEIGHTS" not in err[0]  # failed before the model was built
