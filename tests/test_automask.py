"""--mask auto: bone threshold + components + joint-space split, femur by anatomy (the affine),
checked against the phantom's known labels."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from helpers import automask, cli, io, phantom, pipeline
from helpers.errors import InputError


@pytest.fixture(scope="module")
def small():
    return phantom.make_phantom("small")


def _dice(auto: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    return {name: automask.dice(auto == v, truth == v) for name, v in (("tibia", 1), ("femur", 2))}


def test_phantom_dice_per_bone_and_unlabelled_bone_stays_background(small):
    auto, record = automask.segment_bones(small.image, small.affine)
    dice = _dice(auto, small.mask)
    assert dice["tibia"] >= 0.95 and dice["femur"] >= 0.95, dice
    # patella and fibula: bone in the CT, background in the truth; they must stay background
    other_bone = (small.image >= 600) & (small.mask == 0)
    assert other_bone.sum() > 500
    assert np.mean(auto[other_bone] == 0) > 0.95
    assert record["unlabelled_bone_ml"] > 10 and record["femur_above_tibia_mm"] > 30


def test_femur_is_chosen_by_anatomy_not_size(small):
    """A field of view with only the femoral condyles: the femur is now the smaller bone."""
    joint = int(np.flatnonzero((small.mask == 2).any(axis=(1, 2)))[0])
    top = joint + 8  # 24 mm of femur above the joint
    image, truth = small.image[:top], small.mask[:top]
    assert np.count_nonzero(truth == 2) < np.count_nonzero(truth == 1) / 2
    auto, _ = automask.segment_bones(image, io.lps_affine(small.spacing, image.shape))
    dice = _dice(auto, truth)
    assert dice["femur"] >= 0.9 and dice["tibia"] >= 0.95, dice


def test_superior_comes_from_the_affine_not_the_array_order(small):
    """The same volume with its depth axis stored upside down (and an affine saying so)."""
    flipped_affine = small.affine.copy()
    flipped_affine[:3, 0] *= -1
    flipped_affine[:3, 3] = small.affine[:3, :3] @ [small.image.shape[0] - 1, 0, 0] + small.affine[:3, 3]
    auto, _ = automask.segment_bones(small.image[::-1], flipped_affine)
    reference, _ = automask.segment_bones(small.image, small.affine)
    np.testing.assert_array_equal(auto[::-1], reference)
    # the femur is now at the low array indices: labelling by array position would swap them
    assert np.flatnonzero((auto == 2).any(axis=(1, 2))).mean() < np.flatnonzero((auto == 1).any(axis=(1, 2))).mean()


def test_touching_femur_and_tibia_are_split_at_the_joint_space(small):
    """A bony bridge across the joint space (as osteophytes or partial volume make): one component."""
    image = small.image.copy()
    z, y, x = phantom._grid(image.shape, small.spacing)
    bridge = ((x + 20) ** 2 + (y - 8) ** 2 <= 7.0**2) & (z > -6) & (z < 8)
    image[np.broadcast_to(bridge, image.shape)] = 1300.0
    auto, record = automask.segment_bones(image, small.affine)
    assert record["components"] <= 3 and "separation_radius_mm" in record
    assert record["separation_radius_mm"] > 4.0, "the first radius must not suffice: the bones really touch"
    dice = _dice(auto, small.mask)
    assert dice["tibia"] >= 0.9 and dice["femur"] >= 0.9, dice


def test_label_map_is_followed(small):
    auto, record = automask.segment_bones(small.image, small.affine, labels={"tibia": 2, "femur": 1, "background": 0})
    swapped = np.choose(small.mask, [0, 2, 1]).astype(np.uint8)
    assert automask.dice(auto == 1, swapped == 1) >= 0.95 and record["labels"]["femur"] == 1


def test_no_bone_and_a_single_bone_are_input_errors(small):
    with pytest.raises(InputError, match=r"ct.nii: auto mask: no voxel reaches the bone threshold of 200 HU"):
        automask.segment_bones(np.full((40, 40, 40), 40.0, np.float32), np.eye(4), source="ct.nii")
    femur_only = small.image.copy()
    femur_only[small.mask == 1] = 40.0
    femur_only[(small.image > 600) & (small.mask == 0)] = 40.0
    with pytest.raises(InputError, match="found no femur above a tibia"):
        automask.segment_bones(femur_only, small.affine)


def test_parse_auto_and_the_mask_path():
    assert automask.is_auto("auto") and automask.is_auto("auto:150") and not automask.is_auto("mask.nii.gz")
    assert automask.parse_auto("auto") == 200.0 and automask.parse_auto("auto:150") == 150.0
    with pytest.raises(InputError, match="auto:HU"):
        automask.parse_auto("auto:bone")
    assert automask.automask_path("out/results.csv").as_posix() == "out/results_automask.nii.gz"


def test_cli_auto_mask_is_saved_next_to_the_results_and_reusable(phantom_files, cpu_model, monkeypatch, tmp_path):
    ct, truth_file = phantom_files
    monkeypatch.setattr(pipeline, "build_model", lambda config: cpu_model)
    out = tmp_path / "auto" / "results.csv"
    common = ["--device", "cpu", "--weights", "random", "--no-progress"]
    assert cli.main(["--volume", str(ct), "--mask", "auto", "--output", str(out), *common]) == 0
    saved = out.with_name("results_automask.nii.gz")
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["inputs"]["mask"]["sha256"] == hashlib.sha256(saved.read_bytes()).hexdigest()
    assert record["outputs"]["mask"] == str(saved)
    assert record["scan"]["processing"][0]["step"] == "automask"
    # the saved file is a valid mask for the same volume and matches the phantom's labels
    scan = io.load_scan(ct, saved)
    truth = io.load_scan(ct, truth_file).mask
    assert min(_dice(scan.mask, truth).values()) >= 0.95
    again = tmp_path / "again" / "results.csv"
    assert cli.main(["--volume", str(ct), "--mask", str(saved), "--output", str(again), *common]) == 0
    assert again.read_bytes() == out.read_bytes()
    assert not again.with_name("results_automask.nii.gz").exists()
