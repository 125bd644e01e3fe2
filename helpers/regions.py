"""Regions of the label map: bounding boxes, crops, normalisation, minimum-size padding.

All arrays are in the canonical ``(d, h, w)`` frame of :mod:`helpers.io`; boxes are half-open
voxel ranges ``((d0, d1), (h0, h1), (w0, w1))``.

Crop modes
    ``bbox``   (the seed's behaviour) everything inside the region's bounding box +- ``pad``.
               The background's box is the whole scan, *bones included*.
    ``masked`` (default) the same box, but voxels outside the region's label are set to the
               neutral value 0 after normalisation (the normalisation statistics come from the
               region's own voxels). The background then excludes the labelled bones.

Normalisation
    ``zscore``        (the seed's) ``(x - mean) / std`` over the crop (``bbox``) or over the
                      region's voxels (``masked``); a constant crop gets std 1 with a warning.
    ``window[:L,W]``  a fixed HU window, level ``L`` and width ``W`` (default bone window
                      400,1800): clip to ``[L - W/2, L + W/2]``, map to [0, 1], then standardise
                      with ImageNet's grey mean 0.449 and std 0.226 (the means of its RGB
                      statistics), which is what the summed-RGB conv0 expects.

In both, 0 is the neutral value used for masked-out voxels and for padding.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from .errors import InputError, warn
from .io import Scan, label_counts

DEFAULT_LABELS: dict[str, int] = {"tibia": 1, "femur": 2, "background": 0}
REGION_NAMES: tuple[str, ...] = ("tibia", "femur", "background")
CROP_MODES = ("bbox", "masked")
DEFAULT_WINDOW = (400.0, 1800.0)
IMAGENET_GREY_MEAN, IMAGENET_GREY_STD = 0.449, 0.226

Box = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]


@dataclass(frozen=True, eq=False)
class Region:
    """One region's network input and where it came from."""

    name: str
    label: int
    box: Box  #: half-open voxel ranges in the canonical scan (after +-pad and clipping)
    array: np.ndarray  #: float32 (d, h, w), normalised, padded up to the network's minimum size
    crop_shape: tuple[int, int, int]  #: shape of the crop before minimum-size padding
    label_voxels: int  #: voxels carrying the region's label in the whole scan
    stats: dict[str, float] = field(default_factory=dict)  #: normalisation parameters used

    @property
    def slices(self) -> tuple[slice, slice, slice]:
        return tuple(slice(a, b) for a, b in self.box)  # type: ignore[return-value]


def parse_labels(spec: str | Mapping[str, int] | None) -> dict[str, int]:
    """Label map from ``"tibia=2,femur=1"`` (or a dict), over the defaults tibia=1, femur=2, background=0."""
    labels = dict(DEFAULT_LABELS)
    if spec is None or spec == "":
        return labels
    items: Mapping[str, int | str]
    if isinstance(spec, str):
        items = {}
        for part in spec.split(","):
            name, sep, value = part.partition("=")
            if not sep:
                raise InputError(f"--labels: expected name=value pairs like tibia=2,femur=1, got {part!r}")
            items[name.strip()] = value.strip()  # type: ignore[index]
    else:
        items = spec
    for name, value in items.items():
        if name not in DEFAULT_LABELS:
            raise InputError(f"--labels: unknown region {name!r}; regions are {', '.join(REGION_NAMES)}")
        try:
            labels[name] = int(value)
        except (TypeError, ValueError):
            raise InputError(f"--labels: label of {name} must be an integer, got {value!r}") from None
    if len(set(labels.values())) != len(labels):
        raise InputError(f"--labels: two regions share a label value: {labels}")
    return labels


def parse_normalize(spec: str) -> tuple[str, tuple[float, float] | None]:
    """``"zscore"`` -> ("zscore", None); ``"window"`` or ``"window:L,W"`` -> ("window", (L, W)) in HU."""
    if spec == "zscore":
        return "zscore", None
    if spec == "window":
        return "window", DEFAULT_WINDOW
    if spec.startswith("window:"):
        try:
            level, width = (float(v) for v in spec[len("window:") :].split(","))
        except ValueError:
            raise InputError(f"--normalize: expected window:LEVEL,WIDTH in HU, got {spec!r}") from None
        if width <= 0:
            raise InputError(f"--normalize: window width must be positive, got {width:g}")
        return "window", (level, width)
    raise InputError(f"--normalize: expected zscore, window or window:LEVEL,WIDTH, got {spec!r}")


def bounding_box(mask: np.ndarray, label: int, pad: int = 5) -> Box:
    """Bounding box of ``mask == label`` grown by ``pad`` voxels per side and clipped to the volume.

    Raises :class:`ValueError` when the label has no voxels.
    """
    hit = mask == label
    box = []
    for axis in range(3):
        others = tuple(a for a in range(3) if a != axis)
        idx = np.flatnonzero(hit.any(axis=others))
        if idx.size == 0:
            raise ValueError(f"label {label} has no voxels")
        box.append((max(int(idx[0]) - pad, 0), min(int(idx[-1]) + 1 + pad, mask.shape[axis])))
    return tuple(box)  # type: ignore[return-value]


def _moments(values: np.ndarray, inside: np.ndarray | None) -> tuple[float, float, int]:
    """Mean, standard deviation and count of ``values[inside]``, accumulated in float64 slab by
    slab (no full-size temporaries)."""
    n, s1, s2 = 0, 0.0, 0.0
    for d in range(0, values.shape[0], 16):
        v = values[d : d + 16].astype(np.float64)
        w = None if inside is None else inside[d : d + 16]
        n += v.size if w is None else int(np.count_nonzero(w))
        s1 += float(np.add.reduce(v, axis=None, where=True if w is None else w))
        np.multiply(v, v, out=v)
        s2 += float(np.add.reduce(v, axis=None, where=True if w is None else w))
    mean = s1 / max(n, 1)
    return mean, max(s2 / max(n, 1) - mean * mean, 0.0) ** 0.5, n


def normalise(
    crop: np.ndarray, inside: np.ndarray | None, method: str, window: tuple[float, float] | None, name: str = "crop"
) -> tuple[np.ndarray, dict[str, float]]:
    """Normalise a HU crop in place-friendly float32 (see module doc); ``inside`` marks the region
    (``masked`` mode) and everything else becomes 0. Returns (array, parameters used)."""
    out = np.array(crop, dtype=np.float32, copy=True)
    if method == "zscore":
        mean, std, _ = _moments(out, inside)
        if std < 1e-6:
            warn(f"{name}: crop has constant intensity {mean:g} HU; z-score uses std 1")
            std = 1.0
        out -= np.float32(mean)
        out /= np.float32(std)
        stats = {"mean_hu": mean, "std_hu": std}
    else:
        level, width = window or DEFAULT_WINDOW
        lo = level - width / 2
        np.clip(out, lo, lo + width, out=out)
        out -= np.float32(lo)
        out *= np.float32(1.0 / (width * IMAGENET_GREY_STD))
        out -= np.float32(IMAGENET_GREY_MEAN / IMAGENET_GREY_STD)
        stats = {"level_hu": level, "width_hu": width}
    if inside is not None:
        np.multiply(out, inside, out=out)  # outside the region -> the neutral value 0
    return out, stats


def pad_to_min_size(array: np.ndarray, min_size: int, name: str = "crop") -> np.ndarray:
    """Pad each axis shorter than ``min_size`` at its far end with the neutral value 0, warning."""
    short = [max(min_size - n, 0) for n in array.shape]
    if not any(short):
        return array
    padded = np.pad(array, [(0, s) for s in short], constant_values=0.0)
    warn(
        f"{name} crop {tuple(array.shape)} is thinner than the network's minimum of {min_size} voxels "
        f"per axis; padded with the neutral value to {tuple(padded.shape)}"
    )
    return padded


def check_label_order(scan: Scan, labels: Mapping[str, int]) -> None:
    """Warn when the labelled femur lies below the labelled tibia (depth is +S in the canonical frame)."""
    centres = {}
    for name in ("tibia", "femur"):
        per_slice = np.count_nonzero(scan.mask == labels[name], axis=(1, 2))
        if per_slice.sum() == 0:
            return
        centres[name] = float(np.average(np.arange(per_slice.size), weights=per_slice))
    if centres["femur"] < centres["tibia"]:
        warn(
            f"{scan.mask_path}: labels look swapped: the femur (label {labels['femur']}) lies below the tibia "
            f"(label {labels['tibia']}) along the superior axis; check --labels (e.g. tibia={labels['femur']},"
            f"femur={labels['tibia']})"
        )


def crop_region(
    scan: Scan,
    name: str,
    label: int,
    pad: int = 5,
    mode: str = "masked",
    normalize: str = "zscore",
    min_size: int = 1,
    label_voxels: int | None = None,
) -> Region:
    """Crop, normalise and pad one region of ``scan`` (see the module doc for modes)."""
    if mode not in CROP_MODES:
        raise InputError(f"--crop: expected one of {', '.join(CROP_MODES)}, got {mode!r}")
    if pad < 0:
        raise InputError(f"--pad: must be >= 0 voxels, got {pad}")
    method, window = parse_normalize(normalize)
    try:
        box = bounding_box(scan.mask, label, pad)
    except ValueError:
        raise InputError(f"{scan.mask_path}: {name} label {label} has no voxels (check --labels)") from None
    sl = tuple(slice(a, b) for a, b in box)
    inside = scan.mask[sl] == label if mode == "masked" else None
    array, stats = normalise(scan.image[sl], inside, method, window, name)
    crop_shape = tuple(int(n) for n in array.shape)
    array = pad_to_min_size(array, min_size, name)
    if label_voxels is None:
        label_voxels = int(np.count_nonzero(inside if inside is not None else scan.mask[sl] == label))
    return Region(name, label, box, array, crop_shape, label_voxels, stats)  # type: ignore[arg-type]


def crop_regions(
    scan: Scan,
    labels: Mapping[str, int] | str | None = None,
    pad: int = 5,
    mode: str = "masked",
    normalize: str = "zscore",
    min_size: int = 1,
    names: Sequence[str] = REGION_NAMES,
) -> list[Region]:
    """Crop every region (tibia, femur, background by default) of ``scan``.

    ``min_size`` is the network's smallest input edge (``inflate.min_input_size``); thinner
    crops are padded up to it with a warning. Mask labels outside the map are ignored (they
    belong to no region) with a note, and a femur below the tibia triggers a swap warning.
    """
    labels = parse_labels(labels) if not isinstance(labels, Mapping) else dict(labels)
    counts = label_counts(scan.mask)
    for name in names:  # an empty label is the error, before any crop or warning is printed
        if labels[name] not in counts:
            raise InputError(f"{scan.mask_path}: {name} label {labels[name]} has no voxels (check --labels)")
    extra = sorted(set(counts) - set(labels.values()))
    if extra:
        warn(f"{scan.mask_path}: mask labels {extra} are not in the label map {labels}; they belong to no region")
    check_label_order(scan, labels)
    return [crop_region(scan, n, labels[n], pad, mode, normalize, min_size, counts.get(labels[n], 0)) for n in names]
