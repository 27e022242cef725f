"""Pool-level diversity (after CMI, Fang et al., IJCAI 2021): images pushed apart from each other and from
the images the pool already holds, in the teacher's feature space.

CMI trains a projection head with InfoNCE: an image's two augmented views attract, every other
image of the batch and of a memory bank of earlier images repels. Here the repelling half is
kept as it is and the attracting half is left to the synthesis itself: every step already
shows the teacher a freshly jittered and flipped view, and the classification term asks each
view for the same class, which is what CMI's positive pair enforces. What remains is the
InfoNCE denominator over the teacher's own features (no head to train)::

    L = tau * mean_i log( sum_{j in batch, j != i} exp(s_ij / tau) + sum_{k in pool} exp(s_ik / tau) )

with s the cosine similarity of the classifier head's inputs. It falls when an image moves
away from its nearest neighbours (the soft maximum at small tau), so a new batch fills the
parts of feature space the pool has not covered yet. The pool's features (``Context.bank``)
are those of the batches made before this one in the same pool (online: everything the run
has synthesized so far).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from smi.inversion.terms._base import TERMS, Captures, Step, Term
from smi.models.sparse import mask_to_indices, sparse_forward

__all__ = ["Contrastive", "pool_features", "repulsion"]


def repulsion(features: torch.Tensor, bank: torch.Tensor | None, temperature: float) -> torch.Tensor:
    """``tau * mean_i logsumexp_j(s_ij / tau)`` over the other rows of ``features`` (B, D) and every row of
    ``bank`` (N, D), s = cosine similarity."""
    z = F.normalize(features.flatten(1), dim=1)
    sim = z @ z.T
    sim = sim.masked_fill(torch.eye(len(z), dtype=torch.bool, device=z.device), float("-inf"))
    if bank is not None and len(bank):
        sim = torch.cat([sim, z @ F.normalize(bank.to(z), dim=1).T], dim=1)
    if sim.shape[1] == 0 or not torch.isfinite(sim).any(1).all():  # one image and no pool: nothing to repel
        return features.sum() * 0.0
    return temperature * torch.logsumexp(sim / temperature, dim=1).mean()


@torch.no_grad()
def pool_features(model: nn.Module, images: torch.Tensor, masks: torch.Tensor | None,
                  batch_size: int = 256) -> torch.Tensor:
    """The classifier head's input (N, D) for pool images, seen as the teacher saw them (kept patches only)."""
    out = []
    with Captures(model, {"features"}, who="the contrastive term") as cap:
        for s in range(0, len(images), batch_size):
            x = images[s:s + batch_size]
            m = None if masks is None else masks[s:s + batch_size].to(x.device)
            if m is None or m.all():
                _, got = cap.record(lambda: model(x))  # noqa: B023
            else:
                _, got = cap.record(lambda: sparse_forward(model, x, mask_to_indices(m)).logits)  # noqa: B023
            out.append(got.features.detach().float().cpu())
    return torch.cat(out) if out else torch.empty(0)


@TERMS.register("contrastive")
class Contrastive(Term):
    """Soft maximum of the cosine similarity of the teacher's features to the batch's other images and to the
    pool's earlier images (CMI's InfoNCE negatives)."""

    captures = frozenset({"features"})
    reads_pool = True
    options = {"contrastive_temperature": 0.1}

    def __init__(self, ctx) -> None:  # noqa: ANN001 (Context)
        super().__init__(ctx)
        t = ctx.option("contrastive_temperature")  # positive: InversionConfig checks it
        self.temperature = t

    def __call__(self, step: Step) -> torch.Tensor:
        return repulsion(step.captured.features, self.ctx.bank, self.temperature)
