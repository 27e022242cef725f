"""Conditional generators: GDFQ's (ECCV 2020), the base of the family, and Qimera's (NeurIPS 2021).

A class embedding multiplies the noise; a linear layer maps the product to a ``width`` x H/4 x W/4
map, and two nearest-neighbour upsamplings, each followed by conv 3x3 -> BatchNorm -> LeakyReLU(0.2),
bring it to the teacher's size; a last conv 3x3 -> tanh -> BatchNorm without affine parameters
gives images in the teacher's normalized input space (zero mean, unit variance per channel, as
normalized real images roughly are). GDFQ's BatchNorm layers after the convolutions use eps 0.8,
a value inherited from the DCGAN code it builds on; kept here. With ``pixel_range`` the last
BatchNorm is replaced by an affine map of tanh onto the teacher's valid pixel range (the normalized
values of pixels 0 and 1, per channel), so that every generated image is one a camera could give:
the BatchNorm output is unbounded (Fashion-MNIST generators put a fifth of their pixels below black).

Qimera changes only how the class reaches that decoder (:class:`QimeraGenerator`). Each kind is one
class registered in :data:`GENERATORS`; ``smi train-generator --kind NAME`` reads the registry.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from smi.errors import SmiError
from smi.registry import Registry

__all__ = ["GENERATORS", "ACQGenerator", "CausalGenerator", "ConditionalGenerator", "QimeraGenerator", "TexQGenerator"]

GENERATORS: Registry[type[ConditionalGenerator]] = Registry("generator")


class PixelRange(nn.Module):
    """tanh's (-1, 1) mapped affinely onto per-channel bounds ``lo``..``hi`` (the normalized pixels 0 and 1)."""

    def __init__(self, lo: list[float], hi: list[float]) -> None:
        super().__init__()
        if len(lo) != len(hi) or not all(a < b for a, b in zip(lo, hi, strict=True)):
            raise SmiError(f"pixel range: need lo < hi per channel, got {lo} and {hi}")
        self.register_buffer("lo", torch.tensor(lo).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("hi", torch.tensor(hi).view(1, -1, 1, 1), persistent=False)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.lo + (self.hi - self.lo) * (t + 1) / 2


class ConditionalGenerator(nn.Module):
    """GDFQ: the class embedding times the noise, decoded by upsampling convolutions (ECCV 2020).

    ``G(z, y)``: noise ``z`` (B, latent_dim) and labels ``y`` -> images (B, C, H, W).

    ``y`` is either class indices (B,) or class weights (B, num_classes) whose rows sum to one; a
    weight row mixes the class embeddings (Qimera's superposed embeddings), so ``G(z, one_hot(y))``
    equals ``G(z, y)``. ``pixel_range`` ((lo, hi), one value per channel): images bounded to it
    (:class:`PixelRange`) instead of GDFQ's last BatchNorm.
    """

    def __init__(self, num_classes: int, input_size: tuple[int, int, int], latent_dim: int = 100,
                 width: int = 128, code_dim: int | None = None,
                 pixel_range: tuple[list[float], list[float]] | None = None) -> None:
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
        self.fc = nn.Linear(code_dim or latent_dim, width * (H // 4) * (W // 4))
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
            nn.BatchNorm2d(C, affine=False) if pixel_range is None else PixelRange(*pixel_range),
        )
        self.pixel_range = None if pixel_range is None else ([float(v) for v in pixel_range[0]],
                                                             [float(v) for v in pixel_range[1]])
        if self.pixel_range is not None and len(self.pixel_range[0]) != C:
            raise SmiError(f"pixel range: {len(self.pixel_range[0])} channels for a {C}-channel image")

    def embedding(self, y: torch.Tensor) -> torch.Tensor:
        """The class embedding of labels (B,) or the weighted mixture of embeddings for weights (B, classes)."""
        return self.embed(y) if y.ndim == 1 else y.to(self.embed.weight.dtype) @ self.embed.weight

    def code(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """What the decoder reads for noise ``z`` and labels (or class weights) ``y``: GDFQ's embedding x noise."""
        return self.embedding(y) * z

    paired = False  # True: batches laid out by training_batch hold pairs (i, i + B/2) of one condition

    def training_batch(self, z: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """How a training batch is laid out (ACQ pairs images of one condition); the drawn batch as it is here."""
        return z, y

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        _, H, W = self.input_size
        h = self.fc(self.code(z, y))
        return self.body(h.view(len(z), self.width, H // 4, W // 4))

    def config(self) -> dict[str, object]:
        """What rebuilds this generator (saved beside its weights): ``GENERATORS.get(kind)(**rest)``."""
        out: dict[str, object] = {"kind": "gdfq", "num_classes": self.num_classes, "input_size": list(self.input_size),
                                  "latent_dim": self.latent_dim, "width": self.width}
        if self.pixel_range is not None:  # absent otherwise: generators saved before it existed still match
            out["pixel_range"] = [list(self.pixel_range[0]), list(self.pixel_range[1])]
        return out


GENERATORS.register("gdfq")(ConditionalGenerator)


@GENERATORS.register("qimera")
class QimeraGenerator(ConditionalGenerator):
    """Qimera: class embeddings (initialized from the teacher's classifier weights) plus noise, normalized over the
    batch and mapped by a linear disentanglement layer; superposed samples mix the mapped codes (NeurIPS 2021).

    For class weights ``y`` (B, classes), each class with a non-zero weight gets its own code
    ``mapping(normalize(embed[c] + z))`` and the decoder reads their weighted sum: the mixing
    happens after the mapping layer, which learns to place mixtures between the classes. The
    normalization uses the statistics of the batch, in training and sampling alike (no running
    statistics, as in Qimera), so an image depends on the other codes of its batch.
    """

    def __init__(self, num_classes: int, input_size: tuple[int, int, int], latent_dim: int = 100,
                 width: int = 128, mapped_dim: int = 100,
                 pixel_range: tuple[list[float], list[float]] | None = None) -> None:
        super().__init__(num_classes, input_size, latent_dim, width, code_dim=mapped_dim, pixel_range=pixel_range)
        self.mapped_dim = mapped_dim
        self.normalize = nn.BatchNorm1d(latent_dim, affine=False, track_running_stats=False)
        self.mapping = nn.Linear(latent_dim, mapped_dim)

    def code(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if y.ndim == 1:
            return self.mapping(self.normalize(self.embed(y) + z))
        k = int((y > 0).sum(1).max())
        weights, classes = y.topk(k, dim=1)  # (B, k): every class with a non-zero weight
        e = (self.embed(classes) + z[:, None]).flatten(0, 1)  # (B * k, latent)
        h = self.mapping(self.normalize(e)).view(len(z), k, -1)
        return (weights[..., None].to(h.dtype) * h).sum(1)

    def config(self) -> dict[str, object]:
        return {**super().config(), "kind": "qimera", "mapped_dim": self.mapped_dim}


@GENERATORS.register("texq")
class TexQGenerator(ConditionalGenerator):
    """TexQ: GDFQ's generator pulled toward per-class texture calibration centres (Laws' texture energy of
    calibration images; needs --texture-pool) (NeurIPS 2023)."""

    def config(self) -> dict[str, object]:
        return {**super().config(), "kind": "texq"}


@GENERATORS.register("acq")
class ACQGenerator(ConditionalGenerator):
    """ACQ: GDFQ's generator also conditioned on where the teacher should look, with an attention-centre matching
    loss and a mode-seeking loss between images of one condition (for ViTs: the class token's attention)."""

    def __init__(self, num_classes: int, input_size: tuple[int, int, int], latent_dim: int = 100,
                 width: int = 128, pixel_range: tuple[list[float], list[float]] | None = None) -> None:
        if latent_dim < 3:
            raise SmiError(f"acq reads its attention centre from 2 noise dimensions: latent_dim must be >= 3, "
                           f"got {latent_dim}")
        super().__init__(num_classes, input_size, latent_dim, width, pixel_range=pixel_range)
        self.centre = nn.Linear(2, latent_dim)

    @staticmethod
    def condition(z: torch.Tensor) -> torch.Tensor:
        """The attention centre (x, y) in [0, 1] that noise ``z`` asks for: the normal CDF of its first two values,
        so that centres are uniform over the image."""
        return 0.5 * (1 + torch.erf(z[:, :2] / 2**0.5))

    def code(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return super().code(z, y) + self.centre(self.condition(z) * 2 - 1)

    def training_batch(self, z: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The second half of the batch repeats the first half's conditions (class and centre) with other noise."""
        h = len(z) // 2
        z, y = z.clone(), y.clone()
        z[h:2 * h, :2] = z[:h, :2]
        y[h:2 * h] = y[:h]
        return z, y

    def config(self) -> dict[str, object]:
        return {**super().config(), "kind": "acq"}


@GENERATORS.register("causal")
class CausalGenerator(ConditionalGenerator):
    """Causal-DFQ: content (the class embedding) and style (the noise) enter apart; images of one class under two
    styles must get one prediction, from the teacher (generator) and the quantized model (ICCV 2023)."""

    paired = True  # training batches and draws come as style interventions: image i + B/2 is image i restyled

    def __init__(self, num_classes: int, input_size: tuple[int, int, int], latent_dim: int = 100,
                 width: int = 128, pixel_range: tuple[list[float], list[float]] | None = None) -> None:
        super().__init__(num_classes, input_size, latent_dim, width, code_dim=2 * latent_dim, pixel_range=pixel_range)

    def code(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.embedding(y), z], 1)

    def training_batch(self, z: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The second half of the batch is the first half's content (class) under new styles (its own noise)."""
        h = len(z) // 2
        y = y.clone()
        y[h:2 * h] = y[:h]
        return z, y

    def config(self) -> dict[str, object]:
        return {**super().config(), "kind": "causal"}
