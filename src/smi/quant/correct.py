"""Activation correction (after DFQ-ViT): per-channel scale and bias that pull each block's quantized output
back onto the float model's, fitted in closed form on the calibration images and folded into the weights.

A timm block adds two branches to its residual stream, ``x + proj(attn(...))`` then
``x + fc2(mlp(...))``. Quantization error shifts and scales each channel of what the branches add;
the float model's own activations on the same images say what they should have added. Block by
block, in forward order, each branch's last Linear (``attn.proj``, ``mlp.fc2``) gets, per output
channel ``d``, the least-squares fit ``a_d · z_d + c_d ≈ t_d`` where ``z`` is the quantized branch
output (after the corrections before it) and ``t`` the float model's residual stream minus the
quantized one's input to that branch, over every token of every calibration image (kept patches
only, for sparse pools). ``a`` is clamped to [0.5, 1.5] (a correction, not a re-learning) with
``c`` refitted for the clamped ``a``.

``layers="all"`` also corrects the two inner Linears before their nonlinearity, ``attn.qkv`` and ``mlp.fc1``
(block order: qkv, proj, fc1, fc2), each fitted to the float layer's own output on the float model's input
(``t`` = the float model's qkv or fc1 output), so the softmax and the GELU see what the float model feeds them.
Measured on the shipped ViT from 32 sparse images (repq, seeds 0-2): W4A4 81.09 -> 82.96 % with the outputs
alone, 83.29 % with all four; W3A3 47.37 -> 51.35 / 54.64 %. On the 196-token scene teacher all four do worse
(W4A4 sparse 71.48 -> 70.80 %), so the outputs alone are the default.

The fold is exact and stays on the integer grid: row ``d`` of the weight and its per-channel step
size are both multiplied by ``a_d`` (the integer codes do not change), and the bias becomes
``a_d · b_d + c_d``. So the corrected model saves and loads in the usual format, and an integer
runtime sees only another bias and scale.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn as nn

from smi.errors import SmiError
from smi.quant.api import Batch, calibration_forward
from smi.quant.modules import QuantLinear
from smi.quant.reconstruct import Forward, _float_twin, _Stop

__all__ = ["LAYERS", "SCALE_RANGE", "affine_fit", "check_layers", "correct_activations_"]

SCALE_RANGE = (0.5, 1.5)
LAYERS = {"outputs": ("attn.proj", "mlp.fc2"),  # the branches' last Linears (DFQ-ViT's), the default
          "all": ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")}  # ... and the inner ones before softmax / GELU


def check_layers(layers: str) -> None:
    """Refuse ``layers`` that are not a key of :data:`LAYERS` (before any work)."""
    if layers not in LAYERS:
        raise SmiError(f"must be one of {', '.join(LAYERS)}, got {layers!r}", param="correct_activations")


def affine_fit(z: torch.Tensor, t: torch.Tensor, scale_range: tuple[float, float] = SCALE_RANGE
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per column ``d`` of (rows, D) tensors: ``a_d, c_d`` minimizing ``sum_rows (a_d z + c_d - t)^2``, ``a`` clamped
    to ``scale_range`` (a constant column keeps ``a = 1``) and ``c`` refitted for it."""
    z, t = z.double(), t.double()
    mz, mt = z.mean(0), t.mean(0)
    var = (z - mz).pow(2).mean(0)
    cov = ((z - mz) * (t - mt)).mean(0)
    a = torch.where(var > 1e-12, cov / var.clamp_min(1e-12), torch.ones_like(var)).clamp(*scale_range)
    return a.float(), (mt - a * mz).float()


@torch.no_grad()
def _fold(linear: QuantLinear, a: torch.Tensor, c: torch.Tensor) -> None:
    linear.weight.mul_(a[:, None])
    linear.weight_scale.mul_(a.abs()[:, None])
    linear.bias.mul_(a).add_(c)
    linear.cache_weight()


@torch.no_grad()
def _collect(model: nn.Module, batches: list[Batch], forward: Forward, taps: dict[str, tuple[nn.Module, str]],
             stop_at: nn.Module | None) -> dict[str, torch.Tensor]:
    """Run every batch; ``taps`` name -> (module, 'in' | 'out'): that tensor, tokens flattened to rows. The forward
    stops after ``stop_at``."""
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in taps}
    handles = []
    for name, (module, where) in taps.items():
        if where == "in":
            handles.append(module.register_forward_pre_hook(
                lambda m, args, name=name: seen[name].append(args[0].reshape(-1, args[0].shape[-1]).clone())))
        else:
            handles.append(module.register_forward_hook(
                lambda m, args, out, name=name: seen[name].append(out.reshape(-1, out.shape[-1]).clone())))
    if stop_at is not None:
        def stop(m, args, out):
            raise _Stop
        handles.append(stop_at.register_forward_hook(stop))
    try:
        for batch in batches:
            try:
                forward(model, batch)
            except _Stop:
                pass
    finally:
        for h in handles:
            h.remove()
    return {name: torch.cat(v) for name, v in seen.items()}


def _correctable(block: nn.Module) -> bool:
    attn, mlp = getattr(block, "attn", None), getattr(block, "mlp", None)
    return (isinstance(getattr(attn, "proj", None), QuantLinear) and isinstance(getattr(mlp, "fc2", None), QuantLinear)
            and attn.proj.bias is not None and mlp.fc2.bias is not None
            and all(isinstance(getattr(block, n, nn.Identity()), nn.Identity) for n in ("ls1", "ls2", "drop_path1",
                                                                                       "drop_path2")))


def correct_activations_(model: nn.Module, fp_model: nn.Module, calibration: Iterable[Batch],
                         *, forward: Forward | None = None, layers: str = "outputs") -> list[dict[str, Any]]:
    """Correct every block of the converted quantized ViT ``model`` against ``fp_model`` (its float original, not
    changed) on the calibration batches; returns one row per corrected Linear: the mean squared error of what it
    is fitted to (the residual stream for attn.proj and mlp.fc2, the float layer's output for attn.qkv and
    mlp.fc1) before and after, and the range of the fitted scales. ``layers``: a key of :data:`LAYERS`."""
    check_layers(layers)
    forward = forward or calibration_forward
    batches = list(calibration)
    blocks = list(getattr(model, "blocks", []))
    if not blocks or not any(_correctable(b) for b in blocks):
        raise SmiError("activation correction needs a quantized timm ViT (blocks whose attn.proj and mlp.fc2 are "
                       "quantized Linear layers with a bias, without layer scale)", param="correct_activations")
    fp = _float_twin(model, fp_model)
    fp.eval()
    model.eval()
    fp_blocks = list(fp.blocks)
    if len(fp_blocks) != len(blocks):
        raise SmiError("the float model has another number of blocks; pass the model quantized was copied from")
    taps = {}
    inner = layers == "all"
    for i, fb in enumerate(fp_blocks):
        taps.update({f"in{i}": (fb, "in"), f"attn{i}": (fb.attn, "out"), f"out{i}": (fb, "out")})
        if inner:
            taps.update({f"qkv{i}": (fb.attn.qkv, "out"), f"fc1{i}": (fb.mlp.fc1, "out")})
    target = _collect(fp, batches, forward, taps, None)
    rows = []
    for i, block in enumerate(blocks):
        if not _correctable(block):
            continue
        mid_f = target[f"in{i}"] + target[f"attn{i}"]
        # (name, Linear, what it should output, where the residual stream it adds to is read; None: inner)
        units = [("attn.qkv", block.attn.qkv, target.get(f"qkv{i}"), None),
                 ("attn.proj", block.attn.proj, mid_f, (block, "in")),
                 ("mlp.fc1", block.mlp.fc1, target.get(f"fc1{i}"), None),
                 ("mlp.fc2", block.mlp.fc2, target[f"out{i}"], (block.norm2, "in"))]
        for branch, linear, goal, tap_in in (u for u in units if u[0] in LAYERS[layers]):
            if tap_in is None and not (isinstance(linear, QuantLinear) and linear.bias is not None):
                continue  # an inner Linear left in float or without a bias: nothing to fold into
            t0 = time.perf_counter()
            got = _collect(model, batches, forward, {"z": (linear, "out"), **({"x": tap_in} if tap_in else {})},
                           block)
            rest = goal - got["x"] if tap_in else goal  # what the Linear should output (a branch: should add)
            before = (got["z"] - rest).pow(2).mean().item()
            a, c = affine_fit(got["z"], rest)
            after = (got["z"] * a + c - rest).pow(2).mean().item()
            _fold(linear, a, c)
            rows.append({"unit": f"blocks.{i}.{branch}", "error_before": before, "error_after": after,
                         "scale_min": a.min().item(), "scale_max": a.max().item(),
                         "seconds": round(time.perf_counter() - t0, 3)})
    return rows
