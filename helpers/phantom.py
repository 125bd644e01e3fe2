"""A synthetic left-knee CT in Hounsfield units with its label mask (the embedded default scan).

Anatomy, in mm around the joint line (z = 0, +z superior, +y posterior, +x patient left,
so a left knee's lateral side is +x):

* femur above: diaphysis (cortical tube around fatty marrow), flaring metaphysis and two
  condyles (medial -x, lateral +x) ending ~3 mm above the joint line;
* tibia below: plateau ~2 mm below the joint line, metaphysis, diaphysis;
* patella in front of the femoral condyles and fibula (head and shaft) lateral-posterior to
  the tibia: bone in the CT but **unlabelled** in the mask, so they belong to background;
* every bone has a cortical shell (~1300 HU) around trabecular bone (~250 HU with texture)
  or marrow; around them muscle (~45 HU), a subcutaneous fat ring (~-100 HU), air outside
  (-1000 HU); Gaussian noise (sd 15 HU). Deterministic from ``seed``.

Presets: ``small`` (64 x 96 x 96 voxels, 3.0 x 2.0 x 2.0 mm; for tests and the demo) and
``full`` (216 x 512 x 512, 2.0 x 0.869 x 0.869 mm; clinical scale). Shapes and spacings are
(d, h, w) in the canonical frame of :mod:`helpers.io`; files are written LPS like the real scan.
Labels: tibia = 1, femur = 2, background = 0.

Command line: ``python -m helpers.phantom --preset small --out data/``.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import io

TIBIA, FEMUR = 1, 2
HU = {"air": -1000.0, "fat": -100.0, "muscle": 45.0, "cortical": 1300.0, "trabecular": 250.0, "marrow": -30.0}


@dataclass(frozen=True)
class Preset:
    shape: tuple[int, int, int]  #: voxels (d, h, w)
    spacing: tuple[float, float, float]  #: mm (d, h, w)


PRESETS = {
    "small": Preset(shape=(64, 96, 96), spacing=(3.0, 2.0, 2.0)),
    "full": Preset(shape=(216, 512, 512), spacing=(2.0, 0.869, 0.869)),
}


@dataclass(frozen=True, eq=False)
class Phantom:
    image: np.ndarray  #: float32 HU (d, h, w)
    mask: np.ndarray  #: uint8 labels (d, h, w)
    affine: np.ndarray  #: canonical affine (see helpers.io)
    spacing: tuple[float, float, float]


# Each solid: (kind, centre xyz mm, semi-axes xyz mm, z-range for cylinders, cortical thickness mm).
# Ellipsoid: ((x-cx)/ax)^2 + ((y-cy)/ay)^2 + ((z-cz)/az)^2 <= 1.
# Cylinder along z: ((x-cx)/ax)^2 + ((y-cy)/ay)^2 <= 1 and z0 <= z <= z1.
_FEMUR = [
    ("cyl", (0.0, 5.0), (14.0, 14.0), (55.0, 1e9), 4.0),
    ("ell", (0.0, 5.0, 42.0), (31.0, 22.0, 30.0), None, 1.5),
    ("ell", (-20.0, 8.0, 22.0), (17.0, 27.0, 19.0), None, 1.5),
    ("ell", (20.0, 8.0, 22.0), (17.0, 27.0, 19.0), None, 1.5),
]
_TIBIA = [
    ("ell", (0.0, 8.0, -14.0), (38.0, 28.0, 12.0), None, 1.5),
    ("ell", (-2.0, 9.0, -38.0), (26.0, 22.0, 28.0), None, 1.5),
    ("cyl", (-3.0, 10.0), (13.0, 12.0), (-1e9, -45.0), 4.0),
]
_PATELLA = [("ell", (0.0, -40.0, 26.0), (20.0, 9.0, 22.0), None, 1.5)]
_FIBULA = [
    ("ell", (38.0, 26.0, -24.0), (9.0, 9.0, 10.0), None, 1.2),
    ("cyl", (39.0, 27.0), (6.0, 6.0), (-1e9, -26.0), 2.0),
]


def _grid(shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> tuple[np.ndarray, ...]:
    """Open-mesh world coordinates (z, y, x) in mm of the canonical (d, h, w) grid, centred."""
    axes = [((np.arange(n, dtype=np.float32) - (n - 1) / 2) * s) for n, s in zip(shape, spacing)]
    return axes[0][:, None, None], axes[1][None, :, None], axes[2][None, None, :]


def _inside(solid: tuple, z: np.ndarray, y: np.ndarray, x: np.ndarray, shrink: float = 0.0) -> np.ndarray:
    kind, centre, semi, zrange, _ = solid
    if kind == "ell":
        (cx, cy, cz), (ax, ay, az) = centre, (s - shrink for s in semi)
        return ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 + ((z - cz) / az) ** 2 <= 1.0
    (cx, cy), (ax, ay) = centre, (s - shrink for s in semi)
    return (((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 <= 1.0) & (z >= zrange[0]) & (z <= zrange[1])


def _bone(solids: list, z: np.ndarray, y: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(outer, inner) masks of a union of solids; cortex = outer & ~inner."""
    outer = np.zeros(np.broadcast_shapes(z.shape, y.shape, x.shape), dtype=bool)
    inner = np.zeros_like(outer)
    for solid in solids:
        outer |= _inside(solid, z, y, x)
        inner |= _inside(solid, z, y, x, shrink=solid[4])
    return outer, inner


def make_phantom(preset: str = "small", seed: int = 0) -> Phantom:
    """Build the synthetic knee (HU image, label mask, canonical affine) for ``preset``."""
    if preset not in PRESETS:
        raise ValueError(f"unknown phantom preset {preset!r}; choose from {sorted(PRESETS)}")
    p = PRESETS[preset]
    rng = np.random.default_rng(seed)
    z, y, x = _grid(p.shape, p.spacing)
    image = np.full(p.shape, HU["air"], dtype=np.float32)
    mask = np.zeros(p.shape, dtype=np.uint8)

    # Limb: elliptical cross-section widening slightly towards the thigh; fat ring 8 mm.
    grow = 1.0 + 0.0008 * z
    limb = (x / (62.0 * grow)) ** 2 + ((y - 2.0) / (56.0 * grow)) ** 2
    image[limb <= 1.0] = HU["fat"]
    muscle = (x / (62.0 * grow - 8.0)) ** 2 + ((y - 2.0) / (56.0 * grow - 8.0)) ** 2 <= 1.0
    image[muscle] = HU["muscle"]
    del limb, muscle

    # Trabecular texture: a few random plane waves (cheap, smooth, deterministic).
    freqs = rng.uniform(0.25, 0.6, size=(4, 3)).astype(np.float32)
    phases = rng.uniform(0, 2 * np.pi, size=(4, 3)).astype(np.float32)

    def texture(zz: np.ndarray, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
        t = np.zeros(np.broadcast_shapes(zz.shape, yy.shape, xx.shape), dtype=np.float32)
        for f, ph in zip(freqs, phases):
            t += np.sin(f[0] * xx + ph[0]) * np.sin(f[1] * yy + ph[1]) * np.sin(f[2] * zz + ph[2])
        return 60.0 * t

    for solids, label, shaft_marrow in ((_FEMUR, FEMUR, 60.0), (_TIBIA, TIBIA, -50.0), (_PATELLA, 0, None), (_FIBULA, 0, None)):
        outer, inner = _bone(solids, z, y, x)
        image[outer] = HU["cortical"]
        core = np.broadcast_to(texture(z, y, x), p.shape)[inner] + HU["trabecular"]
        if shaft_marrow is not None:  # fatty marrow in the diaphysis, far from the joint
            far = np.broadcast_to((z > shaft_marrow) if shaft_marrow > 0 else (z < shaft_marrow), p.shape)[inner]
            core = np.where(far, HU["marrow"], core)
        image[inner] = core
        if label:
            mask[outer] = label
        del outer, inner, core

    noise = rng.standard_normal(size=p.shape, dtype=np.float32)
    noise *= 15.0
    image += noise
    del noise
    np.rint(image, out=image)
    affine = io.lps_affine(p.spacing, p.shape)
    return Phantom(image=image, mask=mask, affine=affine, spacing=p.spacing)


def write_phantom(out_dir: str | Path, preset: str = "small", seed: int = 0) -> tuple[Path, Path]:
    """Write ``knee_<preset>_ct.nii.gz`` (int16 HU) and ``knee_<preset>_mask.nii.gz`` (uint8 labels).

    Deterministic: the same preset and seed give byte-identical files. Returns (ct, mask).
    """
    ph = make_phantom(preset, seed)
    ct, mask = phantom_paths(out_dir, preset, seed)
    io.save_nifti(ct, ph.image, ph.affine, np.int16)
    io.save_nifti(mask, ph.mask, ph.affine, np.uint8)
    return ct, mask


def phantom_paths(out_dir: str | Path, preset: str = "small", seed: int = 0) -> tuple[Path, Path]:
    """Where :func:`write_phantom` puts the (ct, mask) files of a preset and seed."""
    stem = f"knee_{preset}" if seed == 0 else f"knee_{preset}_seed{seed}"
    return Path(out_dir) / f"{stem}_ct.nii.gz", Path(out_dir) / f"{stem}_mask.nii.gz"


def ensure_phantom(out_dir: str | Path, preset: str = "small", seed: int = 0) -> tuple[Path, Path]:
    """Paths of the phantom files in ``out_dir``, writing them first if they are missing."""
    ct, mask = phantom_paths(out_dir, preset, seed)
    if not (ct.exists() and mask.exists()):
        return write_phantom(out_dir, preset, seed)
    return ct, mask


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m helpers.phantom", description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--out", default="data", help="output folder (default: data)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for path in write_phantom(args.out, args.preset, args.seed):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
