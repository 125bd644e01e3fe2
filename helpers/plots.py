"""Figures and short text summaries of a run: they draw what the stages produced, never recompute it.

Arrays are in the canonical frame of :mod:`helpers.io`: ``[d, h, w]`` with d inferior ->
superior, h anterior -> posterior, w patient right -> patient left; spacing in mm, (d, h, w).
Views are drawn in radiological convention with physical aspect (axes in mm):

* axial (a depth slice): anterior at the top, the patient's right on the image's left;
* coronal (fixed h): superior at the top, the patient's right on the image's left;
* sagittal (fixed w): superior at the top, anterior on the left.

CT is shown in the bone window of :data:`helpers.regions.DEFAULT_WINDOW` (level 400 HU, width 1800 HU). Tibia and femur have fixed,
colour-blind-safe colours (orange, blue) in every figure.
"""

from __future__ import annotations

import io as _io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import TwoSlopeNorm, to_rgba
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle

from .regions import DEFAULT_WINDOW

if TYPE_CHECKING:  # pragma: no cover - type hints only; plots never imports torch itself
    from .extract import Features, PreparedModel
    from .io import Scan
    from .regions import Region
    from .similarity import SimilarityTable

#: Colour of each region in every figure (Okabe-Ito orange and blue; grey for background).
COLOURS = {"tibia": "#E69F00", "femur": "#0072B2", "background": "#9A9A9A"}
#: Colour of each pair in the similarity profile.
PAIR_COLOURS = {"tibia_femur": "#009E73", "tibia_background": "#E69F00", "femur_background": "#0072B2"}
AXES = ("axial", "coronal", "sagittal")
#: Array axis fixed by each view.
VIEW_AXIS = {"axial": 0, "coronal": 1, "sagittal": 2}
#: Anatomical direction at the (left, right, top, bottom) edge of each view.
EDGE_LABELS = {"axial": ("R", "L", "A", "P"), "coronal": ("R", "L", "S", "I"), "sagittal": ("A", "P", "S", "I")}
_AXIS_TEXT = {
    "axial": ("w: right \u2192 left (mm)", "h: anterior \u2192 posterior (mm)"),
    "coronal": ("w: right \u2192 left (mm)", "d: inferior \u2192 superior (mm)"),
    "sagittal": ("h: anterior \u2192 posterior (mm)", "d: inferior \u2192 superior (mm)"),
}
BONES = ("tibia", "femur")
TIMES = "\u00d7"


# ----------------------------------------------------------------------------- views


@dataclass(frozen=True)
class View:
    """One 2D slice ready for ``imshow``: the array, its extent in mm and its origin."""

    name: str
    index: int
    image: np.ndarray
    extent: tuple[float, float, float, float]
    origin: str

    def show(self, ax: Any, data: np.ndarray | None = None, **kwargs: Any) -> Any:
        return ax.imshow(self.image if data is None else data, extent=self.extent, origin=self.origin,
                         interpolation="nearest", **kwargs)  # fmt: skip


def view(volume: np.ndarray, spacing: Sequence[float], axis: str, index: int) -> View:
    """Slice ``volume`` (d, h, w) at ``index`` along the array axis of ``axis`` (axial/coronal/sagittal)."""
    if axis not in VIEW_AXIS:
        raise ValueError(f"axis must be one of {AXES}, got {axis!r}")
    d, h, w = volume.shape
    sd, sh, sw = (float(s) for s in spacing)
    index = int(np.clip(index, 0, volume.shape[VIEW_AXIS[axis]] - 1))
    if axis == "axial":
        return View(axis, index, volume[index], (0.0, w * sw, h * sh, 0.0), "upper")
    if axis == "coronal":
        return View(axis, index, volume[:, index, :], (0.0, w * sw, 0.0, d * sd), "lower")
    return View(axis, index, volume[:, :, index], (0.0, h * sh, 0.0, d * sd), "lower")


def largest_section(mask: np.ndarray, label: int, axis: str) -> int:
    """Index along ``axis``'s array axis where ``mask == label`` has the largest cross-section."""
    others = tuple(a for a in range(3) if a != VIEW_AXIS[axis])
    counts = np.count_nonzero(mask == label, axis=others)
    return int(np.argmax(counts)) if counts.any() else mask.shape[VIEW_AXIS[axis]] // 2


def labelled_centre(mask: np.ndarray, labels: Mapping[str, int]) -> tuple[int, int, int]:
    """Centre (d, h, w voxel indices) of all tibia and femur voxels (the volume's centre without any)."""
    hit = np.isin(mask, [labels[b] for b in BONES if b in labels])
    if not hit.any():
        return tuple(n // 2 for n in mask.shape)  # type: ignore[return-value]
    return tuple(int(round(float(np.mean(np.flatnonzero(hit.any(axis=tuple(o for o in range(3) if o != a))))))) for a in range(3))  # type: ignore[return-value]


def _window(window: tuple[float, float] = DEFAULT_WINDOW) -> dict[str, float]:
    level, width = window
    return {"vmin": level - width / 2, "vmax": level + width / 2}


def _overlay_rgba(mask2d: np.ndarray, labels: Mapping[str, int], opacity: float) -> np.ndarray:
    rgba = np.zeros((*mask2d.shape, 4), dtype=np.float32)
    for bone in BONES:
        if bone in labels:
            rgba[mask2d == labels[bone]] = to_rgba(COLOURS[bone], opacity)
    return rgba


def _draw_slice(ax: Any, scan: Scan, labels: Mapping[str, int], axis: str, index: int, opacity: float = 0.35,
                contours: bool = True, title: str | None = None) -> View:  # fmt: skip
    """CT slice in the bone window with the tibia/femur overlay and orientation letters."""
    ct = view(scan.image, scan.spacing, axis, index)
    ct.show(ax, cmap="gray", **_window())
    lab = view(scan.mask, scan.spacing, axis, index)
    if opacity > 0:
        lab.show(ax, _overlay_rgba(lab.image, labels, opacity))
    if contours:
        for bone in BONES:
            inside = lab.image == labels.get(bone, -1)
            if inside.any() and not inside.all():
                ax.contour(inside.astype(np.float32), levels=[0.5], colors=[COLOURS[bone]], linewidths=1.2,
                           extent=ct.extent, origin=ct.origin)  # fmt: skip
    _orientation(ax, axis)
    ax.set_title(title or f"{axis}, {'dhw'[VIEW_AXIS[axis]]} = {ct.index}", fontsize=10)
    return ct


def _orientation(ax: Any, axis: str) -> None:
    left, right, top, bottom = EDGE_LABELS[axis]
    style = {"color": "yellow", "fontsize": 10, "fontweight": "bold", "transform": ax.transAxes}
    ax.text(0.02, 0.5, left, ha="left", va="center", **style)
    ax.text(0.98, 0.5, right, ha="right", va="center", **style)
    ax.text(0.5, 0.98, top, ha="center", va="top", **style)
    ax.text(0.5, 0.02, bottom, ha="center", va="bottom", **style)
    xlabel, ylabel = _AXIS_TEXT[axis]
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.tick_params(labelsize=7)


def _bone_legend(fig: Figure, labels: Mapping[str, int], extra: Sequence[Any] = ()) -> None:
    handles = [Patch(facecolor=COLOURS[b], edgecolor=COLOURS[b], label=f"{b} (label {labels[b]})") for b in BONES if b in labels]
    fig.legend(handles=[*handles, *extra], loc="outside upper right", ncol=2, fontsize=9, framealpha=0.9)


# ----------------------------------------------------------------------------- figures


def overlay_views(scan: Scan, labels: Mapping[str, int], opacity: float = 0.35) -> Figure:
    """Mask on the CT: axial, coronal and sagittal views through the largest section of each bone."""
    fig, axes = plt.subplots(len(BONES), 3, figsize=(13, 4.4 * len(BONES)), layout="constrained")
    for row, bone in zip(axes, BONES):
        for ax, axis in zip(row, AXES):
            index = largest_section(scan.mask, labels[bone], axis)
            _draw_slice(ax, scan, labels, axis, index, opacity, title=f"{axis} through the {bone} ({'dhw'[VIEW_AXIS[axis]]} = {index})")
    level, width = DEFAULT_WINDOW
    fig.suptitle(f"Label mask on the CT (bone window L {level:g} / W {width:g} HU; spacing d,h,w = "
                 f"{', '.join(f'{s:g}' for s in scan.spacing)} mm)", fontsize=12, x=0.02, ha="left")  # fmt: skip
    _bone_legend(fig, labels)
    return fig


def crop_boxes(scan: Scan, regions: Sequence[Region], labels: Mapping[str, int]) -> Figure:
    """Each region's crop box (after +-pad and clipping) drawn on axial, coronal and sagittal views."""
    centre = list(labelled_centre(scan.mask, labels))
    if "tibia" in labels:  # axial through the tibia's largest section (the centre is often the joint gap)
        centre[0] = largest_section(scan.mask, labels["tibia"], "axial")
    fig, axes = plt.subplots(1, 3, figsize=(14, 5.2), layout="constrained")
    sd, sh, sw = scan.spacing
    handles = []
    for region in regions:
        (d0, d1), (h0, h1), (w0, w1) = region.box
        colour = COLOURS.get(region.name, "white")
        style = {"fill": False, "edgecolor": colour, "linewidth": 2.0, "linestyle": "--" if region.name == "background" else "-"}
        rects = {
            "axial": ((w0 * sw, h0 * sh), (w1 - w0) * sw, (h1 - h0) * sh),
            "coronal": ((w0 * sw, d0 * sd), (w1 - w0) * sw, (d1 - d0) * sd),
            "sagittal": ((h0 * sh, d0 * sd), (h1 - h0) * sh, (d1 - d0) * sd),
        }
        for ax, axis in zip(axes, AXES):
            xy, width, height = rects[axis]
            ax.add_patch(Rectangle(xy, width, height, **style))
        shape = TIMES.join(map(str, region.crop_shape))
        handles.append(Line2D([], [], color=colour, linestyle=style["linestyle"], linewidth=2, label=f"{region.name} box: {shape} voxels"))
    for ax, axis in zip(axes, AXES):
        _draw_slice(ax, scan, labels, axis, centre[VIEW_AXIS[axis]], opacity=0.2, contours=False)
    fig.suptitle("Crop boxes (label bounding box \u00b1 pad, clipped to the scan; d \u00d7 h \u00d7 w)", fontsize=12, x=0.02, ha="left")
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=9, bbox_to_anchor=(0.5, -0.01))
    fig.get_layout_engine().set(rect=(0, 0.06, 1, 0.94))
    return fig


def region_inputs(regions: Sequence[Region], spacing: Sequence[float]) -> Figure:
    """The network input of each region (normalised, masked, padded): its central coronal slice."""
    fig, axes = plt.subplots(1, len(regions), figsize=(4.6 * len(regions), 4.6), layout="constrained")
    for ax, region in zip(np.atleast_1d(axes), regions):
        arr = region.array
        v = view(arr, spacing, "coronal", arr.shape[1] // 2)
        lo, hi = np.percentile(arr, [1, 99]) if arr.size else (0.0, 1.0)
        im = v.show(ax, cmap="gray", vmin=lo, vmax=hi)
        _orientation(ax, "coronal")
        ax.set_title(f"{region.name}: input {TIMES.join(map(str, arr.shape))} (d{TIMES}h{TIMES}w)", fontsize=10,
                     color=COLOURS.get(region.name, "black"))  # fmt: skip
        fig.colorbar(im, ax=ax, shrink=0.8, label="normalised intensity")
    fig.suptitle("Network inputs, central coronal slice (0 = neutral value outside the label / padding)",
                 fontsize=12, x=0.02, ha="left")  # fmt: skip
    return fig


def short_layer(name: str) -> str:
    """``denseblock4.denselayer16.conv2`` -> ``block4.layer16.conv2`` (for tick labels)."""
    return name.replace("denseblock", "block").replace("denselayer", "layer").replace("transition", "trans")


def pair_label(pair: str) -> str:
    """``tibia_femur`` -> ``tibia \u2194 femur``."""
    return pair.replace("_", " \u2194 ")


def from_end(k: int) -> str:
    """Position counted from the end: 1 -> ``last``, 3 -> ``3rd-last``, 5 -> ``5th-last``."""
    if k == 1:
        return "last"
    suffix = "th" if k % 100 in (11, 12, 13) else {1: "st", 2: "nd", 3: "rd"}.get(k % 10, "th")
    return f"{k}{suffix}-last"


def similarity_heatmap(table: SimilarityTable) -> Figure:
    """Results table as a heatmap: pairs x layer_1..3, values annotated, diverging colours centred on 0."""
    from .similarity import FROM_END  # imported here: plots itself never imports torch

    values = np.asarray(table.values, dtype=np.float64)
    fig, ax = plt.subplots(figsize=(9.5, 4.6), layout="constrained")
    im = ax.imshow(values, cmap="RdBu_r", norm=TwoSlopeNorm(vmin=-1.0, vcenter=0.0, vmax=1.0), aspect="auto")
    ax.set_xticks(range(len(table.columns)),
                  [f"{c} ({from_end(FROM_END[c])} conv)\n{short_layer(n)}" if c in FROM_END else f"{c}\n{short_layer(n)}"
                   for c, n in zip(table.columns, table.column_layers)],
                  fontsize=10)  # fmt: skip
    ax.set_yticks(range(len(table.pairs)), [pair_label(p) for p in table.pairs], fontsize=11)
    ax.tick_params(top=True, bottom=False, labeltop=True, labelbottom=False, length=0)
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            ax.text(j, i, f"{values[i, j]:.4f}", ha="center", va="center", fontsize=13,
                    color="white" if abs(values[i, j]) > 0.6 else "black")  # fmt: skip
    ax.set_xticks(np.arange(-0.5, values.shape[1]), minor=True)
    ax.set_yticks(np.arange(-0.5, values.shape[0]), minor=True)
    ax.grid(which="minor", color="white", linewidth=2)
    ax.tick_params(which="minor", length=0)
    fig.colorbar(im, ax=ax, label="cosine similarity", ticks=[-1, -0.5, 0, 0.5, 1])
    ax.set_title("Cosine similarity of the pooled features", fontsize=12, loc="left")
    return fig


def _blocks(layer_names: Sequence[str]) -> list[tuple[str, int, int]]:
    """Runs of consecutive layers by top-level module: (module, first index, last index), 0-based."""
    runs: list[tuple[str, int, int]] = []
    for i, name in enumerate(layer_names):
        top = name.split(".")[0]
        if runs and runs[-1][0] == top:
            runs[-1] = (top, runs[-1][1], i)
        else:
            runs.append((top, i, i))
    return runs


def similarity_profile(table: SimilarityTable) -> Figure:
    """Cosine similarity of each pair at every conv layer (execution order), dense blocks shaded,
    the three selected layers marked; the right panel zooms into the last ten layers."""
    names = list(table.layer_names)
    x = np.arange(1, len(names) + 1)
    profile = np.asarray(table.profile, dtype=np.float64)
    chosen = {n: c for c, n in zip(table.columns, table.column_layers)}
    fig, (ax, zoom) = plt.subplots(1, 2, figsize=(14, 5.2), gridspec_kw={"width_ratios": [3.2, 1]}, layout="constrained")
    lo = min(0.0, float(np.nanmin(profile))) - 0.05
    for a in (ax, zoom):
        for k, (top, first, last) in enumerate(_blocks(names)):
            if top.startswith("denseblock"):
                a.axvspan(first + 0.5, last + 1.5, color="0.9" if k % 4 == 1 else "0.95", zorder=0)
            else:
                a.axvline(first + 1, color="0.6", linestyle=":", linewidth=1, zorder=1)
        for pair, row in zip(table.pairs, profile):
            a.plot(x, row, color=PAIR_COLOURS.get(pair), linewidth=1.6, label=pair_label(pair), zorder=3)
        for name in chosen:
            i = names.index(name)
            a.axvline(i + 1, color="crimson", linewidth=0.8, alpha=0.6, zorder=2)
            a.scatter(np.full(len(table.pairs), i + 1), profile[:, i], color="crimson", s=18, zorder=4)
        a.axhline(0, color="0.3", linewidth=0.8)
        a.set_ylim(lo, 1.14)
        a.grid(axis="y", alpha=0.3)
    for top, first, last in _blocks(names):
        label = top.replace("denseblock", "dense block ") if top.startswith("denseblock") else top
        if top.startswith("denseblock"):
            ax.text((first + last) / 2 + 1, 1.11, label, ha="center", va="top", fontsize=9, color="0.25")
    ax.set_xlim(0.5, len(names) + 0.5)
    ax.set_xlabel("conv layer (execution order; dotted: conv0 and transition convs)", fontsize=10)
    ax.set_ylabel("cosine similarity", fontsize=10)
    ax.legend(loc="lower left", fontsize=9, framealpha=0.9)
    ax.set_title(f"Similarity versus depth, all {len(names)} conv layers", fontsize=12, loc="left")
    start = max(len(names) - 10, 0)
    zoom.set_xlim(start + 0.5, len(names) + 0.5)
    zoom.set_xticks(x[start:], [str(i) for i in x[start:]], fontsize=8)
    for name, col in chosen.items():
        zoom.annotate(col, (names.index(name) + 1, lo), xytext=(0, 4), textcoords="offset points", rotation=90,
                      ha="center", va="bottom", fontsize=9, color="crimson")  # fmt: skip
    zoom.set_title("last 10 layers (red: layer_1..3)", fontsize=10, loc="left")
    zoom.set_xlabel("conv layer", fontsize=10)
    return fig


# ----------------------------------------------------------------------------- slice browser


class SliceBrowser:
    """Scan with mask overlay, one slice at a time: axis, slice index and overlay opacity.

    :meth:`render` draws one PNG (works anywhere); :meth:`show` displays it under ipywidgets
    controls in a notebook (updated in place through an IPython display handle, so the first
    image also stays in a headless, executed notebook), or just the PNG without ipywidgets.
    """

    def __init__(self, scan: Scan, labels: Mapping[str, int], axis: str = "coronal", opacity: float = 0.35) -> None:
        self.scan, self.labels = scan, dict(labels)
        centre = labelled_centre(scan.mask, labels)
        self.state = {"axis": axis, "index": centre[VIEW_AXIS[axis]], "opacity": opacity}
        self.centre = centre
        self.handle: Any = None
        self.controls: Any = None

    def render(self, axis: str | None = None, index: int | None = None, opacity: float | None = None) -> bytes:
        """PNG bytes of one slice (defaults: the current state)."""
        axis = axis or self.state["axis"]
        index = self.state["index"] if index is None else index
        opacity = self.state["opacity"] if opacity is None else opacity
        fig, ax = plt.subplots(figsize=(6.4, 6.0), layout="constrained")
        try:
            n = self.scan.shape[VIEW_AXIS[axis]]
            _draw_slice(ax, self.scan, self.labels, axis, index, opacity, contours=opacity > 0,
                        title=f"{axis}, {'dhw'[VIEW_AXIS[axis]]} = {int(np.clip(index, 0, n - 1))} of 0..{n - 1}")  # fmt: skip
            _bone_legend(fig, self.labels)
            buf = _io.BytesIO()
            fig.savefig(buf, format="png", dpi=90)
        finally:
            plt.close(fig)
        return buf.getvalue()

    def show(self) -> SliceBrowser:
        """Display the controls and the image (a static image when ipywidgets is unavailable)."""
        from IPython.display import Image, display

        try:
            import ipywidgets as widgets
        except ImportError:
            widgets = None
        if widgets is not None:
            axis = widgets.Dropdown(options=list(AXES), value=self.state["axis"], description="axis")
            index = widgets.IntSlider(value=self.state["index"], min=0, max=self.scan.shape[VIEW_AXIS[self.state["axis"]]] - 1,
                                      description="slice", continuous_update=False)  # fmt: skip
            opacity = widgets.FloatSlider(value=self.state["opacity"], min=0.0, max=1.0, step=0.05, description="overlay",
                                          continuous_update=False)  # fmt: skip

            moving = []  # non-empty while on_axis moves the slider: its changes must not draw on their own

            def on_axis(change: Any) -> None:
                new = change["new"]
                moving.append(new)
                try:
                    index.max = self.scan.shape[VIEW_AXIS[new]] - 1  # may clamp the value
                    index.value = self.centre[VIEW_AXIS[new]]
                finally:
                    moving.clear()
                self.state.update(axis=new, index=index.value)
                self._update()  # the one draw of an axis change

            def on_other(_change: Any) -> None:
                if moving:
                    return
                self.state["index"], self.state["opacity"] = index.value, opacity.value
                self._update()

            axis.observe(on_axis, names="value")
            index.observe(on_other, names="value")
            opacity.observe(on_other, names="value")
            self.controls = widgets.HBox([axis, index, opacity])
            display(self.controls)
        self.handle = display(Image(data=self.render()), display_id=True)
        return self

    def _update(self) -> None:
        if self.handle is not None:
            from IPython.display import Image

            self.handle.update(Image(data=self.render()))


def slice_browser(scan: Scan, labels: Mapping[str, int], axis: str = "coronal", opacity: float = 0.35) -> SliceBrowser:
    """Interactive slice browser in a notebook (see :class:`SliceBrowser`); outside IPython it only
    builds the browser (call :meth:`SliceBrowser.render` for a PNG) and never fails headless."""
    browser = SliceBrowser(scan, labels, axis, opacity)
    try:
        from IPython import get_ipython
    except ImportError:
        return browser
    if get_ipython() is not None:
        browser.show()
    return browser


# ----------------------------------------------------------------------------- saving


def save_figures(figures: Mapping[str, Figure], out_dir: str | Path, dpi: int = 130) -> dict[str, Path]:
    """Write each figure as ``<out_dir>/<name>.png`` (atomically); returns name -> path."""
    from .outputs import write_files

    out = Path(out_dir)
    paths = {name: out / f"{name}.png" for name in figures}

    def saver(fig: Figure) -> Any:
        return lambda path: fig.savefig(path, format="png", dpi=dpi, facecolor="white")

    write_files({paths[name]: saver(fig) for name, fig in figures.items()})
    return paths


# ----------------------------------------------------------------------------- text summaries


def scan_summary(scan: Scan, labels: Mapping[str, int]) -> str:
    """Shape, spacing, orientation, HU range and label voxel counts (mL) of a loaded scan."""
    d, h, w = scan.shape
    sd, sh, sw = scan.spacing
    voxel_ml = sd * sh * sw / 1000.0
    names = {v: k for k, v in labels.items()}
    counts = scan.label_counts()
    lines = [
        f"volume      : {scan.volume_path}",
        f"mask        : {scan.mask_path}",
        f"stored as   : shape {tuple(scan.source_shape)}, orientation {scan.source_orientation}",
        f"canonical   : [d, h, w] = {d} x {h} x {w} voxels (d inferior->superior, h anterior->posterior, w right->left)",
        f"spacing     : {sd:g} x {sh:g} x {sw:g} mm (d, h, w); field of view {d * sd:.0f} x {h * sh:.0f} x {w * sw:.0f} mm",
        f"intensities : {float(scan.image.min()):.0f} .. {float(scan.image.max()):.0f} HU",
        "labels      : " + ", ".join(
            f"{names.get(v, '(not in label map)')}={v}: {c} voxels ({c * voxel_ml:.1f} mL)" for v, c in sorted(counts.items())
        ),
    ]
    return "\n".join(lines)


def region_summary(regions: Sequence[Region]) -> str:
    """One line per region: label, box, crop shape, network input shape, normalisation."""
    rows = []
    for r in regions:
        box = " ".join(f"{a}:{b}" for a, b in r.box)
        stats = ", ".join(f"{k} {v:.4g}" for k, v in r.stats.items())
        rows.append(f"{r.name:<10} label {r.label}  box [d h w] {box:<22} crop {'x'.join(map(str, r.crop_shape)):<10} "
                    f"input {'x'.join(map(str, r.array.shape)):<10} {r.label_voxels} label voxels; {stats}")  # fmt: skip
    return "\n".join(rows)


def model_summary(prepared: PreparedModel) -> str:
    """Inflation mode, weights, parameter count, Conv3d layers, the selected layers, device and precision."""
    from .similarity import select_layers

    net = prepared.model
    names = net.conv_names
    n_params = sum(p.numel() for p in net.parameters())
    info = net.weights_info
    chosen = select_layers(names)
    lines = [
        f"network     : torchvision DenseNet-121 features, inflated 2D -> 3D ({net.inflation} inflation), conv0 summed RGB -> 1 channel",
        f"weights     : {info.description if info else '?'}" + ("   <-- RANDOM, not ImageNet" if info and info.is_random else ""),
        f"parameters  : {n_params:,}",
        f"conv layers : {len(names)} Conv3d (first {names[0]}, last {names[-1]})",
        *(f"{c}     : {n}" for c, n in chosen.items()),
        f"device      : {prepared.device} ({prepared.precision}; channels_last {prepared.channels_last}; bucket {prepared.bucket})",
    ]
    return "\n".join(lines)


def feature_summary(features: Features) -> str:
    """Per region: network input shape, forward time, GFLOP, and the pooled vector sizes."""
    first = features.regions[0]
    sizes = [len(v) for v in features.vectors[first]]
    lines = [f"{len(features.layer_names)} conv layers pooled per region; vector length per layer "
             f"{min(sizes)}..{max(sizes)}, {sum(sizes)} values in all; device {features.device}, {features.precision}"]  # fmt: skip
    for region in features.regions:
        shape = "x".join(map(str, features.input_shapes[region]))
        lines.append(f"  {region:<10} input {shape:<10} forward {features.timings_s[region]:.2f} s, {features.gflop[region]:.1f} GFLOP")
    last = features.layer_names[-1]
    lines.append(f"  last conv {last}: {len(features.vector(first, last))} channels")
    return "\n".join(lines)


__all__ = [
    "AXES", "COLOURS", "SliceBrowser", "View", "crop_boxes", "feature_summary", "largest_section",
    "model_summary", "overlay_views", "region_inputs", "region_summary", "save_figures",
    "scan_summary", "similarity_heatmap", "similarity_profile", "slice_browser", "view",
]  # fmt: skip
