"""The conditional generator of GDFQ (ECCV 2020), the base of the generator family (Qimera, AKT, ...).

A class embedding multiplies the noise; a linear layer maps the product to a ``width`` x H/4 x W/4
map, and two nearest-neighbour upsamplings, each followed by conv 3x3 -> BatchNorm -> LeakyReLU(0.2),
bring it to the teacher's size; a last conv 3x3 -> tanh -> BatchNorm without affine parameters
gives images in the teacher's normalized input space (zero mean, unit variance per channel, as
normalized real images roughly are). GDFQ's BatchNorm layers after the convolutions use eps 0.8,
a value inherited from the DCGAN code it builds on; kept here.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from smi.errors import SmiError

__all__ = ["ConditionalGenerator"]


class ConditionalGenerator(nn.Module):
    """``G(z, y)``: noise ``z`` (B, latent_dim) and labels ``y`` -> images (B, C, H, W).

    ``y`` is either class indices (B,) or class weights (B, num_classes) whose rows sum to one; a
    weight row mixes the class embeddings (Qimera's superposed embeddings), so ``G(z, one_hot(y))``
    equals ``G(z, y)``.
    """

    def __init__(self, num_classes: int, input_size: tuple[int, int, int], latent_dim: int = 100,
                 width: int = 128) -> None:
        super().__init__()
        C, H, W = input_size
        if H % 4 or W % 4:
            raise SmiError(f"the generator upsamples twice by 2, so the image side must be a multiple of 4; the "
                           f"teacher reads {H}x{W}")
        if num_classes < 2 or latent_dim < 1 or width < 2:
            raise SmiError(f"needs at least 2 classes, a positive latent size and width >= 2 (got {num_classes}, "
                           f"{latent_dim}, {width})")
        self.num_classes, self.input_size = num_classes, (C, H, W)
        self.latent_dim, self.width = latent_dim, width
        self.embed = nn.Embedding(num_classes, latent_dim)
        self.fc = nn.Linear(latent_dim, width * (H // 4) * (W // 4))
        self.body = nn.Sequential(
            nn.BatchNorm2d(width),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(width, width, 3, padding=1),
            nn.BatchNorm2d(width, eps=0.8),
            nn.LeakyReLU(0.2),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(width, width // 2, 3, padding=1),
            nn.BatchNorm2d(width // 2, eps=0.8),
            nn.LeakyReLU(0.2),
            nn.Conv2d(width // 2, C, 3, padding=1),
            nn.Tanh(),
            nn.BatchNorm2d(C, affine=False),
        )

    def embedding(self, y: torch.Tensor) -> torch.Tensor:
        """The class embedding of labels (B,) or the weighted mixture of embeddings for weights (B, classes)."""
        return self.embed(y) if y.ndim == 1 else y.to(self.embed.weight.dtype) @ self.embed.weight

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        _, H, W = self.input_size
        h = self.fc(self.embedding(y) * z)
        return self.body(h.view(len(z), self.width, H // 4, W // 4))

    def config(self) -> dict[str, object]:
        """What rebuilds this generator (saved beside its weights)."""
        return {"num_classes": self.num_classes, "input_size": list(self.input_size), "latent_dim": self.latent_dim,
                "width": self.width}
