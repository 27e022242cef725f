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


def write_image_folder(root: Path, classes: int = 3, per_class: int = 5, size: tuple[int, int] = (20, 24),
                       mode: str = "RGB", split: bool = False, seed: int = 0) -> Path:
    """A small image-folder dataset of random PNGs whose class is visible (its mean brightness).

    ``split``: ``root/train`` and ``root/val`` (one image per class there); else one class folder each.
    """
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    channels = 1 if mode == "L" else 3
    layout = {"train": per_class, "val": 1} if split else {"": per_class}
    for part, n in layout.items():
        for c in range(classes):
            folder = root / part / f"class_{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                base = 40 + 170 * c / max(1, classes - 1)
                arr = np.clip(rng.normal(base, 25, (*size, channels)), 0, 255).astype(np.uint8)
                Image.fromarray(arr[..., 0] if channels == 1 else arr, mode).save(folder / f"{i}.png")
    return root
