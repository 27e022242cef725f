"""Quantization-aware fine-tuning: the quantized model is a student whose teacher is its own float model.

``smi qat`` starts from a folder ``smi quantize`` wrote (calibrated, optionally reconstructed) and
trains the whole fake-quantized model with the distillation loop of :mod:`smi.transfer` (KL between
the float teacher's and the quantized model's outputs, on a pool, on images synthesized while it
trains, on real images or on noise). What learns:

- every float weight, through the straight-through estimator of its quantizer (a weight outside
  the clipping range gets no gradient, as in LSQ);
- every weight step size and every activation step size and zero point (LSQ, gradients scaled by
  ``1 / sqrt(N * Q_P)``: :mod:`smi.quant.learn`);
- biases and LayerNorm parameters.

Besides the KL on the outputs, ``feature_loss`` adds a term on every block's output tokens
(``feature_weight`` times its sum over blocks): ``mse`` (the squared error per token, summed over
channels, as block reconstruction uses) or ``akt`` (AKT's refined feature distillation: KL at
T=8 between the teacher's and the model's channel attention map, the mean over tokens of the
squared features, and token attention map, the mean over channels). More supervision per image
than the ten logits, which matters when the images are few.

The log-sqrt(2) softmax quantizer's scale stays as calibrated. Images of a sparse pool reach both
models as their kept patches only. At the end the step sizes go back to buffers and the result is
saved as ``OUT/quantized.safetensors`` + ``OUT/quantized.json``: ``smi eval --quantized OUT`` and
every other reader of :mod:`smi.quant.io` read it unchanged.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from smi.data.sources import DataSource
from smi.distributed import Dist
from smi.errors import SmiError
from smi.models.loading import Teacher
from smi.quant.api import config_of
from smi.quant.io import META, WEIGHTS, load_quantized, write_quantized
from smi.quant.modules import WeightQuantMixin
from smi.quant.quantizers import ActQuantizer
from smi.runner import plot_accuracy
from smi.transfer.config import DistillConfig
from smi.transfer.loop import kd_loss, open_run, train_on_teacher
from smi.utils.io import sha256_file

__all__ = ["QAT_FORMAT", "QatConfig", "QatResult", "learnable_quant_", "qat"]

QAT_FORMAT = "smi-qat/1"


def _mse(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return (s - t).pow(2).sum(-1).mean()


def _akt(s: torch.Tensor, t: torch.Tensor, temperature: float = 8.0) -> torch.Tensor:
    loss = s.new_zeros(())
    for dim in (1, 2):  # channel map (mean over tokens), token map (mean over channels)
        ms, mt = s.pow(2).mean(dim), t.pow(2).mean(dim)
        loss = loss + kd_loss(ms, mt, temperature)
    return loss


FEATURE_LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None] = {
    "none": None, "mse": _mse, "akt": _akt}


@dataclass
class QatConfig(DistillConfig):
    """Distillation settings with QAT's defaults: a small learning rate for weights that are already trained
    (Adam, cosine to 0, no weight decay), KL at T=1, a short run."""

    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-4
    min_lr: float = 0.0
    weight_decay: float = 0.0
    warmup_epochs: float = 0.0
    temperature: float = 1.0
    feature_loss: str = "none"  # none | mse | akt: a term on every block's output tokens
    feature_weight: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.feature_loss not in FEATURE_LOSSES:
            raise SmiError(f"must be one of {', '.join(FEATURE_LOSSES)}, got {self.feature_loss!r}",
                           param="feature_loss")
        if not (isinstance(self.feature_weight, (int, float)) and math.isfinite(self.feature_weight)
                and self.feature_weight >= 0):
            raise SmiError(f"must be a finite number >= 0, got {self.feature_weight!r}", param="feature_weight")


@dataclass
class QatResult:
    out: Path
    top1: float | None  # test top-1 after the last epoch (None without evaluation data)
    wall_s: float  # synthesis + training seconds
    epochs: int
    log: list[dict[str, Any]]
    model: nn.Module
    plot: Path | None


def learnable_quant_(model: nn.Module, learnable: bool = True) -> nn.Module:
    """Make every step size and zero point of a converted model trainable (LSQ), or freeze them again (the
    quantized weights re-cached, zero points rounded): same state-dict keys either way."""
    for m in model.modules():
        if isinstance(m, ActQuantizer) and m.mode == "quant":
            m.learnable_(learnable)
        elif isinstance(m, WeightQuantMixin) and m.w_quant:
            m.learnable_weight_scale_(learnable)
    return model


def qat(
    teacher: Teacher,
    quantized: str | Path,
    data: DataSource,
    out: str | Path,
    config: QatConfig | None = None,
    *,
    eval_data: str | None = "teacher",
    device: torch.device | str = "cpu",
    overwrite: bool = False,
    progress: bool = True,
    dist: Dist | None = None,
) -> QatResult:
    """Fine-tune the quantized model in ``quantized`` (a ``smi quantize`` folder of ``teacher``) on ``data``.

    ``teacher`` is not changed. ``out`` is a run folder (checkpoint each epoch, resumed when rerun with
    the same settings) that finally holds the quantized model. Under ``torchrun`` (``dist``) the processes
    train data-parallel and process 0 writes.

    >>> qat(teacher, "quant/w4a4", PoolSource("pool/"), "runs/qat_w4a4")
    """
    cfg = config or QatConfig()
    student = copy.deepcopy(teacher)
    model, meta = load_quantized(quantized, student)
    model.to(device)
    start = {"folder": str(quantized), "config": meta["config"], "calibration": meta.get("calibration"),
             "reconstruct": meta.get("reconstruct"), "weights_sha256": sha256_file(Path(quantized) / WEIGHTS)}
    run, images, probe, test = open_run(teacher, data, out, cfg, {"quantized": start}, fmt=QAT_FORMAT,
                                        what="quantization-aware training run", eval_data=eval_data,
                                        products=(WEIGHTS, META), overwrite=overwrite, device=device,
                                        progress=progress, student=model, student_tokens=True, dist=dist)
    learnable_quant_(model, True)
    model.requires_grad_(True)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    teacher.model.to(device).eval()
    with _block_features(teacher.model, model, cfg) as extra_loss:
        log = train_on_teacher(run, teacher, model, images, cfg, opt, tokens=True, test=test, device=device,
                               progress=progress, extra_loss=extra_loss, dist=dist)
    images.finish()
    learnable_quant_(model, False)
    model.requires_grad_(False)
    model.eval()
    if dist is not None and dist.rank != 0:
        return QatResult(run.out, log[-1]["top1"], log[-1]["wall_s"], len(log), log, model, None)
    cfg_q = config_of(model)
    plot = plot_accuracy(run, log, f"{cfg_q.label()} {cfg_q.name} on {probe['kind']}",
                         f"quantization-aware training of {teacher.spec}") if test is not None else None
    extra = {key: meta[key] for key in ("calibration", "reconstruct") if key in meta}
    extra["qat"] = {"from": start, "data": probe, "config": cfg.to_dict(), "epochs": len(log),
                    "test_top1": log[-1]["top1"]}
    write_quantized(model, run.out, teacher, extra)
    return QatResult(run.out, log[-1]["top1"], log[-1]["wall_s"], len(log), log, model, plot)


@contextmanager
def _block_features(fp_model: nn.Module, model: nn.Module, cfg: QatConfig
                    ) -> Iterator[Callable[[], torch.Tensor] | None]:
    """Hooks that capture every block's output in both models; yields the feature term (None without one)."""
    fn = FEATURE_LOSSES[cfg.feature_loss]
    blocks_t, blocks_s = list(getattr(fp_model, "blocks", [])), list(getattr(model, "blocks", []))
    if fn is None or not cfg.feature_weight:
        yield None
        return
    if not blocks_s or len(blocks_t) != len(blocks_s):
        raise SmiError(f"--feature-loss {cfg.feature_loss} needs a model with transformer blocks", param="feature_loss")
    turn = None
    if config_of(model).rotate:  # the student's blocks write the rotated residual stream: rotate the teacher's too
        from smi.quant.rotate import residual_rotation

        turn = residual_rotation(fp_model.embed_dim)
    seen: dict[str, list[torch.Tensor]] = {"t": [], "s": []}

    def keep(key: str):
        def hook(module, args, output) -> None:
            if model.training:  # training steps only, not the per-epoch evaluation
                if key == "t" and turn is not None:
                    output = output @ turn.to(output)
                seen[key].append(output)
        return hook

    handles = [b.register_forward_hook(keep("t")) for b in blocks_t] + \
        [b.register_forward_hook(keep("s")) for b in blocks_s]

    def loss() -> torch.Tensor:
        t, s = seen["t"], seen["s"]
        seen["t"], seen["s"] = [], []
        return cfg.feature_weight * sum(fn(a, b.detach()) for a, b in zip(s, t, strict=True))

    try:
        yield loss
    finally:
        for h in handles:
            h.remove()
