"""Are images synthesized under bfloat16 autocast as good as fp32's? (``--precision bf16``)

For each seed, the teacher inverts one pool in fp32 and one in bf16 (deepinversion, the paper's 4000
iterations with its default sparse schedule, batch 32: the pools of ``dfq_accuracy.py``, reused if
present), then: the teacher's top-1 on its own images (kept patches only, against the planned classes),
and the test top-1 of the teacher quantized with repq at each ``--settings`` calibrated on that pool.
Mean ± std over seeds; top-1 on all test images. Speed is not measured here (the pools may be made at
different times): ``inversion_speed.py --bf16`` times bf16 against fp32 in one alternating run.

Run:  python benchmarks/bf16_quality.py      (about 20 minutes on 2 CPU cores with the fp32 pools present)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, Cells, bits, mean_std, publish, synthetic_pools, test_split  # noqa: E402
from smi.data.pool import load_pool  # noqa: E402
from smi.data.sources import PoolSource  # noqa: E402
from smi.evaluation import teacher_accuracy_on_pool  # noqa: E402
from smi.models.loading import load_teacher  # noqa: E402
from smi.quant import QuantConfig  # noqa: E402
from smi.quant.pipeline import quantize_and_evaluate  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="fmnist_vit_tiny")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--kind", default="sparse", choices=["sparse", "dense"])
    p.add_argument("--settings", nargs="+", default=["W4A8", "W4A4"])
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--iterations", type=int, default=4000)
    p.add_argument("--pools", default=str(RESULTS / "dfq_work"), help="pool folders (shared with dfq_accuracy)")
    p.add_argument("--name", default="bf16_quality")
    args = p.parse_args()
    teacher = load_teacher(args.teacher)
    data, tested = test_split(teacher)
    cells = Cells(args.name)
    kinds = {"fp32": args.kind, "bf16": f"{args.kind}-bf16"}
    pools, _ = synthetic_pools(teacher, args.teacher, args.seeds, list(kinds.values()), Path(args.pools),
                               args.iterations, args.images)
    rows, table = [], []
    for precision, kind in kinds.items():
        own, tops = [], {s: [] for s in args.settings}
        for seed in args.seeds:
            folder = pools[(kind, seed)]
            setting = {"teacher": args.teacher, "pool": Path(folder).name, "images": args.images,
                       "iterations": args.iterations, "settings": args.settings}
            key = f"{args.teacher}|{kind}|{seed}"
            cell = cells.get(key, setting)
            if cell is None:
                cell = {"own": teacher_accuracy_on_pool(teacher, load_pool(folder))}
                for s in args.settings:
                    w, a = bits(s)
                    cell[s] = quantize_and_evaluate(teacher, QuantConfig.create("repq", w_bits=w, a_bits=a),
                                                    PoolSource(folder), data, calib_images=args.images,
                                                    seed=seed)["top1"]
                cells.put(key, {**cell, "setting": setting})
                print(f"{precision} seed {seed}: {cell}", file=sys.stderr, flush=True)
            own.append(cell["own"])
            for s in args.settings:
                tops[s].append(cell[s])

        rows.append({"teacher": args.teacher, "precision": precision, "kind": args.kind, "seeds": args.seeds,
                     "teacher_top1_on_own": own, **{f"{s}_top1": tops[s] for s in args.settings}})
        table.append([precision, mean_std(own)] + [mean_std(tops[s]) for s in args.settings])
    header = ["synthesis precision", "teacher top-1 on its own images (%)"] + [
        f"{s} repq top-1 (%)" for s in args.settings]
    note = (f"\n{args.teacher}; deepinversion, {args.kind}, {args.iterations} iterations, batch 32, {args.images} "
            f"images per pool, one pool per seed {args.seeds}; quantized top-1 on {tested}, calibrated on that "
            "pool; mean ± std over seeds.\n")
    publish(args.name, "bf16_quality", vars(args), header, table, note, rows)


if __name__ == "__main__":
    main()
