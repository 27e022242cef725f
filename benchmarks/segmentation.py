"""Data-free quantization of a segmenter (DFQ-SAM): mIoU after W8A8 / W6A6 / W4A4 by calibration source.

The shipped ``fmnist_scene_segmenter`` (object vs background on fmnist-scenes) is quantized with the
repq preset (its post-LayerNorm scale reparameterization is DFQ-SAM's) and calibrated on 32 images
of: real training scenes, Gaussian noise, ``deepinversion`` pools (fixed random blob targets) and
``dfq-sam`` pools (blob targets evolving toward the segmenter's confident labels, + patch-similarity
entropy), each dense and sparse (default schedule: 196 -> 46 patches), one pool per seed. Each cell
is the mIoU on all 10,000 test scenes, mean ± std over seeds; pools report their synthesis time. A
figure (``results/segmentation.png``) shows pool images with their final target maps and the
segmenter's prediction. Pools and finished cells are kept, so a rerun resumes.

Run:  python benchmarks/segmentation.py          (about 2 hours on 2 CPU cores: per seed, pools of about 4, 10
      and 3 minutes for deepinversion dense, dfq-sam dense and sparse; each cell about 80 s)
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, Cells, bits, publish, synthetic_pools, test_split  # noqa: E402
from smi.data.pool import load_pool  # noqa: E402
from smi.data.sources import PoolSource, parse_source  # noqa: E402
from smi.evaluation import evaluate_segmentation  # noqa: E402
from smi.models.loading import load_teacher  # noqa: E402
from smi.quant import QuantConfig  # noqa: E402
from smi.quant.pipeline import quantize_and_evaluate  # noqa: E402

SETTINGS = ["W8A8", "W6A6", "W4A4"]
SYNTHETIC = {"deepinversion dense": ("deepinversion", "dense"), "deepinversion sparse": ("deepinversion", "sparse"),
             "dfq-sam dense": ("dfq-sam", "dense"), "dfq-sam sparse": ("dfq-sam", "sparse")}
CALIBS = ["real", "noise", *SYNTHETIC]


def figure(teacher, pools: dict[str, str], path: Path, n: int = 8) -> Path:
    """Rows per pool: images (stopped patches black), their target maps, the segmenter's prediction."""
    from smi.viz import _pyplot, _save_figure, denormalize

    plt = _pyplot()
    fig, axes = plt.subplots(3 * len(pools), n, figsize=(1.2 * n, 3.7 * len(pools)))
    for r, (name, folder) in enumerate(pools.items()):
        pool = load_pool(folder)
        with torch.no_grad():
            pred = teacher.model(pool.images[:n]).argmax(1)
        shown = denormalize(pool.images[:n], teacher.mean, teacher.std).clamp(0, 1)
        for i in range(n):
            for k, (img, cmap) in enumerate(((shown[i, 0], "gray"), (pool.maps[i].float(), "viridis"),
                                             (pred[i].float(), "viridis"))):
                ax = axes[3 * r + k, i]
                ax.imshow(img, cmap=cmap, vmin=0, vmax=1)
                ax.set_xticks([]), ax.set_yticks([])
            if i == 0:
                for k, what in enumerate(("image", "target", "prediction")):
                    axes[3 * r + k, 0].set_ylabel(f"{name}\n{what}" if k == 0 else what, fontsize=7)
    return _save_figure(fig, path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="fmnist_scene_segmenter", help="a segmenter (shipped name or checkpoint)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--settings", nargs="+", default=SETTINGS)
    p.add_argument("--quantizer", default="repq")
    p.add_argument("--calib", nargs="+", default=CALIBS, choices=CALIBS)
    p.add_argument("--calib-images", type=int, default=32)
    p.add_argument("--iterations", type=int, default=1000, help="inversion steps per pool (dfq-sam's default)")
    p.add_argument("--limit", type=int, default=None, help="evaluate on the first N test scenes (smoke runs)")
    p.add_argument("--work", default=str(RESULTS / "segmentation_work"), help="pools")
    p.add_argument("--name", default="segmentation")
    args = p.parse_args()
    work = Path(args.work)
    cells = Cells(args.name)
    teacher = load_teacher(args.teacher)
    data, tested = test_split(teacher, args.limit)
    setting = {"teacher": teacher.identity(), "limit": args.limit}
    fp = cells.get("fp32", setting) or {"setting": setting, **evaluate_segmentation(teacher.model, data)}
    cells.put("fp32", fp)
    pools: dict[tuple[str, int], str] = {}
    synth_s: dict[str, list[float]] = {}
    for calib, (method, kind) in SYNTHETIC.items():
        if calib in args.calib:
            made, secs = synthetic_pools(teacher, args.teacher.replace("/", "_"), args.seeds, [kind], work,
                                         args.iterations, args.calib_images, grid_seed=args.seeds[0], method=method)
            pools.update({(calib, s): made[(kind, s)] for s in args.seeds})
            synth_s[calib] = [secs[(kind, s)] for s in args.seeds]
    rows = [{"w_bits": 32, "a_bits": 32, "calib": "-", "miou": round(fp["miou"], 2), "miou_std": 0.0}]
    table = [["FP32", "-", f"{fp['miou']:.2f}", "", ""]]
    for bits_name in args.settings:
        w, a = bits(bits_name)
        for calib in args.calib:
            scores = []
            for seed in args.seeds:
                key = f"{bits_name}|{args.quantizer}|{calib}|{seed}"
                spec = {**setting, "calib_images": args.calib_images, "iterations": args.iterations}
                cell = cells.get(key, spec)
                if cell is None:
                    source = PoolSource(pools[(calib, seed)]) if calib in SYNTHETIC else parse_source(calib)
                    res = quantize_and_evaluate(teacher, QuantConfig.create(args.quantizer, w_bits=w, a_bits=a),
                                                source, data, calib_images=args.calib_images, seed=seed)
                    cell = {"setting": spec, "miou": res["miou"], "pixel_acc": res["pixel_acc"]}
                    cells.put(key, cell)
                    print(f"{bits_name} {calib} seed {seed}: mIoU {res['miou']:.2f}", file=sys.stderr, flush=True)
                scores.append(cell["miou"])
            mean = statistics.mean(scores)
            std = statistics.stdev(scores) if len(scores) > 1 else 0.0
            syn = statistics.mean(synth_s[calib]) if calib in synth_s else 0.0
            rows.append({"w_bits": w, "a_bits": a, "quantizer": args.quantizer, "calib": calib,
                         "miou": round(mean, 2), "miou_std": round(std, 2), "miou_per_seed": scores,
                         "seeds": args.seeds, "synthesis_s": round(syn, 1)})
            real = next((r["miou"] for r in rows if r.get("calib") == "real" and r["w_bits"] == w), None)
            gap = f"{mean - real:+.2f}" if real is not None and calib != "real" else ""
            table.append([bits_name, calib, f"{mean:.2f} ± {std:.2f}", gap, f"{syn:.0f}" if syn else ""])
    shown = {c: pools[(c, args.seeds[0])] for c in ("dfq-sam dense", "dfq-sam sparse", "deepinversion sparse")
             if (c, args.seeds[0]) in pools}
    png = figure(teacher, shown, RESULTS / f"{args.name}.png") if shown else None
    note = (f"\nmIoU (%) of {args.teacher} on {tested}, {args.quantizer} quantizer, {args.calib_images} calibration "
            f"images, mean ± std over seeds {args.seeds}; 'vs real': the difference to real-scene calibration at the "
            f"same bits; synthetic pools: {args.iterations} iterations, batch {min(32, args.calib_images)}, sparse = "
            "the default schedule (196 -> 46 patches); synthesis s: wall time per pool (mean).\n")
    publish(args.name, "segmentation", vars(args), ["bits", "calibration", "mIoU", "vs real", "synthesis s"],
            table, note, rows, also=(png,) if png else ())


if __name__ == "__main__":
    main()
