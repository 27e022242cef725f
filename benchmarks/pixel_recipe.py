"""Which pixel-inversion recipe makes the best calibration images for a strictly quantized CNN.

Issue 16 asks that images from smi's best CNN pixel recipe calibrate a strict quantizer (the ``integer``
preset: BatchNorm folded into the convolutions, the input and every activation quantized, residual adds
included) at W4A4 at least as well as 32 real training images, with a seed spread under 1 pt. Each
contender is DeepInversion (``InversionConfig``'s defaults: Adam lr 0.25, the BN-statistics prior at 0.01
with its first layer x10, TV 1e-4, jitter and flip, 4000 iterations, batch 32) with some of its settings
changed (``NAME:SETTING=VALUE,...``: the synthesis settings of ``benchmarks/distill.py``'s contenders, plus
``option.KNOB=V``); one dense pool of ``--calib-images`` per contender and seed, calibration only, top-1 on
all test images of the teacher's dataset, mean ± std over seeds, against real training images drawn with
the same seeds. The unchanged recipe reads the pools of ``benchmarks/dfq_accuracy.py`` (``results/dfq_work``);
the others keep theirs in ``--work``/NAME under the names ``dfq_training.py --pools`` reads, so a recipe's
pools can go on to reconstruction there. Finished cells are cached (``results/NAME_cells.json``), so a rerun
resumes.

Run:  python benchmarks/pixel_recipe.py          (about 10 minutes per contender on 2 CPU cores)
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    RESULTS,
    Cells,
    mean_std,
    parse_settings,
    publish,
    quant_config,
    synthetic_pools,
    test_split,
)
from smi.data.pool import read_manifest  # noqa: E402
from smi.data.sources import PoolSource, parse_source  # noqa: E402
from smi.models.loading import load_teacher  # noqa: E402
from smi.quant.pipeline import quantize_and_evaluate  # noqa: E402

CONTENDERS = [
    "deepinversion:",  # the defaults (the pools of dfq_accuracy.py)
    "bn0.1:bn_weight=0.1",  # GDFQ's weight of the BN-statistics term
    "bn1:bn_weight=1",
    "crop:crop=0.5",  # IntraQ's random crops
    "cosine:lr_schedule=cosine,warmup=100",  # DeepInversion's code: 100 warm-up steps, then cosine
    "bn-only:ce_weight=0,bn_weight=1",  # ZeroQ: BN statistics only, no labels
    "bn0.03:bn_weight=0.03",
    "bn0.3:bn_weight=0.3",
    "bn0.1-cosine:bn_weight=0.1,lr_schedule=cosine,warmup=100",
    "bn0.1-crop:bn_weight=0.1,crop=0.5",
    "bn0.1-flat:bn_weight=0.1,option.bn_first_weight=1",  # every BN layer weighted alike
]


def parse_contender(spec: str):
    name, _, settings = spec.partition(":")
    if not name or "/" in name:
        raise SystemExit(f"error: contender {spec!r} is not NAME:SETTING=VALUE,...")
    try:
        return name, parse_settings([s for s in settings.split(",") if s])
    except ValueError as e:
        raise SystemExit(f"error: contender {spec!r}: {e}") from None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="fmnist_resnet_tiny", help="a shipped name or a checkpoint")
    p.add_argument("--contenders", nargs="+", default=CONTENDERS, metavar="NAME:SETTINGS",
                   help="recipes: NAME, a colon, then SETTING=VALUE pairs separated by commas (none: the defaults)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--settings", nargs="+", default=["W4A4"], help="bit settings, WxAy")
    p.add_argument("--quantizers", nargs="+", default=["integer"])
    p.add_argument("--calib-images", type=int, default=32)
    p.add_argument("--iterations", type=int, default=4000)
    p.add_argument("--limit", type=int, default=None, help="evaluate on the first N test images (smoke runs)")
    p.add_argument("--work", default=str(RESULTS / "pixel_recipe_work"), help="the contenders' pools")
    p.add_argument("--name", default="pixel_recipe")
    args = p.parse_args()
    contenders = [parse_contender(c) for c in args.contenders]
    teacher = load_teacher(args.teacher)
    data, tested = test_split(teacher, args.limit)
    cells = Cells(args.name)
    columns = [(s, q) for s in args.settings for q in args.quantizers]

    def cell(label: str, source_of, seed: int, recipe: dict) -> list[float]:
        out = []
        for setting, quantizer in columns:
            key = f"{args.teacher}|{setting}|{quantizer}|{label}|{seed}"
            spec = {"recipe": recipe, "calib_images": args.calib_images, "limit": args.limit}
            got = cells.get(key, spec)
            if got is None:
                res = quantize_and_evaluate(teacher, quant_config(quantizer, setting), source_of(), data,
                                            calib_images=args.calib_images, seed=seed)
                got = {"setting": spec, "top1": res["top1"]}
                cells.put(key, got)
                print(f"{label} {setting} {quantizer} seed {seed}: {res['top1']:.2f}", file=sys.stderr, flush=True)
            out.append(got["top1"])
        return out

    lines = [("real training images", "-", [cell("real", lambda: parse_source("real"), s, {}) for s in args.seeds],
              None)]
    for label, settings in contenders:
        changed = settings.changes()
        folder = RESULTS / "dfq_work" if label == "deepinversion" and not changed else Path(args.work) / label
        pools, _ = synthetic_pools(teacher, args.teacher, args.seeds, ["dense"], folder, args.iterations,
                                   args.calib_images, grid_seed=args.seeds[0], settings=settings)
        made = {s: read_manifest(pools[("dense", s)]) for s in args.seeds}
        per_seed = [cell(label, lambda folder=pools[("dense", s)]: PoolSource(folder), s, made[s]["identity"])
                    for s in args.seeds]
        lines.append((label, ", ".join(f"{k}={v}" for k, v in changed.items()) or "(defaults)", per_seed,
                      statistics.mean(float(m["seconds_total"]) for m in made.values())))
    rows, table = [], []
    for label, changed, per_seed, seconds in lines:
        shown = []
        for i, (setting, quantizer) in enumerate(columns):
            accs = [seed_accs[i] for seed_accs in per_seed]
            shown.append(f"{mean_std(accs)} ({' / '.join(f'{a:.2f}' for a in accs)})")
            rows.append({"contender": label, "changed": changed, "setting": setting, "quantizer": quantizer,
                         "top1": round(statistics.mean(accs), 2),
                         "top1_std": round(statistics.stdev(accs), 2) if len(accs) > 1 else 0.0,
                         "top1_per_seed": accs, "seeds": args.seeds, "synthesis_s": seconds})
        table.append([label, changed, *shown, "-" if seconds is None else f"{seconds:.0f}"])
    header = ["calibration images", "recipe changes", *[f"{s} {q}" for s, q in columns], "synthesis s / pool"]
    note = (f"\nTop-1 (%) of {args.teacher} on {tested}, calibration only on {args.calib_images} images, mean ± std "
            f"over seeds {args.seeds} (per seed in brackets; a seed draws the real images and makes its own pool). "
            f"Pools: dense DeepInversion, {args.iterations} iterations, batch {min(32, args.calib_images)}, "
            "with the recipe changes shown.\n")
    publish(args.name, "pixel_recipe", vars(args), header, table, note, rows)


if __name__ == "__main__":
    main()
