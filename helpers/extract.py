"""Hooked feature extraction: every Conv3d output reduced to its global-average-pooled vector.

A forward hook on every ``Conv3d`` (execution order) averages the layer's output over
(d, h, w) the moment it is produced, so the full activations are never kept; the pooled
vectors stay on the device and come back to the host once per region (no per-layer sync).

Devices: ``cpu``, ``cuda``, ``xla`` (torch_xla/PJRT: TPU, or its CPU backend with
``PJRT_DEVICE=CPU``) and ``auto`` (cuda if available, else xla on a TPU host with torch_xla
installed, else cpu). A device named explicitly is never replaced silently by another.

Precision: ``fp32``, ``bf16``, ``fp16`` (through ``torch.autocast``; pooled vectors are
accumulated in float32). ``auto`` is bf16 on GPUs that support it (fp16 on older ones) and
fp32 on CPU and XLA.

Bucketing (``bucket=N``): each crop is padded at its far end with the neutral value 0 up to
a multiple of N voxels per axis, and every layer is pooled over the part of its output that
corresponds to the unpadded crop (``ceil(valid * out / padded)`` voxels per axis). With XLA
this bounds the number of compiled graphs; it works on every device.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import InputError
from .inflate import DenseNet3d, conv_shapes
from .regions import Region

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda", "xla")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Features:
    """Pooled conv activations of each region, one vector per Conv3d layer (execution order)."""

    layer_names: list[str]
    vectors: dict[str, list[np.ndarray]]  #: region -> per-layer float32 vectors (C_layer,)
    device: str
    precision: str
    input_shapes: dict[str, tuple[int, ...]]  #: region -> shape fed to the network (after bucketing)
    timings_s: dict[str, float]  #: region -> forward seconds (device-synchronised)
    gflop: dict[str, float]  #: region -> conv GFLOP of its forward
    device_info: dict[str, Any] = field(default_factory=dict)

    @property
    def regions(self) -> list[str]:
        return list(self.vectors)

    def vector(self, region: str, layer: str) -> np.ndarray:
        return self.vectors[region][self.layer_names.index(layer)]


def is_tpu_host() -> bool:
    """True on a TPU VM (Colab TPU runtimes included): TPU device files or PJRT_DEVICE=TPU."""
    if os.environ.get("PJRT_DEVICE", "").upper() == "TPU":
        return True
    return os.path.exists("/dev/accel0") or (os.path.isdir("/dev/vfio") and len(os.listdir("/dev/vfio")) > 1)


def _xla_device() -> torch.device:
    try:
        import torch_xla
    except ImportError as exc:
        raise InputError(f"--device xla: torch_xla is not installed ({exc}); see README 'TPU / XLA'") from None
    try:
        return torch_xla.device()
    except Exception as exc:
        raise InputError(f"--device xla: no XLA device ({str(exc).splitlines()[0]}); set PJRT_DEVICE=TPU or CPU") from None


def resolve_device(name: str = "auto") -> torch.device:
    """The torch device for ``name`` (see module doc); a named device that is missing is an error."""
    if name not in DEVICES and not name.startswith("cuda:"):
        raise InputError(f"--device: expected one of {', '.join(DEVICES)}, got {name!r}")
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if is_tpu_host():
            try:
                return _xla_device()
            except InputError:
                pass
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InputError(
                f"--device {name}: CUDA is not available (torch {torch.__version__}, "
                f"built for CUDA {torch.version.cuda or 'none'}; no usable GPU found)"
            )
        return torch.device(name)
    if name == "xla":
        return _xla_device()
    return torch.device("cpu")


def resolve_precision(name: str, device: torch.device) -> str:
    """``auto`` -> bf16 on bf16-capable GPUs, fp16 on other GPUs, fp32 elsewhere."""
    if name not in PRECISIONS:
        raise InputError(f"--precision: expected one of {', '.join(PRECISIONS)}, got {name!r}")
    if name != "auto":
        if name == "fp16" and device.type == "cpu":
            raise InputError("--precision fp16 is not supported on the CPU; use bf16 or fp32")
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def device_description(device: torch.device) -> dict[str, Any]:
    """What the run computed on (recorded in the provenance)."""
    info: dict[str, Any] = {"type": device.type, "torch_device": str(device), "threads": torch.get_num_threads()}
    if device.type == "cuda":
        info["name"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
    elif device.type == "xla":
        import torch_xla

        info["pjrt_device"] = os.environ.get("PJRT_DEVICE", "")
        info["torch_xla"] = torch_xla.__version__
        try:
            import torch_xla.runtime as xr

            info["xla_device_type"] = xr.device_type()
        except Exception:  # pragma: no cover - informational only
            pass
    else:
        info["name"] = _cpu_name()
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "xla":
        import torch_xla

        torch_xla.sync(wait=True)


class PooledHooks:
    """Forward hooks on every Conv3d of ``model`` that keep only ``output.mean((d, h, w))``.

    Use as a context manager; ``pooled`` collects (N, C) float32 device tensors in execution
    order. ``valid_fraction`` (per axis) restricts pooling to the unpadded part of a bucketed
    input. ``on_layer(name)`` is called after each layer (progress).
    """

    def __init__(self, model: nn.Module, on_layer: Any = None) -> None:
        self.model = model
        self.on_layer = on_layer
        self.pooled: list[torch.Tensor] = []
        self.names: list[str] = []
        self.valid: tuple[int, int, int] | None = None
        self.padded: tuple[int, int, int] | None = None
        self._handles: list[Any] = []

    def __enter__(self) -> PooledHooks:
        for name, module in self.model.named_modules():
            if isinstance(module, nn.Conv3d):
                self._handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, name: str) -> Any:
        def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
            if self.valid is not None and self.padded is not None:
                keep = [math.ceil(v * o / p) for v, o, p in zip(self.valid, output.shape[2:], self.padded)]
                output = output[:, :, : keep[0], : keep[1], : keep[2]]
            self.pooled.append(torch.mean(output, dim=(2, 3, 4), dtype=torch.float32))
            self.names.append(name)
            if self.on_layer is not None:
                self.on_layer(name)

        return hook

    def reset(self) -> None:
        self.pooled.clear()
        self.names.clear()


@dataclass
class PreparedModel:
    """A network placed on its device with its precision: build once, extract many times."""

    model: DenseNet3d
    device: torch.device
    precision: str
    channels_last: bool
    bucket: int | None

    def autocast(self) -> Any:
        if self.precision == "fp32":
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=_DTYPES[self.precision])


def prepare_model(
    model: DenseNet3d,
    device: str | torch.device = "auto",
    precision: str = "auto",
    bucket: int | None = None,
    channels_last: bool | None = None,
) -> PreparedModel:
    """Move ``model`` to ``device`` and fix precision, memory format and bucketing for extraction.

    ``channels_last`` (default: on for CPU and CUDA, off for XLA) stores activations as
    (N, d, h, w, C), which oneDNN and cuDNN run faster. ``bucket`` defaults to 32 on XLA and
    off elsewhere.
    """
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    prec = resolve_precision(precision, dev)
    if channels_last is None:
        channels_last = dev.type in ("cpu", "cuda")
    if bucket is None and dev.type == "xla":
        bucket = 32
    if bucket is not None and bucket < 1:
        bucket = None
    model = model.to(dev)
    if channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
    if dev.type == "xla":
        _xla_precision()
    return PreparedModel(model.eval(), dev, prec, channels_last, bucket)


def _xla_precision() -> None:
    """Ask XLA for full-precision fp32 matmuls/convolutions (TPUs default to bf16 passes)."""
    try:
        import torch_xla.backends

        torch_xla.backends.set_mat_mul_precision("highest")
    except Exception:  # pragma: no cover - older torch_xla
        pass


def bucket_shape(shape: Sequence[int], bucket: int | None) -> tuple[int, ...]:
    """``shape`` rounded up to a multiple of ``bucket`` per axis (unchanged when bucket is None)."""
    if not bucket:
        return tuple(shape)
    return tuple(-(-n // bucket) * bucket for n in shape)


def _to_input(array: np.ndarray, prepared: PreparedModel, padded: tuple[int, ...]) -> torch.Tensor:
    if tuple(array.shape) != padded:
        array = np.pad(array, [(0, p - n) for n, p in zip(array.shape, padded)], constant_values=0.0)
    x = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None, None]
    x = x.to(prepared.device, non_blocking=True)
    if prepared.channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    return x


def extract_features(prepared: PreparedModel, regions: Sequence[Region], progress: bool = True) -> Features:
    """Run each region through the network under ``torch.inference_mode`` and pool every conv output.

    Shows a progress bar in GFLOP when ``progress`` is true. Returns :class:`Features` with the
    pooled vector of every Conv3d layer for every region.
    """
    from tqdm.auto import tqdm

    model, dev = prepared.model, prepared.device
    shapes = {r.name: bucket_shape(r.array.shape, prepared.bucket) for r in regions}
    per_layer = {n: {c.name: c.flops / 1e9 for c in conv_shapes(model, s)} for n, s in shapes.items()}
    total = sum(sum(v.values()) for v in per_layer.values())
    bar = tqdm(total=round(total, 1), unit="GFLOP", desc="extract", disable=not progress, leave=False)
    current: dict[str, float] = {}

    def on_layer(name: str) -> None:
        bar.update(round(current.get(name, 0.0), 3))

    vectors: dict[str, list[np.ndarray]] = {}
    timings: dict[str, float] = {}
    names: list[str] = []
    compile_before = _xla_compiles() if dev.type == "xla" else None
    try:
        with PooledHooks(model, on_layer) as hooks, torch.inference_mode():
            for region in regions:
                padded = shapes[region.name]
                current = per_layer[region.name]
                bar.set_postfix_str(f"{region.name} {'x'.join(map(str, padded))}")
                hooks.reset()
                hooks.valid = tuple(region.array.shape) if padded != tuple(region.array.shape) else None
                hooks.padded = padded
                x = _to_input(region.array, prepared, padded)
                _synchronize(dev)
                t0 = time.perf_counter()
                with prepared.autocast():
                    model(x)
                pooled = torch.cat(hooks.pooled, dim=1)[0]
                if dev.type == "xla":
                    import torch_xla

                    torch_xla.sync()
                host = pooled.float().cpu().numpy()  # the one device -> host transfer
                timings[region.name] = time.perf_counter() - t0
                del x, pooled
                sizes = [int(p.shape[1]) for p in hooks.pooled]
                vectors[region.name] = [v.copy() for v in np.split(host, np.cumsum(sizes)[:-1])]
                names = list(hooks.names)
    finally:
        bar.close()
    info = device_description(dev)
    if compile_before is not None:
        after = _xla_compiles()
        info["xla_compilations"] = after[0] - compile_before[0]
        info["xla_compile_time_s"] = round(after[1] - compile_before[1], 3)
    info["bucket"] = prepared.bucket
    info["channels_last"] = prepared.channels_last
    return Features(
        layer_names=names,
        vectors=vectors,
        device=str(dev),
        precision=prepared.precision,
        input_shapes={k: tuple(v) for k, v in shapes.items()},
        timings_s=timings,
        gflop={n: sum(v.values()) for n, v in per_layer.items()},
        device_info=info,
    )


def _xla_compiles() -> tuple[int, float]:
    """(number of XLA compilations, total compile seconds) so far in this process."""
    import torch_xla.debug.metrics as met

    data = met.metric_data("CompileTime")
    if not data:
        return 0, 0.0
    return int(data[0]), float(data[1]) / 1e9
