"""Reading NIfTI scans, validating them, and bringing them to one canonical frame.

The canonical frame (what every later stage and the network see) is a C-ordered array indexed
``[d, h, w]``:

* ``d`` (depth) runs inferior -> superior (+S);
* ``h`` (rows) runs anterior -> posterior (+P);
* ``w`` (columns) runs patient right -> patient left (+L).

So each depth slice is an axial image as a radiologist displays it (anterior at the top,
the patient's right on the image's left), and the stack goes from the feet up. In nibabel's
terms the stored voxel axes ``(i, j, k)`` are reoriented to ``L, P, S`` and the array is
transposed to ``(k, j, i)``. Files stored with any axis order or flips therefore give the same
canonical array; oblique affines are mapped to their closest axes (as ``nibabel.as_closest_canonical``
does). All spacings are in mm and in ``(d, h, w)`` order; intensities are Hounsfield units (HU)
after the header's ``scl_slope``/``scl_inter`` are applied.
"""

from __future__ import annotations

import gzip
import hashlib
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from .errors import InputError, warn

#: nibabel axis codes of the canonical voxel axes (i, j, k) before the (k, j, i) transpose.
CANONICAL_AXCODES = ("L", "P", "S")
#: Largest volume accepted (voxels); a header claiming more is rejected before allocating.
MAX_VOXELS = 2_000_000_000
#: Absolute tolerance (mm, and unitless for the rotation part) when comparing two affines.
AFFINE_ATOL = 1e-3
#: Largest distance of a float mask value from an integer that is silently rounded.
MASK_ROUND_TOL = 1e-3

@dataclass(frozen=True, eq=False)
class Scan:
    """A CT volume and its label mask in the canonical ``(d, h, w)`` frame (see module doc)."""

    image: np.ndarray  #: float32 HU, shape (D, H, W)
    mask: np.ndarray  #: integer labels, shape (D, H, W)
    spacing: tuple[float, float, float]  #: voxel size in mm along (d, h, w)
    affine: np.ndarray  #: 4x4, canonical voxel (d, h, w, 1) -> world RAS+ mm
    source_affine: np.ndarray  #: the volume file's own affine
    source_orientation: str  #: axis codes of the stored voxel axes, e.g. "LPS"
    source_shape: tuple[int, ...]  #: the stored array's shape
    volume_path: str
    mask_path: str
    volume_sha256: str
    mask_sha256: str
    notes: list[str] = field(default_factory=list)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(n) for n in self.image.shape)  # type: ignore[return-value]

    def label_counts(self) -> dict[int, int]:
        """Voxel count of every label value present in the mask."""
        return label_counts(self.mask)


def label_counts(mask: np.ndarray) -> dict[int, int]:
    """Voxel count of every label value present in an integer mask (bincount when possible)."""
    if mask.dtype.kind in "ub" or (mask.size and int(mask.min()) >= 0 and int(mask.max()) < 1 << 16):
        counts = np.bincount(mask.ravel())
        return {int(v): int(counts[v]) for v in np.flatnonzero(counts)}
    values, counts = np.unique(mask, return_counts=True)
    return {int(v): int(c) for v, c in zip(values, counts)}


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def read_nifti(path: str | Path, role: str = "image") -> tuple[nib.Nifti1Image, str]:
    """Read a ``.nii``/``.nii.gz`` file fully into memory and return ``(image, sha256)``.

    The header is validated before any voxel array is allocated: dimensionality, voxel
    count, a finite non-singular affine, and (for uncompressed data) that the file holds all
    the bytes the header promises. Every problem raises :class:`InputError` naming the file.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: {role} file not found")
    if not path.is_file():
        raise InputError(f"{path}: {role} path is not a file")
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (EOFError, OSError, zlib.error) as exc:
            raise InputError(f"{path}: corrupt or truncated gzip data ({exc})") from None
    if len(data) < 348:
        raise InputError(f"{path}: not a NIfTI file (only {len(data)} bytes)")
    sizes = {int(np.frombuffer(data[:4], dtype=order + "i4")[0]) for order in "<>"}
    magic1, magic2 = data[344:348] in (b"n+1\x00", b"ni1\x00"), data[4:8] in (b"n+2\x00", b"ni2\x00")
    if 348 in sizes and magic1:
        cls = nib.Nifti1Image
    elif 540 in sizes and magic2:
        cls = nib.Nifti2Image
    else:
        raise InputError(f"{path}: not a NIfTI file (.nii / .nii.gz expected)")
    try:
        img = cls.from_bytes(data)
    except Exception as exc:  # nibabel raises many types for bad headers
        raise InputError(f"{path}: unreadable NIfTI header ({exc})") from None
    _check_header(img, path, len(data))
    return img, digest


def _check_header(img: nib.Nifti1Image, path: Path, nbytes: int) -> None:
    shape = tuple(int(n) for n in img.shape)
    if len(shape) < 3:
        raise InputError(f"{path}: image is {len(shape)}D (shape {shape}); a 3D volume is needed")
    if len(shape) > 3 and any(n != 1 for n in shape[3:]):
        raise InputError(
            f"{path}: image holds {int(np.prod(shape[3:]))} volumes (shape {shape}); give one 3D volume"
        )
    if any(n < 2 for n in shape[:3]):
        raise InputError(f"{path}: image is a single slice (shape {shape[:3]}); a 3D volume is needed")
    nvox = int(np.prod(shape, dtype=np.float64))
    if nvox > MAX_VOXELS:
        raise InputError(f"{path}: header claims {nvox:.3g} voxels (shape {shape}); at most {MAX_VOXELS:.1g} supported")
    hdr = img.header
    need = int(hdr["vox_offset"]) + nvox * hdr.get_data_dtype().itemsize
    if nbytes < need:
        raise InputError(f"{path}: truncated file ({nbytes} bytes of data, header needs {need})")
    zooms = np.asarray(hdr.get_zooms()[:3], dtype=np.float64)
    aff = img.affine
    if aff is None or not np.all(np.isfinite(aff)) or not np.all(np.isfinite(zooms)):
        raise InputError(f"{path}: affine or voxel size (pixdim) is not finite")
    if np.any(zooms <= 0) or abs(np.linalg.det(aff[:3, :3])) < 1e-12:
        raise InputError(f"{path}: affine is singular or a voxel size (pixdim) is zero: {zooms.tolist()}")


def _voxels(img: nib.Nifti1Image, path: Path) -> np.ndarray:
    """The stored voxel array as (X, Y, Z), unscaled, in its on-disk dtype (no float64 detour)."""
    try:
        arr = np.asanyarray(img.dataobj.get_unscaled())
    except Exception as exc:
        raise InputError(f"{path}: voxel data unreadable ({exc})") from None
    return arr.reshape(arr.shape[:3])


def _scale(arr: np.ndarray, img: nib.Nifti1Image) -> np.ndarray:
    """Apply scl_slope/scl_inter in float32 (ints stay exact up to 2**24)."""
    slope, inter = float(img.dataobj.slope), float(img.dataobj.inter)
    if slope == 1.0 and inter == 0.0:
        return arr
    out = arr.astype(np.float32)
    if slope != 1.0:
        out *= np.float32(slope)
    if inter != 0.0:
        out += np.float32(inter)
    return out


def canonical_transform(affine: np.ndarray) -> np.ndarray:
    """nibabel orientation transform from a file's voxel axes to the canonical L, P, S."""
    return nib.orientations.ornt_transform(
        nib.orientations.io_orientation(affine), nib.orientations.axcodes2ornt(CANONICAL_AXCODES)
    )


def to_canonical(arr: np.ndarray, affine: np.ndarray, dtype: np.dtype | type | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Reorient a stored (X, Y, Z) array to the canonical C-ordered (d, h, w) array and affine.

    One copy at most: flips and the transpose are views, the final cast writes C order.
    """
    transform = canonical_transform(affine)
    view = nib.orientations.apply_orientation(arr, transform)
    new_affine = affine @ nib.orientations.inv_ornt_aff(transform, arr.shape[:3])
    view = view.transpose(2, 1, 0)
    new_affine = new_affine[:, [2, 1, 0, 3]]
    out = np.ascontiguousarray(view, dtype=dtype or view.dtype)
    return out, new_affine


def from_canonical(arr: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`to_canonical` for writing: (d, h, w) array -> stored (i, j, k) = L, P, S."""
    return np.asfortranarray(arr.transpose(2, 1, 0)), affine[:, [2, 1, 0, 3]]


def _as_labels(arr: np.ndarray, path: Path) -> np.ndarray:
    """Validate mask values and return them as the smallest fitting integer dtype."""
    if arr.dtype.kind == "f":
        bad = ~np.isfinite(arr)
        if bad.any():
            raise InputError(f"{path}: mask has {int(bad.sum())} NaN/Inf voxels")
        rounded = np.rint(arr)
        dev = float(np.max(np.abs(arr - rounded))) if arr.size else 0.0
        if dev > MASK_ROUND_TOL:
            idx = np.unravel_index(int(np.argmax(np.abs(arr - rounded))), arr.shape)
            raise InputError(f"{path}: mask has non-integer label values (e.g. {float(arr[idx]):g})")
        if dev > 0:
            warn(f"{path}: mask values differ from integers by up to {dev:.2g}; rounded")
        arr = rounded
    elif arr.dtype.kind not in "iub":
        raise InputError(f"{path}: mask has unsupported data type {arr.dtype}")
    lo, hi = (int(arr.min()), int(arr.max())) if arr.size else (0, 0)
    for dtype in (np.uint8, np.int16, np.int32):
        info = np.iinfo(dtype)
        if info.min <= lo and hi <= info.max:
            return arr.astype(dtype, copy=False)
    raise InputError(f"{path}: mask label values out of range ({lo}..{hi})")


def load_scan(volume: str | Path, mask: str | Path) -> Scan:
    """Load a CT volume (HU) and its label mask, validate them and return a canonical :class:`Scan`.

    Both files must share shape and voxel-to-world affine (tolerance :data:`AFFINE_ATOL`).
    The volume must be finite; the mask must hold integers (floats within
    :data:`MASK_ROUND_TOL` of one are rounded with a warning).
    """
    volume, mask = Path(volume), Path(mask)
    vimg, vsha = read_nifti(volume, "volume")
    mimg, msha = read_nifti(mask, "mask")
    vshape, mshape = tuple(vimg.shape[:3]), tuple(mimg.shape[:3])
    if vshape != mshape:
        raise InputError(f"{mask}: mask shape {mshape} differs from volume shape {vshape} ({volume})")
    if not np.allclose(vimg.affine, mimg.affine, rtol=1e-5, atol=AFFINE_ATOL):
        diff = float(np.max(np.abs(vimg.affine - mimg.affine)))
        raise InputError(f"{mask}: mask affine differs from the volume's (max difference {diff:.3g}; {volume})")

    raw = _voxels(vimg, volume)
    if raw.dtype.kind not in "iufb":
        raise InputError(f"{volume}: unsupported data type {raw.dtype}")
    if raw.dtype.kind == "f":
        nonfinite = int(np.count_nonzero(~np.isfinite(raw)))
        if nonfinite:
            raise InputError(f"{volume}: volume has {nonfinite} NaN/Inf voxels")
    hu = _scale(raw, vimg)
    del raw
    image, affine = to_canonical(hu, vimg.affine, np.float32)
    del hu
    labels = _as_labels(_scale(_voxels(mimg, mask), mimg), mask)
    labels, _ = to_canonical(labels, vimg.affine)
    spacing = tuple(float(s) for s in np.sqrt((affine[:3, :3] ** 2).sum(axis=0)))
    return Scan(
        image=image,
        mask=labels,
        spacing=spacing,  # type: ignore[arg-type]
        affine=affine,
        source_affine=np.asarray(vimg.affine, dtype=np.float64),
        source_orientation="".join(nib.orientations.aff2axcodes(vimg.affine)),
        source_shape=tuple(int(n) for n in vimg.shape),
        volume_path=str(volume),
        mask_path=str(mask),
        volume_sha256=vsha,
        mask_sha256=msha,
    )


def save_nifti(
    path: str | Path,
    array: np.ndarray,
    affine: np.ndarray,
    dtype: np.dtype | type | None = None,
) -> Path:
    """Write a canonical (d, h, w) array with its canonical affine as NIfTI (stored L, P, S).

    ``.nii.gz`` files are compressed with a zero gzip timestamp, so the same array always gives
    the same bytes (and sha256). The file is written atomically. Returns the path.
    """
    from .outputs import write_files

    data, stored_affine = from_canonical(np.asarray(array), affine)
    img = nib.Nifti1Image(data.astype(dtype or data.dtype, copy=False), stored_affine)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(stored_affine, code=1)
    img.set_sform(stored_affine, code=1)
    payload = img.to_bytes()
    path = Path(path)
    if path.name.endswith(".gz"):
        payload = gzip.compress(payload, compresslevel=6, mtime=0)
    write_files({path: payload})
    return path


def lps_affine(spacing: tuple[float, float, float], shape: tuple[int, int, int]) -> np.ndarray:
    """Canonical affine of a grid with ``spacing`` (mm, d/h/w) centred on the world origin.

    Columns map d -> +S, h -> +P (world -y), w -> +L (world -x), as stored in an LPS file.
    """
    sd, sh, sw = spacing
    aff = np.zeros((4, 4))
    aff[2, 0], aff[1, 1], aff[0, 2], aff[3, 3] = sd, -sh, -sw, 1.0
    centre = (np.asarray(shape, dtype=np.float64) - 1) / 2
    aff[:3, 3] = -aff[:3, :3] @ centre
    return aff
