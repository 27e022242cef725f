"""What a loss term sees: one typed context per batch, one per step, and the forward hooks behind them.

A term is one class in one file of this package, registered with ``@TERMS.register(name)``::

    @TERMS.register("mimiq")
    class HeadAgreement(Term):
        '''MimiQ: 1 - SSIM^2 between the attention rows of head pairs, every block.'''

        captures = frozenset({"attn"})

        def __call__(self, step: Step) -> torch.Tensor:
            return sum(head_agreement(a) for a in step.captured.attn) / len(step.captured.attn)

The recipe installs the hooks the active terms ask for (:attr:`Term.captures`), runs the forward
pass, and calls each term with a :class:`Step`; the term returns its unweighted loss. Knobs a
term reads are declared in :attr:`Term.options` (name -> default) and set with
``InversionConfig(options=...)`` / ``--option NAME=VALUE``.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Literal

import torch
import torch.nn as nn

from smi.errors import SmiError
from smi.inversion.augment import Jitter
from smi.inversion.priors import total_variation
from smi.models.loading import batch_norms
from smi.registry import Registry

if TYPE_CHECKING:
    from smi.inversion.config import InversionConfig

__all__ = ["CAPTURE_KINDS", "Captured", "Captures", "Context", "Step", "Term", "TERMS"]

Capture = Literal["attn", "attn_out", "features", "bn_inputs"]
CAPTURE_KINDS: dict[str, str] = {
    "attn": "every block's attention maps (B, heads, T, T), through timm's explicit (unfused) path",
    "attn_out": "every block's attention output before the projection (B, T, heads, head_dim)",
    "features": "the classifier head's input (B, D)",
    "bn_inputs": "the input of every BatchNorm layer (B, C, H, W)",
}


@dataclass
class Captured:
    """What the hooks recorded during one forward pass."""

    attn: list[torch.Tensor] = field(default_factory=list)
    attn_out: list[torch.Tensor] = field(default_factory=list)
    features: torch.Tensor | None = None
    bn_inputs: list[torch.Tensor] = field(default_factory=list)


class Captures:
    """Forward hooks for the requested capture kinds; attached in ``__enter__``, removed in ``__exit__``.

    Each forward pass records into a fresh :class:`Captured` (:meth:`record`), so a term that
    runs an extra forward (RIS) never mixes its captures with the main pass's.
    """

    def __init__(self, model: nn.Module, kinds: set[str], who: str) -> None:
        self.model, self.kinds = model, set(kinds)
        self.blocks = list(getattr(model, "blocks", []))
        if self.kinds & {"attn", "attn_out"} and not (
                self.blocks and all(hasattr(getattr(b, "attn", None), "qkv") for b in self.blocks)):
            raise SmiError(f"{who} reads attention maps; {type(model).__name__} is not a timm ViT")
        self.bns = batch_norms(model)
        self.current = Captured()
        self._recording = False
        self._stack = ExitStack()

    def __enter__(self) -> Captures:
        stack, hook = self._stack, self._hook
        if "attn" in self.kinds:
            for blk in self.blocks:
                old = blk.attn.fused_attn
                blk.attn.fused_attn = False  # the explicit path runs the softmax through attn_drop, where we read it
                stack.callback(setattr, blk.attn, "fused_attn", old)
                hook(blk.attn.attn_drop.register_forward_hook(lambda _m, _i, out: self._add("attn", out)))
        if "attn_out" in self.kinds:
            for blk in self.blocks:
                heads = blk.attn.num_heads
                hook(blk.attn.proj.register_forward_pre_hook(
                    lambda _m, inp, heads=heads: self._add("attn_out", inp[0].unflatten(-1, (heads, -1)))))
        if "features" in self.kinds:
            hook(self.model.get_classifier().register_forward_hook(lambda _m, inp, _o: self._add("features", inp[0])))
        if "bn_inputs" in self.kinds:
            for bn in self.bns:
                hook(bn.register_forward_hook(lambda _m, inp, _o: self._add("bn_inputs", inp[0])))
        return self

    def _add(self, kind: str, value: torch.Tensor) -> None:
        if not self._recording:  # a block recomputed in backward (activation checkpointing) runs the hooks again
            return
        if kind == "features":
            self.current.features = value
        else:
            getattr(self.current, kind).append(value)

    def _hook(self, handle: torch.utils.hooks.RemovableHandle) -> None:
        self._stack.callback(handle.remove)

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def record(self, fn: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, Captured]:
        """Run ``fn`` (one forward pass) with a fresh capture buffer; returns its output and the buffer."""
        self.current, self._recording = Captured(), True
        try:
            out = fn()
        finally:
            self._recording = False
        captured, self.current = self.current, Captured()
        return out, captured


@dataclass
class Context:
    """What a term may use when it is set up for one batch (drawing its priors, say)."""

    model: nn.Module
    config: InversionConfig
    targets: torch.Tensor  # (B,) planned classes
    num_classes: int
    grid: tuple[int, int]  # patch grid (1 x 1 pixels for models without patches)
    patch: int
    generator: torch.Generator  # the batch's CPU generator: every draw is reproducible from the seed
    student: nn.Module | None = None  # the model a training loop is teaching (online synthesis), else None
    student_tokens: bool = False  # the student reads kept patches as tokens (a ViT on the teacher's patch grid)
    bank: torch.Tensor | None = None  # (N, D) teacher features of the pool's earlier images, for terms that read it

    def option(self, name: str) -> float:
        return self.config.option(name)

    @property
    def num_prefix(self) -> int:
        return int(getattr(self.model, "num_prefix_tokens", 0))

    @property
    def blocks(self) -> list[nn.Module]:
        return list(getattr(self.model, "blocks", []))


Forward = Callable[[torch.Tensor, "torch.Tensor | None"], tuple[torch.Tensor, Captured]]


@dataclass
class Step:
    """One optimisation step, as the terms see it."""

    ctx: Context
    images: torch.Tensor  # (B, C, H, W) the iterate in the canonical frame (requires grad)
    view: torch.Tensor  # (B, C, H, W) the jittered images the teacher saw
    jitter: Jitter  # how ``view`` was made from ``images``
    jitter_limit: int  # largest shift this round, in units of ``jitter_unit`` pixels (for terms that re-jitter)
    jitter_unit: int  # pixels per shift unit: the patch size, or 1 for pixel jitter
    keep: torch.Tensor | None  # (B, K) indices of the kept patches in ``view``; None when dense
    pixel_mask: torch.Tensor | None  # (B, 1, H, W) 1 on pixels still optimized; None before the first stop
    logits: torch.Tensor  # (B, num_classes) of the main forward pass
    captured: Captured  # what the main forward pass recorded
    forward: Forward  # (view, keep) -> (logits, captured) of an extra forward pass
    _tv: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def generator(self) -> torch.Generator:
        return self.ctx.generator

    def tv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(tv_l1, tv_l2) of the optimized pixels, computed once per step."""
        if self._tv is None:
            self._tv = total_variation(self.images, self.pixel_mask)
        return self._tv


class Term:
    """A loss term: set up once per batch (``__init__``), evaluated every step (``__call__``)."""

    captures: ClassVar[frozenset[str]] = frozenset()  # kinds from CAPTURE_KINDS the term reads
    needs_student: ClassVar[bool] = False  # reads Context.student (online synthesis only)
    student_captures: ClassVar[frozenset[str]] = frozenset()  # kinds from CAPTURE_KINDS it records from the student
    reads_pool: ClassVar[bool] = False  # reads Context.bank (the pool's earlier images)
    segmentation: ClassVar[bool] = False  # also serves a segmenter (reads no per-image class logits or features)
    options: ClassVar[dict[str, float]] = {}  # knobs and their defaults

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def __call__(self, step: Step) -> torch.Tensor:
        raise NotImplementedError


TERMS: Registry[type[Term]] = Registry("loss term")
