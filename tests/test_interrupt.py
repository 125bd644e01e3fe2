"""Interrupted or crashing runs leave earlier results byte-identical and no temporary files."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, NoReturn

import numpy as np
import pytest

from helpers import cli, pipeline

ROOT = Path(__file__).resolve().parents[1]
EARLIER = {"results.csv": b"pair,layer_1,layer_2,layer_3\nearlier,1,2,3\n", "results.npz": b"old npz",
           "results.json": b"{\"old\": true}\n", "results_automask.nii.gz": b"old mask"}  # fmt: skip


@pytest.fixture
def out_dir(tmp_path: Path) -> Path:
    out = tmp_path / "out"
    out.mkdir()
    for name, data in EARLIER.items():
        (out / name).write_bytes(data)
    return out


def _untouched(out: Path) -> None:
    assert sorted(p.name for p in out.iterdir()) == sorted(EARLIER), "no temporary or partial file left"
    for name, data in EARLIER.items():
        assert (out / name).read_bytes() == data, name


def _args(phantom_files, out: Path, *extra: str) -> list[str]:
    ct, mask = phantom_files
    return ["--volume", str(ct), "--mask", str(mask), "--output", str(out / "results.csv"), "--device", "cpu",
            "--weights", "random", "--no-progress", *extra]  # fmt: skip


@pytest.mark.parametrize("error, status", [(KeyboardInterrupt, 130), (RuntimeError("boom"), 1), (MemoryError, 1)])
def test_failure_during_extraction(phantom_files, cpu_model, monkeypatch, out_dir, error, status, capsys):
    monkeypatch.setattr(pipeline, "build_model", lambda config: cpu_model)

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(pipeline.extract, "extract_features", fail)
    assert cli.main(_args(phantom_files, out_dir)) == status
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("interrupted" if status == 130 else "error:")
    _untouched(out_dir)


@pytest.mark.parametrize("error, status", [(KeyboardInterrupt, 130), (OSError(28, "No space left on device"), 1)])
def test_failure_while_writing_the_results(phantom_files, cpu_model, monkeypatch, out_dir, error, status):
    """The CSV's temporary file is already written when the NPZ fails: all of it is rolled back."""
    monkeypatch.setattr(pipeline, "build_model", lambda config: cpu_model)
    seen: list[list[str]] = []

    def fail(*args, **kwargs):
        seen.append(sorted(p.name for p in out_dir.iterdir()))
        raise error

    monkeypatch.setattr(np, "savez", fail)
    assert cli.main(_args(phantom_files, out_dir, "--mask", "auto")) == status
    assert seen and any(name.endswith(".tmp") for name in seen[0]), "the failure happened mid-write"
    _untouched(out_dir)


# A real process: the stage named on the command line announces itself on stderr and sleeps
# until the signal arrives; nothing else is patched.
_SLOW = r"""
import sys, time
import numpy as np
from helpers import cli, pipeline
stage = sys.argv[1]
def wait(*args, **kwargs):
    print("READY", file=sys.stderr, flush=True)
    time.sleep(120)
if stage == "extract":
    pipeline.extract.extract_features = wait
else:
    np.savez = wait
raise SystemExit(cli.main(sys.argv[2:]))
"""


#: Bounds (seconds) of each wait on the child: READY on stderr, exit after the signal, end of stderr.
READY_S, EXIT_S, DRAIN_S = 240.0, 60.0, 30.0


def _read_lines(stream: IO[str], lines: queue.Queue[str | None]) -> None:
    """Reader thread: every line of ``stream`` into ``lines``, then None at end of file."""
    for line in stream:
        lines.put(line)
    lines.put(None)


def _fail_killed(proc: subprocess.Popen[str], lines: list[str], why: str) -> NoReturn:
    proc.kill()
    proc.wait(timeout=30)
    pytest.fail(f"{why} (exit status {proc.returncode}; stderr so far: {''.join(lines)!r})")


@pytest.mark.parametrize("stage, sig", [("write", signal.SIGINT), ("extract", signal.SIGTERM)],
                         ids=["ctrl-c-while-writing", "sigterm-while-extracting"])  # fmt: skip
def test_signal_during_a_real_run(phantom_files, out_dir, stage, sig):
    """Every wait is bounded: a child that hangs silently is killed and the test fails."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _SLOW, stage, *_args(phantom_files, out_dir, "--mask", "auto")],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, cwd=ROOT,
    )  # fmt: skip
    assert proc.stderr is not None
    received: queue.Queue[str | None] = queue.Queue()
    threading.Thread(target=_read_lines, args=(proc.stderr, received), daemon=True).start()
    lines: list[str] = []
    try:
        deadline = time.monotonic() + READY_S
        while not lines or lines[-1].strip() != "READY":
            try:
                line = received.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                _fail_killed(proc, lines, f"no READY from the {stage} stage within {READY_S:g} s; killed")
            if line is None:
                _fail_killed(proc, lines, f"the child closed stderr before the {stage} stage")
            lines.append(line)
        during = sorted(p.name for p in out_dir.iterdir())
        os.kill(proc.pid, sig)
        try:
            proc.wait(timeout=EXIT_S)
        except subprocess.TimeoutExpired:
            _fail_killed(proc, lines, f"still running {EXIT_S:g} s after {sig.name}; killed")
        rest: list[str] = []
        deadline = time.monotonic() + DRAIN_S
        while True:
            try:
                line = received.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                pytest.fail(f"stderr still open {DRAIN_S:g} s after the child exited (so far: {''.join(lines + rest)!r})")
            if line is None:
                break
            rest.append(line)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    assert proc.returncode == 130, "".join(lines + rest)
    assert "".join(rest).strip().splitlines()[-1:] == ["interrupted: previous results were left as they were"], rest
    if stage == "write":
        assert any(name.endswith(".tmp") for name in during), during
    _untouched(out_dir)
