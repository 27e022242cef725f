"""Evaluation, in one place: accuracy on a labelled dataset, and a teacher's agreement with its own pool."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from smi.data.pool import SyntheticPool
from smi.errors import SmiError
from smi.models.loading import Teacher
from smi.models.sparse import mask_to_indices, sparse_forward

__all__ = ["evaluate", "evaluate_segmentation", "iou_from_confusion", "teacher_accuracy_on_pool"]


# Quantized ViTs evaluate 1.2-1.6x faster at 64 than at 250 on 2 CPU cores, with the same result (measured on the
# three shipped ViTs; likely because smaller attention tensors are not mapped and page-faulted afresh every batch).
EVAL_BATCH = 64


@torch.no_grad()
def evaluate(model: torch.nn.Module, ds: Dataset, batch_size: int = EVAL_BATCH, device: str | torch.device = "cpu",
             progress: bool = True) -> dict[str, Any]:
    """Top-1 and top-5 accuracy (percent) of ``model`` on ``ds``, and ``per_class``: each class's top-1 (None
    for a class with no image in ``ds``); the model's train/eval mode is restored.

    >>> evaluate(teacher.model, eval_dataset("fashion-mnist", teacher))["top1"]
    """
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise SmiError(f"must be >= 1, got {batch_size}", param="batch_size")
    was_training = model.training
    model.eval()
    n = correct1 = correct5 = 0
    hits = seen = torch.zeros(0, dtype=torch.long)
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False)
    for x, y in tqdm(loader, desc="eval", unit="batch", disable=not progress, leave=False):
        logits = model(x.to(device)).cpu()
        if logits.ndim != 2:
            raise SmiError(f"the model gives {tuple(logits.shape[1:])} outputs per image, not class logits; a "
                           "segmenter is measured with evaluate_segmentation (smi eval does this)")
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        correct1 += (top[:, 0] == y).sum().item()
        correct5 += (top == y[:, None]).any(1).sum().item()
        n += len(y)
        if len(hits) == 0:
            hits = seen = torch.zeros(logits.shape[1], dtype=torch.long)
        c = len(seen)  # a label the model has no logit for counts as wrong in top1 and in no class here
        seen = seen + torch.bincount(y, minlength=c)[:c]
        hits = hits + torch.bincount(y[top[:, 0] == y], minlength=c)[:c]
    model.train(was_training)
    per_class = [100.0 * h / c if c else None for h, c in zip(hits.tolist(), seen.tolist(), strict=True)]
    return {"top1": 100.0 * correct1 / n, "top5": 100.0 * correct5 / n, "n": n, "per_class": per_class}


def iou_from_confusion(confusion: torch.Tensor) -> dict[str, Any]:
    """Per-class IoU, mean IoU over the classes that occur (in labels or predictions) and pixel accuracy, in
    percent, from a ``(C, C)`` confusion matrix (rows: true class, columns: predicted)."""
    confusion = confusion.double()
    hits = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - hits
    present = union > 0
    iou = torch.where(present, hits / union.clamp_min(1), torch.full_like(hits, float("nan")))
    return {"miou": 100.0 * iou[present].mean().item(), "pixel_acc": 100.0 * (hits.sum() / confusion.sum()).item(),
            "iou": [round(100.0 * v, 4) if v == v else None for v in iou.tolist()]}


@torch.no_grad()
def evaluate_segmentation(model: torch.nn.Module, ds: Dataset, batch_size: int = EVAL_BATCH,
                          device: str | torch.device = "cpu", progress: bool = True) -> dict[str, Any]:
    """Mean IoU, per-class IoU and pixel accuracy (percent) of a segmenter on ``ds`` of (image, label map)
    pairs, accumulated over every pixel of the split (not averaged per image); train/eval mode restored."""
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise SmiError(f"must be >= 1, got {batch_size}", param="batch_size")
    was_training = model.training
    model.eval()
    confusion: torch.Tensor | None = None
    n = 0
    for x, y in tqdm(DataLoader(ds, batch_size=batch_size, shuffle=False), desc="eval", unit="batch",
                     disable=not progress, leave=False):
        logits = model(x.to(device)).cpu()
        C = logits.shape[1]
        if confusion is None:
            confusion = torch.zeros(C * C, dtype=torch.long)
        confusion += torch.bincount((y.long() * C + logits.argmax(1)).flatten(), minlength=C * C)
        n += len(y)
    model.train(was_training)
    if confusion is None:
        raise SmiError("no images to evaluate")
    C = int(confusion.numel() ** 0.5)
    return {**iou_from_confusion(confusion.view(C, C)), "n": n}


@torch.no_grad()
def teacher_accuracy_on_pool(teacher: Teacher, pool: SyntheticPool, batch_size: int = 256) -> float:
    """Percent of pool images the teacher classifies as their target, seeing kept patches only."""
    correct = 0
    for i in range(0, len(pool), batch_size):
        x, m, y = pool.images[i:i + batch_size], pool.masks[i:i + batch_size], pool.labels[i:i + batch_size]
        if m.all():
            logits = teacher.model(x)
        else:
            logits = sparse_forward(teacher.model, x, mask_to_indices(m)).logits
        correct += (logits.argmax(-1) == y).sum().item()
    return 100.0 * correct / len(pool)
