"""Where the notebook runs (Colab or local; TPU, GPU or CPU) and the Colab set-up it needs.

Everything here works **before torch is imported** (and never imports it): on a Colab TPU
runtime torch and torch_xla must be installed as a matched pair before the first
``import torch`` in the kernel, so the environment is detected from the operating system:

* TPU (:func:`tpu_evidence`, the project's one TPU detector; ``helpers.extract.is_tpu_host``
  calls it): ``PJRT_DEVICE=TPU``, TPU device files ``/dev/accel<N>``, or a TPU chip on the PCI
  bus (Google's vendor id with a TPU device id: the check torch_xla itself uses);
* GPU: ``nvidia-smi`` lists a device;
* Colab: the IPython shell is Colab's (``google.colab._shell``); the ``COLAB_*`` variables are
  also set in Kaggle's Colab-based image, so they are not used alone.

Which device ``device="auto"`` gets is decided by ``helpers.extract.resolve_device`` when the
network is built (it asks torch); :func:`auto_device` predicts it with the same order (a GPU,
else a TPU with torch_xla, else the CPU).

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

from packaging.requirements import InvalidRequirement, Requirement
from packaging.version import InvalidVersion, Version

#: torch_xla's last release and the torch/torchvision it is built against (installed together on TPU).
TPU_PACKAGES = ("torch==2.9.0", "torchvision==0.24.0", "torch_xla[tpu]==2.9.0")
#: Requirements a notebook front end already provides; never installed by the notebook.
FRONTEND_PACKAGES = frozenset({"papermill", "ipykernel", "nbformat"})
#: Distributions whose versions the set-up cell prints.
SHOWN_VERSIONS = ("torch", "torchvision", "torch_xla", "numpy", "nibabel", "scipy", "matplotlib", "ipywidgets")
#: Oldest torch this tool runs on (the cuDNN ``fp32_precision`` API; README 'Precision').
MIN_TORCH = "2.9"
#: Where Colab mounts Google Drive.
DRIVE_MOUNT = "/content/drive"
UPLOAD_MODES = ("none", "upload", "drive")
#: PCI ids of TPU chips, as torch_xla lists them (``torch_xla._internal.tpu``): Google's vendor id and the
#: device ids of v2/v3, v4, v5e, v6e, 7x and two test chips. The vendor id alone is no TPU (every GCE VM has a gVNIC).
GOOGLE_PCI_VENDOR = "0x1ae0"
TPU_PCI_DEVICES = frozenset({"0x0027", "0x005e", "0x0063", "0x006f", "0x0076", "0x0056", "0x0062"})


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


def tpu_pci_chips(pci: str = "/sys/bus/pci/devices") -> list[str]:
    """PCI slots holding a TPU chip (vendor Google and a TPU device id), as torch_xla counts them."""
    found = []
    for vendor in sorted(glob.glob(os.path.join(pci, "*", "vendor"))):
        slot = os.path.dirname(vendor)
        try:
            if Path(vendor).read_text().strip() != GOOGLE_PCI_VENDOR:
                continue
            device = Path(slot, "device").read_text().strip()
        except OSError:
            continue
        if device in TPU_PCI_DEVICES:
            found.append(f"PCI {os.path.basename(slot)} (TPU {device})")
    return found


def tpu_evidence(environ: Mapping[str, str] | None = None, dev: str = "/dev", pci: str = "/sys/bus/pci/devices") -> list[str]:
    """Reasons to believe this host has a TPU (empty when there are none): the project's one TPU detector.

    ``PJRT_DEVICE=TPU``, TPU device files ``/dev/accel<N>`` (TPU v2-v4 VMs) or a TPU chip on the
    PCI bus (:func:`tpu_pci_chips`; v5e and later expose their chips through VFIO, and
    ``/dev/vfio/<N>`` alone also exists for any passed-through device, so the PCI ids decide).
    ``TPU_*`` / ``COLAB_TPU_ADDR`` variables are not evidence: they are set in images without a
    local TPU (and ``COLAB_TPU_ADDR`` names a remote TPU node, which PJRT cannot use).
    """
    env = os.environ if environ is None else environ
    found = sorted(glob.glob(os.path.join(dev, "accel[0-9]*")))
    if env.get("PJRT_DEVICE", "").upper() == "TPU":
        found.append("PJRT_DEVICE=TPU")
    return found + tpu_pci_chips(pci)


def is_tpu_host() -> bool:
    """True on a TPU VM (Colab TPU runtimes included); see :func:`tpu_evidence`."""
    return bool(tpu_evidence())


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
    """Detect Colab and the accelerator without importing torch (a GPU first, as ``resolve_device`` does)."""
    gpus = gpu_names()
    if gpus:
        return Environment(in_colab(), "gpu", ", ".join(gpus))
    tpu = tpu_evidence()
    if tpu:
        return Environment(in_colab(), "tpu", ", ".join(tpu[:4]))
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


def satisfies(spec: str) -> bool:
    """True when the installed distribution meets the requirement line (installed, version in range).

    Requirements whose environment marker does not apply here are met. Pre-release and local
    versions count (``2.9.0+cu126`` is in ``>=2.9,<2.15``).
    """
    try:
        req = Requirement(spec)
    except InvalidRequirement:
        return installed_version(requirement_name(spec)) is not None
    if req.marker is not None and not req.marker.evaluate():
        return True
    have = installed_version(requirement_name(spec))
    if have is None:
        return False
    try:
        return req.specifier.contains(Version(have), prereleases=True)
    except InvalidVersion:
        return False


def packages_to_install(env: Environment, specs: Sequence[str] | None = None) -> list[str]:
    """The pip requirements to install here: those not installed, or installed at a version outside their range.

    On a TPU host torch and torchvision come only as the matched torch/torchvision/torch_xla
    trio (:data:`TPU_PACKAGES`), first, when torch_xla is missing or torch is outside its range.
    On a GPU runtime an installed torch/torchvision (Colab's CUDA build) is never replaced, even
    out of range (:func:`torch_warnings` says so). Front-end packages (papermill, ipykernel,
    nbformat) are never included.
    """
    specs = requirements() if specs is None else list(specs)
    torch_spec = next((s for s in specs if requirement_name(s) == "torch"), "torch")
    tpu = env.accelerator == "tpu"
    tpu_trio = tpu and (installed_version("torch_xla") is None or not satisfies(torch_spec))
    todo: list[str] = list(TPU_PACKAGES) if tpu_trio else []
    for spec in specs:
        name = requirement_name(spec)
        kept = name in ("torch", "torchvision") and (tpu or (env.accelerator == "gpu" and installed_version(name) is not None))
        if name not in FRONTEND_PACKAGES and not kept and not satisfies(spec):
            todo.append(spec)
    return todo


def torch_warnings(env: Environment, specs: Sequence[str] | None = None) -> list[str]:
    """On a GPU runtime: a warning for each installed torch/torchvision outside its range (kept, not reinstalled)."""
    if env.accelerator != "gpu":
        return []
    specs = requirements() if specs is None else list(specs)
    out = []
    for spec in specs:
        name, have = requirement_name(spec), installed_version(requirement_name(spec))
        if name not in ("torch", "torchvision") or have is None or satisfies(spec):
            continue
        try:
            old = name == "torch" and Version(have).release < Version(MIN_TORCH).release
        except InvalidVersion:
            old = False
        if old:
            out.append(f"warning: torch {have} is older than {MIN_TORCH}, which this tool needs; the notebook keeps this "
                       f"GPU runtime's CUDA build: pip install '{spec}', then Runtime > Restart session")  # fmt: skip
        else:
            out.append(f"warning: {name} {have} is outside {spec} (tested); kept, as this GPU runtime's CUDA build")
    return out


def install_requirements(env: Environment, dry_run: bool = False) -> list[str]:
    """In Colab, pip-install what is missing or out of range (see :func:`packages_to_install`); elsewhere nothing.

    Prints :func:`torch_warnings`. torch/torch_xla must be installed before the kernel first
    imports torch: if torch was already imported, this raises and asks for a runtime restart.
    Returns what was (or, with ``dry_run``, would be) installed.
    """
    if not env.colab:
        return []
    for line in torch_warnings(env):
        print(line, flush=True)
    todo = packages_to_install(env)
    if not todo or dry_run:
        return todo
    if "torch" in sys.modules and any(requirement_name(s) in ("torch", "torchvision", "torch-xla") for s in todo):
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
    """The device ``device="auto"`` is expected to get here, in ``helpers.extract.resolve_device``'s order:
    cuda on a GPU (unless torch is a CPU-only build), xla on a TPU with torch_xla installed, else cpu.

    Only a prediction: ``resolve_device`` asks torch itself when the network is built.
    """
    if env.accelerator == "gpu" and "+cpu" not in (installed_version("torch") or ""):
        return "cuda"
    if env.accelerator == "tpu" and installed_version("torch_xla") is not None:
        return "xla"
    return "cpu"


def describe(env: Environment) -> str:
    """Multi-line summary of the runtime, accelerator and package versions (for the set-up cell)."""
    accel = {"tpu": "TPU", "gpu": "GPU", "cpu": "CPU only"}[env.accelerator]
    lines = [
        f"runtime     : {env.runtime} (python {env.python}, {env.executable})",
        f"accelerator : {accel} ({env.accelerator_detail})",
        f"device auto -> {auto_device(env)} expected (helpers.extract.resolve_device makes the final choice "
        "when the network is built; section 5 prints it)",
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
    note). Empty paths stay empty (the phantom), ``mask="auto"`` / ``"auto:HU"`` (segment the
    bones from the CT) stays as it is; other paths become absolute (see :func:`project_path`).
    """
    from .automask import is_auto  # imports scipy and nibabel: only after the set-up cell installed them

    def resolve(path: str, base: Path | None = None) -> str:
        """Empty and auto specs stay; a relative path is taken from ``base`` (default: the repository root)."""
        if not path or is_auto(path):
            return path
        p = Path(path).expanduser()
        return str(p if p.is_absolute() else base / p if base is not None else project_path(p))

    if upload not in UPLOAD_MODES:
        raise ValueError(f"upload: expected one of {', '.join(UPLOAD_MODES)}, got {upload!r}")
    if upload != "none" and not env.colab:
        print(f"note: upload={upload!r} only applies in Colab; using the given paths")
    elif upload == "upload":
        from google.colab import files  # only exists in Colab

        names = list(files.upload())
        picked = pick_upload(names, Path(volume).name, mask if is_auto(mask) else Path(mask).name)
        volume, mask = (resolve(n, Path.cwd()) for n in picked)
    elif upload == "drive":
        from google.colab import drive  # only exists in Colab

        drive.mount(DRIVE_MOUNT)
        volume, mask = (resolve(p, Path(DRIVE_MOUNT) / "MyDrive") for p in (volume, mask))
    return resolve(volume), resolve(mask)
