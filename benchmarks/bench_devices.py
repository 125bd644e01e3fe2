"""Forward time, throughput, memory and precision agreement of each crop on one device.

For ``--device`` (cpu, cuda, cuda:N, xla) and a phantom preset (or ``--volume``/``--mask``),
every region's crop goes through the product's own extraction path
(``helpers.extract.extract_features``: hooked forward, pooling on the device, one transfer
back) at fp32 and at each reduced precision the device offers (bf16 on CPU and XLA/TPU;
bf16 where native and fp16 on CUDA). Per region and precision it reports:

* the forward time, median of ``--repeats`` runs after ``--warmup`` runs (excluded; on XLA
  they include the graph compilation, reported separately), device-synchronised;
* throughput in GFLOP/s, counting conv FLOPs from the layer shapes (``helpers.inflate.conv_shapes``);
* peak memory: CUDA ``torch.cuda.max_memory_allocated``; XLA the runtime's ``peak_bytes_used``
  where it reports one (TPU); CPU the process's peak RSS so far (``ru_maxrss``: it includes the
  earlier regions and precisions, so read the largest region's row);
* the cosine between the reduced-precision and the fp32 pooled vectors at ``layer_1``,
  ``layer_2``, ``layer_3`` and the minimum over all 120 conv layers (target >= 0.999), and the
  largest change of any similarity in results.csv.

Random weights (``--weights random``) have the same compute as ImageNet ones. Writes
``outputs/benchmarks/devices_<device>_<input>.csv``. Examples::

    python benchmarks/bench_devices.py --device cpu                          # small phantom
    python benchmarks/bench_devices.py --device cpu --preset full --repeats 1
    python benchmarks/bench_devices.py --device cuda --preset full
    PJRT_DEVICE=TPU python benchmarks/bench_devices.py --device xla --preset full
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np
from tables import write_rows  # benchmarks/tables.py, next to this script

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TARGET = 0.999


def reduced_precisions(device: Any) -> list[str]:
    """The reduced precisions worth measuring on ``device``."""
    from helpers import extract

    if device.type == "cuda":
        return (["bf16"] if extract.cuda_native_bf16(device) else []) + ["fp16"]
    return ["bf16"]


def _peak_memory(device: Any, region_run: Any) -> tuple[float | None, str]:
    """(peak MiB, what was measured) while ``region_run()`` runs."""
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        region_run()
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda max_memory_allocated"
    if device.type == "xla":
        region_run()
        try:
            import torch_xla.core.xla_model as xm

            info = xm.get_memory_info(device)
            peak = info.get("peak_bytes_used") or info.get("bytes_used")
            return (peak / 2**20 if peak else None), "xla peak_bytes_used"
        except Exception:  # the CPU backend reports no device memory
            return None, "n/a on this XLA backend"
    # ru_maxrss (KiB on Linux): the process's peak so far. A sampling thread would perturb the
    # timings (GIL hand-offs between the ~1000 ops of a forward); the peak is monotonic anyway,
    # because the process keeps freed memory for reuse (helpers.extract.keep_freed_memory).
    region_run()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process peak RSS so far (ru_maxrss)"


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    return float(a64 @ b64 / (np.linalg.norm(a64) * np.linalg.norm(b64)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | xla (default: %(default)s)")
    p.add_argument("--preset", default="small", help="phantom preset when no files are given (default: %(default)s)")
    p.add_argument("--volume", help="CT volume (NIfTI); with --mask instead of the phantom")
    p.add_argument("--mask", help="label mask (NIfTI)")
    p.add_argument("--precisions", nargs="+", help="default: fp32 and the device's reduced precisions")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per region and precision (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs first (default: %(default)s)")
    p.add_argument("--bucket", type=int, default=None, help="as pipeline.py --bucket (default: 32 on xla, off elsewhere)")
    p.add_argument("--pad", type=int, default=5)
    p.add_argument("--weights", default="random")
    p.add_argument("--data-dir", default=str(ROOT / "data"))
    p.add_argument("--out", default=str(ROOT / "outputs" / "benchmarks"))
    args = p.parse_args(argv)

    from helpers import extract, pipeline, similarity
    from helpers.errors import InputError

    config = pipeline.Config(volume=args.volume, mask=args.mask, device=args.device, precision="fp32",
                             weights=args.weights, bucket=args.bucket, pad=args.pad, progress=False,
                             phantom_preset=args.preset, data_dir=args.data_dir)  # fmt: skip
    try:
        model = pipeline.build_model(config)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    run = pipeline.Run(config, model)
    crops = run.crop()
    dev = model.device
    precisions = args.precisions or ["fp32", *reduced_precisions(dev)]
    if "fp32" not in precisions:
        precisions.insert(0, "fp32")
    described = extract.device_description(dev)
    print(f"device {dev} ({described.get('name') or described.get('xla_device_type', '')}), "
          f"input {Path(args.volume).name if args.volume else 'phantom ' + args.preset}, "
          f"regions {', '.join(f'{c.name} {c.array.shape}' for c in crops)}, bucket {model.bucket}, "
          f"{args.warmup} warm-up + {args.repeats} timed runs", flush=True)  # fmt: skip

    rows: list[dict[str, Any]] = []
    features: dict[str, Any] = {}
    for prec in precisions:
        try:
            extract.resolve_precision(prec, dev)
        except InputError as exc:
            print(f"skipping {prec}: {exc}")
            continue
        prepared = extract.PreparedModel(model.model, dev, prec, model.channels_last, model.bucket)
        vectors: dict[str, list[np.ndarray]] = {}
        for crop in crops:
            times: list[float] = []
            compile_s = 0.0
            warm: Any = None
            for _ in range(args.warmup):
                warm = extract.extract_features(prepared, [crop], progress=False)
                compile_s += warm.device_info.get("xla_compile_time_s", 0.0)
            last: dict[str, Any] = {}

            def timed(crop: Any = crop, prepared: Any = prepared, times: list[float] = times,
                      last: dict[str, Any] = last) -> None:  # fmt: skip
                for _ in range(args.repeats):
                    feats = extract.extract_features(prepared, [crop], progress=False)
                    times.append(feats.timings_s[crop.name])
                    last["feats"] = feats

            peak_mib, mem_kind = _peak_memory(dev, timed)
            feats = last["feats"]
            vectors[crop.name] = feats.vectors[crop.name]
            median = statistics.median(times)
            gflop = feats.gflop[crop.name]
            rows.append({
                "device": str(dev), "device_name": described.get("name") or described.get("xla_device_type", ""),
                "precision": prec, "region": crop.name,
                "input_shape": "x".join(map(str, feats.input_shapes[crop.name])), "gflop": round(gflop, 2),
                "median_s": round(median, 4), "min_s": round(min(times), 4), "repeats": len(times),
                "gflop_per_s": round(gflop / median, 1), "peak_mib": None if peak_mib is None else round(peak_mib),
                "memory": mem_kind, "xla_compile_s": round(compile_s, 2) if dev.type == "xla" else None,
                "compilations_after_warmup": feats.device_info.get("xla_compilations"),
            })  # fmt: skip
            r = rows[-1]
            print(f"  {prec:>4} {crop.name:<10} {r['input_shape']:>11} {r['gflop']:>8.1f} GFLOP "
                  f"{median:8.3f} s {r['gflop_per_s']:>7.1f} GFLOP/s  peak {r['peak_mib']} MiB", flush=True)  # fmt: skip
        features[prec] = extract.Features(feats.layer_names, vectors, str(dev), prec, {}, {}, {})

    columns = similarity.select_layers(features["fp32"].layer_names)
    table32 = similarity.compare(features["fp32"])
    for r in rows:
        low, ref = features[r["precision"]], features["fp32"]
        a, b = low.vectors[r["region"]], ref.vectors[r["region"]]
        for col, layer in columns.items():
            i = ref.layer_names.index(layer)
            r[f"cos_{col}"] = round(_cos(a[i], b[i]), 6)
        r["cos_min_all_layers"] = round(min(_cos(x, y) for x, y in zip(a, b)), 6)
        r["max_abs_similarity_change"] = float(np.abs(similarity.compare(low).values - table32.values).max())
        cos_cols = [r[f"cos_{c}"] for c in columns] + [r["cos_min_all_layers"]]
        r["agreement_ok"] = min(cos_cols) >= TARGET

    print(f"\n{'prec':>4} {'region':<10} {'input':>11} {'GFLOP':>7} {'median s':>9} {'GFLOP/s':>8} {'peak MiB':>9} "
          f"{'cos l1':>8} {'cos l2':>8} {'cos l3':>8} {'min all':>8} {'|dsim|':>8}")  # fmt: skip
    for r in rows:
        print(f"{r['precision']:>4} {r['region']:<10} {r['input_shape']:>11} {r['gflop']:>7.1f} {r['median_s']:>9.3f} "
              f"{r['gflop_per_s']:>8.1f} {str(r['peak_mib']):>9} {r['cos_layer_1']:>8.5f} {r['cos_layer_2']:>8.5f} "
              f"{r['cos_layer_3']:>8.5f} {r['cos_min_all_layers']:>8.5f} {r['max_abs_similarity_change']:>8.1e}")  # fmt: skip
    bad = [f"{r['precision']} {r['region']}" for r in rows if not r["agreement_ok"]]
    print(f"agreement with fp32 >= {TARGET} on layer_1..3 and every layer: "
          + ("all pass" if not bad else "FAILS for " + ", ".join(bad)))
    print(f"memory: {rows[0]['memory']}")

    out = Path(args.out)
    stem = Path(args.volume).name.split(".")[0] if args.volume else args.preset
    path = out / f"devices_{dev.type}_{stem}.csv"
    write_rows(rows, path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
