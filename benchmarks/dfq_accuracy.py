"""Data-free PTQ accuracy: calibration on real images, noise, dense and sparse synthetic pools.

For each teacher (``--teacher``): FP32 top-1, then every {W8A8, W6A6, W4A8, W4A4, W3A3} x {baseline, repq}
x calibration {real, noise, dense inversion, sparse inversion}, top-1 on all test images of the
teacher's dataset, mean and standard deviation over calibration seeds. Synthetic pools use the paper's
settings (4000 iterations, batch 32, default schedule), one pool per seed, and their synthesis
wall time is reported. Pools and finished evaluations are kept, so an interrupted run resumes.

Run:  python benchmarks/dfq_accuracy.py          (about an hour on 2 CPU cores)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, bits, publish, synthetic_pools, test_split  # noqa: E402
from smi.data.sources import PoolSource, parse_source  # noqa: E402
from smi.evaluation import evaluate  # noqa: E402
from smi.models.loading import load_teacher  # noqa: E402
from smi.quant import QuantConfig  # noqa: E402
from smi.quant.pipeline import quantize_and_evaluate  # noqa: E402
from smi.utils.io import atomic_write_json  # noqa: E402

SETTINGS = ["W8A8", "W6A6", "W4A8", "W4A4", "W3A3"]
CALIBS = ["real", "noise", "dense", "sparse"]
SYNTHETIC = ["dense", "sparse"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", "--models", dest="models", nargs="+", default=["fmnist_vit_tiny"],
                   help="teachers (shipped names or checkpoints), each evaluated on its own dataset's test split")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--settings", nargs="+", default=SETTINGS)
    p.add_argument("--quantizers", nargs="+", default=["baseline", "repq"])
    p.add_argument("--calibs", nargs="+", default=CALIBS, choices=CALIBS,
                   help="calibration sources (sparse is left out for a teacher that cannot run sparse, a CNN)")
    p.add_argument("--calib-images", type=int, default=32)
    p.add_argument("--iterations", type=int, default=4000)
    p.add_argument("--limit", type=int, default=None, help="evaluate on the first N test images (smoke runs)")
    p.add_argument("--work", default=str(RESULTS / "dfq_work"), help="pools and partial results")
    p.add_argument("--name", default="dfq_accuracy")
    args = p.parse_args()
    work = Path(args.work)
    partial_path = work / "partial.json"
    done: dict[str, dict] = json.loads(partial_path.read_text()) if partial_path.exists() else {}

    rows, table, tested = [], [], {}
    for model_name in args.models:
        teacher = load_teacher(model_name)
        data, tested[model_name] = test_split(teacher, args.limit)
        key = f"{model_name}|fp32"
        if key not in done:
            done[key] = evaluate(teacher.model, data, progress=False)
            atomic_write_json(partial_path, done)
        fp32 = done[key]["top1"]
        rows.append({"model": model_name, "w_bits": 32, "a_bits": 32, "quantizer": "fp32", "calib": "-",
                     "top1": fp32, "top1_std": 0.0, "synthesis_s": 0.0})
        table.append([model_name, "FP32", "-", f"{fp32:.2f}", "", "", "", ""])
        calibs = [c for c in args.calibs if c != "sparse" or hasattr(teacher.model, "blocks")]
        pools, synth_s = synthetic_pools(teacher, model_name, args.seeds, [c for c in calibs if c in SYNTHETIC],
                                         work, args.iterations, args.calib_images, grid_seed=args.seeds[0])
        for setting in args.settings:
            w, a = bits(setting)
            for quantizer in args.quantizers:
                cells = {}
                for calib in calibs:
                    accs = []
                    for seed in args.seeds:
                        key = f"{model_name}|{setting}|{quantizer}|{calib}|{seed}|{args.limit}"
                        if key not in done:
                            source = PoolSource(pools[(calib, seed)]) if calib in ("dense", "sparse") \
                                else parse_source(calib)
                            cfg = QuantConfig.create(quantizer, w_bits=w, a_bits=a)
                            done[key] = quantize_and_evaluate(teacher, cfg, source, data,
                                                              calib_images=args.calib_images, seed=seed)
                            atomic_write_json(partial_path, done)
                            print(f"{setting} {quantizer} {calib} seed {seed}: {done[key]['top1']:.2f}",
                                  file=sys.stderr, flush=True)
                        accs.append(done[key]["top1"])
                    mean = statistics.mean(accs)
                    std = statistics.stdev(accs) if len(accs) > 1 else 0.0
                    syn = (statistics.mean(synth_s[(calib, s)] for s in args.seeds)
                           if calib in ("dense", "sparse") else 0.0)
                    cells[calib] = (mean, std)
                    rows.append({"model": model_name, "w_bits": w, "a_bits": a, "quantizer": quantizer,
                                 "calib": calib, "top1": round(mean, 2), "top1_std": round(std, 2),
                                 "synthesis_s": round(syn, 1), "top1_per_seed": accs, "seeds": args.seeds,
                                 "calib_images": args.calib_images})
                shown = [f"{cells[c][0]:.2f} ± {cells[c][1]:.2f}" if c in cells else "-" for c in CALIBS]
                if "dense" in cells and "sparse" in cells:
                    (d, d_std), (s, s_std) = cells["dense"], cells["sparse"]
                    shown.append(f"{s - d:+.2f}{' (within spread)' if abs(s - d) < max(s_std, d_std) else ''}")
                else:
                    shown.append("-")
                table.append([model_name, setting, quantizer] + shown)
    syn_note = ", ".join(f"{k} {statistics.mean(v for (kk, _), v in synth_s.items() if kk == k):.0f} s"
                         for k in SYNTHETIC if any(kk == k for kk, _ in synth_s))
    header = ["model", "bits", "quantizer", "real", "noise", "dense inversion", "sparse inversion",
              "sparse − dense"]
    tested_on = "; ".join(f"{v} ({k})" for k, v in tested.items())
    note = (f"\nTop-1 (%) on {tested_on}, mean ± std over calibration seeds {args.seeds}; "
            f"{args.calib_images} calibration images; "
            f"synthetic pools: {args.iterations} iterations, batch {min(32, args.calib_images)}, one pool per seed; "
            f"synthesis wall time per pool (mean): {syn_note}. 'within spread': |sparse − dense| is smaller than "
            "the larger seed-to-seed standard deviation of the two.\n")
    publish(args.name, "dfq_accuracy", vars(args), header, table, note, rows)


if __name__ == "__main__":
    main()
