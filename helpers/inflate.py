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
import hashlib
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

from .errors import InputError

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


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


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
    info = WeightsInfo("imagenet", f"torchvision DenseNet121_Weights.IMAGENET1K_V1 ({url})", str(path), _sha256(path))
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
        raise InputError(f"{path}: not a loadable weights-only PyTorch checkpoint ({str(exc).splitlines()[0]})") from None
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
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
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
        info = WeightsInfo("file", f"local checkpoint {weights}", str(Path(weights).resolve()), _sha256(Path(weights)))
    return model.eval(), info


# ----------------------------------------------------------------------------- inflation


def _cube(value: int | tuple[int, ...], what: str) -> tuple[int, int, int]:
    if isinstance(value, int):
        return (value,) * 3
    if len(set(value)) != 1:
        raise ValueError(f"cannot inflate a non-square {what} {value}")
    return (value[0],) * 3


def inflate_conv(conv: nn.Conv2d, mode: str = "mean") -> nn.Conv3d:
    """Conv2d (k x k) -> Conv3d (k x k x k) with weights inflated by ``mode`` (``mean`` or ``center``)."""
    if mode not in INFLATION_MODES:
        raise InputError(f"--inflation: expected one of {', '.join(INFLATION_MODES)}, got {mode!r}")
    k = _cube(conv.kernel_size, "kernel")[0]
    if isinstance(conv.padding, str):
        raise ValueError("string padding is not supported")
    conv3d = nn.Conv3d(
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
    grey = nn.Conv3d(1, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                     bias=conv.bias is not None, device=conv.weight.device, dtype=conv.weight.dtype)  # fmt: skip
    with torch.no_grad():
        grey.weight.copy_(conv.weight.sum(dim=1, keepdim=True))
        if conv.bias is not None:
            grey.bias.copy_(conv.bias)
    return grey


class DenseNet3d(nn.Sequential):
    """The inflated DenseNet-121 ``features`` stack, input (N, 1, d, h, w), with layer names as in
    torchvision (``conv0``, ``denseblock1.denselayer1.conv1``, ..., ``norm5``).

    ``forward`` writes each dense block's layers into one pre-allocated buffer instead of
    re-concatenating the growing feature stack at every layer (torchvision's ``torch.cat``),
    computing exactly the same function; ``forward_reference`` is torchvision's own forward.
    """

    inflation: str = "mean"
    weights_info: WeightsInfo | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        for module in self:
            x = _dense_block_forward(module, x) if isinstance(module, _DenseBlock) else module(x)
        return x

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """torchvision's forward (``torch.cat`` per layer): the oracle for ``forward``."""
        return nn.Sequential.forward(self, x)

    @property
    def conv_names(self) -> list[str]:
        """Names of all Conv3d layers in execution order."""
        return [name for name, m in self.named_modules() if isinstance(m, nn.Conv3d)]


def _dense_block_forward(block: _DenseBlock, x: torch.Tensor) -> torch.Tensor:
    layers = list(block.values())
    growth = layers[0].conv2.out_channels
    c = x.shape[1]
    fmt = torch.channels_last_3d if x.is_contiguous(memory_format=torch.channels_last_3d) and c > 1 else torch.contiguous_format
    buf = torch.empty((x.shape[0], c + growth * len(layers), *x.shape[2:]), dtype=x.dtype, device=x.device, memory_format=fmt)
    buf[:, :c] = x
    del x
    for layer in layers:
        bottleneck = layer.conv1(layer.relu1(layer.norm1(buf[:, :c])))
        buf[:, c : c + growth] = layer.conv2(layer.relu2(layer.norm2(bottleneck)))
        del bottleneck
        c += growth
    return buf


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
