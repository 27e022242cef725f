"""Inverting a segmenter: per-pixel target maps instead of one class per image.

A segmenter (``task == "segmentation"``, e.g. :class:`~smi.models.teachers.TokenSegmenter`) labels
every pixel, so an image is synthesized toward a *map*. Each map starts as a random object-shaped
blob of the image's planned foreground class on background (class 0): an ellipse of random centre,
aspect and angle, its outline wobbled by low-frequency noise, covering ``seg_area_low`` to
``seg_area_high`` of the frame (fmnist-scenes objects cover about a quarter).

With ``seg_evolve`` on (DFQ-SAM's pseudo-positive label evolution, the ``dfq-sam`` method), the
maps then follow the segmenter: from ``seg_evolve_start`` of the iterations on, every
``seg_evolve_every`` steps each pixel the segmenter labels with probability at least
``seg_confidence`` takes that label, and the others keep theirs. The blob is only a seed; the
object's outline becomes one the segmenter itself draws confidently, as the images improve. An
evolution that would leave an image less than half of ``seg_area_low`` of foreground is not applied
to it (the object must not vanish).

Sparse inversion ranks a segmenter's patches by their share of foreground in the target map (ties
broken by the segmenter's own foreground probability): the background is what stops first, and
under evolution the map already holds what the segmenter confidently calls object. Class-token
attention ranks nothing here, because a segmenter's head never reads the class token.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from smi.errors import SmiError
from smi.inversion.augment import Jitter, apply_jitter
from smi.models.sparse import patchify

__all__ = ["SEGMENTATION_OPTIONS", "TargetMaps", "blob_maps", "is_segmenter", "planned_classes"]

SEGMENTATION_OPTIONS: dict[str, float] = {
    "seg_area_low": 0.1,  # blob area, fraction of the image: lowest
    "seg_area_high": 0.4,  # ... and highest
    "seg_evolve": 0.0,  # 1: pseudo-positive label evolution (dfq-sam); 0: the blobs stay fixed
    "seg_evolve_start": 0.25,  # fraction of the iterations before the first evolution
    "seg_evolve_every": 25,  # steps between evolutions
    "seg_confidence": 0.9,  # a pixel takes the segmenter's label when it is at least this sure
}


def is_segmenter(model: torch.nn.Module) -> bool:
    return getattr(model, "task", "classification") == "segmentation"


def planned_classes(num_images: int, num_classes: int, seed: int) -> torch.Tensor:
    """Each image's foreground class, balanced over classes 1 .. num_classes - 1 (0 is the background)."""
    from smi.inversion.synthesis import plan_targets

    if num_classes < 2:
        raise SmiError(f"a segmenter needs a background and at least one object class, got {num_classes} classes")
    return 1 + plan_targets(num_images, num_classes - 1, seed)


def blob_maps(targets: torch.Tensor, size: tuple[int, int], generator: torch.Generator,
              area: tuple[float, float] = (0.1, 0.4)) -> torch.Tensor:
    """(B,) foreground classes -> (B, H, W) int64 maps: one wobbly ellipse of the class on background 0."""
    B, (H, W) = targets.shape[0], size
    lo, hi = area
    u = torch.rand(B, 5, generator=generator)
    frac = lo + (hi - lo) * u[:, 0]
    aspect = torch.exp(u[:, 1] - 0.5)  # axis ratio in [e^-0.5, e^0.5]
    theta = math.pi * u[:, 2]
    ra = torch.sqrt(frac * H * W / math.pi * aspect)  # semi-axes in pixels: pi * ra * rb = frac * H * W
    rb = torch.sqrt(frac * H * W / math.pi / aspect)
    reach = torch.maximum(ra, rb).clamp(max=min(H, W) / 2)  # centre far enough in that the blob mostly fits
    cy = reach + (H - 2 * reach) * u[:, 3]
    cx = reach + (W - 2 * reach) * u[:, 4]
    phase = 2 * math.pi * torch.rand(B, 3, generator=generator)
    amp = 0.12 * torch.rand(B, 3, generator=generator)
    y, x = torch.meshgrid(torch.arange(H) + 0.5, torch.arange(W) + 0.5, indexing="ij")
    dy, dx = y[None] - cy[:, None, None], x[None] - cx[:, None, None]
    c, s = torch.cos(theta)[:, None, None], torch.sin(theta)[:, None, None]
    a, b = dx * c + dy * s, -dx * s + dy * c  # in the ellipse's own axes
    rho = torch.sqrt((a / ra[:, None, None]) ** 2 + (b / rb[:, None, None]) ** 2)
    angle = torch.atan2(b, a)
    wobble = 1 + sum(amp[:, k, None, None] * torch.sin((k + 2) * angle + phase[:, k, None, None]) for k in range(3))
    inside = rho < wobble
    return torch.where(inside, targets[:, None, None], torch.zeros((), dtype=torch.long))


def _unjitter(x: torch.Tensor, j: Jitter) -> torch.Tensor:
    """The inverse of :func:`~smi.inversion.augment.apply_jitter`: a view back in the canonical frame."""
    if j.flip:
        x = x.flip(3)
    return torch.roll(x, shifts=(-j.dy, -j.dx), dims=(2, 3)) if (j.dy or j.dx) else x


class TargetMaps:
    """The per-pixel targets of one batch, kept in the canonical (un-jittered) frame."""

    def __init__(self, targets: torch.Tensor, num_classes: int, size: tuple[int, int], generator: torch.Generator,
                 option, iterations: int) -> None:
        self.num_classes = num_classes
        self.area = (option("seg_area_low"), option("seg_area_high"))
        self.maps = blob_maps(targets, size, generator, self.area)  # (B, H, W)
        self.evolve_on = option("seg_evolve") > 0
        self.start = math.ceil(option("seg_evolve_start") * iterations)
        self.every = max(1, int(option("seg_evolve_every")))
        self.confidence = option("seg_confidence")
        self.step = 0

    def _view(self, j: Jitter, device: torch.device) -> torch.Tensor:
        return apply_jitter(self.maps[:, None].to(device), j)[:, 0]  # (B, H, W) in the view's frame

    def per_image(self, logits: torch.Tensor, pixel_mask: torch.Tensor | None, j: Jitter | None = None
                  ) -> torch.Tensor:
        """(B,) cross-entropy per pixel of ``logits`` (B, C, H, W) against the maps, averaged over the optimized
        pixels (``pixel_mask`` (B, 1, H, W), canonical frame; None: all); ``j``: how ``logits``' view was made."""
        j = j or Jitter(0, 0, False)
        ce = F.cross_entropy(logits, self._view(j, logits.device), reduction="none")  # (B, H, W)
        if pixel_mask is None:
            return ce.flatten(1).mean(1)
        m = apply_jitter(pixel_mask.to(ce.dtype), j)[:, 0]
        return (ce * m).flatten(1).sum(1) / m.flatten(1).sum(1).clamp(min=1)

    def loss(self, logits: torch.Tensor, pixel_mask: torch.Tensor | None, j: Jitter) -> torch.Tensor:
        """The batch's mean per-pixel cross-entropy for one step; evolves the maps on schedule (from this step's
        prediction, before the loss reads them)."""
        self.step += 1
        if self.evolve_on and self.step >= self.start and (self.step - self.start) % self.every == 0:
            self.evolve(_unjitter(logits.detach(), j), pixel_mask)
        return self.per_image(logits, pixel_mask, j).mean()

    @torch.no_grad()
    def evolve(self, logits: torch.Tensor, pixel_mask: torch.Tensor | None) -> None:
        """Confident pixels (canonical frame, optimized ones only) take the segmenter's label."""
        prob, label = F.softmax(logits.float(), dim=1).max(dim=1)  # (B, H, W)
        sure = prob >= self.confidence
        if pixel_mask is not None:
            sure &= pixel_mask[:, 0].bool()
        new = torch.where(sure.cpu(), label.cpu(), self.maps)
        enough = (new > 0).flatten(1).float().mean(1) >= self.area[0] / 2
        self.maps = torch.where(enough[:, None, None], new, self.maps)

    @torch.no_grad()
    def importance(self, logits: torch.Tensor, j: Jitter, idx_view: torch.Tensor, patch: int) -> torch.Tensor:
        """(B, K) each kept token's patch's share of foreground in the target map (which has already taken the
        segmenter's confident labels, under evolution), ties broken by the segmenter's own foreground
        probability; in ``idx_view``'s order."""
        fg_target = (self._view(j, logits.device) > 0).float()[:, None]  # (B, 1, H, W)
        fg_pred = 1 - F.softmax(logits.float(), dim=1)[:, :1]
        score = patchify(fg_target + 0.01 * fg_pred, patch).flatten(2).mean(2)  # (B, N)
        return score.gather(1, idx_view)
