"""The one runner behind every loop that trains something (teacher, student, and next quantized models).

A run folder holds ``config.json`` (what the run is: rerunning with the same identity resumes,
another identity is refused unless ``overwrite``), ``checkpoint.safetensors`` (model + optimizer +
clocks after every epoch), ``log.jsonl`` (one line per epoch) and ``accuracy.png``. :func:`fit`
runs the epochs: a per-epoch seeded generator (so a resumed run is exact), the learning-rate
schedule, a NaN guard, the time budget, the checkpoint and the log.

>>> run = RunFolder("runs/kd", identity, fmt="smi-distill/1", what="distillation run")
>>> log = fit(run, model, optimizer, FitConfig(epochs=10, steps_per_epoch=50, lr=1e-3), batches, step)
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from timm.utils import ModelEmaV3
from tqdm.auto import tqdm

from smi.distributed import Dist
from smi.errors import SmiError
from smi.utils.io import atomic_write_bytes, atomic_write_json, claim_folder, read_format_json
from smi.utils.schedule import Schedule, scheduled_lr
from smi.utils.state import load_checkpoint, save_checkpoint

__all__ = ["FitConfig", "RunFolder", "adamw", "fit", "plot_accuracy"]

CHECKPOINT, LOG, CONFIG, PLOT = "checkpoint.safetensors", "log.jsonl", "config.json", "accuracy.png"


class RunFolder:
    """A folder one run owns: its identity, checkpoint and log; refuses a folder made by another run.

    ``products`` are the files the run writes at the end (deleted with the checkpoint and log when
    ``overwrite`` replaces another run); ``on_replace(old_identity)`` cleans up anything else.
    """

    def __init__(self, out: str | Path, identity: dict[str, Any], *, fmt: str, what: str,
                 products: Sequence[str] = (), overwrite: bool = False,
                 on_replace: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.out = claim_folder(out, (CONFIG,), what, fmt)
        self.identity = {"format": fmt, **identity}
        cfg_path = self.out / CONFIG
        if cfg_path.exists():
            old = read_format_json(cfg_path, fmt, what)
            if old != json.loads(json.dumps(self.identity)):
                if not overwrite:
                    diff = sorted(k for k in set(old) | set(self.identity) if old.get(k) != self.identity.get(k))
                    raise SmiError(f"{self.out} holds a {what} with other settings (differs in: {', '.join(diff)}); "
                                   "use another folder or overwrite it", param="out")
                for name in (CHECKPOINT, LOG, PLOT, *products):
                    (self.out / name).unlink(missing_ok=True)
                if on_replace is not None:
                    on_replace(old)
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(cfg_path, self.identity)

    @property
    def checkpoint(self) -> Path:
        return self.out / CHECKPOINT

    def read_log(self) -> list[dict[str, Any]]:
        path = self.out / LOG
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def resume(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               others: dict[str, torch.nn.Module] | None = None) -> tuple[dict[str, Any], list[dict]]:
        """Restore the last epoch's checkpoint, if any: returns its clocks and the log up to it."""
        if not self.checkpoint.exists():
            return {"epoch": 0, "train_s": 0.0}, []
        meta = load_checkpoint(self.checkpoint, model, optimizer, others)
        meta = {"train_s": 0.0, **meta}
        return meta, self.read_log()[: int(meta["epoch"])]

    def save_epoch(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, log: list[dict[str, Any]],
                   meta: dict[str, Any], others: dict[str, torch.nn.Module] | None = None) -> None:
        save_checkpoint(self.checkpoint, model, optimizer, meta, others)
        atomic_write_bytes(self.out / LOG, "".join(json.dumps(r) + "\n" for r in log).encode())


def adamw(params: list[tuple[str, torch.nn.Parameter]], lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with no weight decay on biases, norms, position embeddings and tokens."""
    decayed = [p for n, p in params if p.ndim > 1 and "pos_embed" not in n and "token" not in n]
    ids = {id(p) for p in decayed}
    rest = [p for _, p in params if id(p) not in ids]
    return torch.optim.AdamW([{"params": decayed, "weight_decay": weight_decay},
                              {"params": rest, "weight_decay": 0.0}], lr=lr)


@dataclass
class FitConfig:
    """How :func:`fit` runs the epochs (the loops' own configs fill it in)."""

    epochs: int
    steps_per_epoch: int
    lr: float
    min_lr: float = 0.0
    warmup_epochs: float = 0.0
    schedule: Schedule = "cosine"
    seed: int = 0
    time_budget_s: float | None = None  # stop after the epoch at which wall time passes this
    ema: float = 0.0  # decay of an exponential moving average of the weights (timm's ModelEmaV3, warmed up); 0: off
    desc: str = "epoch"


Batch = Any
StepFn = Callable[[Batch], torch.Tensor]


def fit(
    run: RunFolder,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    cfg: FitConfig,
    batches: Callable[[int, torch.Generator], Iterable[Batch]],
    step: StepFn,
    *,
    end_of_epoch: Callable[[int], dict[str, Any]] | None = None,
    before_epoch: Callable[[int], None] | None = None,
    other_seconds: Callable[[], float] = lambda: 0.0,
    progress: bool = True,
    dist: Dist | None = None,
) -> list[dict[str, Any]]:
    """Train ``model`` for the remaining epochs of ``run``; returns the whole log.

    Each epoch: ``before_epoch(epoch)`` (online synthesis), then ``cfg.steps_per_epoch`` batches
    from ``batches(epoch, generator)`` with ``generator`` (and torch's global RNG) seeded from
    ``cfg.seed`` and the epoch, so a resumed run is exact; ``step(batch)`` returns the loss, which
    must be finite. Then ``end_of_epoch(epoch)`` adds fields to the log row (test accuracy),
    the checkpoint and log are written, and the run stops early once the wall time (training plus
    ``other_seconds()``, such as synthesis) passes ``cfg.time_budget_s``.

    With ``cfg.ema``, a moving average of the parameters (timm's ``ModelEmaV3``: decay
    min(``cfg.ema``, 1 - (1 + step)^(-2/3)), buffers follow the model) is updated after every
    optimizer step and checkpointed with the model; ``end_of_epoch`` sees the average in ``model``,
    and ``model`` holds the average when ``fit`` returns (what the caller evaluates and saves).

    Under ``torchrun`` (``dist``), every process runs the same schedule on its own share of each
    batch (``batches`` gives it that share) and the gradients are averaged before each optimizer
    step, so the processes hold the same model throughout (data parallelism as DDP does it); only
    process 0 writes the checkpoint and the log.
    """
    dist = dist or Dist()
    progress = progress and dist.rank == 0
    ema = ModelEmaV3(model, decay=cfg.ema, use_warmup=True, exclude_buffers=True) if cfg.ema else None
    others = {"ema": ema.module} if ema is not None else None
    meta, log = run.resume(model, optimizer, others)
    start, train_s = int(meta["epoch"]), float(meta["train_s"])
    if progress and start:
        tqdm.write(f"resuming after epoch {start} from {run.checkpoint}", file=sys.stderr)
    steps = cfg.steps_per_epoch
    total, warmup = cfg.epochs * steps, int(cfg.warmup_epochs * steps)
    if log and cfg.time_budget_s is not None and max(log[-1]["wall_s"], train_s + log[-1].get("other_s", 0.0)) \
            >= cfg.time_budget_s:
        return _averaged(model, ema, log)  # a finished run that stopped on its budget
    for epoch in range(start, cfg.epochs):
        if before_epoch is not None:
            before_epoch(epoch)
        seed = cfg.seed * 100_003 + epoch
        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)  # dropout and drop-path
        model.train()
        t0 = time.perf_counter()
        loss_sum = 0.0
        bar = tqdm(batches(epoch, gen), total=steps, disable=not progress, leave=False,
                   desc=f"{cfg.desc} {epoch + 1}/{cfg.epochs}", mininterval=2.0)
        for i, batch in enumerate(bar):
            for g in optimizer.param_groups:
                g["lr"] = scheduled_lr(cfg.schedule, epoch * steps + i, total, warmup, cfg.lr, cfg.min_lr)
            loss = step(batch)
            if not dist.all_ok(bool(torch.isfinite(loss))):
                raise SmiError(f"the loss became {loss.item()} at epoch {epoch + 1}, step {i + 1}; the learning rate "
                               f"({cfg.lr}) is the likely cause; checkpoints up to epoch {epoch} are kept in {run.out}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if dist.active:
                # every process has gradients for the same parameters (same model, same code path)
                grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
                dist.mean_([*grads, value := loss.detach().clone()])
                loss = value
            optimizer.step()
            if ema is not None:
                ema.update(model, step=epoch * steps + i + 1)
            loss_sum += loss.item()
            bar.set_postfix(loss=f"{loss_sum / (i + 1):.3f}", refresh=False)
        seconds = time.perf_counter() - t0
        train_s += seconds
        row: dict[str, Any] = {"epoch": epoch + 1, "loss": round(loss_sum / steps, 5)}
        if end_of_epoch is not None:
            with _swapped(model, ema):
                row.update(end_of_epoch(epoch))
        other = other_seconds()
        row.update({"lr_end": optimizer.param_groups[0]["lr"], "seconds": round(seconds, 2),
                    "train_s": round(train_s, 2), "other_s": round(other, 2), "wall_s": round(train_s + other, 2)})
        log.append(row)
        if dist.rank == 0:
            run.save_epoch(model, optimizer, log, {"epoch": epoch + 1, "train_s": train_s}, others)
        dist.barrier()
        if progress:
            top1 = "".join(f", {name} {row[key]:.2f} %" for key, name in METRICS.items() if row.get(key) is not None)
            images = f" ({row['images']} images)" if "images" in row else ""
            tqdm.write(f"{cfg.desc} {epoch + 1}: loss {row['loss']:.4f}{top1}, wall {row['wall_s']:.0f} s{images}",
                       file=sys.stderr)
        if cfg.time_budget_s is not None and not dist.all_ok(train_s + other < cfg.time_budget_s):
            break  # when any process is past the budget, so that all stop after the same epoch
    if not log:
        raise SmiError(f"{run.out}: no epoch finished")
    return _averaged(model, ema, log)


@contextmanager
def _swapped(model: torch.nn.Module, ema: ModelEmaV3 | None):
    """Inside: ``model``'s parameters hold the moving average; after: the trained ones again."""
    if ema is None:
        yield
        return
    trained = [p.detach().clone() for p in model.parameters()]
    _copy_parameters(model, ema.module.parameters())
    try:
        yield
    finally:
        _copy_parameters(model, trained)


def _averaged(model: torch.nn.Module, ema: ModelEmaV3 | None, log: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``log``, with ``model`` now holding the moving average of its weights (if there is one)."""
    if ema is not None:
        _copy_parameters(model, ema.module.parameters())
    return log


@torch.no_grad()
def _copy_parameters(model: torch.nn.Module, values: Iterable[torch.Tensor]) -> None:
    for p, v in zip(model.parameters(), values, strict=True):
        p.copy_(v)


METRICS = {"top1": "test top-1", "miou": "test mIoU"}  # what an epoch's row may report, as plots and logs say it


def plot_accuracy(run: RunFolder, log: list[dict[str, Any]], label: str, title: str,
                  metric: str = "top1") -> Path | None:
    """``accuracy.png``: the test ``metric`` (top-1, or a segmenter's mIoU) against wall time, if the log has any."""
    if not any(r.get(metric) is not None for r in log):
        return None
    from smi.viz import save_curves

    return save_curves(run.out / PLOT, {label: [(r["wall_s"], r.get(metric)) for r in log]},
                       xlabel="wall time (s)", ylabel=f"{METRICS[metric]} (%)", title=title)
