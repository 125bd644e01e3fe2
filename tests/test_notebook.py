"""The primary notebook: committed clean, runs headless through papermill in a fresh kernel, and gives
the CLI's results.csv byte for byte; plus the torch-free runtime detection it starts with."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import nbformat
import numpy as np
import pytest

from helpers import cli, extract, runtime

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "knee_ct_pipeline.ipynb"
SECTIONS = ["Setup", "Parameters", "Load & inspect", "Crop", "Inflate", "Extract", "Compare", "Save", "Explore"]
FIGURES = ["overlays", "crop_boxes", "region_inputs", "similarity_heatmap", "similarity_profile"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: Longest code cell allowed: cells call helpers, they do not hold pipeline code.
MAX_CELL_LINES = 12


@pytest.fixture(scope="module")
def committed() -> nbformat.NotebookNode:
    return nbformat.read(NOTEBOOK, as_version=4)


# ----------------------------------------------------------------------------- the committed file


def test_committed_notebook_is_valid_and_has_no_outputs(committed):
    nbformat.validate(committed)
    code = [c for c in committed.cells if c.cell_type == "code"]
    assert code
    assert all(c.outputs == [] and c.execution_count is None for c in code), "commit the notebook without outputs"
    assert committed.metadata["kernelspec"]["name"] == "python3"
    assert committed.metadata["kernelspec"]["language"] == "python"


def test_sections_are_in_order_and_parameters_cell_is_tagged(committed):
    headings = [c.source.splitlines()[0] for c in committed.cells if c.cell_type == "markdown" and c.source.startswith("## ")]
    assert headings == [f"## {i}. {name}" for i, name in enumerate(SECTIONS, 1)]
    tagged = [i for i, c in enumerate(committed.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1
    heading = max(i for i, c in enumerate(committed.cells[: tagged[0]]) if c.cell_type == "markdown" and c.source.startswith("## "))
    assert committed.cells[heading].source.startswith("## 2. Parameters")


def test_parameters_cover_the_issue_list(committed):
    import papermill

    names = set(papermill.inspect_notebook(NOTEBOOK))
    assert names >= {"volume", "mask", "output_dir", "device", "precision", "weights", "pad", "labels", "crop",
                     "inflation", "normalize", "save_figures", "upload", "spacing", "bucket", "force"}  # fmt: skip
    params = next(c for c in committed.cells if "parameters" in c.metadata.get("tags", []))
    values: dict[str, object] = {}
    exec(compile(params.source, "parameters", "exec"), {}, values)  # plain literals only
    assert values["volume"] == values["mask"] == "" and values["device"] == "auto" and values["upload"] == "none"
    assert values["spacing"] == "" and values["bucket"] is None and values["force"] is False  # the CLI's defaults
    config = next(c.source for c in committed.cells if "Config(" in c.source)
    assert all(f"{name}=" in config for name in ("spacing", "bucket", "force")), "every parameter reaches the Config"


def test_code_cells_are_short_and_hold_no_pipeline_code(committed):
    for cell in committed.cells:
        if cell.cell_type != "code":
            continue
        lines = [line for line in cell.source.splitlines() if line.strip()]
        assert len(lines) <= MAX_CELL_LINES or "parameters" in cell.metadata.get("tags", []), cell.source
        tree = ast.parse(cell.source)
        defs = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.Lambda))]
        assert not defs, f"cell defines code instead of calling helpers:\n{cell.source}"


def test_repository_url_is_set_in_exactly_one_place(committed):
    url_lines = [line for c in committed.cells for line in c.source.splitlines() if "https://github.com/" in line]
    assert len(url_lines) == 1 and url_lines[0].startswith("REPO_URL = ")
    assert "github.com" not in (ROOT / "helpers" / "runtime.py").read_text()


def test_placeholder_repository_url_fails_with_a_clear_message(committed, tmp_path, monkeypatch):
    """Where a clone is needed (Colab) and REPO_URL is still the placeholder: one clear line, no git error."""
    import importlib.util

    setup = next(c.source for c in committed.cells if c.source.startswith("import") and "REPO_URL = " in c.source)
    monkeypatch.chdir(tmp_path)  # no checkout around: the cell would clone
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "helpers" else find_spec(name, *a))
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("git must not run with the placeholder URL"))
    with pytest.raises(RuntimeError, match=r"^set REPO_URL .*fork's address") as info:
        exec(compile(setup, "setup", "exec"), {})
    assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------- executed headless


@pytest.fixture(scope="module")
def executed(phantom_files, tmp_path_factory) -> tuple[nbformat.NotebookNode, Path, Path]:
    """Run the notebook with papermill in a fresh kernel (python3, this interpreter) and the CLI on the same
    inputs and settings; returns (executed notebook, notebook output folder, CLI results.csv)."""
    import papermill

    ct, mask = phantom_files
    work = tmp_path_factory.mktemp("notebook")
    out = work / "out"
    out.mkdir()
    with pytest.MonkeyPatch.context() as env:
        env.setenv("JUPYTER_PREFER_ENV_PATH", "1")  # the python3 kernelspec of this environment first (as the Makefile)
        papermill.execute_notebook(
            str(NOTEBOOK), str(out / "knee_ct_pipeline.ipynb"), kernel_name="python3", progress_bar=False, cwd=str(work),
            parameters={"volume": str(ct), "mask": str(mask), "output_dir": str(out), "device": "cpu", "weights": "random"},
        )  # fmt: skip
    cli_csv = work / "cli" / "results.csv"
    assert cli.main(["--volume", str(ct), "--mask", str(mask), "--output", str(cli_csv), "--device", "cpu",
                     "--weights", "random", "--no-progress"]) == 0  # fmt: skip
    return nbformat.read(out / "knee_ct_pipeline.ipynb", as_version=4), out, cli_csv


def test_notebook_results_csv_is_byte_identical_to_the_cli(executed):
    _, out, cli_csv = executed
    assert (out / "results.csv").read_bytes() == cli_csv.read_bytes()
    assert (out / "results.json").is_file() and (out / "results.npz").is_file()


def test_every_cell_ran_without_error_in_a_fresh_kernel(executed):
    nb, _, _ = executed
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1))
    errors = [o for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors, errors[0].get("evalue") if errors else ""
    text = "".join(o.get("text", "") for c in code for o in c.outputs if o.output_type == "stream")
    assert f", {sys.executable})" in text  # the kernel is this interpreter
    expected = runtime.describe(runtime.detect()).splitlines()
    assert expected[1].startswith("accelerator : ") and expected[1] in text  # what this host has, whatever it is
    assert expected[2].startswith("device auto -> ") and expected[2] in text
    assert "min cosine" in text and "RANDOM" in text


def test_figures_are_written_as_non_empty_png_images(executed):
    _, out, _ = executed
    for name in FIGURES:
        path = out / f"{name}.png"
        assert path.read_bytes().startswith(PNG_SIGNATURE), name
        image = plt.imread(path)
        assert image.shape[0] >= 400 and image.shape[1] >= 800, (name, image.shape)
        assert image[..., :3].std() > 0.05, f"{name} is blank"


def test_headless_slice_browser_leaves_a_static_image(executed):
    nb, _, _ = executed
    explore = nb.cells[-1]
    assert "slice_browser" in explore.source
    assert any("image/png" in o.get("data", {}) for o in explore.outputs)


# ----------------------------------------------------------------------------- runtime detection


def test_runtime_never_imports_torch():
    code = ("import sys; from helpers import runtime; env = runtime.detect(); runtime.describe(env); runtime.is_tpu_host(); "
            "runtime.packages_to_install(env); runtime.torch_warnings(env); assert 'torch' not in sys.modules, 'torch imported'; "
            "print(env.accelerator)")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() in ("cpu", "gpu", "tpu")


def _pci_device(root, slot: str, vendor: str, device: str) -> None:
    (root / slot).mkdir(parents=True)
    (root / slot / "vendor").write_text(vendor + "\n")
    (root / slot / "device").write_text(device + "\n")


def test_tpu_detection_from_device_files_environment_and_pci_ids(tmp_path):
    dev, pci = tmp_path / "dev", tmp_path / "pci"
    (dev / "vfio").mkdir(parents=True)
    (dev / "vfio" / "vfio").touch()  # the vfio control node exists on hosts without a TPU
    (dev / "vfio" / "0").touch()  # so does a VFIO group of any passed-through device
    pci.mkdir()
    _pci_device(pci, "0000:00:04.0", "0x1ae0", "0x0042")  # Google's gVNIC: on every GCE VM, not a TPU
    _pci_device(pci, "0000:00:05.0", "0x10de", "0x0063")  # another vendor
    quiet = {"TPU_ACCELERATOR_TYPE": "v5litepod-1", "COLAB_TPU_ADDR": "10.0.0.2:8470", "PJRT_DEVICE": "CPU"}
    assert runtime.tpu_evidence(quiet, str(dev), str(pci)) == []  # none of these is a local TPU
    _pci_device(pci, "0000:00:06.0", "0x1ae0", "0x0063")  # a TPU v5e chip
    assert runtime.tpu_evidence({}, str(dev), str(pci)) == ["PCI 0000:00:06.0 (TPU 0x0063)"]
    (dev / "accel0").touch()
    found = runtime.tpu_evidence({"PJRT_DEVICE": "tpu"}, str(dev), str(pci))
    assert found == [str(dev / "accel0"), "PJRT_DEVICE=TPU", "PCI 0000:00:06.0 (TPU 0x0063)"]


def test_one_tpu_detector_and_auto_device_agrees_with_resolve_device(monkeypatch):
    """extract.is_tpu_host is runtime's detector (torch_xla, when installed, may only add evidence), and the
    set-up cell's 'device auto -> ...' is what resolve_device('auto') chooses on this host."""
    import importlib.util
    import warnings

    assert extract.is_tpu_host() or not runtime.is_tpu_host()
    if importlib.util.find_spec("torch_xla") is None:
        assert extract.is_tpu_host() is runtime.is_tpu_host()
    monkeypatch.setattr(runtime, "tpu_evidence", lambda *a, **k: ["PJRT_DEVICE=TPU"])
    assert extract.is_tpu_host() is True
    monkeypatch.undo()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a TPU host without a usable torch_xla warns
        chosen = extract.resolve_device("auto").type
    assert runtime.auto_device(runtime.detect()) == chosen


def _versions(monkeypatch, table: dict[str, str | None], default: str | None = "1000") -> None:
    """Pretend these distributions are installed at these versions (None: missing); others at ``default``."""
    monkeypatch.setattr(runtime, "installed_version", lambda name: table.get(runtime.requirement_name(name), default))


def test_colab_installs_what_is_missing_or_out_of_range(monkeypatch):
    cpu = runtime.Environment(colab=True, accelerator="cpu", accelerator_detail="x")
    assert runtime.packages_to_install(cpu) == []  # everything is installed here, in range
    specs = ["nibabel>=5,<6", "numpy>=1.26,<3", "surely-not-installed-pkg>=1", "papermill>=2", "scipy>=1.11"]
    _versions(monkeypatch, {"nibabel": "4.0.2", "numpy": "2.1.0+local", "surely-not-installed-pkg": None, "papermill": None})
    assert runtime.packages_to_install(cpu, specs) == ["nibabel>=5,<6", "surely-not-installed-pkg>=1"]  # too old, missing
    _versions(monkeypatch, {"nibabel": "6.0"})
    assert runtime.packages_to_install(cpu, ["nibabel>=5,<6"]) == ["nibabel>=5,<6"]  # too new
    assert runtime.packages_to_install(cpu, ["torch>=2.9,<2.15"]) == ["torch>=2.9,<2.15"]  # a CPU runtime upgrades torch
    local = runtime.Environment(colab=False, accelerator="tpu", accelerator_detail="x")
    assert runtime.install_requirements(local) == []  # never installs outside Colab


def test_gpu_runtime_keeps_its_cuda_torch_and_warns_when_it_is_too_old(monkeypatch, capsys):
    gpu = runtime.Environment(colab=True, accelerator="gpu", accelerator_detail="Tesla T4")
    specs = ["torch>=2.9,<2.15", "torchvision>=0.24,<0.30", "numpy>=1.26,<3"]
    _versions(monkeypatch, {"torch": "2.8.0+cu126", "torchvision": "0.23.0+cu126", "numpy": "2.0.2"})
    assert runtime.packages_to_install(gpu, specs) == []  # Colab's CUDA torch is not replaced
    warnings_ = runtime.torch_warnings(gpu, specs)
    assert len(warnings_) == 2 and "torch 2.8.0+cu126 is older than 2.9" in warnings_[0] and "Restart" in warnings_[0]
    _versions(monkeypatch, {"torch": "2.9.1+cu126", "torchvision": "0.24.1+cu126"})
    assert runtime.torch_warnings(gpu, specs) == []
    _versions(monkeypatch, {"torch": None, "torchvision": None, "numpy": "2.0.2"})
    assert runtime.packages_to_install(gpu, specs) == specs[:2]  # missing: installed
    cpu = runtime.Environment(colab=True, accelerator="cpu", accelerator_detail="x")
    assert runtime.torch_warnings(cpu, specs) == []


def test_tpu_runtime_installs_the_matched_trio(monkeypatch):
    tpu = runtime.Environment(colab=True, accelerator="tpu", accelerator_detail="/dev/accel0")
    specs = ["torch>=2.9,<2.15", "torchvision>=0.24,<0.30", "numpy>=1.26,<3"]
    _versions(monkeypatch, {"torch": "2.8.0", "torchvision": "0.23.0", "torch-xla": None, "numpy": "2.0.2"})
    assert runtime.packages_to_install(tpu, specs) == list(runtime.TPU_PACKAGES)  # torch/torchvision once, as the trio
    assert runtime.auto_device(tpu) == "cpu"  # no torch_xla -> the CPU
    _versions(monkeypatch, {"torch": "2.8.0", "torchvision": "0.23.0", "torch-xla": "2.8.0", "numpy": "2.0.2"})
    assert runtime.packages_to_install(tpu, specs) == list(runtime.TPU_PACKAGES)  # torch too old: the trio again
    _versions(monkeypatch, {"torch": "2.9.0", "torchvision": "0.99", "torch-xla": "2.9.0", "numpy": "2.0.2"})
    assert runtime.packages_to_install(tpu, specs) == []  # torchvision stays matched to torch_xla's torch
    assert runtime.auto_device(tpu) == "xla"


def test_installing_torch_after_it_was_imported_asks_for_a_restart(monkeypatch):
    import torch  # noqa: F401  (the situation being tested)

    tpu = runtime.Environment(colab=True, accelerator="tpu", accelerator_detail="x")
    _versions(monkeypatch, {"torch-xla": None})
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("pip must not run"))
    with pytest.raises(RuntimeError, match="Restart"):
        runtime.install_requirements(tpu)


def test_uploaded_files_are_told_apart():
    assert runtime.pick_upload(["3702_left_knee.nii.gz", "left_knee_mask.nii.gz"]) == (
        "3702_left_knee.nii.gz", "left_knee_mask.nii.gz")  # fmt: skip
    assert runtime.pick_upload(["seg.nii", "ct.nii"]) == ("ct.nii", "seg.nii")
    assert runtime.pick_upload(["a.nii.gz", "b.nii.gz"], volume="b.nii.gz", mask="a.nii.gz") == ("b.nii.gz", "a.nii.gz")
    with pytest.raises(ValueError, match="cannot tell"):
        runtime.pick_upload(["a.nii.gz", "b.nii.gz"])


def test_inputs_outside_colab_are_the_given_paths_made_absolute(capsys):
    local = runtime.Environment(colab=False, accelerator="cpu", accelerator_detail="x")
    assert runtime.get_inputs("", "", "none", local) == ("", "")
    volume, mask = runtime.get_inputs("data/ct.nii.gz", "/abs/mask.nii.gz", "upload", local)
    assert volume == str(runtime.repo_root() / "data" / "ct.nii.gz") and mask == "/abs/mask.nii.gz"
    assert "only applies in Colab" in capsys.readouterr().out
    assert runtime.get_inputs("data/ct.nii.gz", "auto", "none", local)[1] == "auto"  # --mask auto is no path
    assert runtime.get_inputs("/abs/ct.nii.gz", "auto:150", "none", local) == ("/abs/ct.nii.gz", "auto:150")
    with pytest.raises(ValueError):
        runtime.get_inputs("", "", "ftp", local)
    assert runtime.enable_widgets(local) is False


# ----------------------------------------------------------------------------- the Inflate section's 2D check


def test_inflation_check_center_reproduces_2d_and_mean_only_off_the_depth_borders(random_checkpoint, random_net):
    """On weights with non-trivial BatchNorm statistics (torchvision's random init leaves BN an identity)."""
    from helpers import inflate

    rng = np.random.default_rng(5)
    image = rng.standard_normal((60, 50)).astype(np.float32)  # cropped/padded to its central 48 x 48 patch
    center = inflate.check_against_2d(inflate.inflate_densenet121(str(random_checkpoint), "center"), image, 32, 48)
    assert len(center.layer_names) == 120 and center.volume_shape == (32, 48, 48) and center.weights == "file"
    assert center.min_cosine > 0.99999 and center.max_rel_error < 1e-4, center.summary()
    assert random_net.inflation == "mean"
    mean = inflate.check_against_2d(random_net, image, 32, 48)
    assert mean.conv0_interior_rel_error < 1e-5, mean.summary()
    assert mean.max_rel_error > 1e-3, "zero padding at the depth borders must show in the pooled features"
    assert "min cosine" in mean.summary() and "conv0" in mean.summary()
