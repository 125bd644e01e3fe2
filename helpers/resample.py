"""Resampling a canonical scan to a chosen voxel spacing (``--spacing MM``).

CT is interpolated linearly, the label mask by nearest neighbour (labels are never blended).
The new grid covers the same field of view: ``round(n * old / new)`` voxels per axis, centred
on the old grid, so the scan neither shifts nor shrinks; the affine is updated consistently
(columns scaled to the new spacing, origin moved to the new first voxel centre). Voxels at the
border that fall just outside the old grid take the nearest edge value.

Spacings given by the user are ``x y z`` in mm (patient right-left, anterior-posterior,
inferior-superior: the order scanners and viewers print, e.g. ``0.87 0.87 2.0``); internally,
like everything in :mod:`helpers.io`, they are ``(d, h, w)`` = ``(z, y, x)``.

Default is the native grid (the seed's behaviour). Use ``--spacing`` for anisotropic scans
(typical 0.87 x 0.87 x 2.0 mm) so that the cubic 3D kernels see the same physical extent along
every axis, to compare scans with different spacings, or ``--spacing`` coarser than native to
cut memory and time (the forward scales with the voxel count).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from .errors import InputError
from .io import MAX_VOXELS, Scan, spacing_of

#: Smallest and largest spacing accepted (mm).
SPACING_RANGE_MM = (0.05, 50.0)


def parse_spacing(spec: float | str | Sequence[float | str] | None) -> tuple[float, float, float] | None:
    """``--spacing`` -> (d, h, w) mm, or None for the native grid.

    Accepts one value (isotropic) or three given as ``x y z`` (mm), as a number, a string
    (``"1"``, ``"0.8,0.8,2"``, ``"0.8 0.8 2"``) or a sequence of those.
    """
    if spec is None or spec == "" or (isinstance(spec, Sequence) and not isinstance(spec, str) and not spec):
        return None
    parts: list[str] = []
    for item in [spec] if isinstance(spec, (str, int, float)) else list(spec):
        parts += str(item).replace(",", " ").split()
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise InputError(f"--spacing: expected 1 or 3 numbers in mm (x y z), got {' '.join(parts)!r}") from None
    if len(values) == 1:
        values *= 3
    if len(values) != 3:
        raise InputError(f"--spacing: expected 1 or 3 numbers in mm (x y z), got {len(values)}: {' '.join(parts)}")
    lo, hi = SPACING_RANGE_MM
    if not all(np.isfinite(v) and lo <= v <= hi for v in values):
        raise InputError(f"--spacing: every value must be between {lo:g} and {hi:g} mm, got {values}")
    x, y, z = values
    return (z, y, x)


def resampled_grid(
    shape: Sequence[int], spacing: Sequence[float], new_spacing: Sequence[float]
) -> tuple[tuple[int, int, int], np.ndarray, np.ndarray]:
    """New shape, zoom (old voxels per new voxel) and offset (old-voxel position of new voxel 0)
    per (d, h, w) axis for resampling a grid of ``shape``/``spacing`` to ``new_spacing`` (mm)."""
    n = np.asarray(shape, dtype=np.float64)
    zoom = np.asarray(new_spacing, dtype=np.float64) / np.asarray(spacing, dtype=np.float64)
    new_shape = np.maximum(np.rint(n / zoom), 1).astype(np.int64)
    offset = (n - 1) / 2 - (new_shape - 1) / 2 * zoom
    return tuple(int(v) for v in new_shape), zoom, offset  # type: ignore[return-value]


def resample_scan(scan: Scan, spacing: float | str | Sequence[float | str] | None) -> Scan:
    """``scan`` on a grid of ``spacing`` (see :func:`parse_spacing`; x y z mm): CT linear, mask
    nearest, same field of view; the step is appended to ``scan.processing``.

    Raises :class:`InputError` when the new grid would be larger than :data:`helpers.io.MAX_VOXELS`
    or than the memory available.
    """
    target = parse_spacing(spacing)
    if target is None:
        return scan
    old = scan.spacing
    new_shape, zoom, offset = resampled_grid(scan.shape, old, target)
    step = {
        "step": "resample",
        "spacing_mm_from": list(old),
        "spacing_mm": list(target),
        "shape_from": list(scan.shape),
        "shape": list(new_shape),
        "image_interpolation": "linear",
        "mask_interpolation": "nearest",
        "axes": "d, h, w",
    }
    if new_shape == scan.shape and np.allclose(zoom, 1.0, rtol=0, atol=1e-3):  # within 0.1%: keep the native grid
        step["unchanged"] = True
        return _replace(scan, scan.image, scan.mask, scan.affine, step)
    nvox = int(np.prod(new_shape, dtype=np.float64))
    need = nvox * (4 + scan.mask.dtype.itemsize)
    if nvox > MAX_VOXELS or need > _available_bytes():
        raise InputError(
            f"{scan.volume_path}: --spacing {'x'.join(f'{v:g}' for v in target[::-1])} mm gives "
            f"{'x'.join(map(str, new_shape))} voxels ({need / 2**30:.1f} GiB to resample); choose a coarser spacing"
        )
    image = ndimage.affine_transform(
        scan.image, zoom, offset, output_shape=new_shape, output=np.float32, order=1, mode="nearest", prefilter=False
    )
    mask = ndimage.affine_transform(
        np.ascontiguousarray(scan.mask), zoom, offset, output_shape=new_shape, output=scan.mask.dtype, order=0,
        mode="nearest", prefilter=False,
    )  # fmt: skip
    affine = np.array(scan.affine, dtype=np.float64)
    affine[:3, 3] = affine[:3, :3] @ offset + affine[:3, 3]
    affine[:3, :3] = affine[:3, :3] * zoom[None, :]
    return _replace(scan, image, mask, affine, step)


def _replace(scan: Scan, image: np.ndarray, mask: np.ndarray, affine: np.ndarray, step: dict) -> Scan:
    import dataclasses

    return dataclasses.replace(
        scan, image=image, mask=mask, affine=affine, spacing=spacing_of(affine), processing=[*scan.processing, step]
    )


def _available_bytes() -> int:
    from .memory import available_bytes

    return available_bytes("cpu")
