"""What bucketing costs and buys: similarity shift and XLA compilations, with and without it.

For each ``--bucket`` value (0 = off) a fresh process builds one model and runs several
"scans": the phantom cropped with each ``--pads`` value (different crop sizes, as different
patients would give). Per scan it records the similarity table, the network input shapes,
the extraction time and, on XLA, the number of graph compilations and their compile time
(``torch_xla.debug.metrics``). The parent prints, per bucket value, the compilations and
compile seconds in total, and the largest |change| of any similarity against the unbucketed
run of the same scan. One process per bucket value, so no compiled graph is shared between
settings. Writes ``outputs/benchmarks/bucketing_<device>_<preset>.csv``.

Examples::

    python benchmarks/bench_bucketing.py --device cpu --buckets 0 16 32
    PJRT_DEVICE=CPU .venv-xla/bin/python benchmarks/bench_bucketing.py --device xla --buckets 0 16 32
    python benchmarks/bench_bucketing.py --device cpu --preset full --pads 5 --buckets 0 32
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tables import write_rows  # benchmarks/tables.py, next to this script

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def child(args: argparse.Namespace) -> None:
    """Run every pad with one model at one bucket value; print one JSON line per scan."""
    from helpers import pipeline

    ct, mask = _phantom(args.preset, args.data_dir)
    base = pipeline.Config(volume=str(ct), mask=str(mask), device=args.device, precision=args.precision,
                           weights="random", bucket=args.bucket or 0, progress=False)  # fmt: skip
    t0 = time.perf_counter()
    model = pipeline.build_model(base)
    build_s = time.perf_counter() - t0
    for pad in args.pads:
        config = pipeline.Config(**{**base.to_dict(), "pad": pad})
        run = pipeline.Run(config, model)
        t = time.perf_counter()
        table = run.compare()
        feats = run.features
        assert feats is not None and run.regions is not None
        row: dict[str, Any] = {
            "bucket": args.bucket,
            "pad": pad,
            "crop_shapes": {r.name: list(r.array.shape) for r in run.regions},
            "input_shapes": {k: list(v) for k, v in feats.input_shapes.items()},
            "extract_s": round(time.perf_counter() - t, 3),
            "compilations": feats.device_info.get("xla_compilations"),
            "compile_s": feats.device_info.get("xla_compile_time_s"),
            "build_s": round(build_s, 3),
            "values": table.as_dict(),
        }
        print("ROW " + json.dumps(row), flush=True)


def _phantom(preset: str, data_dir: str) -> tuple[Path, Path]:
    from helpers import phantom

    return phantom.ensure_phantom(data_dir, preset)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", help="cpu | cuda | xla (default: %(default)s)")
    p.add_argument("--precision", default="fp32", help="fp32 | bf16 | fp16 (default: %(default)s)")
    p.add_argument("--preset", default="small", help="phantom preset (default: %(default)s)")
    p.add_argument("--pads", type=int, nargs="+", default=[3, 5, 7, 9], help="crop pads = scans (default: 3 5 7 9)")
    p.add_argument("--buckets", type=int, nargs="+", default=[0, 16, 32], help="0 = off (default: 0 16 32)")
    p.add_argument("--data-dir", default=str(ROOT / "data"))
    p.add_argument("--out", default=str(ROOT / "outputs" / "benchmarks"))
    p.add_argument("--bucket", type=int, help=argparse.SUPPRESS)  # child mode
    args = p.parse_args(argv)
    if args.bucket is not None:
        child(args)
        return 0

    _phantom(args.preset, args.data_dir)  # write it once, before the children race for it
    rows: list[dict[str, Any]] = []
    for bucket in args.buckets:
        cmd = [sys.executable, __file__, "--bucket", str(bucket), "--device", args.device, "--precision",
               args.precision, "--preset", args.preset, "--data-dir", args.data_dir, "--pads", *map(str, args.pads)]  # fmt: skip
        t = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if proc.returncode:
            print(proc.stderr[-3000:], file=sys.stderr)
            return proc.returncode
        found = [json.loads(line[4:]) for line in proc.stdout.splitlines() if line.startswith("ROW ")]
        for r in found:
            r["process_s"] = round(time.perf_counter() - t, 1)
        rows += found

    reference = {r["pad"]: r["values"] for r in rows if r["bucket"] == 0}
    table = []
    for r in rows:
        ref = reference.get(r["pad"])
        shift = None
        if ref is not None:
            shift = max(abs(r["values"][pair][col] - ref[pair][col]) for pair in ref for col in ref[pair])
        table.append({
            "device": args.device, "preset": args.preset, "bucket": r["bucket"], "pad": r["pad"],
            "input_shapes": " ".join("x".join(map(str, s)) for s in r["input_shapes"].values()),
            "extract_s": r["extract_s"], "compilations": r["compilations"], "compile_s": r["compile_s"],
            "max_abs_shift_vs_unbucketed": None if shift is None else f"{shift:.2e}",
            **{f"{pair}.{col}": f"{v:.6f}" for pair, cols in r["values"].items() for col, v in cols.items()},
        })  # fmt: skip

    print(f"\n{args.device} {args.precision}, phantom {args.preset}, pads {args.pads} (one scan per pad)")
    print(f"{'bucket':>6} {'pad':>4} {'input shapes':<32} {'extract s':>9} {'compiles':>8} {'compile s':>9} {'max |shift|':>11}")
    for t in table:
        print(f"{t['bucket']:>6} {t['pad']:>4} {t['input_shapes']:<32} {t['extract_s']:>9} "
              f"{str(t['compilations']):>8} {str(t['compile_s']):>9} {str(t['max_abs_shift_vs_unbucketed']):>11}")  # fmt: skip
    print("\ntotals per bucket value (all scans in one process):")
    for bucket in args.buckets:
        sel = [t for t in table if t["bucket"] == bucket]
        compiles = sum(t["compilations"] or 0 for t in sel)
        compile_s = sum(t["compile_s"] or 0.0 for t in sel)
        extract_s = sum(t["extract_s"] for t in sel)
        shifts = [float(t["max_abs_shift_vs_unbucketed"]) for t in sel if t["max_abs_shift_vs_unbucketed"]]
        print(f"  bucket {bucket:>3}: {compiles} compilations, {compile_s:.1f} s compiling, {extract_s:.1f} s "
              f"extracting, max |shift| {max(shifts) if shifts else 0:.2e}")  # fmt: skip

    out = Path(args.out)
    path = out / f"bucketing_{args.device}_{args.preset}.csv"
    write_rows(table, path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
