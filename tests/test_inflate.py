"""Inflation checked against torchvision's own 2D DenseNet-121 (an oracle nobody here wrote)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from helpers import inflate
from helpers.errors import InputError
from helpers.extract import PooledHooks


def _pooled_2d(model2d: nn.Module, image: torch.Tensor) -> list[torch.Tensor]:
    """Global-average-pooled output of every Conv2d of torchvision's model on a grey image fed as RGB."""
    pooled: list[torch.Tensor] = []
    handles = [
        m.register_forward_hook(lambda _m, _i, out: pooled.append(out.mean(dim=(2, 3))[0]))
        for m in model2d.features.modules()
        if isinstance(m, nn.Conv2d)
    ]
    with torch.inference_mode():
        model2d.features(image.expand(1, 3, *image.shape[-2:]))
    for h in handles:
        h.remove()
    return pooled


def _pooled_3d(net: nn.Module, volume: torch.Tensor, reference: bool = False) -> list[torch.Tensor]:
    with PooledHooks(net) as hooks, torch.inference_mode():
        (net.forward_reference if reference else net)(volume)
    return [p[0] for p in hooks.pooled]


@pytest.fixture(scope="module")
def model2d(random_checkpoint) -> nn.Module:
    model, info = inflate.load_densenet121_2d(str(random_checkpoint))
    assert info.source == "file"
    return model


@pytest.fixture(scope="module")
def grey_image() -> torch.Tensor:
    gen = torch.Generator().manual_seed(7)
    return torch.randn(1, 1, 64, 72, generator=gen)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def test_center_inflation_reproduces_2d_network_at_every_conv_layer(model2d, grey_image, random_checkpoint):
    net = inflate.inflate_densenet121(str(random_checkpoint), "center")
    volume = grey_image.unsqueeze(2).expand(1, 1, 40, 64, 72).contiguous()  # depth-constant
    p2, p3 = _pooled_2d(model2d, grey_image), _pooled_3d(net, volume)
    assert len(p2) == len(p3) == 120
    errors = [_rel_err(a, b) for a, b in zip(p3, p2)]
    assert max(errors) <= 1e-5, f"worst layer {net.conv_names[int(np.argmax(errors))]}: {max(errors):.2e}"


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last_3d])
def test_memory_efficient_forward_equals_torchvision_forward(random_net, fmt):
    gen = torch.Generator().manual_seed(3)
    volume = torch.randn(1, 1, 33, 40, 36, generator=gen).contiguous(memory_format=fmt)
    fast, ref = _pooled_3d(random_net, volume), _pooled_3d(random_net, volume, reference=True)
    assert max(_rel_err(a, b) for a, b in zip(fast, ref)) <= 1e-5
    with torch.inference_mode():
        out, expected = random_net(volume), random_net.forward_reference(volume)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert expected.abs().max() > 1e-2  # a non-trivial output


@pytest.mark.parametrize("shape", [(1, 24, 9, 12, 15), (1, 7, 4, 5, 6)])
def test_avg_pool_fast_path_equals_avgpool3d(shape):
    pool = nn.AvgPool3d(2, 2)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).contiguous(memory_format=torch.channels_last_3d)
    with torch.inference_mode():
        out = inflate.avg_pool(pool, x)
        torch.testing.assert_close(out, pool(x.contiguous()), rtol=1e-6, atol=1e-6)
    assert out.is_contiguous(memory_format=torch.channels_last_3d)


def test_conv3d_uses_onednn_where_pytorch_would_pick_its_slow_path():
    conv = inflate.Conv3d(16, 8, 3, padding=1, bias=False)  # N*C*D*H = 16*4*5 < 20480
    x = torch.randn(1, 16, 4, 5, 6, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode(), torch.profiler.profile() as prof:
        out = conv(x)
    ops = {e.key for e in prof.key_averages()}
    assert "aten::mkldnn_convolution" in ops and "aten::slow_conv3d_forward" not in ops
    torch.testing.assert_close(out, nn.functional.conv3d(x, conv.weight, None, 1, 1), rtol=1e-5, atol=1e-5)


def test_bn_relu_equals_batchnorm_then_relu(random_net):
    bn = random_net.denseblock2.denselayer4.norm1
    assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))  # BN is not an identity here
    gen = torch.Generator().manual_seed(5)
    buf = torch.randn(1, bn.num_features + 32, 5, 6, 7, generator=gen).contiguous(memory_format=torch.channels_last_3d)
    view = buf[:, : bn.num_features]
    with torch.inference_mode():
        expected = torch.relu(bn(view))
        torch.testing.assert_close(inflate.bn_relu(bn, view), expected, rtol=1e-5, atol=1e-6)
        copy = view.clone()
        assert inflate.bn_relu(bn, copy, inplace=True).data_ptr() == copy.data_ptr()
        torch.testing.assert_close(copy, expected, rtol=1e-5, atol=1e-6)


def test_mean_inflation_conv0_matches_2d_on_interior_slices(model2d, grey_image, random_net):
    net = random_net
    depth = 20
    volume = grey_image.unsqueeze(2).expand(1, 1, depth, 64, 72).contiguous()
    with torch.inference_mode():
        out3 = net.conv0(volume)[0]  # (64, d', h', w')
        out2 = model2d.features.conv0(grey_image.expand(1, 3, 64, 72))[0]
    # output slice j sees input slices 2j-3 .. 2j+3: interior when all are inside the volume
    interior = [j for j in range(out3.shape[1]) if 2 * j - 3 >= 0 and 2 * j + 3 <= depth - 1]
    assert len(interior) >= 3
    for j in interior:
        torch.testing.assert_close(out3[:, j], out2, rtol=1e-5, atol=1e-5)
    # ... and the border slices do not (zero padding in depth): the check can fail
    assert not torch.allclose(out3[:, 0], out2, rtol=1e-3, atol=1e-3)


def test_conv0_collapse_sums_rgb_kernels():
    gen = torch.Generator().manual_seed(11)
    conv2d = nn.Conv2d(3, 8, 7, stride=2, padding=3, bias=False)
    with torch.no_grad():
        conv2d.weight.copy_(torch.randn(conv2d.weight.shape, generator=gen))
    conv3d = inflate.inflate_conv(conv2d, "mean")
    grey = inflate.collapse_rgb(conv3d)
    assert grey.in_channels == 1 and grey.weight.shape[1] == 1
    x = torch.randn(1, 1, 12, 14, 16, generator=gen)
    with torch.no_grad():
        rgb_out = conv3d(x.expand(1, 3, 12, 14, 16))
        grey_out = grey(x)
    torch.testing.assert_close(grey_out, rgb_out, rtol=1e-5, atol=1e-4)
    # the seed's mean of the kernels gives a third of the response
    with torch.no_grad():
        mean_out = nn.functional.conv3d(x, conv3d.weight.mean(1, keepdim=True), stride=2, padding=3)
    torch.testing.assert_close(mean_out * 3, rgb_out, rtol=1e-4, atol=1e-3)


def test_conv_and_pool_inflation_are_cubic_and_batchnorm_keeps_statistics():
    conv = inflate.inflate_conv(nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=True), "center")
    assert (conv.kernel_size, conv.stride, conv.padding) == ((3, 3, 3), (2, 2, 2), (1, 1, 1))
    assert conv.bias is not None
    assert torch.count_nonzero(conv.weight[:, :, [0, 2]]) == 0  # center mode: only the middle slice
    bn2 = nn.BatchNorm2d(5)
    with torch.no_grad():
        bn2.running_mean.uniform_(-1, 1)
        bn2.running_var.uniform_(0.5, 2)
        bn2.weight.uniform_(0.5, 2)
        bn2.bias.uniform_(-1, 1)
    bn3 = inflate.inflate_batchnorm(bn2)
    assert isinstance(bn3, nn.BatchNorm3d)
    for name in ("running_mean", "running_var", "weight", "bias"):
        assert torch.equal(getattr(bn3, name), getattr(bn2, name))
    assert bn3.eps == bn2.eps
    maxp = inflate.inflate_pool(nn.MaxPool2d(3, 2, 1))
    avgp = inflate.inflate_pool(nn.AvgPool2d(2, 2))
    assert isinstance(maxp, nn.MaxPool3d) and maxp.kernel_size == (3, 3, 3) and maxp.padding == (1, 1, 1)
    assert isinstance(avgp, nn.AvgPool3d) and avgp.kernel_size == (2, 2, 2) and avgp.stride == (2, 2, 2)


def test_inflated_network_structure(random_net):
    assert not any(isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d, nn.AvgPool2d)) for m in random_net.modules())
    assert random_net.conv0.in_channels == 1
    assert len(random_net.conv_names) == 120
    assert random_net.conv_names[0] == "conv0"
    assert random_net.conv_names[-1] == "denseblock4.denselayer16.conv2"
    assert not hasattr(random_net, "classifier")


def test_min_input_size_is_the_smallest_that_runs(random_net):
    n = inflate.min_input_size(random_net)
    assert n == 29  # DenseNet-121: /4 stem, then three stride-2 average pools
    with torch.inference_mode():
        random_net(torch.zeros(1, 1, n, n, n))
        with pytest.raises(RuntimeError):
            random_net(torch.zeros(1, 1, n - 1, n, n))


def test_conv_shapes_match_the_real_forward(random_net):
    size = (33, 45, 40)
    shapes = inflate.conv_shapes(random_net, size)
    seen: list[tuple[int, ...]] = []
    handles = [m.register_forward_hook(lambda _m, _i, o: seen.append(tuple(o.shape[2:])))
               for m in random_net.modules() if isinstance(m, nn.Conv3d)]  # fmt: skip
    with torch.inference_mode():
        random_net(torch.zeros(1, 1, *size))
    for h in handles:
        h.remove()
    assert [s.out_size for s in shapes] == seen
    conv0 = shapes[0]
    assert conv0.flops == 2 * 1 * 7**3 * 64 * int(np.prod(conv0.out_size))


def _torchvision_checkpoint(path, seed: int, legacy: bool) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    state = torchvision.models.densenet121(weights=None).state_dict()
    if legacy:  # torchvision's original key names: denselayer1.norm.1.weight
        state = {
            k.replace(".norm1.", ".norm.1.").replace(".conv1.", ".conv.1.").replace(".norm2.", ".norm.2.")
            .replace(".conv2.", ".conv.2."): v
            for k, v in state.items()
        }  # fmt: skip
    torch.save(state, path)
    return state


@pytest.mark.parametrize("legacy", [False, True])
def test_local_checkpoint_loads_weights_only(tmp_path, legacy):
    path = tmp_path / "densenet121.pth"
    state = _torchvision_checkpoint(path, seed=123, legacy=legacy)
    net = inflate.inflate_densenet121(str(path), "center")
    assert net.weights_info.source == "file" and not net.weights_info.is_random
    key = "features.denseblock2.denselayer3.conv.2.weight" if legacy else "features.denseblock2.denselayer3.conv2.weight"
    expected = state[key]
    torch.testing.assert_close(net.denseblock2.denselayer3.conv2.weight[:, :, 1], expected)
    torch.testing.assert_close(net.conv0.weight[:, 0, 3], state["features.conv0.weight"].sum(1))


def test_checkpoint_that_needs_unpickling_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": {"weight": torch.zeros(1)}, "extra": np.dtype("float64")}, path)
    with pytest.raises(InputError, match="evil.pth"):
        inflate.load_checkpoint(path)


def test_checkpoint_of_another_network_is_refused(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    with pytest.raises(InputError, match="not a DenseNet-121 checkpoint"):
        inflate.inflate_densenet121(str(path))


def test_imagenet_comes_from_torchvisions_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cache = inflate.imagenet_weights_path()
    cache.parent.mkdir(parents=True)
    state = _torchvision_checkpoint(cache, seed=5, legacy=True)  # the published file uses legacy keys
    net = inflate.inflate_densenet121("imagenet", "mean")
    assert net.weights_info.source == "imagenet" and net.weights_info.path == str(cache)
    torch.testing.assert_close(net.norm5.running_var, state["features.norm5.running_var"])


def test_imagenet_strict_fails_and_auto_falls_back_to_random(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(InputError, match="ImageNet weights unavailable"):
        inflate.inflate_densenet121("imagenet")
    net = inflate.inflate_densenet121("auto")
    assert net.weights_info.is_random
    assert "network unreachable" in net.weights_info.description


@pytest.mark.parametrize("size", [(20, 23, 18), (9, 12, 16)])
def test_space_to_depth_conv_equals_the_strided_conv(size):
    gen = torch.Generator().manual_seed(2)
    weight = torch.randn(16, 1, 7, 7, 7, generator=gen)
    x = torch.randn(1, 1, *size, generator=gen).contiguous(memory_format=torch.channels_last_3d)
    with torch.inference_mode():
        out = inflate.space_to_depth_conv(x, inflate.space_to_depth_weight(weight), None, (3, 3, 3))
        expected = nn.functional.conv3d(x, weight, None, 2, 3)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


def test_bf16_paths_agree_with_fp32(random_net):
    """CPU bf16 (space-to-depth conv0, cached bf16 weights, fused BN+ReLU, max pool kept in bf16)
    computes the fp32 function to bf16 accuracy, and stays in bf16 from conv0 to the end."""
    x = torch.randn(1, 1, 40, 48, 44, generator=torch.Generator().manual_seed(6)).contiguous(
        memory_format=torch.channels_last_3d
    )
    with torch.inference_mode():
        fp32 = _pooled_3d(random_net, x)
        dtypes: list[torch.dtype] = []
        handle = random_net.denseblock1.denselayer1.conv1.register_forward_hook(lambda _m, i, _o: dtypes.append(i[0].dtype))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = _pooled_3d(random_net, x)
        handle.remove()
    assert dtypes == [torch.bfloat16]
    for a, b in zip(bf16, fp32):
        assert nn.functional.cosine_similarity(a.float(), b, dim=0) > 0.999
