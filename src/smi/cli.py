"""The ``smi`` command: parses, calls one library function, shows progress, writes files."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from smi.errors import SmiError

__all__ = ["main"]


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows each option's default, except options whose default depends on others (default None)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None:
            return action.help
        return super()._get_help_string(action)

    def _split_lines(self, text: str, width: int) -> list[str]:
        """Option help wrapped at spaces only, so names like fashion-mnist-classes stay whole."""
        import textwrap

        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        """Descriptions: long prose lines wrapped to the terminal, indented lines (tables of presets) kept."""
        import textwrap

        return "\n".join(textwrap.fill(line, width, initial_indent=indent, subsequent_indent=indent)
                         if len(line) > width and not line.startswith(" ") else indent + line
                         for line in text.splitlines())


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the problem and where to read more), exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _number(text: str) -> float:
    """A finite float (argparse's float accepts nan and inf, which only fail later and far away)."""
    import math

    value = float(text)
    if not math.isfinite(value):
        raise ValueError(text)
    return value


_number.__name__ = "finite number"  # argparse's message: "invalid finite number value: 'nan'"

POOL_BACKGROUND_HELP = ("show a sparse pool's images whole (every patch, to every model), each image's stopped "
                        "patches filled once with a random background: a level anywhere in the pixel range plus "
                        "Gaussian noise of standard deviation up to STD of the range (0: flat; e.g. 0.25). For "
                        "teachers whose images hold an object on a background (default: kept patches only)")
POOL_LEVEL_HELP = ("--pool-background: the background's level for every image, a fraction of the pixel range (0: "
                   "black, the background of garments on a black frame; default: a random level per image)")


def _seed(text: str) -> int:
    value = int(text)
    if not 0 <= value < 2**63:
        raise ValueError(text)
    return value


_seed.__name__ = "seed (an integer from 0 to 2**63 - 1)"


def _add_model(p: argparse.ArgumentParser, flag: str = "--model", what: str = "model") -> None:
    p.add_argument(flag, default="fmnist_vit_tiny",
                   help=f"{what}: timm model name, shipped teacher name, or a checkpoint NAME.safetensors")
    p.add_argument("--pretrained", action="store_true", help="load timm's pretrained weights (needs the internet)")


def _add_run(p: argparse.ArgumentParser, *, out: str | None, seed: str | None = None, overwrite: str | None = None,
             json: bool = False) -> None:
    """--seed, --device, --out, --overwrite and --json, as every command that has them spells them."""
    if seed is not None:
        p.add_argument("--seed", type=_seed, default=0, help=seed)
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda:0")
    if out is not None:
        p.add_argument("--out", required=True, help=out)
    if overwrite is not None:
        p.add_argument("--overwrite", action="store_true", help=overwrite)
    if json:
        p.add_argument("--json", action="store_true", help="print one JSON object")


def _cmd_train_teacher(args: argparse.Namespace) -> int:
    from smi.models.training import TeacherTrainConfig, train_teacher

    with _flags(args, model_kwargs="model_kwarg"):
        cfg = TeacherTrainConfig(arch=args.arch, data=args.data, model_kwargs=_pairs(args.model_kwarg, "--model-kwarg",
                                                                                     parse=_literal),
                                 img_size=args.img_size, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                                 seed=args.seed, hflip=not args.no_flip)
        result = train_teacher(cfg, args.out, device=args.device)
    score = (f"test mIoU {result['test_miou']:.2f}%" if "test_miou" in result
             else f"test top-1 {result['test_top1']:.2f}%")
    print(f"{score} after {result['epochs']} epochs; weights: {result['weights']}")
    return 0


def _add_train_teacher(sub: argparse._SubParsersAction) -> None:
    from smi.data.datasets import data_help

    p = sub.add_parser("train-teacher", help="train a teacher (any timm architecture) on a labelled dataset",
                       formatter_class=_Formatter,
                       description="Train a teacher with smi's recipe (AdamW, warm-up + cosine, label "
                       "smoothing, random crop and flip) on a dataset's train split, evaluating on its test split "
                       "after each epoch. The architecture is built for the dataset's channels, classes and image "
                       "size, and the checkpoint records them, its normalization and the dataset, so every other "
                       "command reads it with no further flags. A segmenter (fmnist_scene_segmenter) learns the "
                       "dataset's per-pixel labels instead and reports mIoU. Rerun the same command to resume.")
    p.add_argument("--arch", default="fmnist_vit_tiny", help="timm architecture (or a shipped one) to train")
    p.add_argument("--data", default="fashion-mnist", help=f"labelled dataset: {data_help()}")
    p.add_argument("--model-kwarg", action="append", metavar="NAME=VALUE",
                   help="passed to timm.create_model (repeatable), e.g. --model-kwarg patch_size=4 "
                        "--model-kwarg embed_dim=96")
    p.add_argument("--img-size", type=int, help="resize the images to this square side (default: the dataset's size)")
    p.add_argument("--epochs", type=int, default=24, help="training epochs")
    p.add_argument("--batch-size", type=int, default=128, help="training batch size")
    p.add_argument("--lr", type=_number, default=1e-3, help="peak AdamW learning rate")
    p.add_argument("--no-flip", action="store_true", help="no random horizontal flip (e.g. for digits or text)")
    _add_run(p, out="run folder (checkpoints, log, final weights)", seed="seed for shuffling, augmentation and init")
    p.set_defaults(func=_cmd_train_teacher, parser=p)


def _cmd_train_generator(args: argparse.Namespace) -> int:
    import json

    from smi.generators import GeneratorConfig, train_generator
    from smi.models.loading import load_teacher

    with _flags(args):
        cfg = GeneratorConfig(kind=args.kind, epochs=args.epochs, steps_per_epoch=args.steps_per_epoch,
                              batch_size=args.batch_size, lr=args.lr, latent_dim=args.latent_dim, width=args.width,
                              superpose_prob=args.superpose_prob, superpose_classes=args.superpose_classes,
                              mapped_dim=args.mapped_dim, init_from_head=not args.random_embeddings,
                              texture_pool=args.texture_pool, texture_weight=args.texture_weight,
                              centre_weight=args.centre_weight, seek_weight=args.seek_weight,
                              style_weight=args.style_weight, style_seek_weight=args.style_seek_weight,
                              bn_weight=args.bn_weight, psaq_weight=args.psaq_weight, pixel_range=args.pixel_range,
                              seed=args.seed)
        teacher = load_teacher(args.model, pretrained=args.pretrained, device=args.device)
        res = train_generator(teacher, args.out, cfg, device=args.device, overwrite=args.overwrite)
    print(json.dumps(res) if args.json else
          f"teacher top-1 on generated images {res['teacher_top1']:.2f}% after {res['epochs']} epochs, "
          f"{res['wall_s']:.0f} s; generator: {res['out']} (use it as generator:{res['out']})")
    return 0


def _add_train_generator(sub: argparse._SubParsersAction) -> None:
    from smi.generators import GENERATORS, GeneratorConfig

    d = GeneratorConfig()
    p = sub.add_parser("train-generator", help="train a conditional generator against a teacher (GDFQ, Qimera)",
                       formatter_class=_Formatter,
                       description="Train a conditional generator (a class code -> upsampling convolutions) so that "
                       "the teacher classifies its images as their class, with BatchNorm statistics matched for a "
                       "CNN teacher or PSAQ-ViT's patch-similarity entropy maximized for a ViT. The folder is then a "
                       "data source: `smi quantize --calib generator:OUT`, `smi distill --generator OUT`, `smi qat "
                       "--generator OUT` (fresh images every draw), and `smi invert --generator OUT` writes a pool "
                       f"from it. Rerun the same command to resume.\n\ngenerators (--kind):\n{GENERATORS.help_lines()}")
    _add_model(p, what="teacher")
    p.add_argument("--kind", default=d.kind, help=f"generator: {', '.join(GENERATORS.names())}")
    p.add_argument("--epochs", type=int, default=d.epochs, help="training epochs")
    p.add_argument("--steps-per-epoch", type=int, default=d.steps_per_epoch, help="generator steps per epoch")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="images per step")
    p.add_argument("--lr", type=_number, default=d.lr, help="peak Adam learning rate (betas 0.5, 0.999; cosine)")
    p.add_argument("--latent-dim", type=int, default=d.latent_dim, help="noise and class-embedding size")
    p.add_argument("--width", type=int, default=d.width, help="channels of the first upsampling block")
    p.add_argument("--superpose-prob", type=_number,
                   help="share of batches whose images mix several classes, trained toward the mixing weights "
                        "(Qimera; default: 0.4 for qimera, 0 for gdfq)")
    p.add_argument("--superpose-classes", type=int, default=d.superpose_classes,
                   help="classes mixed in a superposed image (Qimera's K)")
    p.add_argument("--mapped-dim", type=int, default=d.mapped_dim,
                   help="qimera: output size of the disentanglement mapping layer")
    p.add_argument("--random-embeddings", action="store_true",
                   help="qimera: random class embeddings instead of the teacher's classifier weights")
    p.add_argument("--texture-pool", metavar="POOL",
                   help="texq: a pool of this teacher (smi invert) whose images give each class's texture centre")
    p.add_argument("--texture-weight", type=_number, default=d.texture_weight,
                   help="texq: weight of the squared distance of an image's Laws texture energy to its class centre")
    p.add_argument("--centre-weight", type=_number, default=d.centre_weight,
                   help="acq: weight of the squared distance of the teacher's attention centre to the one asked for")
    p.add_argument("--seek-weight", type=_number, default=d.seek_weight,
                   help="acq: weight of the mode-seeking loss between images of one condition")
    p.add_argument("--style-weight", type=_number, default=d.style_weight,
                   help="causal: weight of the teacher's disagreement between two styles of one class")
    p.add_argument("--style-seek-weight", type=_number, default=d.style_seek_weight,
                   help="causal: weight of MSGAN's mode-seeking loss between two styles of one class, so that the "
                        "noise keeps changing the image (0: off, the paper's generator)")
    p.add_argument("--bn-weight", type=_number, default=d.bn_weight,
                   help="weight of the BatchNorm-statistics loss (teachers with BatchNorm)")
    p.add_argument("--psaq-weight", type=_number, default=d.psaq_weight,
                   help="weight of minus the patch-similarity entropy (ViT teachers)")
    p.add_argument("--pixel-range", action="store_true",
                   help="bound the images to the teacher's valid pixels (tanh mapped onto the normalized 0..1 range "
                        "per channel) instead of GDFQ's last BatchNorm, whose output has no bounds")
    _add_run(p, out="run folder (checkpoints, log, generator.safetensors + generator.json)",
             seed="seed of the generator's initialization and noise", overwrite="replace a run with other settings",
             json=True)
    p.set_defaults(func=_cmd_train_generator, parser=p)


def _literal(text: str) -> Any:
    """A --model-kwarg value: a JSON number, boolean, list or null, else the text itself."""
    import json

    try:
        return json.loads(text)
    except ValueError:
        return text


def _pairs(items: list[str] | None, flag: str, parse: Callable[[str], Any] = _number) -> dict[str, Any]:
    out = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        try:
            out[name.strip()] = parse(value)
        except ValueError:
            sep = ""
        if not sep or not name.strip():
            raise SmiError(f"{flag} takes NAME={'NUMBER' if parse is _number else 'VALUE'}, got {item!r}")
    return out


def _inversion_config(args: argparse.Namespace):
    from smi.inversion import METHODS, InversionConfig, SparsityConfig

    given = {"iterations": args.iterations, "batch_size": args.synth_batch_size, "lr": args.synth_lr,
             "tv_l2": args.tv_l2, "tv_l1": args.tv_l1, "l2": args.l2, "jitter": args.jitter,
             "color_shift": args.color_shift, "crop": args.crop, "blur": args.blur, "labels": args.labels,
             "curriculum": args.curriculum, "precision": args.precision,
             "bn_weight": args.synth_bn_weight}
    overrides = {k: v for k, v in given.items() if v is not None}
    with _flags(args, batch_size="synth_batch_size", lr="synth_lr", bn_weight="synth_bn_weight", terms="term",
                options="option"):
        terms = {**METHODS.get(args.method, param="method").defaults.get("terms", {}), **_pairs(args.term, "--term")}
        return InversionConfig.for_method(
            args.method, **overrides, terms=terms, options=_pairs(args.option, "--option"),
            jitter_unit=args.jitter_unit, flip=not args.no_flip,
            sparsity=SparsityConfig.parse(args.sparsity or "default"),
        )


def _add_inversion_args(p: argparse.ArgumentParser, prefix: str = "") -> None:
    """Synthesis options, shared by `smi invert` and `smi distill --online` (there with ``--synth-`` names).

    Options left unset take the method's default (`smi invert --help` lists the methods). Every choice is
    read from the registries (smi.inversion.METHODS, TERMS, LABELS, CURRICULA).
    """
    from smi.inversion import CURRICULA, LABELS, METHODS, TERMS
    from smi.inversion.config import known_options

    p.add_argument("--method", default="deepinversion",
                   help=f"synthesis method: {', '.join(METHODS.names())} (see `smi invert --help`)")
    p.add_argument(f"--{prefix}batch-size", dest="synth_batch_size", type=int, default=32, metavar="N",
                   help="images optimized together")
    p.add_argument("--iterations", type=int, help="optimisation steps per batch (default: 4000; psaq 2 x 500)")
    p.add_argument("--sparsity", metavar="SCHEDULE",
                   help="'default' (the default: 50:0.3,100:0.3,200:0.3,300:0.3), 'dense', or ITER:RATIO,... "
                        "(each ratio: fraction of the still-optimized patches to stop)")
    p.add_argument(f"--{prefix}lr", dest="synth_lr", type=_number, metavar="LR",
                   help="Adam learning rate of the images (default: 0.25, betas 0.5, 0.99; psaq 0.2, 0.5, 0.9)")
    p.add_argument("--tv-l2", type=_number, help="weight of the l2 total-variation prior (default: 1e-4; "
                                                 "psaq 0, mimiq 2.5e-5, sardfq 0)")
    p.add_argument("--tv-l1", type=_number, help="weight of the l1 total-variation prior (default: 0; sardfq 0.05)")
    p.add_argument("--l2", type=_number, help="weight of the image L2-norm prior (default: 0)")
    p.add_argument(f"--{prefix}bn-weight", dest="synth_bn_weight", type=_number, metavar="W",
                   help="weight of the BatchNorm-statistics prior, teachers with BatchNorm only (default: 0.01, "
                        "DeepInversion's; 0.1 made the best calibration images for a strictly quantized CNN in "
                        "benchmarks/pixel_recipe.py)")
    p.add_argument("--jitter", type=_number, help="largest random shift, fraction of the side (default: 0.125)")
    p.add_argument("--jitter-unit", choices=["patch", "pixel"], default="patch",
                   help="round shifts to whole patches (needed for sparse) or use pixels (dense only)")
    p.add_argument("--no-flip", action="store_true", help="disable the random horizontal flip")
    p.add_argument("--color-shift", type=_number, metavar="S",
                   help="Plug-In Inversion's colour shift: the teacher sees each image at a random contrast "
                        "exp(U(-S, S)) and brightness U(-S, S) (default: 0, off; 1 is the paper's)")
    p.add_argument("--crop", type=_number, metavar="F",
                   help="IntraQ's random crops (dense only): the teacher sees a random box of U(1-F, 1) of each "
                        "image's area, resized to the full image (default: 0, off)")
    p.add_argument("--blur", type=_number, metavar="F",
                   help="after each step move the images a fraction F toward their 3x3-blurred selves (default: 0)")
    p.add_argument("--precision", choices=["fp32", "bf16"],
                   help="fp32 (the default) or bf16: the teacher's forward and the loss under bfloat16 autocast, "
                        "faster on CPUs with AVX-512 BF16/AMX and on GPUs; the images and Adam stay float32, and "
                        "the images differ from fp32's (see the README's speed table for the measured effect)")
    p.add_argument("--labels", help=f"label sampler: {', '.join(LABELS.names())} (default: the method's)")
    p.add_argument("--curriculum", help=f"{', '.join(CURRICULA.names())} (default: the method's)")
    p.add_argument("--term", action="append", metavar="NAME=WEIGHT",
                   help=f"add or reweigh a loss term (repeatable): {', '.join(TERMS.names())}; e.g. "
                        "--term ris_input=1 adds RIS's input robustness to any method")
    opts = ", ".join(f"{k}={v:g}" for k, v in known_options().items())
    p.add_argument("--option", action="append", metavar="NAME=VALUE",
                   help=f"a knob of a term, sampler or curriculum (repeatable); defaults: {opts}")


def _cmd_invert(args: argparse.Namespace) -> int:
    from smi.distributed import from_env
    from smi.inversion import METHODS
    from smi.inversion.synthesis import synthesize
    from smi.models.loading import load_teacher

    if args.generator is not None:
        return _invert_from_generator(args)
    if METHODS.get(args.method, param="method").task == "diffusion" or args.diffusion_model is not None:
        return _invert_from_diffusion(args)
    cfg = _inversion_config(args)
    dist = from_env(args.device)  # torchrun: one process per rank, gloo on CPU, nccl on CUDA
    device = dist.device
    try:
        teacher = load_teacher(args.model, pretrained=args.pretrained, device=device)
        result = synthesize(teacher, cfg, args.num_images, args.out, seed=args.seed, device=device,
                            overwrite=args.overwrite, grid=not args.no_grid, dist=dist,
                            recompute=args.recompute or "auto")
    finally:
        dist.close()
    if dist.rank == 0:
        print(f"pool: {result.folder} ({result.num_images} images, {result.seconds:.1f} s of inversion"
              + (f", {dist.world} processes" if dist.active else "") + ")")
        if result.grid is not None:
            print(f"grid: {result.grid}")
    return 0


# `smi invert` options that shape pixel optimization only
PIXEL_ONLY = ("iterations", "synth_lr", "synth_bn_weight", "tv_l2", "tv_l1", "l2", "jitter", "color_shift", "crop",
              "blur", "labels", "curriculum", "term", "option", "recompute", "precision")


def _invert_from_generator(args: argparse.Namespace) -> int:
    from smi.generators.pool import generate_pool
    from smi.inversion import SparsityConfig
    from smi.models.loading import load_teacher

    given = [name for name in PIXEL_ONLY if getattr(args, name, None) is not None]
    if given or args.method != "deepinversion":
        flag = "--method" if not given else "--" + given[0].replace("synth_", "").replace("_", "-")
        raise SmiError(f"{flag} shapes pixel optimization; a pool from --generator is sampled, not optimized "
                       "(its training settings are smi train-generator's)")
    with _flags(args, batch_size="synth_batch_size"):
        teacher = load_teacher(args.model, pretrained=args.pretrained, device=args.device)
        result = generate_pool(teacher, args.generator, args.num_images, args.out,
                               sparsity=SparsityConfig.parse(args.sparsity or "default"),
                               batch_size=args.synth_batch_size,
                               seed=args.seed, device=args.device, overwrite=args.overwrite, grid=not args.no_grid)
    print(f"pool: {result.folder} ({result.num_images} images from generator {args.generator}, "
          f"{result.seconds:.1f} s)")
    if result.grid is not None:
        print(f"grid: {result.grid}")
    return 0


def _invert_from_diffusion(args: argparse.Namespace) -> int:
    from smi.generators.diffusion import GenQConfig, diffusion_pool
    from smi.inversion import METHODS
    from smi.models.loading import load_teacher

    if METHODS.get(args.method, param="method").task != "diffusion":
        raise SmiError(f"--diffusion-model is read by the diffusion methods (genq, genq-mix), not by {args.method}")
    if args.diffusion_model is None:
        raise SmiError(f"--method {args.method} samples a local text-to-image diffusers pipeline: give its folder "
                       "with --diffusion-model PATH (nothing is downloaded)")
    given = [name for name in PIXEL_ONLY if name != "option" and getattr(args, name, None) is not None]
    if given:
        raise SmiError(f"--{given[0].replace('synth_', '').replace('_', '-')} shapes pixel optimization; "
                       f"{args.method} samples a diffusion model (its knobs: --option genq_...=VALUE)")
    cfg = _inversion_config(args)  # the method's and the user's --option knobs, validated
    with _flags(args, batch_size="synth_batch_size", options="option"):
        genq = GenQConfig.from_options(cfg.option, args.synth_batch_size)
        teacher = load_teacher(args.model, pretrained=args.pretrained, device=args.device)
        result = diffusion_pool(teacher, args.diffusion_model, args.num_images, args.out, genq, method=args.method,
                                sparsity=cfg.sparsity, seed=args.seed,
                                device=args.device, overwrite=args.overwrite, grid=not args.no_grid)
    print(f"pool: {result.folder} ({result.num_images} images from {args.diffusion_model}, {result.seconds:.1f} s)")
    if result.grid is not None:
        print(f"grid: {result.grid}")
    return 0


def _add_invert(sub: argparse._SubParsersAction) -> None:
    from smi.inversion import CURRICULA, LABELS, METHODS, TERMS
    from smi.inversion.engine import RECOMPUTE

    methods = METHODS.help_lines()
    methods += f"\n\nloss terms (--term NAME=WEIGHT):\n{TERMS.help_lines()}"
    methods += f"\n\nlabel samplers (--labels):\n{LABELS.help_lines()}"
    methods += f"\n\ncurricula (--curriculum):\n{CURRICULA.help_lines()}"
    methods += ("\n\nEvery method runs dense or sparse (--sparsity); psaq, sardfq and mimiq read attention, so "
                "they need a ViT; on a CNN teacher with BatchNorm every method adds DeepInversion's batch-norm "
                "prior. A segmenter (fmnist_scene_segmenter) is inverted toward per-pixel target maps (random "
                "object-shaped blobs; dfq-sam lets them evolve toward its confident labels) with dfq-sam, "
                "deepinversion, psaq or mimiq; the pool then also stores the maps, and sparse inversion stops "
                "the maps' background first.")
    p = sub.add_parser(
        "invert", help="synthesize images from a teacher into a pool folder", formatter_class=_Formatter,
        description=f"Synthesize images by model inversion, dense or sparse.\n\nmethods:\n{methods}\n\n"
        "Rerunning the same command on the same --out resumes; a folder made with other settings is refused.",
    )
    _add_model(p, what="teacher")
    p.add_argument("--num-images", type=int, default=32, help="images to synthesize")
    p.add_argument("--generator", metavar="DIR",
                   help="sample the pool from a generator trained by `smi train-generator` instead of optimizing "
                        "pixels (sparse: each image keeps the patches the teacher attends to most, ranked by the "
                        "--sparsity schedule's stops)")
    p.add_argument("--diffusion-model", metavar="PATH",
                   help="genq / genq-mix: a local diffusers text-to-image pipeline folder (pipeline.save_pretrained; "
                        "safetensors weights, nothing downloaded); sparse pools keep the patches the teacher attends "
                        "to most")
    _add_inversion_args(p)
    _add_run(p, out="pool folder to write (or resume)", seed="seed of targets, initial noise and jitter",
             overwrite="replace a pool made with other settings")
    p.add_argument("--recompute", choices=RECOMPUTE,
                   help="recompute a ViT's block activations in backward instead of keeping them (activation "
                        "checkpointing; the images are identical): auto (the default) while a sparse run still "
                        "optimizes more patches than its final phase, so the whole run needs about the final "
                        "phase's memory, for a few %% more time; always: every step, dense runs too (least "
                        "memory, about a third more time); never: fastest, a sparse run's first phase then needs "
                        "a dense run's memory")
    p.add_argument("--no-grid", action="store_true", help="do not write grid.png")
    p.set_defaults(func=_cmd_invert, parser=p)


def _kd_config(args: argparse.Namespace, cls: type, **extra: Any) -> Any:
    """A DistillConfig (or QatConfig) from the flags of :func:`_add_kd_args`."""
    with _flags(args, time_budget_s="time_budget", color_shift="augment_color", background="augment_background"):
        return cls(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, lr_schedule=args.lr_schedule,
                   temperature=args.temperature, ce_weight=args.ce_weight, steps_per_epoch=args.steps_per_epoch,
                   online_steps=args.online_steps, augment=not args.no_augment, mixup=args.mixup,
                   color_shift=args.augment_color, background=args.augment_background, time_budget_s=args.time_budget,
                   eval_images=args.eval_images, train_images=args.train_images, style_pairs=args.style_pairs,
                   attention=args.attention, ema=args.ema, seed=args.seed, **extra)


def _training_source(args: argparse.Namespace) -> Any:
    from smi.data.sources import NoiseSource, RealSource
    from smi.inversion.synthesis import OnlineSource

    _check_pool_flags(args, args.pool is not None, "give a sparse --pool")
    if args.generator is not None:
        from smi.generators import GeneratorSource

        return GeneratorSource(args.generator[0], tuple(args.generator[1:]))
    if args.online_generator is not None:
        from smi.generators import GeneratorConfig, OnlineGeneratorSource

        with _flags(args, kind="online_generator", steps="generator_steps", adversarial="generator_adversarial",
                    game="generator_game", style_seek_weight="generator_style_seek",
                    bn_weight="generator_bn_weight", init="generator_init"):
            return OnlineGeneratorSource(GeneratorConfig(kind=args.online_generator, seed=args.seed,
                                                         style_seek_weight=args.generator_style_seek,
                                                         pixel_range=args.generator_pixel_range,
                                                         bn_weight=args.generator_bn_weight),
                                         steps=args.generator_steps, adversarial=args.generator_adversarial,
                                         game=args.generator_game, init=args.generator_init)
    if args.generator_init is not None:
        raise SmiError("--generator-init starts an --online-generator; give one")
    if args.pool_background is not None and args.augment_background:
        raise SmiError("--pool-background shows the pool whole, so --augment-background has no stopped patches "
                       "to fill; give one of them", param="pool_background")
    if args.online:
        return OnlineSource(_inversion_config(args))
    if args.real is not None:
        return RealSource(args.real or None)
    if args.noise:
        return NoiseSource()
    with _flags(args):
        return _pool_source(args.pool, args)


POOL_FLAGS = ("pool_background", "pool_level", "pool_refill")  # argparse dests; _flags names them as typed


def _check_pool_flags(args: argparse.Namespace, is_pool: bool, remedy: str) -> None:
    """The --pool-* flags fill a sparse pool's stopped patches: refuse the first one given when the images are not a
    pool (else it would be silently ignored)."""
    given = [dest for dest in POOL_FLAGS if getattr(args, dest, None) is not None and getattr(args, dest) is not False]
    if given and not is_pool:
        raise SmiError(f"fills the stopped patches of a sparse pool's images; {remedy}", param=given[0])


def _pool_source(path: str, args: argparse.Namespace) -> Any:
    """A pool folder as its kept patches, or shown whole on a filled background (--pool-background, --pool-refill)."""
    from smi.data.sources import PoolSource

    refill = getattr(args, "pool_refill", False)
    if args.pool_background is None:
        if refill:
            raise SmiError("--pool-refill refills a --pool-background; give one", param="pool_refill")
        if args.pool_level is not None:
            raise SmiError("--pool-level sets a --pool-background's level; give one", param="pool_level")
        return PoolSource(path)
    from smi.inversion.background import FilledPoolSource

    return FilledPoolSource(path, background=args.pool_background, refill=refill, level=args.pool_level)


def _eval_data(args: argparse.Namespace, teacher: Any, what: str, quiet: bool = False) -> str | None:
    eval_data = None if args.eval_data == "none" else args.eval_data or teacher.dataset
    if eval_data is None and args.eval_data is None and not quiet:
        print(f"smi: note: {teacher.spec} records no dataset, so the {what} is not evaluated "
              "(give --eval-data to evaluate it)", file=sys.stderr)
    return eval_data


def _add_kd_args(p: argparse.ArgumentParser, cls: type, what: str) -> None:
    """Training data and the distillation loop's settings, defaults from ``cls`` (DistillConfig or QatConfig)."""
    from smi.data.datasets import data_help
    from smi.generators import GeneratorConfig

    d = cls()
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--pool", help="train on this synthetic pool (offline)")
    p.add_argument("--pool-background", type=_number, metavar="STD",
                   help=f"--pool: {POOL_BACKGROUND_HELP}")
    p.add_argument("--pool-level", type=_number, metavar="FRACTION", help=POOL_LEVEL_HELP)
    p.add_argument("--pool-refill", action="store_true",
                   help="--pool-background: a fresh background every time a training batch draws an image (the "
                        "objects meet many backgrounds; --train-images keeps its fixed images' objects)")
    src.add_argument("--online", action="store_true",
                     help="synthesize --synth-batch-size images per epoch into OUT/pool and train on the whole pool")
    src.add_argument("--real", nargs="?", const="", metavar="DATASET",
                     help=f"train on real training images, an upper bound: the teacher's dataset, or {data_help()}")
    src.add_argument("--noise", action="store_true", help="train on fresh Gaussian noise (a lower bound)")
    src.add_argument("--generator", metavar="DIR", nargs="+",
                     help="train on fresh images from a generator trained by `smi train-generator` (--online-steps "
                          "per epoch); several: an ensemble, each batch split evenly among them")
    src.add_argument("--online-generator", metavar="KIND",
                     help="train a generator of this kind (gdfq, qimera, causal) alongside: --generator-steps steps "
                          "against the teacher before each epoch, then --online-steps on fresh images from it")
    p.add_argument("--generator-steps", type=int, default=50,
                   help="--online-generator: generator steps per epoch (batch 64, Adam 1e-3)")
    p.add_argument("--generator-init", metavar="DIR",
                   help="--online-generator: start from this generator trained by `smi train-generator` (same kind "
                        "and --generator-pixel-range) instead of fresh weights, e.g. to play the adversarial game "
                        "from a generator that already fools the teacher; its training time counts as synthesis")
    p.add_argument("--generator-adversarial", type=_number, default=0.0,
                   help="--online-generator: weight of the student term in the generator's loss (see "
                        "--generator-game)")
    p.add_argument("--generator-style-seek", type=_number, default=0.0,
                   help="--online-generator causal: weight of mode seeking between a class's two styles (keeps the "
                        "noise changing the image; `smi train-generator --style-seek-weight`)")
    p.add_argument("--generator-pixel-range", action="store_true",
                   help="--online-generator: images bounded to the teacher's valid pixels (`smi train-generator "
                        "--pixel-range`)")
    p.add_argument("--generator-bn-weight", type=_number, default=GeneratorConfig().bn_weight, metavar="W",
                   help="--online-generator, BatchNorm teachers: weight of GDFQ's BN-statistics loss (`smi "
                        "train-generator --bn-weight`); higher makes images whose features match the teacher's "
                        "training statistics more closely, at the price of the asked class")
    p.add_argument("--style-pairs", type=_number, default=d.style_pairs,
                   help="Causal-DFQ's discrepancy reduction: with a --generator (or --online-generator) of kind "
                        "causal, whose batches are one class in two styles, the model on each image also matches "
                        "the teacher on its restyled twin, at this weight (KL at --temperature)")
    p.add_argument("--generator-game", choices=["js", "adadfq"], default="js",
                   help="--online-generator's student term: js = minus the teacher-student JS divergence (images "
                        "the student still gets wrong, DFAD); adadfq = AdaDFQ's margin on the entropy of the "
                        "teacher-student logit difference (AKT's generator; with --feature-loss akt in smi qat)")
    p.add_argument("--epochs", type=int, default=d.epochs, help="training epochs")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="training batch size")
    p.add_argument("--lr", type=_number, default=d.lr,
                   help=f"peak AdamW learning rate (weight decay {d.weight_decay:g})")
    p.add_argument("--lr-schedule", choices=["cosine", "constant"], default=d.lr_schedule,
                   help=f"after {d.warmup_epochs:g} warm-up epoch(s): cosine to {d.min_lr:g}, or constant")
    p.add_argument("--temperature", type=_number, default=d.temperature, help="softmax temperature of the KL term")
    p.add_argument("--ce-weight", type=_number, default=d.ce_weight,
                   help="weight of cross-entropy on the teacher's argmax")
    p.add_argument("--steps-per-epoch", type=int,
                   help="training steps per epoch (default: one pass over a pool or real images; --online-steps "
                        "for online, noise and a generator)")
    p.add_argument("--online-steps", type=int, default=d.online_steps,
                   help="training steps per epoch with --online, --noise, --generator or --online-generator")
    p.add_argument("--no-augment", action="store_true", help="no random whole-patch shift and flip")
    p.add_argument("--augment-color", type=_number, default=d.color_shift, metavar="S",
                   help="random contrast exp(U(-S, S)) and brightness U(-S, S) of every training image, kept in the "
                        "valid pixel range; the teacher labels what the student sees; 0 is off")
    p.add_argument("--augment-background", type=_number, default=d.background, metavar="P",
                   help="probability that the student sees a batch of sparse images whole, their stopped patches "
                        "filled with a random background (a flat level anywhere in the pixel range plus noise), "
                        "while the teacher labels the kept patches: the class is the object's, not the "
                        "background's; 0 is off")
    p.add_argument("--attention", type=_number, default=d.attention, metavar="W",
                   help="weight of attention transfer: every student block's attention rows (softmax over the "
                        "tokens) pulled to a teacher block's by KL, head by head when the head counts match, else "
                        "head-averaged; student block i is paired with teacher block ceil((i+1)*Lt/Ls)-1; needs "
                        "two ViTs on the same patch grid; 0 is off")
    p.add_argument("--ema", type=_number, default=d.ema, metavar="DECAY",
                   help="keep an exponential moving average of the trained weights (timm's ModelEmaV3: decay "
                        "min(DECAY, 1-(1+step)^(-2/3)), updated every step; for example 0.999) and evaluate, log and "
                        "save it instead of the last weights; 0 is off")
    p.add_argument("--mixup", type=_number, default=d.mixup, metavar="P",
                   help="probability that a training batch is made of mixtures of its images, each labelled by the "
                        "teacher (mixup with lambda ~ U(0, 1); stretches a small synthetic pool)")
    p.add_argument("--train-images", type=int, metavar="N",
                   help="train on a fixed set of N images of the source, drawn as calibration draws them with the "
                        "same --seed (the first N of a pool; a seeded draw of real images; N fixed noise images)")
    p.add_argument("--time-budget", type=_number, help="stop after the epoch at which synthesis + training pass this "
                                                     "many seconds")
    p.add_argument("--eval-data", help=f"test data for the per-epoch top-1 of the {what}: {data_help()} | none "
                                        "(default: the teacher's dataset)")
    p.add_argument("--eval-images", type=int, help="evaluate on the first N test images (default: all)")
    group = p.add_argument_group("synthesis (with --online)")
    _add_inversion_args(group, prefix="synth-")


def _report_training(args: argparse.Namespace, result: Any, fields: dict[str, Any], product: str) -> int:
    """The last line of a training command (distill, qat): one JSON object, or accuracy, epochs, time, product, plot."""
    import json

    if args.json:
        print(json.dumps({"out": str(result.out), "top1": result.top1, "wall_s": result.wall_s,
                          "epochs": result.epochs, **fields, "plot": str(result.plot) if result.plot else None}))
    else:
        acc = f"test top-1 {result.top1:.2f} %, " if result.top1 is not None else ""
        print(f"{acc}{result.epochs} epochs, {result.wall_s:.0f} s of synthesis + training; {product}"
              + (f"; plot: {result.plot}" if result.plot else ""))
    return 0


def _cmd_distill(args: argparse.Namespace) -> int:
    from smi.distributed import from_env
    from smi.models.loading import load_teacher
    from smi.transfer import DistillConfig, build_student, distill

    cfg = _kd_config(args, DistillConfig, linear_probe=args.linear_probe, new_head=args.new_head)
    data = _training_source(args)
    dist = from_env(args.device)  # torchrun: data-parallel processes, gloo on CPU, nccl on CUDA
    try:
        teacher = load_teacher(args.teacher, pretrained=args.pretrained, device=dist.device)
        arch = args.student or (None if args.student_checkpoint else "fmnist_vit_mini")
        student = build_student(arch, teacher, checkpoint=args.student_checkpoint, linear_probe=args.linear_probe,
                                new_head=args.new_head, seed=args.seed, device=dist.device)
        eval_data = _eval_data(args, teacher, "student", quiet=dist.rank != 0)
        result = distill(teacher, student, data, args.out, cfg, eval_data=eval_data, device=dist.device,
                         overwrite=args.overwrite, dist=dist)
    finally:
        dist.close()
    if dist.rank != 0:
        return 0
    return _report_training(args, result, {"student": str(result.weights)}, f"student: {result.weights}")


def _add_distill(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "distill", help="train a student on the teacher's outputs over synthetic images", formatter_class=_Formatter,
        description="Data-free knowledge transfer: KL divergence between teacher and student at a temperature, on "
        "a synthetic pool (offline), on images synthesized while training (--online), or on real images or noise "
        "for comparison. Images of a sparse pool reach both models as their kept patches only. Evaluates on real "
        "test data after each epoch, checkpoints each epoch, and resumes when rerun with the same --out.",
    )
    _add_model(p, "--teacher", "teacher")
    p.add_argument("--student", help="timm architecture of the student, built for the teacher's classes and input "
                                     "size (default: fmnist_vit_mini, or the checkpoint's)")
    p.add_argument("--student-checkpoint", help="start from this smi checkpoint (NAME.safetensors + NAME.json)")
    p.add_argument("--linear-probe", action="store_true",
                   help="freeze the checkpoint's backbone and train a new head (needs --student-checkpoint)")
    p.add_argument("--new-head", action="store_true",
                   help="replace the checkpoint's head by a new one for the teacher's classes and train every weight "
                        "(fine-tuning a backbone trained on other data; needs --student-checkpoint)")
    from smi.transfer import DistillConfig

    _add_kd_args(p, DistillConfig, "student")
    _add_run(p, out="run folder (checkpoint, log, plot, student; resumable)",
             seed="seed of the student's init, batches, augmentation, synthesis",
             overwrite="replace a run made with other settings", json=True)
    p.set_defaults(func=_cmd_distill, parser=p)


def _cmd_qat(args: argparse.Namespace) -> int:
    from smi.distributed import from_env
    from smi.models.loading import load_teacher
    from smi.quant.qat import QatConfig, qat

    cfg = _kd_config(args, QatConfig, feature_loss=args.feature_loss, feature_weight=args.feature_weight)
    data = _training_source(args)
    dist = from_env(args.device)  # torchrun: data-parallel processes, gloo on CPU, nccl on CUDA
    try:
        teacher = load_teacher(args.model, pretrained=args.pretrained, device=dist.device)
        eval_data = _eval_data(args, teacher, "quantized model", quiet=dist.rank != 0)
        result = qat(teacher, args.quantized, data, args.out, cfg, eval_data=eval_data, device=dist.device,
                     overwrite=args.overwrite, dist=dist)
    finally:
        dist.close()
    if dist.rank != 0:
        return 0
    return _report_training(args, result, {}, f"quantized model: {result.out} (smi eval --quantized {result.out})")


def _add_qat(sub: argparse._SubParsersAction) -> None:
    from smi.quant.qat import QatConfig

    p = sub.add_parser(
        "qat", help="quantization-aware training of a quantized model against its float teacher",
        formatter_class=_Formatter,
        description="Fine-tune a model `smi quantize` made (calibrated, optionally reconstructed): every weight "
        "(through the straight-through estimator), every weight and activation step size and zero point (LSQ), "
        "biases and norms learn to match the float model's outputs (KL at a temperature) on a synthetic pool, on "
        "images synthesized while training (--online), or on real images or noise for comparison. Images of a "
        "sparse pool reach both models as their kept patches only. Evaluates after each epoch, checkpoints each "
        "epoch, resumes when rerun with the same --out, and finally writes OUT/quantized.safetensors, which "
        "`smi eval --quantized OUT` reads.",
    )
    _add_model(p, "--model", "the float model that was quantized (the teacher)")
    p.add_argument("--quantized", required=True, help="folder written by `smi quantize` for this model")
    p.add_argument("--feature-loss", choices=["none", "mse", "akt"], default="none",
                   help="a term on every block's output tokens as well: mse (squared error per token) or akt "
                        "(KL at T=8 between channel and token attention maps, after AKT)")
    p.add_argument("--feature-weight", type=_number, default=1.0, help="weight of --feature-loss")
    _add_kd_args(p, QatConfig, "quantized model")
    _add_run(p, out="run folder (checkpoint, log, plot, and the quantized model; resumable)",
             seed="seed of the batches, augmentation, synthesis",
             overwrite="replace a run made with other settings", json=True)
    p.set_defaults(func=_cmd_qat, parser=p)


def _cmd_demo(args: argparse.Namespace) -> int:
    from smi.demo import run_demo

    run_demo(args.out, model=args.model, num_images=args.num_images, iterations=args.iterations, device=args.device,
             distill_seconds=args.distill_seconds, data=args.data, student=args.student,
             distill_teacher=args.distill_teacher)
    return 0


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="invert (dense, sparse), quantize and distil the shipped teacher: `make demo`",
                       formatter_class=_Formatter)
    from smi.data.datasets import data_help

    p.add_argument("--model", default="fmnist_vit_tiny",
                   help="teacher: timm name, shipped teacher name, or a checkpoint NAME.safetensors")
    p.add_argument("--data", help=f"real data for the quantization and distillation sections: {data_help()} "
                                  "(default: the dataset the teacher records)")
    p.add_argument("--distill-teacher",
                   help="teacher of the distillation section (default: --model)")
    p.add_argument("--student", help="student architecture of the distillation section (default: a fresh copy of "
                                     "the shipped teacher's architecture for a shipped teacher, else fmnist_vit_mini)")
    p.add_argument("--num-images", type=int, default=32, help="images (one batch)")
    p.add_argument("--iterations", type=int, default=1000,
                   help="optimisation steps, more than 300 (the paper uses 4000; the demo keeps its stopping "
                        "schedule, whose last stop is at 300)")
    _add_run(p, out=None)
    p.add_argument("--distill-seconds", type=_number, default=120.0,
                   help="wall-time budget of the short distillation run at the end")
    p.add_argument("--out", default="demo_out", help="output folder")
    p.set_defaults(func=_cmd_demo, parser=p)


def _cmd_quantize(args: argparse.Namespace) -> int:
    import json

    from smi.data.sources import PoolSource, parse_source
    from smi.models.loading import load_teacher
    from smi.quant import QuantConfig
    from smi.quant.pipeline import quantize_teacher

    with _flags(args, num_images="calib_images", source="calib"):
        cfg = QuantConfig.create(args.quantizer, w_bits=args.w_bits, a_bits=args.a_bits, edge_bits=args.edge_bits,
                                 rotate=args.rotate)
        recon = None
        if args.reconstruct:
            from smi.quant.reconstruct import ReconstructConfig

            recon = ReconstructConfig(iterations=args.reconstruct_iterations, seed=args.seed)
        source = parse_source(args.calib)
        _check_pool_flags(args, isinstance(source, PoolSource), f"--calib {args.calib} is not a pool folder")
        if isinstance(source, PoolSource):
            source = _pool_source(source.path, args)
        teacher = load_teacher(args.model, pretrained=args.pretrained, device=args.device)
        res = quantize_teacher(teacher, cfg, source, num_images=args.calib_images, seed=args.seed,
                               batch_size=args.batch_size, out=args.out, overwrite=args.overwrite, reconstruct=recon,
                               correct_activations=args.correct_activations, progress=True)
    calib = res.calibration
    summary = {"out": str(res.folder), **cfg.to_dict(), "source": calib.source, "images": len(calib.images),
               "seed": args.seed, "sparse": calib.masks is not None, "reconstruction": res.reconstruction,
               "correction": res.correction}
    done = f", {len(res.reconstruction)} units reconstructed" if res.reconstruction else ""
    done += f", {len(res.correction)} branches corrected" if res.correction else ""
    print(json.dumps(summary) if args.json else
          f"quantized {teacher.spec} to {cfg.label()} ({cfg.name}) on {len(calib.images)} "
          f"{'sparse ' if calib.masks is not None else ''}{calib.source} images{done} -> {res.folder}")
    return 0


def _add_quantize(sub: argparse._SubParsersAction) -> None:
    from smi.data.sources import source_help
    from smi.quant import PRESETS

    p = sub.add_parser("quantize", help="post-training quantization calibrated on a pool, real images or noise",
                       formatter_class=_Formatter,
                       description="Fake-quantize a ViT (prepare -> calibrate -> convert).\n\nquantizer presets:\n"
                       f"{PRESETS.help_lines(width=10)}")
    _add_model(p)
    p.add_argument("--calib", required=True,
                   help=f"calibration images: {source_help()} (a dataset's train split is the real-data upper bound)")
    p.add_argument("--calib-images", type=int, default=32, help="calibration images")
    p.add_argument("--pool-background", type=_number, metavar="STD", help=f"--calib POOL: {POOL_BACKGROUND_HELP}")
    p.add_argument("--pool-level", type=_number, metavar="FRACTION", help=POOL_LEVEL_HELP)
    p.add_argument("--w-bits", type=int, default=8, help="weight bits, 2..8")
    p.add_argument("--a-bits", type=int, default=8, help="activation bits, 2..8")
    p.add_argument("--edge-bits", type=int, metavar="BITS",
                   help="bits of the first layer (patch embedding or stem convolution) and the classifier head, "
                        "weights and input, 2..8 (default: --w-bits / --a-bits; low-bit QAT papers such as LSQ and "
                        "Q-ViT keep both at 8)")
    p.add_argument("--quantizer", default="baseline", help=f"quantizer preset: {', '.join(PRESETS.names())}")
    p.add_argument("--rotate", action="store_true",
                   help="first rotate the ViT's residual stream and each head's queries and keys by fixed orthogonal "
                        "matrices folded into its weights (QuaRot-style, no online transform): the same float "
                        "function and layers, fewer outlier channels to quantize (W3A3 calibration from 32 sparse "
                        "synthetic images +12.7 pt on the shipped ViT); timm ViTs only")
    p.add_argument("--batch-size", type=int, default=32, help="calibration batch size")
    p.add_argument("--reconstruct", action="store_true",
                   help="after calibration, reconstruct block by block on the calibration images: learned weight "
                        "rounding (AdaRound) and activation step sizes (LSQ) with QDrop (BRECQ); resumes per block")
    p.add_argument("--reconstruct-iterations", type=int, default=500, metavar="N",
                   help="optimizer steps per block with --reconstruct")
    p.add_argument("--correct-activations", nargs="?", const="outputs", default=None, choices=["outputs", "all"],
                   help="finally fit per-channel scale and bias corrections of each block's attn.proj and mlp.fc2 "
                        "outputs to the float model's on the calibration images, folded into those layers (DFQ-ViT); "
                        "'all': also attn.qkv and mlp.fc1, each to the float layer's own output (better at W4A4 and "
                        "W3A3 on the shipped ViT, see the README)")
    _add_run(p, out="folder for quantized.safetensors and quantized.json", seed="seed of the real/noise draw",
             overwrite="replace a quantized model made with other settings", json=True)
    p.set_defaults(func=_cmd_quantize, parser=p)


def _cmd_eval(args: argparse.Namespace) -> int:
    import json

    from smi.data.datasets import eval_dataset, model_dataset
    from smi.evaluation import evaluate, evaluate_segmentation
    from smi.models.loading import load_teacher

    if args.quantized and args.exported:
        raise SmiError("give --quantized (the simulation) or --exported (the integer model), not both")
    teacher = load_teacher(args.model, pretrained=args.pretrained, device=args.device)
    model = teacher.model
    if args.quantized:
        from smi.quant.io import load_quantized

        model, _ = load_quantized(args.quantized, teacher)
    if args.exported:
        from smi.quant.export import load_exported

        if args.device != "cpu":
            raise SmiError("--exported runs on the CPU (onnxruntime's CPU provider, or Inductor's x86 int8 "
                           "kernels); drop --device")
        model, _ = load_exported(args.exported, teacher)
    ds = eval_dataset(model_dataset(teacher, args.data), teacher, args.limit)
    if teacher.task == "segmentation":
        res = evaluate_segmentation(model, ds, batch_size=args.batch_size, device=args.device)
        text = f"mIoU {res['miou']:.2f} %  pixel accuracy {res['pixel_acc']:.2f} %  ({res['n']} images)"
    else:
        res = evaluate(model, ds, batch_size=args.batch_size, device=args.device)
        text = f"top-1 {res['top1']:.2f} %  top-5 {res['top5']:.2f} %  ({res['n']} images)"
    print(json.dumps(res) if args.json else text)
    return 0


def _add_eval(sub: argparse._SubParsersAction) -> None:
    from smi.data.datasets import data_help

    p = sub.add_parser("eval", help="top-1/top-5 of a model (or its quantized copy) on real data; mIoU for a segmenter",
                       formatter_class=_Formatter)
    _add_model(p)
    p.add_argument("--quantized", help="folder written by `smi quantize` for this model")
    p.add_argument("--exported", help="folder written by `smi export` for this model: evaluates the integer model")
    p.add_argument("--data", help=f"test split of {data_help()} (default: the dataset the model records)")
    p.add_argument("--limit", type=int, help="evaluate the first N images only")
    from smi.evaluation import EVAL_BATCH

    p.add_argument("--batch-size", type=int, default=EVAL_BATCH, help="evaluation batch size")
    _add_run(p, out=None, json=True)
    p.set_defaults(func=_cmd_eval, parser=p)


def _cmd_export(args: argparse.Namespace) -> int:
    import json

    from smi.models.loading import load_teacher
    from smi.quant.export import export_quantized

    with _flags(args):
        teacher = load_teacher(args.model, pretrained=args.pretrained)
        res = export_quantized(teacher, args.quantized, args.format, args.out, overwrite=args.overwrite)
    summary = {"out": str(res.folder), "file": str(res.file), "format": args.format,
               "bytes": res.file.stat().st_size, **res.agreement}
    print(json.dumps(summary) if args.json else
          f"exported {args.quantized} as {args.format} -> {res.file} ({res.file.stat().st_size / 1e6:.2f} MB); "
          f"on 8 check images it agrees with the simulation on {100 * res.agreement['argmax_agreement']:.0f} % of "
          f"argmaxes, largest logit difference {res.agreement['max_abs_diff']:.3g}")
    return 0


def _add_export(sub: argparse._SubParsersAction) -> None:
    from smi.quant.export import EXPORTERS

    p = sub.add_parser("export", help="turn a quantized folder into a model an integer runtime runs (onnx, pt2e)",
                       formatter_class=_Formatter,
                       description="Export the model `smi quantize` calibrated, at its own scales, in a format whose "
                       "runtime executes it in integers; `smi eval --exported FOLDER` measures it.\n\nformats:\n"
                       f"{EXPORTERS.help_lines(width=10)}")
    _add_model(p)
    p.add_argument("--quantized", required=True, help="folder written by `smi quantize` for this model")
    p.add_argument("--format", default="onnx", help=f"export format: {', '.join(EXPORTERS.names())}")
    _add_run(p, out="folder for the exported model and export.json", overwrite="replace an earlier export",
             json=True)
    p.set_defaults(func=_cmd_export, parser=p)


def _cmd_pool_verify(args: argparse.Namespace) -> int:
    from smi.data.pool import verify_pool

    problems = verify_pool(args.folder)
    for name, problem in problems:
        print(f"BAD {name}: {problem}")
    if problems:
        print(f"smi: error: {len(problems)} bad shard(s) in {args.folder}", file=sys.stderr)
        return 1
    print(f"ok: every shard of {args.folder} matches its checksum")
    return 0


def _cmd_pool_info(args: argparse.Namespace) -> int:
    import json

    from smi.data.pool import pool_info

    info = pool_info(args.folder)
    if args.json:
        print(json.dumps(info))
        return 0
    t = info["teacher"]
    print(f"pool      {info['folder']}")
    print(f"teacher   {t.get('spec')} ({t.get('arch')}, {t.get('fingerprint')})")
    print(f"method    {info['method']}, sparsity {info['sparsity']}, {info['iterations']} iterations, "
          f"batch {info['batch_size']}, seed {info['seed']}")
    print(f"images    {info['images_done']} of {info['images_requested']} in {info['shards']} shard(s); "
          f"kept patches {info['kept_patches']}")
    print(f"per class {info['per_class']}")
    print(f"time      {info['seconds_total']:.1f} s of inversion")
    return 0


def _add_pool(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pool", help="inspect a synthetic pool: info, verify", formatter_class=_Formatter)
    inner = p.add_subparsers(dest="pool_command", required=True, metavar="ACTION", parser_class=_Parser)
    v = inner.add_parser("verify", help="check every shard against the manifest's sha256; exit 1 if any is bad",
                         formatter_class=_Formatter)
    v.add_argument("folder", help="pool folder")
    v.set_defaults(func=_cmd_pool_verify, parser=v)
    i = inner.add_parser("info", help="teacher, method, schedule, counts per class, time spent",
                         formatter_class=_Formatter)
    i.add_argument("folder", help="pool folder")
    i.add_argument("--json", action="store_true", help="print one JSON object")
    i.set_defaults(func=_cmd_pool_info, parser=i)


_SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_invert, _add_quantize, _add_qat, _add_export, _add_eval, _add_distill, _add_pool, _add_demo,
    _add_train_teacher, _add_train_generator,
]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="smi", formatter_class=_Formatter,
        description="Compress pretrained Vision Transformers without their training data: synthesize images "
        "from the model by (sparse) model inversion. `smi COMMAND --help` explains each command.\n\n"
        "CPU threads: torch uses one per CPU this process may run on (its affinity mask and cgroup quota, not "
        "every core of the machine); OMP_NUM_THREADS or SMI_THREADS sets another number.",
    )
    from smi import __version__

    parser.add_argument("--version", action="version", version=f"smi {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    for add in _SUBCOMMANDS:
        add(sub)
    return parser


def _check_device(spec: str) -> None:
    import torch

    try:
        device = torch.device(spec)
    except RuntimeError:
        raise SmiError(f"--device {spec!r} is not a torch device (try cpu, cuda or cuda:0)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SmiError(f"--device {spec} requested but CUDA is not available on this machine")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise SmiError(f"--device {spec} requested but MPS is not available on this machine")


def _flag_names(parser: argparse.ArgumentParser, aliases: dict[str, str]) -> dict[str, str]:
    """Library parameter -> the flag that sets it: the option whose dest is the parameter (or its alias)."""
    by_dest = {a.dest: a.option_strings[0] for a in parser._actions if a.option_strings}
    return {**by_dest, **{param: by_dest[dest] for param, dest in aliases.items() if dest in by_dest}}


@contextmanager
def _flags(args: argparse.Namespace, **aliases: str) -> Iterator[None]:
    """Errors raised inside name the flag the user typed instead of the library parameter.

    ``aliases`` maps parameters to argparse dests where the two differ (``batch_size=synth_batch_size``).
    """
    try:
        yield
    except SmiError as e:
        flag = _flag_names(args.parser, aliases).get(e.param or "")
        if flag is None:
            raise
        raise e.with_name(flag) from None


def _one_line_warnings() -> None:
    """smi's warnings (settings that work but are almost surely wrong) as one ``smi: warning:`` line each, once."""
    import warnings

    from smi.errors import SmiWarning

    shown: set[tuple[str, int]] = set()
    default = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001 (warnings' signature)
        if not issubclass(category, SmiWarning):
            return default(message, category, filename, lineno, file, line)
        if (filename, lineno) not in shown:
            shown.add((filename, lineno))
            print(f"smi: warning: {message}", file=sys.stderr)

    warnings.showwarning = show
    warnings.simplefilter("always", SmiWarning)


def main(argv: Sequence[str] | None = None) -> int:
    """Every outcome is an exit status and at most one line on stderr; only a bug prints a traceback.

    2: the input was refused (``SmiError``; nothing already written is touched); 1: the operating
    system refused (a file or folder that cannot be read or written); 130: interrupted.
    """
    args = build_parser().parse_args(argv)
    _one_line_warnings()
    from smi.utils.threads import configure_threads

    configure_threads()
    try:
        if getattr(args, "device", "cpu") != "cpu":
            _check_device(args.device)
        with _flags(args):
            return args.func(args)
    except SmiError as e:
        print(f"smi: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # permissions, a full disk, a vanished file: the system's words and the path
        where = f": {e.filename}" if e.filename else ""
        print(f"smi: error: {e.strerror or type(e).__name__}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("smi: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except Exception:  # a bug in smi (or a library): the traceback, and how to report it
        import traceback

        traceback.print_exc()
        print("smi: internal error: this is a bug; please report it with the command line and the traceback above",
              file=sys.stderr)
        return 3
