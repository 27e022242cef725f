"""Generator-based data-free quantization, each method against pixel inversion at the same wall time.

For each teacher (``--teacher``; default the shipped CNN and ViT), method and seed:

1. train the method's generator against the teacher (``smi train-generator``: ``--gen-epochs`` x
   ``--gen-steps`` steps of batch 64; texq's texture centres come from a dense DeepInversion pool
   of 64 images, whose synthesis time is counted);
2. per bit setting (``--settings``): quantize with ``repq`` calibrated on 32 generated images, then
   quantization-aware training on fresh generated images (``--qat-epochs`` x ``--qat-steps``,
   batch 32; causal adds ``--style-pairs 1``); ``akt`` instead trains a gdfq generator alongside
   the quantized model with AdaDFQ's game and AKT's feature distillation (``smi qat
   --online-generator gdfq --generator-game adadfq --generator-adversarial 1 --feature-loss akt``;
   the feature term reads transformer blocks, so on a CNN teacher the row is AdaDFQ's game alone);
3. top-1 on the teacher's whole test split, the trained generator's images per second, and the
   wall time (generator training + calibration + QAT). A generator does not depend on the bit setting:
   it is trained once per teacher, method and seed, and every setting's wall time counts its training.

Pixel rows spend the same wall time on pixel inversion: QAT from online synthesis (dense; and
sparse for a ViT teacher), each epoch inverting 32 images for 200 iterations, with as many epochs
(cosine learning rate over them) as the mean wall time of the generator rows of that teacher, setting and
seed holds (per seed, so adding seeds leaves finished cells valid), judged from the time of the calibration
pool (one epoch's synthesis) times 1.3, and stopped at that time if the estimate was short. Rows without a
trained generator (pixel, akt) are calibrated on a pool of 32 images inverted the same way, its time counted.
Finished cells are kept in ``results/NAME_cells.json``, so a rerun only runs what is missing. Each trained
generator of the last seed draws four images per class into ``results/NAME/TEACHER_METHOD.png`` (a column per
class, fixed noise).

Run:  python benchmarks/generators.py        (hours on 2 CPU cores; --methods / --settings / --seeds to split it)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, Cells, publish, quant_config, test_split  # noqa: E402
from smi.data.sources import PoolSource  # noqa: E402
from smi.evaluation import evaluate  # noqa: E402
from smi.generators import GeneratorConfig, GeneratorSource, OnlineGeneratorSource, train_generator  # noqa: E402
from smi.generators.train import load_generator  # noqa: E402
from smi.inversion import InversionConfig, SparsityConfig, synthesize  # noqa: E402
from smi.inversion.synthesis import OnlineSource  # noqa: E402
from smi.models.loading import load_teacher  # noqa: E402
from smi.quant.pipeline import quantize_teacher  # noqa: E402
from smi.quant.qat import QatConfig, qat  # noqa: E402
from smi.quant.reconstruct import ReconstructConfig  # noqa: E402
from smi.utils.io import atomic_write_json  # noqa: E402
from smi.viz import save_grid  # noqa: E402

METHODS = ["gdfq", "qimera", "texq", "acq", "causal", "akt"]
PIXEL_EPOCH_COST = 1.3  # a pixel epoch's seconds over its pool's synthesis seconds (the QAT steps on top), estimated


def images_per_second(folder: Path, teacher, n: int = 256) -> float:
    gen, _ = load_generator(folder, teacher)
    z = torch.randn(n, gen.latent_dim)
    y = torch.arange(n) % gen.num_classes
    with torch.no_grad():
        gen(z[:8], y[:8])  # warm-up
        t0 = time.perf_counter()
        gen(z, y)
    return n / (time.perf_counter() - t0)


def write_grid(folder: Path, teacher, path: Path) -> Path:  # noqa: ANN001
    """Four images per class from the generator in ``folder``, a column per class (fixed noise), as a PNG."""
    gen, _ = load_generator(folder, teacher)
    classes = gen.num_classes
    z = torch.randn(4 * classes, gen.latent_dim, generator=torch.Generator().manual_seed(0))
    y = torch.arange(4 * classes) % classes
    with torch.no_grad():
        images = gen(z, y)
    names = teacher.class_names or [str(c) for c in range(classes)]
    return save_grid(images, None, 1, path, teacher.mean, teacher.std, titles=[names[c] for c in y.tolist()],
                     max_images=len(y), columns=classes)


def configs(method: str, seed: int, args: argparse.Namespace, work: Path, tname: str, budget: float | None,
            vit: bool) -> tuple[QatConfig, GeneratorConfig | None]:
    """The QAT settings of a cell, and its generator's (None for pixel rows). AKT's feature distillation reads
    transformer blocks: on a CNN teacher the akt row is AdaDFQ's game alone."""
    qat_cfg = QatConfig(epochs=args.qat_epochs, online_steps=args.qat_steps, steps_per_epoch=args.qat_steps, seed=seed,
                        lr=args.qat_lr, attention=args.qat_attention, style_pairs=1.0 if method == "causal" else 0.0,
                        feature_loss="akt" if method == "akt" and vit else "none",
                        time_budget_s=budget if method.startswith("pixel") else None)
    if method.startswith("pixel"):
        return qat_cfg, None
    pool = str(work / f"{tname}_texq_pool_seed{seed}") if method == "texq" else None
    return qat_cfg, GeneratorConfig(kind="gdfq" if method == "akt" else method, epochs=args.gen_epochs,
                                    steps_per_epoch=args.gen_steps, seed=seed, texture_pool=pool,
                                    style_seek_weight=args.style_seek if method == "causal" else 0.0,
                                    pixel_range=args.pixel_range, psaq_weight=args.gen_psaq, ce_weight=args.gen_ce)


def trained_generator(teacher, method: str, gen_cfg: GeneratorConfig, folder: Path, seed: int) -> float:  # noqa: ANN001
    """Train the cell's generator once per teacher, method and seed (it does not depend on the bit setting) and
    return the seconds that took, texq's texture pool included; later settings reuse it and count the same time."""
    record = folder / "generator_wall.json"
    if record.exists() and json.loads(record.read_text())["generator"] == gen_cfg.to_dict():
        return json.loads(record.read_text())["seconds"]
    t0 = time.perf_counter()
    if method == "texq":  # the texture centres' calibration images
        synthesize(teacher, InversionConfig(iterations=500, batch_size=64, sparsity=SparsityConfig(()),
                                            jitter_unit="pixel"), 64, gen_cfg.texture_pool, seed=seed,
                   progress=False, grid=False, overwrite=True)
    train_generator(teacher, folder / "generator", gen_cfg, progress=False, overwrite=True)
    seconds = time.perf_counter() - t0
    atomic_write_json(record, {"generator": gen_cfg.to_dict(), "seconds": round(seconds, 1)})
    return seconds


def run_cell(teacher, method: str, setting: str, seed: int, qat_cfg: QatConfig, gen_cfg: GeneratorConfig | None,
             folder: Path, data, vit: bool, gen_steps: int, calib_images: int = 32,
             recon: ReconstructConfig | None = None, ensemble: int = 1, correct: str | None = None
             ) -> dict:  # noqa: ANN001
    """Train (generator), calibrate (and reconstruct, with ``recon``) and fine-tune one cell; its top-1, wall time
    and images per second. ``ensemble`` K > 1: the generators of seeds K x seed ... K x seed + K - 1 (each in its
    seed's folder, shared with that seed's single-generator cells), every draw split among them, their training
    times summed; the cell's quantized models go to ``q_SETTING_ensK`` / ``qat_SETTING_ensK``. ``correct``: activation
    correction after calibration (and reconstruction), "outputs" or "all" (``smi quantize --correct-activations``)."""
    rate, prep_s = None, 0.0  # prep_s: seconds made before calibration (a generator's training, a pixel pool)
    if method == "akt" or method.startswith("pixel"):  # no trained generator: calibrated on a small pixel pool
        sparse = method == "pixel-sparse"
        synth = InversionConfig(iterations=200, batch_size=32, jitter_unit="patch" if vit else "pixel",
                                sparsity=SparsityConfig().scaled(200 / 4000) if sparse else SparsityConfig(()))
        made = synthesize(teacher, synth, 32, folder / "calib_pool", seed=seed, progress=False, grid=False,
                          overwrite=True)
        prep_s, calib = made.seconds, PoolSource(str(made.folder))  # seconds recorded in the pool, resumed or not
        if qat_cfg.time_budget_s:  # as many epochs (each one such pool + its steps) as the budget holds, cosine
            fits = int((qat_cfg.time_budget_s - prep_s) / (PIXEL_EPOCH_COST * prep_s))  # over them
            qat_cfg = dataclasses.replace(qat_cfg, epochs=max(qat_cfg.epochs, fits))
        source = OnlineSource(synth) if method != "akt" else OnlineGeneratorSource(
            gen_cfg, steps=gen_steps, adversarial=1.0, game="adadfq")
    else:  # one generator (this seed's), or an ensemble of K seeds' (each in its seed's folder)
        seeds = [ensemble * seed + i for i in range(ensemble)] if ensemble > 1 else [seed]
        folders = [folder.with_name(f"{folder.name.rsplit('_seed', 1)[0]}_seed{s}") for s in seeds]
        prep_s = sum(trained_generator(teacher, method, dataclasses.replace(gen_cfg, seed=s), f, s)
                     for s, f in zip(seeds, folders, strict=True))
        rate = images_per_second(folders[0] / "generator", teacher)  # a measurement, not part of the cell's work
        source = calib = GeneratorSource(str(folders[0] / "generator"), tuple(str(f / "generator")
                                                                               for f in folders[1:]))
    tag = (f"{setting}_ens{ensemble}" if ensemble > 1 else setting) + (f"_correct-{correct}" if correct else "")
    t0 = time.perf_counter()
    quantize_teacher(teacher, quant_config("repq", setting), calib, num_images=calib_images,
                     seed=seed, reconstruct=recon, correct_activations=correct or False, out=folder / f"q_{tag}",
                     overwrite=True,
                     copy_model=True)  # the teacher stays float
    quantize_s = time.perf_counter() - t0
    res = qat(teacher, folder / f"q_{tag}", source, folder / f"qat_{tag}", qat_cfg, eval_data=None,
              progress=False, overwrite=True)
    # every part's seconds as its own record keeps them (the pool's manifest, the generator's wall file, the QAT
    # log), so a run resumed after an interruption, or found finished, counts what it took; a trained generator's
    # source reports that generator's training as its other seconds: counted once, in prep_s
    last = res.log[-1]
    qat_s = last["train_s"] + (0.0 if isinstance(source, GeneratorSource) else last.get("other_s", 0.0))
    wall = prep_s + quantize_s + qat_s
    top1 = evaluate(res.model, data, progress=False)["top1"]
    return {"top1": top1, "wall_s": round(wall, 1), "images_per_s": rate, "epochs": res.epochs}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", nargs="+", default=["fmnist_resnet_tiny", "fmnist_vit_tiny"])
    p.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    p.add_argument("--settings", nargs="+", default=["W4A4", "W3A3"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--pixel", nargs="*", default=["dense", "sparse"], help="pixel-inversion rows at equal time")
    p.add_argument("--gen-epochs", type=int, default=10)
    p.add_argument("--gen-steps", type=int, default=100)
    p.add_argument("--style-seek", type=float, default=0.0,
                   help="causal: mode seeking between a class's two styles, this weight (0: the paper's generator)")
    p.add_argument("--pixel-range", action="store_true",
                   help="generators bound their images to the valid pixels (smi train-generator --pixel-range)")
    p.add_argument("--gen-psaq", type=float, default=GeneratorConfig.psaq_weight,
                   help="weight of minus the patch-similarity entropy in a ViT teacher's generator loss")
    p.add_argument("--gen-ce", type=float, default=GeneratorConfig.ce_weight,
                   help="weight of the teacher's cross-entropy to the asked class in the generator loss")
    p.add_argument("--ensemble", type=int, default=1,
                   help="generator rows: an ensemble of K generators per cell (seeds K x seed ... K x seed + K - 1; "
                        "smi qat --generator DIR1 ... DIRK), every draw split among them, their training times summed")
    p.add_argument("--correct", choices=["outputs", "all"], default=None,
                   help="activation correction after calibration (ViTs; smi quantize --correct-activations)")
    p.add_argument("--qat-epochs", type=int, default=5)
    p.add_argument("--qat-steps", type=int, default=50)
    p.add_argument("--qat-lr", type=float, default=QatConfig.lr, help="QAT learning rate (Adam, cosine to 0)")
    p.add_argument("--qat-attention", type=float, default=0.0, help="head-wise attention transfer in QAT (ViTs)")
    p.add_argument("--calib-images", type=int, default=32, help="calibration (and reconstruction) images")
    p.add_argument("--recon-iterations", type=int, default=0,
                   help="block reconstruction steps per block before QAT, QDrop 0.5 (0: calibration only)")
    p.add_argument("--work", default=str(RESULTS / "generators_work"), help="generators, pools and QAT runs")
    p.add_argument("--name", default="generators")
    args = p.parse_args()
    work, cells = Path(args.work), Cells(args.name)
    recon = ReconstructConfig(iterations=args.recon_iterations, drop_prob=0.5) if args.recon_iterations else None
    rows, table = [], []
    for tname in args.teacher:
        teacher = load_teacher(tname)
        data, tested = test_split(teacher)
        vit = hasattr(teacher.model, "blocks")
        fp32 = evaluate(teacher.model, data, progress=False)["top1"]
        table.append([tname, "FP32", "-", f"{fp32:.2f}", "", "", tested])
        for setting in args.settings:
            walls: dict[int, list[float]] = {}  # per seed: the generator rows' wall times
            for method in args.methods + [f"pixel-{k}" for k in args.pixel if k == "dense" or vit]:
                accs, secs, rates, epochs = [], [], [], []
                for seed in args.seeds:
                    budget = statistics.mean(walls[seed]) if walls.get(seed) else None
                    qat_cfg, gen_cfg = configs(method, seed, args, work, tname, budget, vit)
                    key = f"{tname}|{setting}|{method}|{seed}"
                    spec = {"qat": qat_cfg.to_dict(), "generator": None if gen_cfg is None else gen_cfg.to_dict()}
                    if recon is not None or args.calib_images != 32:  # older cells: 32 images, no reconstruction
                        spec.update(recon=recon.to_dict() if recon else None, calib_images=args.calib_images)
                    if args.ensemble > 1 and gen_cfg is not None:
                        spec.update(ensemble=args.ensemble)
                    if args.correct:
                        spec.update(correct=args.correct)
                    cell = cells.get(key, spec)
                    if cell is None:
                        cell = {"setting": spec, **run_cell(teacher, method, setting, seed, qat_cfg, gen_cfg,
                                                            work / f"{tname}_{method}_seed{seed}", data, vit,
                                                            args.gen_steps, args.calib_images, recon,
                                                            args.ensemble if gen_cfg is not None else 1,
                                                            args.correct)}
                        cells.put(key, cell)
                        print(f"{tname} {setting} {method} seed {seed}: {cell['top1']:.2f} ({cell['wall_s']:.0f} s)",
                              file=sys.stderr, flush=True)
                    accs.append(cell["top1"])
                    epochs.append(cell.get("epochs"))
                    secs.append(cell["wall_s"])
                    if not method.startswith("pixel"):
                        walls.setdefault(seed, []).append(cell["wall_s"])
                    if cell["images_per_s"]:
                        rates.append(cell["images_per_s"])
                mean, std = statistics.mean(accs), statistics.stdev(accs) if len(accs) > 1 else 0.0
                rows.append({"teacher": tname, "setting": setting, "method": method, "top1": round(mean, 2),
                             "top1_std": round(std, 2), "top1_per_seed": accs, "seeds": args.seeds,
                             "wall_s": round(statistics.mean(secs), 1),
                             "images_per_s": round(statistics.mean(rates), 1) if rates else None,
                             "qat_epochs_per_seed": epochs})
                table.append([tname, setting, method, f"{mean:.2f} ± {std:.2f}", f"{statistics.mean(secs):.0f}",
                              f"{statistics.mean(rates):.0f}" if rates else "-", tested])
        grids = [write_grid(folder, teacher, RESULTS / args.name / f"{tname}_{method}.png")
                 for method in args.methods
                 if (folder := work / f"{tname}_{method}_seed{args.seeds[-1]}" / "generator").exists()]
        if grids:
            print(f"grids: {', '.join(str(g) for g in grids)}", file=sys.stderr)
    header = ["teacher", "bits", "method", "top-1 (%)", "wall s", "generated images / s", "test data"]
    note = (f"\nrepq W/A bits, {args.calib_images} calibration images"
            + (f", then block reconstruction on them ({args.recon_iterations} steps per block, QDrop 0.5)"
               if recon else "")
            + {None: "", "outputs": ", then activation correction (attn.proj and mlp.fc2)",
               "all": ", then activation correction (all four Linears of each block)"}[args.correct]
            + f", QAT {args.qat_epochs} x {args.qat_steps} steps of batch 32 (lr {args.qat_lr:g}"
            + (f", attention transfer {args.qat_attention:g}" if args.qat_attention else "")
            + f") on fresh images; generators trained {args.gen_epochs} x {args.gen_steps} steps of batch 64"
            + (f", an ensemble of {args.ensemble} per cell (seeds {args.ensemble} x seed + 0..{args.ensemble - 1})"
               if args.ensemble > 1 else "")
            + (f" (causal: mode seeking between styles, weight {args.style_seek:g})" if args.style_seek else "")
            + (", images bounded to the valid pixel range" if args.pixel_range else "")
            + (f", patch-similarity weight {args.gen_psaq:g}" if args.gen_psaq != GeneratorConfig.psaq_weight else "")
            + (f", cross-entropy weight {args.gen_ce:g}" if args.gen_ce != GeneratorConfig.ce_weight else "")
            + "; "
            f"mean ± std over seeds {args.seeds}. pixel-*: QAT from online pixel inversion (32 images x 200 "
            "iterations per epoch), as many epochs as the same seed's generator rows' mean wall time holds "
            "(estimated from the calibration pool's synthesis time; stopped at that time if short); akt: calibrated "
            "on such a pool, then QAT with a gdfq generator trained alongside (AdaDFQ's game). Images / s: one "
            "timing of 256 images per cell.\n")
    publish(args.name, "generators", vars(args), header, table, note, rows)


if __name__ == "__main__":
    main()
