"""Fill a pool folder with synthetic images, batch by batch, resumably."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import load_file
from tqdm.auto import tqdm

from smi.data.pool import PoolWriter, load_pool
from smi.data.sources import SOURCES, DataSource, ImageSet
from smi.distributed import Dist
from smi.errors import SmiError
from smi.inversion.config import InversionConfig
from smi.inversion.engine import StepInfo, check_invertible, check_recompute, invert
from smi.inversion.recipe import active_terms
from smi.inversion.segmentation import is_segmenter, planned_classes
from smi.inversion.terms import TERMS
from smi.inversion.terms.contrastive import pool_features
from smi.models.loading import Teacher
from smi.utils.io import atomic_write_json
from smi.viz import save_grid

__all__ = ["OnlineSource", "PoolSynthesis", "SynthesisResult", "synthesize", "plan_targets", "image_seed",
           "progress_callback"]


@dataclass
class SynthesisResult:
    folder: Path
    num_images: int
    seconds: float  # optimisation time of all shards, including earlier (resumed) runs
    grid: Path | None


def image_seed(seed: int, index: int) -> int:
    """Seed of image ``index``'s initial noise: independent of batch size and process count."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def plan_targets(num_images: int, num_classes: int, seed: int) -> torch.Tensor:
    """Class-balanced targets in a seeded random order: class counts differ by at most one."""
    base = torch.arange(num_images) % num_classes
    return base[torch.randperm(num_images, generator=torch.Generator().manual_seed(seed))]


def _normalize_identity(identity: dict[str, Any]) -> dict[str, Any]:
    """An older pool's identity with the config fields added since filled with their defaults."""
    try:
        cfg = InversionConfig.from_dict(identity["config"]).to_dict()
    except (KeyError, TypeError, SmiError):
        return identity  # not comparable: the caller reports the difference
    return json.loads(json.dumps({**identity, "config": cfg}))


def _init_noise(seed: int, indices: range, shape: tuple[int, int, int]) -> torch.Tensor:
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(image_seed(seed, i)))
                        for i in indices])


class PoolSynthesis:
    """A pool folder being filled batch by batch; :func:`synthesize` runs it to the end.

    Batch ``b`` holds images ``[b * batch_size, (b + 1) * batch_size)``; its targets, initial
    noise and jitter draws depend only on ``seed`` and the image/batch index, so a resumed run
    writes exactly what an uninterrupted one would have, and batches may be run in any order
    (online distillation runs them one epoch at a time).
    """

    def __init__(self, teacher: Teacher, config: InversionConfig, num_images: int, out: str | Path, *,
                 seed: int = 0, device: torch.device | str = "cpu", overwrite: bool = False,
                 part: str | None = None, student: nn.Module | None = None, student_tokens: bool = False,
                 recompute: str = "auto") -> None:
        if num_images < 1:
            raise SmiError(f"must be positive, got {num_images}", param="num_images")
        check_invertible(teacher, config, student)  # before the folder exists
        check_recompute(teacher.model, recompute)
        self.recompute = recompute  # not part of the pool's identity: the images are the same either way
        self.teacher, self.config, self.num_images, self.seed, self.device = teacher, config, num_images, seed, device
        self.student, self.student_tokens = student, student_tokens
        self.identity: dict[str, Any] = {"method": config.method, "config": config.to_dict(), "seed": seed,
                                         "num_images": num_images, "teacher": teacher.identity(),
                                         "sparsity": config.sparsity.spec()}
        self.writer = PoolWriter(out, self.identity, overwrite=overwrite, part=part, normalize=_normalize_identity)
        self.folder = self.writer.folder
        atomic_write_json(self.folder / "config.json", self.identity)
        self.targets = (planned_classes(num_images, teacher.num_classes, seed) if is_segmenter(teacher.model)
                        else plan_targets(num_images, teacher.num_classes, seed))
        self.reads_pool = any(TERMS.get(n).reads_pool for n in active_terms(config, teacher.model))
        self._features: dict[int, torch.Tensor] = {}  # batch -> teacher features of its images (reads_pool)
        B = config.batch_size
        self.batches = [range(s, min(s + B, num_images)) for s in range(0, num_images, B)]

    def done(self, b: int) -> bool:
        return self.writer.done(b)

    @property
    def images_done(self) -> int:
        return sum(len(self.batches[b]) for b in range(len(self.batches)) if self.done(b))

    @property
    def seconds(self) -> float:
        """Optimisation time of every shard written so far, earlier (resumed) runs included."""
        return self.writer.seconds_total

    def bank(self, b: int) -> torch.Tensor | None:
        """Teacher features of the images of every finished batch before ``b`` (terms that read the pool)."""
        if not self.reads_pool:
            return None
        for i in range(b):
            if self.done(i) and i not in self._features:  # made by an earlier (resumed) run
                t = load_file(str(self.folder / self.writer.shards[i]["file"]))
                self._features[i] = pool_features(self.teacher.model, t["images"].to(self.device), t["mask"])
        feats = [self._features[i] for i in range(b) if i in self._features]
        return torch.cat(feats) if feats else None

    def run(self, b: int, callback: Callable[[StepInfo], None] | None = None) -> dict[str, torch.Tensor]:
        """Invert batch ``b`` and write its shard; returns the shard's tensors."""
        idx = self.batches[b]
        gen = torch.Generator().manual_seed(int(np.random.SeedSequence([self.seed, b, 1]).generate_state(1)[0]))
        init = _init_noise(self.seed, idx, self.teacher.input_size)
        difficulty = b / max(1, len(self.batches) - 1)  # the e2h curriculum's place of this batch in the pool
        result = invert(self.teacher, self.config, self.targets[idx.start:idx.stop], init=init, generator=gen,
                        device=self.device, callback=callback, difficulty=difficulty,
                        student=self.student, student_tokens=self.student_tokens, bank=self.bank(b),
                        recompute=self.recompute)
        if self.reads_pool:
            self._features[b] = pool_features(self.teacher.model, result.images.to(self.device), result.mask)
        tensors = {"images": result.images, "mask": result.mask, "targets": result.targets,
                   "loss": result.loss.float(), "index": torch.arange(idx.start, idx.stop)}
        if result.soft is not None:
            tensors["soft"] = result.soft.float()  # the target distributions of soft-label methods
        if result.maps is not None:
            tensors["maps"] = result.maps.to(torch.uint8 if self.teacher.num_classes <= 256 else torch.int16)
        classes = torch.bincount(result.targets, minlength=self.teacher.num_classes).tolist()
        self.writer.write(b, tensors, result.seconds, {"classes": classes, "kept": int(result.mask[0].sum())})
        return tensors

    def finish(self, grid: bool = True) -> SynthesisResult:
        self.writer.finish()
        grid_path = None
        if grid:
            pool = load_pool(self.folder)
            t = self.teacher
            names = t.class_names or [str(i) for i in range(t.num_classes)]
            patch = getattr(getattr(t.model, "patch_embed", None), "patch_size", (1,))[0]
            grid_path = save_grid(pool.images, pool.masks if not self.config.sparsity.dense else None, patch,
                                  self.folder / "grid.png", t.mean, t.std, titles=[names[int(i)] for i in pool.labels])
        return SynthesisResult(self.folder, self.num_images, self.seconds, grid_path)


def synthesize(
    teacher: Teacher,
    config: InversionConfig,
    num_images: int,
    out: str | Path,
    *,
    seed: int = 0,
    device: torch.device | str = "cpu",
    overwrite: bool = False,
    progress: bool = True,
    grid: bool = True,
    dist: Dist | None = None,
    callback: Callable[[StepInfo], None] | None = None,
    recompute: str = "auto",
) -> SynthesisResult:
    """Invert ``num_images`` images into the pool folder ``out``; rerunning resumes.

    ``recompute``: activation checkpointing (:func:`~smi.inversion.engine.invert`'s); the pool is the same either way.

    Under ``torchrun`` (``dist`` from :func:`smi.distributed.from_env`), process ``r`` of ``K``
    inverts the batches ``b`` with ``b % K == r``; since a batch's targets and seeds depend only
    on ``seed`` and ``b``, the pool holds the same images whatever ``K`` is. Each process records
    its shards in its own part manifest; process 0 merges them after a barrier.

    >>> synthesize(load_teacher("fmnist_vit_tiny"), InversionConfig(iterations=400), 64, "out/pool")
    """
    dist = dist or Dist()
    if dist.active and any(TERMS.get(n).reads_pool for n in active_terms(config, teacher.model)):
        raise SmiError("the pool's earlier batches are read by a term of this recipe (contrastive), and under "
                       "torchrun other processes are still making them: run it in one process", param="terms")
    ok, error = True, None
    if dist.rank == 0:  # clears the folder (--overwrite) or refuses it, before anyone writes
        try:
            PoolSynthesis(teacher, config, num_images, out, seed=seed, device=device, overwrite=overwrite,
                          recompute=recompute).writer.remove_stale_temporaries()
        except SmiError as e:
            ok, error = False, e
    if not dist.all_ok(ok):
        raise error or SmiError(f"process 0 refused the pool folder {out}; see its message")
    part = f"rank{dist.rank}" if dist.active else None
    job = PoolSynthesis(teacher, config, num_images, out, seed=seed, device=device, part=part, recompute=recompute)
    todo = [b for b in range(len(job.batches)) if b % dist.world == dist.rank and not job.done(b)]
    bar = tqdm(total=len(todo) * config.iterations, unit="it", disable=not progress or dist.rank != 0,
               dynamic_ncols=True, desc=f"{config.method} {'dense' if config.sparsity.dense else 'sparse'}")
    try:
        for b in todo:
            show = progress_callback(bar, config.iterations, f"images {job.images_done}/{num_images}")
            job.run(b, show if callback is None else lambda info: (show(info), callback(info)))  # noqa: B023
    finally:
        bar.close()
    if not dist.active:
        job.writer.merge()  # also folds in the parts of an earlier distributed run, if any
        return job.finish(grid)
    job.writer.finish()
    dist.barrier()
    if dist.rank != 0:
        return SynthesisResult(job.folder, num_images, job.seconds, None)
    job = PoolSynthesis(teacher, config, num_images, out, seed=seed, device=device)  # sees every part
    job.writer.merge()
    return job.finish(grid)


def progress_callback(bar: tqdm, iterations: int, prefix: str) -> Callable[[StepInfo], None]:
    """A step callback that advances ``bar`` and shows loss and kept patches (at most twice a second)."""
    state = {"last": time.perf_counter()}

    def on_step(info: StepInfo) -> None:
        bar.update(1)
        now = time.perf_counter()
        if now - state["last"] > 0.5 or info.iteration == iterations:
            state["last"] = now
            bar.set_postfix_str(f"{prefix}, loss {info.loss:.3f}, kept {info.kept} patches", refresh=False)

    return on_step


@SOURCES.register("online")
@dataclass(frozen=True)
class OnlineSource(DataSource):
    """Images synthesized while a loop trains: one batch per epoch into RUN/pool (resumable), trained on with
    everything made so far."""

    synthesis: InversionConfig
    kind = "online"
    grows = True
    folder = "pool"

    def identity(self) -> dict[str, Any]:
        return {"kind": "online", "synthesis": self.synthesis.to_dict()}

    def describe(self) -> str:
        return "online synthesis"

    def check(self, model: Teacher, *, student: nn.Module | None = None, **context: Any) -> None:  # type: ignore[override]
        check_invertible(model, self.synthesis, student)

    def open(self, model: Teacher, *, folder: str | Path, epochs: int, seed: int = 0,  # type: ignore[override]
             device: torch.device | str = "cpu", progress: bool = True, student: nn.Module | None = None,
             student_tokens: bool = False, **context: Any) -> ImageSet:
        """``student``: the model being trained, which terms such as ``adversarial`` synthesize against."""
        return _OnlineImages(model, self.synthesis, Path(folder), epochs, seed, device, progress, student,
                             student_tokens)


class _OnlineImages(ImageSet):
    def __init__(self, teacher: Teacher, synthesis: InversionConfig, folder: Path, epochs: int, seed: int,
                 device: torch.device | str, progress: bool, student: nn.Module | None = None,
                 student_tokens: bool = False) -> None:
        super().__init__(identity={"kind": "online", "synthesis": synthesis.to_dict()})
        self.iterations, self.progress = synthesis.iterations, progress
        self.job = PoolSynthesis(teacher, synthesis, epochs * synthesis.batch_size, folder, seed=seed, device=device,
                                 student=student, student_tokens=student_tokens)
        self.student = student
        if self.job.images_done:
            pool = load_pool(self.job.folder)
            self.append(pool.images, pool.masks)

    @property
    def endless(self) -> bool:
        return True  # it grows every epoch: epochs are counted in steps, not passes

    @property
    def seconds(self) -> float:
        return self.job.seconds  # every shard's synthesis time, earlier (resumed) runs included

    def before_epoch(self, epoch: int, progress: bool = True) -> None:
        if self.job.done(epoch):
            return
        bar = tqdm(total=self.iterations, unit="it", disable=not self.progress, leave=False,
                   desc=f"epoch {epoch + 1}: synthesize")
        with _frozen(self.student):  # the images learn against it; its own weights and mode stay as they are
            tensors = self.job.run(epoch, progress_callback(bar, self.iterations, f"pool {len(self)}"))
        bar.close()
        self.append(tensors["images"], tensors["mask"])

    def finish(self) -> None:
        self.job.finish(grid=True)


@contextmanager
def _frozen(model: nn.Module | None) -> Iterator[None]:
    """``model`` in eval mode with no parameter gradients for the duration; both restored after."""
    if model is None:
        yield
        return
    flags, training = [(p, p.requires_grad) for p in model.parameters()], model.training
    model.eval().requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(training)
