"""Automatic femur/tibia mask from the CT alone (``--mask auto``).

Steps, on the canonical ``(d, h, w)`` HU array (d inferior -> superior):

1. **Bone**: voxels >= ``threshold_hu`` (default 200 HU: cortical bone is ~1000-1800 HU,
   trabecular 100-400 HU, soft tissue < 100 HU), closed in-plane by one voxel to bridge
   partial-volume gaps in thin cortex.
2. **Components**: 3D connected components (face connectivity) of at least
   :data:`MIN_COMPONENT_ML`; each one's axial holes are filled slice by slice (the marrow and
   trabecular interior enclosed by cortex), per component so that two bones never merge
   through the soft tissue between them.
3. **Joint space**: femur and tibia are the pair of components that lie one above the other
   (centroids at least :data:`MIN_STACK_MM` apart along the superior axis and overlapping axial
   footprints) with the largest total volume; patella (anterior to the femur) and fibula
   (lateral to the tibia) do not stack and stay background. When femur and tibia touch (one
   component), it is split at the joint space: the component is eroded by growing radii
   (Euclidean distance in mm) until it falls into two stacked parts, and every voxel is then
   given to the nearer part.
4. **Anatomy, not size**: the superior one of the pair, in world coordinates from the affine
   (RAS+ z), is the femur; the other is the tibia. Everything else is background.

:func:`segment_bones` works on arrays; :func:`load_auto` reads a volume, segments it and
prepares the mask file (``<output stem>_automask.nii.gz``, written with the results).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from . import io, regions
from .errors import InputError

DEFAULT_THRESHOLD_HU = 200.0
#: Smallest bone component considered (mL): drops calcifications, noise, small ossicles.
MIN_COMPONENT_ML = 1.0
#: Least distance (mm) along the superior axis between the femur's and tibia's centroids.
MIN_STACK_MM = 15.0
#: Least overlap of the two bones' axial footprints, as a fraction of the smaller one.
MIN_FOOTPRINT_OVERLAP = 0.25
#: Erosion radii (mm) that cut bones touching through thin contacts (joints, partial volume):
#: the first is always applied; the larger ones only while no femur-over-tibia pair is found.
SEPARATION_RADII_MM = (4.0, 6.0, 8.0, 10.0, 12.0)
#: Least fraction of a piece's axial footprint inside a bone's for the piece to continue that bone.
MIN_CONTINUATION_OVERLAP = 0.6
#: Smallest eroded core (mL) that makes its own piece when a component is cut.
MIN_CORE_ML = 0.3
_FACE = ndimage.generate_binary_structure(3, 1)
_FULL = ndimage.generate_binary_structure(3, 3)
_INPLANE = np.zeros((3, 3, 3), bool)
_INPLANE[1] = ndimage.generate_binary_structure(2, 1)


def is_auto(mask: object) -> bool:
    """True for ``--mask auto`` or ``auto:HU`` (threshold in HU)."""
    return isinstance(mask, str) and (mask == "auto" or mask.startswith("auto:"))


def parse_auto(spec: str) -> float:
    """Threshold (HU) of ``auto`` / ``auto:HU``."""
    if spec == "auto":
        return DEFAULT_THRESHOLD_HU
    try:
        return float(spec.split(":", 1)[1])
    except ValueError:
        raise InputError(f"--mask: expected auto or auto:HU (bone threshold in HU), got {spec!r}") from None


def automask_path(output: str | Path) -> Path:
    """Where the generated mask goes: ``results.csv`` -> ``results_automask.nii.gz`` next to it."""
    out = Path(output)
    return out.with_name(out.stem + "_automask.nii.gz")


@dataclasses.dataclass
class _Part:
    """One bone candidate: its mask within its own bounding box, placed at ``offset`` (voxels)."""

    mask: np.ndarray  #: bool (d, h, w) within the box
    offset: tuple[int, int, int]  #: canonical voxel index of mask[0, 0, 0]
    voxels: int
    centroid_mm: float  #: superior (world RAS+ z) coordinate of the centroid, mm
    lowest_mm: float  #: most inferior world z of the part, mm
    highest_mm: float  #: most superior world z of the part, mm
    footprint: np.ndarray  #: bool (H, W) of the whole scan: the part's axial projection


def _part(mask: np.ndarray, offset: tuple[int, int, int], affine: np.ndarray, hw: tuple[int, int]) -> _Part:
    """Describe a bone candidate (world coordinates through ``affine``: anatomy, not array order)."""
    if mask.any():
        mask, offset = _trim(mask, offset)
    lo = np.asarray(offset)
    idx = np.nonzero(mask)
    coords = np.stack([i + o for i, o in zip(idx, lo)]).astype(np.float64)  # (3, n) canonical voxel indices
    z = affine[2, :3] @ coords + affine[2, 3]  # world superior coordinate of every voxel
    footprint = np.zeros(hw, bool)
    footprint[idx[1] + lo[1], idx[2] + lo[2]] = True
    return _Part(mask, tuple(int(v) for v in lo), int(idx[0].size), float(z.mean()), float(z.min()), float(z.max()), footprint)


def _trim(mask: np.ndarray, offset: tuple[int, int, int]) -> tuple[np.ndarray, tuple[int, int, int]]:
    sl = ndimage.find_objects(mask.astype(np.uint8))[0]
    return mask[sl], tuple(int(o + s.start) for o, s in zip(offset, sl))  # type: ignore[return-value]


def _femur_tibia(a: _Part, b: _Part) -> tuple[_Part, _Part] | None:
    """(femur, tibia) when one part lies on top of the other, else None.

    On top: the upper part's lowest point is above the lower part's centroid, the lower part's
    highest point is below the upper part's centroid (they meet at a joint, neither wraps the
    other), and their axial footprints overlap. The upper one is the femur.
    """
    upper, lower = (a, b) if a.centroid_mm > b.centroid_mm else (b, a)
    if not (upper.lowest_mm > lower.centroid_mm and lower.highest_mm < upper.centroid_mm):
        return None
    if upper.centroid_mm - lower.centroid_mm < MIN_STACK_MM:
        return None
    overlap = np.count_nonzero(upper.footprint & lower.footprint)
    if overlap < MIN_FOOTPRINT_OVERLAP * min(np.count_nonzero(upper.footprint), np.count_nonzero(lower.footprint)):
        return None
    return upper, lower


def _best_pair(parts: list[_Part]) -> tuple[_Part, _Part] | None:
    """The femur-over-tibia pair with the largest total volume among ``parts``."""
    pairs = [p for i, a in enumerate(parts) for b in parts[i + 1 :] if (p := _femur_tibia(a, b))]
    return max(pairs, key=lambda p: p[0].voxels + p[1].voxels) if pairs else None


def _continues(piece: _Part, bone: _Part, upward: bool) -> bool:
    """True when ``piece`` prolongs ``bone`` along the limb (a shaft cut off at a thin junction):
    entirely beyond the bone's centroid (above it for the femur, below for the tibia) and
    mostly within the bone's axial footprint. A patella (anterior) or fibula (lateral) is not."""
    beyond = piece.lowest_mm >= bone.centroid_mm if upward else piece.highest_mm <= bone.centroid_mm
    inside = np.count_nonzero(piece.footprint & bone.footprint)
    return beyond and inside >= MIN_CONTINUATION_OVERLAP * np.count_nonzero(piece.footprint)


def _fill_planes(mask: np.ndarray) -> np.ndarray:
    """Fill holes in axial slices, then in coronal and sagittal ones: interior closed off in any
    of the three planes (a cap whose thin shell leaks in its own axial slice is still enclosed
    by the slices above and below it)."""
    filled = _fill_axial(mask)
    for order in ((1, 0, 2), (2, 1, 0)):  # coronal (h first), sagittal (w first)
        filled = _fill_axial(filled.transpose(order)).transpose(order)
    return filled


def _fill_axial(mask: np.ndarray) -> np.ndarray:
    """Fill holes slice by slice along d: background not 4-connected to the slice's border (the
    bone counts as 8-connected in-plane, so a ring closed only diagonally still encloses)."""
    background, _ = ndimage.label(~mask, structure=_INPLANE)
    border = np.unique(np.concatenate([background[:, 0].ravel(), background[:, -1].ravel(),
                                       background[:, :, 0].ravel(), background[:, :, -1].ravel()]))  # fmt: skip
    holes = background > 0
    holes &= ~np.isin(background, border)
    return mask | holes


def _separate(part: _Part, depth: np.ndarray, radius: float, spacing: tuple[float, float, float],
              affine: np.ndarray, hw: tuple[int, int]) -> list[_Part]:  # fmt: skip
    """Cut ``part`` where it is thinner than ``2 * radius`` mm: cores = voxels deeper than
    ``radius`` (``depth``: distance to the outside, mm), one piece per core of at least
    :data:`MIN_CORE_ML`, every voxel of the part given to the nearest such core."""
    voxel_ml = float(np.prod(spacing)) / 1000.0
    core, n = ndimage.label(depth > radius, structure=_FACE)
    if n <= 1:
        return [part]
    sizes = np.bincount(core.ravel())
    sizes[0] = 0
    big = [int(i) for i in np.flatnonzero(sizes * voxel_ml >= MIN_CORE_ML)]
    if len(big) <= 1:
        return [part]
    seeds = np.zeros(core.shape, np.uint8)
    for value, i in enumerate(big, start=1):
        seeds[core == i] = value
    del core
    _, nearest = ndimage.distance_transform_edt(seeds == 0, sampling=spacing, return_indices=True)
    owner = seeds[tuple(nearest)]
    del nearest
    offset = tuple(o - 1 for o in part.offset)
    padded = np.pad(part.mask, 1)
    return [_part(padded & (owner == v), offset, affine, hw) for v in range(1, len(big) + 1)]  # type: ignore[arg-type]


def segment_bones(
    image: np.ndarray,
    affine: np.ndarray,
    threshold_hu: float = DEFAULT_THRESHOLD_HU,
    labels: Mapping[str, int] | None = None,
    source: str = "volume",
) -> tuple[np.ndarray, dict[str, Any]]:
    """Femur/tibia label mask of a canonical (d, h, w) HU ``image`` with canonical ``affine``.

    ``labels``: the label map (default tibia=1, femur=2, background=0). Returns the mask
    (uint8, or int32 for labels that need it) and a record of what was done. Raises
    :class:`InputError` (naming ``source``) when no femur above a tibia can be found.
    """
    labels = dict(labels or regions.DEFAULT_LABELS)
    spacing = io.spacing_of(affine)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    hw = (int(image.shape[1]), int(image.shape[2]))
    bone = image >= np.float32(threshold_hu)
    if not bone.any():
        raise InputError(f"{source}: auto mask: no voxel reaches the bone threshold of {threshold_hu:g} HU "
                         "(is the volume in HU?); give --mask, or auto:HU with a lower threshold")  # fmt: skip
    # working box: the bone's bounding box with one voxel of zero margin on every side
    box, origin = _trim(bone, (0, 0, 0))
    del bone
    box = np.pad(box, 1)
    origin = (origin[0] - 1, origin[1] - 1, origin[2] - 1)
    box = ndimage.binary_closing(box, structure=_INPLANE)
    comps, n = ndimage.label(box, structure=_FULL)
    del box
    sizes = np.bincount(comps.ravel())
    sizes[0] = 0
    objects = ndimage.find_objects(comps)
    parts = []
    for i in [int(i) for i in np.argsort(sizes)[::-1][:6] if sizes[i] * voxel_ml >= MIN_COMPONENT_ML]:
        sl = objects[i - 1]
        filled = _fill_planes(np.pad(comps[sl] == i, 1))
        offset = tuple(o + s.start - 1 for o, s in zip(origin, sl))
        parts.append(_part(filled, offset, affine, hw))  # type: ignore[arg-type]
    del comps
    parts.sort(key=lambda p: -p.voxels)
    record: dict[str, Any] = {"step": "automask", "threshold_hu": threshold_hu, "components": int(n),
                              "candidates_ml": [round(p.voxels * voxel_ml, 1) for p in parts]}  # fmt: skip
    depths = [ndimage.distance_transform_edt(np.pad(p.mask, 1), sampling=spacing) for p in parts]
    pair = None
    for radius in SEPARATION_RADII_MM:
        pieces = [q for p, d in zip(parts, depths) for q in _separate(p, d, radius, spacing, affine, hw)]
        pieces.sort(key=lambda p: -p.voxels)
        pair = _best_pair(pieces[:6])
        if pair is not None:
            record["separation_radius_mm"] = radius
            break
    del depths
    if pair is None:
        raise InputError(
            f"{source}: auto mask: found no femur above a tibia among the bone above {threshold_hu:g} HU "
            f"(components of {record['candidates_ml']} mL); give --mask, or auto:HU with another threshold"
        )
    femur, tibia = pair
    rest = [p for p in pieces if p is not femur and p is not tibia]
    femur_parts = [femur, *(p for p in rest if _continues(p, femur, upward=True))]
    tibia_parts = [tibia, *(p for p in rest if _continues(p, tibia, upward=False))]
    values = (labels["background"], labels["femur"], labels["tibia"])
    dtype = np.uint8 if min(values) >= 0 and max(values) <= 255 else np.int32
    out = np.full(image.shape, labels["background"], dtype=dtype)
    for group, value in ((tibia_parts, labels["tibia"]), (femur_parts, labels["femur"])):
        for part in group:
            o, m = part.offset, part.mask
            out[o[0] : o[0] + m.shape[0], o[1] : o[1] + m.shape[1], o[2] : o[2] + m.shape[2]][m] = value
    n_femur, n_tibia = (sum(p.voxels for p in g) for g in (femur_parts, tibia_parts))
    other = sum(p.voxels for p in parts) - n_femur - n_tibia  # patella, fibula, fragments
    record |= {
        "femur_ml": round(n_femur * voxel_ml, 1),
        "tibia_ml": round(n_tibia * voxel_ml, 1),
        "pieces_joined": {"femur": len(femur_parts) - 1, "tibia": len(tibia_parts) - 1},
        "femur_above_tibia_mm": round(femur.centroid_mm - tibia.centroid_mm, 1),
        "unlabelled_bone_ml": round(max(other, 0) * voxel_ml, 1),
        "labels": {"femur": labels["femur"], "tibia": labels["tibia"], "background": labels["background"]},
    }
    return out, record


def load_auto(volume: str | Path, spec: str = "auto", labels: Mapping[str, int] | None = None,
              mask_path: str | Path = "automask.nii.gz") -> io.Scan:  # fmt: skip
    """Read ``volume``, segment femur and tibia (:func:`segment_bones`), and return the
    :class:`~helpers.io.Scan` with that mask. The mask's file bytes (NIfTI, canonical L, P, S
    storage, same world grid as the volume) are kept in ``scan.mask_payload`` for
    ``mask_path``: the pipeline writes them with the results, all-or-nothing."""
    scan = io.load_volume(volume)
    mask, record = segment_bones(scan.image, scan.affine, parse_auto(spec), labels, str(volume))
    payload = io.nifti_bytes(mask, scan.affine)
    record["file"] = str(mask_path)
    return dataclasses.replace(
        scan,
        mask=mask,
        mask_path=str(mask_path),
        mask_sha256=hashlib.sha256(payload).hexdigest(),
        mask_payload=payload,
        processing=[*scan.processing, record],
    )


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap ``2|A & B| / (|A| + |B|)`` of two boolean masks (1.0 when both are empty)."""
    total = int(np.count_nonzero(a)) + int(np.count_nonzero(b))
    return 1.0 if total == 0 else 2.0 * int(np.count_nonzero(a & b)) / total
