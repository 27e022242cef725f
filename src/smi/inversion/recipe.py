"""A method as one batch runs it: its labels, its active loss terms and the hooks they read.

:func:`smi.inversion.engine.invert` builds one :class:`Recipe` per batch from the
``InversionConfig`` and enters it for the loop (the hooks are attached on entry, removed on
exit). Each step it hands the recipe a :class:`~smi.inversion.terms.Step` and gets the loss:
cross-entropy (hard or soft labels), the image priors (total variation, L2) and each active
term, weighted.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from smi.inversion.config import InversionConfig
from smi.inversion.labels import CURRICULA, LABELS, Labels
from smi.inversion.priors import image_l2
from smi.inversion.segmentation import TargetMaps, is_segmenter
from smi.inversion.terms import TERMS, Captures, Context, Step, Term
from smi.models.loading import batch_norms

__all__ = ["Recipe", "active_terms"]


def active_terms(config: InversionConfig, model: nn.Module) -> dict[str, float]:
    """The terms a batch runs, with their weights, in registry order.

    The batch-norm prior joins at ``config.bn_weight`` when the teacher has BatchNorm layers and
    ``config.terms`` does not set it.
    """
    weights = {k: v for k, v in config.terms.items() if v > 0}
    has_bn = bool(batch_norms(model))
    if "bn" not in config.terms and config.bn_weight > 0 and has_bn:
        weights["bn"] = config.bn_weight
    return {name: weights[name] for name in TERMS if name in weights}


class Recipe:
    """Labels, terms and hooks of one batch. Use as a context manager around the loop."""

    def __init__(self, config: InversionConfig, model: nn.Module, targets: torch.Tensor, num_classes: int,
                 generator: torch.Generator, *, grid: tuple[int, int], patch: int, difficulty: float = 0.0,
                 student: nn.Module | None = None, student_tokens: bool = False,
                 bank: torch.Tensor | None = None) -> None:
        self.config = config
        self.weights = active_terms(config, model)
        kinds = set().union(*(TERMS.get(n).captures for n in self.weights))
        self.captures = Captures(model, kinds, who=f"method {config.method}")
        self.ctx = ctx = Context(model, config, targets, num_classes, grid, patch, generator, student,
                                 student_tokens, bank)
        labels = LABELS.get(config.labels)(targets, num_classes, generator, config.option)
        self.labels: Labels = CURRICULA.get(config.curriculum)(labels, num_classes, difficulty, generator,
                                                               config.option)
        # a segmenter's targets are per-pixel maps (drawn after the labels, which then only name each image's class)
        self.maps = (TargetMaps(targets, num_classes, (grid[0] * patch, grid[1] * patch), generator, config.option,
                                config.iterations) if is_segmenter(model) else None)
        # set up in registry order, after the labels: every random draw has a fixed place in the batch's stream
        self.terms: dict[str, Term] = {name: TERMS.get(name)(ctx) for name in self.weights}

    def __enter__(self) -> Recipe:
        self.captures.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.captures.__exit__(*exc)

    def loss(self, step: Step) -> torch.Tensor:
        """CE (hard or soft; per pixel for a segmenter), TV, L2 and the active terms, weighted, for one step."""
        cfg = self.config
        if self.maps is not None:
            loss = cfg.ce_weight * self.maps.loss(step.logits, step.pixel_mask, step.jitter)
        else:
            loss = cfg.ce_weight * self.labels.cross_entropy(step.logits)
        if cfg.tv_l2 or cfg.tv_l1:
            tv_l1, tv_l2 = step.tv()
            loss = loss + cfg.tv_l2 * tv_l2 + cfg.tv_l1 * tv_l1
        if cfg.l2:
            loss = loss + cfg.l2 * image_l2(step.images, step.pixel_mask)
        for name, term in self.terms.items():
            loss = loss + self.weights[name] * term(step)
        return loss
