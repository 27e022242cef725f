"""Fill a pool folder with synthetic images, batch by batch, resumably."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from smi.data.pool import PoolWriter, load_pool
from smi.errors import SmiError
from smi.inversion.config import InversionConfig
from smi.inversion.engine import StepInfo, invert
from smi.models.loading import Teacher
from smi.utils.io import atomic_write_json
from smi.viz import save_grid

__all__ = ["SynthesisResult", "synthesize", "plan_targets", "image_seed"]


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


def _init_noise(seed: int, indices: range, shape: tuple[int, int, int]) -> torch.Tensor:
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(image_seed(seed, i)))
                        for i in indices])


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
) -> SynthesisResult:
    """Invert ``num_images`` images into the pool folder ``out``; rerunning resumes.

    Batch ``b`` holds images ``[b * batch_size, (b + 1) * batch_size)``; its targets, initial
    noise and jitter draws depend only on ``seed`` and the image/batch index, so a resumed run
    writes exactly what an uninterrupted one would have.

    >>> synthesize(load_teacher("fmnist_vit_tiny"), InversionConfig(iterations=400), 64, "out/pool")
    """
    if num_images < 1:
        raise SmiError(f"--num-images must be positive, got {num_images}")
    identity: dict[str, Any] = {"method": config.method, "config": config.to_dict(), "seed": seed,
                                "num_images": num_images, "teacher": teacher.identity(),
                                "sparsity": config.sparsity.spec()}
    writer = PoolWriter(out, identity, overwrite=overwrite)
    atomic_write_json(writer.folder / "config.json", identity)
    targets = plan_targets(num_images, teacher.num_classes, seed)
    B = config.batch_size
    batches = [range(s, min(s + B, num_images)) for s in range(0, num_images, B)]
    todo = [b for b in range(len(batches)) if not writer.done(b)]
    done_images = sum(len(batches[b]) for b in range(len(batches)) if writer.done(b))

    bar = tqdm(total=len(todo) * config.iterations, unit="it", disable=not progress, dynamic_ncols=True,
               desc=f"{config.method} {'dense' if config.sparsity.dense else 'sparse'}")
    state = {"last": time.perf_counter()}

    def on_step(info: StepInfo) -> None:
        bar.update(1)
        now = time.perf_counter()
        if now - state["last"] > 0.5 or info.iteration == config.iterations:
            state["last"] = now
            bar.set_postfix_str(f"images {done_images}/{num_images}, loss {info.loss:.3f}, "
                                f"kept {info.kept} patches", refresh=False)

    try:
        for b in todo:
            idx = batches[b]
            gen = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, b, 1]).generate_state(1)[0]))
            init = _init_noise(seed, idx, teacher.input_size)
            result = invert(teacher, config, targets[idx.start:idx.stop], init=init, generator=gen,
                            device=device, callback=on_step)
            tensors = {"images": result.images, "mask": result.mask, "targets": result.targets,
                       "loss": result.loss.float(), "index": torch.arange(idx.start, idx.stop)}
            classes = torch.bincount(result.targets, minlength=teacher.num_classes).tolist()
            writer.write(b, tensors, result.seconds, {"classes": classes, "kept": int(result.mask[0].sum())})
            done_images += len(idx)
    finally:
        bar.close()
    writer.finish()
    grid_path = None
    if grid:
        pool = load_pool(writer.folder)
        names = teacher.class_names or [str(i) for i in range(teacher.num_classes)]
        patch = getattr(getattr(teacher.model, "patch_embed", None), "patch_size", (1,))[0]
        grid_path = save_grid(pool.images, pool.masks if not config.sparsity.dense else None, patch,
                              writer.folder / "grid.png", teacher.mean, teacher.std,
                              titles=[names[int(t)] for t in pool.labels])
    return SynthesisResult(writer.folder, num_images, writer.seconds_total, grid_path)
