"""ACQ's attention centre: where the teacher looks, as a point in the image, and a loss that puts it there.

For a ViT teacher the attention map is the class token's attention over the patches in the last
block (averaged over heads); for a CNN it is the spatial attention of the last feature map (the
channel mean of the squared activations, Zagoruyko and Komodakis's attention transfer), read at
the input of the global pool. The centre is the attention-weighted mean of the cell centres, in
[0, 1] x [0, 1] (x to the right, y down).
"""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["AttentionMap", "attention_centre"]


def attention_centre(attn: torch.Tensor) -> torch.Tensor:
    """(B, h, w) non-negative maps -> (B, 2) centres (x, y) in [0, 1], the map-weighted mean of the cell centres."""
    B, h, w = attn.shape
    a = attn.flatten(1)
    a = a / a.sum(1, keepdim=True).clamp_min(1e-12)
    ys = (torch.arange(h, device=a.device, dtype=a.dtype) + 0.5) / h
    xs = (torch.arange(w, device=a.device, dtype=a.dtype) + 0.5) / w
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([(a * gx.flatten()).sum(1), (a * gy.flatten()).sum(1)], 1)


class AttentionMap:
    """Forward hooks that record the teacher's attention map (B, h, w) during a forward pass (``with``)."""

    def __init__(self, model: nn.Module) -> None:
        self.model, self.map, self._handles = model, None, []
        blocks = getattr(model, "blocks", None)
        self.vit = blocks is not None and hasattr(getattr(blocks[-1], "attn", None), "qkv")
        if not self.vit and not isinstance(getattr(model, "global_pool", None), nn.Module):
            from smi.errors import SmiError

            raise SmiError(f"the attention centre needs a timm ViT or a timm CNN with a global_pool; "
                           f"{type(model).__name__} is neither")

    def __enter__(self) -> AttentionMap:
        if self.vit:
            attn = self.model.blocks[-1].attn
            self._fused = attn.fused_attn
            attn.fused_attn = False  # the explicit path runs the softmax through attn_drop, where it is read
            grid = self.model.patch_embed.grid_size
            prefix = self.model.num_prefix_tokens

            def vit_hook(_m, _i, out):  # noqa: ANN001
                self.map = out.mean(1)[:, 0, prefix:].reshape(len(out), *grid)

            self._handles.append(attn.attn_drop.register_forward_hook(vit_hook))
        else:
            def cnn_hook(_m, inp):  # noqa: ANN001
                self.map = inp[0].pow(2).mean(1)

            self._handles.append(self.model.global_pool.register_forward_pre_hook(cnn_hook))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self.vit:
            self.model.blocks[-1].attn.fused_attn = self._fused
