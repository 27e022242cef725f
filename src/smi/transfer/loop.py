"""Data-free knowledge transfer: train a student on the teacher's outputs over synthetic images.

Training data is a synthetic pool (offline), a pool that grows while training (online: each
epoch first synthesizes one batch into ``OUT/pool``, then trains on batches drawn from the whole
pool, as the SMI reference does), real training images (an upper bound) or Gaussian noise (a
lower bound). Images of a sparse pool reach teacher and student as their kept patches only.

``OUT`` holds ``config.json`` (what the run is), ``checkpoint.safetensors`` (student +
optimizer + clocks, after every epoch), ``log.jsonl`` (one line per epoch), ``accuracy.png``
and finally ``student.safetensors`` + ``student.json``, a checkpoint ``smi eval --model`` reads.
Rerunning the same command resumes; a folder made with other settings is refused.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from smi.data.datasets import eval_dataset
from smi.data.pool import clear_pool
from smi.data.sources import DataSource
from smi.distributed import Dist
from smi.errors import SmiError
from smi.evaluation import evaluate
from smi.inversion.augment import (
    BACKGROUND_NOISE,
    apply_jitter,
    color_shift,
    fill_background,
    jitter_indices,
    sample_jitter,
)
from smi.inversion.engine import valid_range
from smi.models.loading import Teacher, require_classifier, save_teacher
from smi.models.sparse import AttentionCapture, mask_to_indices, sparse_forward
from smi.runner import FitConfig, RunFolder, adamw, fit, plot_accuracy
from smi.transfer.config import DistillConfig
from smi.transfer.student import Student

__all__ = ["DISTILL_FORMAT", "DistillResult", "attention_pairs", "attention_transfer", "distill", "kd_loss",
           "mix_images", "open_run", "train_on_teacher"]

DISTILL_FORMAT = "smi-distill/1"


@dataclass
class DistillResult:
    out: Path
    top1: float | None  # test top-1 after the last epoch (None without evaluation data)
    wall_s: float  # synthesis + training seconds
    epochs: int
    log: list[dict[str, Any]]
    weights: Path
    plot: Path | None


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
            ce_weight: float = 0.0) -> torch.Tensor:
    """T² · KL(softmax(t/T) ‖ softmax(s/T)), batch mean, + ``ce_weight`` · CE(s, argmax t)."""
    T = temperature
    loss = F.kl_div(F.log_softmax(student_logits / T, dim=1), F.log_softmax(teacher_logits / T, dim=1),
                    reduction="batchmean", log_target=True) * (T * T)
    if ce_weight:
        loss = loss + ce_weight * F.cross_entropy(student_logits, teacher_logits.argmax(1))
    return loss


def mix_images(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mixup without labels: image i becomes ``lam_i * x_i + (1 - lam_i) * x_perm(i)``, lam_i ~ U(0, 1).

    The teacher labels the mixtures, so every pair of pool images spans new training inputs between them (a
    synthetic pool is small; the input space the student must match the teacher on is not). Image i keeps its
    own kept patches, so a sparse batch still reaches the models as tokens."""
    lam = torch.rand(x.shape[0], *([1] * (x.ndim - 1)), generator=generator)
    perm = torch.randperm(x.shape[0], generator=generator)
    return lam * x + (1 - lam) * x[perm]


def attention_pairs(teacher: nn.Module, student: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    """The (student, teacher) attention modules that attention transfer compares: student block i with teacher
    block ``ceil((i + 1) * Lt / Ls) - 1`` (the last with the last; equal depths pair block by block).

    Both must be timm ViTs on the same patch grid with the same prefix tokens, so that their attention maps
    cover the same tokens; anything else is refused before a run starts."""
    def blocks(model: nn.Module, who: str) -> list[nn.Module]:
        attns = [getattr(b, "attn", None) for b in getattr(model, "blocks", [])]
        if not attns or not all(hasattr(a, "attn_drop") and hasattr(a, "fused_attn") for a in attns):
            raise SmiError(f"attention transfer needs a timm ViT {who} (blocks with attention); {type(model).__name__} "
                           "has none", param="attention")
        return attns

    t, s = blocks(teacher, "teacher"), blocks(student, "student")
    layout = [(tuple(getattr(getattr(m, "patch_embed", None), "grid_size", ())), getattr(m, "num_prefix_tokens", 0))
              for m in (teacher, student)]
    if layout[0] != layout[1]:
        raise SmiError(f"attention transfer compares maps over the same tokens, but the teacher has a "
                       f"{layout[0][0]} patch grid and {layout[0][1]} prefix token(s) and the student "
                       f"{layout[1][0]} and {layout[1][1]}", param="attention")
    return [(a, t[-(-(i + 1) * len(t) // len(s)) - 1]) for i, a in enumerate(s)]


def attention_transfer(student_attn: torch.Tensor, teacher_attn: torch.Tensor) -> torch.Tensor:
    """KL(teacher ‖ student) of every query's attention distribution, mean over images, heads and queries.

    Maps are (B, heads, T, T) softmax rows. Equal head counts compare head by head (MimiQ's head-wise
    attention distillation); otherwise each model's heads are averaged first (a mean of distributions is one)."""
    s, t = student_attn, teacher_attn
    if s.shape[1] != t.shape[1]:
        s, t = s.mean(1, keepdim=True), t.mean(1, keepdim=True)
    eps = torch.finfo(s.dtype).tiny
    return (t * (t.clamp_min(eps).log() - s.clamp_min(eps).log())).sum(-1).mean()


def _logits(model: nn.Module, x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    return model(x) if keep is None else sparse_forward(model, x, keep).logits


def _remove_online_pool(out: Path):
    def remove(old: dict[str, Any]) -> None:
        kind = old.get("data", {}).get("kind")
        if kind == "online" and (out / "pool").is_dir():
            clear_pool(out / "pool")  # only what the pool's manifests recorded
        if kind == "online-generator":
            from smi.generators.train import STATE

            (out / "generator" / STATE).unlink(missing_ok=True)

    return remove


def distill(
    teacher: Teacher,
    student: Student,
    data: DataSource,
    out: str | Path,
    config: DistillConfig | None = None,
    *,
    eval_data: str | None = "teacher",
    device: torch.device | str = "cpu",
    overwrite: bool = False,
    progress: bool = True,
    dist: Dist | None = None,
) -> DistillResult:
    """Train ``student`` to match ``teacher`` on images from ``data``; resumes from ``out``.

    Args:
        data: a :class:`~smi.data.sources.PoolSource` (offline), an
            :class:`~smi.inversion.synthesis.OnlineSource` (one synthesized batch per epoch),
            :class:`~smi.data.sources.RealSource`, :class:`~smi.data.sources.NoiseSource` or a trained
            generator (:class:`~smi.generators.GeneratorSource`).
        eval_data: test data for the per-epoch top-1 (see ``smi eval --data``); ``"teacher"``: the
            dataset the teacher records (none if it records none); None: no evaluation.
        dist: under ``torchrun``, :func:`smi.distributed.from_env`; data parallel, process 0 writes.

    >>> distill(teacher, build_student("fmnist_vit_mini", teacher), PoolSource("pool/"), "runs/kd")
    """
    require_classifier(teacher, "distillation")
    cfg = config or DistillConfig()
    run, images, probe, test = open_run(teacher, data, out, cfg, {"student": student.identity()},
                                        fmt=DISTILL_FORMAT, what="distillation run", eval_data=eval_data,
                                        products=("student.safetensors", "student.json"), overwrite=overwrite,
                                        device=device, progress=progress, student=student.model.to(device),
                                        student_tokens=student.tokens, dist=dist)
    out = run.out

    model = student.model.to(device)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    log = train_on_teacher(run, teacher, model, images, cfg, adamw(params, cfg.lr, cfg.weight_decay),
                           tokens=student.tokens, test=test, device=device,
                           progress=progress, dist=dist)
    if dist is not None and dist.rank != 0:
        return DistillResult(out, log[-1]["top1"], log[-1]["wall_s"], len(log), log, out / "student.safetensors",
                             None)
    images.finish()
    plot = plot_accuracy(run, log, f"{student.arch} on {probe['kind']}", f"distilling {teacher.spec}") \
        if test is not None else None
    model.eval()
    weights = save_teacher(model, out / "student.safetensors", arch=student.arch, model_kwargs=student.model_kwargs,
                           class_names=teacher.class_names, data_config=teacher.data_config(),
                           extra={"distilled_from": teacher.identity(), "data": probe["kind"], "epochs": len(log),
                                  "test_top1": log[-1]["top1"]})
    return DistillResult(out, log[-1]["top1"], log[-1]["wall_s"], len(log), log, weights, plot)


def train_on_teacher(
    run: RunFolder, teacher: Teacher, model: nn.Module, images: Any, cfg: DistillConfig,
    optimizer: torch.optim.Optimizer, *, tokens: bool, test: Any,
    device: torch.device | str = "cpu", progress: bool = True, extra_loss: Callable[[], torch.Tensor] | None = None,
    dist: Dist | None = None,
) -> list[dict[str, Any]]:
    """The distillation loop every student shares (a new network, or the quantized copy of the teacher itself):
    epochs of KL between ``teacher.model``'s and ``model``'s outputs on batches from the opened data source
    ``images`` (whole-patch jitter and flip when ``cfg.augment``), in ``run``'s folder through
    :func:`~smi.runner.fit` (checkpoint, log, resume, NaN guard, time budget). ``tokens``: kept patches of a
    sparse pool reach ``model`` as tokens (a ViT on the teacher's patch grid), else as the whole image.
    ``extra_loss()``, called after both forward passes of a step, adds a term (intermediate features that
    hooks captured). Under ``torchrun`` (``dist``) each process trains on its slice of every batch (the batch size
    must divide by the process count) and :func:`~smi.runner.fit` averages the gradients."""
    dist = dist or Dist()
    if cfg.batch_size % dist.world:
        raise SmiError(f"must be a multiple of the {dist.world} processes, got {cfg.batch_size}", param="batch_size")
    steps = cfg.steps_per_epoch or (cfg.online_steps if images.endless else -(-len(images) // cfg.batch_size))
    patch = getattr(getattr(teacher.model, "patch_embed", None), "patch_size", (1,))[0]
    grid = (teacher.input_size[1] // patch, teacher.input_size[2] // patch)
    jitter_limit = max(1, round(0.125 * teacher.input_size[1] / patch))
    lo, hi = valid_range(teacher.mean, teacher.std, "cpu")

    pairs = cfg.style_pairs > 0 and images.paired  # open_run refused style_pairs without pairs
    attention = attention_pairs(teacher.model, model) if cfg.attention else []

    def batches(epoch: int, gen: torch.Generator):
        for x, masks in images.batches(steps, cfg.batch_size, gen):
            paired = pairs
            keep = None if masks is None else mask_to_indices(masks)
            if cfg.augment:
                j = sample_jitter(jitter_limit, patch, True, gen)
                x = apply_jitter(x, j)
                keep = None if keep is None else jitter_indices(keep, grid, patch, j)
            if cfg.color_shift:  # the teacher labels the shifted images: its function over a wider input range
                x = color_shift(x, cfg.color_shift, gen).clamp(lo, hi)
            if cfg.mixup and torch.rand((), generator=gen) < cfg.mixup:
                x = mix_images(x, gen)
                paired = False  # mixtures of other images: no longer pairs
            # the teacher labels the object (its kept patches); the student sees it on a random background
            whole = fill_background(x, keep, grid, patch, lo, hi, BACKGROUND_NOISE, gen) if keep is not None \
                and cfg.background and torch.rand((), generator=gen) < cfg.background else None
            if dist.active:  # every process drew the same batch; each keeps its own slice
                x = x.chunk(dist.world)[dist.rank]
                keep = None if keep is None else keep.chunk(dist.world)[dist.rank]
                whole = None if whole is None else whole.chunk(dist.world)[dist.rank]
            yield (x.to(device), None if keep is None else keep.to(device), None if whole is None else whole.to(device),
                   paired)

    def step(batch: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, bool]) -> torch.Tensor:
        x, keep, whole, paired = batch
        with ExitStack() as scope:
            caps = {id(m): scope.enter_context(AttentionCapture(m)) for pair in attention for m in pair}
            with torch.no_grad():
                t_logits = _logits(teacher.model, x, keep)
            s_logits = _logits(model, x, keep if tokens else None) if whole is None else _logits(model, whole, None)
        loss = kd_loss(s_logits, t_logits, cfg.temperature, cfg.ce_weight)
        if attention:
            loss = loss + cfg.attention * sum(attention_transfer(caps[id(a)].attn, caps[id(b)].attn)
                                              for a, b in attention) / len(attention)
        if paired:  # Causal-DFQ's discrepancy reduction: on one style, match the teacher on the other
            from smi.generators.train import pair_disagreement

            loss = loss + cfg.style_pairs * pair_disagreement(t_logits, s_logits, cfg.temperature) * cfg.temperature**2
        return loss if extra_loss is None else loss + extra_loss()

    def end_of_epoch(epoch: int) -> dict[str, Any]:
        seen = (epoch + 1) * steps * cfg.batch_size if images.fresh else len(images)
        return {"top1": evaluate(model, test, device=device, progress=False)["top1"] if test is not None else None,
                "synthesis_s": round(images.seconds, 2), "images": seen}

    fit_cfg = FitConfig(epochs=cfg.epochs, steps_per_epoch=steps, lr=cfg.lr, min_lr=cfg.min_lr,
                        warmup_epochs=cfg.warmup_epochs, schedule=cfg.lr_schedule, seed=cfg.seed,
                        time_budget_s=cfg.time_budget_s, ema=cfg.ema)
    return fit(run, model, optimizer, fit_cfg, batches, step, end_of_epoch=end_of_epoch,
               before_epoch=lambda e: images.before_epoch(e), other_seconds=lambda: images.seconds,
               progress=progress, dist=dist)


def open_run(
    teacher: Teacher, data: DataSource, out: str | Path, cfg: DistillConfig, identity: dict[str, Any], *,
    fmt: str, what: str, eval_data: str | None, products: tuple[str, ...], overwrite: bool,
    device: torch.device | str, progress: bool, student: nn.Module | None = None, student_tokens: bool = False,
    dist: Dist | None = None,
) -> tuple[RunFolder, Any, dict[str, Any], Any]:
    """Claim ``out`` for a run that trains on ``teacher``'s outputs over ``data`` and open the data:
    returns (run folder, opened images, the data's identity, test set or None).

    The run's identity is the teacher, ``identity`` (what is trained), the data, ``cfg`` and the
    evaluation data; an online source synthesizes into ``out/pool`` (removed, as recorded by its
    manifests, when ``overwrite`` replaces an online run); it synthesizes against ``student`` (the model being
    trained) for terms that read it, and attention transfer (``cfg.attention``) is checked against it here, before the
    folder is claimed. Under ``torchrun`` process 0 claims the folder before the others open it."""
    dist = dist or Dist()
    if cfg.attention:
        if student is None:
            raise SmiError("attention transfer needs the model being trained", param="attention")
        attention_pairs(teacher.model, student)
    if dist.active and data.grows:
        raise SmiError(f"{data.describe()} under torchrun is not supported yet: make a pool with `torchrun ... smi "
                       "invert` and train on it with --pool", param="data")
    if not isinstance(data, DataSource):
        raise SmiError(f"must be a DataSource (PoolSource, OnlineSource, RealSource, NoiseSource), got {data!r}",
                       param="data")
    out = Path(out)
    eval_data = teacher.dataset if eval_data == "teacher" else eval_data
    if data.grows and cfg.train_images is not None:
        raise SmiError(f"{data.describe()} makes its own images; train_images applies to pools, real images and "
                       "noise", param="train_images")
    if data.grows:  # its identity is known before any image exists
        data.check(teacher, student=student)
        probe, paired = data.identity(), data.paired
    else:
        images = data.open(teacher)
        probe, paired = images.identity, images.paired
    if cfg.style_pairs > 0 and not paired:
        raise SmiError("needs a source whose batches are style pairs (a Causal-DFQ generator: smi train-generator "
                       "--kind causal)", param="style_pairs")
    if cfg.style_pairs > 0 and dist.active:
        raise SmiError("style pairs span the whole batch, which torchrun splits between processes: run it in one "
                       "process", param="style_pairs")
    full = {"teacher": teacher.identity(), **identity, "data": probe, "config": cfg.to_dict(),
            "eval_data": eval_data}
    ok, error = True, None
    if dist.rank == 0:
        try:
            run = RunFolder(out, full, fmt=fmt, what=what, overwrite=overwrite, products=products,
                            on_replace=_remove_online_pool(out))
        except SmiError as e:
            ok, error = False, e
    if not dist.all_ok(ok):
        raise error or SmiError(f"process 0 refused the run folder {out}; see its message")
    if dist.rank != 0:  # the folder is claimed and holds this identity now
        run = RunFolder(out, full, fmt=fmt, what=what, products=products)
    if data.grows:
        images = data.open(teacher, folder=out / data.folder, epochs=cfg.epochs, seed=cfg.seed, device=device,
                           progress=progress, student=student, student_tokens=student_tokens)
    elif cfg.train_images is not None:
        images = images.subset(cfg.train_images, torch.Generator().manual_seed(cfg.seed))
    test = eval_dataset(eval_data, teacher, cfg.eval_images) if eval_data else None
    return run, images, probe, test
