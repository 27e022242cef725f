"""Images the current student gets wrong: Adaptive DeepInversion's competition term and PSAQ-ViT V2's
adaptive samples.

Only online synthesis has a student (``smi distill --online``, ``smi qat --online``): each epoch's
batch is optimized against the model as it is at that moment, so the images move to where
teacher and student still disagree (ADI, Yin et al., CVPR 2020: maximize the Jensen–Shannon
divergence; PSAQ-ViT V2, Li et al., TNNLS 2023: the same min-max game between the images and a
quantized student, with KL as the discrepancy). The term is the *negative* divergence, so
minimizing the recipe's loss maximizes the disagreement, while the other terms (cross-entropy,
patch-similarity entropy, total variation) keep the images teacher-like. The student sees the
kept patches as tokens when it can (a ViT on the teacher's patch grid), else the whole view.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from smi.inversion.terms._base import TERMS, Step, Term
from smi.models.sparse import sparse_forward

__all__ = ["Disagreement", "divergence"]


def divergence(teacher_logits: torch.Tensor, student_logits: torch.Tensor, kind: str = "js",
               temperature: float = 1.0) -> torch.Tensor:
    """Batch mean of JS(p_t, p_s) (in [0, ln 2]) or KL(p_t ‖ p_s) of the softmax distributions at ``temperature``."""
    lt = F.log_softmax(teacher_logits / temperature, dim=1)
    ls = F.log_softmax(student_logits / temperature, dim=1)
    if kind == "kl":
        return (lt.exp() * (lt - ls)).sum(1).mean()
    lm = torch.logsumexp(torch.stack([lt, ls]), dim=0) - math.log(2.0)  # log of the mixture
    return 0.5 * ((lt.exp() * (lt - lm)).sum(1) + (ls.exp() * (ls - lm)).sum(1)).mean()


@TERMS.register("adversarial")
class Disagreement(Term):
    """Minus the teacher-student divergence (JS, or KL with adversarial_kl=1); online training only."""

    options = {"adversarial_kl": 0.0, "adversarial_temperature": 1.0}
    needs_student = True

    def __init__(self, ctx) -> None:  # noqa: ANN001 (Context)
        super().__init__(ctx)
        t = ctx.option("adversarial_temperature")  # positive: InversionConfig checks it
        self.kind = "kl" if ctx.option("adversarial_kl") else "js"
        self.temperature = t

    def __call__(self, step: Step) -> torch.Tensor:
        student = self.ctx.student
        if step.keep is not None and self.ctx.student_tokens:
            s_logits = sparse_forward(student, step.view, step.keep).logits
        else:
            s_logits = student(step.view)
        return -divergence(step.logits, s_logits, self.kind, self.temperature)
