"""Where the notebook runs (Colab or local; TPU, GPU or CPU) and the Colab set-up it needs.

Everything here works **before torch is imported** (and never imports it): on a Colab TPU
runtime torch and torch_xla must be installed as a matched pair before the first
``import torch`` in the kernel, so the environment is detected from the operating system:

* TPU: TPU device files (``/dev/accel*``, or ``/dev/vfio/<n>`` beside the ``vfio`` control
  node), ``PJRT_DEVICE=TPU`` or ``TPU_*`` / ``COLAB_TPU_ADDR`` variables in the environment;
* GPU: ``nvidia-smi`` lists a device;
* Colab: the IPython shell is Colab's (``google.colab._shell``); the ``COLAB_*`` variables are
  also set in Kaggle's Colab-based image, so they are not used alone.

``google.colab`` is imported only inside Colab. Versions are read from the installed
distributions' metadata, so printing them imports nothing.
"""

from __future__ import annotations

import glob
import importlib.metadata as metadata
import importlib.util
import os
import platform
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

#: torch_xla's last release and the torch/torchvision it is built against (installed together on TPU).
TPU_PACKAGES = ("torch==2.9.0", "torchvision==0.24.0", "torch_xla[tpu]==2.9.0")
#: Requirements a notebook front end already provides; never installed by the notebook.
FRONTEND_PACKAGES = frozenset({"papermill", "ipykernel", "nbformat"})
#: Distributions whose versions the set-up cell prints.
SHOWN_VERSIONS = ("torch", "torchvision", "torch_xla", "numpy", "nibabel", "scipy", "matplotlib", "ipywidgets")
#: Where Colab mounts Google Drive.
DRIVE_MOUNT = "/content/drive"
UPLOAD_MODES = ("none", "upload", "drive")


@dataclass(frozen=True)
class Environment:
    """What the notebook found: Colab or not, and the accelerator (``tpu``, ``gpu`` or ``cpu``)."""

    colab: bool
    accelerator: str
    accelerator_detail: str
    python: str = field(default_factory=platform.python_version)
    executable: str = field(default_factory=lambda: sys.executable)

    @property
    def runtime(self) -> str:
        return "Google Colab" if self.colab else "local Jupyter/papermill"


# ----------------------------------------------------------------------------- detection


def in_colab() -> bool:
    """True inside a Google Colab kernel (Colab's IPython shell; ``google.colab`` importable)."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and type(shell).__module__.startswith("google.colab")


def tpu_evidence(environ: Mapping[str, str] | None = None, dev: str = "/dev") -> list[str]:
    """Reasons to believe this host has a TPU (empty when there are none)."""
    env = os.environ if environ is None else environ
    found = sorted(glob.glob(os.path.join(dev, "accel*")))
    vfio = os.path.join(dev, "vfio")
    if os.path.isdir(vfio):
        groups = [n for n in os.listdir(vfio) if n != "vfio"]  # "vfio" is the control node, present on any host
        found += [os.path.join(vfio, n) for n in sorted(groups)]
    if env.get("PJRT_DEVICE", "").upper() == "TPU":
        found.append("PJRT_DEVICE=TPU")
    found += sorted(k for k in env if k.startswith("TPU_") or k == "COLAB_TPU_ADDR")
    return found


def gpu_names() -> list[str]:
    """GPU names reported by ``nvidia-smi`` (empty without an NVIDIA GPU or driver)."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    try:
        out = subprocess.run([exe, "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.strip()] if out.returncode == 0 else []


def detect() -> Environment:
    """Detect Colab and the accelerator without importing torch."""
    tpu = tpu_evidence()
    if tpu:
        return Environment(in_colab(), "tpu", ", ".join(tpu[:4]))
    gpus = gpu_names()
    if gpus:
        return Environment(in_colab(), "gpu", ", ".join(gpus))
    return Environment(in_colab(), "cpu", platform.processor() or platform.machine())


# ----------------------------------------------------------------------------- packages


def repo_root() -> Path:
    """The repository checkout that holds this ``helpers`` package (falls back to the working directory)."""
    root = Path(__file__).resolve().parent.parent
    return root if (root / "requirements.txt").is_file() else Path.cwd()


def project_path(path: str | os.PathLike[str]) -> Path:
    """``path`` made absolute: relative paths are taken from the repository root, wherever the kernel runs."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else repo_root() / p


def requirements(path: str | os.PathLike[str] | None = None) -> list[str]:
    """Requirement lines of ``requirements.txt`` (comments, blanks and ``-r`` includes skipped)."""
    path = Path(path) if path is not None else repo_root() / "requirements.txt"
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("-")]


def requirement_name(spec: str) -> str:
    """Distribution name of a requirement line: ``"torch_xla[tpu]==2.9.0"`` -> ``"torch-xla"``."""
    name = re.split(r"[\[<>=!~;@ ]", spec.strip(), maxsplit=1)[0]
    return re.sub(r"[-_.]+", "-", name).lower()


def installed_version(name: str) -> str | None:
    """Installed version of a distribution, or None (reads metadata only; imports nothing)."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def missing_packages(env: Environment, specs: Sequence[str] | None = None) -> list[str]:
    """The pip requirements to install here: only what is not installed at all.

    On a TPU host without torch_xla this is the matched torch/torchvision/torch_xla trio
    (:data:`TPU_PACKAGES`) first, replacing whatever torch is there. Front-end packages
    (papermill, ipykernel, nbformat) are never included.
    """
    specs = requirements() if specs is None else list(specs)
    todo: list[str] = []
    tpu_trio = env.accelerator == "tpu" and installed_version("torch_xla") is None
    if tpu_trio:
        todo += TPU_PACKAGES
    for spec in specs:
        name = requirement_name(spec)
        if name in FRONTEND_PACKAGES or (tpu_trio and name in ("torch", "torchvision")):
            continue
        if installed_version(name) is None:
            todo.append(spec)
    return todo


def install_missing(env: Environment, dry_run: bool = False) -> list[str]:
    """In Colab, pip-install what is missing (see :func:`missing_packages`); elsewhere install nothing.

    torch/torch_xla must be installed before the kernel first imports torch: if torch was
    already imported, this raises and asks for a runtime restart. Returns what was (or, with
    ``dry_run``, would be) installed.
    """
    if not env.colab:
        return []
    todo = missing_packages(env)
    if not todo or dry_run:
        return todo
    if "torch" in sys.modules and any(requirement_name(s) in ("torch", "torch-xla") for s in todo):
        raise RuntimeError(
            "torch is already imported in this kernel, so torch/torch_xla cannot be replaced: "
            "Runtime > Restart session, then run the notebook from the top"
        )
    print("installing:", " ".join(todo), flush=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", *todo], check=True)
    importlib.invalidate_caches()
    return todo


def versions(names: Sequence[str] = SHOWN_VERSIONS) -> dict[str, str]:
    """Installed versions of ``names`` ("-" when missing), Python first; imports nothing."""
    return {"python": platform.python_version(), **{n: installed_version(n) or "-" for n in names}}


def auto_device(env: Environment) -> str:
    """The device ``device="auto"`` should resolve to here: cuda on a GPU, xla on a TPU with torch_xla, else cpu."""
    if env.accelerator == "gpu":
        return "cuda"
    if env.accelerator == "tpu" and installed_version("torch_xla") is not None:
        return "xla"
    return "cpu"


def describe(env: Environment) -> str:
    """Multi-line summary of the runtime, accelerator and package versions (for the set-up cell)."""
    accel = {"tpu": "TPU", "gpu": "GPU", "cpu": "CPU only"}[env.accelerator]
    lines = [
        f"runtime     : {env.runtime} (python {env.python}, {env.executable})",
        f"accelerator : {accel} ({env.accelerator_detail}); device 'auto' -> {auto_device(env)}",
        f"helpers from: {Path(__file__).resolve().parent}",
        "versions    : " + ", ".join(f"{k} {v}" for k, v in versions().items()),
    ]
    if env.accelerator == "tpu" and installed_version("torch_xla") is None:
        lines.append("note        : torch_xla is not installed; device 'auto' will use the CPU")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- Colab I/O and widgets


def enable_widgets(env: Environment | None = None) -> bool:
    """Turn on Colab's custom widget manager (ipywidgets 8 needs it there). True if it was enabled."""
    if not (env.colab if env is not None else in_colab()):
        return False
    from google.colab import output  # only exists in Colab

    output.enable_custom_widget_manager()
    return True


def pick_upload(names: Sequence[str], volume: str = "", mask: str = "") -> tuple[str, str]:
    """Which uploaded files are the volume and the mask.

    Names given as parameters win; otherwise the file whose name contains ``mask``, ``label``
    or ``seg`` is the mask and the other NIfTI file is the volume.
    """
    nifti = [n for n in names if n.endswith((".nii", ".nii.gz"))]
    if not mask:
        masks = [n for n in nifti if re.search(r"mask|label|seg", Path(n).name, re.IGNORECASE) and n != volume]
        mask = masks[0] if len(masks) == 1 else ""
    if not volume:
        rest = [n for n in nifti if n != mask]
        volume = rest[0] if len(rest) == 1 else ""
    if not volume or not mask:
        raise ValueError(
            f"cannot tell volume and mask apart among {list(names)}: upload two NIfTI files, the mask "
            "named with 'mask', 'label' or 'seg', or set the volume and mask parameters to their names"
        )
    return volume, mask


def get_inputs(volume: str, mask: str, upload: str, env: Environment) -> tuple[str, str]:
    """Resolve the volume/mask parameters, in Colab after an upload or a Drive mount.

    ``upload="upload"``: pick files in the browser (:func:`google.colab.files.upload`, saved to
    the working directory). ``upload="drive"``: mount Google Drive at ``/content/drive``;
    relative paths are then taken from ``MyDrive``. Outside Colab ``upload`` is ignored (with a
    note). Empty paths stay empty (the phantom); other paths become absolute (see :func:`project_path`).
    """
    if upload not in UPLOAD_MODES:
        raise ValueError(f"upload: expected one of {', '.join(UPLOAD_MODES)}, got {upload!r}")
    if upload != "none" and not env.colab:
        print(f"note: upload={upload!r} only applies in Colab; using the given paths")
    elif upload == "upload":
        from google.colab import files  # only exists in Colab

        names = list(files.upload())
        volume, mask = (str(Path.cwd() / n) for n in pick_upload(names, Path(volume).name, Path(mask).name))
    elif upload == "drive":
        from google.colab import drive  # only exists in Colab

        drive.mount(DRIVE_MOUNT)
        base = Path(DRIVE_MOUNT) / "MyDrive"
        volume, mask = (str(p if Path(p).is_absolute() else base / p) if p else "" for p in (volume, mask))
    return tuple(str(project_path(p)) if p else "" for p in (volume, mask))  # type: ignore[return-value]

