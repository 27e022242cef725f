"""Data-free knowledge transfer at equal wall time: three protocols, four teacher > student pairs.

Each contender is one ``smi distill`` run with the same budget of wall time, synthesis included.
A contender is named ``TEACHER>STUDENT[:PROTOCOL]/DATA``:

- teacher > student: ``vit`` is fmnist_vit_tiny as a teacher and fmnist_vit_mini as a student,
  ``cnn`` is fmnist_resnet_tiny for both (``vit>vit``, ``vit>cnn``, ``cnn>cnn``, ``cnn>vit``);
  ``scene`` is fmnist_scene_vit as a teacher (56x56 fmnist-scenes; students are built for its input);
  ``vit-tiny`` is fmnist_vit_tiny as a student too (``vit>vit-tiny``: a fresh student of the teacher's own
  architecture, as ``cnn>cnn`` is; four heads, so attention transfer goes head by head);
- protocol: ``scratch`` (default; a fresh student), ``probe`` (the SMI paper's transfer protocol:
  a student backbone trained on *other* real data, scikit-learn's handwritten digits at 28x28, frozen,
  and a new linear head trained by KL at T=20) and ``finetune`` (the same backbone with a new head
  for the teacher's classes, every weight trained: ``smi distill --new-head``);
- data: ``dense`` / ``sparse`` online synthesis (each epoch inverts ``--synth-batch`` images for
  ``--iterations`` steps into the run's pool, sparse with the paper's schedule scaled to the
  iterations; CNN teachers invert dense, with DeepInversion's BatchNorm prior), then trains
  ``--online-steps`` steps on the whole pool; ``real`` training images (the upper bound: the same
  student trained on the teacher's outputs over its real training images) and fresh Gaussian ``noise``
  (the lower bound); ``gdfq`` / ``qimera`` / ``causal``: a generator of that kind trained alongside the student
  (``smi distill --online-generator``: 50 generator steps before each epoch, then ``--online-steps``
  on fresh draws; ``adv=W`` adds the adversarial term; ``pretrain=N``: instead trained first against the
  teacher alone for N epochs of ``gsteps`` steps, then frozen: ``smi train-generator``, then
  ``smi distill --generator DIR``, its training time counted as synthesis; ``ensemble=K``: K such generators
  of K seeds, ``smi distill --generator DIR1 ... DIRK``, each batch split evenly among them).

Every contender uses AdamW at a constant learning rate after one warm-up epoch (so that accuracy at
any time is comparable; ``--probe-lr`` for linear heads), KL at T=20, batch 64 and ``--mixup`` (the
teacher labels mixtures of pool images). Top-1 on the teacher's whole test split after every
epoch; evaluation time is not counted. Contenders run one after another (each is one long run).

Resuming: a run folder under ``--work`` resumes after an interruption, and every finished contender
is kept in ``results/NAME_cells.json`` (committed) with the settings that made it, so a rerun with the
same settings skips it and only the missing contenders run.

Run:  python benchmarks/distill.py            (contenders x seeds x --budget seconds, plus evaluation)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, Cells, Settings, generator_overrides, parse_settings, publish, test_split  # noqa: E402
from smi.data.datasets import open_dataset  # noqa: E402
from smi.data.sources import NoiseSource, RealSource  # noqa: E402
from smi.errors import SmiError  # noqa: E402
from smi.evaluation import evaluate  # noqa: E402
from smi.generators import GeneratorConfig, GeneratorSource, OnlineGeneratorSource, train_generator  # noqa: E402
from smi.inversion import SparsityConfig  # noqa: E402
from smi.inversion.methods import METHODS  # noqa: E402
from smi.inversion.synthesis import OnlineSource  # noqa: E402
from smi.models.loading import load_teacher  # noqa: E402
from smi.models.training import TeacherTrainConfig, train_teacher  # noqa: E402
from smi.transfer import DistillConfig, build_student, distill  # noqa: E402
from smi.viz import save_curves  # noqa: E402

MODELS = {"vit": ("fmnist_vit_tiny", "fmnist_vit_mini"), "cnn": ("fmnist_resnet_tiny", "fmnist_resnet_tiny"),
          "scene": ("fmnist_scene_vit", "fmnist_vit_mini"),
          "vit-tiny": ("fmnist_vit_tiny", "fmnist_vit_tiny")}  # name: (as a teacher, as a student)
PROTOCOLS = ("scratch", "probe", "finetune")
GENERATED = ("gdfq", "qimera", "causal")  # a generator trained alongside the student
DATA = ("sparse", "dense", "real", "noise", *GENERATED)
BACKBONE_DATA, BACKBONE_EPOCHS = "digits", 60  # the other real data the probe/finetune backbones learn first


OWN = {"images": int, "steps": int, "mixup": float, "epochs": int,  # settings after '@' that are not synthesis's
       "gsteps": int, "adv": float,  # an online generator's steps per epoch and adversarial weight
       "seek": float,  # causal: mode seeking between a class's two styles
       "bounded": int,  # 1: the online generator's images bounded to the valid pixels (--generator-pixel-range)
       "bn": float,  # the online generator's BN-statistics weight (--generator-bn-weight; GeneratorConfig's default)
       "pretrain": int,  # the generator trained first (N epochs of gsteps steps, teacher only), then frozen (with
       # adv=W: then trained on alongside the student with the adversarial term, a warm-started game)
       "ensemble": int,  # pretrain: K generators (seeds K x seed ... K x seed + K - 1), each batch split among them
       "train_images": int}  # real/noise: train on a fixed set of N images (how many a synthetic run makes)


def parse_contender(spec: str) -> tuple[str, str, str, str, float | None, Settings]:
    """``"vit>cnn:probe/sparse@300,images=64"`` -> (teacher, student, protocol, data, budget or None, settings).

    After ``@``, comma-separated: a budget in seconds, and ``images=N`` (synthesized per epoch),
    ``steps=N`` (training steps per epoch), ``mixup=P``, ``epochs=N`` (a cosine learning rate over N
    epochs instead of the constant one; the budget still stops the run), ``gsteps=N`` and ``adv=W`` (data
    ``gdfq``/``qimera``/``causal``: generator steps per epoch, default 50, and the weight of its adversarial term,
    default 0: ``smi distill --online-generator KIND --generator-steps N --generator-adversarial W``; ``seek=W``:
    ``causal`` only, mode seeking between a class's two styles, ``--generator-style-seek W``; ``bounded=1``: images
    bounded to the valid pixels, ``--generator-pixel-range``; ``bn=W``: the weight of its BatchNorm-statistics loss,
    ``--generator-bn-weight W``; ``pretrain=N``: trained first against the teacher alone for N epochs of ``gsteps``
    steps, then frozen, ``smi train-generator`` then ``smi distill --generator DIR``; with ``ensemble=K``, K of them
    from K seeds, ``--generator DIR1 ... DIRK``; with ``adv=W`` instead trained on alongside the student from there,
    ``gsteps`` steps per epoch, ``--online-generator KIND --generator-init DIR``), ``train_images=N`` (data
    ``real``/``noise``: a fixed set of N images, e.g. as many as a synthetic run makes), the student's augmentations
    (``augment_color=S``, ``augment_background=P``, ``attention=W``, ``ema=DECAY``: ``smi distill --augment-color``,
    ``--augment-background``, ``--attention``, ``--ema``; ``augment=0``: ``--no-augment``, no shift and flip;
    ``temperature=T``: the KL's, ``--temperature``)
    and synthesis settings (``iterations=N`` per synthesized batch, ``color_shift=S``, ``blur=F``,
    ``jitter_unit=pixel``, ``lr=LR``, ``tv_l2=W``, ..., ``term.NAME=W`` for an extra term of this contender only)."""
    pair, _, data = spec.partition("/")
    data, _, extra = data.partition("@")
    items = extra.split(",") if extra else []
    budget = None
    try:
        if items and "=" not in items[0]:
            budget = float(items.pop(0))
        settings = parse_settings(items, OWN)
    except ValueError as e:
        raise SystemExit(f"error: contender {spec!r}: {e}") from None
    t, _, s = pair.partition(">")
    s, _, protocol = s.partition(":")
    protocol = protocol or "scratch"
    if data not in DATA or protocol not in PROTOCOLS or t not in MODELS or s not in MODELS \
            or not all(v > 0 for k, v in settings.other.items() if k not in ("mixup", "adv", "seek", "bn")) \
            or any(settings.other.get(k, 0.0) < 0 for k in ("adv", "seek", "bn")):
        raise SystemExit(f"error: contender {spec!r}: expected TEACHER>STUDENT[:PROTOCOL]/DATA[@SECONDS,NAME=VALUE...] "
                         f"with TEACHER, STUDENT in {'|'.join(MODELS)}, PROTOCOL in {'|'.join(PROTOCOLS)}, DATA in "
                         f"{'|'.join(DATA)} and {'|'.join(OWN)} positive")
    if "pretrain" in settings.other and data not in GENERATED \
            or "ensemble" in settings.other and ("pretrain" not in settings.other or settings.other.get("adv")):
        raise SystemExit(f"error: contender {spec!r}: pretrain=N is a generator's ({'|'.join(GENERATED)}); "
                         "ensemble=K needs pretrain=N and no adv=W")
    return MODELS[t][0], MODELS[s][1], protocol, data, budget, settings


def trained_generator(teacher: Any, cfg: GeneratorConfig, work: Path) -> Path:
    """A generator of ``teacher`` trained with ``cfg`` against the teacher alone (``smi train-generator``), in a
    folder of ``work`` named by the config, so every contender and script asking for the same one shares it."""
    digest = hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode()).hexdigest()[:12]
    folder = work / f"generator_{cfg.kind}_{digest}"
    if not (folder / "generator.safetensors").exists():
        train_generator(teacher, folder, cfg, progress=False)  # resumable
    return folder


def backbone(arch: str, work: Path, data: str = BACKBONE_DATA, epochs: int = BACKBONE_EPOCHS) -> tuple[str, float]:
    """``arch`` trained on the other data (28x28, seed 0; resumable): its checkpoint and top-1 on that data."""
    cfg = TeacherTrainConfig(arch=arch, data=data, img_size=28, epochs=epochs, batch_size=64,
                             hflip=False, crop_padding=2, seed=0)
    folder = "".join(c if c.isalnum() or c in "-_" else "_" for c in data)
    folder += f"_e{epochs}" if epochs != BACKBONE_EPOCHS else ""
    res = train_teacher(cfg, work / f"backbone_{arch}_{folder}", progress=False)
    return res["weights"], res["test_top1"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contenders", nargs="+",
                   default=["cnn>cnn/dense", "cnn>cnn/dense@1200", "cnn>cnn/dense@1500,epochs=48", "cnn>cnn/real",
                            "cnn>cnn/noise", "vit>vit/sparse", "vit>vit/sparse@540,augment_color=2", "vit>vit/dense",
                            "vit>vit/real", "vit>vit/noise", "vit>cnn/sparse", "vit>cnn/dense",
                            "vit>cnn/dense@540,iterations=50", "vit>cnn/dense@540,iterations=50,term.adversarial=1",
                            "vit>cnn/dense@540,iterations=50,augment_color=2", "cnn>vit/dense",
                            "vit>vit:probe/sparse@300", "vit>vit:probe/dense@300", "vit>vit:probe/real@300",
                            "vit>vit:finetune/sparse", "vit>vit:finetune/dense", "vit>vit:finetune/real"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--budget", type=float, default=540.0, help="seconds of synthesis + training per contender")
    p.add_argument("--method", default="deepinversion", choices=METHODS.names(), help="online synthesis method")
    p.add_argument("--term", action="append", default=[], metavar="NAME=W",
                   help="an extra synthesis term (repeatable), e.g. adversarial=1 (student-aware) or contrastive=1")
    p.add_argument("--iterations", type=int, default=200, help="inversion steps per synthesized batch")
    p.add_argument("--synth-batch", type=int, default=128, help="images synthesized per epoch (online)")
    p.add_argument("--online-steps", type=int, default=200, help="training steps per online epoch")
    p.add_argument("--real-steps", type=int, default=200, help="training steps per epoch on real images / noise")
    p.add_argument("--mixup", type=float, default=1.0, help="probability of a batch of teacher-labelled mixtures")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate (scratch and finetune)")
    p.add_argument("--probe-lr", type=float, default=1e-2, help="learning rate of a linear probe")
    p.add_argument("--backbone-data", default=BACKBONE_DATA,
                   help="the other real data of the probe/finetune backbones: digits (nothing like the teacher's), "
                        "or fashion-mnist-classes:5-9 (the teacher's domain, but never told what classes 0-4 are; "
                        "the table then also gives the top-1 on those classes)")
    p.add_argument("--backbone-epochs", type=int, default=BACKBONE_EPOCHS, help="epochs of the backbone's training")
    p.add_argument("--work", default=str(RESULTS / "distill_work"), help="run folders (resumable)")
    p.add_argument("--name", default="distill", help="results/NAME.{json,md,png}")
    p.add_argument("--cells", default="distill", help="finished runs are kept in results/CELLS_cells.json (a run "
                                                      "for another --name, e.g. extra seeds, joins the same cells)")
    args = p.parse_args()
    contenders = [parse_contender(c) for c in args.contenders]
    terms = {name: float(w) for name, _, w in (t.partition("=") for t in args.term)}
    work = Path(args.work)
    cells = Cells(args.cells)

    teachers: dict[str, Any] = {}
    teacher_top1: dict[str, float] = {}
    backbones: dict[str, dict[str, Any]] = {}
    rows, curves = [], {}
    for spec, (t, s, protocol, kind, budget, settings) in zip(args.contenders, contenders, strict=True):
        online = kind in ("dense", "sparse")
        over = settings.other
        budget = args.budget if budget is None else budget
        images, iterations = over.get("images", args.synth_batch), settings.synthesis.get("iterations", args.iterations)
        generated = kind in GENERATED
        steps = over.get("steps", args.online_steps if online or generated else args.real_steps)
        if t not in teachers:
            teachers[t] = load_teacher(t)
            teacher_top1[t] = evaluate(teachers[t].model, test_split(teachers[t])[0], progress=False)["top1"]
        teacher = teachers[t]
        if kind == "sparse" and not hasattr(teacher.model, "blocks"):
            raise SystemExit(f"error: {spec}: a CNN teacher inverts dense only")
        checkpoint = None
        if protocol != "scratch":
            if s not in backbones:
                try:
                    weights, top1 = backbone(s, work, args.backbone_data, args.backbone_epochs)
                except SmiError as e:
                    raise SystemExit(f"error: --backbone-data {args.backbone_data}: {e}") from None
                backbones[s] = {"weights": weights, "data": args.backbone_data, "epochs": args.backbone_epochs,
                                "top1_on_its_data": top1}
            checkpoint = backbones[s]["weights"]
        runs = []
        head = {"linear_probe": protocol == "probe", "new_head": protocol == "finetune"}  # config and student alike
        for seed in args.seeds:
            cfg = DistillConfig(epochs=over.get("epochs", 100_000), batch_size=args.batch_size,
                                lr=args.probe_lr if protocol == "probe" else args.lr,
                                lr_schedule="cosine" if "epochs" in over else "constant",
                                steps_per_epoch=steps, time_budget_s=budget, mixup=over.get("mixup", args.mixup),
                                train_images=over.get("train_images"),
                                seed=seed, **head, **settings.student)
            synthesis = None
            if online:
                stops = SparsityConfig(()) if kind == "dense" else SparsityConfig().scaled(iterations / 4000)
                synthesis = Settings(synthesis={**settings.synthesis, "iterations": iterations},
                                     options=settings.options, terms={**terms, **settings.terms}) \
                    .synthesis_config(args.method, batch_size=images, sparsity=stops)
            name = spec.replace(">", "_to_").replace("=", "")
            if checkpoint and (args.backbone_data, args.backbone_epochs) != (BACKBONE_DATA, BACKBONE_EPOCHS):
                name += f"_backbone-{args.backbone_data}-e{args.backbone_epochs}"  # a cell and run folder of its own
            key = f"{''.join('_' if c in ':/@,' else c for c in name)}_seed{seed}"
            generator, gen_cfgs = None, []
            if generated and "pretrain" in over:  # trained to the end before the student starts, then frozen (or
                # with adv=W, trained on alongside the student from there)
                ensemble = over.get("ensemble", 1)
                gen_cfgs = [GeneratorConfig(kind=kind, seed=ensemble * seed + i, epochs=over["pretrain"],
                                            steps_per_epoch=over.get("gsteps", 50), **generator_overrides(over))
                            for i in range(ensemble)]
            elif generated:
                generator = OnlineGeneratorSource(GeneratorConfig(kind=kind, seed=seed, **generator_overrides(over)),
                                                  steps=over.get("gsteps", 50), adversarial=over.get("adv", 0.0))
            setting = {"teacher": t, "student": s, "protocol": protocol, "data": kind, "config": cfg.to_dict(),
                       "synthesis": synthesis.to_dict() if synthesis else None,
                       **({"generator": generator.identity()} if generator else {}),
                       **({"generator": {"pretrained": gen_cfgs[0].to_dict() if len(gen_cfgs) == 1 else
                                         [c.to_dict() for c in gen_cfgs]}} if gen_cfgs else {}),
                       "backbone": {k: v for k, v in backbones.get(s, {}).items() if k != "weights"}
                       if checkpoint else None}
            run = cells.get(key, setting)
            if run is not None:
                print(f"{spec} seed {seed}: cached, top-1 {run['top1']:.2f} %", file=sys.stderr, flush=True)
            else:
                folders = [str(trained_generator(teacher, c, work)) for c in gen_cfgs]
                if folders and over.get("adv"):  # the warm-started game
                    generator = OnlineGeneratorSource(gen_cfgs[0], steps=over.get("gsteps", 50),
                                                      adversarial=over["adv"], init=folders[0])
                data = OnlineSource(synthesis) if synthesis else generator or \
                    (GeneratorSource(folders[0], tuple(folders[1:])) if folders else None) or \
                    {"real": RealSource(), "noise": NoiseSource()}[kind]
                student = build_student(None if checkpoint else s, teacher, checkpoint=checkpoint,
                                        seed=seed, **head)
                res = distill(teacher, student, data, work / key, cfg)
                per_class = evaluate(student.model, test_split(teacher)[0], progress=False)["per_class"]
                run = {"setting": setting, "top1": res.top1, "epochs": res.epochs, "log": res.log,
                       "per_class": per_class}
                cells.put(key, run)
                print(f"{spec} seed {seed}: top-1 {res.top1:.2f} % after {res.log[-1]['wall_s']:.0f} s",
                      file=sys.stderr, flush=True)
            runs.append(run)
        accs = [r["top1"] for r in runs]
        last = [r["log"][-1] for r in runs]
        rows.append({"contender": spec, "teacher": t, "student": s, "protocol": protocol, "data": kind,
                     "budget_s": budget, "split": f"{images} x {iterations} it, {steps} steps" if online
                     else f"{steps} steps" + (f", {cfg.train_images} fixed images" if cfg.train_images else "")
                     + ((f", generator pre-trained {over['pretrain']} x {over.get('gsteps', 50)} steps against the "
                         "teacher alone, then " + (f"trained on alongside the student ({over.get('gsteps', 50)} steps "
                                                   f"per epoch, adversarial {over['adv']:g})" if over.get("adv") else
                                                   "frozen")
                         + (f", an ensemble of {over['ensemble']} from as many seeds"
                            if over.get("ensemble", 1) > 1 else "")
                         if "pretrain" in over else
                         f", generator {over.get('gsteps', 50)} steps per epoch, adversarial {over.get('adv', 0.0):g}")
                        + (f", style seeking {over['seek']:g}" if over.get("seek") else "")
                        + (", images bounded to the valid pixels" if over.get("bounded") else "")
                        + (f", BN-statistics weight {over['bn']:g}" if "bn" in over else "") if generated else ""),
                     "synthesis": {k: v for k, v in settings.changes().items() if k != "iterations"},
                     "mixup": cfg.mixup, "cosine": cfg.lr_schedule == "cosine", "augment_color": cfg.color_shift,
                     "augment_background": cfg.background, "attention": cfg.attention, "ema": cfg.ema,
                     "augment": cfg.augment, "temperature": cfg.temperature,
                     "top1": round(statistics.mean(accs), 2),
                     "top1_std": round(statistics.stdev(accs), 2) if len(accs) > 1 else 0.0, "top1_per_seed": accs,
                     "seeds": args.seeds, "teacher_top1": teacher_top1[t],
                     "wall_s": round(statistics.mean(r["wall_s"] for r in last), 1),
                     "synthesis_s": round(statistics.mean(r["synthesis_s"] for r in last), 1),
                     "epochs": runs[0]["epochs"], "schedule_epochs": cfg.epochs, "images": last[0]["images"],
                     "curve": [(r["wall_s"], r["top1"]) for r in runs[0]["log"]]})
        curves[spec] = rows[-1]["curve"]
        seen = getattr(open_dataset(args.backbone_data), "classes", None) if checkpoint else None
        if seen is not None and all(r.get("per_class") for r in runs):  # a backbone of some of the classes
            per_class = [statistics.mean(c) for c in zip(*(r["per_class"] for r in runs), strict=True)]
            unseen = [c for c in range(len(per_class)) if c not in seen]
            rows[-1]["backbone_classes"] = seen
            rows[-1]["top1_unseen_classes"] = round(statistics.mean(per_class[c] for c in unseen), 2)
            rows[-1]["top1_seen_classes"] = round(statistics.mean(per_class[c] for c in seen), 2)
            rows[-1]["top1_per_class"] = [round(a, 2) for a in per_class]

    by = {r["contender"]: r for r in rows}
    for r in rows:  # the time at which a sparse contender first reaches its dense twin's final accuracy
        twin = by.get(r["contender"].replace("/sparse", "/dense"))  # the same pair, protocol and budget
        if r["data"] == "sparse" and twin:
            r["reaches_dense_final_at_s"] = next((w for w, a in r["curve"] if a >= twin["top1"]), None)
    plot = save_curves(RESULTS / f"{args.name}.png", curves, xlabel="wall time (s): synthesis + training",
                       ylabel="test top-1 (%)", title="students distilled from the shipped teachers",
                       hlines={f"{t} {a:.2f} %": a for t, a in teacher_top1.items()})
    header = ["teacher > student", "protocol", "data", "budget s", "per epoch", "top-1 (%)", "teacher (%)",
              "gap (pt)", "wall s", "of which synthesis s", "images seen or made"]
    table = [[f"{r['teacher']} > {r['student']}", r["protocol"], r["data"], f"{r['budget_s']:.0f}",
              r["split"] + ("" if r["mixup"] == args.mixup else f", mixup {r['mixup']:g}")
              + "".join(f", {k} {v}" for k, v in r["synthesis"].items())
              + ("" if r.get("augment", True) else ", no shift or flip")
              + (f", student colour shift {r['augment_color']:g}" if r["augment_color"] else "")
              + (f", student backgrounds {r['augment_background']:g}" if r.get("augment_background") else "")
              + (f", attention transfer {r['attention']:g}" if r.get("attention") else "")
              + (f", weight average {r['ema']:g}" if r.get("ema") else "")
              + (f", KL at T={r['temperature']:g}" if r.get("temperature", 20.0) != 20.0 else "")
              + (f", cosine over {r.get('schedule_epochs', r['epochs'])} epochs" if r["cosine"] else "")
              + (f" (stopped after {r['epochs']})" if r["cosine"] and r.get("schedule_epochs", r["epochs"])
                 != r["epochs"] else ""),
              f"{r['top1']:.2f}" + (f" ± {r['top1_std']:.2f}" if len(args.seeds) > 1 else ""),
              f"{r['teacher_top1']:.2f}", f"{r['teacher_top1'] - r['top1']:.1f}", f"{r['wall_s']:.0f}",
              f"{r['synthesis_s']:.0f}", r["images"]] for r in rows]
    note = (f"\nSeeds {args.seeds}; budget {args.budget:.0f} s of synthesis + training per contender (a contender "
            f"named ...@S: S s; each stops after the epoch that passes its budget). AdamW constant after one warm-up "
            f"epoch unless the row says cosine (lr {args.lr}, linear probes "
            f"{args.probe_lr}), batch {args.batch_size}, KL at T=20 unless the row says, mixup probability "
            f"{args.mixup}; the student's "
            "batches randomly shifted (whole patches, up to 1/8 of the side) and flipped unless the row says not. "
            "Online "
            f"synthesis ({args.method}{''.join(f' + {w:g} {n}' for n, w in terms.items())}): "
            f"{args.synth_batch} images per epoch, {args.iterations} iterations "
            f"(sparse: stops {SparsityConfig().scaled(args.iterations / 4000).spec()}; CNN teachers dense with the "
            f"BatchNorm prior), then {args.online_steps} training steps on the whole pool; real images and noise: "
            f"{args.real_steps} steps per epoch. Top-1 on all test images of each teacher's dataset.\n")
    for arch, b in backbones.items():
        note += (f"probe/finetune backbone: {arch} trained on {b['data']} (28x28, {b['epochs']} epochs, seed 0): "
                 f"{b['top1_on_its_data']:.2f} % top-1 on its own test split.\n")
    for r in rows:
        if "top1_unseen_classes" in r:
            note += (f"{r['contender']}: top-1 {r['top1_unseen_classes']:.2f} % on the classes its backbone never "
                     f"saw, {r['top1_seen_classes']:.2f} % on the backbone's classes "
                     f"({','.join(map(str, r['backbone_classes']))}); per class "
                     f"{' / '.join(f'{a:.1f}' for a in r['top1_per_class'])}.\n")
    for r in rows:
        if "reaches_dense_final_at_s" in r:
            reach = r["reaches_dense_final_at_s"]
            twin = by[r["contender"].replace("/sparse", "/dense")]
            note += (f"{r['contender']} reaches its dense twin's final {twin['top1']:.2f} % at "
                     + (f"{reach:.0f} s (dense: {twin['wall_s']:.0f} s).\n" if reach is not None
                        else "no point of its run.\n"))
    publish(args.name, "distill", vars(args), header, table, note, rows, also=(plot,), teacher_top1=teacher_top1,
            backbones={a: {k: v for k, v in b.items() if k != "weights"} for a, b in backbones.items()},
            plot=str(plot.relative_to(RESULTS.parent)))


if __name__ == "__main__":
    main()
