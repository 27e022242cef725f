"""The recipe that trains smi's shipped teachers on Fashion-MNIST (resumable)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from smi.data.fashion_mnist import FMNIST_CLASSES, load_fashion_mnist, normalize_uint8
from smi.errors import SmiError
from smi.evaluation import evaluate
from smi.models.loading import save_teacher
from smi.runner import FitConfig, RunFolder, adamw, fit, plot_accuracy

__all__ = ["TeacherTrainConfig", "train_teacher"]

TRAIN_FORMAT = "smi-teacher-run/1"


@dataclass
class TeacherTrainConfig:
    """AdamW + warm-up/cosine, label smoothing, random crop (zero padding) and horizontal flip."""

    arch: str = "fmnist_vit_tiny"
    epochs: int = 24
    batch_size: int = 128
    lr: float = 1e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    drop_path_rate: float = 0.05
    crop_padding: int = 2
    hflip: bool = True
    seed: int = 0
    train_images: int | None = None  # first N training images only (tests); None = all 60,000
    test_images: int | None = None  # first N test images for the per-epoch evaluation; None = all 10,000

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise SmiError(f"must be >= 1, got {getattr(self, name)}", param=name)
        if not (0 < self.lr < 1):
            raise SmiError(f"must be in (0, 1), got {self.lr}", param="lr")
        if not (0 <= self.label_smoothing < 1):
            raise SmiError(f"must be in [0, 1), got {self.label_smoothing}", param="label_smoothing")


def _augment(x: torch.Tensor, cfg: TeacherTrainConfig, gen: torch.Generator) -> torch.Tensor:
    """Random crop with zero padding and horizontal flip, batched. x: (B, C, H, W) in [0, 1]."""
    B, _, H, W = x.shape
    p = cfg.crop_padding
    if p:
        padded = F.pad(x, (p, p, p, p))
        dy = torch.randint(0, 2 * p + 1, (B,), generator=gen).tolist()
        dx = torch.randint(0, 2 * p + 1, (B,), generator=gen).tolist()
        x = torch.stack([padded[i, :, dy[i]:dy[i] + H, dx[i]:dx[i] + W] for i in range(B)])
    if cfg.hflip:
        flip = torch.rand(B, generator=gen) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    return x


def train_teacher(
    cfg: TeacherTrainConfig, out_dir: str | Path, device: torch.device | str = "cpu", progress: bool = True,
) -> dict[str, Any]:
    """Train ``cfg.arch`` on Fashion-MNIST; resume from ``out_dir`` if it holds this run's checkpoint.

    The run folder is :class:`smi.runner.RunFolder`'s (``config.json``, ``checkpoint.safetensors``,
    ``log.jsonl``, ``accuracy.png``); the result is ``<arch>.safetensors`` + ``<arch>.json``, a
    teacher checkpoint that :func:`smi.models.load_teacher` reads.
    """
    import smi.models.teachers  # noqa: F401  (registers the architectures)

    run = RunFolder(out_dir, {"config": asdict(cfg)}, fmt=TRAIN_FORMAT, what="training run",
                    products=(f"{cfg.arch}.safetensors", f"{cfg.arch}.json"))
    torch.manual_seed(cfg.seed)  # weight init
    model = timm.create_model(cfg.arch, pretrained=False, drop_path_rate=cfg.drop_path_rate).to(device)
    data_cfg = timm.data.resolve_model_data_config(model)
    mean, std = tuple(data_cfg["mean"]), tuple(data_cfg["std"])
    opt = adamw(list(model.named_parameters()), cfg.lr, cfg.weight_decay)

    x_train, y_train = (t[: cfg.train_images] for t in load_fashion_mnist("train"))
    x_test, y_test = (t[: cfg.test_images] for t in load_fashion_mnist("test"))
    test = TensorDataset(normalize_uint8(x_test, mean, std), y_test)
    m = torch.tensor(mean, device=device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=device).view(1, -1, 1, 1)
    steps = len(x_train) // cfg.batch_size  # drop the last partial batch
    if steps < 1:
        raise SmiError(f"must not exceed the {len(x_train)} training images, got {cfg.batch_size}",
                       param="batch_size")
    seen = {"correct": 0, "n": 0}

    def batches(epoch: int, gen: torch.Generator):
        order = torch.randperm(len(x_train), generator=gen)
        for i in range(steps):
            idx = order[i * cfg.batch_size:(i + 1) * cfg.batch_size]
            yield _augment(x_train[idx].float() / 255.0, cfg, gen).to(device), y_train[idx].to(device)

    def step(batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        logits = model((x - m) / s)
        seen["correct"] += (logits.argmax(-1) == y).sum().item()
        seen["n"] += len(y)
        return F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)

    def end_of_epoch(epoch: int) -> dict[str, Any]:
        train_acc = round(100 * seen["correct"] / max(1, seen["n"]), 2)
        seen.update(correct=0, n=0)
        top1 = evaluate(model, test, batch_size=500, device=device, progress=False)["top1"]
        return {"train_acc": train_acc, "top1": round(top1, 2)}

    fit_cfg = FitConfig(epochs=cfg.epochs, steps_per_epoch=steps, lr=cfg.lr, min_lr=cfg.min_lr,
                        warmup_epochs=cfg.warmup_epochs, schedule="cosine", seed=cfg.seed, desc="epoch")
    log = fit(run, model, opt, fit_cfg, batches, step, end_of_epoch=end_of_epoch, progress=progress)
    plot_accuracy(run, log, cfg.arch, f"training {cfg.arch} on Fashion-MNIST")
    model.eval()
    final = save_teacher(model, run.out / f"{cfg.arch}.safetensors", arch=cfg.arch, class_names=list(FMNIST_CLASSES),
                         extra={"test_top1": log[-1]["top1"], "train_config": asdict(cfg)})
    return {"test_top1": log[-1]["top1"], "weights": str(final), "epochs": len(log)}
