"""Hooked extraction: every Conv3d seen once, in order, pooled exactly as torch's mean would."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cosine as scipy_cosine
from torch import nn

from helpers import extract, io, regions, similarity

EXPECTED_COLUMNS = {
    "layer_1": "denseblock4.denselayer16.conv2",
    "layer_2": "denseblock4.denselayer15.conv2",
    "layer_3": "denseblock4.denselayer14.conv2",
}


@pytest.fixture(scope="module")
def phantom_features(phantom_files, cpu_model):
    scan = io.load_scan(*phantom_files)
    crops = regions.crop_regions(scan, min_size=29)
    return crops, extract.extract_features(cpu_model, crops, progress=False)


def test_hooks_see_all_120_conv3d_layers_in_execution_order(phantom_features, random_net):
    _, feats = phantom_features
    assert len(feats.layer_names) == 120
    assert feats.layer_names == random_net.conv_names
    assert feats.layer_names[:4] == [
        "conv0", "denseblock1.denselayer1.conv1", "denseblock1.denselayer1.conv2", "denseblock1.denselayer2.conv1"
    ]  # fmt: skip
    assert similarity.select_layers(feats.layer_names) == EXPECTED_COLUMNS
    sizes = [len(v) for v in feats.vectors["tibia"]]
    convs = [m for m in random_net.modules() if isinstance(m, nn.Conv3d)]
    assert sizes == [m.out_channels for m in convs]


def test_pooled_vectors_equal_the_mean_of_the_full_activation(random_net):
    """Oracle: keep the full output of a few layers with a separate hook and take torch's mean."""
    gen = torch.Generator().manual_seed(0)
    volume = torch.randn(1, 1, 30, 34, 31, generator=gen)
    kept: dict[str, torch.Tensor] = {}
    names = ["conv0", "denseblock2.denselayer5.conv1", "transition3.conv", "denseblock4.denselayer16.conv2"]
    modules = dict(random_net.named_modules())
    handles = [modules[n].register_forward_hook(lambda _m, _i, o, n=n: kept.__setitem__(n, o.clone())) for n in names]
    try:
        with extract.PooledHooks(random_net) as hooks, torch.inference_mode():
            random_net(volume)
    finally:
        for h in handles:
            h.remove()
    for n in names:
        got = hooks.pooled[hooks.names.index(n)][0]
        torch.testing.assert_close(got, kept[n].double().mean(dim=(2, 3, 4))[0].float(), rtol=1e-5, atol=1e-6)
    # the hooks are gone after the context: a second forward adds nothing
    before = len(hooks.pooled)
    with torch.inference_mode():
        random_net(volume)
    assert len(hooks.pooled) == before


def test_columns_differ_and_match_a_scipy_cosine(phantom_features):
    _, feats = phantom_features
    table = similarity.compare(feats)
    assert table.pairs == ["tibia_femur", "tibia_background", "femur_background"]
    assert table.column_layers == list(EXPECTED_COLUMNS.values())
    for i, (a, b) in enumerate(similarity.PAIRS):
        for j, layer in enumerate(table.column_layers):
            expected = 1.0 - scipy_cosine(feats.vector(a, layer).astype(np.float64), feats.vector(b, layer).astype(np.float64))
            assert table.values[i, j] == pytest.approx(expected, abs=1e-12)
    # three different depths give three different columns
    assert len({tuple(np.round(table.values[:, j], 6)) for j in range(3)}) == 3
    assert table.profile.shape == (3, 120)
    np.testing.assert_array_equal(table.profile[:, [119, 117, 115]], table.values)


def test_bucketing_pools_only_the_valid_region(cpu_model, random_net):
    """A crop that already fits the bucket is unchanged; a padded one pools the unpadded part."""
    rng = np.random.default_rng(0)
    arr = rng.normal(size=(32, 64, 32)).astype(np.float32)
    region = regions.Region("tibia", 1, ((0, 32), (0, 64), (0, 32)), arr, arr.shape, 1)
    plain = extract.extract_features(cpu_model, [region], progress=False)
    bucketed_model = extract.PreparedModel(cpu_model.model, cpu_model.device, "fp32", True, 32)
    same = extract.extract_features(bucketed_model, [region], progress=False)
    for a, b in zip(plain.vectors["tibia"], same.vectors["tibia"]):
        np.testing.assert_array_equal(a, b)
    small = regions.Region("tibia", 1, ((0, 30), (0, 50), (0, 31)), arr[:30, :50, :31].copy(), (30, 50, 31), 1)
    feats = extract.extract_features(bucketed_model, [small], progress=False)
    assert feats.input_shapes["tibia"] == (32, 64, 32)
    # conv0 (stride 2) pooled over ceil(valid/2) voxels of the padded input's output
    x = torch.from_numpy(np.pad(small.array, [(0, 2), (0, 14), (0, 1)]))[None, None]
    with torch.inference_mode():
        out = random_net.conv0(x.contiguous(memory_format=torch.channels_last_3d))
    expected = out[0, :, :15, :25, :16].mean(dim=(1, 2, 3)).numpy()
    np.testing.assert_allclose(feats.vectors["tibia"][0], expected, rtol=1e-5, atol=1e-6)


def test_named_device_that_is_missing_is_an_error_not_a_fallback():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    from helpers.errors import InputError

    with pytest.raises(InputError, match="CUDA is not available"):
        extract.resolve_device("cuda")
    assert extract.resolve_device("auto").type in ("cpu", "xla")
    with pytest.raises(InputError):
        extract.resolve_device("gpu")


@pytest.mark.parametrize("shape", [(70, 75, 66), (37, 41, 45)])
def test_depth_tiling_changes_memory_not_results(random_net, shape):
    """Tiles of a few slices (stem and dense layers) give the same pooled vectors as one piece."""
    arr = np.random.default_rng(4).normal(size=shape).astype(np.float32)
    region = regions.Region("tibia", 1, tuple((0, n) for n in shape), arr, shape, 1)
    whole = extract.PreparedModel(random_net, torch.device("cpu"), "fp32", True, None, tile_voxels=None)
    tiles = extract.PreparedModel(random_net, torch.device("cpu"), "fp32", True, None, tile_voxels=2000)
    plain = extract.extract_features(whole, [region], progress=False)
    calls: list[str] = []
    handle = random_net.conv0.register_forward_hook(lambda *_: calls.append("conv0"))
    try:
        tiled = extract.extract_features(tiles, [region], progress=True)  # every stem / block-1,2 layer in tiles
    finally:
        handle.remove()
    assert len(calls) > 1, "the stem was not tiled"
    assert random_net.tile_voxels is None, "the placement's tiling leaked onto the shared network"
    assert tiled.layer_names == plain.layer_names
    for a, b in zip(tiled.vectors["tibia"], plain.vectors["tibia"]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_preparing_a_network_twice_leaves_the_first_placement_unchanged(random_net):
    cpu = extract.prepare_model(random_net, "cpu", "fp32")
    bucketed = extract.prepare_model(random_net, "cpu", "fp32", bucket=32)
    assert cpu.tile_voxels == extract.TILE_VOXELS and bucketed.tile_voxels is None
    assert cpu.model is bucketed.model and random_net.tile_voxels is None
