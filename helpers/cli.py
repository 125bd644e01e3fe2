"""Command line: ``python pipeline.py --volume V --mask M --output results.csv --device cpu``.

Bad input exits with status 2 and one line on stderr naming the file and the problem (no
traceback unless ``--debug``); any other failure exits 1; Ctrl-C exits 130. Previous results
are never left half-overwritten.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
from collections.abc import Iterator, Sequence

from . import __version__, extract, inflate, phantom, regions, similarity
from .errors import InputError
from .pipeline import Config, run


class _Parser(argparse.ArgumentParser):
    """argparse with the project's error convention: one line on stderr, exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="pipeline.py",
        description="Region-specific deep features from a knee CT: crop tibia, femur and background, "
        "run an inflated ImageNet DenseNet-121, compare regions by cosine similarity at several depths.",
        epilog="With neither --volume nor --mask, the embedded synthetic knee phantom is used.",
    )
    d = Config()
    p.add_argument("--volume", help="CT volume, NIfTI (.nii/.nii.gz), Hounsfield units")
    p.add_argument("--mask", help="label mask, NIfTI, same grid as the volume; or auto (auto:HU) to segment femur "
                   "and tibia from the CT (saved next to the results as <output stem>_automask.nii.gz)")
    p.add_argument("--output", default=d.output, help="results CSV; .npz and .json go next to it (default: %(default)s)")
    p.add_argument("--device", default=d.device, help="auto|cpu|cuda|cuda:N|xla (default: %(default)s)")
    p.add_argument("--precision", default=d.precision, choices=extract.PRECISIONS,
                   help="auto = bf16 on capable GPUs, fp32 on CPU/XLA (default: %(default)s)")
    p.add_argument("--weights", default=d.weights,
                   help="auto|imagenet|random|PATH to a torchvision .pth (default: %(default)s: ImageNet if "
                   "available, else random with a loud warning)")
    p.add_argument("--inflation", default=d.inflation, choices=inflate.INFLATION_MODES,
                   help="2D->3D kernel inflation (default: %(default)s)")
    p.add_argument("--pad", type=int, default=d.pad, help="voxels added around each bounding box (default: %(default)s)")
    p.add_argument("--labels", default=None,
                   help="label map, e.g. tibia=2,femur=1 (default: tibia=1,femur=2,background=0)")
    p.add_argument("--crop", default=d.crop, choices=regions.CROP_MODES,
                   help="masked: outside-label voxels neutral; bbox: whole box, as the seed (default: %(default)s)")
    p.add_argument("--normalize", default=d.normalize,
                   help="zscore | window | window:LEVEL,WIDTH in HU (default: %(default)s)")
    p.add_argument("--bucket", type=int, default=None,
                   help="pad crops up to a multiple of N voxels and pool the valid part (default: 32 on xla, off elsewhere)")
    p.add_argument("--spacing", nargs="+", metavar="MM", default=None,
                   help="resample to this voxel size in mm: one value (isotropic) or three (x y z); CT linear, "
                   "mask nearest (default: native grid)")
    p.add_argument("--force", action="store_true",
                   help="run even when the memory guard estimates that the forward will not fit")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of random weights (default: %(default)s)")
    p.add_argument("--phantom", default=d.phantom_preset, choices=sorted(phantom.PRESETS),
                   help="phantom preset used when no files are given (default: %(default)s)")
    p.add_argument("--data-dir", default=d.data_dir, help="where the phantom is written (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return p


def config_from_args(args: argparse.Namespace) -> Config:
    return Config(
        volume=args.volume, mask=args.mask, output=args.output, device=args.device, precision=args.precision,
        weights=args.weights, inflation=args.inflation, seed=args.seed, pad=args.pad, labels=args.labels,
        crop=args.crop, normalize=args.normalize, bucket=args.bucket, progress=not args.no_progress,
        phantom_preset=args.phantom, data_dir=args.data_dir, spacing=args.spacing, force=args.force,
    )  # fmt: skip


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """Treat SIGTERM (``kill``, ``timeout``, job schedulers) like Ctrl-C, so that temporary files
    are removed and earlier results stay as they were (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with _terminate_as_interrupt():
            result = run(config_from_args(args))
    except InputError as exc:
        if args.debug:
            raise
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: previous results were left as they were", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.debug:
            raise
        print(f"error: {type(exc).__name__}: {_one_line(exc)} (run with --debug for the traceback)", file=sys.stderr)
        return 1
    print(similarity.format_table(result.table))
    for kind, path in result.paths.items():
        print(f"wrote {kind}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
