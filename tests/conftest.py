from __future__ import annotations

import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer

from smi.models.loading import Teacher


def tiny_vit(**kwargs) -> VisionTransformer:
    """A 2-block ViT on 32x32 images with 8x8 patches (16 tokens); random init."""
    args = dict(img_size=32, patch_size=8, in_chans=3, num_classes=5, embed_dim=32, depth=2, num_heads=2)
    args.update(kwargs)
    torch.manual_seed(0)
    return VisionTransformer(**args).eval()


def as_teacher(model: torch.nn.Module, spec: str = "tiny") -> Teacher:
    model.eval().requires_grad_(False)
    cfg = timm.data.resolve_model_data_config(model)
    C = model.patch_embed.proj.in_channels if hasattr(model, "patch_embed") else 3
    H, W = model.patch_embed.img_size if hasattr(model, "patch_embed") else (32, 32)
    return Teacher(model=model, spec=spec, arch=spec, num_classes=model.num_classes, input_size=(C, H, W),
                   mean=tuple(cfg["mean"])[:C], std=tuple(cfg["std"])[:C], fingerprint=f"test:{spec}")


@pytest.fixture
def tiny_teacher() -> Teacher:
    return as_teacher(tiny_vit())
