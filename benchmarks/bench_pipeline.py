"""Whole-pipeline CPU benchmark: a clinical-size knee CT from NIfTI to results.csv.

Measures, on this machine, in one run:

* the **ceiling**: GFLOP/s of a representative Conv3d (128 -> 32, 3x3x3, 64^3 voxels, the best
  of contiguous / channels-last memory formats), fp32 and bf16, median of several runs after a
  warm-up, so efficiency is a ratio that survives a noisy machine;
* the **end-to-end run** (``python -c 'pipeline.run(...)'`` in a fresh process: interpreter
  start, imports, model build, load, crop, forward, compare, write) on the ``full`` phantom
  (216 x 512 x 512, 0.869 x 0.869 x 2.0 mm) and, when ``../shared/data/real-knee-masks`` is
  present, on a CT painted onto those real masks: wall time, per-stage times, the process's
  own peak RSS (``ru_maxrss``), conv FLOPs (from the layer shapes) and achieved GFLOP/s of the
  forward, at fp32 and bf16, with the pooled-feature cosine agreement bf16 vs fp32;
* **scaling**: forward time at 1/8, 1/2 and 1 x the full scan's voxels and the fitted exponent
  of time vs voxels.

Writes ``outputs/benchmarks/bench_pipeline.{csv,json,png}`` and prints a summary against the
targets (efficiency >= 60 % of the ceiling; full scan <= 25 s and <= 3.8 GB; bf16 >= 1.6x
faster with agreement >= 0.999; exponent in [0.9, 1.1]). Random weights (same compute as
ImageNet ones). Usage::

    python benchmarks/bench_pipeline.py                # ~6 minutes on 2 cores
    python benchmarks/bench_pipeline.py --repeats 1    # quicker, noisier
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
REAL_MASKS = ROOT.parent / "shared" / "data" / "real-knee-masks"
SEED_BASELINE = {"wall_s": 245.0, "peak_rss_gb": 18.9}  # the seed's published code on this machine (issue 5)
TARGETS = {"efficiency": 0.60, "wall_s": 25.0, "peak_rss_gb": 3.8, "bf16_speedup": 1.6, "agreement": 0.999,
           "exponent": (0.9, 1.1)}  # fmt: skip

CHILD = r"""
import json, resource, sys, time
t0 = time.perf_counter()
from helpers import pipeline
cfg = pipeline.Config(**json.loads(sys.argv[1]))
t1 = time.perf_counter()
res = pipeline.run(cfg)
rec = res.provenance
print(json.dumps({
    "import_s": t1 - t0,
    "timings": rec["timings_s"],
    "regions": {k: {"gflop": v["gflop"], "forward_s": v["forward_s"], "shape": v["network_input_shape"]}
                for k, v in rec["regions"].items()},
    "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
}))
"""


def conv_ceiling(dtype_name: str, repeats: int = 5) -> tuple[float, str]:
    """Best GFLOP/s of Conv3d 128->32, 3x3x3, padding 1 on a 64^3 volume (median of ``repeats``)."""
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    flops = 2 * 128 * 27 * 32 * 64**3
    best = (0.0, "")
    with torch.inference_mode():
        for fmt_name, fmt in (("contiguous", torch.contiguous_format), ("channels_last", torch.channels_last_3d)):
            conv = torch.nn.Conv3d(128, 32, 3, padding=1, bias=False).to(dtype=dtype, memory_format=fmt)
            x = torch.randn(1, 128, 64, 64, 64).to(dtype=dtype, memory_format=fmt)
            conv(x)
            times = []
            for _ in range(repeats):
                t = time.perf_counter()
                conv(x)
                times.append(time.perf_counter() - t)
            rate = flops / statistics.median(times) / 1e9
            best = max(best, (rate, fmt_name))
    return best


def run_pipeline(volume: Path, mask: Path, out: Path, precision: str, labels: str | None = None) -> dict:
    """One end-to-end run in a fresh process; wall time includes interpreter start and imports."""
    config = {"volume": str(volume), "mask": str(mask), "output": str(out), "device": "cpu", "precision": precision,
              "weights": "random", "progress": False, "labels": labels}  # fmt: skip
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(config)], capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"pipeline failed:\n{proc.stderr}")
    rec = json.loads(proc.stdout.strip().splitlines()[-1])
    gflop = sum(r["gflop"] for r in rec["regions"].values())
    forward = sum(r["forward_s"] for r in rec["regions"].values())
    return {"wall_s": wall, "peak_rss_gb": rec["maxrss_kb"] * 1024 / 1e9, "gflop": gflop, "forward_s": forward,
            "forward_gflops": gflop / forward, **{f"stage_{k}_s": v for k, v in rec["timings"].items()},
            "import_s": rec["import_s"], "regions": rec["regions"]}  # fmt: skip


def agreement(npz_a: Path, npz_b: Path) -> dict[str, float]:
    """Cosine between the two runs' pooled vectors: min over regions, per column and over all layers."""
    from helpers import pipeline, similarity

    a, b = pipeline.load_npz(npz_a), pipeline.load_npz(npz_b)
    names = a["layer_names"]
    cols = similarity.select_layers(names)
    out = {}
    for col, layer in cols.items():
        k = names.index(layer)
        out[col] = min(similarity.cosine(a["vectors"][r][k], b["vectors"][r][k]) for r in a["vectors"])
    out["all_layers"] = min(
        similarity.cosine(va, vb) for r in a["vectors"] for va, vb in zip(a["vectors"][r], b["vectors"][r])
    )
    return out


def paint_real_ct(out_dir: Path) -> tuple[Path, Path]:
    """A CT in HU painted onto the real knee masks (their geometry and anatomy; the CT itself is not
    available): air -1000, limb soft tissue 40, bone a 2-voxel cortical shell at 1200 around
    trabecular bone at 300, Gaussian noise sd 15. Returns (ct, labels) with labels femur=1, tibia=2."""
    import nibabel as nib
    from scipy import ndimage

    ct_path = out_dir / "real_painted_ct.nii.gz"
    if ct_path.exists():
        return ct_path, REAL_MASKS / "femur1_tibia2_labels.nii.gz"
    bone_img = nib.load(REAL_MASKS / "bone.nii.gz")
    bone = np.asanyarray(bone_img.dataobj) > 0.5
    soft = np.asanyarray(nib.load(REAL_MASKS / "limb_soft_tissue.nii.gz").dataobj) > 0.5
    ct = np.full(bone.shape, -1000.0, dtype=np.float32)
    ct[soft | bone] = 40.0
    interior = ndimage.binary_erosion(bone, iterations=2)
    ct[bone] = 1200.0
    ct[interior] = 300.0
    ct += np.random.default_rng(0).standard_normal(ct.shape, dtype=np.float32) * 15.0
    img = nib.Nifti1Image(np.rint(ct).astype(np.int16), bone_img.affine)
    nib.save(img, ct_path)
    return ct_path, REAL_MASKS / "femur1_tibia2_labels.nii.gz"


def scaling(repeats: int) -> dict:
    """Forward time (fp32, median) at 1/8, 1/2, 1 x the full scan's voxels; log-log slope."""
    import torch

    from helpers import extract, inflate

    model = extract.prepare_model(inflate.inflate_densenet121("random"), "cpu", "fp32")
    full = np.array([216, 512, 512])
    rows = []
    with torch.inference_mode(), extract.PooledHooks(model.model) as hooks:
        for frac in (1 / 8, 1 / 2, 1.0):
            shape = tuple(int(round(n * frac ** (1 / 3))) for n in full)
            x = torch.randn(1, 1, *shape).contiguous(memory_format=torch.channels_last_3d)
            times = []
            for i in range(repeats + (1 if frac == 1 / 8 else 0)):  # one warm-up
                hooks.reset()
                t = time.perf_counter()
                model.model(x)
                if i or frac != 1 / 8:
                    times.append(time.perf_counter() - t)
            gflop = sum(c.flops for c in inflate.conv_shapes(model.model, shape)) / 1e9
            rows.append({"fraction": frac, "shape": shape, "voxels": int(np.prod(shape)), "forward_s": statistics.median(times),
                         "gflop": gflop})  # fmt: skip
            del x
    slope = float(np.polyfit(np.log([r["voxels"] for r in rows]), np.log([r["forward_s"] for r in rows]), 1)[0])
    return {"rows": rows, "exponent": slope}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    stages = ["import_s", "stage_model_build_s", "stage_load_s", "stage_crop_s", "stage_extract_s", "stage_compare_s"]
    labels = [s.removeprefix("stage_").removesuffix("_s") for s in stages]
    cases = [(k, v) for k, v in results["runs"].items()]
    bottom = np.zeros(len(cases))
    for stage, label in zip(stages, labels):
        vals = np.array([v.get(stage, 0.0) for _, v in cases])
        ax1.barh([k for k, _ in cases], vals, left=bottom, label=label)
        bottom += vals
    ax1.axvline(TARGETS["wall_s"], color="k", ls="--", lw=1, label="target 25 s")
    ax1.set_xlabel("seconds (median run)")
    ax1.set_title("End to end, per stage")
    ax1.legend(fontsize=8, loc="lower right")
    rows = results["scaling"]["rows"]
    ax2.loglog([r["voxels"] for r in rows], [r["forward_s"] for r in rows], "o-")
    ax2.set_xlabel("voxels")
    ax2.set_ylabel("forward seconds (fp32)")
    ax2.set_title(f"Scaling: exponent {results['scaling']['exponent']:.2f}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="end-to-end runs per case and precision (median)")
    parser.add_argument("--out", default=str(ROOT / "outputs" / "benchmarks"))
    parser.add_argument("--no-real", action="store_true", help="skip the painted real-mask case")
    parser.add_argument("--no-bf16", action="store_true")
    parser.add_argument("--no-scaling", action="store_true")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench_pipeline_"))

    from helpers import phantom

    results: dict = {"machine": {"cpu": _cpu(), "cores": os.cpu_count()}, "seed_baseline": SEED_BASELINE, "runs": {}}
    fp32_ceiling, fmt = conv_ceiling("fp32")
    bf16_ceiling, bfmt = conv_ceiling("bf16")
    results["ceiling"] = {"fp32_gflops": fp32_ceiling, "fp32_format": fmt, "bf16_gflops": bf16_ceiling, "bf16_format": bfmt}
    print(f"ceiling: Conv3d 128->32 3x3x3 64^3: fp32 {fp32_ceiling:.0f} GFLOP/s ({fmt}), bf16 {bf16_ceiling:.0f} GFLOP/s ({bfmt})")

    cases = {"phantom_full": (*phantom.ensure_phantom(work, "full"), None)}
    if REAL_MASKS.is_dir() and not args.no_real:
        cases["real_masks"] = (*paint_real_ct(work), "tibia=2,femur=1")
    precisions = ["fp32"] + ([] if args.no_bf16 else ["bf16"])
    for case, (volume, mask, labels) in cases.items():
        for prec in precisions:
            runs = []
            for i in range(args.repeats):
                runs.append(run_pipeline(volume, mask, work / f"{case}_{prec}" / "results.csv", prec, labels))
                print(f"{case} {prec} run {i + 1}: {runs[-1]['wall_s']:.1f} s, {runs[-1]['peak_rss_gb']:.2f} GB, "
                      f"forward {runs[-1]['forward_gflops']:.0f} GFLOP/s", flush=True)  # fmt: skip
            med = {k: statistics.median(r[k] for r in runs) for k in runs[0] if isinstance(runs[0][k], float)}
            med["regions"] = runs[0]["regions"]
            ceiling = fp32_ceiling if prec == "fp32" else bf16_ceiling
            med["efficiency_vs_ceiling"] = med["forward_gflops"] / ceiling
            med["efficiency_vs_fp32_ceiling"] = med["forward_gflops"] / fp32_ceiling
            results["runs"][f"{case}_{prec}"] = med
        if "bf16" in precisions:
            agree = agreement(work / f"{case}_fp32" / "results.npz", work / f"{case}_bf16" / "results.npz")
            speedup = results["runs"][f"{case}_fp32"]["forward_s"] / results["runs"][f"{case}_bf16"]["forward_s"]
            results["runs"][f"{case}_bf16"] |= {"forward_speedup_vs_fp32": speedup, **{f"agreement_{k}": v for k, v in agree.items()}}
    if not args.no_scaling:
        results["scaling"] = scaling(max(1, args.repeats))
    else:
        results["scaling"] = {"rows": [], "exponent": float("nan")}

    (out / "bench_pipeline.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    lines = ["case,precision,metric,value"]
    for name, med in results["runs"].items():
        case, prec = name.rsplit("_", 1)
        lines += [f"{case},{prec},{k},{v:.6g}" for k, v in med.items() if isinstance(v, float)]
    lines += [f"ceiling,{p},gflops,{results['ceiling'][f'{p}_gflops']:.6g}" for p in ("fp32", "bf16")]
    lines += [f"scaling,fp32,forward_s@{r['voxels']},{r['forward_s']:.6g}" for r in results["scaling"]["rows"]]
    lines.append(f"scaling,fp32,exponent,{results['scaling']['exponent']:.6g}")
    (out / "bench_pipeline.csv").write_text("\n".join(lines) + "\n")
    if results["scaling"]["rows"]:
        plot(results, out / "bench_pipeline.png")
    _summary(results)
    print(f"wrote {out / 'bench_pipeline.csv'}, .json, .png")
    return 0


def _summary(results: dict) -> None:
    print("\nsummary (medians)                      value    target")
    c = results["ceiling"]
    for name, med in results["runs"].items():
        prec = name.rsplit("_", 1)[1]
        print(f"{name:22s} wall        {med['wall_s']:8.1f} s   <= {TARGETS['wall_s']} s"
              f"   (seed {SEED_BASELINE['wall_s']:.0f} s: {SEED_BASELINE['wall_s'] / med['wall_s']:.1f}x faster)")
        print(f"{name:22s} peak RSS    {med['peak_rss_gb']:8.2f} GB  <= {TARGETS['peak_rss_gb']} GB"
              f"  (seed {SEED_BASELINE['peak_rss_gb']} GB: {SEED_BASELINE['peak_rss_gb'] / med['peak_rss_gb']:.1f}x less)")
        print(f"{name:22s} forward     {med['forward_s']:8.1f} s   {med['gflop']:.0f} GFLOP, {med['forward_gflops']:.0f} GFLOP/s"
              f" = {med['efficiency_vs_ceiling']:.0%} of the {prec} ceiling ({c[prec + '_gflops']:.0f})")  # fmt: skip
        if "forward_speedup_vs_fp32" in med:
            print(f"{name:22s} bf16 speedup {med['forward_speedup_vs_fp32']:7.2f}x  >= {TARGETS['bf16_speedup']}x; agreement "
                  f"l1 {med['agreement_layer_1']:.5f} l2 {med['agreement_layer_2']:.5f} l3 {med['agreement_layer_3']:.5f}"
                  f" all-layers min {med['agreement_all_layers']:.5f}  (>= {TARGETS['agreement']})")  # fmt: skip
    s = results["scaling"]
    for r in s["rows"]:
        print(f"scaling {str(r['shape']):18s} {r['voxels']:>10d} voxels  {r['forward_s']:6.2f} s  {r['gflop'] / r['forward_s']:.0f} GFLOP/s")
    print(f"scaling exponent {s['exponent']:.3f}  (target {TARGETS['exponent'][0]}..{TARGETS['exponent'][1]})")


def _cpu() -> str:
    from helpers.extract import _cpu_name

    return _cpu_name()


if __name__ == "__main__":
    raise SystemExit(main())
