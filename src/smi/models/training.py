"""The recipe that trains a teacher on a labelled dataset, resumably: the shipped ones, or any timm model;
and the same recipe for a segmenter (per-pixel labels, mIoU) on a dataset that has them."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from smi.data.datasets import ImageDataset, fit_masks, load_split, open_dataset
from smi.data.fashion_mnist import normalize_uint8
from smi.errors import SmiError
from smi.evaluation import evaluate, evaluate_segmentation
from smi.models.loading import check_fits, create_model, save_teacher
from smi.runner import FitConfig, RunFolder, adamw, fit, plot_accuracy

__all__ = ["TeacherTrainConfig", "train_teacher"]

TRAIN_FORMAT = "smi-teacher-run/1"


@dataclass
class TeacherTrainConfig:
    """AdamW + warm-up/cosine, label smoothing, random crop (zero padding) and horizontal flip."""

    arch: str = "fmnist_vit_tiny"
    data: str = "fashion-mnist"  # a smi.data.DATASETS spec: NAME or NAME:PATH
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # passed to timm.create_model
    img_size: int | None = None  # square side the images are resized to; None: the dataset's size
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
    train_images: int | None = None  # first N training images only (tests); None = all
    test_images: int | None = None  # first N test images for the per-epoch evaluation; None = all

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "img_size", "train_images", "test_images"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
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


def _augment_with_labels(x: torch.Tensor, labels: torch.Tensor, cfg: TeacherTrainConfig, gen: torch.Generator
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_augment` of images and their per-pixel labels ``(B, H, W)`` alike: the same crop and flip
    (padding is label 0, the background)."""
    both = _augment(torch.cat([x, labels[:, None].float()], 1), cfg, gen)
    return both[:, :-1], both[:, -1].round().long()


def _statistics(x: torch.Tensor, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images in [0, 1], in chunks (a large split stays uint8 in memory)."""
    total = torch.zeros(x.shape[1], dtype=torch.float64)
    squares = torch.zeros_like(total)
    for i in range(0, len(x), chunk):
        v = x[i:i + chunk].double() / 255.0
        total += v.sum((0, 2, 3))
        squares += (v * v).sum((0, 2, 3))
    n = x.numel() / x.shape[1]
    mean = total / n
    std = (squares / n - mean * mean).clamp_min(1e-12).sqrt()
    return tuple(round(v, 4) for v in mean.tolist()), tuple(round(max(v, 1e-3), 4) for v in std.tolist())


def _classes(arch: str, dataset: ImageDataset) -> tuple[list[str], bool]:
    """What ``arch`` learns to tell apart on ``dataset``: its classes, or for a segmenter its per-pixel labels;
    and whether it is a segmenter."""
    from smi.models.teachers import SEGMENTERS

    if arch not in SEGMENTERS:
        return dataset.class_names, False
    if dataset.mask_classes is None:
        dataset.masks("train")  # raises: the dataset has no per-pixel labels
    return list(dataset.mask_classes or ()), True


def _prepare(cfg: TeacherTrainConfig, device: torch.device | str, progress: bool
             ) -> tuple[ImageDataset, torch.nn.Module, dict[str, Any], dict[str, Any], tuple[torch.Tensor, ...],
                        tuple[list[str], bool]]:
    """Everything that can fail on the user's input, before a run folder is made."""
    dataset = open_dataset(cfg.data)
    H, W = (cfg.img_size, cfg.img_size) if cfg.img_size else dataset.size
    input_size = (dataset.channels, H, W)
    classes, segment = _classes(cfg.arch, dataset)
    torch.manual_seed(cfg.seed)  # weight init
    model, built = create_model(cfg.arch, input_size, len(classes), what="teacher",
                                drop_path_rate=cfg.drop_path_rate, **cfg.model_kwargs)
    model.to(device)
    check_fits(model, cfg.arch, input_size, len(classes), what="teacher")
    reads = SimpleNamespace(input_size=input_size, crop_pct=1.0, interpolation="bilinear")
    x_train, y_train = (t[: cfg.train_images] for t in load_split(dataset, "train", reads, progress))
    x_test, y_test = (t[: cfg.test_images] for t in load_split(dataset, "test", reads, progress))
    if segment:  # a segmenter learns the per-pixel labels
        y_train, y_test = (fit_masks(dataset.masks(split)[:n], reads)
                           for split, n in (("train", cfg.train_images), ("test", cfg.test_images)))
    if len(x_train) < cfg.batch_size:
        raise SmiError(f"must not exceed the {len(x_train)} training images, got {cfg.batch_size}",
                       param="batch_size")
    if cfg.batch_size < 2 and any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        raise SmiError(f"must be at least 2 for {cfg.arch}, whose batch normalization needs two images per batch",
                       param="batch_size")
    mean, std = dataset.normalization() or _statistics(x_train)
    kwargs = {k: v for k, v in built.items() if k not in ("num_classes", "drop_path_rate")}
    data_config = {"input_size": list(input_size), "mean": list(mean), "std": list(std), "crop_pct": 1.0,
                   "interpolation": "bilinear", "dataset": dataset.spec}
    return dataset, model, kwargs, data_config, (x_train, y_train, x_test, y_test), (classes, segment)


def train_teacher(
    cfg: TeacherTrainConfig, out_dir: str | Path, device: torch.device | str = "cpu", progress: bool = True,
) -> dict[str, Any]:
    """Train ``cfg.arch`` on ``cfg.data``; resume from ``out_dir`` if it holds this run's checkpoint.

    Any timm architecture, built for the dataset's channels, classes and size (``img_size`` where
    it takes one). The run folder is :class:`smi.runner.RunFolder`'s (``config.json``,
    ``checkpoint.safetensors``, ``log.jsonl``, ``accuracy.png``), made only once the data, the
    model and one forward pass check out; the result is ``<arch>.safetensors`` + ``<arch>.json``, a
    checkpoint every smi command reads, recording the dataset, input size and normalization.
    """
    dataset, model, model_kwargs, data_config, (x_train, y_train, x_test, y_test), (classes, segment) = _prepare(
        cfg, device, progress)
    mean, std = tuple(data_config["mean"]), tuple(data_config["std"])
    run = RunFolder(out_dir, {"config": asdict(cfg)}, fmt=TRAIN_FORMAT, what="training run",
                    products=(f"{cfg.arch}.safetensors", f"{cfg.arch}.json"))
    opt = adamw(list(model.named_parameters()), cfg.lr, cfg.weight_decay)
    test = TensorDataset(normalize_uint8(x_test, mean, std), y_test)
    m = torch.tensor(mean, device=device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=device).view(1, -1, 1, 1)
    steps = len(x_train) // cfg.batch_size  # drop the last partial batch
    seen = {"correct": 0, "n": 0}

    def batches(epoch: int, gen: torch.Generator):
        order = torch.randperm(len(x_train), generator=gen)
        for i in range(steps):
            idx = order[i * cfg.batch_size:(i + 1) * cfg.batch_size]
            x = x_train[idx].float() / 255.0
            if not segment:
                yield _augment(x, cfg, gen).to(device), y_train[idx].to(device)
                continue
            x, y = _augment_with_labels(x, y_train[idx], cfg, gen)
            yield x.to(device), y.to(device)

    def step(batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        logits = model((x - m) / s)
        seen["correct"] += (logits.argmax(1) == y).sum().item()
        seen["n"] += y.numel()  # images, or pixels for a segmenter
        return F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)

    def end_of_epoch(epoch: int) -> dict[str, Any]:
        train_acc = round(100 * seen["correct"] / max(1, seen["n"]), 2)
        seen.update(correct=0, n=0)
        if segment:
            res = evaluate_segmentation(model, test, batch_size=500, device=device, progress=False)
            return {"train_acc": train_acc, "miou": round(res["miou"], 2), "pixel_acc": round(res["pixel_acc"], 2)}
        top1 = evaluate(model, test, batch_size=500, device=device, progress=False)["top1"]
        return {"train_acc": train_acc, "top1": round(top1, 2)}

    fit_cfg = FitConfig(epochs=cfg.epochs, steps_per_epoch=steps, lr=cfg.lr, min_lr=cfg.min_lr,
                        warmup_epochs=cfg.warmup_epochs, schedule="cosine", seed=cfg.seed, desc="epoch")
    log = fit(run, model, opt, fit_cfg, batches, step, end_of_epoch=end_of_epoch, progress=progress)
    metric = "miou" if segment else "top1"
    plot_accuracy(run, log, cfg.arch, f"training {cfg.arch} on {dataset.name}", metric=metric)
    model.eval()
    final = save_teacher(model, run.out / f"{cfg.arch}.safetensors", arch=cfg.arch, model_kwargs=model_kwargs,
                         class_names=classes, data_config=data_config,
                         extra={f"test_{metric}": log[-1][metric], "train_config": asdict(cfg)})
    return {f"test_{metric}": log[-1][metric], "weights": str(final), "epochs": len(log)}
