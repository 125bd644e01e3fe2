"""Atomic writing of results and the provenance record.

Every file is first written to a hidden temporary file in the destination folder and renamed
over the destination only when all of a run's files are complete, so a failed or interrupted
run (an exception, Ctrl-C) leaves the previous results intact and no temporary files behind.
"""

from __future__ import annotations

import contextlib
import csv
import io as _io
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

CSV_HEADER = ("pair", "layer_1", "layer_2", "layer_3")


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once: setting the umask to read it is not thread-safe


@contextlib.contextmanager
def atomic_paths(paths: Sequence[str | Path]) -> Iterator[list[Path]]:
    """Yield temporary paths next to ``paths``; when the block succeeds, put them all in place.

    All-or-nothing: on any exception (``KeyboardInterrupt`` and SIGTERM-as-interrupt included),
    before or while the files are renamed into place, every destination gets back its earlier
    content (or is removed if it did not exist) and no temporary or backup file is left.
    """
    targets = [Path(p) for p in paths]
    temps: list[Path] = []
    backups: dict[Path, Path | None] = {}
    done: list[Path] = []
    try:
        for target in targets:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
            os.close(fd)
            temps.append(Path(tmp))
            os.chmod(tmp, 0o666 & ~_UMASK)
        yield temps
        for target in targets:  # keep the earlier results until every new file is in place
            backups[target] = None
            if target.is_file():
                backup = target.with_name(f".{target.name}.{os.getpid()}.bak")
                try:
                    os.link(target, backup)
                except OSError:  # a file system without hard links (e.g. a mounted Google Drive)
                    shutil.copy2(target, backup)
                backups[target] = backup
        for tmp, target in zip(temps, targets):
            os.replace(tmp, target)
            done.append(target)
    except BaseException:
        for target in done:
            backup = backups.get(target)
            if backup is not None:
                os.replace(backup, target)
            else:
                with contextlib.suppress(FileNotFoundError):
                    target.unlink()
        raise
    finally:
        for path in [*temps, *(b for b in backups.values() if b is not None)]:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


def result_paths(csv_path: str | Path) -> dict[str, Path]:
    """The files a run writes: ``{"csv": results.csv, "npz": results.npz, "json": results.json}``."""
    csv_path = Path(csv_path)
    return {"csv": csv_path, "npz": csv_path.with_suffix(".npz"), "json": csv_path.with_suffix(".json")}


def check_output(path: str | Path) -> Path:
    """Validate a results path before any work, creating nothing: it ends in ``.csv``, none of
    the run's files (:func:`result_paths`) is a folder, and the folder exists writable or can be
    created under a writable existing folder. Raises :class:`~helpers.errors.InputError` naming
    the path."""
    from .errors import InputError

    path = Path(path)
    if path.suffix.lower() != ".csv":
        raise InputError(f"{path}: --output must end in .csv")
    for target in result_paths(path).values():
        if target.is_dir():
            raise InputError(f"{target}: is a folder where a result file must be written")
    folder = path.parent
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(f"{folder}: cannot create the output folder ({existing} is not a folder)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"{folder}: output folder is not writable ({existing})")
    return path


def csv_text(pairs: Sequence[str], values: np.ndarray) -> str:
    """The results table as CSV text: header ``pair,layer_1,layer_2,layer_3`` and one row per pair.

    Values are written with 8 decimals so that identical runs give byte-identical files.
    """
    buf = _io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_HEADER)
    for pair, row in zip(pairs, values):
        writer.writerow([pair, *(f"{float(v):.8f}" for v in row)])
    return buf.getvalue()


def read_csv(path: str | Path) -> tuple[list[str], np.ndarray]:
    """Read a results CSV back: (pairs, values of shape (n_pairs, 3))."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if tuple(rows[0]) != CSV_HEADER:
        raise ValueError(f"{path}: unexpected header {rows[0]}")
    return [r[0] for r in rows[1:]], np.array([[float(v) for v in r[1:]] for r in rows[1:]])


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def json_text(record: dict[str, Any]) -> str:
    """Provenance as indented JSON text."""
    return json.dumps(record, indent=2, default=_json_default) + "\n"


def write_files(contents: dict[str | Path, str | bytes | Any]) -> list[Path]:
    """Write several files all-or-nothing.

    Each value is text, bytes, or a callable ``f(path)`` that writes the file (e.g. ``np.savez``).
    """
    targets = list(contents)
    with atomic_paths(targets) as temps:
        for tmp, target in zip(temps, targets):
            value = contents[target]
            if isinstance(value, str):
                tmp.write_text(value)
            elif isinstance(value, bytes):
                tmp.write_bytes(value)
            else:
                value(tmp)
    return [Path(t) for t in targets]
