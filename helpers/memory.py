"""Memory guard: estimate the forward's peak memory before running it, refuse if it cannot fit.

The estimate follows what :meth:`helpers.inflate.DenseNet3d.forward` keeps alive, stage by
stage, for an input of a given shape (geometry from :func:`helpers.inflate.conv_shapes`;
``V`` voxels at a stage's resolution, ``e`` bytes per element of the tensor's dtype; the
caller's fp32 input stays alive throughout). Modelled on the forward with in-place eval
BatchNorm+ReLU, one pre-allocated buffer per dense block and, where ``model.tile_voxels`` is
set (CPU), depth tiles:

* stem, whole: conv0's 64-channel output at half resolution, then pool0's output and max
  pooling's int64 indices; in depth tiles: dense block 1's buffer (the pooled tiles are written
  into it) plus one tile of conv0's output and of its pooling;
* each dense layer: the block's input (still referenced by the caller; not for block 1 after a
  tiled stem), the block's buffer of ``c0 + 32 L`` channels, the normalised copy of the first
  ``c`` channels and the 128-channel bottleneck (during conv1; the largest ``c`` counts), or
  the bottleneck and the 32-channel output (during conv2); in depth tiles, the copies are one
  tile (+ a halo slice each side);
* each transition: the buffer (normalised in place when whole), the conv's output and the
  average-pooled output; in depth tiles, one tile of the normalised buffer and of the conv output;
* autocast (bf16/fp16): activations after conv0 are low precision and the input is cast (a
  copy); on the CPU BatchNorm+ReLU makes a new tensor (oneDNN) instead of working in place;
* bucketing (no tiles then): the forward pre-hooks that zero the padded part copy every
  padding layer's input (conv0's input, conv0's output before pool0, every bottleneck).

The live-set bytes are multiplied by a factor calibrated against measured peak RSS on the
CPU (``python tests/test_memory.py`` prints the table) plus a fixed allowance for the first
forward's library initialisation (oneDNN primitives, thread pools) and allocator slack, and
autocast's cached low-precision weights. When ``DenseNet3d.forward`` changes, update
:func:`estimate_peak_bytes` (the one estimator; :func:`_live_set_bytes` is its model) and
re-run the calibration.

:func:`check_memory` compares the estimate with what is available (``psutil`` and the cgroup
limit on the CPU, ``torch.cuda.mem_get_info`` plus the allocator's free cache on CUDA; XLA is
not checked) and raises a one-line :class:`InputError` with the estimate and the remedies,
unless ``force``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from .errors import InputError, warn

#: Upper bound of measured peak RSS growth / live set on the CPU (0.8-2.15 measured over shapes and runs: glibc keeps freed memory, so fragmentation varies); tests/test_memory.py.
CPU_FACTOR = 2.2
#: Extra bytes allowed on every device for allocator rounding and library scratch.
FIXED_OVERHEAD = 128 * 2**20
#: Extra fraction on CUDA for cuDNN workspaces and the caching allocator's fragmentation.
CUDA_FACTOR = 1.25
_ITEMSIZE = {"fp32": 4, "bf16": 2, "fp16": 2}


def estimate_peak_bytes(
    model: nn.Module, shape: Sequence[int], precision: str = "fp32", device: str = "cpu", bucketed: bool = False,
    tile_voxels: int | None | str = "model",
) -> int:
    """Estimated peak extra memory (bytes) of one forward of ``model`` on an input of ``shape``
    (d, h, w voxels, after bucketing) at ``precision`` ("fp32", "bf16", "fp16") on ``device``
    ("cpu", "cuda", ...); ``bucketed``: the input is zero-padded beyond the crop. The live set
    of :meth:`DenseNet3d.forward` (see the module doc) times the calibrated factor, plus the
    fixed allowance and autocast's cached weight copies."""
    live = _live_set_bytes(model, shape, precision, str(device), bucketed, tile_voxels)
    factor = CPU_FACTOR * (CUDA_FACTOR if str(device).startswith("cuda") else 1.0)
    low = precision in ("bf16", "fp16")
    weights = 2 * sum(p.numel() for p in model.parameters()) if low else 0
    return int(live * factor + weights + FIXED_OVERHEAD)


def _live_set_bytes(
    model: nn.Module, shape: Sequence[int], precision: str, device: str, bucketed: bool = False,
    tile_voxels: int | None | str = "model",
) -> int:
    """Largest sum of tensor bytes alive at once during the forward (see the module doc).
    ``tile_voxels``: the forward's depth-tile size (``"model"``: the model's own setting)."""
    from torchvision.models.densenet import _DenseBlock, _Transition

    from .inflate import _cube, _out, conv_shapes, dense_tile_rows, stem_tile_rows, transition_tile_rows

    low = precision in ("bf16", "fp16")
    cpu_low = low and not device.startswith("cuda")  # CPU bf16: BN+ReLU makes a new tensor, no in-place
    ec = 2 if low else 4  # activations after conv0
    tile = getattr(model, "tile_voxels", None) if tile_voxels == "model" else tile_voxels
    tile = None if bucketed else tile
    convs = {c.name: c for c in conv_shapes(model, tuple(int(n) for n in shape))}

    d, h, w = (int(n) for n in shape)
    vox = d * h * w
    held = 4 * vox + (4 * vox if bucketed else 0)  # the caller's fp32 input (+ the pre-hook's masked copy)
    c0 = convs["conv0"]
    ch0, (d1, h1, w1) = c0.out_channels, c0.out_size
    kp, sp, pp = (_cube(getattr(model.pool0, a), a)[0] for a in ("kernel_size", "stride", "padding"))
    d2, h2, w2 = (_out(n, kp, sp, pp) for n in (d1, h1, w1))
    blocks = [(n, m) for n, m in model.named_children() if isinstance(m, _DenseBlock)]
    first = blocks[0][1]
    layers1 = list(first.values())
    c_block1 = layers1[0].norm1.num_features + len(layers1) * layers1[0].conv2.out_channels
    in_copy = 2 * vox if low else 0  # the low-precision copy of the input (or of a tile of it)
    pre = ec if bucketed else 0  # the pre-hook's masked copy of conv0's output before pool0
    stem_rows = stem_tile_rows(tile, (d, h, w))
    stem_tiled = bool(stem_rows)
    if stem_rows:  # tiles of conv0 -> pool0 written into dense block 1's buffer
        rows = stem_rows
        n_conv = min(2 * rows + 2, d1)
        n_pool = min(rows + 1, d2)
        slab = min(2 * n_conv + 6, d) * h * w
        peak = held + c_block1 * d2 * h2 * w2 * ec
        peak += (2 * slab if low else 0) + ch0 * n_conv * h1 * w1 * ec * (2 if cpu_low else 1) + ch0 * n_pool * h2 * w2 * (ec + 8)
    else:
        v1 = d1 * h1 * w1
        peak = held + in_copy + ch0 * v1 * ec * (2 if cpu_low else 1)  # conv0 (+ BN+ReLU's new tensor)
        peak = max(peak, held + ch0 * v1 * (ec + pre) + ch0 * d2 * h2 * w2 * (ec + 8))  # pool0 (+ int64 indices)
    for name, module in model.named_children():
        if isinstance(module, _DenseBlock):
            layers = [n for n, _ in module.named_children()]
            conv1, conv2 = convs[f"{name}.{layers[0]}.conv1"], convs[f"{name}.{layers[0]}.conv2"]
            depth, plane = conv1.out_size[0], conv1.out_size[1] * conv1.out_size[2]
            v = depth * plane
            c_in, b, g = conv1.in_channels, conv1.out_channels, conv2.out_channels
            c_last = c_in + g * (len(layers) - 1)
            c_buf = c_in + g * len(layers)
            given = 0 if (module is first and stem_tiled) else c_in * v * ec  # the block's input, still referenced
            base = held + given + c_buf * v * ec
            rows = dense_tile_rows(tile, conv1.out_size)
            vt = v if not rows else (rows + 2) * plane  # one depth tile and its halo
            during_conv1 = c_last * vt * ec * (2 if cpu_low else 1) + b * vt * ec  # normalised input (+ oneDNN's dense copy)
            during_conv2 = b * vt * ec * (2 if (bucketed or cpu_low) else 1) + g * vt * ec
            peak = max(peak, base + max(during_conv1, during_conv2))
        elif isinstance(module, _Transition):
            conv = convs[f"{name}.conv"]
            v, half = int(np.prod(conv.out_size)), conv.out_channels
            depth, plane = conv.out_size[0], conv.out_size[1] * conv.out_size[2]
            rows = transition_tile_rows(tile, conv.out_size)
            vt = min(rows or depth, depth) * plane
            normalised = c_buf * vt * ec * (2 if cpu_low else 1) if rows or cpu_low else 0  # in place when whole
            peak = max(peak, held + c_buf * v * ec + normalised + half * vt * ec + half * (v // 8) * ec)
    return int(peak)


def available_bytes(device: Any = "cpu") -> int | None:
    """Memory available to this process on ``device`` (bytes), or None where it cannot be known (XLA).

    CPU: ``psutil``'s available memory, capped by the cgroup (container) limit minus its usage
    net of reclaimable page cache. CUDA: free device memory plus the caching allocator's unused
    reserve.
    """
    kind = getattr(device, "type", str(device).split(":")[0])
    if kind == "cpu":
        import psutil

        avail = int(psutil.virtual_memory().available)
        cgroup = _cgroup_available()
        return min(avail, cgroup) if cgroup is not None else avail
    if kind == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + max(cached, 0))
    return None


def _cgroup_available() -> int | None:
    """Bytes left under the cgroup v2 or v1 memory limit (None when unlimited or unknown)."""
    for limit_f, usage_f, stat_f, key in (
        ("memory.max", "memory.current", "memory.stat", "inactive_file"),
        ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes", "memory/memory.stat", "total_inactive_file"),
    ):
        root = Path("/sys/fs/cgroup")
        try:
            raw = (root / limit_f).read_text().strip()
            if raw == "max" or int(raw) >= 1 << 60:
                return None
            usage = int((root / usage_f).read_text())
            reclaimable = 0
            for line in (root / stat_f).read_text().splitlines():
                k, _, v = line.partition(" ")
                if k == key:
                    reclaimable = int(v)
            return max(int(raw) - (usage - reclaimable), 0)
        except (OSError, ValueError):
            continue
    return None


def _fitting_spacing(prepared: Any, shape: Sequence[int], spacing: Sequence[float], avail: int) -> float:
    """Smallest isotropic spacing (mm, 0.1 mm steps) at which the estimate for this crop fits."""
    iso = math.ceil(float(np.prod(spacing)) ** (1 / 3) * 10) / 10
    for _ in range(200):
        resampled = [max(1, round(n * s / iso)) for n, s in zip(shape, spacing)]
        try:
            need = estimate_peak_bytes(prepared.model, resampled, prepared.precision, str(prepared.device),
                                       tile_voxels=prepared.tile_voxels)  # fmt: skip
        except ValueError:  # too small for the network: any coarser spacing fits
            return iso
        if need <= avail:
            return iso
        iso = round(iso + 0.1, 1)
    return iso


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def check_memory(
    prepared: Any,
    shapes: dict[str, Sequence[int]],
    spacing: Sequence[float] | None = None,
    source: str = "",
    force: bool = False,
) -> dict[str, Any]:
    """Refuse a forward that would not fit: estimate every region's peak (``shapes``: region ->
    network input shape, d/h/w voxels) on ``prepared``'s device and precision and compare the
    largest with :func:`available_bytes`.

    Raises :class:`InputError` (one line: the estimate, what is available, the remedies)
    unless ``force``, which only warns. ``spacing`` (mm, d/h/w) lets the message suggest a
    ``--spacing`` that would fit. Returns a record for the provenance.
    """
    device, precision = prepared.device, prepared.precision
    per_region = {
        n: estimate_peak_bytes(prepared.model, s, precision, str(device), bucketed=bool(prepared.bucket),
                               tile_voxels=prepared.tile_voxels)
        for n, s in shapes.items()
    }
    worst = max(per_region, key=per_region.__getitem__)
    need = per_region[worst]
    avail = available_bytes(device)
    record: dict[str, Any] = {
        "estimated_peak_bytes": need,
        "per_region_bytes": per_region,
        "available_bytes": avail,
        "device": str(device),
        "precision": precision,
        "checked": avail is not None,
        "forced": bool(force),
    }
    if avail is None or need <= avail:
        return record
    shape = "x".join(str(int(n)) for n in shapes[worst])
    remedy = []
    if spacing is not None:
        remedy.append(f"--spacing {_fitting_spacing(prepared, shapes[worst], spacing, avail):g} (coarser grid)")
    else:
        remedy.append("a coarser --spacing")
    remedy += ["a smaller --pad", "another --device"]
    if precision == "fp32" and getattr(device, "type", "") == "cuda":
        remedy.insert(-1, "--precision bf16")
    message = (
        f"{source + ': ' if source else ''}the {worst} forward ({shape} voxels, {precision} on {device}) needs about "
        f"{_gib(need)} but only {_gib(avail)} is available; use {', '.join(r for r in remedy if r)}, "
        "or --force to run anyway"
    )
    if not force:
        raise InputError(message)
    warn(f"--force: {message.split('; use ')[0]}; running anyway")
    return record
