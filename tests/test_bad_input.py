"""Bad input (issue 2): exit status 2, one line on stderr naming the file and the problem,
no traceback, no output file, and earlier results left byte-identical."""

from __future__ import annotations

import gzip
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from helpers import cli, phantom, pipeline

ROOT = Path(__file__).resolve().parents[1]
EARLIER = {"results.csv": b"pair,layer_1,layer_2,layer_3\nearlier,1,2,3\n", "results.npz": b"npz", "results.json": b"{}"}


def _nifti(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> Path:
    """Write ``array`` (stored voxel order) with nibabel directly: an oracle independent of helpers.io."""
    img = nib.Nifti1Image(array, np.diag([-2.0, -2.0, 3.0, 1.0]) if affine is None else affine)
    nib.save(img, str(path))
    return path


def _small() -> tuple[np.ndarray, np.ndarray]:
    """The small phantom's CT (HU, int16) and mask (uint8) stored (x, y, z), as nibabel writes them."""
    ph = phantom.make_phantom("small")
    ct = np.ascontiguousarray(ph.image.transpose(2, 1, 0)).astype(np.int16)
    mask = np.ascontiguousarray(ph.mask.transpose(2, 1, 0))
    return ct, mask


def _good(tmp: Path) -> tuple[Path, Path]:
    ct, mask = _small()
    return _nifti(tmp / "ct.nii.gz", ct), _nifti(tmp / "mask.nii.gz", mask)


# Each case writes its inputs into a folder and returns (volume, mask, file named, problem).
def missing_file(tmp: Path) -> tuple[Path, Path, Path, str]:
    _, mask = _good(tmp)
    return tmp / "nope.nii.gz", mask, tmp / "nope.nii.gz", "volume file not found"


def not_nifti(tmp: Path) -> tuple[Path, Path, Path, str]:
    _, mask = _good(tmp)
    bad = tmp / "notes.nii"
    bad.write_text("patient notes, not an image\n" * 40)
    return bad, mask, bad, "not a NIfTI file"


def not_nifti_gzipped(tmp: Path) -> tuple[Path, Path, Path, str]:
    ct, _ = _good(tmp)
    bad = tmp / "labels.nii.gz"
    bad.write_bytes(gzip.compress(b"\x89PNG\r\n" + bytes(2000)))
    return ct, bad, bad, "not a NIfTI file"


def corrupt_gzip(tmp: Path) -> tuple[Path, Path, Path, str]:
    ct, mask = _good(tmp)
    data = bytearray(ct.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)  # zeros in the middle of the deflate stream
    ct.write_bytes(bytes(data))
    return ct, mask, ct, "gzip"


def truncated_gzip(tmp: Path) -> tuple[Path, Path, Path, str]:
    ct, mask = _good(tmp)
    ct.write_bytes(ct.read_bytes()[: len(ct.read_bytes()) // 2])
    return ct, mask, ct, "truncated gzip"


def shape_mismatch(tmp: Path) -> tuple[Path, Path, Path, str]:
    ct, mask = _small()
    return _nifti(tmp / "ct.nii.gz", ct), _nifti(tmp / "m.nii.gz", mask[:, :, :-2]), tmp / "m.nii.gz", "mask shape"


def affine_mismatch(tmp: Path) -> tuple[Path, Path, Path, str]:
    ct, mask = _small()
    moved = np.diag([-2.0, -2.0, 3.0, 1.0])
    moved[:3, 3] = (5.0, 0.0, 0.0)
    return _nifti(tmp / "ct.nii.gz", ct), _nifti(tmp / "m.nii.gz", mask, moved), tmp / "m.nii.gz", "mask affine differs"


def empty_label(tmp: Path) -> tuple[Path, Path, Path, str]:
    ct, mask = _small()
    mask[mask == 2] = 0  # no femur
    return _nifti(tmp / "ct.nii.gz", ct), _nifti(tmp / "m.nii.gz", mask), tmp / "m.nii.gz", "femur label 2 has no voxels"


def empty_mask(tmp: Path) -> tuple[Path, Path, Path, str]:
    ct, mask = _small()
    return _nifti(tmp / "ct.nii.gz", ct), _nifti(tmp / "m.nii.gz", np.zeros_like(mask)), tmp / "m.nii.gz", "mask is empty"


def nan_voxels(tmp: Path) -> tuple[Path, Path, Path, str]:
    ct, mask = _small()
    ct = ct.astype(np.float32)
    ct[3, 4, 5], ct[6, 7, 8] = np.nan, np.inf
    return _nifti(tmp / "ct.nii.gz", ct), _nifti(tmp / "m.nii.gz", mask), tmp / "ct.nii.gz", "2 NaN/Inf voxels"


def non_integer_mask(tmp: Path) -> tuple[Path, Path, Path, str]:
    ct, mask = _small()
    m = mask.astype(np.float32)
    m[m == 1] = 3.7
    return _nifti(tmp / "ct.nii.gz", ct), _nifti(tmp / "m.nii.gz", m), tmp / "m.nii.gz", "non-integer label values (e.g. 3.7)"


def image_2d(tmp: Path) -> tuple[Path, Path, Path, str]:
    ct, mask = _small()
    return _nifti(tmp / "ct.nii.gz", ct[:, :, 10]), _nifti(tmp / "m.nii.gz", mask), tmp / "ct.nii.gz", "image is 2D"


CASES: list[Callable[[Path], tuple[Path, Path, Path, str]]] = [
    missing_file, not_nifti, not_nifti_gzipped, corrupt_gzip, truncated_gzip, shape_mismatch, affine_mismatch,
    empty_label, empty_mask, nan_voxels, non_integer_mask, image_2d,
]  # fmt: skip


@pytest.fixture
def no_model_build(cpu_model, monkeypatch):
    """The CLI reuses the session's network instead of building one. Most input errors come
    before the network is needed; a label missing from the mask is found by the crop stage,
    which asks the network for its minimum input size, so the network is built by then."""
    monkeypatch.setattr(pipeline, "build_model", lambda config: cpu_model)


@pytest.mark.parametrize("case", CASES, ids=[c.__name__ for c in CASES])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(case, tmp_path, capsys, no_model_build):
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    out.mkdir()
    for name, data in EARLIER.items():
        (out / name).write_bytes(data)
    volume, mask, named, problem = case(inputs)
    code = cli.main(["--volume", str(volume), "--mask", str(mask), "--output", str(out / "results.csv"),
                     "--device", "cpu", "--weights", "random", "--no-progress"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"error: {named}: "), lines[0]
    assert problem in lines[0]
    assert "Traceback" not in err
    assert sorted(p.name for p in out.iterdir()) == sorted(EARLIER), "no new or temporary file"
    for name, data in EARLIER.items():
        assert (out / name).read_bytes() == data


def test_fresh_output_folder_is_not_even_created(tmp_path, no_model_build, capsys):
    volume, mask, _, _ = shape_mismatch(tmp_path)
    out = tmp_path / "new" / "results.csv"
    assert cli.main(["--volume", str(volume), "--mask", str(mask), "--output", str(out), "--weights", "random",
                     "--device", "cpu", "--no-progress"]) == 2  # fmt: skip
    assert not out.parent.exists()


def test_debug_shows_the_traceback(tmp_path, no_model_build):
    volume, mask, _, _ = not_nifti(tmp_path)
    from helpers.errors import InputError

    with pytest.raises(InputError, match="not a NIfTI file"):
        cli.main(["--volume", str(volume), "--mask", str(mask), "--output", str(tmp_path / "r.csv"), "--debug",
                  "--weights", "random", "--device", "cpu"])  # fmt: skip


def test_real_process_exit_status_and_single_stderr_line(tmp_path):
    """`python pipeline.py` itself: status 2, stderr exactly one line naming the file, nothing written."""
    volume, mask, named, problem = non_integer_mask(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.csv").write_bytes(EARLIER["results.csv"])
    proc = subprocess.run(
        [sys.executable, str(ROOT / "pipeline.py"), "--volume", str(volume), "--mask", str(mask),
         "--output", str(out / "results.csv"), "--device", "cpu", "--weights", "random"],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.endswith("\n"), repr(proc.stderr)
    assert proc.stderr.startswith(f"error: {named}: ") and problem in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert [p.name for p in out.iterdir()] == ["results.csv"]
    assert (out / "results.csv").read_bytes() == EARLIER["results.csv"]
