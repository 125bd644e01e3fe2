"""Hooked feature extraction: every Conv3d output reduced to its global-average-pooled vector.

A forward hook on every ``Conv3d`` (execution order) averages the layer's output over
(d, h, w) the moment it is produced, so the full activations are never kept; the pooled
vectors stay on the device and come back to the host once per region (no per-layer sync).

Devices: ``cpu``, ``cuda``, ``xla`` (torch_xla/PJRT: TPU, or its CPU backend with
``PJRT_DEVICE=CPU``) and ``auto`` (cuda if available, else xla on a TPU host with torch_xla
installed, else cpu). A device named explicitly is never replaced silently by another.

Precision: ``fp32``, ``bf16``, ``fp16`` (through ``torch.autocast``; pooled vectors are
accumulated in float32; fp16 on CUDA only). ``auto`` is bf16 on GPUs with native bf16
(compute capability >= 8.0), fp16 on older ones, and fp32 on CPU and XLA. fp32 is IEEE fp32
everywhere: no TF32 in cuDNN convolutions, ``highest`` matmul precision on XLA.

Bucketing (``bucket=N``): each crop is padded at its far end with zeros up to a multiple of
N voxels per axis, and the padded forward is made to compute exactly what the unpadded one
computes on the crop: before every conv/pool that pads (``padding > 0``), the part of its
input outside the crop's extent is zeroed (so the layer sees the zeros its own padding would
give; after BatchNorm + ReLU the padded part is no longer zero), and every conv output is
pooled over exactly the voxels the unpadded forward produces (:func:`valid_extents`). The
pooled vectors equal the unbucketed ones up to float rounding (measured: README 'GPU and
TPU'). On XLA, where every input shape is one graph compilation, crops of one bucket share a
graph; it works on every device.
"""

from __future__ import annotations

import functools
import logging
import os
import time
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import InputError, first_line, warn
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
    """True on a TPU VM (Colab TPU runtimes included), by :func:`helpers.runtime.tpu_evidence`, the project's
    one TPU detector: ``PJRT_DEVICE=TPU``, ``/dev/accel<N>``, or a TPU chip on the PCI bus.

    When torch_xla is installed, its own PCI check (``torch_xla._internal.tpu``, which may know
    chips newer than ours) is asked as well; it can only add evidence.
    """
    from . import runtime

    if runtime.is_tpu_host():
        return True
    try:
        from torch_xla._internal import tpu

        return tpu.num_available_chips() > 0
    except Exception:  # torch_xla not installed, or unusable here
        return False


def _xla_device() -> torch.device:
    try:
        import torch_xla
    except ImportError as exc:
        raise InputError(
            f"--device xla: torch_xla is not installed ({exc}); install torch==2.9.0 torchvision==0.24.0 "
            "'torch_xla[tpu]==2.9.0' (README 'GPU and TPU')"
        ) from None
    try:
        return torch_xla.device()
    except Exception as exc:
        raise InputError(f"--device xla: no XLA device ({first_line(exc)}); set PJRT_DEVICE=TPU or CPU") from None


def _cuda_device(name: str) -> torch.device:
    """``cuda`` / ``cuda:N``, checked against the GPUs torch can see."""
    if not torch.cuda.is_available():
        raise InputError(
            f"--device {name}: CUDA is not available (torch {torch.__version__}, "
            f"built for CUDA {torch.version.cuda or 'none'}; no usable GPU found)"
        )
    index = name.partition(":")[2]
    if index and not index.isdigit():
        raise InputError(f"--device {name}: expected cuda or cuda:N with N a GPU index")
    count = torch.cuda.device_count()
    if index and int(index) >= count:
        raise InputError(f"--device {name}: no such GPU ({count} visible: cuda:0..cuda:{count - 1})")
    return torch.device("cuda", int(index) if index else torch.cuda.current_device())


def check_device_name(name: str) -> None:
    """Raise :class:`InputError` unless ``name`` is ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``xla``."""
    if name.startswith("cuda:") and not name[5:].isdigit():
        raise InputError(f"--device {name}: expected cuda or cuda:N with N a GPU index")
    if name not in DEVICES and not name.startswith("cuda:"):
        raise InputError(f"--device: expected one of {', '.join(DEVICES)} or cuda:N, got {name!r}")


def resolve_device(name: str = "auto") -> torch.device:
    """The torch device for ``name`` (see module doc); a named device that is missing is an error."""
    check_device_name(name)
    if name == "auto":
        if torch.cuda.is_available():
            return _cuda_device("cuda")
        if is_tpu_host():
            try:
                return _xla_device()
            except InputError as exc:
                warn(f"a TPU was found but cannot be used, running on the CPU: {exc}")
        return torch.device("cpu")
    if name.startswith("cuda"):
        return _cuda_device(name)
    if name == "xla":
        return _xla_device()
    return torch.device("cpu")


def cuda_native_bf16(device: torch.device) -> bool:
    """True when the GPU computes bfloat16 natively (compute capability >= 8.0, or ROCm).

    ``torch.cuda.is_bf16_supported()`` defaults to ``including_emulation=True`` (true on
    pre-Ampere GPUs where bf16 is emulated, slowly) and asks the *current* device only.
    """
    return bool(torch.version.hip) or torch.cuda.get_device_capability(device)[0] >= 8


def resolve_precision(name: str, device: torch.device) -> str:
    """``auto`` -> bf16 on GPUs with native bf16, fp16 on older GPUs, fp32 on CPU and XLA.

    ``fp16`` is for CUDA only (CPU and TPU have no fast fp16); ``bf16`` on a GPU without
    native bf16 is refused rather than emulated.
    """
    if name not in PRECISIONS:
        raise InputError(f"--precision: expected one of {', '.join(PRECISIONS)}, got {name!r}")
    if name == "fp16" and device.type != "cuda":
        raise InputError(f"--precision fp16 is for CUDA GPUs only (device {device}); use bf16 or fp32")
    if name == "bf16" and device.type == "cuda" and not cuda_native_bf16(device):
        raise InputError(
            f"--precision bf16: {torch.cuda.get_device_name(device)} has no native bfloat16 "
            f"(compute capability {'.'.join(map(str, torch.cuda.get_device_capability(device)))}); use fp16 or fp32"
        )
    if name != "auto":
        return name
    if device.type == "cuda":
        return "bf16" if cuda_native_bf16(device) else "fp16"
    return "fp32"


def device_description(device: torch.device) -> dict[str, Any]:
    """What the run computed on (recorded in the provenance)."""
    info: dict[str, Any] = {"type": device.type, "torch_device": str(device), "threads": torch.get_num_threads()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["name"] = props.name
        info["compute_capability"] = f"{props.major}.{props.minor}"
        info["memory_gib"] = round(props.total_memory / 2**30, 1)
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
        info["cudnn_benchmark"] = bool(torch.backends.cudnn.benchmark)
    elif device.type == "xla":
        import torch_xla

        info["pjrt_device"] = os.environ.get("PJRT_DEVICE", "")
        info["torch_xla"] = torch_xla.__version__
        try:
            import torch_xla.backends
            import torch_xla.runtime as xr

            info["xla_device_type"] = xr.device_type()
            info["mat_mul_precision"] = torch_xla.backends.get_mat_mul_precision()
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
    """Wait until ``device`` has finished all queued work (XLA: run the pending graph and wait)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "xla":
        import torch_xla

        torch_xla.sync(wait=True)


class PooledHooks:
    """Forward hooks on every Conv3d of ``model`` that keep only ``output.mean((d, h, w))``.

    Use as a context manager; ``pooled`` collects (N, C) float32 device tensors in execution
    order. For a bucketed input set ``valid`` (the crop's shape) and ``padded`` (the input's):
    forward pre-hooks then zero the padded part of every padding conv/pool input and pooling
    covers only the valid part (see the module doc). A layer computed in depth tiles
    (``DenseNet3d.tile_voxels``; the module's ``partial_rows`` says which rows of each call are
    its own) is summed tile by tile and pooled once, in its place in the execution order.
    ``on_layer(name, fraction)`` is called after each layer or tile (progress).
    """

    def __init__(self, model: nn.Module, on_layer: Any = None) -> None:
        self.model = model
        self.on_layer = on_layer
        self._pooled: list[torch.Tensor] = []
        self._names: list[str] = []
        self._pending: dict[str, tuple[torch.Tensor, int]] = {}
        self.valid: tuple[int, int, int] | None = None
        self.padded: tuple[int, int, int] | None = None
        self._handles: list[Any] = []

    def __enter__(self) -> PooledHooks:
        for name, module in self.model.named_modules():
            if isinstance(module, nn.Conv3d):
                self._handles.append(module.register_forward_hook(self._hook(name)))
            if _pads(module):
                self._handles.append(module.register_forward_pre_hook(self._zero_padding))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @property
    def pooled(self) -> list[torch.Tensor]:
        """(N, C) float32 pooled vectors, one per Conv3d call (or tiled layer), execution order."""
        self._flush()
        return self._pooled

    @property
    def names(self) -> list[str]:
        """The layer name of each entry of :attr:`pooled`."""
        self._flush()
        return self._names

    def _flush(self) -> None:
        for name, (total, count) in self._pending.items():
            self._pooled.append(total / count)
            self._names.append(name)
        self._pending.clear()

    def _accumulate(self, name: str, output: torch.Tensor, rows: tuple[int, int, int]) -> None:
        lo, hi, total_rows = rows
        part = output[:, :, lo:hi]
        total = spatial_sum(part)
        count = part.shape[2] * part.shape[3] * part.shape[4]
        if name in self._pending:
            prev, n = self._pending[name]
            total, count = prev + total, n + count
        self._pending[name] = (total, count)
        if self.on_layer is not None:
            self.on_layer(name, (hi - lo) / total_rows if total_rows > 0 else 0.0)

    def _hook(self, name: str) -> Any:
        def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
            rows = getattr(module, "partial_rows", None)
            if rows is not None:
                self._accumulate(name, output, rows)
                return
            self._flush()
            keep = self._extent(tuple(output.shape[2:]), output.device.type)
            if output.device.type == "xla":  # one graph per padded shape, whatever the valid part
                self._pooled.append(_xla_pooled_mean(output, keep))
            else:
                if keep is not None:
                    output = output[:, :, : keep[0], : keep[1], : keep[2]]
                self._pooled.append(spatial_sum(output) / (output.shape[2] * output.shape[3] * output.shape[4]))
            self._names.append(name)
            if self.on_layer is not None:
                self.on_layer(name, 1.0)

        return hook

    def reset(self) -> None:
        self._pooled.clear()
        self._names.clear()
        self._pending.clear()

    def _extent(self, size: tuple[int, ...], device_type: str) -> tuple[int, ...] | None:
        """The valid part of an activation of spatial ``size``; None when not bucketed.

        On XLA an input with ``padded`` set always gets an extent (the whole activation for a
        crop that fits its bucket exactly), so that the graph does not depend on the crop's size.
        """
        if self.padded is None or (self.valid is None and device_type != "xla"):
            return None
        extents = valid_extents(self.model, self.valid or self.padded, self.padded)
        if size not in extents:  # e.g. a depth tile (DenseNet3d.tile_voxels): its offset is unknown here
            raise RuntimeError(f"bucketing: activation of unexpected size {size} (depth tiling cannot be bucketed)")
        return extents[size]

    def _zero_padding(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        """Forward pre-hook: zero the input outside its valid part (bucketed inputs only)."""
        x = args[0]
        size = tuple(x.shape[2:])
        keep = self._extent(size, x.device.type)
        if keep is None or (keep == size and x.device.type != "xla"):
            return None
        md, mh, mw = _axis_weights(str(x.device), size, keep, False)
        mask = (md[:, None, None] * mh[None, :, None] * mw[None, None, :]).to(x.dtype)
        return (x * mask, *args[1:])


def spatial_sum(x: torch.Tensor) -> torch.Tensor:
    """(N, C) float32 sum of ``x`` over (d, h, w).

    bf16/fp16 CPU activations are converted to float32 a few depth slices at a time (a cache-sized
    temporary) rather than as a whole, which is what ``sum(dtype=float32)`` does.
    """
    if x.device.type != "cpu" or x.dtype == torch.float32 or x.shape[2] < 2:
        return torch.sum(x, dim=(2, 3, 4), dtype=torch.float32)
    step = max(1, (1 << 20) // max(1, x.shape[1] * x.shape[3] * x.shape[4]))
    total = torch.sum(x[:, :, :step], dim=(2, 3, 4), dtype=torch.float32)
    for d in range(step, x.shape[2], step):
        total += torch.sum(x[:, :, d : d + step], dim=(2, 3, 4), dtype=torch.float32)
    return total


def _pads(module: nn.Module) -> bool:
    """True for a Conv3d/MaxPool3d/AvgPool3d that pads its input (``padding > 0``)."""
    if not isinstance(module, (nn.Conv3d, nn.MaxPool3d, nn.AvgPool3d)):
        return False
    padding = module.padding
    return any(p > 0 for p in (padding if isinstance(padding, tuple) else (padding,)))  # type: ignore[operator]


def valid_extents(model: nn.Module, valid: tuple[int, ...], padded: tuple[int, ...]) -> dict[tuple[int, ...], tuple[int, ...]]:
    """For a crop of shape ``valid`` zero-padded at its far end to ``padded``: each spatial size an
    activation has in the padded forward -> the size of the same activation in the unpadded
    forward, i.e. the leading part of it that the crop alone determines.

    A conv/pool output voxel ``i < out(valid)`` reads input voxels up to ``valid + padding - 1``:
    the valid part plus what the layer's own zero padding supplies in the unpadded forward
    (for max pooling after ReLU, zeros give the same maximum as its implicit -inf). So with
    the padded part of every padding layer's input zeroed, the valid part is exact.
    """
    cache = _EXTENTS.setdefault(model, {})
    key = (tuple(valid), tuple(padded))
    if key not in cache:
        extents = {tuple(padded): tuple(valid)}
        for p, v in zip(conv_shapes(model, tuple(padded)), conv_shapes(model, tuple(valid))):
            if extents.setdefault(p.out_size, v.out_size) != v.out_size:
                raise ValueError(f"bucketing: two activations of size {p.out_size} with different valid parts")
        cache[key] = extents
    return cache[key]


#: valid_extents' results per network, dropped with the network (no strong reference to it).
_EXTENTS: weakref.WeakKeyDictionary[nn.Module, dict[Any, dict[tuple[int, ...], tuple[int, ...]]]] = weakref.WeakKeyDictionary()


@dataclass
class PreparedModel:
    """A network placed on its device with its precision: build once, extract many times."""

    model: DenseNet3d
    device: torch.device
    precision: str
    channels_last: bool
    bucket: int | None
    #: depth-tile size of this placement's forwards (``DenseNet3d.tile_voxels``; set per forward)
    tile_voxels: int | None = None

    def autocast(self) -> Any:
        """The context the forward runs in: ``torch.autocast`` at bf16/fp16; at fp32 on CUDA,
        cuDNN convolutions in IEEE fp32 (PyTorch's default lets them use TF32, 10-bit mantissa)."""
        if self.precision != "fp32":
            return torch.autocast(device_type=self.device.type, dtype=_DTYPES[self.precision])
        if self.device.type == "cuda":
            return _cudnn_conv_precision("ieee")
        return nullcontext()

    @property
    def compute(self) -> str:
        """What the convolutions really compute in, for the provenance."""
        if self.precision != "fp32":
            return f"autocast {self.precision} (pooled in fp32)"
        if self.device.type == "cuda":
            return "fp32 (cuDNN conv fp32_precision=ieee: no TF32)"
        if self.device.type == "xla":
            return "fp32 (XLA mat_mul_precision=highest)"
        return "fp32"


@contextmanager
def _cudnn_conv_precision(value: str) -> Iterator[None]:
    """Set ``torch.backends.cudnn.conv.fp32_precision`` (torch >= 2.9's TF32 switch) and restore it.

    Only the new API is used: mixing it with the legacy ``cudnn.allow_tf32`` is an error in torch.
    """
    conv = torch.backends.cudnn.conv
    old = conv.fp32_precision
    conv.fp32_precision = value
    try:
        yield
    finally:
        conv.fp32_precision = old


def prepare_model(
    model: DenseNet3d,
    device: str | torch.device = "auto",
    precision: str = "auto",
    bucket: int | None = None,
    channels_last: bool | None = None,
) -> PreparedModel:
    """Move ``model`` (in place) to ``device`` and fix precision, memory format and bucketing.

    ``channels_last`` (default: on for CPU and CUDA, off for XLA, whose compiler picks layouts)
    stores activations as (N, d, h, w, C), which oneDNN and cuDNN run faster. ``bucket``
    defaults to 32 on XLA and off elsewhere: on XLA every distinct input shape is one graph
    compilation (seconds to minutes), and bucketing lets crops of different sizes share graphs
    (README 'GPU and TPU' has the measurements). On XLA the fp32 precision is set to
    ``highest`` (TPUs otherwise run fp32 convolutions in bf16 passes) and the moved weights are
    materialised once here, so that extraction compiles only forward graphs.
    """
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    prec = resolve_precision(precision, dev)
    if channels_last is None:
        channels_last = dev.type in ("cpu", "cuda")
    if bucket is None and dev.type == "xla":
        bucket = 32
    if bucket is not None and bucket < 1:
        bucket = None
    if dev.type == "cpu":
        keep_freed_memory()
    # Depth tiles bound the CPU's peak memory for big scans; a bucketed run pools by
    # activation size, which tiles would not match, so it does not tile.
    tile_voxels = TILE_VOXELS if dev.type == "cpu" and bucket is None else None
    model = model.to(dev)
    if channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
    if dev.type == "xla":
        _xla_precision()
        _synchronize(dev)  # materialise the weights now: one small graph, not counted per scan
    return PreparedModel(model.eval(), dev, prec, channels_last, bucket, tile_voxels)


_MALLOC_TUNED = False
#: Voxels per depth tile of the large activations on the CPU (see ``DenseNet3d.tile_voxels``);
#: 2^17 keeps a 512 x 512 x 216 scan's run at ~3.0 GB peak RSS for ~2 % more conv FLOPs in the
#: tiles' halos (2^18: 3.3-3.8 GB). ``KNEE_TILE_VOXELS`` overrides it (experiments).
TILE_VOXELS = int(os.environ.get("KNEE_TILE_VOXELS", 1 << 17))


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse instead of returning it to the OS (CPU runs).

    Every large activation freshly allocated by glibc is mmap'ed and, at first touch, costs a
    page fault per 4 KiB page; on the CPU that made eval BatchNorm and copies 2-3x slower than
    in-place ops on the same data. With ``M_MMAP_MAX = 0`` and a huge ``M_TRIM_THRESHOLD`` the
    memory of one layer's activations is reused by the next without faults. The process keeps
    its peak heap after a run (it is reused by the next run). Disable with
    ``KNEE_KEEP_FREED_MEMORY=0``. Returns whether the setting was applied (glibc Linux only).
    """
    global _MALLOC_TUNED
    if _MALLOC_TUNED or os.environ.get("KNEE_KEEP_FREED_MEMORY", "1") == "0":
        return _MALLOC_TUNED
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4
        _MALLOC_TUNED = bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))
    except (OSError, AttributeError):
        _MALLOC_TUNED = False
    return _MALLOC_TUNED


def release_freed_memory() -> None:
    """Return the heap's free memory to the OS (glibc ``malloc_trim``) after each region's forward.

    :func:`keep_freed_memory` makes the heap keep what a forward frees so the next layer reuses it
    without page faults; trimming between forwards stops that kept memory, fragmented by the
    allocations of crops and earlier runs, from adding to the next forward's peak."""
    if _MALLOC_TUNED:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _xla_precision() -> None:
    """Ask XLA for full-precision fp32 matmuls/convolutions (TPUs default to bf16 passes).

    torch_xla logs a warning ("setting mat mul precision multiple times") on every call of the
    setter: it is called only when needed, with that logger quietened.
    """
    try:
        import torch_xla.backends

        if torch_xla.backends.get_mat_mul_precision() != "highest":
            log = logging.getLogger("torch_xla.backends")
            level = log.level
            log.setLevel(logging.ERROR)
            try:
                torch_xla.backends.set_mat_mul_precision("highest")
            finally:
                log.setLevel(level)
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
    bar = tqdm(
        total=round(total, 1), unit="GFLOP", desc="extract", disable=not progress, leave=False,
        bar_format="{l_bar}{bar}| {n:.1f}/{total:.1f} GFLOP [{elapsed}<{remaining}, {rate_fmt}{postfix}]",
    )  # fmt: skip
    current: dict[str, float] = {}

    def on_layer(name: str, fraction: float = 1.0) -> None:
        bar.update(round(current.get(name, 0.0) * fraction, 3))

    vectors: dict[str, list[np.ndarray]] = {}
    timings: dict[str, float] = {}
    names: list[str] = []
    compile_before = _xla_compiles() if dev.type == "xla" else None
    tile_before, model.tile_voxels = model.tile_voxels, prepared.tile_voxels
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
                if dev.type == "cpu":
                    release_freed_memory()
                sizes = [int(p.shape[1]) for p in hooks.pooled]
                vectors[region.name] = [v.copy() for v in np.split(host, np.cumsum(sizes)[:-1])]
                names = list(hooks.names)
    finally:
        bar.close()
        model.tile_voxels = tile_before
    info = device_description(dev)
    if compile_before is not None:
        after = _xla_compiles()
        info["xla_compilations"] = after[0] - compile_before[0]
        info["xla_compile_time_s"] = round(after[1] - compile_before[1], 3)
    info["bucket"] = prepared.bucket
    if dev.type == "cpu":
        info["glibc_keep_freed_memory"] = _MALLOC_TUNED
    info["channels_last"] = prepared.channels_last
    info["compute"] = prepared.compute
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


def _xla_pooled_mean(output: torch.Tensor, keep: tuple[int, ...] | None) -> torch.Tensor:
    """(N, C) fp32 mean of ``output`` over its leading ``keep`` voxels per axis (None: all).

    The eager path slices the valid part; on XLA a slice's size is baked into the compiled
    graph, so two crops bucketed to the same shape would still compile twice. Here the valid
    part enters as data instead: a separable weight (1/k on the first k voxels of each axis,
    0 after) multiplies the output and the product is summed, so the graph depends on the
    padded shape only.
    """
    out = tuple(int(n) for n in output.shape[2:])
    wd, wh, ww = _axis_weights(str(output.device), out, keep or out, True)
    weight = wd[:, None, None] * wh[None, :, None] * ww[None, None, :]
    return torch.sum(output * weight, dim=(2, 3, 4), dtype=torch.float32)


@functools.lru_cache(maxsize=256)
def _axis_weights(
    device: str, size: tuple[int, ...], keep: tuple[int, ...], mean: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-axis float32 weights on ``device``: 1 (``mean``: 1/k) on the first k voxels, 0 after.

    Cached, so each (size, extent) is uploaded once: on XLA they are device data, not constants.
    """
    weights = []
    for n, k in zip(size, keep):
        w = torch.zeros(n, dtype=torch.float32)
        w[:k] = 1.0 / k if mean else 1.0
        weights.append(w.to(device))
    return weights[0], weights[1], weights[2]


def _xla_compiles() -> tuple[int, float]:
    """(number of XLA compilations, total compile seconds) so far in this process."""
    import torch_xla.debug.metrics as met

    data = met.metric_data("CompileTime")
    if not data:
        return 0, 0.0
    return int(data[0]), float(data[1]) / 1e9
