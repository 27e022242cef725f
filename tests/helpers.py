"""Tiny checkpoints for CLI and loading tests."""

from __future__ import annotations

import json
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


def write_tiny_pipeline(folder: Path) -> Path:
    """A Stable Diffusion pipeline with random weights, a few thousand parameters, saved as safetensors."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "!": 2}
    for c in "abcdefghijklmnopqrstuvwxyz-'/":  # characters only: every word is spelt out, no merges
        vocab[c], vocab[c + "</w>"] = len(vocab), len(vocab) + 1
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=24)
    torch.manual_seed(0)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=24,
                                        projection_dim=16, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(8, 16), norm_num_groups=4, cross_attention_dim=16,
                                attention_head_dim=2, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    vae = AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDIMScheduler(steps_offset=1, clip_sample=False), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(folder / "pipe", safe_serialization=True)
    return folder / "pipe"
