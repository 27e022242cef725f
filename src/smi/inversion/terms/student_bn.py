"""DeepInversion's batch-norm prior read from the *student*: images whose statistics look natural to a student
backbone pretrained on other real data.

In the SMI paper's transfer protocol the student is a backbone trained on other data and probed (or
fine-tuned) on the teacher's task. A ViT teacher has no BatchNorm statistics to pull its images toward real
ones, so its images can be confident and unnatural; a student backbone with BatchNorm carries the statistics
of *its* training data in its running means and variances. This term asks the synthetic images' batch
statistics at every BatchNorm layer of the student to match them (the same distance as the teacher-side
``bn`` term, :func:`~smi.inversion.terms.bn.bn_statistics`, first layer weighted by ``bn_first_weight``),
while the teacher's terms keep them on its classes. Online training only (the student exists there); the
student runs in eval mode with frozen weights during synthesis, so its running statistics do not move. It
sees the whole view (a CNN student does not read tokens).

``student_bn_layers=K`` (an option) reads only the student's first K BatchNorm layers (0: all): the early layers'
statistics describe what images look like (contrast, edges, textures) more than which of the backbone's classes
they show, so a prior on them alone pulls less toward the backbone's own classes.
"""

from __future__ import annotations

import torch

from smi.inversion.terms._base import TERMS, Captures, Context, Step, Term
from smi.inversion.terms.bn import bn_statistics

__all__ = ["StudentBatchNorm"]


@TERMS.register("student_bn")
class StudentBatchNorm(Term):
    """Distance of the student's BatchNorm batch statistics to its running ones (a pretrained student backbone)."""

    needs_student = True
    student_captures = frozenset({"bn_inputs"})
    options = {"student_bn_layers": 0.0}

    def __init__(self, ctx: Context) -> None:  # a student without BatchNorm: check_invertible refused it already
        super().__init__(ctx)
        self.hooks = Captures(ctx.student, set(self.student_captures), "the student_bn term")

    def __call__(self, step: Step) -> torch.Tensor:
        with self.hooks:
            _, captured = self.hooks.record(lambda: self.ctx.student(step.view))
        layers = int(self.ctx.option("student_bn_layers")) or len(self.hooks.bns)
        running = [(bn.running_mean, bn.running_var) for bn in self.hooks.bns[:layers]]
        return bn_statistics(captured.bn_inputs[:layers], running, self.ctx.option("bn_first_weight"))
