"""The student: a timm architecture built for the teacher's classes and input, or a checkpoint."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from timm.layers import freeze_batch_norm_2d

from smi.errors import SmiError, SmiWarning
from smi.models.loading import Teacher, check_fits, create_model, load_teacher, require_classifier
from smi.models.sparse import check_sparse_capable

__all__ = ["Student", "build_student"]


@dataclass
class Student:
    model: nn.Module
    arch: str
    model_kwargs: dict[str, Any]  # what timm.create_model got besides the name (for the saved checkpoint)
    origin: str  # 'scratch' or the checkpoint's fingerprint
    tokens: bool  # True when kept patches can reach it as tokens (a timm ViT on the teacher's patch grid)

    def identity(self) -> dict[str, Any]:
        return {"arch": self.arch, "model_kwargs": self.model_kwargs, "origin": self.origin}


MIN_PATCHES = 4  # a ViT student that cuts the image into fewer patches than this sees almost nothing


def _warn_if_coarse(model: nn.Module, arch: str, teacher: Teacher) -> None:
    pe = getattr(model, "patch_embed", None)
    if pe is None or getattr(pe, "grid_size", None) is None:
        return
    gh, gw = pe.grid_size
    ph, pw = pe.patch_size
    C, H, W = teacher.input_size
    if gh * gw < MIN_PATCHES or (gh * ph, gw * pw) != (H, W):
        warnings.warn(f"student {arch} cuts the teacher's {H}x{W} images into {gh}x{gw} patches of {ph}x{pw} "
                      f"(it sees {100 * gh * ph * gw * pw / (H * W):.0f} % of each image as {gh * gw} token(s)); "
                      f"give it a smaller patch, e.g. fmnist_vit_mini (4x4)", SmiWarning, stacklevel=3)


def _token_compatible(model: nn.Module, teacher: Teacher) -> bool:
    try:
        check_sparse_capable(model)
        check_sparse_capable(teacher.model)
    except SmiError:
        return False
    s, t = model.patch_embed, teacher.model.patch_embed
    return tuple(s.patch_size) == tuple(t.patch_size) and tuple(s.grid_size) == tuple(t.grid_size)


def build_student(
    arch: str | None, teacher: Teacher, *, checkpoint: str | None = None, linear_probe: bool = False,
    new_head: bool = False, seed: int = 0, device: torch.device | str = "cpu",
) -> Student:
    """A trainable student for ``teacher``.

    ``arch`` alone: a fresh timm model with the teacher's classes, channels and image size.
    ``checkpoint`` (an smi checkpoint, ``NAME.safetensors`` + ``NAME.json``): its weights; with
    ``linear_probe`` its head is replaced by a new one for the teacher's classes and everything
    else is frozen; with ``new_head`` the head is replaced the same way and every weight trains
    (fine-tuning a backbone trained on other data, whatever its classes).
    """
    require_classifier(teacher, "distillation")
    if checkpoint is not None:
        loaded = load_teacher(checkpoint, device=device)
        if arch is not None and arch != loaded.arch:
            raise SmiError(f"--student {arch} but the checkpoint {checkpoint} holds a {loaded.arch}")
        model, arch = loaded.model, loaded.arch
        kwargs = dict(loaded.extra.get("metadata", {}).get("model_kwargs", {}))
        origin = loaded.fingerprint
        if tuple(loaded.input_size) != tuple(teacher.input_size):
            raise SmiError(f"student checkpoint {checkpoint} reads {tuple(loaded.input_size)} inputs but the "
                           f"teacher reads {tuple(teacher.input_size)}")
        if linear_probe or new_head:
            torch.manual_seed(seed)
            model.reset_classifier(teacher.num_classes)
            kwargs["num_classes"] = teacher.num_classes
        elif loaded.num_classes != teacher.num_classes:
            raise SmiError(f"student checkpoint {checkpoint} has {loaded.num_classes} classes but the teacher has "
                           f"{teacher.num_classes} (use --new-head to fine-tune it with a new head, or "
                           "--linear-probe to train only a new head)")
    else:
        if arch is None:
            raise SmiError("give a student architecture (--student ARCH) or --student-checkpoint")
        for flag, on in (("--linear-probe", linear_probe), ("--new-head", new_head)):
            if on:
                raise SmiError(f"{flag} needs a trained backbone: give --student-checkpoint")
        torch.manual_seed(seed)
        model, kwargs = create_model(arch, teacher.input_size, teacher.num_classes, what="student")
        origin = "scratch"
    model.to(device)
    model.requires_grad_(True)
    check_fits(model, arch, teacher.input_size, teacher.num_classes, what="student")
    _warn_if_coarse(model, arch, teacher)
    if linear_probe:  # a frozen backbone: its BatchNorm layers keep normalizing with their running statistics
        model = freeze_batch_norm_2d(model)
        model.requires_grad_(False)
        model.get_classifier().requires_grad_(True)
    return Student(model, arch, kwargs, origin, _token_compatible(model, teacher))
