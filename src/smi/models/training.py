"""The recipe that trains smi's shipped teachers on Fashion-MNIST (resumable)."""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from smi.data.fashion_mnist import FMNIST_CLASSES, load_fashion_mnist, normalize_uint8
from smi.errors import SmiError
from smi.models.loading import save_teacher
from smi.utils.io import atomic_write_bytes, atomic_write_json
from smi.utils.state import load_checkpoint, save_checkpoint

__all__ = ["TeacherTrainConfig", "train_teacher", "evaluate_top1", "warmup_cosine", "adamw"]


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
        if self.epochs < 1:
            raise SmiError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise SmiError(f"batch_size must be >= 1, got {self.batch_size}")
        if not (0 < self.lr < 1):
            raise SmiError(f"lr must be in (0, 1), got {self.lr}")
        if not (0 <= self.label_smoothing < 1):
            raise SmiError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")


def warmup_cosine(step: int, total: int, warmup: int, lr: float, min_lr: float = 0.0) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine from ``lr`` down to ``min_lr`` at ``total``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(1.0, t)))


def adamw(params: list[tuple[str, torch.nn.Parameter]], lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with no weight decay on biases, norms, position embeddings and tokens."""
    decayed = [p for n, p in params if p.ndim > 1 and "pos_embed" not in n and "token" not in n]
    ids = {id(p) for p in decayed}
    rest = [p for _, p in params if id(p) not in ids]
    return torch.optim.AdamW([{"params": decayed, "weight_decay": weight_decay},
                              {"params": rest, "weight_decay": 0.0}], lr=lr)


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


@torch.no_grad()
def evaluate_top1(
    model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, mean: tuple[float, ...],
    std: tuple[float, ...], batch_size: int = 500, device: torch.device | str = "cpu", progress: bool = False,
) -> float:
    """Top-1 accuracy (percent) of ``model`` on uint8 images (N, C, H, W)."""
    was_training = model.training
    model.eval()
    correct = 0
    for i in tqdm(range(0, len(images), batch_size), desc="eval", disable=not progress, leave=False):
        x = normalize_uint8(images[i:i + batch_size].to(device), mean, std)
        correct += (model(x).argmax(-1).cpu() == labels[i:i + batch_size]).sum().item()
    model.train(was_training)
    return 100.0 * correct / len(images)


def train_teacher(
    cfg: TeacherTrainConfig, out_dir: str | Path, device: torch.device | str = "cpu", progress: bool = True,
) -> dict[str, Any]:
    """Train ``cfg.arch`` on Fashion-MNIST; resume from ``out_dir`` if it holds this run's checkpoint.

    Writes ``config.json``, ``checkpoint.safetensors`` (model + optimizer, after every epoch),
    ``train_log.jsonl`` (one line per epoch) and finally ``<arch>.safetensors`` + ``<arch>.json``,
    a teacher checkpoint that :func:`smi.models.load_teacher` reads.
    """
    import smi.models.teachers  # noqa: F401  (registers the architectures)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg_path, ckpt_path, log_path = out / "config.json", out / "checkpoint.safetensors", out / "train_log.jsonl"
    if cfg_path.exists():
        saved = {**asdict(TeacherTrainConfig()), **json.loads(cfg_path.read_text())}  # fields added later: defaults
        if saved != asdict(cfg):
            raise SmiError(f"{out} holds a training run with another config; use a new --out folder")
    atomic_write_json(cfg_path, asdict(cfg))

    torch.manual_seed(cfg.seed)  # weight init
    model = timm.create_model(cfg.arch, pretrained=False, drop_path_rate=cfg.drop_path_rate).to(device)
    data_cfg = timm.data.resolve_model_data_config(model)
    mean, std = tuple(data_cfg["mean"]), tuple(data_cfg["std"])
    opt = adamw(list(model.named_parameters()), cfg.lr, cfg.weight_decay)

    start_epoch, log = 0, []
    if ckpt_path.exists():
        start_epoch = int(load_checkpoint(ckpt_path, model, opt)["epoch"])
        log = [json.loads(line) for line in log_path.read_text().splitlines()][:start_epoch]
        if start_epoch and progress:
            tqdm.write(f"resuming after epoch {start_epoch} from {ckpt_path}")

    x_train, y_train = (t[: cfg.train_images] for t in load_fashion_mnist("train"))
    x_test, y_test = (t[: cfg.test_images] for t in load_fashion_mnist("test"))
    m = torch.tensor(mean, device=device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=device).view(1, -1, 1, 1)
    steps_per_epoch = len(x_train) // cfg.batch_size  # drop the last partial batch
    total, warmup = cfg.epochs * steps_per_epoch, int(cfg.warmup_epochs * steps_per_epoch)

    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)  # per-epoch: resume is exact
        torch.manual_seed(cfg.seed * 100_003 + epoch)  # drop-path
        order = torch.randperm(len(x_train), generator=gen)
        model.train()
        loss_sum, correct, seen = 0.0, 0, 0
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not progress,
                   mininterval=5.0)
        for i in bar:
            step = epoch * steps_per_epoch + i
            for g in opt.param_groups:
                g["lr"] = warmup_cosine(step, total, warmup, cfg.lr, cfg.min_lr)
            idx = order[i * cfg.batch_size:(i + 1) * cfg.batch_size]
            x = _augment(x_train[idx].float() / 255.0, cfg, gen).to(device)
            y = y_train[idx].to(device)
            logits = model((x - m) / s)
            loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.item() * len(y)
            correct += (logits.argmax(-1) == y).sum().item()
            seen += len(y)
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{100 * correct / seen:.1f}", refresh=False)
        test_acc = evaluate_top1(model, x_test, y_test, mean, std, device=device)
        log.append({"epoch": epoch + 1, "train_loss": round(loss_sum / seen, 4),
                    "train_acc": round(100 * correct / seen, 2), "test_top1": round(test_acc, 2),
                    "lr_end": opt.param_groups[0]["lr"], "seconds": round(time.perf_counter() - t0, 1)})
        save_checkpoint(ckpt_path, model, opt, {"epoch": epoch + 1})
        atomic_write_bytes(log_path, "".join(json.dumps(r) + "\n" for r in log).encode())
        if progress:
            tqdm.write(f"epoch {epoch + 1}: train loss {log[-1]['train_loss']}, test top-1 {test_acc:.2f}%")

    model.eval()
    final = save_teacher(model, out / f"{cfg.arch}.safetensors", arch=cfg.arch, class_names=list(FMNIST_CLASSES),
                         extra={"test_top1": log[-1]["test_top1"], "train_config": asdict(cfg)})
    return {"test_top1": log[-1]["test_top1"], "weights": str(final), "epochs": len(log)}
