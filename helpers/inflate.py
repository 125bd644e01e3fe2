"""torchvision's 2D DenseNet-121, its weights, and its inflation to 3D.

Inflation (``inflate_module``) replaces, recursively:

* every ``Conv2d`` (k x k, stride s, padding p) by a ``Conv3d`` with cubic kernel k x k x k,
  stride s x s x s and padding p x p x p. Weight modes:
  ``mean`` (I3D, default) repeats the 2D kernel along depth and divides by k, so a
  depth-constant input gives the 2D response away from the depth borders;
  ``center`` puts the 2D kernel in the centre depth slice (zeros elsewhere), so a
  depth-constant input gives the 2D response at *every* depth;
* every ``BatchNorm2d`` by a ``BatchNorm3d`` with the same statistics and affine parameters;
* every ``MaxPool2d``/``AvgPool2d`` by its cubic 3D form.

The first convolution is then collapsed from 3 input channels to 1 by **summing** the RGB
kernels (:func:`collapse_rgb`). A grey image fed to the 2D network as R = G = B gives exactly
the response of the summed kernel on the single grey channel, so the pretrained BatchNorm
statistics that follow stay valid. The seed's *mean* of the kernels gives a third of that
response and silently shifts every BatchNorm out of its trained range.

The classifier is dropped: :class:`DenseNet3d` is torchvision's ``features`` stack (layer
names ``conv0``, ``denseblock1.denselayer1.conv1``, ... as in torchvision) with a
memory-efficient forward.
"""

from __future__ import annotations

import contextlib
import copy
import re
import socket
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn
from torchvision.models import DenseNet121_Weights, densenet121
from torchvision.models.densenet import _DenseBlock

from .errors import InputError, first_line
from .io import sha256_file

INFLATION_MODES = ("mean", "center")
#: torchvision's legacy DenseNet key names ``...denselayer1.norm.1.weight`` -> ``...denselayer1.norm1.weight``
_LEGACY_KEY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$")
#: Seconds to wait for the ImageNet weights download before falling back (``weights="auto"``).
DOWNLOAD_TIMEOUT_S = 20.0


@dataclass(frozen=True)
class WeightsInfo:
    """Where the network's weights came from (recorded in the provenance)."""

    source: str  #: "imagenet", "random" or "file"
    description: str
    path: str | None = None
    sha256: str | None = None
    seed: int | None = None

    @property
    def is_random(self) -> bool:
        return self.source == "random"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "random": self.is_random}


# ----------------------------------------------------------------------------- weights


def fix_legacy_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename torchvision's legacy DenseNet keys (``norm.1`` -> ``norm1``) and drop ``module.`` prefixes."""
    out = {}
    for key, value in state_dict.items():
        key = key.removeprefix("module.")
        match = _LEGACY_KEY.match(key)
        out[match.group(1) + match.group(2) if match else key] = value
    return out


def imagenet_weights_path() -> Path:
    """Where torchvision keeps the ImageNet DenseNet-121 checkpoint (``$TORCH_HOME/hub/checkpoints``)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(DenseNet121_Weights.IMAGENET1K_V1.url).name


@contextlib.contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(old)


def _load_imagenet(progress: bool) -> tuple[dict[str, torch.Tensor], WeightsInfo]:
    """torchvision's ImageNet weights from its cache, or downloaded into it (hash-checked)."""
    url = DenseNet121_Weights.IMAGENET1K_V1.url
    with _socket_timeout(DOWNLOAD_TIMEOUT_S):
        state = torch.hub.load_state_dict_from_url(url, progress=progress, check_hash=True, weights_only=True)
    path = imagenet_weights_path()
    info = WeightsInfo("imagenet", f"torchvision DenseNet121_Weights.IMAGENET1K_V1 ({url})", str(path), sha256_file(path))
    return state, info


def load_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """A DenseNet-121 state dict from a local file, loaded with ``weights_only=True``.

    Accepts torchvision's format (including its legacy ``norm.1`` key names), a dict wrapping
    it under ``state_dict`` or ``model``, and ``module.`` prefixes from DataParallel.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: weights file not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError(f"{path}: not a loadable weights-only PyTorch checkpoint ({first_line(exc)})") from None
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise InputError(f"{path}: checkpoint is not a state dict of tensors")
    return fix_legacy_keys(obj)


def load_densenet121_2d(weights: str = "auto", seed: int = 0, progress: bool = False) -> tuple[nn.Module, WeightsInfo]:
    """torchvision's 2D DenseNet-121 in eval mode, with its weights source.

    ``weights``: ``"imagenet"`` (torchvision's cache or download; an error if neither works),
    ``"auto"`` (ImageNet if it can be had, otherwise random with a loud warning), ``"random"``
    (torchvision's own initialisation from ``seed``), or a path to a local checkpoint.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = densenet121(weights=None)
    info = WeightsInfo("random", f"random initialisation (torchvision's, torch seed {seed})", seed=seed)
    if weights in ("imagenet", "auto"):
        try:
            state, info = _load_imagenet(progress)
        except Exception as exc:
            reason = first_line(exc)
            if weights == "imagenet":
                raise InputError(
                    f"{imagenet_weights_path()}: ImageNet weights unavailable ({reason}); "
                    "put torchvision's densenet121 checkpoint there or pass --weights PATH"
                ) from None
            info = WeightsInfo(
                "random",
                f"random initialisation (torchvision's, torch seed {seed}); ImageNet weights unavailable: {reason}",
                seed=seed,
            )
            state = None
        if state is not None:
            model.load_state_dict(fix_legacy_keys(state))
    elif weights != "random":
        state = load_checkpoint(weights)
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("classifier.")]
        if missing or unexpected:
            raise InputError(
                f"{weights}: not a DenseNet-121 checkpoint ({len(missing)} missing keys, e.g. "
                f"{(missing or unexpected)[0]!r}; {len(unexpected)} unexpected)"
            )
        info = WeightsInfo("file", f"local checkpoint {weights}", str(Path(weights).resolve()), sha256_file(weights))
    return model.eval(), info


# ----------------------------------------------------------------------------- inflation


def _cube(value: int | tuple[int, ...], what: str) -> tuple[int, int, int]:
    if isinstance(value, int):
        return (value,) * 3
    if len(set(value)) != 1:
        raise ValueError(f"cannot inflate a non-square {what} {value}")
    return (value[0],) * 3


class Conv3d(nn.Conv3d):
    """``nn.Conv3d`` with faster CPU inference paths; same parameters, same state dict, same function.

    * float32: always oneDNN. For a batch-1 input with a 3x3x3 (or smaller) kernel and
      ``N*C*D*H <= 20480`` PyTorch's dispatcher picks its im2col ``slow_conv3d`` path, about 20x
      slower for DenseNet's deepest layers (128 -> 32 channels on 6x16x16 voxels: 20 ms vs 1 ms).
    * bfloat16 (a bf16 input, or CPU autocast to bf16): the bf16 copy of the weights is made once
      and cached instead of at every call, and a 1-input-channel stride-2 convolution (conv0)
      runs as a stride-1 convolution over the input's 8 space-to-depth phases
      (:func:`space_to_depth_conv`), which AMX runs ~10x faster than the 1-channel form.

    GPU, XLA and training (autograd) use the standard path.
    """

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if not (
            input.device.type == "cpu"
            and self.padding_mode == "zeros"
            and not isinstance(self.padding, str)
            and not (torch.is_grad_enabled() and (input.requires_grad or weight.requires_grad))
            and torch.backends.mkldnn.is_available()
        ):
            return super()._conv_forward(input, weight, bias)
        dtype = _cpu_autocast_dtype() or input.dtype
        if dtype == torch.float32 and input.dtype == weight.dtype == torch.float32:
            return torch.mkldnn_convolution(input, weight, bias, self.padding, self.stride, self.dilation, self.groups)
        if dtype != torch.bfloat16:
            return super()._conv_forward(input, weight, bias)
        x = input.to(dtype)
        b = bias.to(dtype) if bias is not None else None
        if self.in_channels == 1 and self.groups == 1 and self.stride == (2, 2, 2) and self.dilation == (1, 1, 1):
            return space_to_depth_conv(x, self._cast(weight, dtype, phases=True), b, self.padding)
        return torch.mkldnn_convolution(x, self._cast(weight, dtype), b, self.padding, self.stride, self.dilation, self.groups)

    def _cast(self, weight: torch.Tensor, dtype: torch.dtype, phases: bool = False) -> torch.Tensor:
        """``weight`` in ``dtype`` (phase-split for :func:`space_to_depth_conv`), cached until it changes."""
        key = (dtype, phases, weight.data_ptr(), weight._version)
        cache = self.__dict__.setdefault("_cast_cache", {})
        if key not in cache:
            cache.clear()
            w = space_to_depth_weight(weight) if phases else weight
            cache[key] = w.to(dtype).contiguous(memory_format=torch.channels_last_3d)
        return cache[key]


def space_to_depth_weight(weight: torch.Tensor) -> torch.Tensor:
    """(C_out, 1, k, k, k) stride-2 kernel -> (C_out, 8, q, q, q) kernel over the 2x2x2 phases, q = ceil(k/2).

    Tap ``t = 2 j + r`` of the original kernel (per axis) becomes tap ``j`` of phase ``r``;
    taps past ``k`` are zero.
    """
    c_out, _, k = weight.shape[0], weight.shape[1], weight.shape[-1]
    q = (k + 1) // 2
    w = nn.functional.pad(weight, (0, 2 * q - k) * 3)[:, 0]  # (C_out, 2q, 2q, 2q)
    w = w.reshape(c_out, q, 2, q, 2, q, 2).permute(0, 2, 4, 6, 1, 3, 5)  # (C_out, rd, rh, rw, jd, jh, jw)
    return w.reshape(c_out, 8, q, q, q)


def space_to_depth_conv(
    x: torch.Tensor, weight8: torch.Tensor, bias: torch.Tensor | None, padding: tuple[int, ...]
) -> torch.Tensor:
    """A 1-channel, stride-2, cubic-kernel convolution of ``x`` computed as a stride-1 convolution
    of its 8 space-to-depth phases with :func:`space_to_depth_weight` ``weight8``: identical output.

    With ``x'`` = ``x`` zero-padded by ``p`` in front, ``out[o] = sum_t w[t] x'[2o + t]``
    = ``sum_{j, r} w[2j + r] X_r[o + j]`` where ``X_r[m] = x'[2m + r]`` (per axis).
    """
    q = weight8.shape[-1]
    n = x.shape[0]
    sizes = x.shape[2:]
    outs = [(s + 2 * p - (2 * q - 1)) // 2 + 1 for s, p in zip(sizes, padding)]  # = conv output size
    lengths = [2 * (o + q - 1) for o in outs]
    pads: list[int] = []
    for s, p, length in zip(reversed(sizes), reversed(padding), reversed(lengths)):
        pads += [p, max(length - p - s, 0)]
    xp = nn.functional.pad(x, pads)[:, :, : lengths[0], : lengths[1], : lengths[2]]
    d, h, w = (length // 2 for length in lengths)
    phases = xp.reshape(n, d, 2, h, 2, w, 2).permute(0, 1, 3, 5, 2, 4, 6).reshape(n, d, h, w, 8)
    phases = phases.permute(0, 4, 1, 2, 3)  # (n, 8, d, h, w), channels-last in memory
    return torch.mkldnn_convolution(phases, weight8, bias, (0, 0, 0), (1, 1, 1), (1, 1, 1), 1)


def _cpu_autocast_dtype() -> torch.dtype | None:
    """The CPU autocast dtype when CPU autocast is on, else None."""
    try:
        on = torch.is_autocast_enabled("cpu")
        return torch.get_autocast_dtype("cpu") if on else None
    except TypeError:  # torch < 2.4
        return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None


def inflate_conv(conv: nn.Conv2d, mode: str = "mean") -> nn.Conv3d:
    """Conv2d (k x k) -> Conv3d (k x k x k) with weights inflated by ``mode`` (``mean`` or ``center``)."""
    if mode not in INFLATION_MODES:
        raise InputError(f"--inflation: expected one of {', '.join(INFLATION_MODES)}, got {mode!r}")
    k = _cube(conv.kernel_size, "kernel")[0]
    if isinstance(conv.padding, str):
        raise ValueError("string padding is not supported")
    conv3d = Conv3d(
        conv.in_channels,
        conv.out_channels,
        kernel_size=k,
        stride=_cube(conv.stride, "stride"),
        padding=_cube(conv.padding, "padding"),
        dilation=_cube(conv.dilation, "dilation"),
        groups=conv.groups,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
        device=conv.weight.device,
        dtype=conv.weight.dtype,
    )
    w2 = conv.weight.detach()
    with torch.no_grad():
        if mode == "mean":
            conv3d.weight.copy_(w2.unsqueeze(2).expand(-1, -1, k, -1, -1) / k)
        else:
            conv3d.weight.zero_()
            conv3d.weight[:, :, k // 2].copy_(w2)
        if conv.bias is not None:
            conv3d.bias.copy_(conv.bias.detach())
    return conv3d


def inflate_batchnorm(bn: nn.BatchNorm2d) -> nn.BatchNorm3d:
    """BatchNorm2d -> BatchNorm3d with identical statistics, affine parameters, eps and momentum."""
    bn3d = nn.BatchNorm3d(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
    bn3d.load_state_dict(bn.state_dict())
    return bn3d.to(bn.weight.device if bn.weight is not None else "cpu")


def inflate_pool(pool: nn.Module) -> nn.Module:
    """MaxPool2d/AvgPool2d -> MaxPool3d/AvgPool3d with cubic kernel, stride and padding."""
    kw = dict(kernel_size=_cube(pool.kernel_size, "kernel"), stride=_cube(pool.stride, "stride"),
              padding=_cube(pool.padding, "padding"), ceil_mode=pool.ceil_mode)  # fmt: skip
    if isinstance(pool, nn.MaxPool2d):
        return nn.MaxPool3d(dilation=_cube(pool.dilation, "dilation"), **kw)
    return nn.AvgPool3d(count_include_pad=pool.count_include_pad, divisor_override=pool.divisor_override, **kw)


def inflate_module(module: nn.Module, mode: str = "mean") -> nn.Module:
    """A deep copy of ``module`` with every 2D conv, batch norm and pooling layer inflated to 3D."""
    module = copy.deepcopy(module)

    def visit(parent: nn.Module) -> None:
        for name, child in parent.named_children():
            if isinstance(child, nn.Conv2d):
                setattr(parent, name, inflate_conv(child, mode))
            elif isinstance(child, nn.BatchNorm2d):
                setattr(parent, name, inflate_batchnorm(child))
            elif isinstance(child, (nn.MaxPool2d, nn.AvgPool2d)):
                setattr(parent, name, inflate_pool(child))
            elif isinstance(child, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Dropout2d)):
                raise ValueError(f"no 3D inflation implemented for {type(child).__name__}")
            else:
                visit(child)

    visit(module)
    return module


def collapse_rgb(conv: nn.Conv3d) -> nn.Conv3d:
    """A 1-input-channel copy of an RGB conv whose kernel is the **sum** of the R, G, B kernels.

    For a grey input g, ``conv_rgb(g, g, g) == conv_grey(g)`` exactly (up to float rounding),
    which keeps the following pretrained BatchNorm statistics valid (see the module doc).
    """
    grey = Conv3d(1, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                     bias=conv.bias is not None, device=conv.weight.device, dtype=conv.weight.dtype)  # fmt: skip
    with torch.no_grad():
        grey.weight.copy_(conv.weight.sum(dim=1, keepdim=True))
        if conv.bias is not None:
            grey.bias.copy_(conv.bias)
    return grey


class DenseNet3d(nn.Sequential):
    """The inflated DenseNet-121 ``features`` stack, input (N, 1, d, h, w), with layer names as in
    torchvision (``conv0``, ``denseblock1.denselayer1.conv1``, ..., ``norm5``).

    ``forward`` computes the same function as torchvision's (``forward_reference``) with far
    less memory traffic, for inference only:

    * each dense block writes its layers' outputs into one pre-allocated buffer instead of
      re-concatenating the growing feature stack at every layer (``torch.cat``);
    * eval-mode BatchNorm + ReLU is one multiply-add pass plus an in-place clamp, done in place
      wherever the input is not needed afterwards (conv outputs, the block buffer before a
      transition), so no second copy of the largest activations is ever allocated;
    * ``norm5`` (no conv after it) is skipped: ``forward`` returns the last dense block's output;
    * with ``tile_voxels`` set, the stem (conv0 -> pool0), the dense layers and the transitions
      run in depth tiles with a halo where their activations are larger (:func:`partial_rows`
      tells the hooks which rows of each call are its own); the stem writes straight into dense
      block 1's buffer. For a 512 x 512 x 216 scan the 1.8 GB conv0 output and the normalised
      copies of block 1's 906 MB buffer never exist whole;
    * on the CPU in bf16 the modules' fast paths apply (:class:`Conv3d`, :func:`bn_relu`,
      :func:`max_pool`, :func:`avg_pool`).

    Every Conv3d is still called as a module, so forward hooks see every conv output.
    """

    inflation: str = "mean"
    weights_info: WeightsInfo | None = None
    #: Run the stem, dense layers and transitions in depth tiles of about this many voxels when
    #: their activations are larger (None: never). ``helpers.extract`` sets it for each forward
    #: from its ``PreparedModel`` (on the CPU); it changes memory, not results.
    tile_voxels: int | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        blocks = [m for m in self if isinstance(m, _DenseBlock)]
        filled = None
        rows = stem_tile_rows(self.tile_voxels, tuple(x.shape[2:]))
        if rows:  # the pooled stem tiles go straight into dense block 1's buffer
            x = _stem_tiled(self, x, rows, _block_channels(blocks[0]))
            filled = self.conv0.out_channels
        else:
            x = max_pool(self.pool0, bn_relu(self.norm0, self.conv0(x), inplace=True))
        for i, block in enumerate(blocks, start=1):
            x = _dense_block_forward(block, x, self.tile_voxels, filled if i == 1 else None)
            if i < len(blocks):
                trans = getattr(self, f"transition{i}")
                rows = transition_tile_rows(self.tile_voxels, tuple(x.shape[2:]))
                if rows:
                    x = _transition_tiled(trans, x, rows)
                else:
                    x = avg_pool(trans.pool, trans.conv(bn_relu(trans.norm, x, inplace=True)))
        return x

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """torchvision's modules' own forward (``torch.cat`` per layer), also without ``norm5``:
        the oracle for ``forward``."""
        for module in self:
            if module is not self.norm5:
                x = module(x)
        return x

    @property
    def conv_names(self) -> list[str]:
        """Names of all Conv3d layers in execution order."""
        return [name for name, m in self.named_modules() if isinstance(m, nn.Conv3d)]


def bn_relu(bn: nn.BatchNorm3d, x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """``relu(bn(x))`` for an eval-mode BatchNorm as ``max(x * scale + shift, 0)``.

    ``scale = weight / sqrt(running_var + eps)`` and ``shift = bias - running_mean * scale``
    (float32, then cast to ``x``'s dtype). With ``inplace`` the result overwrites ``x`` where that
    is the fast way; otherwise (and for bf16 on the CPU) a new tensor in ``x``'s memory format is
    returned. ``x`` may be a channel slice of a larger buffer. On the CPU in bf16 the affine map
    and the ReLU run as one oneDNN depthwise 1x1x1 convolution with a fused ReLU, ~10x faster
    than PyTorch's bf16 element-wise kernels.
    """
    scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
    shift = bn.bias - bn.running_mean * scale
    if x.device.type == "cpu" and x.dtype == torch.bfloat16 and _channels_last(x) and _POINTWISE is not None:
        c = x.shape[1]
        w = scale.to(x.dtype).view(c, 1, 1, 1, 1).contiguous(memory_format=torch.channels_last_3d)
        return _POINTWISE(x, w, shift.to(x.dtype), [0, 0, 0], [1, 1, 1], [1, 1, 1], c, "relu", [], "")
    shape = (1, -1) + (1,) * (x.dim() - 2)
    scale, shift = scale.to(x.dtype).view(shape), shift.to(x.dtype).view(shape)
    if inplace:
        out = torch.addcmul(shift, x, scale, out=x)
    else:
        fmt = torch.channels_last_3d if _channels_last(x) else torch.contiguous_format
        out = torch.addcmul(shift, x, scale, out=torch.empty_like(x, memory_format=fmt))
    return out.relu_()


#: oneDNN convolution with a fused element-wise post-op (the op PyTorch's inductor uses), if present.
_POINTWISE = getattr(getattr(torch.ops, "mkldnn", None), "_convolution_pointwise", None)


def _channels_last(x: torch.Tensor) -> bool:
    """True when ``x`` (or the buffer it is a channel slice of) is laid out channels-last."""
    return x.dim() == 5 and x.shape[1] > 1 and x.stride(1) == 1


def max_pool(pool: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``pool(x)`` in ``x``'s own dtype: CPU autocast would run max pooling in float32 and so
    turn every bf16 activation after it back into float32 (the max of bf16 values is exact)."""
    if x.device.type == "cpu" and x.dtype == torch.bfloat16:
        with torch.autocast("cpu", enabled=False):
            return pool(x)
    return pool(x)


def avg_pool(pool: nn.AvgPool3d, x: torch.Tensor) -> torch.Tensor:
    """``pool(x)``; for channels-last CPU tensors as a depthwise oneDNN convolution with weights
    1/k^3, which gives the same numbers ~8x faster than ``avg_pool3d`` (which converts a
    channels-last input to contiguous and back)."""
    k, s, p = (_cube(getattr(pool, a), a) for a in ("kernel_size", "stride", "padding"))
    if (
        x.device.type == "cpu"
        and _channels_last(x)
        and p == (0, 0, 0)
        and not pool.ceil_mode
        and pool.divisor_override is None
        and x.dtype in (torch.float32, torch.bfloat16)
        and torch.backends.mkldnn.is_available()
        and not (torch.is_grad_enabled() and x.requires_grad)
    ):
        c = x.shape[1]
        weight = torch.full((c, 1, *k), 1.0 / (k[0] * k[1] * k[2]), dtype=x.dtype)
        weight = weight.contiguous(memory_format=torch.channels_last_3d)
        return torch.mkldnn_convolution(x, weight, None, p, s, (1, 1, 1), c)
    return pool(x)


def stem_tile_rows(tile_voxels: int | None, size: tuple[int, ...]) -> int | None:
    """Pooled depth slices per stem tile for an input of ``size`` (d, h, w); None: not tiled."""
    stem = size[1] * size[2] // 4  # conv0 output voxels per depth slice
    if not tile_voxels or stem * size[0] // 2 <= tile_voxels:
        return None
    return max(8, tile_voxels // (2 * stem))  # >= 8: the 2-slice overlap of the tiles costs <= 12 %


def dense_tile_rows(tile_voxels: int | None, size: tuple[int, ...]) -> int | None:
    """Depth slices per dense-layer tile for activations of ``size`` (d, h, w); None: not tiled."""
    rows = max(4, tile_voxels // (size[1] * size[2])) if tile_voxels else size[0]
    return rows if rows < size[0] else None


def transition_tile_rows(tile_voxels: int | None, size: tuple[int, ...]) -> int | None:
    """Depth slices (even) per transition tile for a block output of ``size``; None: not tiled."""
    plane = size[1] * size[2]
    if not tile_voxels or size[0] * plane <= tile_voxels:
        return None
    return max(2, tile_voxels // plane // 2 * 2)


@contextlib.contextmanager
def partial_rows(module: nn.Module, lo: int, hi: int, total: int) -> Iterator[None]:
    """Mark the next calls of ``module`` as producing depth tiles of one output: only rows
    ``lo:hi`` of each call's output are its own, and all calls together own ``total`` rows.

    Forward hooks read ``module.partial_rows`` (``helpers.extract.PooledHooks`` accumulates the
    tiles into one pooled vector per layer).
    """
    module.partial_rows = (lo, hi, total)
    try:
        yield
    finally:
        module.partial_rows = None


def _rows(
    module: nn.Module, x: torch.Tensor, r0: int, r1: int, owned: tuple[int, int] | None = None, total: int = -1
) -> torch.Tensor:
    """Depth rows ``r0:r1`` of ``module(x)`` (a conv or pool), computed from the slab of ``x`` they need.

    The slab starts on a multiple of the stride, so slab output row ``j`` is global row
    ``start // stride + j``; the rows taken never see the slab's own padding except at the
    volume's true borders, where it is the padding the whole input would get. ``owned`` are the
    global rows whose output a hook should count (tiles that overlap count each row once).
    """
    k, s, p = (_cube(getattr(module, a), a)[0] for a in ("kernel_size", "stride", "padding"))
    start = max(s * r0 - p, 0)
    start -= start % s
    end = min(s * (r1 - 1) - p + k, x.shape[2])
    base = start // s
    ctx = partial_rows(module, owned[0] - base, owned[1] - base, total) if owned else contextlib.nullcontext()
    with ctx:
        out = module(x[:, :, start:end])
    assert out.shape[2] >= r1 - base, "tile arithmetic"
    return out[:, :, r0 - base : r1 - base]


def _block_channels(block: _DenseBlock) -> int:
    """Channels of a dense block's output (its buffer)."""
    layers = list(block.values())
    return layers[0].norm1.num_features + len(layers) * layers[0].conv2.out_channels


def _stem_tiled(net: DenseNet3d, x: torch.Tensor, rows: int, channels: int) -> torch.Tensor:
    """conv0 -> norm0 -> relu0 -> pool0 in depth tiles of ``rows`` pooled slices (same function),
    so the 64-channel full-resolution conv0 output never exists whole (1.8 GB for a 512 x 512 x
    216 scan). The result is written into the first channels of a new ``channels``-channel
    buffer (dense block 1's), allocated before any tile so the tiles reuse freed memory."""
    d0 = _out(x.shape[2], *(_cube(getattr(net.conv0, a), a)[0] for a in ("kernel_size", "stride", "padding")))
    kp, sp, pp = (_cube(getattr(net.pool0, a), a)[0] for a in ("kernel_size", "stride", "padding"))
    depth = _out(d0, kp, sp, pp)
    out: torch.Tensor | None = None
    for p0 in range(0, depth, rows):
        p1 = min(p0 + rows, depth)
        c0 = max(sp * p0 - pp, 0)
        c0 -= c0 % sp
        c1 = min(sp * (p1 - 1) - pp + kp, d0)
        owned = (0 if p0 == 0 else sp * p0, d0 if p1 == depth else sp * p1)
        y = bn_relu(net.norm0, _rows(net.conv0, x, c0, c1, owned, d0), inplace=True)
        tile = _pool_rows(net.pool0, y, c0, p0, p1)
        if out is None:
            fmt = torch.channels_last_3d if _channels_last(tile) else torch.contiguous_format
            size = (tile.shape[0], channels, depth, *tile.shape[3:])
            out = torch.empty(size, dtype=tile.dtype, device=tile.device, memory_format=fmt)
        out[:, : tile.shape[1], p0:p1] = tile
        del y, tile
    assert out is not None
    return out


def _transition_tiled(trans: nn.Module, x: torch.Tensor, rows: int) -> torch.Tensor:
    """norm -> relu -> 1x1x1 conv -> 2x2x2 average pool in depth tiles of ``rows`` (even) slices:
    the same function, without a second copy of the dense block's output."""
    depth = x.shape[2]
    out: torch.Tensor | None = None
    for d0 in range(0, depth, rows):
        d1 = min(d0 + rows, depth)
        with partial_rows(trans.conv, 0, d1 - d0, depth):
            y = trans.conv(bn_relu(trans.norm, x[:, :, d0:d1]))
        tile = avg_pool(trans.pool, y) if d1 - d0 >= 2 else None
        del y
        if tile is None:  # a last odd slice: pooled away (floor), but its conv output still counts
            continue
        if out is None:
            fmt = torch.channels_last_3d if _channels_last(tile) else torch.contiguous_format
            size = (*tile.shape[:2], depth // 2, *tile.shape[3:])
            out = torch.empty(size, dtype=tile.dtype, device=tile.device, memory_format=fmt)
        out[:, :, d0 // 2 : d0 // 2 + tile.shape[2]] = tile
    assert out is not None
    return out


def _pool_rows(pool: nn.Module, y: torch.Tensor, y0: int, p0: int, p1: int) -> torch.Tensor:
    """Rows ``p0:p1`` of ``pool`` applied to the whole activation, given its rows ``y0:`` in ``y``
    (``y0`` a multiple of the stride, ``y`` holding every row those outputs read)."""
    s = _cube(pool.stride, "stride")[0]
    return max_pool(pool, y)[:, :, p0 - y0 // s : p1 - y0 // s]


def _dense_block_forward(
    block: _DenseBlock, x: torch.Tensor, tile_voxels: int | None = None, filled: int | None = None
) -> torch.Tensor:
    """A dense block writing every layer's output into one buffer. ``filled``: ``x`` already is
    that buffer with its first ``filled`` channels holding the block's input."""
    layers = list(block.values())
    growth = layers[0].conv2.out_channels
    if filled is not None:
        buf, c = x, filled
    else:
        c = x.shape[1]
        fmt = torch.channels_last_3d if _channels_last(x) else torch.contiguous_format
        size = (x.shape[0], _block_channels(block), *x.shape[2:])
        buf = torch.empty(size, dtype=x.dtype, device=x.device, memory_format=fmt)
        buf[:, :c] = x
    del x
    rows = dense_tile_rows(tile_voxels, tuple(buf.shape[2:]))
    for layer in layers:
        if not rows:
            bottleneck = layer.conv1(bn_relu(layer.norm1, buf[:, :c]))
            buf[:, c : c + growth] = layer.conv2(bn_relu(layer.norm2, bottleneck, inplace=True))
        else:
            _dense_layer_tiled(layer, buf, c, rows)
        c += growth
    return buf


def _dense_layer_tiled(layer: nn.Module, buf: torch.Tensor, c: int, rows: int) -> None:
    """One dense layer computed in depth tiles of ``rows`` slices (exactly the same function).

    Each tile reads one halo slice on each side (what the 3x3x3 conv2 needs), so only a tile of
    the normalised input and of the 128-channel bottleneck exists at a time; the halo output
    slices, which the tile's own zero padding gets wrong, are dropped.
    """
    depth, growth = buf.shape[2], layer.conv2.out_channels
    for d0 in range(0, depth, rows):
        d1 = min(d0 + rows, depth)
        lo, hi = max(d0 - 1, 0), min(d1 + 1, depth)
        with partial_rows(layer.conv1, d0 - lo, d1 - lo, depth):
            bottleneck = layer.conv1(bn_relu(layer.norm1, buf[:, :c, lo:hi]))
        with partial_rows(layer.conv2, d0 - lo, d1 - lo, depth):
            out = layer.conv2(bn_relu(layer.norm2, bottleneck, inplace=True))
        del bottleneck
        buf[:, c : c + growth, d0:d1] = out[:, :, d0 - lo : d1 - lo]
        del out


def inflate_densenet121(weights: str = "auto", mode: str = "mean", seed: int = 0, progress: bool = False) -> DenseNet3d:
    """Build the 3D network once: load 2D DenseNet-121 weights, inflate, collapse conv0 to 1 channel.

    Returns a :class:`DenseNet3d` in eval mode on the CPU with ``.inflation`` and
    ``.weights_info`` set. Reuse it for every region and every scan.
    """
    if mode not in INFLATION_MODES:
        raise InputError(f"--inflation: expected one of {', '.join(INFLATION_MODES)}, got {mode!r}")
    model2d, info = load_densenet121_2d(weights, seed, progress)
    features = inflate_module(model2d.features, mode)
    features.conv0 = collapse_rgb(features.conv0)
    net = DenseNet3d(OrderedDict(features.named_children()))
    net.inflation, net.weights_info = mode, info
    return net.eval().requires_grad_(False)


# ----------------------------------------------------------------------------- shapes


@dataclass(frozen=True)
class ConvShape:
    """One Conv3d layer's geometry for a given input size."""

    name: str
    in_channels: int
    out_channels: int
    kernel: int
    groups: int
    out_size: tuple[int, int, int]  #: output (d, h, w) voxels

    @property
    def flops(self) -> int:
        """2 x C_in/groups x k^3 x C_out x output voxels (multiply and add counted separately)."""
        d, h, w = self.out_size
        return 2 * self.in_channels // self.groups * self.kernel**3 * self.out_channels * d * h * w


def _out(n: int, k: int, s: int, p: int, dil: int = 1, ceil: bool = False) -> int:
    num = n + 2 * p - dil * (k - 1) - 1
    return (-(-num // s) if ceil else num // s) + 1


def conv_shapes(model: nn.Module, size: tuple[int, int, int]) -> list[ConvShape]:
    """Geometry of every Conv3d for an input of ``size`` (d, h, w) voxels, without running anything.

    Follows the modules in registration order, which is execution order for DenseNet
    (every conv/pool changes the spatial size of everything after it).
    """
    cur = tuple(size)
    out: list[ConvShape] = []
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv3d, nn.MaxPool3d, nn.AvgPool3d)):
            k, s, p = (_cube(getattr(m, a), a) for a in ("kernel_size", "stride", "padding"))
            dil = _cube(m.dilation, "dilation") if hasattr(m, "dilation") else (1, 1, 1)
            cur = tuple(_out(n, k[i], s[i], p[i], dil[i], getattr(m, "ceil_mode", False)) for i, n in enumerate(cur))
            if min(cur) < 1:
                raise ValueError(f"input {tuple(size)} is too small for the network (empty output at {name})")
            if isinstance(m, nn.Conv3d):
                out.append(ConvShape(name, m.in_channels, m.out_channels, k[0], m.groups, cur))  # type: ignore[arg-type]
    return out


def min_input_size(model: nn.Module) -> int:
    """Smallest edge (voxels) a cubic input may have for every layer to produce output."""
    n = 1
    while True:
        try:
            conv_shapes(model, (n, n, n))
            return n
        except ValueError:
            n += 1


def versions() -> dict[str, str]:
    """torch and torchvision versions (recorded in the provenance)."""
    return {"torch": torch.__version__, "torchvision": torchvision.__version__}


# ----------------------------------------------------------------------------- 2D check


@dataclass(frozen=True)
class InflationCheck:
    """The inflated network against torchvision's 2D DenseNet-121 on a depth-constant volume.

    Per Conv layer (execution order): cosine and relative L2 error between the 3D layer's
    output averaged over (d, h, w) and the 2D layer's output averaged over (h, w), the 2D
    network seeing the same image as R = G = B. ``conv0_interior_rel_error`` compares conv0
    slice by slice on the depth slices whose kernel does not reach the zero-padded depth border.
    """

    mode: str
    weights: str
    volume_shape: tuple[int, int, int]  #: (d, h, w) voxels of the depth-constant volume
    layer_names: list[str]
    cosine: list[float]
    rel_error: list[float]
    conv0_interior_rel_error: float

    @property
    def min_cosine(self) -> float:
        return min(self.cosine)

    @property
    def max_rel_error(self) -> float:
        return max(self.rel_error)

    def summary(self) -> str:
        worst = self.layer_names[self.rel_error.index(self.max_rel_error)]
        return (
            f"2D vs 3D ({self.mode} inflation, {self.weights}) on a depth-constant volume "
            f"{'x'.join(map(str, self.volume_shape))} (d x h x w voxels):\n"
            f"  conv0, interior depth slices: relative error {self.conv0_interior_rel_error:.2e}\n"
            f"  pooled features, all {len(self.layer_names)} conv layers: min cosine {self.min_cosine:.6f}, "
            f"max relative error {self.max_rel_error:.2e} ({worst})\n"
            f"  last conv ({self.layer_names[-1]}): cosine {self.cosine[-1]:.6f}"
        )


def _model_2d_like(net: DenseNet3d) -> nn.Module:
    """torchvision's 2D DenseNet-121 with the weights ``net`` was inflated from (per its ``weights_info``)."""
    info = net.weights_info
    if info is None:
        raise ValueError("the network has no weights_info: cannot rebuild its 2D original")
    source = {"random": "random", "imagenet": "imagenet", "file": info.path}[info.source]
    model2d, _ = load_densenet121_2d(source or "random", info.seed or 0)
    return model2d


def check_against_2d(net: DenseNet3d, image: Any = None, depth: int = 64, size: int = 64) -> InflationCheck:
    """Run ``net`` on ``image`` repeated ``depth`` times along d and torchvision's 2D network on ``image``.

    ``image``: a 2D (h, w) array (e.g. an axial slice of a normalised crop); its central
    ``size`` x ``size`` patch is used (zero-padded if smaller). None = a seeded N(0, 1) image.
    Runs on the CPU in float32 (a copy of the weights when ``net`` lives on another device).
    ``center`` inflation should agree at every layer up to float rounding; ``mean`` agrees on
    interior slices, while the zero padding at the two depth borders shifts the pooled features.
    """
    import numpy as np

    from .extract import PooledHooks

    if image is None:
        image = np.random.default_rng(0).standard_normal((size, size))
    img = np.asarray(image, dtype=np.float32)
    if img.ndim != 2:
        raise ValueError(f"image must be 2D (h, w), got shape {img.shape}")
    top = [max((n - size) // 2, 0) for n in img.shape]
    img = img[top[0] : top[0] + size, top[1] : top[1] + size]
    img = np.pad(img, [(0, size - n) for n in img.shape])
    model2d = _model_2d_like(net)
    if next(net.parameters()).device.type != "cpu":
        cpu = inflate_densenet121("random", net.inflation)
        cpu.load_state_dict({k: v.detach().to("cpu", torch.float32) for k, v in net.state_dict().items()})
        cpu.weights_info = net.weights_info
        net = cpu
    x2 = torch.from_numpy(img)[None, None]
    x3 = x2[:, :, None].expand(1, 1, depth, size, size).contiguous()
    pooled2: list[torch.Tensor] = []
    handles = [
        m.register_forward_hook(lambda _m, _i, out: pooled2.append(out.float().mean(dim=(2, 3))[0]))
        for m in model2d.features.modules()
        if isinstance(m, nn.Conv2d)
    ]
    try:
        with torch.inference_mode():
            model2d.features(x2.expand(1, 3, size, size))
            with PooledHooks(net) as hooks:
                net(x3)
            pooled3 = [p[0].float() for p in hooks.pooled]
            names = list(hooks.names)
            c0_3d = net.conv0(x3)[0]
            c0_2d = model2d.features.conv0(x2.expand(1, 3, size, size))[0]
    finally:
        for h in handles:
            h.remove()
    k, s, p = net.conv0.kernel_size[0], net.conv0.stride[0], net.conv0.padding[0]
    interior = [j for j in range(c0_3d.shape[1]) if s * j - p >= 0 and s * j - p + k <= depth]
    c0_err = float((c0_3d[:, interior] - c0_2d[:, None]).norm() / (c0_2d.norm() * len(interior) ** 0.5).clamp_min(1e-12))
    cos, rel = [], []
    for a, b in zip(pooled3, pooled2):
        a64, b64 = a.double(), b.double()
        cos.append(float(a64 @ b64 / (a64.norm() * b64.norm()).clamp_min(1e-300)))
        rel.append(float((a64 - b64).norm() / b64.norm().clamp_min(1e-300)))
    info = net.weights_info
    return InflationCheck(net.inflation, info.source if info else "?", (depth, size, size), names, cos, rel, c0_err)
