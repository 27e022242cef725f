"""The synthesis-method zoo: every method, dense and sparse, on the shipped teachers.

For each teacher (``--teacher``; default the two Fashion-MNIST ones, ViT and CNN), each method x
{dense, sparse (ViTs only)} x seed: one pool of 32 images, its synthesis wall time per image, the
teacher's top-1 on its own synthetic images (kept patches only), and the top-1 on all test images of
the teacher's dataset after quantization calibrated on that pool: W4A8 and W4A4 with ``repq``, W8A8 with ``baseline``.
Mean and standard deviation over seeds. Attention-reading methods (psaq, sardfq, mimiq) do not
apply to the CNN. A PNG grid per method puts the dense and sparse pools side by side.

Every method runs ``--iterations`` steps (default 1000: PSAQ-ViT's own two rounds of 500; the
others' papers use more, 1000 keeps the table affordable on a CPU) with its own other defaults
and the paper's stopping schedule for sparse runs. Pools and finished evaluations are cached in
``--work``, so an interrupted run resumes and more seeds can be added later.

Run:  python benchmarks/method_zoo.py               (about 25 minutes per seed on 2 CPU cores)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, markdown_table, mean_std, publish, test_split  # noqa: E402
from smi.data.pool import load_pool, read_manifest  # noqa: E402
from smi.data.sources import PoolSource  # noqa: E402
from smi.errors import SmiError  # noqa: E402
from smi.evaluation import teacher_accuracy_on_pool  # noqa: E402
from smi.inversion import SparsityConfig, synthesize  # noqa: E402
from smi.inversion.config import InversionConfig  # noqa: E402
from smi.inversion.methods import pool_methods  # noqa: E402
from smi.models.loading import load_teacher  # noqa: E402
from smi.models.sparse import check_sparse_capable  # noqa: E402
from smi.quant import QuantConfig  # noqa: E402
from smi.quant.pipeline import quantize_and_evaluate  # noqa: E402
from smi.utils.io import atomic_write_json  # noqa: E402

SETTINGS = [(4, 8, "repq"), (4, 4, "repq"), (8, 8, "baseline")]
ATTENTION = {"psaq", "sardfq", "mimiq"}


def _is_vit(teacher) -> bool:
    try:
        check_sparse_capable(teacher.model)
        return True
    except SmiError:
        return False


def sparse_vs_dense(rows: list[dict]) -> str:
    """A markdown table pairing each ViT method's dense and sparse pools: synthesis time per image and its ratio,
    top-1 dense / sparse at every setting, and sparse − dense at W4A4 per seed (mean ± std), with the mean over
    the methods; empty when no row has a sparse twin."""
    by = {(r["model"], r["method"], r["sparsity"], f"W{r['w_bits']}A{r['a_bits']}"): r for r in rows}
    pairs = list(dict.fromkeys((r["model"], r["method"]) for r in rows if r["sparsity"] == "sparse"))
    if not pairs:
        return ""
    settings = [f"W{w}A{a}" for w, a, _ in SETTINGS]
    header = ["model", "method", "dense s / image", "sparse s / image", "speed-up",
              *(f"W{w}A{a} {q} dense / sparse" for w, a, q in SETTINGS), "sparse − dense (W4A4, per seed)"]
    table, means = [], {s: ([], []) for s in settings}
    diffs_all: list[float] = []
    for model, method in pairs:
        d, sp = by[(model, method, "dense", "W4A4")], by[(model, method, "sparse", "W4A4")]
        cells = []
        for s in settings:
            dd, ss = by[(model, method, "dense", s)]["top1"], by[(model, method, "sparse", s)]["top1"]
            means[s][0].append(dd)
            means[s][1].append(ss)
            cells.append(f"{dd:.2f} / {ss:.2f}")
        diffs = [b - a for a, b in zip(d["top1_per_seed"], sp["top1_per_seed"], strict=True)]
        diffs_all.append(statistics.mean(diffs))
        table.append([model, method, f"{d['synthesis_s_per_image']:.2f}", f"{sp['synthesis_s_per_image']:.2f}",
                      f"{d['synthesis_s_per_image'] / sp['synthesis_s_per_image']:.1f}×", *cells,
                      ("+" if diffs_all[-1] >= 0 else "") + mean_std(diffs)])
    table.append([f"**mean of the {len(pairs)}**", "", "", "", "",
                  *(f"{statistics.mean(a):.2f} / {statistics.mean(b):.2f}" for a, b in means.values()),
                  f"{statistics.mean(diffs_all):+.2f}"])
    return "\nSparse against dense, method by method (the same cells; speed-up = dense / sparse time per image):\n\n" \
        + markdown_table(header, table)


def _side_by_side(dense: Path, sparse: Path | None, out: Path) -> None:
    """One PNG: the dense grid above the sparse grid."""
    from PIL import Image

    imgs = [Image.open(p / "grid.png") for p in (dense, sparse) if p is not None]
    w = max(i.width for i in imgs)
    canvas = Image.new("RGB", (w, sum(i.height for i in imgs)), "white")
    y = 0
    for i in imgs:
        canvas.paste(i, (0, y))
        y += i.height
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", "--models", dest="models", nargs="+", default=["fmnist_vit_tiny", "fmnist_resnet_tiny"],
                   help="teachers (shipped names or checkpoints), each evaluated on its own dataset's test split")
    p.add_argument("--methods", nargs="+", default=pool_methods(), choices=pool_methods())
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--iterations", type=int, default=1000)
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--work", default=str(RESULTS / "method_zoo_work"))
    p.add_argument("--name", default="method_zoo")
    args = p.parse_args()
    work = Path(args.work)
    partial_path = work / "partial.json"
    done: dict = json.loads(partial_path.read_text()) if partial_path.exists() else {}

    rows, table, tested = [], [], {}
    for model_name in args.models:
        teacher = load_teacher(model_name)
        vit = _is_vit(teacher)
        data, tested[model_name] = test_split(teacher)
        for method in args.methods:
            if method in ATTENTION and not vit:
                continue
            pools: dict[str, Path] = {}
            for sparsity in (["dense", "sparse"] if vit else ["dense"]):
                per_seed: dict[str, list[float]] = {}
                for seed in args.seeds:
                    cfg = InversionConfig.for_method(
                        method, iterations=args.iterations, batch_size=args.images,
                        sparsity=SparsityConfig(()) if sparsity == "dense" else SparsityConfig(),
                        jitter_unit="patch" if vit else "pixel")
                    folder = work / f"{model_name}_{method}_{sparsity}_seed{seed}"
                    synthesize(teacher, cfg, args.images, folder, seed=seed, grid=seed == args.seeds[0])
                    if seed == args.seeds[0]:
                        pools[sparsity] = folder
                    key = f"{model_name}|{method}|{sparsity}|{seed}"
                    if f"{key}|teacher" not in done:
                        done[f"{key}|teacher"] = teacher_accuracy_on_pool(teacher, load_pool(folder))
                    per_seed.setdefault("synthesis_s_per_image", []).append(
                        float(read_manifest(folder)["seconds_total"]) / args.images)
                    per_seed.setdefault("teacher_top1", []).append(done[f"{key}|teacher"])
                    for w, a, q in SETTINGS:
                        k = f"{key}|W{w}A{a}|{q}"
                        if k not in done:
                            cfg = QuantConfig.create(q, w_bits=w, a_bits=a)
                            done[k] = quantize_and_evaluate(teacher, cfg, PoolSource(folder), data,
                                                            calib_images=args.images, seed=seed)["top1"]
                            atomic_write_json(partial_path, done)
                            print(f"{k}: {done[k]:.2f}", file=sys.stderr, flush=True)
                        per_seed.setdefault(f"W{w}A{a}|{q}", []).append(done[k])
                    atomic_write_json(partial_path, done)

                def ms(xs: list[float]) -> tuple[float, float]:
                    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)

                syn = ms(per_seed["synthesis_s_per_image"])
                tea = ms(per_seed["teacher_top1"])
                cells = []
                for w, a, q in SETTINGS:
                    m, s = ms(per_seed[f"W{w}A{a}|{q}"])
                    rows.append({"model": model_name, "method": method, "sparsity": sparsity, "w_bits": w,
                                 "a_bits": a, "quantizer": q, "top1": round(m, 2), "top1_std": round(s, 2),
                                 "top1_per_seed": per_seed[f"W{w}A{a}|{q}"],
                                 "synthesis_s_per_image": round(syn[0], 3),
                                 "teacher_top1_on_synthetic": round(tea[0], 2), "seeds": args.seeds})
                    cells.append(f"{m:.2f} ± {s:.2f}")
                table.append([model_name, method, sparsity, f"{syn[0]:.2f}", f"{tea[0]:.1f}", *cells])
            _side_by_side(pools["dense"], pools.get("sparse"), RESULTS / "method_zoo" / f"{model_name}_{method}.png")

    header = ["model", "method", "sparsity", "synthesis s / image", "teacher top-1 on own images (%)",
              "W4A8 repq", "W4A4 repq", "W8A8 baseline"]
    tested_on = "; ".join(f"{v} ({k})" for k, v in tested.items())
    note = (f"\nTop-1 (%) on {tested_on} after quantization calibrated on {args.images} "
            f"synthetic images, mean ± std over seeds {args.seeds}; {args.iterations} iterations per method, batch "
            f"{args.images}; sparse: the paper's schedule (50/100/200/300, 0.3 each). Grids: "
            "`results/method_zoo/MODEL_METHOD.png` (dense above sparse).\n") + sparse_vs_dense(rows)
    publish(args.name, "method_zoo", vars(args), header, table, note, rows)


if __name__ == "__main__":
    main()
