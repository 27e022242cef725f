"""The inversion loop: dense or token-sparse, one batch at a time."""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.profiler import record_function

from smi.errors import SmiError, SmiWarning
from smi.inversion.augment import (
    apply_jitter,
    color_shift,
    crop_resize,
    jitter_indices,
    pixel_mask_from_indices,
    sample_crops,
    sample_jitter,
)
from smi.inversion.config import InversionConfig
from smi.inversion.priors import blur_
from smi.inversion.recipe import Recipe
from smi.inversion.segmentation import is_segmenter
from smi.inversion.terms import Step
from smi.models.loading import Teacher, batch_norms
from smi.models.sparse import SparseOutput, check_sparse_capable, narrow_keep, sparse_forward
from smi.utils.schedule import scheduled_lr

__all__ = ["RECOMPUTE", "SYNC_EVERY", "Batch", "StepInfo", "check_recompute", "invert", "sync_every", "valid_range"]


@dataclass
class Batch:
    """What one inversion returns. The images are the last iterate (not a 'best' snapshot)."""

    images: torch.Tensor  # (B, C, H, W) normalized model inputs; stopped patches set to 0 (= the mean colour)
    mask: torch.Tensor  # (B, N) bool: the patches optimized to the end
    targets: torch.Tensor  # (B,) target classes
    loss: torch.Tensor  # (B,) final cross-entropy of each image on its kept patches, un-jittered
    seconds: float  # wall time of the optimisation loop
    soft: torch.Tensor | None = None  # (B, num_classes) the target distributions, for soft-label methods
    maps: torch.Tensor | None = None  # (B, H, W) a segmenter's final per-pixel target classes


SYNC_EVERY = 50  # on an accelerator: steps between host reads of the loss check (each read stalls the device)


def sync_every(device: torch.device) -> int:
    """How often the loop reads its finiteness check on the host: every step on a CPU (a read costs nothing
    there), every :data:`SYNC_EVERY` steps on an accelerator. Either way a non-finite loss stops the run with
    the first iteration it happened at, before any image leaves :func:`invert`."""
    return 1 if device.type == "cpu" else SYNC_EVERY


@dataclass
class StepInfo:
    iteration: int
    loss_tensor: torch.Tensor  # 0-d, detached, on the loop's device: reading it waits for the step
    kept: int  # patches per image still being optimized
    images: torch.Tensor  # (B, C, H, W) the live iterate (detached; copy it to keep it)
    keep: torch.Tensor  # (B, K) canonical indices of the patches still being optimized

    @property
    def loss(self) -> float:
        """This step's loss. A host read: on an accelerator, a callback that reads it every step syncs every
        step (the progress bar reads it at most twice a second)."""
        return float(self.loss_tensor)


def valid_range(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device | str):
    """Per-channel bounds of a [0, 1] image after normalization: two (1, C, 1, 1) tensors."""
    m = torch.tensor(mean, device=device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=device).view(1, -1, 1, 1)
    return (0 - m) / s, (1 - m) / s


def _patch_size(model: torch.nn.Module) -> int:
    """Token patch size of a ViT; 1 for models without patches (jitter then moves whole pixels)."""
    pe = getattr(model, "patch_embed", None)
    return int(pe.patch_size[0]) if pe is not None else 1


def _jitter_limit(cfg: InversionConfig, jitter: float, side: int, patch: int) -> tuple[int, int]:
    """(limit in units, unit in pixels) for a largest shift of ``jitter`` x the side."""
    if jitter == 0:
        return 0, 1
    if cfg.jitter_unit == "pixel":
        return int(jitter * side), 1
    return max(1, round(jitter * side / patch)), patch


RECOMPUTE = ("auto", "always", "never")  # when block activations are recomputed in backward (invert's recompute=)


def check_recompute(model: nn.Module, recompute: str) -> None:
    if recompute not in RECOMPUTE:
        raise SmiError(f"must be one of {', '.join(RECOMPUTE)}, got {recompute!r}", param="recompute")
    if recompute == "always":
        try:
            check_sparse_capable(model)
        except SmiError:
            raise SmiError(f"'always' recomputes the blocks of a timm ViT that smi's token forward runs, and "
                           f"{type(model).__name__} is not one; use auto or never", param="recompute") from None


SATURATED = 0.5  # warn when more of the optimized pixels than this end clamped at the range's bounds


def check_invertible(teacher: Teacher, config: InversionConfig, student: nn.Module | None = None) -> None:
    """What can be checked before any work (and before a pool folder exists): a head, sparsity support, and a
    student for terms that synthesize against one."""
    from smi.inversion.recipe import active_terms
    from smi.inversion.terms import TERMS

    needy = [n for n in active_terms(config, teacher.model) if TERMS.get(n).needs_student]
    if student is None and needy:
        raise SmiError(f"the {needy[0]} term needs a student to synthesize against: use it in online training "
                       "(smi distill --online, smi qat --online), not on its own", param="terms")
    for name in needy:
        if "bn_inputs" in TERMS.get(name).student_captures and not batch_norms(student):
            raise SmiError(f"the {name} term needs a student with BatchNorm layers; {type(student).__name__} has "
                           "none", param="terms")
    check_task(teacher, config)
    if teacher.num_classes < 2:
        raise SmiError(f"{teacher.spec} has {teacher.num_classes} output classes: inversion needs a classifier head "
                       "(a timm model made with num_classes=0, or a feature extractor, has none)")
    if not config.sparsity.dense:
        check_sparse_capable(teacher.model)


def _segmenter_problem(config: InversionConfig, teacher: Teacher) -> tuple[str, str] | None:
    """Why a recipe cannot run on a segmenter (message, parameter), or None when it can."""
    from smi.inversion.recipe import active_terms
    from smi.inversion.terms import TERMS

    classifier_only = [n for n in active_terms(config, teacher.model) if not TERMS.get(n).segmentation]
    if classifier_only:
        return (f"the {classifier_only[0]} term reads per-image classes or features, which the segmenter "
                f"{teacher.spec} does not have"), "terms"
    if config.labels != "hard" or config.curriculum != "none":
        return (f"a segmenter's targets are per-pixel maps: labels must be hard and curriculum none, got "
                f"{config.labels} / {config.curriculum}"), "labels"
    return None


def check_task(teacher: Teacher, config: InversionConfig) -> None:
    """A segmentation method needs a segmenter; a segmenter needs a recipe that reads no per-image class."""
    from smi.inversion.methods import METHODS

    method = METHODS.get(config.method, param="method")
    if method.task == "diffusion":
        raise SmiError(f"{config.method} samples a text-to-image diffusion model rather than inverting the teacher: "
                       f"smi invert --method {config.method} --diffusion-model PATH", param="method")
    if not is_segmenter(teacher.model):
        if method.task == "segmentation":
            raise SmiError(f"{config.method} synthesizes for a segmenter, and {teacher.spec} is a {teacher.task} "
                           "model; choose a classifier method (smi invert --help lists them)", param="method")
        return
    problem = _segmenter_problem(config, teacher)
    if problem is not None:
        fits = [n for n in METHODS.names() if METHODS.get(n).task in (None, "segmentation")
                and _segmenter_problem(InversionConfig.for_method(n), teacher) is None]
        message, param = problem
        raise SmiError(f"{message} ({config.method}); methods that fit it: {', '.join(fits)}", param=param)


def invert(
    teacher: Teacher,
    config: InversionConfig,
    targets: torch.Tensor,
    *,
    init: torch.Tensor | None = None,
    keep: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    callback: Callable[[StepInfo], None] | None = None,
    difficulty: float = 0.0,
    student: nn.Module | None = None,
    student_tokens: bool = False,
    bank: torch.Tensor | None = None,
    recompute: str = "auto",
) -> Batch:
    """Synthesize one batch of images that ``teacher`` classifies as ``targets``.

    Args:
        teacher: a frozen teacher from :func:`smi.load_teacher`.
        config: the inversion recipe, including the sparsity schedule (dense if it has no stops).
        targets: (B,) class indices.
        init: (B, C, H, W) starting images in normalized space; default standard normal noise.
        keep: (B, K) patches to optimize from the start (the others are stopped at once); default all.
        generator: CPU generator for the initial noise and the jitter/flip draws.
        device: where to optimize; default the teacher's device.
        dtype: dtype of the optimized images (the teacher must accept it).
        callback: called after every step with a :class:`StepInfo`.
        difficulty: in [0, 1], for the e2h curriculum (the batch's place in the pool).
        student: the model a training loop is teaching, for terms that read it (``adversarial``);
            ``student_tokens``: it reads kept patches as tokens.
        bank: (N, D) teacher features of images made before this batch, for terms that read the pool
            (``contrastive``); see :func:`~smi.inversion.terms.contrastive.pool_features`.
        recompute: when the ViT's block activations are recomputed in backward instead of kept (activation
            checkpointing; the images are the same either way, see :data:`RECOMPUTE`): ``auto`` while a sparse
            run optimizes more patches than its final phase does, so the first phases' memory falls to about
            the final phase's; ``always`` every step (a dense ViT run too); ``never``.

    Returns:
        A :class:`Batch`; ``mask`` is exactly the set of patches optimized to the last step.

    >>> teacher = load_teacher("fmnist_vit_tiny")
    >>> batch = invert(teacher, InversionConfig(iterations=200, sparsity=SparsityConfig(((50, 0.3),))),
    ...                torch.arange(10), generator=torch.Generator().manual_seed(0))
    """
    model = teacher.model
    device = torch.device(device) if device is not None else next(model.parameters()).device
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    sparse = not config.sparsity.dense or keep is not None
    if sparse and config.crop:
        raise SmiError("is dense-only: a resized view moves pixels off the token grid of the kept patches",
                       param="crop")
    check_invertible(teacher, config, student)
    check_recompute(model, recompute)
    vit = check_sparse_capable(model) if sparse or recompute == "always" else model
    C, H, W = teacher.input_size
    B = targets.shape[0]
    if targets.ndim != 1 or B == 0 or targets.min() < 0 or targets.max() >= teacher.num_classes:
        raise SmiError(f"must be a non-empty 1-D tensor of classes in [0, {teacher.num_classes})", param="targets")
    if is_segmenter(model) and targets.min() < 1:
        raise SmiError("a segmenter's targets are each image's object class, 1 or more (0 is the background)",
                       param="targets")
    if init is not None and tuple(init.shape) != (B, C, H, W):
        raise SmiError(f"has shape {tuple(init.shape)}, expected {(B, C, H, W)}", param="init")
    targets = targets.cpu()

    x0 = init if init is not None else torch.randn(B, C, H, W, generator=generator)
    x = x0.to(device=device, dtype=dtype).clone().requires_grad_(True)
    opt = torch.optim.Adam([x], lr=config.lr, betas=config.betas)
    lo, hi = (t.to(dtype) for t in valid_range(teacher.mean, teacher.std, device))
    patch = _patch_size(model)
    grid = (H // patch, W // patch)
    recipe = Recipe(config, model, targets, teacher.num_classes, generator, grid=grid, patch=patch,
                    difficulty=difficulty, student=student, student_tokens=student_tokens, bank=bank)
    N = grid[0] * grid[1]
    pixel_mask: torch.Tensor | None = None  # (B, 1, H, W) once a stop happened
    frozen: torch.Tensor | None = None  # pixel values at the last stop (stopped pixels stay at these)
    if keep is None:
        keep = torch.arange(N, device=device).expand(B, N)  # canonical kept indices (B, K), sorted
    else:
        keep = keep.to(device).sort(dim=1).values
        pixel_mask = pixel_mask_from_indices(keep, grid, patch)
        frozen = x.detach().clone()
    stops = dict(config.sparsity.stops)
    counts = iter(config.sparsity.kept_counts(N)[1:])
    rounds = config.rounds or (config.jitter,)
    per_round = config.iterations // len(rounds)

    final_count = config.sparsity.kept_counts(N)[-1] if sparse else N

    def forward(view: torch.Tensor, idx: torch.Tensor | None, rank: bool = False, main: bool = True) -> SparseOutput:
        kept = idx.shape[1] if idx is not None else N
        # only the main forward is recomputed: a term's extra forward may run under weights swapped in for that
        # call alone (RIS's weight noise, torch.func.functional_call), which a recompute in backward would miss
        again = main and (recompute == "always" or (recompute == "auto" and sparse and kept > final_count))
        if sparse or again:
            return sparse_forward(vit, view, idx, importance_block=config.importance_block, return_importance=rank,
                                  recompute=again)
        return SparseOutput(model(view), None)  # dense: timm's own forward, fused attention where nothing reads it

    def extra_forward(view: torch.Tensor, idx: torch.Tensor | None):
        return recipe.captures.record(lambda: forward(view, idx, main=False).logits)

    every = sync_every(device)
    bad_at = torch.zeros((), dtype=torch.long, device=device)  # first iteration with a non-finite loss (0: none)
    bad_value = torch.zeros((), device=device)

    def check_finite(it: int, loss: torch.Tensor) -> None:  # recorded on the device, read every `every` steps
        nonlocal bad_at, bad_value
        first = (bad_at == 0) & ~torch.isfinite(loss)
        bad_at = torch.where(first, it, bad_at)
        bad_value = torch.where(first, loss.float(), bad_value)
        if it % every and it != config.iterations:
            return
        at, value = int(bad_at), float(bad_value)
        if at:
            raise SmiError(f"became {value} at iteration {at}; lower the learning rate (now {config.lr}) "
                           "and check that the teacher gives finite outputs", param="loss")

    def amp():  # the forward and the loss; backward runs outside, as autocast asks
        if config.precision == "bf16":
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    t0 = time.perf_counter()
    with recipe:
        for it in range(1, config.iterations + 1):
            r, step_in_round = divmod(it - 1, per_round)
            limit, unit = _jitter_limit(config, rounds[min(r, len(rounds) - 1)], min(H, W), patch)
            for g in opt.param_groups:
                g["lr"] = scheduled_lr(config.lr_schedule, step_in_round, per_round, config.warmup, config.lr)
            # the record_function labels name the parts of a step in a torch.profiler trace
            # (benchmarks/inversion_profile.py); without a profiler they cost nothing measurable
            with record_function("smi.view"):
                j = sample_jitter(limit, unit, config.flip, generator)
                xj = apply_jitter(x, j)
                if config.color_shift:
                    xj = color_shift(xj, config.color_shift, generator)
                if config.crop:
                    xj = crop_resize(xj, sample_crops(B, config.crop, generator))
                rank_now = it in stops
                idx_t = jitter_indices(keep, grid, patch, j) if sparse else None  # token j of image b: keep[b, j]
            with record_function("smi.forward"), amp():
                out, captured = recipe.captures.record(lambda: forward(xj, idx_t, rank_now))  # noqa: B023
            with record_function("smi.loss"), amp():
                loss = recipe.loss(Step(recipe.ctx, x, xj, j, limit, unit, idx_t, pixel_mask, out.logits,
                                        captured, extra_forward))
                check_finite(it, loss.detach())
            with record_function("smi.backward"):
                opt.zero_grad(set_to_none=True)
                loss.backward()
            with record_function("smi.adam"):
                opt.step()
            with torch.no_grad(), record_function("smi.project"):
                if config.blur:
                    blur_(x, config.blur)
                x.clamp_(lo, hi)
                if frozen is not None:
                    x.copy_(torch.where(pixel_mask.bool(), x, frozen))  # Adam momentum must not move stopped pixels
                if rank_now:
                    k_new = next(counts)
                    importance = (out.importance if recipe.maps is None
                                  else recipe.maps.importance(out.logits, j, idx_t, patch))
                    keep = narrow_keep(keep, importance, k_new)
                    pixel_mask = pixel_mask_from_indices(keep, grid, patch)
                    frozen = x.detach().clone()
            if callback is not None:
                callback(StepInfo(it, loss.detach(), keep.shape[1], x.detach(), keep))
    seconds = time.perf_counter() - t0

    with torch.no_grad():
        final = x.detach() * pixel_mask if pixel_mask is not None else x.detach().clone()
        if sparse:
            logits = sparse_forward(vit, final, keep).logits
        else:
            logits = model(final)
        if recipe.maps is not None:
            per_image = recipe.maps.per_image(logits, pixel_mask)
        else:
            per_image = recipe.labels.cross_entropy(logits, reduction="none")
        region = pixel_mask if pixel_mask is not None else torch.ones_like(x[:, :1])  # the optimized pixels
        at_bounds = float((((x <= lo) | (x >= hi)) & region.bool()).sum() / (region.sum() * C))
    if at_bounds > SATURATED:
        warnings.warn(f"{at_bounds:.0%} of the optimized pixels ended at the edge of the valid range (black or "
                      f"white): the image learning rate {config.lr:g} is probably too high", SmiWarning, stacklevel=2)
    mask = torch.zeros(B, N, dtype=torch.bool, device=device).scatter_(1, keep, True)
    soft = recipe.labels.soft
    return Batch(final.cpu(), mask.cpu(), recipe.labels.hard.cpu(), per_image.cpu(), seconds,
                 None if soft is None else soft.cpu(), None if recipe.maps is None else recipe.maps.maps.cpu())
