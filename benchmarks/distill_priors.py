"""Which synthesis settings make the shipped ViT's images teach a student? A quick offline search.

For each variant (synthesis settings on top of ``--method``), the teacher inverts one pool of
``--images`` images (sparse with the paper's schedule scaled to ``--iterations``, or dense), then a
fresh student (default: the CNN fmnist_resnet_tiny, which learns from the CNN teacher's images: see
``distill.py``) trains offline on that pool alone for ``--steps`` steps of batch 64 with mixup; top-1
on all 10,000 test images. The figures rank synthesis settings cheaply; ``distill.py`` measures the
winners at equal wall time. Pools and runs live under ``--work`` and resume; finished variants are
kept in ``results/NAME_cells.json``.

A variant is ``NAME=VALUE,NAME=VALUE`` over ``method`` (default ``--method``), InversionConfig fields
(``lr``, ``tv_l2``, ``tv_l1``, ``l2``, ``jitter``, ``jitter_unit``, ``color_shift``, ``blur``, ``iterations``)
and ``term.NAME`` (an extra term's weight), or ``base`` for the method's defaults; ``dense`` inverts
without stopping patches; ``augment_color=S`` and ``augment_background=P`` train the student on augmented
images (``smi distill --augment-color``, ``--augment-background``; variants that differ only in these share a pool).
``real`` (the teacher's training split) and ``noise`` (fresh Gaussian noise) are the bounds:
the same student and steps, no synthesis.

Run:  python benchmarks/distill_priors.py --variants base lr=0.05 tv_l2=0.01 term.adversarial=1
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, STUDENT_SETTINGS, Cells, parse_settings, publish  # noqa: E402
from smi.data.sources import NoiseSource, PoolSource, RealSource  # noqa: E402
from smi.inversion import InversionConfig, SparsityConfig, synthesize  # noqa: E402
from smi.models.loading import load_teacher  # noqa: E402
from smi.transfer import DistillConfig, build_student, distill  # noqa: E402


def variant_config(spec: str, method: str, iterations: int, batch: int) -> tuple[InversionConfig, dict[str, float]]:
    """``"lr=0.05,dense,augment_color=1"`` -> the synthesis config it names, and the student's augmentations."""
    try:
        settings = parse_settings([i for i in filter(None, spec.split(",")) if i not in ("base", "dense")],
                                  {"method": str})
    except ValueError as e:
        raise SystemExit(f"error: variant {spec!r}: {e}, base or dense") from None
    method = settings.other.get("method", method)
    iterations = settings.synthesis.get("iterations", iterations)
    dense = "dense" in spec.split(",")
    sparsity = SparsityConfig(()) if dense else SparsityConfig().scaled(iterations / 4000)
    return settings.synthesis_config(method, iterations=iterations, batch_size=batch, sparsity=sparsity), \
        settings.student


def safe(spec: str) -> str:
    return "".join(c if c.isalnum() or c in ".-" else "_" for c in spec)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=["base"])
    p.add_argument("--teacher", default="fmnist_vit_tiny")
    p.add_argument("--student", default="fmnist_resnet_tiny")
    p.add_argument("--method", default="deepinversion")
    p.add_argument("--images", type=int, default=256, help="pool size per variant")
    p.add_argument("--batch", type=int, default=128, help="images inverted together")
    p.add_argument("--iterations", type=int, default=200)
    p.add_argument("--steps", type=int, default=1000, help="student training steps (batch 64, mixup 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default=str(RESULTS / "distill_priors_work"))
    p.add_argument("--name", default="distill_priors")
    args = p.parse_args()
    bounds = {"real": RealSource(), "noise": NoiseSource()}
    configs = {v: (None, {}) if v in bounds else variant_config(v, args.method, args.iterations, args.batch)
               for v in args.variants}
    teacher = load_teacher(args.teacher)
    cells = Cells(args.name)
    rows = []
    for spec, (cfg, student) in configs.items():
        key = f"{safe(spec)}_seed{args.seed}"
        kd = DistillConfig(epochs=1, steps_per_epoch=args.steps, batch_size=64, lr=1e-3, warmup_epochs=0.1,
                           lr_schedule="cosine", mixup=1.0, seed=args.seed, **student)
        setting = {"teacher": args.teacher, "student": args.student, "synthesis": cfg.to_dict() if cfg else spec,
                   "images": args.images, "seed": args.seed, "distill": kd.to_dict()}
        cell = cells.get(key, setting)
        if cell is None:
            t0 = time.perf_counter()
            source, grid = bounds.get(spec), None
            if cfg is not None:  # variants that differ only in the student's training share one pool
                synth_spec = ",".join(i for i in spec.split(",") if i.partition("=")[0] not in STUDENT_SETTINGS)
                pool_dir = Path(args.work) / key.replace(safe(spec), safe(synth_spec)) / "pool"
                pool = synthesize(teacher, cfg, args.images, pool_dir, seed=args.seed,
                                  progress=False, grid=True)
                source, grid = PoolSource(str(pool.folder)), str(pool.grid)
            synth_s = time.perf_counter() - t0
            res = distill(teacher, build_student(args.student, teacher, seed=args.seed), source,
                          Path(args.work) / key / "kd", kd, progress=False)
            cell = {"setting": setting, "top1": res.top1, "synthesis_s": round(synth_s, 1),
                    "train_s": res.log[-1]["train_s"], "grid": grid}
            cells.put(key, cell)
        print(f"{spec}: student top-1 {cell['top1']:.2f} %", file=sys.stderr, flush=True)
        rows.append({"variant": spec, **{k: v for k, v in cell.items() if k != "setting"}})
    header = ["variant", "student top-1 (%)", "synthesis s", "training s"]
    table = [[r["variant"], f"{r['top1']:.2f}", f"{r['synthesis_s']:.0f}", f"{r['train_s']:.0f}"] for r in rows]
    note = (f"\n{args.teacher} inverts {args.images} images per variant ({args.method}, {args.iterations} iterations, "
            f"batch {args.batch}; sparse with the paper's schedule scaled to the iterations unless 'dense'); a fresh "
            f"{args.student} trains on that pool alone for {args.steps} steps (batch 64, AdamW 1e-3 cosine, KL at "
            f"T=20, mixup 1). Top-1 on all 10,000 Fashion-MNIST test images; seed {args.seed}.\n")
    publish(args.name, "distill_priors", vars(args), header, table, note, rows)


if __name__ == "__main__":
    main()
