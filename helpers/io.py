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

Reading is defensive: each file is read into memory once (and hashed); gzip is inflated in a
stream so that the header is checked *before* the voxel data are decompressed or allocated
(a header claiming 10^12 voxels fails in milliseconds); the header's raw fields are checked
before nibabel "fixes" them (a zero voxel size is an error, not silently 1 mm); the voxel array
is a view on the file's bytes, converted once into the canonical float32 array. Every problem
raises :class:`InputError` with one line naming the file.

Volume and mask must describe the same voxel grid in world space. Usually they are stored the
same way; a mask stored with another axis order or flips *of the same grid* (e.g. one written
by another tool, or the ``--mask auto`` output, which is stored L, P, S) is accepted and
reoriented with its own affine, with a note. Grids that do not coincide are an error.
"""

from __future__ import annotations

import gzip
import hashlib
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
#: Bytes a gzip stream may hold beyond what the header describes before it is refused.
GZIP_SLACK = 1 << 20
#: Voxel data types accepted (numpy kinds): signed/unsigned integers and floats.
_KINDS = "iuf"


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
    #: steps applied after reading, in order (``{"step": "automask", ...}``, ``{"step": "resample", ...}``)
    processing: list[dict[str, Any]] = field(default_factory=list)
    #: bytes of a generated mask file (``mask="auto"``) to be written to ``mask_path`` with the results
    mask_payload: bytes | None = None

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


# ----------------------------------------------------------------------------- reading


@dataclass(frozen=True, eq=False)
class NiftiFile:
    """One NIfTI file read and checked: nibabel's image (header, affine) and the raw voxels."""

    path: Path
    image: nib.Nifti1Image  #: header and affine; its data are not read through nibabel
    voxels: np.ndarray  #: stored (X, Y, Z) array, unscaled, on-disk dtype: a read-only view on the bytes
    sha256: str  #: of the file as stored (compressed if it is)
    slope: float  #: scl_slope as applied (1 when the header says "no scaling")
    inter: float  #: scl_inter as applied

    @property
    def affine(self) -> np.ndarray:
        return np.asarray(self.image.affine, dtype=np.float64)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(n) for n in self.voxels.shape)  # type: ignore[return-value]


def _gunzip(data: bytes, path: Path, limit: int, partial: bool = False) -> bytes:
    """Inflate gzip ``data`` (every member) into at most ``limit`` bytes.

    ``partial``: stop quietly after ``limit`` bytes (to read the header first). Otherwise more
    than ``limit`` bytes, a corrupt stream or a stream that ends early raise :class:`InputError`.
    """
    chunks: list[bytes] = []
    total, rest = 0, data
    while rest:
        d = zlib.decompressobj(wbits=31)
        while True:
            try:
                chunk = d.decompress(rest, limit + 1 - total)
                if not d.unconsumed_tail and not d.eof:
                    chunk += d.flush()
            except zlib.error as exc:
                raise InputError(f"{path}: corrupt gzip data ({exc})") from None
            chunks.append(chunk)
            total += len(chunk)
            if total > limit:
                if partial:
                    return b"".join(chunks)[:limit]
                raise InputError(f"{path}: gzip data inflate to more than the {limit} bytes the NIfTI header describes")
            rest = d.unconsumed_tail
            if d.eof:
                break
            if not rest:
                if partial:
                    return b"".join(chunks)
                raise InputError(f"{path}: truncated gzip data (the compressed stream ends early; {total} bytes inflated)")
        rest = d.unused_data
        if not rest.strip(b"\0"):  # trailing zero padding after the last member is tolerated
            break
        if rest[:2] != b"\x1f\x8b":
            raise InputError(f"{path}: corrupt gzip data (trailing garbage after the compressed stream)")
    return b"".join(chunks)


def _header(head: bytes, path: Path) -> nib.Nifti1Header:
    """The raw NIfTI-1/-2 header of ``head`` (no fixes applied), or :class:`InputError`."""
    if len(head) < 348:
        raise InputError(f"{path}: not a NIfTI file (only {len(head)} bytes)")
    sizes = {int(np.frombuffer(head[:4], dtype=order + "i4")[0]) for order in "<>"}
    if 348 in sizes and head[344:348] == b"ni1\x00":
        raise InputError(f"{path}: NIfTI header of a .hdr/.img pair; convert it to a single .nii/.nii.gz file")
    if 348 in sizes and head[344:348] == b"n+1\x00":
        cls: Any = nib.Nifti1Header
    elif 540 in sizes and head[4:8] == b"n+2\x00" and len(head) >= 540:
        cls = nib.Nifti2Header
    else:
        raise InputError(f"{path}: not a NIfTI file (.nii / .nii.gz expected)")
    size = cls.template_dtype.itemsize
    try:
        return cls(head[:size], check=False)
    except Exception as exc:
        raise InputError(f"{path}: unreadable NIfTI header ({exc})") from None


def _check_header(hdr: nib.Nifti1Header, path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """Validate a raw header before any voxel is read; returns (shape, dtype, bytes needed)."""
    dim = [int(n) for n in hdr["dim"]]
    ndim = dim[0]
    if not 1 <= ndim <= 7:
        raise InputError(f"{path}: invalid NIfTI header (dim[0] = {ndim})")
    shape = tuple(dim[1 : ndim + 1])
    if any(n < 1 for n in shape):
        raise InputError(f"{path}: invalid NIfTI header (shape {shape})")
    if ndim < 3:
        raise InputError(f"{path}: image is {ndim}D (shape {shape}); a 3D volume is needed")
    if any(n != 1 for n in shape[3:]):
        raise InputError(f"{path}: image holds {int(np.prod(shape[3:]))} volumes (shape {shape}); give one 3D volume")
    if any(n < 2 for n in shape[:3]):
        raise InputError(f"{path}: image is a single slice (shape {shape[:3]}); a 3D volume is needed")
    nvox = int(np.prod(shape, dtype=np.float64))
    if nvox > MAX_VOXELS:
        raise InputError(f"{path}: header claims {nvox:.3g} voxels (shape {shape}); at most {MAX_VOXELS:.1g} are supported")
    try:
        dtype = hdr.get_data_dtype()
    except Exception:
        raise InputError(f"{path}: unknown NIfTI data type code {int(hdr['datatype'])}") from None
    if dtype.kind not in _KINDS or dtype.fields is not None:
        raise InputError(f"{path}: unsupported voxel data type {dtype} (integer or float expected)")
    offset = int(hdr["vox_offset"])
    if offset < hdr.template_dtype.itemsize:
        offset = hdr.template_dtype.itemsize + 4  # nibabel's rule for a missing offset
    pixdim = np.asarray(hdr["pixdim"][1:4], dtype=np.float64)
    if not np.all(np.isfinite(pixdim)) or np.any(pixdim == 0):
        raise InputError(f"{path}: voxel size (pixdim) is zero or not finite: {pixdim.tolist()}")
    return shape, dtype, offset


def read_nifti(path: str | Path, role: str = "image") -> NiftiFile:
    """Read a ``.nii``/``.nii.gz`` file fully into memory, check it, and return a :class:`NiftiFile`.

    The header is validated before the voxel data are inflated or allocated: dimensionality,
    voxel count, data type, voxel sizes, and that the file holds all the bytes the header
    promises; then the affine nibabel selects (sform, else qform, else pixdim) must be finite
    and non-singular. Every problem raises :class:`InputError` naming the file.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: {role} file not found")
    if not path.is_file():
        raise InputError(f"{path}: {role} path is not a file")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"{path}: cannot read the {role} file ({exc.strerror or exc})") from None
    digest = hashlib.sha256(data).hexdigest()
    gz = data[:2] == b"\x1f\x8b"
    head = _gunzip(data, path, 544, partial=True) if gz else data[:544]
    hdr = _header(head, path)
    shape, dtype, offset = _check_header(hdr, path)
    need = offset + int(np.prod(shape)) * dtype.itemsize
    if gz:
        data = _gunzip(data, path, need + GZIP_SLACK)
    if len(data) < need:
        raise InputError(f"{path}: truncated file ({len(data)} bytes of data, the header needs {need})")
    try:
        with nib.imageglobals.LoggingOutputSuppressor():
            img = (nib.Nifti2Image if isinstance(hdr, nib.Nifti2Header) else nib.Nifti1Image).from_bytes(data[:offset])
            slope, inter = float(img.dataobj.slope), float(img.dataobj.inter)
    except Exception as exc:  # nibabel raises many types for bad headers
        raise InputError(f"{path}: unreadable NIfTI header ({' '.join(str(exc).split())})") from None
    aff = img.affine
    if aff is None or not np.all(np.isfinite(aff)):
        raise InputError(f"{path}: affine (sform/qform) is not finite")
    if abs(np.linalg.det(aff[:3, :3])) < 1e-12:
        raise InputError(f"{path}: affine (sform/qform) is singular: {np.round(aff[:3, :3], 4).tolist()}")
    if int(hdr["sform_code"]) == 0 and int(hdr["qform_code"]) == 0:
        warn(f"{path}: header has no orientation (sform and qform codes are 0); assuming nibabel's default, check left/right")
    if not (np.isfinite(slope) and np.isfinite(inter)):
        raise InputError(f"{path}: scl_slope/scl_inter are not finite ({slope}, {inter})")
    voxels = np.ndarray(shape[:3], dtype=dtype, buffer=data, offset=offset, order="F")
    return NiftiFile(path, img, voxels, digest, slope, inter)


# ----------------------------------------------------------------------------- canonical frame


def canonical_transform(affine: np.ndarray) -> np.ndarray:
    """nibabel orientation transform from a file's voxel axes to the canonical L, P, S."""
    return nib.orientations.ornt_transform(
        nib.orientations.io_orientation(affine), nib.orientations.axcodes2ornt(CANONICAL_AXCODES)
    )


def canonical_grid(affine: np.ndarray, shape: tuple[int, ...]) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Canonical (d, h, w) affine and shape of a stored grid, without touching any array."""
    transform = canonical_transform(affine)
    new_affine = affine @ nib.orientations.inv_ornt_aff(transform, shape[:3])
    lps = [0, 0, 0]
    for axis, (out, _) in enumerate(transform):
        lps[int(out)] = int(shape[axis])
    return new_affine[:, [2, 1, 0, 3]], (lps[2], lps[1], lps[0])


def to_canonical(arr: np.ndarray, affine: np.ndarray, dtype: np.dtype | type | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Reorient a stored (X, Y, Z) array to the canonical C-ordered (d, h, w) array and affine.

    Exactly one copy: flips and the transpose are views, the final cast writes C order.
    """
    transform = canonical_transform(affine)
    view = nib.orientations.apply_orientation(arr, transform).transpose(2, 1, 0)
    new_affine, _ = canonical_grid(affine, arr.shape)
    out = np.array(view, dtype=dtype or view.dtype, order="C", copy=True)  # writable, never a view on the file
    return out, new_affine


def from_canonical(arr: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`to_canonical` for writing: (d, h, w) array -> stored (i, j, k) = L, P, S."""
    return np.asfortranarray(arr.transpose(2, 1, 0)), affine[:, [2, 1, 0, 3]]


def spacing_of(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size in mm along each array axis of ``affine`` (the lengths of its columns)."""
    return tuple(float(s) for s in np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0)))  # type: ignore[return-value]


# ----------------------------------------------------------------------------- volume and mask


def _volume_hu(vol: NiftiFile) -> tuple[np.ndarray, np.ndarray]:
    """The volume as canonical float32 HU (scl_slope/scl_inter applied) and its canonical affine."""
    raw = vol.voxels
    if raw.dtype.kind == "f":
        nonfinite = int(np.count_nonzero(~np.isfinite(raw)))
        if nonfinite:
            raise InputError(f"{vol.path}: volume has {nonfinite} NaN/Inf voxels")
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is reported below, as one line
        image, affine = to_canonical(raw, vol.affine, np.float32)
        if vol.slope != 1.0:
            image *= np.float32(vol.slope)
        if vol.inter != 0.0:
            image += np.float32(vol.inter)
    lo, hi = float(image.min()), float(image.max())
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise InputError(
            f"{vol.path}: volume values overflow float32 (stored {raw.dtype}, scl_slope {vol.slope:g}, scl_inter {vol.inter:g})"
        )
    if lo >= 0.0:
        warn(
            f"{vol.path}: volume has no value below 0 (min {lo:g}): is it in Hounsfield units? Air is -1000 HU, "
            "fat about -100 HU; raw scanner values need the header's scl_slope/scl_inter"
        )
    return image, affine


def _labels(mask: NiftiFile) -> np.ndarray:
    """Validate mask values (after scl_slope/scl_inter) and return them as the smallest fitting integer
    dtype, stored (X, Y, Z) order. Float masks are checked and rounded slab by slab (low memory)."""
    arr, path = mask.voxels, mask.path
    scaled = mask.slope != 1.0 or mask.inter != 0.0
    if arr.dtype.kind == "f" or scaled:
        slabs = [(k, min(k + 8, arr.shape[2])) for k in range(0, arr.shape[2], 8)]
        lo, hi, dev, bad, example = np.inf, -np.inf, 0.0, 0, 0.0
        for a, b in slabs:
            v = arr[:, :, a:b].astype(np.float64) * mask.slope + mask.inter
            finite = np.isfinite(v)
            if not finite.all():
                bad += int(v.size - np.count_nonzero(finite))
                continue
            d = np.abs(v - np.rint(v))
            i = int(np.argmax(d))
            if d.flat[i] > dev:
                dev, example = float(d.flat[i]), float(v.flat[i])
            lo, hi = min(lo, float(v.min())), max(hi, float(v.max()))
        if bad:
            raise InputError(f"{path}: mask has {bad} NaN/Inf voxels")
        if dev > MASK_ROUND_TOL:
            raise InputError(f"{path}: mask has non-integer label values (e.g. {example:.6g}); labels must be integers")
        dtype = _label_dtype(int(round(lo)), int(round(hi)), path)
        out = np.empty(arr.shape, dtype=dtype, order="F")
        for a, b in slabs:
            out[:, :, a:b] = np.rint(arr[:, :, a:b].astype(np.float64) * mask.slope + mask.inter)
        if dev > 0:
            warn(f"{path}: mask values differ from integers by up to {dev:.2g} (e.g. {example:.9g}); rounded")
        return out
    lo, hi = (int(arr.min()), int(arr.max())) if arr.size else (0, 0)
    return arr.astype(_label_dtype(lo, hi, path), copy=False)


def _label_dtype(lo: int, hi: int, path: Path) -> type:
    for dtype in (np.uint8, np.int16, np.int32):
        info = np.iinfo(dtype)
        if info.min <= lo and hi <= info.max:
            return dtype
    raise InputError(f"{path}: mask label values out of range ({lo}..{hi})")


def _same_grid(vol: NiftiFile, mask: NiftiFile) -> None:
    """Raise unless ``mask`` describes the volume's voxel grid (possibly stored with other axis order/flips)."""
    vshape, mshape = vol.shape, mask.shape
    if vshape == mshape and np.allclose(vol.affine, mask.affine, rtol=1e-5, atol=AFFINE_ATOL):
        return
    vaff, vcan = canonical_grid(vol.affine, vshape)
    maff, mcan = canonical_grid(mask.affine, mshape)
    if vcan == mcan and np.allclose(vaff, maff, rtol=1e-5, atol=AFFINE_ATOL):
        vo, mo = ("".join(nib.orientations.aff2axcodes(f.affine)) for f in (vol, mask))
        warn(
            f"{mask.path}: mask is stored {mo} {mshape}, the volume {vo} {vshape}; same voxel grid in world space, "
            "so the mask was reoriented with its own affine"
        )
        return
    if sorted(vshape) != sorted(mshape) or vcan != mcan:
        raise InputError(f"{mask.path}: mask shape {mshape} differs from volume shape {vshape} ({vol.path})")
    diff = float(np.max(np.abs(vaff - maff)))
    vo, mo = ("".join(nib.orientations.aff2axcodes(f.affine)) for f in (vol, mask))
    hint = f"; orientation {mo} vs {vo}: a flipped or permuted axis" if vo != mo else ""
    raise InputError(
        f"{mask.path}: mask affine differs from the volume's (voxel grids differ in world space by up to "
        f"{diff:.3g} mm{hint}; {vol.path})"
    )


def load_volume(volume: str | Path) -> Scan:
    """Load and validate a CT volume alone (for ``mask="auto"``): a :class:`Scan` whose mask is a
    read-only all-zero placeholder, to be replaced by :func:`helpers.automask.auto_mask`."""
    vol = read_nifti(volume, "volume")
    image, affine = _volume_hu(vol)
    return _scan(vol, image, affine, np.broadcast_to(np.uint8(0), image.shape), "", "")


def _scan(vol: NiftiFile, image: np.ndarray, affine: np.ndarray, labels: np.ndarray, mask_path: str, mask_sha: str) -> Scan:
    return Scan(
        image=image,
        mask=labels,
        spacing=spacing_of(affine),
        affine=affine,
        source_affine=vol.affine,
        source_orientation="".join(nib.orientations.aff2axcodes(vol.affine)),
        source_shape=tuple(int(n) for n in vol.image.shape),
        volume_path=str(vol.path),
        mask_path=mask_path,
        volume_sha256=vol.sha256,
        mask_sha256=mask_sha,
    )


def load_scan(volume: str | Path, mask: str | Path) -> Scan:
    """Load a CT volume (HU) and its label mask, validate them and return a canonical :class:`Scan`.

    Both files must describe the same voxel grid (shape and affine within :data:`AFFINE_ATOL`,
    possibly stored with another axis order or flips). The volume must be finite; the mask must
    hold integers (floats within :data:`MASK_ROUND_TOL` of one are rounded with a warning) and
    more than one value.
    """
    vol = read_nifti(volume, "volume")
    msk = read_nifti(mask, "mask")
    _same_grid(vol, msk)
    labels, _ = to_canonical(_labels(msk), msk.affine)
    lo, hi = int(labels.min()), int(labels.max())
    if lo == hi:
        what = "empty (every voxel is 0)" if lo == 0 else f"a single value ({lo}) everywhere"
        raise InputError(f"{msk.path}: mask is {what}; it must label the tibia and the femur")
    image, affine = _volume_hu(vol)
    return _scan(vol, image, affine, labels, str(msk.path), msk.sha256)


# ----------------------------------------------------------------------------- writing


def nifti_bytes(array: np.ndarray, affine: np.ndarray, dtype: np.dtype | type | None = None, gz: bool = True) -> bytes:
    """The bytes of a NIfTI-1 file holding a canonical (d, h, w) array (stored L, P, S).

    ``gz``: gzip with a zero timestamp, so the same array always gives the same bytes (and sha256).
    """
    data, stored_affine = from_canonical(np.asarray(array), affine)
    img = nib.Nifti1Image(data.astype(dtype or data.dtype, copy=False), stored_affine)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(stored_affine, code=1)
    img.set_sform(stored_affine, code=1)
    payload = img.to_bytes()
    return gzip.compress(payload, compresslevel=6, mtime=0) if gz else payload


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

    path = Path(path)
    write_files({path: nifti_bytes(array, affine, dtype, gz=path.name.endswith(".gz"))})
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

