"""Token-sparse forward for timm Vision Transformers.

Only the kept patches are embedded and pass through the blocks; everything else is timm's own
submodules (``patch_embed.proj``/``norm``, ``pos_embed``, prefix tokens, ``blocks``, ``norm``,
``forward_head``). Attention weights are read from one block only, through
:class:`AttentionCapture`, which switches that block to timm's unfused path for the duration of a
``with`` and restores it afterwards; every other block keeps the fused kernel.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Attention, PatchEmbed
from timm.models import checkpoint_seq
from timm.models.vision_transformer import VisionTransformer

from smi.errors import SmiError

__all__ = [
    "AttentionCapture", "SparseOutput", "check_sparse_capable", "grid_size", "mask_to_indices", "narrow_keep",
    "patchify", "rank_patches", "sparse_forward",
]  # fmt: skip


class SparseOutput(NamedTuple):
    logits: torch.Tensor  # (B, num_classes); a segmenter's (B, num_classes, H, W), zero outside the kept patches
    importance: torch.Tensor | None  # (B, K), same order as the kept indices; None unless requested


def check_sparse_capable(model: nn.Module) -> VisionTransformer:
    """Return ``model`` if the token-sparse forward supports it, else raise one clear error."""
    if not isinstance(model, VisionTransformer):
        raise SmiError(
            f"sparse inversion needs a timm VisionTransformer (ViT/DeiT family); {type(model).__name__} "
            "is not one; use --sparsity dense for this model"
        )
    pe = model.patch_embed
    proj = getattr(pe, "proj", None)
    per_patch = isinstance(pe, PatchEmbed) and (
        not isinstance(proj, nn.Conv2d) or (tuple(proj.kernel_size) == tuple(proj.stride) == tuple(pe.patch_size)))
    if not per_patch:
        raise SmiError(f"sparse inversion needs a patch embedding that reads each patch on its own; "
                       f"{type(model).__name__}'s {type(pe).__name__} (a CNN stem or overlapping patches) mixes "
                       "neighbouring patches; use --sparsity dense for this model")
    for i, blk in enumerate(model.blocks):
        if not _is_timm_attention(getattr(blk, "attn", None)):
            raise SmiError(f"block {i} of {type(model).__name__} has no timm Attention module; use --sparsity dense")
    return model


def _is_timm_attention(m: nn.Module | None) -> bool:
    """timm's Attention, or a wrapper with its interface (qkv, heads, attn_drop, fused_attn flag)."""
    return isinstance(m, Attention) or all(hasattr(m, a) for a in ("qkv", "num_heads", "attn_drop", "fused_attn"))


def grid_size(model: nn.Module) -> tuple[int, int]:
    return tuple(model.patch_embed.grid_size)  # type: ignore[return-value]


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, C, p, p), patches in row-major grid order (timm's token order)."""
    B, C, H, W = images.shape
    x = images.reshape(B, C, H // patch, patch, W // patch, patch)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(B, (H // patch) * (W // patch), C, patch, patch)


def mask_to_indices(mask: torch.Tensor) -> torch.Tensor:
    """Bool mask (B, N) with the same count per row -> sorted kept indices (B, K)."""
    counts = mask.sum(1)
    if not torch.all(counts == counts[0]):
        raise SmiError("every image in a batch must keep the same number of patches")
    return mask.nonzero()[:, 1].view(mask.shape[0], int(counts[0]))


class AttentionCapture:
    """Scope that records the softmax attention of one timm ``Attention`` module.

    >>> with AttentionCapture(model.blocks[-1].attn) as cap:
    ...     model(x)
    >>> cap.attn.shape  # (B, heads, N, N)
    """

    def __init__(self, attn: Attention) -> None:
        self.module = attn
        self.attn: torch.Tensor | None = None

    def _hook(self, _m: nn.Module, _inp: tuple, out: torch.Tensor) -> None:
        self.attn = out  # attn_drop's output: softmax(q k^T * scale), after dropout (identity in eval)

    def __enter__(self) -> AttentionCapture:
        self._fused = self.module.fused_attn
        self.module.fused_attn = False  # timm's explicit path, which runs attn through attn_drop
        self._handle = self.module.attn_drop.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.remove()
        self.module.fused_attn = self._fused


def _embed_kept(model: VisionTransformer, images: torch.Tensor, keep_idx: torch.Tensor) -> torch.Tensor:
    """Embed only the kept patches: (B, C, H, W), (B, K) -> (B, K, D)."""
    pe = model.patch_embed
    p = pe.patch_size[0]
    patches = patchify(images, p)  # (B, N, C, p, p)
    B, K = keep_idx.shape
    kept = patches.gather(1, keep_idx[:, :, None, None, None].expand(-1, -1, *patches.shape[2:]))  # (B, K, C, p, p)
    proj = pe.proj
    if isinstance(proj, nn.Conv2d) and proj.kernel_size == (p, p) and proj.stride == (p, p) and proj.padding == (0, 0):
        # a patchify conv is a linear map of the flattened patch
        tokens = F.linear(kept.flatten(2), proj.weight.flatten(1), proj.bias)  # (B, K, D)
    else:
        # any per-patch stem: run it on each p x p patch as a 1-token image
        tokens = proj(kept.flatten(0, 1)).reshape(B, K, -1)
    return pe.norm(tokens)


def _prefix_tokens(model: VisionTransformer, batch: int) -> list[torch.Tensor]:
    # timm's order: class token, distillation token (DeiT distilled), register tokens
    names = ("cls_token", "dist_token", "reg_token")
    return [getattr(model, n).expand(batch, -1, -1) for n in names if getattr(model, n, None) is not None]


def _sparse_tokens(model: VisionTransformer, images: torch.Tensor, keep_idx: torch.Tensor) -> torch.Tensor:
    """Kept-patch tokens with position embeddings and prefix tokens: (B, P + K, D)."""
    x = _embed_kept(model, images, keep_idx)  # (B, K, D)
    prefix = _prefix_tokens(model, x.shape[0])
    if model.pos_embed is None:
        return model.pos_drop(torch.cat(prefix + [x], dim=1))
    n_pos_prefix = 0 if model.no_embed_class else model.num_prefix_tokens
    pos_patch = model.pos_embed[0, n_pos_prefix:]  # (N, D)
    x = x + pos_patch[keep_idx]  # (B, K, D)
    if n_pos_prefix:
        prefix = [t + model.pos_embed[:, i:i + 1] for i, t in enumerate(prefix)]
    return model.pos_drop(torch.cat(prefix + [x], dim=1))


def _importance(model: VisionTransformer, attn: torch.Tensor) -> torch.Tensor:
    """Per-patch importance from one block's attention (B, H, T, T) -> (B, K)."""
    P = model.num_prefix_tokens
    attn = attn.mean(1)  # average over heads: (B, T, T)
    if model.global_pool == "token" and model.cls_token is not None:
        # rows of the tokens the head reads: class token (and distillation token for DeiT distilled)
        n_cls = 2 if getattr(model, "dist_token", None) is not None else 1
        return attn[:, :n_cls, P:].mean(1)
    return attn[:, :, P:].mean(1)  # no class token: mean attention each patch receives


def sparse_forward(
    model: nn.Module,
    images: torch.Tensor,
    keep_idx: torch.Tensor | None = None,
    *,
    importance_block: int = -1,
    return_importance: bool = False,
    recompute: bool = False,
) -> SparseOutput:
    """Run a timm ViT on the kept patches of ``images`` only.

    Args:
        model: a timm ``VisionTransformer`` (class token, distillation token, registers or
            global average pooling).
        images: (B, C, H, W) model inputs (already normalized).
        keep_idx: (B, K) indices of the kept patches in timm's row-major order, or None for all.
        importance_block: the block whose attention ranks the patches (default: the last).
        return_importance: also return each kept patch's importance (detached).
        recompute: keep only each block's input for backward and recompute the rest there (activation
            checkpointing; identical results, less memory, about one more forward of time).

    Returns:
        ``SparseOutput(logits, importance)``; importance is (B, K) in ``keep_idx`` order.

    >>> out = sparse_forward(model, x, keep_idx, return_importance=True)
    """
    vit = check_sparse_capable(model)
    H, W = images.shape[-2:]
    if tuple(vit.patch_embed.img_size) != (H, W):
        raise SmiError(f"images are {H}x{W} but the model expects {tuple(vit.patch_embed.img_size)}")
    if keep_idx is None:
        x = vit._pos_embed(vit.patch_embed(images))  # timm's own path: (B, P + N, D)
    else:
        x = _sparse_tokens(vit, images, keep_idx)  # (B, P + K, D)
    x = vit.norm_pre(x)
    if not return_importance:
        x = vit.norm(_blocks(vit.blocks, x, recompute))
        return SparseOutput(_head(vit, x, keep_idx), None)
    i = importance_block % len(vit.blocks)
    x = _blocks(vit.blocks[:i], x, recompute)
    with AttentionCapture(vit.blocks[i].attn) as cap:
        # never recomputed: the capture runs this block's unfused path only while the ``with`` lasts
        x = vit.blocks[i](x)
    x = vit.norm(_blocks(vit.blocks[i + 1:], x, recompute))
    logits = _head(vit, x, keep_idx)
    return SparseOutput(logits, _importance(vit, cap.attn.detach()))


def _blocks(blocks: nn.Sequential, x: torch.Tensor, recompute: bool) -> torch.Tensor:
    """``blocks(x)``; with ``recompute``, autograd keeps only each block's input and recomputes the block's
    activations in backward (non-reentrant checkpointing through timm's ``checkpoint_seq``): the same values and
    gradients for about one more forward, and activation memory that no longer grows with the depth."""
    if not recompute or not torch.is_grad_enabled() or len(blocks) == 0:
        return blocks(x)
    return checkpoint_seq(blocks, x, use_reentrant=False)


def _head(vit: VisionTransformer, x: torch.Tensor, keep_idx: torch.Tensor | None) -> torch.Tensor:
    """timm's head; a segmenter (``task == "segmentation"``) is told which patch each token is."""
    if keep_idx is not None and getattr(vit, "task", "classification") == "segmentation":
        return vit.forward_head(x, keep=keep_idx)
    return vit.forward_head(x)


def narrow_keep(keep: torch.Tensor, importance: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` most important of the kept patches ``keep`` (B, K), importance given in ``keep``'s order; sorted."""
    return keep.gather(1, importance.topk(k, dim=1).indices).sort(dim=1).values


@torch.no_grad()
def rank_patches(model: nn.Module, images: torch.Tensor, counts: list[int], importance_block: int = -1
                 ) -> torch.Tensor:
    """The patches sparse inversion's schedule keeps of fixed ``images`` (e.g. real ones): from all patches, at each
    of ``counts`` in turn the most important of those still kept, ranked by ``importance_block``'s attention over
    the kept tokens alone, as inversion ranks them at its stops. Returns (B, counts[-1]) indices, sorted.

    >>> keep = rank_patches(teacher.model, x, SparsityConfig().kept_counts(196)[1:])  # 196 -> 137 -> ... -> 46
    """
    vit = check_sparse_capable(model)
    B, N = images.shape[0], vit.patch_embed.num_patches
    keep = torch.arange(N, device=images.device).expand(B, N)
    for k in counts:
        out = sparse_forward(vit, images, keep, importance_block=importance_block, return_importance=True)
        keep = narrow_keep(keep, out.importance, k)
    return keep
