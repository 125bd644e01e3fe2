"""Devices and precision (CPU-testable parts), and exact bucketing.

The CUDA paths cannot run without a GPU: their decisions (device validation, precision
resolution, the TF32 switch) are tested here with torch.cuda's queries replaced; the XLA
path is tested for real in tests/test_xla.py (``make test-xla``).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from helpers import cli, extract, io, regions, runtime
from helpers.errors import InputError, PipelineWarning

HAS_CUDA = torch.cuda.is_available()
HAS_TORCH_XLA = importlib.util.find_spec("torch_xla") is not None
CUDA0 = torch.device("cuda", 0)


@pytest.fixture(scope="module")
def phantom_crops(phantom_files):
    return regions.crop_regions(io.load_scan(*phantom_files), min_size=29)


def _fake_gpu(monkeypatch: pytest.MonkeyPatch, capability: tuple[int, int], count: int = 1) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    monkeypatch.setattr(torch.version, "hip", None)


# ----------------------------------------------------------------------------- devices


@pytest.mark.skipif(HAS_CUDA, reason="a GPU is present")
@pytest.mark.parametrize("name", ["cuda", "cuda:0", "cuda:1"])
def test_cuda_named_but_missing_is_an_error_never_a_fallback(name):
    with pytest.raises(InputError, match=rf"^--device {name}: CUDA is not available \(torch .*, built for CUDA"):
        extract.resolve_device(name)


@pytest.mark.skipif(HAS_CUDA, reason="a GPU is present")
def test_cli_device_cuda_without_gpu_exits_2_with_one_line(phantom_files, tmp_path, capsys):
    ct, mask = phantom_files
    code = cli.main(["--volume", str(ct), "--mask", str(mask), "--output", str(tmp_path / "r.csv"),
                     "--device", "cuda", "--weights", "random", "--no-progress"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1, err  # no random-weights banner, no traceback: the error alone
    assert err[0].startswith("error: --device cuda: CUDA is not available")
    assert not (tmp_path / "r.csv").exists()


def test_cuda_index_is_checked_against_the_visible_gpus(monkeypatch):
    _fake_gpu(monkeypatch, (8, 0), count=2)
    assert extract.resolve_device("cuda") == CUDA0
    assert extract.resolve_device("cuda:1") == torch.device("cuda", 1)
    assert extract.resolve_device("auto") == CUDA0
    with pytest.raises(InputError, match=r"--device cuda:2: no such GPU \(2 visible: cuda:0..cuda:1\)"):
        extract.resolve_device("cuda:2")
    with pytest.raises(InputError, match="expected cuda or cuda:N"):
        extract.resolve_device("cuda:x")
    with pytest.raises(InputError, match="expected one of auto, cpu, cuda, xla or cuda:N, got 'gpu'"):
        extract.resolve_device("gpu")


@pytest.mark.skipif(HAS_TORCH_XLA, reason="torch_xla is installed")
def test_xla_named_without_torch_xla_says_how_to_install():
    with pytest.raises(InputError, match=r"--device xla: torch_xla is not installed .*torch_xla\[tpu\]==2\.9\.0"):
        extract.resolve_device("xla")


@pytest.mark.skipif(HAS_TORCH_XLA or HAS_CUDA, reason="needs a machine without torch_xla and GPU")
def test_auto_on_a_tpu_host_without_torch_xla_warns_and_uses_the_cpu(monkeypatch):
    monkeypatch.setattr(extract, "is_tpu_host", lambda: True)
    with pytest.warns(PipelineWarning, match="a TPU was found but cannot be used"):
        assert extract.resolve_device("auto") == torch.device("cpu")


def _fake_pci(root: Path, vendor: str, device: str) -> str:
    slot = root / "0000:00:05.0"
    slot.mkdir(parents=True)
    (slot / "vendor").write_text(vendor + "\n")
    (slot / "device").write_text(device + "\n")
    return str(slot / "vendor")


@pytest.mark.parametrize(
    ("vendor", "device", "expected"),
    [("0x1ae0", "0x0063", True), ("0x1ae0", "0x006f", True), ("0x1ae0", "0x0042", False), ("0x10de", "0x0063", False)],
    ids=["tpu-v5e", "tpu-v6e", "google-gvnic", "nvidia"],
)
def test_tpu_host_detection_by_pci_id(monkeypatch, tmp_path, vendor, device, expected):
    """Google's PCI vendor id alone is not a TPU (every GCE VM has a Google gVNIC)."""
    vendor_file = _fake_pci(tmp_path, vendor, device)
    monkeypatch.delenv("PJRT_DEVICE", raising=False)
    monkeypatch.setattr(runtime.glob, "glob", lambda pattern: [vendor_file] if pattern.endswith("vendor") else [])
    assert extract.is_tpu_host() is expected
    monkeypatch.setenv("PJRT_DEVICE", "TPU")
    assert extract.is_tpu_host() is True


# ----------------------------------------------------------------------------- precision


@pytest.mark.parametrize(
    ("device", "asked", "expected"),
    [("cpu", "auto", "fp32"), ("cpu", "bf16", "bf16"), ("cpu", "fp32", "fp32"),
     ("xla", "auto", "fp32"), ("xla", "bf16", "bf16")],  # fmt: skip
)
def test_precision_resolution_off_gpu(device, asked, expected):
    assert extract.resolve_precision(asked, torch.device(device)) == expected


@pytest.mark.parametrize("device", ["cpu", "xla"])
def test_fp16_is_refused_off_gpu(device):
    with pytest.raises(InputError, match=r"--precision fp16 is for CUDA GPUs only"):
        extract.resolve_precision("fp16", torch.device(device))
    with pytest.raises(InputError, match="expected one of auto, fp32, bf16, fp16, got 'half'"):
        extract.resolve_precision("half", torch.device(device))


@pytest.mark.parametrize(
    ("capability", "auto", "bf16_ok"), [((9, 0), "bf16", True), ((8, 0), "bf16", True), ((7, 5), "fp16", False)]
)
def test_precision_resolution_on_gpus(monkeypatch, capability, auto, bf16_ok):
    """auto = bf16 only with native bf16 (Ampere+); torch's is_bf16_supported() also says yes
    to emulated bf16 on older GPUs, which is why it is not used."""
    _fake_gpu(monkeypatch, capability)
    assert extract.resolve_precision("auto", CUDA0) == auto
    assert extract.resolve_precision("fp16", CUDA0) == "fp16"
    assert extract.resolve_precision("fp32", CUDA0) == "fp32"
    if bf16_ok:
        assert extract.resolve_precision("bf16", CUDA0) == "bf16"
    else:
        with pytest.raises(InputError, match=r"Fake GPU has no native bfloat16 \(compute capability 7\.5\)"):
            extract.resolve_precision("bf16", CUDA0)


def test_cuda_fp32_turns_tf32_convolutions_off_only_inside_the_forward():
    """PyTorch lets cuDNN run fp32 convolutions in TF32 by default; fp32 here means IEEE fp32."""
    conv = torch.backends.cudnn.conv
    before = conv.fp32_precision
    prepared = extract.PreparedModel(nn.Sequential(), CUDA0, "fp32", True, None)  # type: ignore[arg-type]
    with prepared.autocast():
        assert conv.fp32_precision == "ieee"
    assert conv.fp32_precision == before
    assert "no TF32" in prepared.compute


def test_cpu_bf16_runs_convolutions_in_bf16_and_agrees_with_fp32(cpu_model, phantom_crops):
    """Autocast is really on (conv outputs are bf16), pooled vectors stay fp32, and the features agree."""
    bf16 = extract.PreparedModel(cpu_model.model, cpu_model.device, "bf16", cpu_model.channels_last, None)
    seen: list[torch.dtype] = []
    handle = cpu_model.model.conv0.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    try:
        tibia = phantom_crops[:1]
        low = extract.extract_features(bf16, tibia, progress=False)
        ref = extract.extract_features(cpu_model, tibia, progress=False)
    finally:
        handle.remove()
    assert seen == [torch.bfloat16, torch.float32]
    assert low.precision == "bf16" and low.device_info["compute"] == "autocast bf16 (pooled in fp32)"
    assert all(v.dtype == np.float32 for v in low.vectors["tibia"])
    cos = [float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))) for a, b in zip(low.vectors["tibia"], ref.vectors["tibia"])]
    assert min(cos) > 0.99, f"worst layer {low.layer_names[int(np.argmin(cos))]}: cosine {min(cos):.5f}"
    assert not np.array_equal(low.vectors["tibia"][-1], ref.vectors["tibia"][-1])  # not silently fp32


# ----------------------------------------------------------------------------- bucketing


def test_valid_extents_follow_the_unpadded_network(random_net):
    ext = extract.valid_extents(random_net, (36, 38, 48), (64, 64, 64))
    assert ext[(64, 64, 64)] == (36, 38, 48)
    assert ext[(32, 32, 32)] == (18, 19, 24)  # conv0, stride 2
    assert ext[(2, 2, 2)] == (1, 1, 1)  # denseblock4: proportional rounding would say 2
    from helpers.inflate import conv_shapes

    assert {c.out_size for c in conv_shapes(random_net, (36, 38, 48))} <= set(ext.values())


@pytest.fixture(scope="module")
def bone_features(cpu_model, phantom_crops):
    """Unbucketed fp32 features of the tibia and femur crops."""
    return extract.extract_features(cpu_model, phantom_crops[:2], progress=False)


@pytest.mark.parametrize(("bucket", "n_regions"), [(32, 2), (16, 1)])
def test_bucketing_gives_the_unbucketed_features(cpu_model, phantom_crops, bone_features, bucket, n_regions):
    """Padding the crops and masking the padded part is exact: every layer matches the
    unbucketed run (random weights with non-trivial BatchNorm, whose shift makes the padded
    part non-zero after the first layer)."""
    bucketed = extract.PreparedModel(cpu_model.model, cpu_model.device, "fp32", cpu_model.channels_last, bucket)
    crops = phantom_crops[:n_regions]
    feats = extract.extract_features(bucketed, crops, progress=False)
    for crop in crops:
        assert feats.input_shapes[crop.name] == extract.bucket_shape(crop.array.shape, bucket) != crop.array.shape
        for name, a, b in zip(bone_features.layer_names, bone_features.vectors[crop.name], feats.vectors[crop.name]):
            err = float(np.abs(a - b).max() / np.abs(a).max())
            assert err < 1e-4, f"{crop.name} {name}: relative error {err:.2e}"


def test_masked_mean_equals_the_mean_of_the_valid_part():
    """The XLA pooling (a weighted sum, so that the graph does not depend on the extent)."""
    out = torch.randn(2, 5, 6, 7, 8, generator=torch.Generator().manual_seed(0))
    got = extract._xla_pooled_mean(out, (3, 7, 2))
    torch.testing.assert_close(got, out[:, :, :3, :7, :2].mean(dim=(2, 3, 4)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(extract._xla_pooled_mean(out, None), out.mean(dim=(2, 3, 4)), rtol=1e-5, atol=1e-6)


def test_device_description_of_the_cpu(cpu_model):
    info = extract.device_description(cpu_model.device)
    assert info["type"] == "cpu" and info["name"] and info["threads"] >= 1
    assert cpu_model.compute == "fp32"
