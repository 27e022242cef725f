"""A normal synthetic pool sampled from a trained generator, dense or sparse.

A superposing generator (Qimera) draws superposed batches as it was trained to, and the pool's
shards then hold every image's class weights (``soft``; one-hot for the others) beside its label
(the largest weight).

Batch ``b`` draws its noise and (balanced) classes from a generator seeded by (``seed``, ``b``), so
an interrupted run resumes with exactly the images an uninterrupted one writes. Sparse: each
generated image keeps the patches the teacher attends to most, ranked as sparse inversion ranks
them at its stops (:func:`smi.models.sparse.rank_patches` over the schedule's kept counts); the
stopped patches are zero and the pool records the kept-patch mask, so every consumer treats it as
it treats a sparse inversion pool (the ViT teacher sees the kept patches only).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from smi.data.pool import PoolWriter, load_pool
from smi.errors import SmiError
from smi.generators.train import WEIGHTS, load_generator, sample_targets, superposition
from smi.inversion.augment import pixel_mask_from_indices
from smi.inversion.config import SparsityConfig
from smi.inversion.synthesis import SynthesisResult
from smi.models.loading import Teacher, require_classifier
from smi.models.sparse import check_sparse_capable, rank_patches, sparse_forward
from smi.utils.io import atomic_write_json, sha256_file
from smi.viz import save_grid

__all__ = ["check_sampled", "generate_pool", "write_sampled_pool"]


@torch.no_grad()
def generate_pool(teacher: Teacher, generator: str | Path, num_images: int, out: str | Path, *,
                  sparsity: SparsityConfig | None = None, batch_size: int = 64, seed: int = 0,
                  device: torch.device | str = "cpu", overwrite: bool = False, grid: bool = True) -> SynthesisResult:
    """Write ``num_images`` images of the generator in ``generator`` (a `smi train-generator` folder) as a pool."""
    sparsity = sparsity or SparsityConfig(())
    check_sampled(teacher, num_images, batch_size, sparsity)
    gen, meta = load_generator(generator, teacher, device)
    superpose = superposition(meta)
    identity = {"method": "generator", "generator": {"weights": sha256_file(Path(generator) / WEIGHTS),
                                                     "train_config": meta.get("train_config")},
                "config": {"batch_size": batch_size}, "seed": seed, "num_images": num_images,
                "teacher": teacher.identity(), "sparsity": sparsity.spec()}

    def draw(b: int, start: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, b, 2]).generate_state(1)[0]))
        z = torch.randn(n, gen.latent_dim, generator=g).to(device)
        y = sample_targets(n, teacher.num_classes, g, *superpose).to(device)
        return gen(z, y), y

    return write_sampled_pool(teacher, identity, num_images, out, draw, sparsity=sparsity, batch_size=batch_size,
                              device=device, overwrite=overwrite, grid=grid, soft=superpose[0] > 0)


def check_sampled(teacher: Teacher, num_images: int, batch_size: int, sparsity: SparsityConfig) -> None:
    """What a sampled pool checks before it loads anything or makes a folder."""
    if num_images < 1 or batch_size < 1:
        raise SmiError(f"must be positive, got {num_images if num_images < 1 else batch_size}",
                       param="num_images" if num_images < 1 else "batch_size")
    require_classifier(teacher, "a sampled pool")
    if not sparsity.dense:
        check_sparse_capable(teacher.model)


@torch.no_grad()
def write_sampled_pool(teacher: Teacher, identity: dict[str, Any], num_images: int, out: str | Path,
                       draw: Callable[[int, int, int], tuple[torch.Tensor, torch.Tensor]], *,
                       sparsity: SparsityConfig, batch_size: int, device: torch.device | str = "cpu",
                       overwrite: bool = False, grid: bool = True, soft: bool = False) -> SynthesisResult:
    """A pool from a sampler, resumably: ``draw(b, start, n)`` returns batch ``b``'s ``n`` images (normalized
    teacher inputs) and their classes (``(n,)``) or class weights (``(n, classes)``), and must depend on ``b``
    only. Sparse: each image keeps the patches the teacher attends to most (``sparsity``'s kept counts).
    ``soft``: every shard records the class weights (one-hot for plain classes)."""
    writer = PoolWriter(out, identity, overwrite=overwrite)
    atomic_write_json(writer.folder / "config.json", identity)
    patch = getattr(getattr(teacher.model, "patch_embed", None), "patch_size", (1,))[0]
    grid_hw = (teacher.input_size[1] // patch, teacher.input_size[2] // patch)
    N = grid_hw[0] * grid_hw[1]
    for b, start in enumerate(range(0, num_images, batch_size)):
        if writer.done(b):
            continue
        t0 = time.perf_counter()
        n = min(batch_size, num_images - start)
        x, y = draw(b, start, n)
        x, y = x.to(device), y.to(device)
        labels = y if y.ndim == 1 else y.argmax(1)
        if sparsity.dense:
            mask = torch.ones(n, N, dtype=torch.bool, device=device)
            logits = teacher.model(x)
        else:
            keep = rank_patches(teacher.model, x, sparsity.kept_counts(N)[1:])
            mask = torch.zeros(n, N, dtype=torch.bool, device=device).scatter_(1, keep, True)
            x = x * pixel_mask_from_indices(keep, grid_hw, patch)
            logits = sparse_forward(teacher.model, x, keep).logits
        tensors = {"images": x.cpu().contiguous(), "mask": mask.cpu(), "targets": labels.cpu(),
                   "loss": F.cross_entropy(logits, y, reduction="none").float().cpu(),
                   "index": torch.arange(start, start + n)}
        if soft:
            tensors["soft"] = (y if y.ndim == 2 else F.one_hot(y, teacher.num_classes)).float().cpu()
        classes = torch.bincount(labels.cpu(), minlength=teacher.num_classes).tolist()
        writer.write(b, tensors, time.perf_counter() - t0, {"classes": classes, "kept": int(mask[0].sum())})
    writer.finish()
    grid_path = None
    if grid:
        pool = load_pool(writer.folder)
        names = teacher.class_names or [str(i) for i in range(teacher.num_classes)]
        grid_path = save_grid(pool.images, None if sparsity.dense else pool.masks, patch, writer.folder / "grid.png",
                              teacher.mean, teacher.std, titles=[names[int(i)] for i in pool.labels])
    return SynthesisResult(writer.folder, num_images, writer.seconds_total, grid_path)
