"""A method as the inversion loop runs it: labels, the captures its terms need, and its loss.

:func:`smi.inversion.engine.invert` builds one :class:`Recipe` per batch from the
``InversionConfig``; the recipe installs forward hooks for what its terms read (every block's
attention maps, attention outputs, the features before the head, batch-norm inputs) and turns
one step's captures into the loss. Cross-entropy and total variation are part of every method.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import ExitStack

import torch
import torch.nn as nn
import torch.nn.functional as F

from smi.errors import SmiError
from smi.inversion import terms as T
from smi.inversion.augment import Jitter, apply_jitter, jitter_indices, sample_jitter
from smi.inversion.config import InversionConfig
from smi.inversion.labels import easy_to_hard, sample_labels
from smi.inversion.priors import image_l2, total_variation

__all__ = ["Recipe"]

_ATTENTION_TERMS = {"psaq", "sardfq", "mimiq"}
Forward = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]  # (view, kept indices) -> logits


class _Captures:
    """Forward hooks that record what the terms need during one forward pass."""

    def __init__(self) -> None:
        self.attn: list[torch.Tensor] = []  # per block (B, heads, T, T)
        self.attn_out: list[torch.Tensor] = []  # per block (B, T, heads, head_dim)
        self.features: torch.Tensor | None = None  # (B, D), the head's input
        self.bn_inputs: list[torch.Tensor] = []

    def clear(self) -> None:
        self.attn, self.attn_out, self.features, self.bn_inputs = [], [], None, []


class Recipe:
    def __init__(self, config: InversionConfig, model: nn.Module, targets: torch.Tensor, num_classes: int,
                 generator: torch.Generator, difficulty: float = 0.0) -> None:
        self.cfg = config
        self.model = model
        w = {k: v for k, v in config.terms.items() if v > 0}
        self.bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if config.bn_weight > 0 and self.bns:
            w["bn"] = config.bn_weight
        self.weights = w
        self.blocks = list(getattr(model, "blocks", []))
        if _ATTENTION_TERMS & set(w) and not all(hasattr(getattr(b, "attn", None), "qkv") for b in self.blocks or [0]):
            raise SmiError(f"method {config.method} reads attention maps; {type(model).__name__} is not a timm ViT")
        self.num_prefix = getattr(model, "num_prefix_tokens", 0)

        labels = sample_labels(config.labels, targets, num_classes, generator, _options(config))
        if config.curriculum == "e2h":
            labels = easy_to_hard(labels, num_classes, difficulty, config.option("e2h_min_confidence"), generator)
        self.labels = labels
        if "sardfq" in w:
            pe = model.patch_embed
            heads = self.blocks[0].attn.num_heads
            self.attn_priors = T.gaussian_mixture_attention(
                tuple(pe.grid_size), heads, int(config.option("sardfq_components")),
                (config.option("sardfq_sigma_low"), config.option("sardfq_sigma_high")), generator,
                batch=targets.shape[0])
        if "tv_target" in w:
            lo, hi = config.option("tv_target_low"), config.option("tv_target_high")
            self.tv_level = lo + (hi - lo) * torch.rand((), generator=generator).item()
        self.captures = _Captures()

    @property
    def soft(self) -> torch.Tensor | None:
        return self.labels.soft

    def install(self, stack: ExitStack) -> None:
        """Hooks for the terms in use, removed (and attention paths restored) when ``stack`` closes."""
        c, w = self.captures, self.weights
        if {"sardfq", "mimiq"} & set(w):
            for blk in self.blocks:
                self._flip_unfused(blk.attn, stack)
                h = blk.attn.attn_drop.register_forward_hook(lambda _m, _i, out: c.attn.append(out))
                stack.callback(h.remove)
        if "psaq" in w:
            for blk in self.blocks:
                heads = blk.attn.num_heads
                h = blk.attn.proj.register_forward_pre_hook(
                    lambda _m, inp, heads=heads: c.attn_out.append(inp[0].unflatten(-1, (heads, -1))))
                stack.callback(h.remove)
        if "ris_input" in w:
            head = self.model.get_classifier()
            h = head.register_forward_hook(lambda _m, inp, _o: setattr(c, "features", inp[0]))
            stack.callback(h.remove)
        if "bn" in w:
            for bn in self.bns:
                h = bn.register_forward_hook(lambda _m, inp, _o: c.bn_inputs.append(inp[0]))
                stack.callback(h.remove)

    @staticmethod
    def _flip_unfused(attn: nn.Module, stack: ExitStack) -> None:
        old = attn.fused_attn
        attn.fused_attn = False  # timm's explicit path runs the softmax through attn_drop, where the hook reads it
        stack.callback(setattr, attn, "fused_attn", old)

    def classification(self, logits: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """Cross-entropy against the batch's labels: hard classes, or the soft target distributions."""
        if self.labels.soft is None:
            return F.cross_entropy(logits, self.labels.hard.to(logits.device), reduction=reduction)
        return T.soft_cross_entropy(logits, self.labels.soft.to(logits.device), reduction=reduction)

    def loss(self, logits: torch.Tensor, x: torch.Tensor, pixel_mask: torch.Tensor | None,
             keep_view: torch.Tensor | None, forward: Forward, view: Jitter, limit: int, unit: int,
             grid: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
        """Everything but the loop: CE (hard or soft), TV, L2 and the method's terms, from this step's captures."""
        cfg, w, c = self.cfg, self.weights, self.captures
        loss = cfg.ce_weight * self.classification(logits)
        tv_l1 = tv_l2 = None
        if cfg.tv_l2 or cfg.tv_l1 or "tv_target" in w:
            tv_l1, tv_l2 = total_variation(x, pixel_mask)
            loss = loss + cfg.tv_l2 * tv_l2 + cfg.tv_l1 * tv_l1
        if cfg.l2:
            loss = loss + cfg.l2 * image_l2(x, pixel_mask)
        if "tv_target" in w:
            # PSAQ-ViT's level is for batch 32 at 3x224x224; tv_l2 is a Frobenius norm, which grows as the
            # square root of the number of values, so the level is scaled by sqrt(values / 32*3*224*224)
            scale = math.sqrt(x.numel() / (32 * 3 * 224 * 224))
            loss = loss + w["tv_target"] * T.tv_target(tv_l2, self.tv_level * scale)
        if "psaq" in w:
            kde = {"bandwidth": self.cfg.option("kde_bandwidth"), "points": int(self.cfg.option("kde_points"))}
            ent = sum(T.patch_similarity_entropy(a, self.num_prefix, **kde).mean() for a in c.attn_out)
            loss = loss - w["psaq"] * ent
        if "mimiq" in w:
            loss = loss + w["mimiq"] * sum(T.head_agreement(a) for a in c.attn) / len(c.attn)
        if "sardfq" in w:
            depth = len(self.blocks)
            deep = c.attn[depth // 2:]
            cls_rows = [a[:, :, 0, self.num_prefix:] for a in deep]
            priors = self.attn_priors.to(logits.device)
            loss = loss + w["sardfq"] * T.sardfq_attention_alignment(cls_rows, priors, keep_view, depth)
        if "bn" in w:
            running = [(bn.running_mean, bn.running_var) for bn in self.bns]
            loss = loss + w["bn"] * T.bn_statistics(c.bn_inputs[: len(self.bns)], running,
                                                    cfg.option("bn_first_weight"))
        if "ris_input" in w:
            feats = c.features
            j2 = sample_jitter(limit, unit, cfg.flip, generator)
            noise = torch.randn(x.shape, generator=generator).to(x.device) * cfg.option("ris_input_noise")
            keep2 = None if keep_view is None else _rejitter(keep_view, view, j2, grid, unit)
            c.clear()
            forward(apply_jitter(x, j2) + noise, keep2)
            loss = loss + w["ris_input"] * (1 - F.cosine_similarity(feats, c.features, dim=1)).mean()
        if "ris_weight" in w:
            clean = F.softmax(logits, dim=1)
            noisy_logits = with_weight_noise(self.model, forward, cfg.option("ris_weight_noise"), generator,
                                             apply_jitter(x, view), keep_view)
            loss = loss + w["ris_weight"] * (F.softmax(noisy_logits, dim=1) - clean).abs().sum(1).mean()
        c.clear()
        return loss


def _options(cfg: InversionConfig) -> dict[str, float]:
    from smi.inversion.config import OPTIONS

    return {k: cfg.option(k) for k in OPTIONS}


def _rejitter(keep_view: torch.Tensor, old: Jitter, new: Jitter, grid: tuple[int, int], unit: int) -> torch.Tensor:
    """Kept indices in the ``old`` view -> the same patches in the ``new`` view (via the canonical frame)."""
    gh, gw = grid
    r, c = torch.div(keep_view, gw, rounding_mode="floor"), keep_view % gw
    if old.flip:
        c = gw - 1 - c
    r, c = (r - old.dy // unit) % gh, (c - old.dx // unit) % gw
    return jitter_indices(r * gw + c, grid, unit, new)


class _Call(nn.Module):
    """Holds the teacher as a submodule so torch.func.functional_call can swap its weights for one call."""

    def __init__(self, model: nn.Module, fn: Forward) -> None:
        super().__init__()
        self.model, self.fn = model, fn

    def forward(self, view: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        return self.fn(view, keep)


def with_weight_noise(model: nn.Module, forward: Forward, rel: float, generator: torch.Generator,
                      view: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """Logits of ``forward`` with Gaussian noise of ``rel`` x each weight matrix's std added (out of place:
    the teacher's own tensors, which the clean step's graph holds, are never modified)."""
    noisy = {f"model.{n}": p + torch.randn(p.shape, generator=generator).to(p.device) * (rel * p.std())
             for n, p in model.named_parameters() if p.ndim > 1}
    return torch.func.functional_call(_Call(model, forward), noisy, (view, keep), strict=False)
