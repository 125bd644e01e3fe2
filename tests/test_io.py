"""Canonical frame: the same anatomy stored with any axis order or flips gives the same arrays
(and the same CSV). Files are written with nibabel directly: an oracle independent of helpers.io."""

from __future__ import annotations

import itertools
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from helpers import io, phantom, pipeline


def _stored(perm: tuple[int, int, int], flips: tuple[bool, bool, bool]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The small phantom re-stored: LPS (x, y, z) axes permuted by ``perm`` then flipped; returns
    (ct, mask, affine) with the affine that keeps every voxel at its world position."""
    ph = phantom.make_phantom("small")
    ct0, mask0 = ph.image.transpose(2, 1, 0), ph.mask.transpose(2, 1, 0)  # stored L, P, S
    a0 = ph.affine[:, [2, 1, 0, 3]]
    n0 = ct0.shape
    t = np.zeros((4, 4))
    t[3, 3] = 1.0
    ct, mask = ct0.transpose(perm), mask0.transpose(perm)
    for k, (old, flip) in enumerate(zip(perm, flips)):
        t[old, k] = -1.0 if flip else 1.0
        t[old, 3] = n0[old] - 1 if flip else 0.0
        if flip:
            ct, mask = np.flip(ct, k), np.flip(mask, k)
    return np.ascontiguousarray(ct).astype(np.int16), np.ascontiguousarray(mask), a0 @ t


ORIENTATIONS = [
    ((0, 1, 2), (False, False, False)),  # LPS, as the phantom is written
    ((0, 1, 2), (True, True, False)),  # RAS (nibabel's and most tools' default)
    ((2, 0, 1), (False, True, True)),  # slices first, anterior-posterior and inferior flipped
    ((1, 2, 0), (True, False, True)),
]


def _save(folder: Path, perm, flips) -> tuple[Path, Path]:
    ct, mask, affine = _stored(perm, flips)
    folder.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(ct, affine), str(folder / "ct.nii.gz"))
    nib.save(nib.Nifti1Image(mask, affine), str(folder / "mask.nii.gz"))
    return folder / "ct.nii.gz", folder / "mask.nii.gz"


@pytest.mark.parametrize("perm, flips", ORIENTATIONS, ids=["LPS", "RAS", "SAI-like", "PIR-like"])
def test_any_axis_order_or_flip_gives_the_same_canonical_arrays(tmp_path, perm, flips):
    ph = phantom.make_phantom("small")
    scan = io.load_scan(*_save(tmp_path, perm, flips))
    np.testing.assert_array_equal(scan.image, ph.image)
    np.testing.assert_array_equal(scan.mask, ph.mask)
    np.testing.assert_allclose(scan.affine, ph.affine, atol=1e-6)
    assert scan.spacing == pytest.approx(ph.spacing)
    expected = "".join(nib.orientations.aff2axcodes(_stored(perm, flips)[2]))
    assert scan.source_orientation == expected


def test_every_one_of_the_48_orientations_is_recognised(tmp_path):
    ph = phantom.make_phantom("small")
    seen = set()
    for perm in itertools.permutations(range(3)):
        for flips in itertools.product((False, True), repeat=3):
            ct, mask, affine = _stored(perm, flips)
            canonical, aff = io.to_canonical(ct, affine)
            np.testing.assert_array_equal(canonical, ph.image.astype(np.int16))
            np.testing.assert_allclose(aff, ph.affine, atol=1e-6)
            seen.add("".join(nib.orientations.aff2axcodes(affine)))
    assert len(seen) == 48


def test_slightly_oblique_affine_maps_to_the_closest_axes(tmp_path):
    ct, mask, affine = _stored((0, 1, 2), (True, True, False))
    angle = np.deg2rad(8.0)
    rot = np.eye(4)
    rot[:2, :2] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    nib.save(nib.Nifti1Image(ct, rot @ affine), str(tmp_path / "ct.nii.gz"))
    nib.save(nib.Nifti1Image(mask, rot @ affine), str(tmp_path / "mask.nii.gz"))
    scan = io.load_scan(tmp_path / "ct.nii.gz", tmp_path / "mask.nii.gz")
    ph = phantom.make_phantom("small")
    np.testing.assert_array_equal(scan.image, ph.image)
    assert scan.spacing == pytest.approx(ph.spacing)


def test_mask_written_by_io_round_trips_through_nibabel(tmp_path):
    ph = phantom.make_phantom("small")
    path = io.save_nifti(tmp_path / "m.nii.gz", ph.mask, ph.affine, np.uint8)
    img = nib.load(str(path))
    assert "".join(nib.orientations.aff2axcodes(img.affine)) == "LPS"
    np.testing.assert_array_equal(np.asarray(img.dataobj).transpose(2, 1, 0), ph.mask)
    assert io.nifti_bytes(ph.mask, ph.affine, np.uint8) == path.read_bytes(), "deterministic bytes"


def test_reoriented_phantom_gives_the_same_csv(tmp_path, cpu_model):
    """End to end: LPS files and the same anatomy stored permuted and flipped give identical CSVs."""
    csvs = []
    for i, (perm, flips) in enumerate([ORIENTATIONS[0], ORIENTATIONS[2]]):
        ct, mask = _save(tmp_path / f"in{i}", perm, flips)
        config = pipeline.Config(volume=str(ct), mask=str(mask), output=str(tmp_path / f"out{i}" / "results.csv"),
                                 device="cpu", weights="random", progress=False)  # fmt: skip
        csvs.append(pipeline.run(config, cpu_model).paths["csv"].read_bytes())
    assert csvs[0] == csvs[1]
