"""Data-free knowledge transfer at equal wall time: dense vs sparse synthesis, real images, noise.

The shipped teacher teaches a student (default fmnist_vit_mini, 0.21 M parameters, from
scratch) for the same budget of wall time, synthesis included:

- dense / sparse: online distillation as in the SMI reference, each epoch synthesizes one batch
  (dense, or sparse with the paper's stopping schedule scaled to ``--iterations``: 400 iterations
  stop 30 % at 5, 10, 20, 30) into the run's pool and then trains ``--online-steps`` steps on
  batches drawn from the whole pool;
- real: the 60,000 real training images (an upper bound: their cost is zero);
- noise: fresh Gaussian noise (a lower bound).

Every contender uses the same student, optimizer (AdamW, constant learning rate after one
warm-up epoch, so that accuracy at any time is comparable), temperature and batch size. Top-1 is
on all 10,000 Fashion-MNIST test images after every epoch; evaluation time is not counted. The
contenders run one after another in one process (not alternated: each is one long run).

Run:  python benchmarks/distill.py            (4 x --budget seconds plus evaluation)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, publish  # noqa: E402
from smi.data.datasets import eval_dataset  # noqa: E402
from smi.data.sources import NoiseSource, RealSource  # noqa: E402
from smi.evaluation import evaluate  # noqa: E402
from smi.inversion import InversionConfig, SparsityConfig  # noqa: E402
from smi.inversion.methods import METHODS  # noqa: E402
from smi.inversion.synthesis import OnlineSource  # noqa: E402
from smi.models.loading import load_teacher  # noqa: E402
from smi.transfer import DistillConfig, build_student, distill  # noqa: E402
from smi.viz import save_curves  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="fmnist_vit_tiny")
    p.add_argument("--student", default="fmnist_vit_mini")
    p.add_argument("--budget", type=float, default=600.0, help="seconds of synthesis + training per contender")
    p.add_argument("--iterations", type=int, default=400,
                   help="inversion iterations per synthesized batch (sparse: the default schedule scaled to them)")
    p.add_argument("--method", default="deepinversion", choices=METHODS.names(),
                   help="synthesis method of the online contenders (its defaults, with --iterations)")
    p.add_argument("--synth-batch", type=int, default=32, help="images synthesized per epoch (online)")
    p.add_argument("--online-steps", type=int, default=50, help="training steps per online epoch")
    p.add_argument("--real-steps", type=int, default=200, help="training steps per epoch on real images / noise")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--contenders", nargs="+", default=["dense", "sparse", "real", "noise"])
    p.add_argument("--work", default=str(RESULTS / "distill_work"), help="run folders (resumable)")
    p.add_argument("--name", default="distill")
    args = p.parse_args()

    teacher = load_teacher(args.teacher)
    test = eval_dataset("fashion-mnist", teacher)
    teacher_top1 = evaluate(teacher.model, test, progress=False)["top1"]
    rows, curves = [], {}
    for kind in args.contenders:
        online = kind in ("dense", "sparse")
        steps = args.online_steps if online else args.real_steps
        cfg = DistillConfig(epochs=1000, batch_size=args.batch_size, lr=args.lr, lr_schedule="constant",
                            steps_per_epoch=steps, time_budget_s=args.budget)
        synthesis = None
        if online:
            stops = SparsityConfig(()) if kind == "dense" else SparsityConfig().scaled(args.iterations / 4000)
            synthesis = InversionConfig.for_method(args.method, iterations=args.iterations,
                                                   batch_size=args.synth_batch, sparsity=stops)
        student = build_student(args.student, teacher)
        data = OnlineSource(synthesis) if online else {"real": RealSource(), "noise": NoiseSource()}[kind]
        res = distill(teacher, student, data, Path(args.work) / kind, cfg)
        last = res.log[-1]
        rows.append({"student": args.student, "data": kind, "top1": round(res.top1, 2), "wall_s": last["wall_s"],
                     "synthesis_s": last["synthesis_s"], "train_s": last["train_s"], "epochs": res.epochs,
                     "images": last["images"], "curve": [(r["wall_s"], r["top1"]) for r in res.log]})
        curves[f"{kind}"] = rows[-1]["curve"]
        print(f"{kind}: top-1 {res.top1:.2f} % after {last['wall_s']:.0f} s", file=sys.stderr, flush=True)

    by = {r["data"]: r for r in rows}
    if "dense" in by and "sparse" in by:
        target = by["dense"]["top1"]
        reach = next((w for w, a in by["sparse"]["curve"] if a >= target), None)
        by["sparse"]["reaches_dense_final_at_s"] = reach
    plot = save_curves(RESULTS / f"{args.name}.png", curves, xlabel="wall time (s): synthesis + training",
                       ylabel="test top-1 (%)", title=f"{args.student} distilled from {args.teacher}",
                       hlines={f"teacher {teacher_top1:.2f} %": teacher_top1})
    header = ["data", "top-1 (%)", "wall s", "of which synthesis s", "epochs", "images seen or made"]
    table = [[r["data"], f"{r['top1']:.2f}", f"{r['wall_s']:.0f}", f"{r['synthesis_s']:.0f}", r["epochs"],
              r["images"]] for r in rows]
    note = (f"\nStudent {args.student} (from scratch) distilled from {args.teacher} ({teacher_top1:.2f} % top-1) "
            f"with KL at T=20, AdamW lr {args.lr} constant after warm-up, batch {args.batch_size}; budget "
            f"{args.budget:.0f} s of synthesis + training per contender (each stops after the epoch that passes "
            f"it). Online synthesis ({args.method}): {args.synth_batch} images per epoch, {args.iterations} "
            f"iterations (sparse: "
            f"stops {SparsityConfig().scaled(args.iterations / 4000).spec()}), then "
            f"{args.online_steps} training steps. Top-1 on all 10,000 test images.\n")
    if "dense" in by and "sparse" in by:
        reach = by["sparse"].get("reaches_dense_final_at_s")
        note += (f"Sparse reaches dense's final {by['dense']['top1']:.2f} % at "
                 + (f"{reach:.0f} s (dense: {by['dense']['wall_s']:.0f} s).\n" if reach is not None
                    else "no point of its run.\n"))
    publish(args.name, "distill", vars(args), header, table, note, rows, also=(plot,), teacher_top1=teacher_top1,
            plot=str(plot.relative_to(RESULTS.parent)))


if __name__ == "__main__":
    main()
