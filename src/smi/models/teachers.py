"""Teachers that smi trains on Fashion-MNIST and ships, registered with timm.

They are plain timm ``VisionTransformer`` instances (class token, pre-LayerNorm blocks, GELU
MLP); the only difference from DeiT is the patch embedding, a two-layer convolutional stem
applied to each 4x4 patch on its own, so every token still sees only its own patch. Once
``smi`` is imported they load like any timm model::

    >>> import smi, timm
    >>> model = timm.create_model("fmnist_vit_tiny", pretrained=True)  # weights ship in the wheel
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from timm.layers import PatchEmbed
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.resnet import BasicBlock, ResNet
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

from smi.data.fashion_mnist import FMNIST_CLASSES, FMNIST_MEAN, FMNIST_STD
from smi.data.scenes import SCENES_MEAN, SCENES_STD, SEGMENT_CLASSES

__all__ = ["PatchStem", "SEGMENTERS", "SHIPPED_CNN_TEACHERS", "SHIPPED_TEACHERS", "STUDENT_ARCHS", "TokenSegmenter",
           "WEIGHTS_DIR"]

WEIGHTS_DIR = Path(__file__).parent / "weights"


class PatchStem(PatchEmbed):
    """Patch embedding by a small conv network that never looks across patch borders.

    ``proj`` is conv(k=p/2, stride p/2) -> GELU -> conv(k=2, stride 2): kernel and stride are
    equal in both layers, so output token (i, j) is a function of input patch (i, j) only. That
    keeps token-sparse embedding exact: ``proj`` applied to a lone p x p patch gives its token.
    """

    def __init__(self, img_size: Any = 28, patch_size: int = 4, in_chans: int = 1, embed_dim: int = 128,
                 bias: bool = True, **kwargs: Any) -> None:
        super().__init__(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
                         bias=bias, **kwargs)
        p = self.patch_size[0]
        if p % 2 or self.patch_size[0] != self.patch_size[1]:
            raise ValueError(f"PatchStem needs an even, square patch size, got {self.patch_size}")
        hidden = embed_dim // 2
        self.proj = nn.Sequential(
            nn.Conv2d(in_chans, hidden, kernel_size=p // 2, stride=p // 2),
            nn.GELU(),
            nn.Conv2d(hidden, embed_dim, kernel_size=2, stride=2, bias=bias),
        )


class TokenSegmenter(VisionTransformer):
    """A ViT that labels every pixel: each patch token's own linear head gives its patch's pixel logits.

    The decoder is one ``Linear(embed_dim, num_classes * p * p)`` applied to every patch token
    (the class token is read by attention only), its outputs laid back out as the patch's pixels
    (SETR's and Segmenter's linear decoder, with pixel shuffle in place of bilinear upsampling).
    So a pixel's logits depend on its own token alone after the blocks, as a classifier's depend on
    the class token: a token left out of a sparse forward pass leaves its patch unlabelled and
    nothing else. ``forward`` returns ``(B, num_classes, H, W)``.
    """

    task = "segmentation"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        p = self.patch_embed.patch_size
        self.head = nn.Linear(self.embed_dim, self.num_classes * p[0] * p[1])

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False, keep: torch.Tensor | None = None
                     ) -> torch.Tensor:
        """``x``: (B, P + K, D) block outputs; ``keep``: (B, K) the patch of each token (None: all, in order).

        Returns (B, num_classes, H, W); the pixels of patches without a token (a sparse forward pass)
        get zero logits, which no loss should read (they are outside the kept-pixel mask).
        """
        x = self.head_drop(x[:, self.num_prefix_tokens:])
        if pre_logits:
            return x
        (h, w), (p, q) = self.patch_embed.grid_size, self.patch_embed.patch_size
        B, K = x.shape[:2]
        x = self.head(x)  # (B, K, num_classes * p * q)
        if keep is not None:
            x = x.new_zeros(B, h * w, x.shape[-1]).scatter(1, keep[:, :, None].expand(-1, -1, x.shape[-1]), x)
        x = x.view(B, h, w, self.num_classes, p, q)
        return x.permute(0, 3, 1, 4, 2, 5).reshape(B, self.num_classes, h * p, w * q)


def _cfg(name: str, **kwargs: Any) -> dict[str, Any]:
    return {
        "file": str(WEIGHTS_DIR / f"{name}.safetensors"),  # local file: pretrained=True never downloads
        "num_classes": 10,
        "input_size": (1, 28, 28),
        "mean": FMNIST_MEAN,
        "std": FMNIST_STD,
        "crop_pct": 1.0,
        "crop_mode": "center",
        "interpolation": "bilinear",
        "first_conv": "patch_embed.proj.0",
        "classifier": "head",
        "label_names": FMNIST_CLASSES,
        "license": "apache-2.0",
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    "fmnist_vit_tiny": _cfg("fmnist_vit_tiny"),
    "fmnist_vit_mini": _cfg("fmnist_vit_mini", file=None),  # a student architecture: no shipped weights
    "fmnist_resnet_tiny": _cfg("fmnist_resnet_tiny", first_conv="conv1", classifier="fc"),
    "fmnist_scene_vit": _cfg("fmnist_scene_vit", input_size=(1, 56, 56), mean=SCENES_MEAN, std=SCENES_STD),
    "fmnist_scene_segmenter": _cfg("fmnist_scene_segmenter", input_size=(1, 56, 56), mean=SCENES_MEAN,
                                   std=SCENES_STD, num_classes=2, label_names=SEGMENT_CLASSES),
})

# architecture kwargs of each shipped teacher; also written into its metadata JSON
SHIPPED_TEACHERS: dict[str, dict[str, Any]] = {
    "fmnist_vit_tiny": dict(
        img_size=28, patch_size=4, in_chans=1, num_classes=10,
        embed_dim=128, depth=4, num_heads=4, mlp_ratio=4.0,
    ),
    # fmnist-scenes at DeiT's token grid: 14 x 14 patches of 4 x 4 on 56 x 56 (196 tokens); half
    # DeiT-Tiny's width, so that a training run fits in about two hours on two CPU cores
    "fmnist_scene_vit": dict(
        img_size=56, patch_size=4, in_chans=1, num_classes=10,
        embed_dim=96, depth=4, num_heads=3, mlp_ratio=4.0,
    ),
}  # fmt: skip

# the CNN teacher (BatchNorm, so inversion adds DeepInversion's batch-norm prior); timm ResNet kwargs
SHIPPED_CNN_TEACHERS: dict[str, dict[str, Any]] = {
    "fmnist_resnet_tiny": dict(
        layers=(1, 1, 1, 1), channels=(32, 64, 128, 256), stem_width=32, in_chans=1, num_classes=10,
    ),
}  # fmt: skip

# segmenters (TokenSegmenter: a label per pixel); shipped like the teachers above
SEGMENTERS: dict[str, dict[str, Any]] = {
    # fmnist-scenes object vs background, on the scene classifier's backbone shape
    "fmnist_scene_segmenter": dict(
        img_size=56, patch_size=4, in_chans=1, num_classes=2,
        embed_dim=96, depth=4, num_heads=3, mlp_ratio=4.0,
    ),
}  # fmt: skip

# student architectures (same input, patches and stem; no shipped weights)
STUDENT_ARCHS: dict[str, dict[str, Any]] = {
    "fmnist_vit_mini": dict(
        img_size=28, patch_size=4, in_chans=1, num_classes=10,
        embed_dim=64, depth=4, num_heads=2, mlp_ratio=4.0,
    ),
}  # fmt: skip


def _create(variant: str, pretrained: bool, cls: type[VisionTransformer] = VisionTransformer,
            **kwargs: Any) -> VisionTransformer:
    model_args = {**{**SHIPPED_TEACHERS, **SEGMENTERS, **STUDENT_ARCHS}[variant], "embed_layer": PatchStem, **kwargs}
    return build_model_with_cfg(cls, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn, **model_args)


@register_model
def fmnist_vit_tiny(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """DeiT-style ViT for 28x28 Fashion-MNIST: 49 patches of 4x4, 4 blocks, width 128, 4 heads."""
    return _create("fmnist_vit_tiny", pretrained, **kwargs)


@register_model
def fmnist_vit_mini(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """Student for the Fashion-MNIST teachers: 4 blocks of width 64, 2 heads (0.21 M parameters, 4x fewer)."""
    return _create("fmnist_vit_mini", pretrained, **kwargs)


@register_model
def fmnist_scene_vit(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """DeiT-style ViT for 56x56 fmnist-scenes: 196 patches of 4x4 (DeiT's 14x14 grid), 4 blocks, width 96, 3 heads."""
    return _create("fmnist_scene_vit", pretrained, **kwargs)


@register_model
def fmnist_scene_segmenter(pretrained: bool = False, **kwargs: Any) -> TokenSegmenter:
    """Object-vs-background segmenter for fmnist-scenes: fmnist_scene_vit's shape with a per-token pixel head."""
    return _create("fmnist_scene_segmenter", pretrained, TokenSegmenter, **kwargs)


@register_model
def fmnist_resnet_tiny(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """ResNet for 28x28 Fashion-MNIST: one BasicBlock per stage, widths 32-256, BatchNorm (1.2 M parameters)."""
    args = {**SHIPPED_CNN_TEACHERS["fmnist_resnet_tiny"], "block": BasicBlock, **kwargs}
    return build_model_with_cfg(ResNet, "fmnist_resnet_tiny", pretrained, **args)
