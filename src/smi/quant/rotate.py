"""Orthogonal rotations that leave a ViT's float function unchanged and make it easier to quantize.

After QuaRot (Ashkboos et al., NeurIPS 2024) and SpinQuant (Liu et al., ICLR 2025), for timm ViTs and with
no online transform: every rotation is folded into the weights, so the rotated model has the same layers,
the same cost and (in float) the same logits.

* **Residual stream**: every write into it (the patch embedding, the class/register tokens, the position
  embedding, ``attn.proj`` and ``mlp.fc2``) is multiplied by an orthogonal ``Q`` and every read (the Linear
  after each LayerNorm, and the head) by ``Qᵀ``. A LayerNorm commutes with ``Q`` when ``Q`` keeps the all-ones
  direction (``Q 1 = 1``: the mean subtraction then commutes too), once its affine scale and shift are folded
  into the Linear that reads it (they are per-channel and would not).
* **Queries and keys, per head**: ``q R`` and ``k R`` with one orthogonal ``R`` per head leave ``q kᵀ``, and so the
  attention, unchanged; the rotation is folded into the rows of ``attn.qkv``.

A rotation spreads a few large channels over all of them, so a per-tensor (or per-head) step size wastes fewer
levels: on the shipped ViT, repq W3A3 calibrated on 32 sparse synthetic images rises from 47 % to 60 % (README).
``Q`` and ``R`` are randomized Hadamard matrices where the width is a power of two or 12 times one (Sylvester's
doubling of 1 or of Paley's order-12 matrix: 96, 128, 192, 384, 768), random orthogonal matrices otherwise, drawn
from a fixed seed, so the same model always gets the same rotation.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from timm.layers import Attention, LayerScale

from smi.errors import SmiError

__all__ = ["rotate_", "is_rotated", "rotation_matrix", "residual_rotation", "check_rotatable"]

_MARK = "_smi_rotated"


def is_rotated(model: nn.Module) -> bool:
    """Whether :func:`rotate_` has already rotated ``model`` (a copy of a rotated model is rotated too)."""
    return bool(getattr(model, _MARK, False))


def _paley12() -> torch.Tensor:
    """A 12 x 12 Hadamard matrix (Paley's construction for q = 11), rows signed so its first column is all ones."""
    squares = {(i * i) % 11 for i in range(1, 11)}
    chi = [0] + [1 if k in squares else -1 for k in range(1, 11)]  # the quadratic character mod 11
    h = torch.zeros(12, 12, dtype=torch.float64)
    h[0, 1:], h[1:, 0] = 1.0, -1.0
    for i in range(11):
        for j in range(11):
            h[1 + i, 1 + j] = chi[(j - i) % 11]
    h += torch.eye(12, dtype=torch.float64)
    return h * h[:, :1]


def _hadamard(n: int) -> torch.Tensor | None:
    """An orthonormal Hadamard matrix of order ``n`` with a constant first column, for ``n`` a power of two or 12
    times one (DeiT's 192, 384 and 768), else None. Sylvester's doubling, from 1 or from Paley's 12."""
    m = n
    while m % 2 == 0 and m > 1:
        m //= 2
    if m == 1:
        h = torch.ones(1, 1, dtype=torch.float64)
    elif m == 3 and n % 12 == 0:
        h = _paley12()
    else:
        return None
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / n ** 0.5


def _signs(n: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 2, (n,), generator=gen).to(torch.float64) * 2 - 1


def _random_orthogonal(n: int, gen: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))  # Haar-distributed


def rotation_matrix(n: int, gen: torch.Generator, keep_ones: bool = False) -> torch.Tensor:
    """An ``n x n`` orthogonal matrix (float64): a randomized Hadamard matrix where ``n`` is a power of two or 12
    times one, a random orthogonal one otherwise. With ``keep_ones`` it maps the all-ones vector to itself
    (``Q 1 = 1``)."""
    h = _hadamard(n)
    if h is not None:
        s = _signs(n, gen)
        if not keep_ones:
            return s[:, None] * h  # diag(s) H
        s[0] = 1.0  # H's first column is constant, 1/sqrt(n): H diag(s) Hᵀ with s_0 = 1 keeps the ones
        return (h * s) @ h.T
    r = _random_orthogonal(n, gen)
    if not keep_ones:
        return r
    ones = torch.full((n, 1), n ** -0.5, dtype=torch.float64)
    basis, _ = torch.linalg.qr(torch.cat([ones, torch.randn(n, n - 1, generator=gen, dtype=torch.float64)], 1))
    rest = basis[:, 1:]  # an orthonormal basis of the complement of 1
    return ones @ ones.T + rest @ _random_orthogonal(n - 1, gen) @ rest.T


def residual_rotation(width: int, seed: int = 0) -> torch.Tensor:
    """The ``Q`` (float64, ``Q 1 = 1``) :func:`rotate_` applies to a residual stream of ``width`` channels: a
    rotated model's block outputs are the float model's times ``Q``."""
    return rotation_matrix(width, torch.Generator().manual_seed(seed), keep_ones=True)


def _layer_norm(m: nn.Module) -> bool:
    return isinstance(m, nn.LayerNorm) and m.elementwise_affine and m.bias is not None


def check_rotatable(model: nn.Module) -> None:
    """Refuse a model :func:`rotate_` cannot rotate exactly, naming what is missing."""
    why = None
    blocks = list(getattr(model, "blocks", []))
    if not blocks or not hasattr(model, "pos_embed"):
        why = "it has no transformer blocks"
    elif not isinstance(getattr(model, "norm_pre", nn.Identity()), nn.Identity):
        why = "it has a norm_pre"
    elif not isinstance(getattr(model.patch_embed, "norm", nn.Identity()), nn.Identity):
        why = "its patch embedding ends in a norm"
    elif _final_norm(model) is None or not isinstance(getattr(model, "head", None), nn.Linear):
        why = "it has no LayerNorm and Linear head at the end"
    elif not isinstance(_embedding_conv(model), nn.Conv2d):
        why = "its patch embedding has no convolution"
    else:
        for i, blk in enumerate(blocks):
            attn, mlp = getattr(blk, "attn", None), getattr(blk, "mlp", None)
            ok = (isinstance(attn, Attention) and _layer_norm(getattr(blk, "norm1", None))
                  and _layer_norm(getattr(blk, "norm2", None)) and isinstance(getattr(mlp, "fc1", None), nn.Linear)
                  and isinstance(getattr(mlp, "fc2", None), nn.Linear)
                  and all(isinstance(getattr(attn, n, nn.Identity()), nn.Identity)
                          for n in ("q_norm", "k_norm", "norm"))
                  and getattr(attn, "gate", None) is None
                  and all(isinstance(getattr(blk, n, nn.Identity()), nn.Identity | LayerScale) for n in ("ls1", "ls2"))
                  and not any(hasattr(blk, n) for n in ("norm3", "attn2")))
            if not ok:
                why = f"block {i} is not a plain pre-norm timm block (LayerNorm, Attention without q/k norm, Mlp)"
                break
    if why is not None:
        raise SmiError(f"needs a plain pre-norm timm ViT, and this model is not one: {why}", param="rotate")


def _final_norm(model: nn.Module) -> nn.LayerNorm | None:
    norm, fc_norm = getattr(model, "norm", nn.Identity()), getattr(model, "fc_norm", nn.Identity())
    if _layer_norm(norm) and isinstance(fc_norm, nn.Identity):
        return norm
    if _layer_norm(fc_norm) and isinstance(norm, nn.Identity):
        return fc_norm
    return None


def _embedding_conv(model: nn.Module) -> nn.Module | None:
    convs = [m for m in model.patch_embed.modules() if isinstance(m, nn.Conv2d)]
    return convs[-1] if convs and convs[-1].out_channels == model.embed_dim else None


@torch.no_grad()
def rotate_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Rotate the residual stream and each head's queries and keys of the timm ViT ``model`` in place.

    The float function is unchanged (up to float rounding; tested). LayerNorm affines end up folded into the
    Linears that read them (scale 1, shift 0), LayerScale into the branch's last Linear (gamma 1): the layers
    and state keys stay the float model's. A model already rotated
    is left as it is, so this may run again on a copy or when a saved quantized model is rebuilt.
    """
    if is_rotated(model):
        return model
    check_rotatable(model)
    q = residual_rotation(model.embed_dim, seed)
    gen = torch.Generator().manual_seed(seed + 1)  # the heads' rotations

    def put(p: torch.Tensor, value: torch.Tensor) -> None:
        p.copy_(value.reshape(p.shape).to(p.dtype))

    def write(lin: nn.Linear) -> None:  # a Linear whose output is added to the residual stream
        put(lin.weight, q.T @ lin.weight.double())
        if lin.bias is not None:
            put(lin.bias, lin.bias.double() @ q)

    def read(norm: nn.LayerNorm, lins: list[nn.Linear]) -> None:  # LayerNorm then the Linears that read it
        gamma, beta = norm.weight.double(), norm.bias.double()
        for lin in lins:
            w = lin.weight.double()
            if lin.bias is None:
                lin.bias = nn.Parameter(torch.zeros(lin.out_features, dtype=lin.weight.dtype,
                                                    device=lin.weight.device))
            put(lin.bias, lin.bias.double() + w @ beta)
            put(lin.weight, (w * gamma) @ q)
        norm.weight.fill_(1.0)
        norm.bias.zero_()

    conv = _embedding_conv(model)
    put(conv.weight, q.T @ conv.weight.double().flatten(1))
    if conv.bias is not None:
        put(conv.bias, conv.bias.double() @ q)
    for name in ("cls_token", "reg_token", "dist_token", "pos_embed"):
        p = getattr(model, name, None)
        if isinstance(p, torch.Tensor):
            put(p, p.double() @ q)
    for blk in model.blocks:
        attn, mlp = blk.attn, blk.mlp
        for ls, lin in ((blk.ls1, attn.proj), (blk.ls2, mlp.fc2)):
            if isinstance(ls, LayerScale):  # per-channel gamma on the branch's output: into its last Linear
                put(lin.weight, lin.weight.double() * ls.gamma.double()[:, None])
                if lin.bias is not None:
                    put(lin.bias, lin.bias.double() * ls.gamma.double())
                ls.gamma.fill_(1.0)  # the same layers and state keys as the float model (export reads them)
        read(blk.norm1, [attn.qkv])
        read(blk.norm2, [mlp.fc1])
        write(attn.proj)
        write(mlp.fc2)
        heads, hd = attn.num_heads, attn.head_dim
        w = attn.qkv.weight.double().view(3, heads, hd, -1)
        b = attn.qkv.bias.double().view(3, heads, hd) if attn.qkv.bias is not None else None
        for h in range(heads):
            r = rotation_matrix(hd, gen)
            for i in (0, 1):  # q and k: q R (k R)ᵀ = q kᵀ
                w[i, h] = r.T @ w[i, h]
                if b is not None:
                    b[i, h] = b[i, h] @ r
        put(attn.qkv.weight, w)
        if b is not None:
            put(attn.qkv.bias, b)
    read(_final_norm(model), [m for m in (model.head, getattr(model, "head_dist", None)) if isinstance(m, nn.Linear)])
    setattr(model, _MARK, True)
    return model
