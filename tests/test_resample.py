"""--spacing: CT linear, mask nearest, same field of view, affine and provenance consistent."""

from __future__ import annotations

import json
import tracemalloc

import numpy as np
import pytest

from helpers import cli, io, phantom, pipeline, resample
from helpers.errors import InputError


def _scan(image: np.ndarray, mask: np.ndarray, spacing: tuple[float, float, float]) -> io.Scan:
    affine = io.lps_affine(spacing, image.shape)
    return io.Scan(image=image.astype(np.float32), mask=mask, spacing=spacing, affine=affine, source_affine=affine,
                   source_orientation="LPS", source_shape=image.shape, volume_path="v.nii.gz", mask_path="m.nii.gz",
                   volume_sha256="", mask_sha256="")  # fmt: skip


def _world(affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """World coordinates (mm, RAS+) of every voxel centre, shape (*shape, 3)."""
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1).astype(np.float64)
    return idx @ affine[:3, :3].T + affine[:3, 3]


def test_parse_spacing_is_x_y_z_in_mm():
    assert resample.parse_spacing(None) is None
    assert resample.parse_spacing("1") == (1.0, 1.0, 1.0)
    assert resample.parse_spacing(["0.8", "0.7", "2"]) == (2.0, 0.7, 0.8)  # (d, h, w) = (z, y, x)
    assert resample.parse_spacing("0.8,0.7,2") == resample.parse_spacing("0.8 0.7 2") == (2.0, 0.7, 0.8)
    assert resample.parse_spacing(1.5) == (1.5, 1.5, 1.5)
    for bad in (["1", "2"], "0", "-1", "abc", "1,2,3,4", "nan", "100"):
        with pytest.raises(InputError, match="--spacing"):
            resample.parse_spacing(bad)


@pytest.mark.parametrize("spacing", ["1.3", "0.7 0.9 2.5", "4"])
def test_linear_interpolation_reproduces_a_linear_hu_ramp(spacing):
    """The CT is sampled linearly: a field linear in world coordinates is reproduced exactly at
    every new voxel inside the old grid (oracle: world positions through the affines)."""
    shape, old = (20, 24, 28), (3.0, 1.0, 1.5)
    ramp = np.array([7.0, -3.0, 2.0])  # HU per mm along world x, y, z
    scan0 = _scan(np.zeros(shape), np.ones(shape, np.uint8), old)
    image = (_world(scan0.affine, shape) @ ramp).astype(np.float32)
    scan = resample.resample_scan(_scan(image, np.ones(shape, np.uint8), old), spacing)
    target = resample.parse_spacing(spacing)
    assert scan.spacing == pytest.approx(target)
    world = _world(scan.affine, scan.shape)
    old_idx = (world - scan0.affine[:3, 3]) @ np.linalg.inv(scan0.affine[:3, :3]).T
    inside = np.all((old_idx >= 0) & (old_idx <= np.array(shape) - 1), axis=-1)
    assert inside.mean() > 0.8
    np.testing.assert_allclose(scan.image[inside], (world @ ramp)[inside], atol=2e-3)
    # same field of view, centred: extent within one new voxel, centre unchanged
    assert np.all(np.abs(np.array(scan.shape) * target - np.array(shape) * old) <= np.array(target) / 2 + 1e-9)
    centre = lambda s: s.affine @ np.r_[(np.array(s.shape) - 1) / 2, 1.0]  # noqa: E731
    np.testing.assert_allclose(centre(scan), centre(scan0), atol=1e-9)
    step = scan.processing[-1]
    assert step["step"] == "resample" and step["spacing_mm_from"] == list(old) and step["shape"] == list(scan.shape)


def test_mask_is_nearest_neighbour_and_keeps_volumes():
    ph = phantom.make_phantom("small")  # 3 x 2 x 2 mm
    scan = resample.resample_scan(_scan(ph.image, ph.mask, ph.spacing), "1.5")
    assert scan.mask.dtype == ph.mask.dtype
    assert set(np.unique(scan.mask).tolist()) == {0, 1, 2}, "labels are never blended"
    for label in (1, 2):
        before = np.count_nonzero(ph.mask == label) * np.prod(ph.spacing)
        after = np.count_nonzero(scan.mask == label) * np.prod(scan.spacing)
        assert after == pytest.approx(before, rel=0.03)
    # every resampled label equals the old label at the nearest old voxel (oracle through the affines)
    world = _world(scan.affine, scan.shape)
    old = np.rint((world - ph.affine[:3, 3]) @ np.linalg.inv(ph.affine[:3, :3]).T).astype(int)
    old = np.clip(old, 0, np.array(ph.mask.shape) - 1)
    agree = scan.mask == ph.mask[old[..., 0], old[..., 1], old[..., 2]]
    assert agree.mean() > 0.995  # ties at exact half-voxel positions may round either way


def test_native_spacing_is_a_no_op_and_recorded():
    ph = phantom.make_phantom("small")
    before = _scan(ph.image, ph.mask, ph.spacing)
    scan = resample.resample_scan(before, "2 2 3")  # x y z = the native 2, 2, 3 mm
    assert scan.image is before.image and scan.mask is before.mask
    assert scan.processing[-1]["unchanged"] is True


def test_too_fine_a_spacing_is_refused_before_allocating():
    ph = phantom.make_phantom("small")
    scan = _scan(ph.image, ph.mask, ph.spacing)
    tracemalloc.start()
    with pytest.raises(InputError, match=r"v.nii.gz: --spacing 0.05x0.05x0.05 mm gives .* voxels"):
        resample.resample_scan(scan, "0.05")
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 2**20


def test_resampling_allocates_only_its_outputs():
    ph = phantom.make_phantom("small")
    scan0 = _scan(ph.image, ph.mask, ph.spacing)
    tracemalloc.start()
    scan = resample.resample_scan(scan0, "1")
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    outputs = scan.image.nbytes + scan.mask.nbytes
    assert peak < 1.05 * outputs + 2**20, (peak, outputs)


def test_cli_flag_reaches_the_run_and_the_provenance(phantom_files, cpu_model, monkeypatch, tmp_path):
    ct, mask = phantom_files
    args = cli.build_parser().parse_args(["--volume", str(ct), "--mask", str(mask), "--spacing", "2",
                                          "--output", str(tmp_path / "r.csv")])  # fmt: skip
    config = cli.config_from_args(args)
    assert config.spacing == ["2"]
    run = pipeline.Run(config, cpu_model)
    scan = run.load()
    assert scan.spacing == (2.0, 2.0, 2.0) and scan.shape == (96, 96, 96)
    assert scan.image.shape == scan.mask.shape == (96, 96, 96)
    # the run's scan is the native one on the asked grid: 2 mm voxel axes, same centre, step recorded
    native = io.load_scan(ct, mask)
    np.testing.assert_allclose(np.linalg.norm(scan.affine[:3, :3], axis=0), [2.0, 2.0, 2.0])
    centre = lambda s: s.affine @ np.r_[(np.array(s.shape) - 1) / 2, 1.0]  # noqa: E731
    np.testing.assert_allclose(centre(scan), centre(native), atol=1e-6)
    assert scan.processing == [*native.processing, {
        "step": "resample", "spacing_mm_from": [3.0, 2.0, 2.0], "spacing_mm": [2.0, 2.0, 2.0],
        "shape_from": [64, 96, 96], "shape": [96, 96, 96], "image_interpolation": "linear",
        "mask_interpolation": "nearest", "axes": "d, h, w"}]  # fmt: skip
    monkeypatch.setattr(pipeline, "build_model", lambda config: cpu_model)
    out = tmp_path / "results.csv"
    code = cli.main(["--volume", str(ct), "--mask", str(mask), "--spacing", "2", "2", "3", "--output", str(out),
                     "--device", "cpu", "--weights", "random", "--no-progress"])  # fmt: skip
    assert code == 0
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["settings"]["spacing"] == ["2", "2", "3"]
    assert record["scan"]["processing"][0]["step"] == "resample"
    assert record["scan"]["spacing_mm"] == [3.0, 2.0, 2.0]  # d, h, w
    step = record["scan"]["processing"][-1]  # x y z 2 2 3 mm is the phantom's native grid: kept, and said so
    assert step["spacing_mm"] == [3.0, 2.0, 2.0] and step["unchanged"] is True and record["scan"]["shape"] == [64, 96, 96]
