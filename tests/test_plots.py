"""Figures: orientation and aspect of the views, colours and labels, the profile's marks, saving, the browser."""

from __future__ import annotations

from io import BytesIO

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.colors import to_rgb

from helpers import io, plots, regions
from helpers.similarity import SimilarityTable, select_layers

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def scan(phantom_files) -> io.Scan:
    return io.load_scan(*phantom_files)


@pytest.fixture(scope="module")
def labels() -> dict[str, int]:
    return regions.parse_labels(None)


@pytest.fixture(scope="module")
def crops(scan, labels):
    return regions.crop_regions(scan, labels, pad=5, min_size=29)


@pytest.fixture(scope="module")
def table(random_net) -> SimilarityTable:
    """A table over the real 120 layer names with known values, negative ones included."""
    names = random_net.conv_names
    rng = np.random.default_rng(3)
    profile = np.clip(rng.normal(0.2, 0.5, size=(3, len(names))), -1, 1)
    chosen = select_layers(names)
    idx = [names.index(chosen[c]) for c in ("layer_1", "layer_2", "layer_3")]
    return SimilarityTable(["tibia_femur", "tibia_background", "femur_background"], ["layer_1", "layer_2", "layer_3"],
                           [chosen[c] for c in ("layer_1", "layer_2", "layer_3")], profile[:, idx], list(names), profile)  # fmt: skip


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _pixels(fig, ax) -> np.ndarray:
    """RGB pixels (rows top -> bottom) inside ``ax`` after drawing ``fig``."""
    fig.canvas.draw()
    rgba = np.asarray(fig.canvas.buffer_rgba())
    box = ax.get_window_extent()
    height = rgba.shape[0]
    return rgba[int(height - box.y1) : int(height - box.y0), int(box.x0) : int(box.x1), :3].astype(float)


def _rows_of(pixels: np.ndarray, colour: str, tol: float = 40.0) -> np.ndarray:
    target = np.array(to_rgb(colour)) * 255
    hit = np.linalg.norm(pixels - target, axis=-1) < tol
    return np.nonzero(hit)[0]


# ----------------------------------------------------------------------------- views


def test_views_put_superior_at_the_top_and_keep_physical_aspect():
    vol = np.zeros((10, 20, 30), dtype=np.float32)  # d, h, w
    vol[9, 0, 0] = 1  # most superior, most anterior, patient's right
    spacing = (3.0, 1.0, 0.5)
    ax_v, co, sa = (plots.view(vol, spacing, a, i) for a, i in (("axial", 9), ("coronal", 0), ("sagittal", 0)))
    assert ax_v.image.shape == (20, 30) and ax_v.origin == "upper" and ax_v.image[0, 0] == 1  # anterior top, right left
    assert co.image.shape == (10, 30) and co.origin == "lower" and co.image[-1, 0] == 1  # last row (superior) drawn on top
    assert sa.image.shape == (10, 20) and sa.origin == "lower" and sa.image[-1, 0] == 1  # anterior on the left
    assert co.extent == (0.0, 15.0, 0.0, 30.0)  # w 30 x 0.5 mm, d 10 x 3 mm
    assert sa.extent == (0.0, 20.0, 0.0, 30.0)
    assert ax_v.extent == (0.0, 15.0, 20.0, 0.0)
    with pytest.raises(ValueError):
        plots.view(vol, spacing, "oblique", 0)


def test_overlay_shows_tibia_below_femur_in_coronal_and_sagittal_views(scan, labels):
    fig = plots.overlay_views(scan, labels)
    axes = fig.axes
    assert len(axes) == 6
    legend_text = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend_text == ["tibia (label 1)", "femur (label 2)"]
    for ax in axes[1:3] + axes[4:6]:  # coronal and sagittal panels of both rows
        px = _pixels(fig, ax)
        tibia, femur = _rows_of(px, plots.COLOURS["tibia"]), _rows_of(px, plots.COLOURS["femur"])
        assert tibia.size > 50 and femur.size > 50, ax.get_title()
        assert np.median(tibia) > np.median(femur), f"{ax.get_title()}: tibia must be drawn below the femur"
        assert ax.get_aspect() == 1.0  # equal mm per pixel on both axes: physical aspect from the spacing


def test_overlay_slices_go_through_each_bone(scan, labels):
    for bone in plots.BONES:
        for axis in plots.AXES:
            index = plots.largest_section(scan.mask, labels[bone], axis)
            section = plots.view(scan.mask, scan.spacing, axis, index).image
            assert np.count_nonzero(section == labels[bone]) > 0


def test_crop_boxes_match_the_regions(scan, crops, labels):
    fig = plots.crop_boxes(scan, crops, labels)
    coronal = fig.axes[1]
    rects = [p for p in coronal.patches if isinstance(p, matplotlib.patches.Rectangle)]
    sd, _, sw = scan.spacing
    expected = {((r.box[2][0] * sw, r.box[0][0] * sd), (r.box[2][1] - r.box[2][0]) * sw, (r.box[0][1] - r.box[0][0]) * sd) for r in crops}
    assert {(tuple(p.get_xy()), p.get_width(), p.get_height()) for p in rects} == expected
    assert len(fig.legends[0].get_texts()) == 3


def test_region_inputs_draw_each_network_input(crops, scan):
    fig = plots.region_inputs(crops, scan.spacing)
    images = [ax.images[0] for ax in fig.axes if ax.images]
    assert len(images) == 3
    for im, region in zip(images, crops):
        np.testing.assert_array_equal(im.get_array(), region.array[:, region.array.shape[1] // 2, :])


# ----------------------------------------------------------------------------- similarity


def test_heatmap_annotates_values_centred_on_zero_with_readable_labels(table):
    fig = plots.similarity_heatmap(table)
    ax = fig.axes[0]
    norm = ax.images[0].norm
    assert (norm.vmin, norm.vcenter, norm.vmax) == (-1.0, 0.0, 1.0)
    assert ax.images[0].get_cmap().name == "RdBu_r"
    texts = sorted(t.get_text() for t in ax.texts)
    assert texts == sorted(f"{v:.4f}" for v in table.values.ravel())
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for labels_ in (ax.get_xticklabels(), ax.get_yticklabels()):
        boxes = [t.get_window_extent(renderer) for t in labels_]
        assert all(t.get_fontsize() >= 9 for t in labels_)
        assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1 :]), "tick labels overlap"
    fig_box = fig.bbox
    for t in ax.get_yticklabels() + ax.get_xticklabels():
        box = t.get_window_extent(renderer)
        assert box.x0 >= fig_box.x0 - 1 and box.x1 <= fig_box.x1 + 1, f"label {t.get_text()!r} is cut off"
    assert [t.get_text() for t in ax.get_yticklabels()] == ["tibia \u2194 femur", "tibia \u2194 background", "femur \u2194 background"]
    assert "block4.layer16.conv2" in ax.get_xticklabels()[0].get_text()


def test_profile_draws_every_layer_and_marks_blocks_and_selected_layers(table):
    fig = plots.similarity_profile(table)
    ax = fig.axes[0]
    lines = [line for line in ax.get_lines() if len(line.get_xdata()) == len(table.layer_names)]
    assert len(lines) == 3
    for line, row in zip(lines, table.profile):
        np.testing.assert_allclose(line.get_ydata(), row)
    spans = [p for p in ax.patches if isinstance(p, matplotlib.patches.Rectangle)]
    assert len(spans) == 4  # the four dense blocks
    marked = sorted({float(x) for coll in ax.collections for x, _ in coll.get_offsets()})
    assert marked == [116.0, 118.0, 120.0]  # 5th-last, 3rd-last and last of 120 layers (1-based)
    assert {t.get_text() for t in ax.texts} >= {f"dense block {i}" for i in range(1, 5)}


# ----------------------------------------------------------------------------- browser and saving


def test_slice_browser_renders_every_axis_headless(scan, labels):
    browser = plots.slice_browser(scan, labels)  # no IPython kernel here: builds, displays nothing, never fails
    assert browser.handle is None
    images = {}
    for axis in plots.AXES:
        png = browser.render(axis=axis, index=scan.shape[plots.VIEW_AXIS[axis]] // 2)
        assert png.startswith(PNG_SIGNATURE)
        images[axis] = plt.imread(BytesIO(png))
        assert images[axis].shape[0] > 300 and images[axis].std() > 0.05
    bare = plt.imread(BytesIO(browser.render(opacity=0.0)))
    full = plt.imread(BytesIO(browser.render(opacity=1.0)))
    assert np.abs(bare - full).max() > 0.3, "the overlay opacity must change the image"
    assert browser.render(index=10_000).startswith(PNG_SIGNATURE)  # out-of-range slice is clipped, not an error


def test_slice_browser_draws_once_per_control_change(scan, labels, monkeypatch):
    """Changing the axis moves the slice slider (maximum, then the centre): still one image per change."""
    pytest.importorskip("ipywidgets")
    monkeypatch.setattr("IPython.display.display", lambda *a, **k: None)
    browser = plots.SliceBrowser(scan, labels, axis="coronal").show()
    draws = []
    monkeypatch.setattr(browser, "render", lambda *a, **k: draws.append(dict(browser.state)) or PNG_SIGNATURE)

    class Handle:
        def update(self, _image):
            pass

    browser.handle = Handle()
    axis, index, opacity = browser.controls.children
    for view_, expected_max in (("axial", scan.shape[0] - 1), ("sagittal", scan.shape[2] - 1), ("coronal", scan.shape[1] - 1)):
        draws.clear()
        axis.value = view_
        assert len(draws) == 1, draws
        assert index.max == expected_max
        assert draws[0] == {"axis": view_, "index": browser.centre[plots.VIEW_AXIS[view_]], "opacity": browser.state["opacity"]}
    draws.clear()
    index.value = 3
    opacity.value = 0.8
    assert [(d["index"], d["opacity"]) for d in draws] == [(3, 0.35), (3, 0.8)]


def test_heatmap_and_window_use_the_pipelines_definitions(table):
    from helpers.similarity import FROM_END

    assert [plots.from_end(k) for k in (1, 2, 3, 5, 11, 21)] == ["last", "2nd-last", "3rd-last", "5th-last", "11th-last", "21st-last"]
    fig = plots.similarity_heatmap(table)
    ticks = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert [t.split("\n")[0] for t in ticks] == [f"{c} ({plots.from_end(FROM_END[c])} conv)" for c in table.columns]
    assert plots._window() == {"vmin": regions.DEFAULT_WINDOW[0] - regions.DEFAULT_WINDOW[1] / 2,
                               "vmax": regions.DEFAULT_WINDOW[0] + regions.DEFAULT_WINDOW[1] / 2}  # fmt: skip
    assert not hasattr(plots, "BONE_WINDOW")


def test_save_figures_writes_png_files(tmp_path, table):
    figures = {"similarity_heatmap": plots.similarity_heatmap(table), "similarity_profile": plots.similarity_profile(table)}
    paths = plots.save_figures(figures, tmp_path / "figs")
    assert set(paths) == set(figures)
    for path in paths.values():
        assert path.read_bytes().startswith(PNG_SIGNATURE)
        image = plt.imread(path)
        assert image.shape[0] >= 400 and image.shape[1] >= 800 and image.std() > 0.05
    assert sorted(p.name for p in (tmp_path / "figs").iterdir()) == ["similarity_heatmap.png", "similarity_profile.png"]


def test_text_summaries_state_units_and_values(scan, labels, crops, table):
    text = plots.scan_summary(scan, labels)
    assert "64 x 96 x 96" in text and "3 x 2 x 2 mm (d, h, w)" in text and "tibia=1" in text and "mL" in text
    rows = plots.region_summary(crops).splitlines()
    assert [r.split()[0] for r in rows] == ["tibia", "femur", "background"]
    assert "0:64 0:96 0:96" in rows[2]
    assert not hasattr(plots, "results_table"), "the results table has one formatter: similarity.format_table"
