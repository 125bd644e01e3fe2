"""Hostile and odd NIfTI files (issue 6), each read through helpers.io.

Files are built with nibabel or byte by byte here (independent of helpers.io's writer), so the
reader is checked against an outside oracle.
"""

from __future__ import annotations

import gzip
import re
import tracemalloc
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from helpers import io, regions
from helpers.errors import InputError, PipelineWarning

AFFINE = np.diag([-2.0, -2.0, 3.0, 1.0])  # stored axes i, j, k point L, P, S (an LPS file); 2 x 2 x 3 mm


def raw_nifti(array: np.ndarray, affine: np.ndarray = AFFINE, endian: str = "<", **fields: object) -> bytes:
    """A single-file NIfTI-1 byte string for ``array`` (stored order, written F-order), with raw
    header ``fields`` overridden afterwards (``pixdim=...``, ``srow_x=...``): no nibabel fix-ups."""
    hdr = nib.Nifti1Header(endianness=endian)
    hdr.set_data_shape(array.shape)
    hdr.set_data_dtype(array.dtype)
    hdr.set_sform(affine, code=1)
    hdr.set_qform(affine, code=1)
    hdr.set_xyzt_units("mm")
    hdr["vox_offset"] = 352
    for key, value in fields.items():
        hdr[key] = value
    data = np.asarray(array, dtype=array.dtype.newbyteorder(endian)).tobytes(order="F")
    return hdr.binaryblock + b"\0" * 4 + data


def write(path: Path, payload: bytes) -> Path:
    path.write_bytes(gzip.compress(payload) if path.name.endswith(".gz") else payload)
    return path


def ct_and_mask(shape: tuple[int, int, int] = (12, 10, 8)) -> tuple[np.ndarray, np.ndarray]:
    """Stored (x, y, z) arrays: a CT in HU with air and bone, and a mask with tibia below femur."""
    rng = np.random.default_rng(0)
    ct = rng.normal(0, 30, shape).astype(np.float32)
    ct[:2] = -1000
    mask = np.zeros(shape, np.uint8)
    mask[3:9, 3:7, 1:3] = 1
    mask[3:9, 3:7, 5:7] = 2
    ct[mask > 0] += 1200
    return ct, mask


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    ct, mask = ct_and_mask()
    return write(tmp_path / "ct.nii.gz", raw_nifti(ct)), write(tmp_path / "mask.nii.gz", raw_nifti(mask))


def expected_canonical(stored: np.ndarray) -> np.ndarray:
    """For the LPS ``AFFINE`` the canonical (d, h, w) array is the stored (x, y, z) transposed."""
    return stored.transpose(2, 1, 0)


# ----------------------------------------------------------------------------- broken files


def test_truncated_gz_and_truncated_nii(tmp_path, pair):
    ct, mask = pair
    data = ct.read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(data[: len(data) - 100])
    with pytest.raises(InputError, match=r"cut.nii.gz: truncated gzip data"):
        io.load_scan(tmp_path / "cut.nii.gz", mask)
    plain = gzip.decompress(data)
    (tmp_path / "cut.nii").write_bytes(plain[:-10])
    with pytest.raises(InputError, match=rf"cut.nii: truncated file \({len(plain) - 10} bytes of data, the header needs {len(plain)}\)"):
        io.load_scan(tmp_path / "cut.nii", mask)


@pytest.mark.parametrize(
    "content, problem",
    [
        (b"", "not a NIfTI file (only 0 bytes)"),
        (b"\x89PNG\r\n\x1a\n" + bytes(400), "not a NIfTI file"),
        (b"just text\n" * 50, "not a NIfTI file"),
        (gzip.compress(b"gzipped text\n" * 50), "not a NIfTI file"),
        (b"\x1f\x8b\x08\x00" + bytes(60), "corrupt gzip data"),
    ],
    ids=["empty", "png", "text", "gzipped-text", "gzip-garbage"],
)
def test_not_nifti_at_all(tmp_path, pair, content, problem):
    bad = tmp_path / "scan.nii.gz"
    bad.write_bytes(content)
    with pytest.raises(InputError, match=rf"scan.nii.gz: {re.escape(problem)}"):
        io.load_scan(bad, pair[1])


def test_a_directory_and_an_analyze_pair_header(tmp_path, pair):
    with pytest.raises(InputError, match="volume path is not a file"):
        io.load_scan(tmp_path, pair[1])
    ct, _ = ct_and_mask()
    payload = bytearray(raw_nifti(ct))
    payload[344:348] = b"ni1\x00"
    with pytest.raises(InputError, match=r"\.hdr/\.img pair"):
        io.load_scan(write(tmp_path / "pair.nii", bytes(payload)), pair[1])


def _affine_fields(affine: np.ndarray) -> dict[str, np.ndarray]:
    return {"srow_x": affine[0], "srow_y": affine[1], "srow_z": affine[2]}


@pytest.mark.parametrize(
    "fields, problem",
    [
        ({"srow_x": np.array([np.nan, 0, 0, 0])}, r"affine \(sform/qform\) is not finite"),
        ({"srow_x": np.array([0.0, 0, 0, 0])}, r"affine \(sform/qform\) is singular"),
        ({"pixdim": np.array([1, 0.0, 2, 3, 1, 1, 1, 1])}, r"voxel size \(pixdim\) is zero or not finite"),
        ({"pixdim": np.array([1, np.nan, 2, 3, 1, 1, 1, 1])}, r"voxel size \(pixdim\) is zero or not finite"),
        ({"pixdim": np.array([1, 2, 2, 0.0, 1, 1, 1, 1]), "sform_code": 0}, r"voxel size \(pixdim\) is zero"),
    ],
    ids=["nan-sform", "zero-sform", "zero-pixdim", "nan-pixdim", "zero-pixdim-qform"],
)
def test_zero_or_nan_in_affine_or_pixdim(tmp_path, fields, problem):
    """nibabel would silently turn a zero pixdim into 1 mm: the raw header is checked first."""
    ct, mask = ct_and_mask()
    volume = write(tmp_path / "v.nii", raw_nifti(ct, **fields))
    with pytest.raises(InputError, match=rf"v.nii: {problem}"):
        io.load_scan(volume, write(tmp_path / "m.nii", raw_nifti(mask)))


def test_no_orientation_in_the_header_is_warned(tmp_path):
    ct, mask = ct_and_mask()
    volume = write(tmp_path / "v.nii", raw_nifti(ct, sform_code=0, qform_code=0))
    with pytest.warns(PipelineWarning, match="no orientation"):
        io.read_nifti(volume)


# ----------------------------------------------------------------------------- data types and scaling


@pytest.mark.parametrize("dtype", ["<i2", "<u2", "<f4", "<f8", ">i2", ">f4"])
def test_volume_data_types(tmp_path, dtype):
    ct, mask = ct_and_mask()
    dt = np.dtype(dtype)
    stored = np.rint(ct + (1024 if dt.kind == "u" else 0)).astype(dt.newbyteorder("="))
    fields = {"scl_slope": 1.0, "scl_inter": -1024.0} if dt.kind == "u" else {}
    volume = write(tmp_path / "v.nii.gz", raw_nifti(stored, endian=dt.byteorder if dt.byteorder in "<>" else "<", **fields))
    scan = io.load_scan(volume, write(tmp_path / "m.nii.gz", raw_nifti(mask)))
    assert scan.image.dtype == np.float32 and scan.image.flags.c_contiguous and scan.image.flags.writeable
    np.testing.assert_array_equal(scan.image, expected_canonical(np.rint(ct)).astype(np.float32))


def test_scl_slope_and_inter_are_honoured(tmp_path):
    ct, mask = ct_and_mask()
    stored = np.rint((ct + 1024) / 2).astype(np.int16)  # HU = 2 * stored - 1024
    volume = write(tmp_path / "v.nii", raw_nifti(stored, scl_slope=2.0, scl_inter=-1024.0))
    scan = io.load_scan(volume, write(tmp_path / "m.nii", raw_nifti(mask)))
    np.testing.assert_array_equal(scan.image, expected_canonical(2.0 * stored - 1024).astype(np.float32))
    # scl_slope 0 means "no scaling" in the NIfTI standard
    plain = write(tmp_path / "p.nii", raw_nifti(stored, scl_slope=0.0, scl_inter=5.0))
    np.testing.assert_array_equal(io.load_scan(plain, tmp_path / "m.nii").image, expected_canonical(stored).astype(np.float32))


def test_values_that_overflow_float32_are_rejected(tmp_path):
    ct, mask = ct_and_mask()
    huge = ct.astype(np.float64)
    huge[0, 0, 0] = 1e300
    with pytest.raises(InputError, match="overflow float32"):
        io.load_scan(write(tmp_path / "v.nii", raw_nifti(huge)), write(tmp_path / "m.nii", raw_nifti(mask)))


def test_volume_not_in_hounsfield_units_is_warned(tmp_path):
    ct, mask = ct_and_mask()
    raw = np.rint(ct + 1024).astype(np.uint16)  # raw scanner values, no rescale in the header
    with pytest.warns(PipelineWarning, match="no value below 0.*Hounsfield"):
        io.load_scan(write(tmp_path / "v.nii", raw_nifti(raw)), write(tmp_path / "m.nii", raw_nifti(mask)))


def test_rgb_volume_is_rejected(tmp_path):
    ct, mask = ct_and_mask()
    rgb = np.zeros(ct.shape, dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    with pytest.raises(InputError, match="unsupported voxel data type"):
        io.load_scan(write(tmp_path / "v.nii", raw_nifti(rgb)), write(tmp_path / "m.nii", raw_nifti(mask)))


# ----------------------------------------------------------------------------- dimensions


def test_4d_with_one_volume_is_accepted_and_several_are_rejected(tmp_path, pair):
    ct, mask = ct_and_mask()
    one = io.load_scan(write(tmp_path / "v1.nii", raw_nifti(ct[..., None])), pair[1])
    np.testing.assert_array_equal(one.image, io.load_scan(*pair).image)
    with pytest.raises(InputError, match=r"v3.nii: image holds 3 volumes \(shape \(12, 10, 8, 3\)\)"):
        io.load_scan(write(tmp_path / "v3.nii", raw_nifti(np.stack([ct] * 3, axis=-1))), pair[1])


def test_2d_and_single_slice_images_are_rejected(tmp_path, pair):
    ct, _ = ct_and_mask()
    with pytest.raises(InputError, match="image is 2D"):
        io.load_scan(write(tmp_path / "a.nii", raw_nifti(ct[:, :, 0])), pair[1])
    with pytest.raises(InputError, match="single slice"):
        io.load_scan(write(tmp_path / "b.nii", raw_nifti(ct[:, :, :1])), pair[1])


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_header_claiming_1e12_voxels_is_rejected_without_allocating(tmp_path, suffix):
    hdr = nib.Nifti1Header()
    hdr.set_data_dtype(np.int16)
    hdr["dim"] = [3, 10000, 10000, 10000, 1, 1, 1, 1]  # 10^12 voxels, 2 TB of int16
    hdr["pixdim"] = [1, 1, 1, 1, 1, 1, 1, 1]
    hdr["vox_offset"] = 352
    path = write(tmp_path / f"huge{suffix}", hdr.binaryblock + bytes(4) + bytes(1000))
    tracemalloc.start()
    with pytest.raises(InputError, match=r"header claims 1e\+12 voxels"):
        io.read_nifti(path)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 4 * 2**20, f"rejected only after allocating {peak} bytes"


def test_plausible_header_with_missing_data_fails_without_allocating_it(tmp_path):
    """300 x 300 x 300 float64 (216 MB) promised, 1 KB present (gzipped): truncated, no big allocation."""
    hdr = nib.Nifti1Header()
    hdr.set_data_dtype(np.float64)
    hdr.set_data_shape((300, 300, 300))
    hdr["vox_offset"] = 352
    path = write(tmp_path / "short.nii.gz", hdr.binaryblock + bytes(4) + bytes(1000))
    tracemalloc.start()
    with pytest.raises(InputError, match="truncated"):
        io.read_nifti(path)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 8 * 2**20, peak


# ----------------------------------------------------------------------------- masks


def test_float_mask_near_integers_is_rounded_with_a_warning(tmp_path, pair):
    ct, mask = ct_and_mask()
    noisy = mask.astype(np.float32)
    noisy[mask == 1] = np.float32(1.0000001)
    noisy[mask == 2] = np.float32(1.9999999)
    with pytest.warns(PipelineWarning, match="rounded"):
        scan = io.load_scan(pair[0], write(tmp_path / "m.nii", raw_nifti(noisy)))
    assert scan.mask.dtype == np.uint8
    np.testing.assert_array_equal(scan.mask, expected_canonical(mask))


def test_float_mask_with_3_7_is_rejected(tmp_path, pair):
    _, mask = ct_and_mask()
    bad = mask.astype(np.float64)
    bad[mask == 1] = 3.7
    with pytest.raises(InputError, match=r"m.nii: mask has non-integer label values \(e.g. 3.7\)"):
        io.load_scan(pair[0], write(tmp_path / "m.nii", raw_nifti(bad)))


def test_mask_with_nan_is_rejected(tmp_path, pair):
    _, mask = ct_and_mask()
    bad = mask.astype(np.float32)
    bad[0, 0, 0] = np.nan
    with pytest.raises(InputError, match="mask has 1 NaN/Inf voxels"):
        io.load_scan(pair[0], write(tmp_path / "m.nii", raw_nifti(bad)))


def test_extra_labels_are_ignored_with_a_note(tmp_path, pair):
    _, mask = ct_and_mask()
    extra = mask.copy()
    extra[0:2, 0:2, 0:2] = 7  # e.g. a patella label the map does not know
    scan = io.load_scan(pair[0], write(tmp_path / "m.nii", raw_nifti(extra)))
    with pytest.warns(PipelineWarning, match=r"mask labels \[7\] are not in the label map"):
        crops = regions.crop_regions(scan)
    plain = regions.crop_regions(io.load_scan(*pair))
    for a, b in zip(crops[:2], plain[:2]):  # tibia and femur unaffected
        assert a.box == b.box
        np.testing.assert_array_equal(a.array, b.array)


def test_empty_mask_is_rejected(tmp_path, pair):
    _, mask = ct_and_mask()
    with pytest.raises(InputError, match=r"m.nii: mask is empty \(every voxel is 0\)"):
        io.load_scan(pair[0], write(tmp_path / "m.nii", raw_nifti(np.zeros_like(mask))))


def test_mismatched_shapes_are_rejected(tmp_path, pair):
    _, mask = ct_and_mask()
    with pytest.raises(InputError, match=r"m.nii: mask shape \(12, 10, 7\) differs from volume shape \(12, 10, 8\)"):
        io.load_scan(pair[0], write(tmp_path / "m.nii", raw_nifti(mask[:, :, :7])))


def test_affines_that_differ_by_a_flip(tmp_path, pair):
    """A mask stored flipped *with* the matching affine is the same grid: accepted and reoriented.
    The same array under a flipped affine lies elsewhere in the world: rejected."""
    _, mask = ct_and_mask()
    flip = np.diag([-1.0, 1.0, 1.0, 1.0])
    flip[0, 3] = mask.shape[0] - 1  # voxel i -> (n - 1 - i)
    same_grid = AFFINE @ flip  # stored x reversed: the same voxel centres in world space
    stored = write(tmp_path / "flipped.nii", raw_nifti(np.ascontiguousarray(mask[::-1]), same_grid))
    with pytest.warns(PipelineWarning, match="same voxel grid in world space"):
        scan = io.load_scan(pair[0], stored)
    np.testing.assert_array_equal(scan.mask, io.load_scan(*pair).mask)

    mirrored = AFFINE.copy()
    mirrored[0, 0] *= -1  # same origin, x axis reversed: a mirror image
    with pytest.raises(InputError, match=r"mirror.nii: mask affine differs from the volume's .*orientation RPS vs LPS"):
        io.load_scan(pair[0], write(tmp_path / "mirror.nii", raw_nifti(mask, mirrored)))


def test_nifti2_reads_like_nifti1(tmp_path, pair):
    ct, mask = ct_and_mask()
    img = nib.Nifti2Image(ct, AFFINE)
    nib.save(img, str(tmp_path / "v2.nii.gz"))
    np.testing.assert_array_equal(io.load_scan(tmp_path / "v2.nii.gz", pair[1]).image, io.load_scan(*pair).image)


# ----------------------------------------------------------------------------- property: crop stage


def _scan(mask: np.ndarray) -> io.Scan:
    image = np.random.default_rng(0).normal(size=mask.shape).astype(np.float32)
    return io.Scan(image=image, mask=mask, spacing=(1.0, 1.0, 1.0), affine=io.lps_affine((1, 1, 1), mask.shape),
                   source_affine=np.eye(4), source_orientation="LPS", source_shape=mask.shape, volume_path="v",
                   mask_path="m", volume_sha256="", mask_sha256="")  # fmt: skip


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    mask=hnp.arrays(np.uint8, hnp.array_shapes(min_dims=3, max_dims=3, min_side=1, max_side=9),
                    elements=st.integers(0, 4)),  # fmt: skip
    pad=st.integers(0, 6),
    mode=st.sampled_from(regions.CROP_MODES),
    normalize=st.sampled_from(["zscore", "window"]),
    min_size=st.integers(1, 12),
)
def test_random_label_volumes_never_crash_the_crop_stage(mask, pad, mode, normalize, min_size):
    """Any small label volume gives either an InputError naming a missing label, or one region per
    name whose box lies inside the volume, holds all its label's voxels, and whose array is finite."""
    scan = _scan(mask)
    present = set(np.unique(mask).tolist())
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PipelineWarning)  # thin crops, extra labels: expected here
            crops = regions.crop_regions(scan, pad=pad, mode=mode, normalize=normalize, min_size=min_size)
    except InputError as exc:
        assert "has no voxels" in str(exc)
        assert not {1, 2, 0} <= present
        return
    assert {1, 2, 0} <= present
    for crop in crops:
        for (a, b), n in zip(crop.box, mask.shape):
            assert 0 <= a < b <= n
        inside = np.zeros(mask.shape, bool)
        inside[crop.slices] = True
        assert not np.any((mask == crop.label) & ~inside), "the box holds every voxel of its label"
        assert all(s >= min_size for s in crop.array.shape), (crop.array.shape, min_size)
        assert np.all(np.isfinite(crop.array))
        assert crop.label_voxels == int(np.count_nonzero(mask == crop.label))
