"""Crop boxes, padding/clipping, normalisation, label remap and the swap warning."""

from __future__ import annotations

import numpy as np
import pytest

from helpers import io, regions
from helpers.errors import InputError, PipelineWarning


def _scan(image: np.ndarray, mask: np.ndarray) -> io.Scan:
    return io.Scan(
        image=image.astype(np.float32), mask=mask, spacing=(1.0, 1.0, 1.0), affine=io.lps_affine((1, 1, 1), mask.shape),
        source_affine=np.eye(4), source_orientation="LPS", source_shape=mask.shape, volume_path="vol.nii.gz",
        mask_path="mask.nii.gz", volume_sha256="", mask_sha256="",
    )  # fmt: skip


def _oracle_box(mask: np.ndarray, label: int, pad: int) -> tuple[tuple[int, int], ...]:
    idx = np.nonzero(mask == label)
    return tuple((max(int(i.min()) - pad, 0), min(int(i.max()) + 1 + pad, n)) for i, n in zip(idx, mask.shape))


def test_bounding_box_pads_and_clips():
    mask = np.zeros((20, 30, 40), np.uint8)
    mask[8:12, 10:15, 20:31] = 1  # interior: pad fits
    mask[0:3, 25:30, 0:2] = 2  # touches three borders: pad is clipped
    assert regions.bounding_box(mask, 1, pad=5) == ((3, 17), (5, 20), (15, 36))
    assert regions.bounding_box(mask, 2, pad=5) == ((0, 8), (20, 30), (0, 7))
    assert regions.bounding_box(mask, 1, pad=0) == ((8, 12), (10, 15), (20, 31))
    with pytest.raises(ValueError):
        regions.bounding_box(mask, 3)


def test_bounding_box_matches_nonzero_oracle_on_random_masks():
    rng = np.random.default_rng(0)
    for _ in range(20):
        shape = tuple(rng.integers(3, 25, size=3))
        mask = (rng.random(shape) < rng.uniform(0.001, 0.1)).astype(np.uint8)
        if not mask.any():
            continue
        pad = int(rng.integers(0, 7))
        assert regions.bounding_box(mask, 1, pad) == _oracle_box(mask, 1, pad)


def test_masked_and_bbox_crops_and_zscore():
    rng = np.random.default_rng(1)
    image = rng.normal(100, 30, size=(40, 40, 40))
    mask = np.zeros((40, 40, 40), np.uint8)
    mask[5:35, 5:35, 5:20] = 1
    mask[10:30, 10:30, 22:35] = 2
    scan = _scan(image, mask)
    bbox = regions.crop_region(scan, "tibia", 1, pad=2, mode="bbox")
    assert bbox.box == ((3, 37), (3, 37), (3, 22))
    crop = image[3:37, 3:37, 3:22]
    np.testing.assert_allclose(bbox.array, (crop - crop.mean()) / crop.std(), rtol=1e-4, atol=1e-4)
    masked = regions.crop_region(scan, "tibia", 1, pad=2, mode="masked")
    inside = mask[3:37, 3:37, 3:22] == 1
    vals = crop[inside]
    np.testing.assert_allclose(masked.array[inside], (vals - vals.mean()) / vals.std(), rtol=1e-4, atol=1e-4)
    assert np.all(masked.array[~inside] == 0)
    assert masked.label_voxels == int((mask == 1).sum())
    assert masked.stats["mean_hu"] == pytest.approx(vals.mean())


def test_window_normalisation_maps_hu_through_imagenet_grey_statistics():
    image = np.array([-2000.0, -500.0, 400.0, 1300.0, 3000.0]).reshape(1, 1, 5) * np.ones((3, 3, 1))
    out, stats = regions.normalise(image, None, "window", (400.0, 1800.0))
    unit = np.clip((image - (-500.0)) / 1800.0, 0, 1)
    np.testing.assert_allclose(out, (unit - 0.449) / 0.226, rtol=1e-5)
    assert stats == {"level_hu": 400.0, "width_hu": 1800.0}
    assert regions.parse_normalize("window:300,1500") == ("window", (300.0, 1500.0))
    for bad in ("minmax", "window:300", "window:1,-5"):
        with pytest.raises(InputError):
            regions.parse_normalize(bad)


def test_thin_crop_is_padded_to_the_network_minimum_with_a_warning():
    image = np.random.default_rng(2).normal(size=(40, 40, 40))
    mask = np.zeros((40, 40, 40), np.uint8)
    mask[10:30, 2:4, 10:30] = 1
    with pytest.warns(PipelineWarning, match="thinner than the network's minimum of 29"):
        region = regions.crop_region(_scan(image, mask), "tibia", 1, pad=1, min_size=29)
    assert region.crop_shape == (22, 4, 22)
    assert region.array.shape == (29, 29, 29)
    assert np.all(region.array[22:] == 0) and np.all(region.array[:, 4:] == 0)
    assert np.count_nonzero(region.array[:22, :4, :22]) > 0


def test_parse_labels():
    assert regions.parse_labels(None) == {"tibia": 1, "femur": 2, "background": 0}
    assert regions.parse_labels("tibia=2,femur=1") == {"tibia": 2, "femur": 1, "background": 0}
    assert regions.parse_labels({"background": 9}) == {"tibia": 1, "femur": 2, "background": 9}
    for bad in ("patella=3", "tibia=x", "tibia", "tibia=2"):
        with pytest.raises(InputError):
            regions.parse_labels(bad)


def _knee(swapped: bool) -> io.Scan:
    """Femur (2) on top of tibia (1) in the canonical frame (depth is +S); optionally swapped."""
    mask = np.zeros((40, 20, 20), np.uint8)
    mask[22:38, 5:15, 5:15] = 1 if swapped else 2
    mask[2:18, 5:15, 5:15] = 2 if swapped else 1
    return _scan(np.random.default_rng(0).normal(size=mask.shape), mask)


def test_swap_warning(recwarn):
    regions.crop_regions(_knee(swapped=False))
    assert not [w for w in recwarn if "swapped" in str(w.message)]
    with pytest.warns(PipelineWarning, match="labels look swapped"):
        regions.crop_regions(_knee(swapped=True))


def test_label_remap_gives_the_same_crops():
    normal = regions.crop_regions(_knee(swapped=False))
    remapped = regions.crop_regions(_knee(swapped=True), "tibia=2,femur=1")
    for a, b in zip(normal, remapped):
        assert a.name == b.name and a.box == b.box
        np.testing.assert_array_equal(a.array, b.array)


def test_empty_label_is_an_input_error_naming_the_mask():
    scan = _knee(swapped=False)
    with pytest.raises(InputError, match=r"mask.nii.gz: femur label 7 has no voxels"):
        regions.crop_regions(scan, "femur=7")


def test_extra_labels_are_ignored_with_a_note():
    scan = _knee(swapped=False)
    scan.mask[30:32, 0:2, 0:2] = 5
    with pytest.warns(PipelineWarning, match=r"labels \[5\] are not in the label map"):
        crops = regions.crop_regions(scan)
    assert [c.name for c in crops] == ["tibia", "femur", "background"]
