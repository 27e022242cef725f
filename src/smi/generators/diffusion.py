"""GenQ and mixup-class prompting: a pool from a local text-to-image diffusion pipeline.

``smi invert --method genq --diffusion-model PATH`` prompts a Stable-Diffusion-style ``diffusers``
pipeline saved in the folder ``PATH`` (nothing is downloaded) with the teacher's class names, one
class per image (GenQ). ``--method genq-mix`` (mixup-class prompting) asks for images between
classes: with probability ``p_mix`` an image gets ``mix_k`` classes (its planned one and random
others) and either

* their prompts' text embeddings mixed with weights ``softmax(N(0, 1))`` (``genq_fuse=0``, the
  default), or
* one prompt that names them all, "a photo of a shirt and a coat" (``genq_fuse=1``), weights equal;

the weights are the image's soft target and the pool records them (``soft``). The images are resized
to the teacher's input (antialiased), turned grey for a one-channel teacher (ITU-R 601 luma), and
normalized; with ``genq_min_confidence`` > 0 only images the teacher agrees with (sum over the
image's classes of weight x teacher probability at least that) are kept, the rest drawn again (up to
``genq_max_tries`` rounds per batch). Sparse: as every sampled pool, each image keeps the patches
the teacher attends to most.

Every image's diffusion noise comes from its own seed (``seed``, image index), so a resumed pool
holds what an uninterrupted one would. What the images are worth depends entirely on the checkpoint:
smi's tests build a tiny random pipeline, so nothing here measures fidelity without a real one.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from smi.errors import SmiError
from smi.generators.pool import check_sampled, write_sampled_pool
from smi.inversion.config import SparsityConfig
from smi.inversion.methods import GENQ_OPTIONS
from smi.inversion.synthesis import SynthesisResult, image_seed, plan_targets
from smi.models.loading import Teacher

__all__ = ["GENQ_OPTIONS", "GenQConfig", "class_prompt", "diffusion_pool", "load_pipeline", "mix_plan",
           "to_teacher_input"]

TEMPLATE = "a photo of a {}"
LUMA = (0.299, 0.587, 0.114)


@dataclass(frozen=True)
class GenQConfig:
    mix: bool = False
    p_mix: float = 0.4
    mix_k: int = 2
    fuse: bool = False
    steps: int = 25
    guidance: float = 7.5
    min_confidence: float = 0.0
    max_tries: int = 8
    template: str = TEMPLATE
    batch_size: int = 8

    def __post_init__(self) -> None:
        if self.steps < 1 or self.max_tries < 1 or self.batch_size < 1:
            raise SmiError("genq_steps, genq_max_tries and the batch size must be positive", param="options")
        if not 0 <= self.min_confidence < 1:
            raise SmiError(f"must be in [0, 1), got {self.min_confidence}", param="genq_min_confidence")
        if "{}" not in self.template:
            raise SmiError(f"must hold {{}} where the class name goes, got {self.template!r}", param="template")

    @classmethod
    def from_options(cls, option, batch_size: int) -> GenQConfig:
        """From an :class:`~smi.inversion.InversionConfig`'s ``option`` (its method's and the user's knobs)."""
        return cls(mix=option("genq_mix") > 0, p_mix=option("p_mix"), mix_k=int(option("mix_k")),
                   fuse=option("genq_fuse") > 0, steps=int(option("genq_steps")), guidance=option("genq_guidance"),
                   min_confidence=option("genq_min_confidence"), max_tries=int(option("genq_max_tries")),
                   batch_size=batch_size)


def class_prompt(names: list[str], template: str = TEMPLATE) -> str:
    """One prompt naming every class in ``names``: "a photo of a shirt" / "a photo of a shirt and a coat"."""
    first, *rest = template.format(names[0]), *names[1:]
    return " and a ".join([first, *rest]) if rest else first


def mix_plan(targets: torch.Tensor, num_classes: int, cfg: GenQConfig, generator: torch.Generator
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image: its classes (n, k) (the planned one first) and their weights (n, k), which sum to one.

    Unmixed images have weight 1 on the planned class (and zero on the padding, repeats of it)."""
    n, k = targets.shape[0], min(cfg.mix_k, num_classes) if cfg.mix else 1
    classes = targets[:, None].repeat(1, k)
    weights = torch.zeros(n, k)
    weights[:, 0] = 1
    if k == 1:
        return classes, weights
    mixed = torch.rand(n, generator=generator) < cfg.p_mix
    for b in mixed.nonzero().flatten().tolist():
        others = torch.randperm(num_classes - 1, generator=generator)[: k - 1]
        classes[b, 1:] = others + (others >= targets[b]).long()  # never the planned class again
        weights[b] = torch.full((k,), 1 / k) if cfg.fuse else F.softmax(torch.randn(k, generator=generator), 0)
    return classes, weights


@contextmanager
def _quiet() -> Iterator[None]:
    """diffusers' and transformers' loading bars and advice (about packages smi does not need) off for a load."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    levels = dlog.get_verbosity(), tlog.get_verbosity()
    dlog.set_verbosity_error(), tlog.set_verbosity_error()
    dlog.disable_progress_bar(), tlog.disable_progress_bar()
    try:
        yield
    finally:
        dlog.set_verbosity(levels[0]), tlog.set_verbosity(levels[1])
        dlog.enable_progress_bar(), tlog.enable_progress_bar()


def load_pipeline(path: str | Path, device: torch.device | str = "cpu") -> Any:
    """A diffusers text-to-image pipeline from the local folder ``path``; safetensors weights only, no download."""
    try:
        from diffusers import DiffusionPipeline
    except ImportError:
        raise SmiError("genq needs the diffusers and transformers packages: pip install 'smi[genq]'") from None
    folder = Path(path)
    if not (folder / "model_index.json").is_file():
        raise SmiError(f"{folder} is not a diffusers pipeline folder (it has no model_index.json); save one with "
                       "pipeline.save_pretrained(PATH)", param="diffusion_model")
    try:
        with _quiet():
            pipe = DiffusionPipeline.from_pretrained(str(folder), local_files_only=True, use_safetensors=True)
    except (OSError, ValueError, TypeError, KeyError, AttributeError, ImportError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SmiError(f"{folder}: not a loadable diffusers pipeline ({first})", param="diffusion_model") from None
    if not hasattr(pipe, "encode_prompt") or not hasattr(pipe, "unet"):
        raise SmiError(f"{folder} holds a {type(pipe).__name__}; genq needs a text-to-image pipeline that encodes "
                       "prompts (the Stable Diffusion family)", param="diffusion_model")
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def to_teacher_input(images: torch.Tensor, teacher: Teacher) -> torch.Tensor:
    """(n, 3, h, w) RGB in [0, 1] -> the teacher's normalized (n, C, H, W) input."""
    C, H, W = teacher.input_size
    x = F.interpolate(images.float(), size=(H, W), mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)
    if C == 1:
        x = (x * torch.tensor(LUMA, device=x.device).view(1, 3, 1, 1)).sum(1, keepdim=True)
    elif C != 3:
        raise SmiError(f"the teacher reads {C}-channel images; a text-to-image pipeline makes RGB (1 or 3 channels)")
    mean = torch.tensor(teacher.mean, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(teacher.std, device=x.device).view(1, -1, 1, 1)
    return (x - mean) / std


def _embed(pipe: Any, prompts: list[str], device: torch.device | str) -> torch.Tensor:
    emb, _ = pipe.encode_prompt(prompts, device, 1, False)
    return emb


@torch.no_grad()
def _generate(pipe: Any, teacher: Teacher, names: list[str], classes: torch.Tensor, weights: torch.Tensor,
              seeds: list[int], cfg: GenQConfig, device: torch.device | str) -> torch.Tensor:
    """Images for each row of (classes, weights), the teacher's input."""
    if cfg.fuse or classes.shape[1] == 1:
        prompts = [class_prompt([names[int(c)] for c in row[w > 0]], cfg.template)
                   for row, w in zip(classes, weights, strict=True)]
        embeds = _embed(pipe, prompts, device)
    else:  # mixed text embeddings: sum_k w_k E("a photo of a class_k")
        table = _embed(pipe, [cfg.template.format(n) for n in names], device)  # (classes, L, D)
        embeds = torch.einsum("nk,nkld->nld", weights.to(table), table[classes.to(table.device)])
    negative = _embed(pipe, [""] * len(seeds), device)
    side = pipe.unet.config.sample_size * getattr(pipe, "vae_scale_factor", 8)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    out = pipe(prompt_embeds=embeds, negative_prompt_embeds=negative, num_inference_steps=cfg.steps,
               guidance_scale=cfg.guidance, generator=gens, output_type="pt", height=side, width=side)
    return to_teacher_input(out.images.to(device), teacher)


@torch.no_grad()
def diffusion_pool(teacher: Teacher, pipeline: str | Path, num_images: int, out: str | Path, cfg: GenQConfig, *,
                   method: str = "genq", sparsity: SparsityConfig | None = None, seed: int = 0,
                   device: torch.device | str = "cpu", overwrite: bool = False, grid: bool = True) -> SynthesisResult:
    """Write ``num_images`` images of the pipeline in the folder ``pipeline`` as a pool (resumable)."""
    sparsity = sparsity or SparsityConfig(())
    check_sampled(teacher, num_images, cfg.batch_size, sparsity)
    names = teacher.class_names
    if not names or len(names) != teacher.num_classes:
        raise SmiError(f"{teacher.spec} has no class names to prompt with; save the teacher with class_names "
                       "(smi train-teacher records the dataset's)")
    pipe = load_pipeline(pipeline, device)  # before any folder exists
    identity = {"method": method, "config": asdict(cfg), "seed": seed, "num_images": num_images,
                "teacher": teacher.identity(), "sparsity": sparsity.spec(),
                "diffusion_model": {"path": str(Path(pipeline).resolve()), "class": type(pipe).__name__}}
    targets = plan_targets(num_images, teacher.num_classes, seed)

    def draw(b: int, start: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, b, 3]).generate_state(1)[0]))
        classes, weights = mix_plan(targets[start:start + n], teacher.num_classes, cfg, g)
        soft = torch.zeros(n, teacher.num_classes).scatter_add_(1, classes, weights)
        kept = torch.zeros(n, dtype=torch.bool)
        x = None
        for attempt in range(cfg.max_tries):
            todo = (~kept).nonzero().flatten()
            seeds = [image_seed(seed, start + int(i)) + attempt for i in todo]
            fresh = _generate(pipe, teacher, names, classes[todo], weights[todo], seeds, cfg, device)
            x = fresh.new_zeros(n, *fresh.shape[1:]) if x is None else x
            x[todo.to(x.device)] = fresh
            if cfg.min_confidence <= 0:
                return x, soft
            agree = (F.softmax(teacher.model(fresh), 1).cpu() * soft[todo]).sum(1)
            kept[todo[agree >= cfg.min_confidence]] = True
            if kept.all():
                return x, soft
        raise SmiError(f"after {cfg.max_tries} rounds {int((~kept).sum())} of batch {b}'s {n} images still fall "
                       f"below genq_min_confidence={cfg.min_confidence:g}; lower it or raise genq_max_tries",
                       param="genq_min_confidence")

    return write_sampled_pool(teacher, identity, num_images, out, draw, sparsity=sparsity, batch_size=cfg.batch_size,
                              device=device, overwrite=overwrite, grid=grid, soft=cfg.mix)
