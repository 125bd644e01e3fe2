"""The one end-to-end path: ``run(config) -> Result``.

The network is built separately (:func:`build_model`) so one model can serve many scans::

    model = build_model(Config(device="cuda"))
    for volume, mask in cohort:
        run(Config(volume=volume, mask=mask, output=...), model)

The CLI, the notebook and the tests call :func:`run` or its stages; none has its own copy.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import importlib.metadata
import platform
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__, automask, extract, inflate, io, memory, outputs, phantom, regions, resample, similarity
from .errors import InputError, PipelineWarning

RANDOM_WEIGHTS_BANNER = (
    "RANDOM WEIGHTS: the network is NOT ImageNet-pretrained; these similarities only test the "
    "machinery and must not be interpreted as ImageNet features"
)


@dataclass
class Config:
    """Settings of one run; each field is the CLI option of the same name (``--no-progress`` sets
    ``progress``, ``--phantom`` sets ``phantom_preset``, ``--data-dir`` sets ``data_dir``).
    Paths may be str or Path.

    ``volume``/``mask`` empty means the embedded synthetic phantom (``phantom_preset``),
    written to ``data_dir`` on first use. ``mask="auto"`` (or ``"auto:HU"``) segments femur and
    tibia from the CT (:mod:`helpers.automask`); ``spacing`` resamples to that voxel size
    (:mod:`helpers.resample`); ``force`` overrides the memory guard (:mod:`helpers.memory`).
    """

    volume: str | None = None
    mask: str | None = None
    output: str = "outputs/results.csv"
    device: str = "auto"
    precision: str = "auto"
    weights: str = "auto"
    inflation: str = "mean"
    seed: int = 0
    pad: int = 5
    labels: str | dict[str, int] | None = None
    crop: str = "masked"
    normalize: str = "zscore"
    bucket: int | None = None
    progress: bool = True
    phantom_preset: str = "small"
    data_dir: str = "data"
    spacing: float | str | tuple[float, ...] | list[str] | None = None  #: mm, x y z (one value: isotropic); None: native
    force: bool = False  #: run even when the memory guard says the forward will not fit

    def to_dict(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(self).items()}


@dataclass
class Result:
    """Everything a run produced; the plots draw from it without recomputing."""

    config: Config
    scan: io.Scan
    regions: list[regions.Region]
    features: extract.Features
    table: similarity.SimilarityTable
    provenance: dict[str, Any]
    paths: dict[str, Path] = field(default_factory=dict)


def validate(config: Config) -> None:
    """Check every setting before any work (reading files, building the network), raising
    :class:`InputError` with a one-line message naming the option."""
    outputs.check_output(config.output)
    regions.parse_labels(config.labels)
    regions.parse_normalize(config.normalize)
    if config.crop not in regions.CROP_MODES:
        raise InputError(f"--crop: expected one of {', '.join(regions.CROP_MODES)}, got {config.crop!r}")
    if not _whole(config.pad) or config.pad < 0:
        raise InputError(f"--pad: must be a whole number of voxels >= 0, got {config.pad!r}")
    if config.inflation not in inflate.INFLATION_MODES:
        raise InputError(f"--inflation: expected one of {', '.join(inflate.INFLATION_MODES)}, got {config.inflation!r}")
    if config.precision not in extract.PRECISIONS:
        raise InputError(f"--precision: expected one of {', '.join(extract.PRECISIONS)}, got {config.precision!r}")
    extract.check_device_name(config.device)
    if config.bucket is not None and (not _whole(config.bucket) or config.bucket < 0):
        raise InputError(f"--bucket: must be a whole number >= 0 (0 = off), got {config.bucket!r}")
    if config.weights not in ("auto", "imagenet", "random") and not Path(config.weights).is_file():
        raise InputError(f"{config.weights}: weights file not found (--weights auto|imagenet|random|PATH)")
    if config.phantom_preset not in phantom.PRESETS:
        raise InputError(f"--phantom: expected one of {', '.join(sorted(phantom.PRESETS))}, got {config.phantom_preset!r}")
    resample.parse_spacing(config.spacing)
    if automask.is_auto(config.mask):
        automask.parse_auto(str(config.mask))


def _whole(value: Any) -> bool:
    try:
        return not isinstance(value, bool) and int(value) == value
    except (TypeError, ValueError):
        return False


def build_model(config: Config) -> extract.PreparedModel:
    """Load 2D weights, inflate to 3D and place on the device: do this once per process."""
    net = inflate.inflate_densenet121(config.weights, config.inflation, config.seed, progress=config.progress)
    return extract.prepare_model(net, config.device, config.precision, config.bucket)


def input_paths(config: Config) -> tuple[Path, Path]:
    """The (volume, mask) to read: the user's, or the embedded phantom when both are empty."""
    if not config.volume and not config.mask:
        return phantom.ensure_phantom(config.data_dir, config.phantom_preset)
    if not config.volume or not config.mask:
        missing = "--volume" if not config.volume else "--mask"
        raise InputError(f"{missing} is missing: give both --volume and --mask, or neither for the phantom")
    return Path(config.volume), Path(config.mask)


@contextlib.contextmanager
def collect_warnings() -> Iterator[list[str]]:
    """Record every :class:`PipelineWarning` (and print it to stderr as it happens)."""
    seen: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("always", PipelineWarning)
        original = warnings.showwarning

        def show(message: Any, category: type, *args: Any, **kwargs: Any) -> None:
            if issubclass(category, PipelineWarning):
                seen.append(str(message))
                print(f"warning: {message}", file=sys.stderr, flush=True)
            else:
                original(message, category, *args, **kwargs)

        warnings.showwarning = show
        yield seen


class Run:
    """One scan's run, stage by stage; :func:`run` calls every stage in order.

    The notebook steps through the same methods (``load``, ``crop``, ``extract``, ``compare``,
    ``write``) and shows what each produced. Each stage records its wall time and every
    :class:`PipelineWarning` it raised (printed to stderr and kept for the provenance).
    """

    def __init__(self, config: Config, model: extract.PreparedModel | None = None) -> None:
        validate(config)
        self.config = config
        self.timings: dict[str, float] = {}
        self.warnings: list[str] = []
        self._model = model
        self._announced = False
        self.scan: io.Scan | None = None
        self.labels: dict[str, int] = regions.parse_labels(config.labels)  #: region -> label value
        self.regions: list[regions.Region] | None = None
        self.features: extract.Features | None = None
        self.table: similarity.SimilarityTable | None = None
        self.memory: dict[str, Any] | None = None

    @property
    def model(self) -> extract.PreparedModel:
        """The prepared network, built on first use: after the inputs are read, so that bad input
        fails fast with its one-line error."""
        if self._model is None:
            self._model = self._stage("model_build", build_model, self.config)
        return self._model

    def _announce_weights(self) -> None:
        """Say loudly, once, that the weights are random (just before the forward runs)."""
        if self._announced:
            return
        self._announced = True
        info = self.model.model.weights_info
        if info is not None and info.is_random:
            message = f"{RANDOM_WEIGHTS_BANNER} ({info.description})"
            print(f"*** {message} ***", file=sys.stderr, flush=True)
            self.warnings.append(message)

    @model.setter
    def model(self, value: extract.PreparedModel) -> None:
        self._model, self._announced = value, False

    def _stage(self, name: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        with collect_warnings() as seen:
            out = fn(*args, **kwargs)
        self.warnings.extend(seen)
        self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - t
        return out

    def load(self) -> io.Scan:
        """Read and validate the volume and mask (the phantom when none are given); with
        ``mask="auto"`` segment femur and tibia from the CT; with ``spacing`` resample both."""
        c = self.config
        if automask.is_auto(c.mask):
            volume = Path(c.volume) if c.volume else phantom.ensure_phantom(c.data_dir, c.phantom_preset)[0]
            self.scan = self._stage("load", automask.load_auto, volume, c.mask, self.labels,
                                    automask.automask_path(c.output))  # fmt: skip
        else:
            volume, mask = input_paths(c)
            self.scan = self._stage("load", io.load_scan, volume, mask)
        if c.spacing is not None:
            self.scan = self._stage("resample", resample.resample_scan, self.scan, c.spacing)
        return self.scan

    def crop(self) -> list[regions.Region]:
        """Crop and normalise tibia, femur and background."""
        scan = self.scan if self.scan is not None else self.load()
        c = self.config
        self.regions = self._stage(
            "crop", regions.crop_regions, scan, self.labels, c.pad, c.crop, c.normalize,
            inflate.min_input_size(self.model.model),
        )  # fmt: skip
        return self.regions

    def extract(self) -> extract.Features:
        """Hooked extraction of every conv layer's pooled vector for each region."""
        crops = self.regions if self.regions is not None else self.crop()
        shapes = {r.name: extract.bucket_shape(r.array.shape, self.model.bucket) for r in crops}
        scan = self.scan
        self.memory = self._stage("memory_check", memory.check_memory, self.model, shapes,
                                  scan.spacing if scan else None, scan.volume_path if scan else "", self.config.force)  # fmt: skip
        self._announce_weights()
        self.features = self._stage("extract", extract.extract_features, self.model, crops, self.config.progress)
        return self.features

    def compare(self) -> similarity.SimilarityTable:
        """Cosine similarity per pair and layer."""
        feats = self.features if self.features is not None else self.extract()
        self.table = self._stage("compare", similarity.compare, feats)
        return self.table

    def result(self) -> Result:
        """The :class:`Result` of the stages run so far (runs the missing ones)."""
        table = self.table if self.table is not None else self.compare()
        assert self.scan is not None and self.regions is not None and self.features is not None
        record = provenance(
            self.config, self.scan, self.labels, self.regions, self.model, self.features, table,
            self.timings, self.warnings,
        )  # fmt: skip
        if self.memory is not None:
            record["memory"] = self.memory
        return Result(self.config, self.scan, self.regions, self.features, table, record)

    def write(self) -> Result:
        """Write results.csv/.npz/.json all-or-nothing; returns the :class:`Result` with its paths."""
        result = self.result()
        result.paths = self._stage("write", write_results, result)
        return result


def run(config: Config, model: extract.PreparedModel | None = None) -> Result:
    """Load -> crop -> extract -> compare -> write; returns the :class:`Result`.

    Writes ``config.output`` (CSV) and, next to it, ``.npz`` (pooled vectors of every conv
    layer) and ``.json`` (provenance), all-or-nothing. Raises :class:`InputError` for bad input.
    Pass ``model`` (from :func:`build_model`) to reuse one network for many scans.
    """
    return Run(config, model).write()


def write_results(result: Result) -> dict[str, Path]:
    """Write the CSV, NPZ and JSON of ``result`` next to each other, all-or-nothing."""
    paths = outputs.result_paths(outputs.check_output(result.config.output))
    generated = getattr(result.scan, "mask_payload", None)  # mask="auto": the mask is written with the results
    if generated is not None:
        paths["mask"] = Path(result.scan.mask_path)
    result.provenance["outputs"] = {k: str(v) for k, v in paths.items()}
    feats, table = result.features, result.table
    sizes = [len(v) for v in feats.vectors[feats.regions[0]]]
    arrays: dict[str, np.ndarray] = {
        "layer_names": np.array(feats.layer_names),
        "layer_offsets": np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64),
        "regions": np.array(feats.regions),
        "pairs": np.array(table.pairs),
        "columns": np.array(table.columns),
        "column_layers": np.array(table.column_layers),
        "values": table.values,
        "profile": table.profile,
    }
    for region, vecs in feats.vectors.items():
        arrays[f"vectors_{region}"] = np.concatenate(vecs).astype(np.float32)

    def save_npz(path: Path) -> None:
        with open(path, "wb") as f:
            np.savez(f, **arrays)

    outputs.write_files(
        {
            paths["csv"]: outputs.csv_text(table.pairs, table.values),
            paths["npz"]: save_npz,
            paths["json"]: outputs.json_text(result.provenance),
            **({paths["mask"]: generated} if generated is not None else {}),
        }
    )
    return paths


def load_npz(path: str | Path) -> dict[str, Any]:
    """Read a results ``.npz`` back: layer names, and per region a list of per-layer vectors."""
    with np.load(path) as z:
        offsets = z["layer_offsets"]
        data = {k: z[k] for k in z.files}
    vectors = {
        str(r): [data[f"vectors_{r}"][a:b] for a, b in zip(offsets[:-1], offsets[1:])] for r in data["regions"]
    }
    return {**data, "layer_names": [str(n) for n in data["layer_names"]], "vectors": vectors}


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def software_versions() -> dict[str, str]:
    """Versions of everything that shapes the numbers."""
    import nibabel
    import scipy

    found = {
        "helpers": __version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "nibabel": nibabel.__version__,
        "scipy": scipy.__version__,
        **inflate.versions(),
    }
    try:  # the installed version, without importing torch_xla (slow, and it grabs the device)
        found["torch_xla"] = importlib.metadata.version("torch_xla")
    except importlib.metadata.PackageNotFoundError:
        pass
    return found


def provenance(
    config: Config,
    scan: io.Scan,
    labels: dict[str, int],
    crops: list[regions.Region],
    model: extract.PreparedModel,
    feats: extract.Features,
    table: similarity.SimilarityTable,
    timings: dict[str, float],
    seen: list[str],
) -> dict[str, Any]:
    """The results.json record: inputs and their hashes, geometry, settings, weights, versions, device."""
    info = model.model.weights_info
    is_random = bool(info and info.is_random)
    record: dict[str, Any] = {
        "tool": {"name": "knee-ct-features", "version": __version__, "git_commit": _git_commit()},
        "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "random_weights": is_random,
    }
    if is_random:
        record["WARNING"] = RANDOM_WEIGHTS_BANNER
    record |= {
        "inputs": {
            "volume": {"path": str(Path(scan.volume_path).resolve()), "sha256": scan.volume_sha256},
            "mask": {"path": str(Path(scan.mask_path).resolve()), "sha256": scan.mask_sha256},
            "source_shape": list(scan.source_shape),
            "source_orientation": scan.source_orientation,
            "source_affine": scan.source_affine,
        },
        "scan": {
            "canonical_frame": "array [d, h, w]: d inferior->superior, h anterior->posterior, w right->left",
            "shape": list(scan.shape),
            "spacing_mm": list(scan.spacing),
            "affine": scan.affine,
            "label_counts": {str(k): v for k, v in scan.label_counts().items()},
            "processing": list(getattr(scan, "processing", [])),
        },
        "labels": labels,
        "regions": {
            r.name: {
                "label": r.label,
                "box": [list(b) for b in r.box],
                "crop_shape": list(r.crop_shape),
                "network_input_shape": list(feats.input_shapes[r.name]),
                "label_voxels": r.label_voxels,
                "normalisation": r.stats,
                "forward_s": round(feats.timings_s[r.name], 4),
                "gflop": round(feats.gflop[r.name], 3),
            }
            for r in crops
        },
        "settings": config.to_dict(),
        "model": {
            "architecture": "torchvision DenseNet-121 features inflated to 3D (conv0 summed to 1 channel)",
            "inflation": model.model.inflation,
            "conv_layers": len(feats.layer_names),
            "selected_layers": dict(zip(table.columns, table.column_layers)),
            "weights": info.to_dict() if info else None,
        },
        "device": feats.device_info,
        "precision": feats.precision,
        "versions": software_versions(),
        "timings_s": {k: round(v, 4) for k, v in timings.items()},
        "warnings": list(seen),
        "results": table.as_dict(),
    }
    return record
