"""Writing results: all-or-nothing across files, earlier results restored, nothing left behind."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from helpers import outputs
from helpers.errors import InputError


def _listing(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_write_files_replaces_all_files(tmp_path):
    a, b = tmp_path / "r.csv", tmp_path / "r.json"
    a.write_text("old a")
    outputs.write_files({a: "new a", b: b"new b"})
    assert _listing(tmp_path) == {"r.csv": b"new a", "r.json": b"new b"}


def test_a_failure_while_renaming_restores_every_earlier_file(tmp_path, monkeypatch):
    paths = [tmp_path / n for n in ("r.csv", "r.npz", "r.json")]
    for p in paths[:2]:
        p.write_text(f"old {p.name}")
    before = _listing(tmp_path)
    real_replace = outputs.os.replace
    calls = {"n": 0}

    def failing_replace(src, dst):  # the third rename fails (disk full, Ctrl-C, ...)
        calls["n"] += 1
        if calls["n"] == 3 and Path(dst) == paths[2]:
            raise KeyboardInterrupt
        return real_replace(src, dst)

    monkeypatch.setattr(outputs.os, "replace", failing_replace)
    with pytest.raises(KeyboardInterrupt):
        outputs.write_files({p: f"new {p.name}" for p in paths})
    assert _listing(tmp_path) == before  # old files back, the new-only file gone, no temp or backup


def test_a_failing_writer_leaves_the_folder_as_it_was(tmp_path):
    (tmp_path / "r.csv").write_text("old")
    before = _listing(tmp_path)

    def broken(path: Path) -> None:
        with open(path, "wb") as f:
            np.save(f, np.zeros(3))
        raise RuntimeError("writer failed")

    with pytest.raises(RuntimeError):
        outputs.write_files({tmp_path / "r.csv": "new", tmp_path / "r.npz": broken})
    assert _listing(tmp_path) == before


def test_check_output_refuses_a_folder_in_place_of_any_result_file(tmp_path):
    (tmp_path / "results.json").mkdir()
    with pytest.raises(InputError, match="results.json: is a folder"):
        outputs.check_output(tmp_path / "results.csv")
    assert outputs.result_paths(tmp_path / "x.csv")["npz"] == tmp_path / "x.npz"
