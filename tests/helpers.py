"""Tiny checkpoints for CLI and loading tests."""

from __future__ import annotations

from pathlib import Path

import timm
import torch

from smi.models.loading import save_teacher

TINY_KWARGS = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)


def write_tiny_checkpoint(folder: Path, name: str = "tiny", seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = timm.create_model("vit_tiny_patch16_224", num_classes=5, **TINY_KWARGS).eval()
    return save_teacher(model, folder / f"{name}.safetensors", arch="vit_tiny_patch16_224", model_kwargs=TINY_KWARGS,
                        class_names=["a", "b", "c", "d", "e"])
