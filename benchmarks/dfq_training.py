"""Quantized models that learn from synthetic images: each training stage against plain calibration.

For each teacher, bit setting and quantizer preset: rows = stages (calibration only, + activation
correction, + block reconstruction, + QAT after reconstruction on the same images), columns = data source (real
training images as the upper bound, Gaussian noise, dense synthetic, sparse synthetic pools);
top-1 on all test images of the teacher's dataset (``--teacher``), mean ± std over seeds (calibration draw, pool and
reconstruction seed), and the wall time of synthesis + calibration + training per cell. Dense
and sparse use the same image budget (the pools of ``benchmarks/dfq_accuracy.py``: 32 images,
4000 iterations, one pool per seed; reused if present). Finished cells are cached, so an
interrupted run resumes.

Every stage sees only the cell's calibration images (QAT: ``train_images`` = the same draw), except
``--stages adaptive`` (PSAQ-ViT V2's loop, run only when named): from the same reconstruction, each QAT epoch
first inverts 32 new psaq-v2 images against the quantized model as it is then (sparse or dense, as the
column), and trains on all images made so far; ``--stages online`` (also only when named) is the
distillation students' recipe for the quantized model: from the same reconstruction, each QAT epoch first
inverts ``--online-images`` new deepinversion images against the float teacher (sparse or dense, as the
column), then trains ``--qat-steps`` steps on all images made so far, so the model sees thousands of
images instead of the cell's pool.

Run:  python benchmarks/dfq_training.py          (about 75 minutes on 2 CPU cores)
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
from _common import (  # noqa: E402
    RESULTS,
    bits,
    parse_settings,
    publish,
    quant_config,
    stops_tag,
    synthetic_pools,
    test_split,
)
from smi.data.sources import PoolSource, parse_source  # noqa: E402
from smi.errors import SmiError  # noqa: E402
from smi.evaluation import evaluate  # noqa: E402
from smi.inversion import FilledPoolSource, InversionConfig, SparsityConfig  # noqa: E402
from smi.inversion.augment import BACKGROUND_NOISE  # noqa: E402
from smi.inversion.methods import pool_methods  # noqa: E402
from smi.inversion.synthesis import OnlineSource  # noqa: E402
from smi.models.loading import load_teacher  # noqa: E402
from smi.quant.pipeline import quantize_teacher  # noqa: E402
from smi.quant.qat import FEATURE_LOSSES, QatConfig, qat  # noqa: E402
from smi.quant.reconstruct import ReconstructConfig  # noqa: E402
from smi.utils.io import atomic_write_json  # noqa: E402

SOURCES = ["real", "noise", "dense", "sparse"]
STAGES = {"calib": "calibration only", "correct": "+ activation correction", "recon": "+ reconstruction",
          "qat": "+ reconstruction + QAT", "adaptive": "+ reconstruction + PSAQ-V2 adaptive QAT",
          "online": "+ reconstruction + QAT on online synthesis"}
STARTS_FROM_RECON = ("recon", "qat", "adaptive", "online")
TRAINS = ("qat", "adaptive", "online")  # the stages that run QAT from the reconstruction
SYNTHESIZING = ("adaptive", "online")  # ... of which these on images synthesized while it trains
# --pool-background: (texture std, level), fractions of the pixel range; level None: a random one per image
BACKGROUNDS = {"none": None, "flat": (0.0, None), "noise": (BACKGROUND_NOISE, None), "black": (0.0, 0.0)}


def same_reconstruction(folder: Path, recon: ReconstructConfig, corrected: bool | str = False) -> bool:
    """Whether ``folder`` holds a model reconstructed with ``recon``'s settings (the seed aside), activation-corrected
    after it or not as ``corrected``: runs with other reconstruction settings share the cell folders, so a cached key
    alone does not say what is there. ``corrected``: False, or the quantized.json record of the correction (True
    for the branch outputs, "all")."""
    path = folder / "quantized.json"
    if not path.exists():
        return False
    meta = json.loads(path.read_text())
    made, want = meta.get("reconstruct") or {}, recon.to_dict()
    return {k: v for k, v in made.items() if k != "seed"} == {k: v for k, v in want.items() if k != "seed"} \
        and meta.get("correct_activations", False) == corrected


def sparse_schedule(spec: str) -> str:
    """``--sparse-stops``: ``default`` or an ``ITER:RATIO,...`` schedule with at least one stop (checked here, so a
    bad one is an argparse error, not a traceback)."""
    try:
        stops = SparsityConfig.parse(spec).stops
    except SmiError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if not stops:
        raise argparse.ArgumentTypeError("a sparse schedule needs at least one stop (dense pools: --sources dense)")
    return spec


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", "--models", dest="models", nargs="+", default=["fmnist_vit_tiny"],
                   help="teachers (shipped names or checkpoints), each evaluated on its own dataset's test split")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--settings", nargs="+", default=["W4A4", "W3A3"],
                   help="WxAy, or WxAyEz: the first layer and the classifier head at z bits (smi quantize --edge-bits)")
    p.add_argument("--quantizers", nargs="+", default=["repq"])
    p.add_argument("--stages", nargs="+", default=[s for s in STAGES if s not in SYNTHESIZING],
                   choices=list(STAGES), help="adaptive (PSAQ-V2's loop after reconstruction) and online (QAT on "
                                              "images synthesized each epoch) run only when named")
    p.add_argument("--sources", nargs="+", default=SOURCES, choices=SOURCES)
    p.add_argument("--calib-images", type=int, default=32)
    p.add_argument("--iterations", type=int, default=4000, help="inversion iterations of the synthetic pools")
    p.add_argument("--sparse-stops", default="default", type=sparse_schedule,
                   help="the sparse pools' stopping schedule, ITER:RATIO,... of the pool's iterations (default: "
                        "the paper's 50:0.3,100:0.3,200:0.3,300:0.3); other schedules get their own pools and cells")
    p.add_argument("--pool-background", default="none", choices=list(BACKGROUNDS),
                   help="show the sparse pools whole, their stopped patches filled with a random flat level per "
                        "image (flat), that plus texture noise (noise) or the lowest valid pixel (black), to both "
                        "models (default: kept patches only)")
    p.add_argument("--pool-refill", action="store_true",
                   help="--pool-background: QAT batches get a fresh background at every draw (smi qat "
                        "--pool-refill); reconstruction keeps the seeded one")
    p.add_argument("--recon-iterations", type=int, default=1000, help="reconstruction steps per block")
    p.add_argument("--recon-drop", type=float, default=0.0, help="QDrop probability during reconstruction")
    p.add_argument("--recon-prediction", type=float, default=0.0,
                   help="weight of PD-Quant's prediction term during reconstruction (0: output error only)")
    p.add_argument("--recon-correct", action="store_true",
                   help="recon and later stages: DFQ-ViT's activation correction after the reconstruction (smi "
                        "quantize --reconstruct ... --correct-activations); give --work a folder of its own")
    p.add_argument("--correct-layers", default="outputs", choices=["outputs", "all"],
                   help="what activation correction fits (the correct stage, --recon-correct): the branch outputs "
                        "(attn.proj, mlp.fc2; DFQ-ViT's) or all four Linears of a block (smi quantize "
                        "--correct-activations all)")
    p.add_argument("--qat-epochs", type=int, default=5, help="QAT epochs")
    p.add_argument("--qat-steps", type=int, default=50, help="QAT steps per epoch (batch 32)")
    p.add_argument("--qat-lr", type=float, default=QatConfig.lr, help="QAT learning rate (Adam, cosine to 0)")
    p.add_argument("--qat-mixup", type=float, default=0.0,
                   help="probability that a QAT batch is replaced by mixtures of its images (the teacher labels them)")
    p.add_argument("--qat-feature-loss", default="none", choices=list(FEATURE_LOSSES),
                   help="QAT's term on every block's output tokens (smi qat --feature-loss)")
    p.add_argument("--qat-attention", type=float, default=0.0,
                   help="QAT's attention transfer weight (smi qat --attention: head-wise KL of each block's "
                        "attention)")
    p.add_argument("--qat-ema", type=float, default=0.0, metavar="DECAY",
                   help="QAT evaluates and keeps a moving average of the trained weights (smi qat --ema; 0: off)")
    p.add_argument("--qat-temperature", type=float, default=QatConfig.temperature,
                   help="softmax temperature of QAT's KL term (smi qat --temperature)")
    p.add_argument("--qat-augment-color", type=float, default=0.0,
                   help="QAT batches at a random contrast and brightness the teacher labels (smi qat --augment-color)")
    p.add_argument("--qat-augment-background", type=float, default=0.0,
                   help="probability that a QAT batch of a sparse pool reaches the quantized model whole, its stopped "
                        "patches filled with a random background, while the teacher labels the kept patches "
                        "(smi qat --augment-background)")
    p.add_argument("--online-images", type=int, default=128,
                   help="--stages online: images synthesized per QAT epoch (deepinversion, --adaptive-iterations)")
    p.add_argument("--adaptive-iterations", type=int, default=200,
                   help="adaptive and online stages: inversion steps of each epoch's batch (adaptive: 32 psaq-v2 "
                        "images; online: --online-images deepinversion images)")
    p.add_argument("--limit", type=int, default=None, help="evaluate on the first N test images (smoke runs)")
    p.add_argument("--method", default="deepinversion",
                   choices=pool_methods(),
                   help="synthesis method of the dense and sparse pools (its pools get names of their own)")
    p.add_argument("--recipe", nargs="*", default=[], metavar="SETTING=VALUE",
                   help="the dense and sparse pools' DeepInversion recipe changes, as benchmarks/pixel_recipe.py's "
                        "contenders (e.g. bn_weight=0.1; give --pools a folder of its own)")
    p.add_argument("--pools", default=str(RESULTS / "dfq_work"), help="synthetic pools (shared with dfq_accuracy)")
    p.add_argument("--work", default=str(RESULTS / "dfq_training_work"), help="partial results")
    p.add_argument("--name", default="dfq_training")
    args = p.parse_args()
    if args.pool_refill and args.pool_background == "none":
        p.error("--pool-refill refills a --pool-background; give one")
    try:
        recipe = parse_settings(args.recipe)
    except ValueError as e:
        raise SystemExit(f"error: --recipe: {e}") from None
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    partial_path = work / "partial.json"
    done: dict[str, dict] = json.loads(partial_path.read_text()) if partial_path.exists() else {}
    recon = ReconstructConfig(iterations=args.recon_iterations, drop_prob=args.recon_drop,
                              prediction_weight=args.recon_prediction)

    def adaptive_synthesis(source_name: str) -> InversionConfig:
        """PSAQ-V2's image step for the adaptive stage: psaq-v2 with its rounds and warm-up scaled to the
        iterations, sparse (the paper's stops, scaled) for the sparse column, dense for the dense one."""
        its = args.adaptive_iterations
        sparsity = SparsityConfig().scaled(its / 4000) if source_name == "sparse" else SparsityConfig(())
        return InversionConfig.for_method("psaq-v2", iterations=its, batch_size=32, warmup=its // 20,
                                          sparsity=sparsity)

    def online_synthesis(source_name: str) -> InversionConfig:
        """The online stage's image step: deepinversion against the float teacher, as `smi distill --online`."""
        its = args.adaptive_iterations
        sparsity = SparsityConfig().scaled(its / 4000) if source_name == "sparse" else SparsityConfig(())
        return InversionConfig.for_method("deepinversion", iterations=its, batch_size=args.online_images,
                                          sparsity=sparsity)

    def synthesis_of(stage: str, source_name: str) -> InversionConfig:
        return (adaptive_synthesis if stage == "adaptive" else online_synthesis)(source_name)

    def filled(source_name: str) -> bool:
        """Whether this column's images are a sparse pool shown whole on a background (--pool-background)."""
        return source_name == "sparse" and BACKGROUNDS[args.pool_background] is not None

    def filled_source(pool: str, refill: bool = False) -> FilledPoolSource:
        std, level = BACKGROUNDS[args.pool_background]
        return FilledPoolSource(pool, std, refill, level)

    def own_method(source_name: str) -> bool:
        """Whether this column's images are pools of another method than DeepInversion (--method)."""
        return source_name in ("dense", "sparse") and args.method != "deepinversion"

    def cell_key(model_name: str, setting: str, quantizer: str, stage: str, source_name: str, seed: int) -> str:
        extra = str(recon.to_dict()) if stage in STARTS_FROM_RECON else ""
        extra += str(qat_cfg(seed).to_dict()) if stage in TRAINS else ""
        extra += str(synthesis_of(stage, source_name).to_dict()) if stage in SYNTHESIZING else ""
        if source_name == "sparse" and stops_tag(args.sparse_stops):
            extra += f"|stops {SparsityConfig.parse(args.sparse_stops).stops}"
        if filled(source_name):
            extra += f"|background {args.pool_background}"
            extra += "|refill" if args.pool_refill and stage in TRAINS else ""  # the fixed draws are the same
        if source_name in ("dense", "sparse") and args.recipe:
            extra += f"|recipe {sorted(args.recipe)}"
        if own_method(source_name) and stage not in SYNTHESIZING:
            extra += f"|method {args.method}"
        if args.correct_layers != "outputs" and (stage == "correct" or args.recon_correct
                                                 and stage in STARTS_FROM_RECON):
            extra += f"|correct {args.correct_layers}"  # (keys of the default, made before it existed, unchanged)
        return (f"{model_name}|{setting}|{quantizer}|{stage}|{source_name}|{seed}|{args.limit}|"
                f"{args.calib_images}|{extra}")

    def qat_cfg(seed: int) -> QatConfig:
        return QatConfig(epochs=args.qat_epochs, steps_per_epoch=args.qat_steps, train_images=args.calib_images,
                         lr=args.qat_lr, mixup=args.qat_mixup, feature_loss=args.qat_feature_loss,
                         attention=args.qat_attention, color_shift=args.qat_augment_color,
                         background=args.qat_augment_background,
                         temperature=args.qat_temperature, ema=args.qat_ema, seed=seed)

    rows, table, tested, labelled = [], [], {}, []
    for model_name in args.models:
        teacher = load_teacher(model_name)
        data, tested[model_name] = test_split(teacher, args.limit)
        key = f"{model_name}|fp32|{args.limit}"
        if key not in done:
            done[key] = evaluate(teacher.model, data, progress=False)
            atomic_write_json(partial_path, done)
        fp32 = done[key]["top1"]
        table.append([model_name, "FP32", "-", "-", f"{fp32:.2f}", "", "", ""])
        kinds = [s for s in ("dense", "sparse") if s in args.sources]
        pools, synth_s = synthetic_pools(teacher, model_name, args.seeds, kinds, Path(args.pools), args.iterations,
                                         args.calib_images, sparse_stops=args.sparse_stops, settings=recipe,
                                         method=args.method)
        if filled("sparse") and "sparse" in args.sources:  # what the teacher calls the filled images (seeded fill)
            for seed in args.seeds:
                whole = filled_source(pools[("sparse", seed)]).open(teacher).images
                with torch.no_grad():
                    counts = torch.bincount(teacher.model(whole).argmax(1), minlength=teacher.num_classes)
                labelled.append(f"{model_name} seed {seed}: {counts.max().item()} of {len(whole)} as class "
                                f"{counts.argmax().item()}")
        recon_layers = args.correct_layers if args.recon_correct else False  # correction after reconstruction
        corrected = True if recon_layers == "outputs" else recon_layers  # ... as quantized.json records it
        for setting in args.settings:
            w, a = bits(setting)
            for quantizer in args.quantizers:
                for stage in args.stages:
                    if stage == "correct" and not hasattr(teacher.model, "blocks"):
                        table.append([model_name, setting, quantizer, STAGES[stage]] + ["n/a (ViT blocks only)"] * 4)
                        continue
                    cells = {}
                    for source_name in args.sources:
                        if stage in SYNTHESIZING and source_name not in ("dense", "sparse"):
                            continue  # its images are synthesized: no real or noise column
                        accs, walls = [], []
                        for seed in args.seeds:
                            key = cell_key(model_name, setting, quantizer, stage, source_name, seed)
                            if key not in done:
                                pool = pools.get((source_name, seed))
                                source = (filled_source(pool, args.pool_refill) if filled(source_name)
                                          else PoolSource(pool) if pool else parse_source(source_name))
                                qcfg = quant_config(quantizer, setting)
                                t0 = time.perf_counter()
                                if stage in ("calib", "correct"):
                                    res = quantize_teacher(teacher, qcfg, source, num_images=args.calib_images,
                                                           seed=seed, copy_model=True,
                                                           correct_activations=stage == "correct"
                                                           and args.correct_layers)
                                    model, units, seconds = res.model, res.correction, time.perf_counter() - t0
                                else:  # the reconstructed folder is the QAT stage's start
                                    src = source_name + (stops_tag(args.sparse_stops) if source_name == "sparse"
                                                         else "")
                                    src += f"-bg{args.pool_background}" if filled(source_name) else ""
                                    src += f"-{args.method}" if own_method(source_name) else ""
                                    cell = work / "cells" / f"{model_name}_{setting}_{quantizer}_{src}_{seed}"
                                    recon_key = cell_key(model_name, setting, quantizer, "recon", source_name, seed)
                                    model = units = None
                                    if stage == "recon" or recon_key not in done \
                                            or not same_reconstruction(cell / "recon", recon, corrected):
                                        res = quantize_teacher(teacher, qcfg, source, num_images=args.calib_images,
                                                               seed=seed, copy_model=True, reconstruct=recon,
                                                               correct_activations=recon_layers,
                                                               out=cell / "recon", overwrite=True)
                                        model, units = res.model, res.reconstruction
                                    seconds = time.perf_counter() - t0
                                    if stage in TRAINS:  # QAT from the reconstruction
                                        seconds = done[recon_key]["seconds"] if recon_key in done else seconds
                                        t1 = time.perf_counter()
                                        train, cfg = source, qat_cfg(seed)
                                        if stage in SYNTHESIZING:  # images made while it trains
                                            train = OnlineSource(synthesis_of(stage, source_name))
                                            cfg = dataclasses.replace(cfg, train_images=None)
                                        q = qat(teacher, cell / "recon", train, cell / stage, cfg,
                                                eval_data=None, progress=False, overwrite=True)
                                        model, seconds = q.model, seconds + time.perf_counter() - t1
                                top1 = evaluate(model, data, progress=False)["top1"]
                                done[key] = {"top1": top1, "seconds": round(seconds, 2), "units": units}
                                atomic_write_json(partial_path, done)
                                print(f"{setting} {quantizer} {stage} {source_name} seed {seed}: {top1:.2f} "
                                      f"({seconds:.0f} s)", file=sys.stderr, flush=True)
                            accs.append(done[key]["top1"])
                            walls.append(done[key]["seconds"] + synth_s.get((source_name, seed), 0.0))
                        mean = statistics.mean(accs)
                        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
                        cells[source_name] = (mean, std, statistics.mean(walls))
                        rows.append({"model": model_name, "setting": setting, "w_bits": w, "a_bits": a,
                                     "quantizer": quantizer,
                                     "stage": stage, "source": source_name, "top1": round(mean, 2),
                                     "top1_std": round(std, 2), "top1_per_seed": accs, "seeds": args.seeds,
                                     "wall_s": round(statistics.mean(walls), 1), "calib_images": args.calib_images})
                    table.append([model_name, setting, quantizer, STAGES[stage]] +
                                 [f"{cells[s][0]:.2f} ± {cells[s][1]:.2f} ({cells[s][2]:.0f} s)" if s in cells else ""
                                  for s in SOURCES])
    header = ["model", "bits", "quantizer", "stage"] + [
        {"real": "real", "noise": "noise", "dense": "dense synthetic", "sparse": "sparse synthetic"}[s]
        for s in SOURCES]
    tested_on = "; ".join(f"{v} ({k})" for k, v in tested.items())
    note = (f"\nTop-1 (%) on {tested_on}, mean ± std over seeds {args.seeds} (wall seconds of synthesis + "
            f"calibration + training per cell, mean). {args.calib_images} images per cell for every source "
            f"(dense and sparse: the same budget, "
            f"pools of {args.iterations} inversion iterations, one per seed"
            + (f"; sparse stops {args.sparse_stops}" if stops_tag(args.sparse_stops) else "")
            + (f"; {'DeepInversion' if args.method == 'deepinversion' else args.method} with "
               f"{', '.join(args.recipe)}" if args.recipe
               else f"; {args.method}" if args.method != "deepinversion" else "")
            + (f"; sparse pools shown whole, stopped patches filled with a "
               f"{'' if args.pool_background == 'black' else 'random '}{args.pool_background} background"
               + (", refilled at every QAT draw" if args.pool_refill else "")
               + f"; the teacher's most common label of the filled images: {', '.join(labelled)}"
               if args.pool_background != "none" else "")
            + "); reconstruction: "
            f"{args.recon_iterations} steps per block, batch {recon.batch_size}, QDrop {args.recon_drop}"
            + (f", PD-Quant prediction term {args.recon_prediction:g}" if args.recon_prediction else "")
            + (", then activation correction" if args.recon_correct else "")
            + ("; activation correction of all four Linears of each block (qkv, proj, fc1, fc2)"
               if args.correct_layers == "all" else "")
            + f"; QAT after it: {args.qat_epochs} epochs x {args.qat_steps} steps, batch 32, lr {args.qat_lr:g} "
            f"cosine, mixup {args.qat_mixup:g}, feature loss {args.qat_feature_loss}, "
            f"attention transfer {args.qat_attention:g}, "
            + (f"weight average {args.qat_ema:g}, " if args.qat_ema else "")
            + (f"colour shift {args.qat_augment_color:g}, " if args.qat_augment_color else "")
            + (f"whole images on a random background with probability {args.qat_augment_background:g}, "
               if args.qat_augment_background else "") +
            f"KL at T={args.qat_temperature:g}"
            + (", on the same images" if "qat" in args.stages else "") +
            ". Wall time of '+ QAT' includes the reconstruction."
            + (f" PSAQ-V2 adaptive: from the same reconstruction, {args.qat_epochs} epochs, each inverting 32 new "
               f"psaq-v2 images ({args.adaptive_iterations} iterations, sparse or dense as the column says) against "
               f"the quantized model as it is, then {args.qat_steps} QAT steps on all images made so far (not the "
               "cell's pool); its wall time includes that synthesis." if "adaptive" in args.stages else "")
            + (f" Online: from the same reconstruction, {args.qat_epochs} epochs, each inverting "
               f"{args.online_images} new deepinversion images ({args.adaptive_iterations} iterations, sparse with "
               f"the paper's stops scaled to them or dense as the column says) against the float teacher, then "
               f"{args.qat_steps} QAT steps on all images made so far; its wall time includes that synthesis."
               if "online" in args.stages else "")
            + "\n")
    publish(args.name, "dfq_training", vars(args), header, table, note, rows)


if __name__ == "__main__":
    main()
