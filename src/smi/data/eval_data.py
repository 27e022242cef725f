"""Labelled real data for evaluation: Fashion-MNIST, an ImageFolder, CIFAR-10/100 folders."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from smi.data.fashion_mnist import load_fashion_mnist, normalize_uint8
from smi.errors import SmiError
from smi.models.loading import Teacher

__all__ = ["DATA_HELP", "eval_dataset", "evaluate", "real_training_images"]

DATA_HELP = "fashion-mnist | imagefolder:PATH | cifar10:PATH | cifar100:PATH"


def _timm_transform(teacher: Teacher):
    import timm.data

    cfg = timm.data.resolve_model_data_config(teacher.model)
    cfg.update(input_size=teacher.input_size, mean=teacher.mean, std=teacher.std)
    return timm.data.create_transform(**cfg, is_training=False)


def real_training_images(teacher: Teacher) -> tuple[torch.Tensor, torch.Tensor]:
    """The Fashion-MNIST training split as uint8 images and labels, for a Fashion-MNIST teacher."""
    if teacher.input_size != (1, 28, 28):
        raise SmiError(f"real training images are Fashion-MNIST's (1x28x28); {teacher.spec} reads "
                       f"{teacher.input_size}, so use a synthetic pool")
    return load_fashion_mnist("train")


def eval_dataset(spec: str, teacher: Teacher, limit: int | None = None) -> Dataset:
    """The evaluation split named by ``spec``, transformed the way the teacher's timm config says."""
    if limit is not None and limit < 1:
        raise SmiError(f"--limit must be positive, got {limit}")
    kind, _, path = spec.partition(":")
    if kind == "fashion-mnist":
        if teacher.input_size != (1, 28, 28):
            raise SmiError(f"fashion-mnist is 1x28x28 but {teacher.spec} expects {teacher.input_size}")
        x, y = load_fashion_mnist("test")
        ds: Dataset = TensorDataset(normalize_uint8(x, teacher.mean, teacher.std), y)
    elif kind in ("imagefolder", "cifar10", "cifar100"):
        if not path:
            raise SmiError(f"--data {kind} needs a path: {kind}:PATH")
        root = Path(path)
        if not root.is_dir():
            raise SmiError(f"--data {spec}: folder {root} does not exist" if not root.exists()
                           else f"--data {spec}: {root} is not a folder")
        import torchvision.datasets as tvd

        try:
            if kind == "imagefolder":
                ds = tvd.ImageFolder(str(root), transform=_timm_transform(teacher))
            else:
                cls = tvd.CIFAR10 if kind == "cifar10" else tvd.CIFAR100
                ds = cls(str(root), train=False, download=False, transform=_timm_transform(teacher))
        except (FileNotFoundError, RuntimeError) as e:
            raise SmiError(f"--data {spec}: {e}") from None
    else:
        raise SmiError(f"unknown --data {spec!r}; use {DATA_HELP}")
    if limit is not None:
        ds = Subset(ds, range(min(limit, len(ds))))
    return ds


@torch.no_grad()
def evaluate(model: torch.nn.Module, ds: Dataset, batch_size: int = 250, device: str | torch.device = "cpu",
             progress: bool = True) -> dict[str, float]:
    """Top-1 and top-5 accuracy (percent) of ``model`` on ``ds``."""
    from tqdm.auto import tqdm

    model.eval()
    n = correct1 = correct5 = 0
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False)
    for x, y in tqdm(loader, desc="eval", unit="batch", disable=not progress, leave=False):
        logits = model(x.to(device)).cpu()
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        correct1 += (top[:, 0] == y).sum().item()
        correct5 += (top == y[:, None]).any(1).sum().item()
        n += len(y)
    return {"top1": 100.0 * correct1 / n, "top5": 100.0 * correct5 / n, "n": n}
