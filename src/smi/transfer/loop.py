"""Data-free knowledge transfer: train a student on the teacher's outputs over synthetic images.

Training data is a synthetic pool (offline), a pool that grows while training (online: each
epoch first synthesizes one batch into ``OUT/pool``, then trains on batches drawn from the whole
pool, as the SMI reference does), real training images (an upper bound) or Gaussian noise (a
lower bound). Images of a sparse pool reach teacher and student as their kept patches only.

``OUT`` holds ``config.json`` (what the run is), ``checkpoint.safetensors`` (student +
optimizer + clocks, after every epoch), ``log.jsonl`` (one line per epoch), ``accuracy.png``
and finally ``student.safetensors`` + ``student.json``, a checkpoint ``smi eval --model`` reads.
Rerunning the same command resumes; a folder made with other settings is refused.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from smi.data.eval_data import eval_dataset, evaluate, real_training_images
from smi.data.fashion_mnist import normalize_uint8
from smi.data.pool import check_pool_teacher, load_pool
from smi.errors import SmiError
from smi.inversion.augment import apply_jitter, jitter_indices, sample_jitter
from smi.inversion.config import InversionConfig
from smi.inversion.synthesis import PoolSynthesis, progress_callback
from smi.models.loading import Teacher, save_teacher
from smi.models.sparse import mask_to_indices, sparse_forward
from smi.models.training import adamw, warmup_cosine
from smi.transfer.config import DistillConfig
from smi.transfer.student import Student
from smi.utils.io import atomic_write_bytes, atomic_write_json, read_format_json
from smi.utils.state import load_checkpoint, save_checkpoint

__all__ = ["DISTILL_FORMAT", "DistillResult", "distill", "kd_loss"]

DISTILL_FORMAT = "smi-distill/1"


@dataclass
class DistillResult:
    out: Path
    top1: float | None  # test top-1 after the last epoch (None without evaluation data)
    wall_s: float  # synthesis + training seconds
    epochs: int
    log: list[dict[str, Any]]
    weights: Path
    plot: Path | None


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
            ce_weight: float = 0.0) -> torch.Tensor:
    """T² · KL(softmax(t/T) ‖ softmax(s/T)), batch mean, + ``ce_weight`` · CE(s, argmax t)."""
    T = temperature
    loss = F.kl_div(F.log_softmax(student_logits / T, dim=1), F.log_softmax(teacher_logits / T, dim=1),
                    reduction="batchmean", log_target=True) * (T * T)
    if ce_weight:
        loss = loss + ce_weight * F.cross_entropy(student_logits, teacher_logits.argmax(1))
    return loss


class _Images:
    """Training images: a fixed or growing set (pool, real) or fresh noise; masks for sparse pools."""

    def __init__(self, kind: str, images: torch.Tensor | None = None, masks: torch.Tensor | None = None, *,
                 shape: tuple[int, ...] = (), norm: tuple[tuple[float, ...], tuple[float, ...]] | None = None) -> None:
        self.kind, self.images, self.masks = kind, images, masks
        self.shape = shape  # of a noise image
        self.norm = norm  # (mean, std) of uint8 images

    def append(self, images: torch.Tensor, masks: torch.Tensor) -> None:
        self.images = images if self.images is None else torch.cat([self.images, images])
        self.masks = masks if self.masks is None else torch.cat([self.masks, masks])

    def __len__(self) -> int:
        return 0 if self.images is None else len(self.images)

    def batches(self, steps: int, batch_size: int, gen: torch.Generator):
        """``steps`` batches of (images, kept indices or None): passes over a fresh permutation."""
        order = torch.empty(0, dtype=torch.long)
        for _ in range(steps):
            if self.kind == "noise":
                yield torch.randn(batch_size, *self.shape, generator=gen), None
                continue
            if len(order) < batch_size:
                order = torch.cat([order, torch.randperm(len(self), generator=gen)])
            idx, order = order[:batch_size], order[batch_size:]
            x = self.images[idx]
            if self.norm is not None:
                x = normalize_uint8(x, *self.norm)
            m = None if self.masks is None else self.masks[idx]
            yield x, (None if m is None or m.all() else mask_to_indices(m))


def _logits(model: nn.Module, x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    return model(x) if keep is None else sparse_forward(model, x, keep).logits


def _source_identity(data: str, teacher: Teacher) -> tuple[dict[str, Any], _Images, float]:
    """What the training data is (for resume checks), the images, and the seconds they cost."""
    if data == "noise":
        return {"kind": "noise"}, _Images("noise", shape=tuple(teacher.input_size)), 0.0
    if data == "real":
        x, _ = real_training_images(teacher)
        return {"kind": "real", "images": len(x)}, _Images("real", x, norm=(teacher.mean, teacher.std)), 0.0
    pool = load_pool(data)
    check_pool_teacher(pool, teacher.fingerprint, teacher.spec, data)
    ident = {"kind": "pool", "identity": pool.manifest["identity"],
             "shards": [s["sha256"] for s in pool.manifest["shards"]]}
    return ident, _Images("pool", pool.images, pool.masks), float(pool.manifest.get("seconds_total", 0.0))


def _prepare_out(out: Path, identity: dict[str, Any], overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise SmiError(f"--out {out} is a file, not a folder")
    cfg_path = out / "config.json"
    if cfg_path.exists():
        old = read_format_json(cfg_path, DISTILL_FORMAT, "distillation run")
        if old != identity:
            if not overwrite:
                diff = sorted(k for k in set(old) | set(identity) if old.get(k) != identity.get(k))
                raise SmiError(f"{out} holds a distillation run with other settings (differs in: {', '.join(diff)}); "
                               "use another --out or pass --overwrite")
            for name in ("checkpoint.safetensors", "log.jsonl", "accuracy.png", "student.safetensors",
                         "student.json"):
                (out / name).unlink(missing_ok=True)
            if old.get("data", {}).get("kind") == "online" and (out / "pool").is_dir():
                shutil.rmtree(out / "pool")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(cfg_path, identity)


def distill(
    teacher: Teacher,
    student: Student,
    data: str,
    out: str | Path,
    config: DistillConfig | None = None,
    *,
    synthesis: InversionConfig | None = None,
    eval_data: str | None = "fashion-mnist",
    device: torch.device | str = "cpu",
    overwrite: bool = False,
    progress: bool = True,
) -> DistillResult:
    """Train ``student`` to match ``teacher`` on ``data``; resumes from ``out``.

    Args:
        data: a pool folder (offline), ``online`` (needs ``synthesis``), ``real`` or ``noise``.
        synthesis: the inversion config of online mode; its ``batch_size`` images are made per epoch.
        eval_data: test data for the per-epoch top-1 (see ``smi eval --data``), or None.

    >>> distill(load_teacher("fmnist_vit_tiny"), build_student("fmnist_vit_mini", teacher), "pool/", "runs/kd")
    """
    cfg = config or DistillConfig()
    out = Path(out)
    online = data == "online"
    if online and synthesis is None:
        raise SmiError("online distillation needs a synthesis config")
    if online:
        ident, images, synth_s = {"kind": "online", "synthesis": synthesis.to_dict()}, _Images("pool"), 0.0
    else:
        ident, images, synth_s = _source_identity(data, teacher)
    identity = {"format": DISTILL_FORMAT, "teacher": teacher.identity(), "student": student.identity(),
                "data": ident, "config": cfg.to_dict(), "eval_data": eval_data}
    _prepare_out(out, identity, overwrite)
    job = None
    if online:
        job = PoolSynthesis(teacher, synthesis, cfg.epochs * synthesis.batch_size, out / "pool", seed=cfg.seed,
                            device=device)
        if job.images_done:
            pool = load_pool(job.folder)
            images.append(pool.images, pool.masks)
    test = eval_dataset(eval_data, teacher, cfg.eval_images) if eval_data else None

    model = student.model.to(device)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    opt = adamw(params, cfg.lr, cfg.weight_decay)
    ckpt, log_path = out / "checkpoint.safetensors", out / "log.jsonl"
    start, train_s, log = 0, 0.0, []
    if ckpt.exists():
        meta = load_checkpoint(ckpt, model, opt)
        start, train_s = int(meta["epoch"]), float(meta["train_s"])
        log = [json.loads(line) for line in log_path.read_text().splitlines()][:start] if log_path.exists() else []
        if progress and start:
            tqdm.write(f"resuming after epoch {start} from {ckpt}", file=sys.stderr)

    steps = cfg.steps_per_epoch or (cfg.online_steps if data in ("online", "noise")
                                    else math.ceil(len(images) / cfg.batch_size))
    total, warmup = cfg.epochs * steps, int(cfg.warmup_epochs * steps)
    patch = getattr(getattr(teacher.model, "patch_embed", None), "patch_size", (1,))[0]
    grid = (teacher.input_size[1] // patch, teacher.input_size[2] // patch)
    jitter_limit = max(1, round(0.125 * teacher.input_size[1] / patch))
    finished = bool(log) and cfg.time_budget_s is not None and log[-1]["wall_s"] >= cfg.time_budget_s

    for epoch in range(start, cfg.epochs if not finished else start):
        gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)  # per epoch: resume is exact
        if job is not None and not job.done(epoch):
            bar = tqdm(total=synthesis.iterations, unit="it", disable=not progress, leave=False,
                       desc=f"epoch {epoch + 1}: synthesize")
            tensors = job.run(epoch, progress_callback(bar, synthesis.iterations, f"pool {len(images)}"))
            bar.close()
            images.append(tensors["images"], tensors["mask"])
        if job is not None:
            synth_s = job.seconds
        model.train()
        t0 = time.perf_counter()
        loss_sum = 0.0
        bar = tqdm(images.batches(steps, cfg.batch_size, gen), total=steps, disable=not progress, leave=False,
                   desc=f"epoch {epoch + 1}/{cfg.epochs}", mininterval=2.0)
        for i, (x, keep) in enumerate(bar):
            lr = cfg.lr if cfg.lr_schedule == "constant" and epoch * steps + i >= warmup else \
                warmup_cosine(epoch * steps + i, total, warmup, cfg.lr, cfg.min_lr)
            for g in opt.param_groups:
                g["lr"] = lr
            if cfg.augment:
                j = sample_jitter(jitter_limit, patch, True, gen)
                x = apply_jitter(x, j)
                keep = None if keep is None else jitter_indices(keep, grid, patch, j)
            x = x.to(device)
            keep = None if keep is None else keep.to(device)
            with torch.no_grad():
                t_logits = _logits(teacher.model, x, keep)
            s_logits = _logits(model, x, keep if student.tokens else None)
            loss = kd_loss(s_logits, t_logits, cfg.temperature, cfg.ce_weight)
            if not torch.isfinite(loss):
                raise SmiError(f"distillation loss became {loss.item()} at epoch {epoch + 1}, step {i + 1}; the "
                               f"learning rate ({cfg.lr}) is the likely cause; checkpoints up to epoch {epoch} are "
                               "kept")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.item()
            bar.set_postfix(loss=f"{loss_sum / (i + 1):.3f}", refresh=False)
        train_s += time.perf_counter() - t0
        top1 = evaluate(model, test, device=device, progress=False)["top1"] if test is not None else None
        row = {"epoch": epoch + 1, "loss": round(loss_sum / steps, 5), "top1": top1,
               "train_s": round(train_s, 2), "synthesis_s": round(synth_s, 2), "wall_s": round(train_s + synth_s, 2),
               "images": len(images) if data != "noise" else (epoch + 1) * steps * cfg.batch_size}
        log.append(row)
        save_checkpoint(ckpt, model, opt, {"epoch": epoch + 1, "train_s": train_s})
        atomic_write_bytes(log_path, "".join(json.dumps(r) + "\n" for r in log).encode())
        if progress:
            tqdm.write(f"epoch {epoch + 1}: loss {row['loss']:.4f}"
                       + (f", test top-1 {top1:.2f} %" if top1 is not None else "")
                       + f", wall {row['wall_s']:.0f} s ({len(images)} images)", file=sys.stderr)
        if cfg.time_budget_s is not None and row["wall_s"] >= cfg.time_budget_s:
            break
    if not log:
        raise SmiError(f"{out}: no epoch finished")
    if job is not None:
        job.finish(grid=True)
    plot = None
    if test is not None:
        from smi.viz import save_curves

        plot = save_curves(out / "accuracy.png", {f"{student.arch} on {ident['kind']}":
                                                  [(r["wall_s"], r["top1"]) for r in log]},
                           xlabel="wall time (s): synthesis + training", ylabel="test top-1 (%)",
                           title=f"distilling {teacher.spec}")
    model.eval()
    weights = save_teacher(model, out / "student.safetensors", arch=student.arch, model_kwargs=student.model_kwargs,
                           class_names=teacher.class_names, normalization=(teacher.mean, teacher.std),
                           extra={"distilled_from": teacher.identity(), "data": ident["kind"], "epochs": len(log),
                                  "test_top1": log[-1]["top1"]})
    return DistillResult(out, log[-1]["top1"], log[-1]["wall_s"], len(log), log, weights, plot)
