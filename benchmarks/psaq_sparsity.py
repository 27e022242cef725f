"""PSAQ-ViT's prior under sparse inversion: how the number of kept patches changes what it makes.

In the method zoo, psaq is the one method whose sparse pools calibrate far worse than its dense
ones. This script varies only the stopping schedule of psaq (its defaults otherwise: 1000
iterations, two rounds, entropy 1.0 + CE 1.0 + 0.05 |TV - v|) on the shipped ViT: dense, then
one, two and four stops of 30 % (the paper's 50/100/200/300), and reports for each the kept
patches at the end, the synthesis time per image, the teacher's top-1 on its own images (kept
patches only) and W4A4 repq top-1 on the teacher's whole test split calibrated on the pool.
Mean ± std over seeds. ``--teacher`` picks another ViT (e.g. fmnist_scene_vit, with ``--name``).

Run:  python benchmarks/psaq_sparsity.py          (about 12 minutes on 2 CPU cores)
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import mean_std, publish, test_split  # noqa: E402
from smi.data.pool import load_pool, read_manifest  # noqa: E402
from smi.data.sources import PoolSource  # noqa: E402
from smi.evaluation import teacher_accuracy_on_pool  # noqa: E402
from smi.inversion import InversionConfig, SparsityConfig, synthesize  # noqa: E402
from smi.models.loading import load_teacher  # noqa: E402
from smi.quant import RepQConfig  # noqa: E402
from smi.quant.pipeline import quantize_and_evaluate  # noqa: E402

SCHEDULES = {
    "dense": (),
    "1 stop (50)": ((50, 0.3),),
    "2 stops (50, 100)": ((50, 0.3), (100, 0.3)),
    "4 stops (50..300, default)": ((50, 0.3), (100, 0.3), (200, 0.3), (300, 0.3)),
}


def _ms(xs: list[float]) -> str:
    return mean_std(xs, digits=1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", "--model", dest="model", default="fmnist_vit_tiny",
                   help="a ViT teacher (shipped name or checkpoint), evaluated on its own dataset's test split")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--iterations", type=int, default=1000)
    p.add_argument("--work", default="runs/psaq_sparsity", help="pool folders (resumable; not kept in git)")
    p.add_argument("--name", default="psaq_sparsity", help="results/NAME.{json,md}")
    args = p.parse_args()
    teacher = load_teacher(args.model)
    data, tested = test_split(teacher)
    tag = Path(args.model).stem
    rows, table = [], []
    for name, stops in SCHEDULES.items():
        kept, recog, w4a4, secs = [], [], [], []
        for seed in args.seeds:
            cfg = InversionConfig.for_method("psaq", iterations=args.iterations, batch_size=args.images,
                                             sparsity=SparsityConfig(stops), jitter_unit="patch")
            folder = Path(args.work) / tag / f"{len(stops)}stops_seed{seed}"
            synthesize(teacher, cfg, args.images, folder, seed=seed, grid=False)
            pool = load_pool(folder)
            secs.append(float(read_manifest(folder)["seconds_total"]) / args.images)
            kept.append(pool.masks.sum(1).float().mean().item())
            recog.append(teacher_accuracy_on_pool(teacher, pool))
            w4a4.append(quantize_and_evaluate(teacher, RepQConfig(w_bits=4, a_bits=4), PoolSource(folder), data,
                                              calib_images=args.images, seed=seed)["top1"])
            print(f"{name} seed {seed}: kept {kept[-1]:.0f}, teacher {recog[-1]:.1f}, W4A4 {w4a4[-1]:.2f}",
                  file=sys.stderr, flush=True)
        rows.append({"model": args.model, "method": "psaq", "schedule": name, "stops": [list(s) for s in stops],
                     "kept_patches": statistics.mean(kept),
                     "synthesis_s_per_image": round(statistics.mean(secs), 3), "teacher_top1_on_synthetic": recog,
                     "w_bits": 4, "a_bits": 4, "quantizer": "repq", "top1": round(statistics.mean(w4a4), 2),
                     "top1_std": round(statistics.stdev(w4a4), 2) if len(w4a4) > 1 else 0.0,
                     "top1_per_seed": w4a4, "seeds": args.seeds})
        table.append([name, f"{statistics.mean(kept):.0f} / {pool.masks.shape[1]}", f"{statistics.mean(secs):.2f}",
                      _ms(recog), _ms(w4a4)])
    header = ["schedule", "kept patches at the end", "synthesis s / image", "teacher top-1 on own images (%)",
              "W4A4 repq top-1 (%)"]
    note = (f"\npsaq on {args.model}, {args.images} images, {args.iterations} iterations, mean ± std over seeds "
            f"{args.seeds}; only the stopping schedule differs. W4A4 top-1 on {tested}.\n")
    publish(args.name, "psaq_sparsity", vars(args), header, table, note, rows)


if __name__ == "__main__":
    main()
