"""Learnable quantization: the straight-through estimator, LSQ step sizes and AdaRound soft rounding.

The fake quantizers of :mod:`smi.quant.quantizers` fix their scales at convert. Training a
quantized model needs gradients through ``round`` (the straight-through estimator: the forward
rounds, the backward passes the gradient as if it had not) and step sizes that are parameters:

- **LSQ** (Esser et al., ICLR 2020): the step size ``s`` gets the gradient of the quantized value
  through the STE (``round(x/s) - x/s`` inside the range, ``qmin`` or ``qmax`` where clipped),
  scaled by ``1 / sqrt(numel_per_scale * qmax)`` so that all step sizes learn at a comparable
  rate whatever the tensor size (``lsq_fake_quantize``). Zero points learn the same way (LSQ+).
- **AdaRound** (Nagel et al., ICML 2020): each weight chooses to round down or up through a
  rectified sigmoid ``h(V)`` in [0, 1]; a regularizer ``1 - |2h - 1|^beta`` (beta annealed from
  large to small) pushes every ``h`` to 0 or 1, after which rounding is hard (:class:`AdaRound`).

Both only change how a forward pass computes its fake-quantized values; the saved format is the
one of :mod:`smi.quant.io`: trained step sizes go back to buffers, learned rounding is folded
into the weight (it is set to its quantized value, on the grid), so ``round(w / s)`` reads back
the learned integers.
"""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["AdaRound", "grad_scale", "lsq_fake_quantize", "lsq_grad_factor", "round_ste", "set_learnable_"]


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` forward, identity backward."""
    return (x.round() - x).detach() + x


def grad_scale(x: torch.Tensor, factor: float) -> torch.Tensor:
    """``x`` forward, gradient multiplied by ``factor`` backward."""
    y = x * factor
    return (x - y).detach() + y


def lsq_grad_factor(numel_per_scale: int, qmax: int) -> float:
    """LSQ's step-size gradient scale ``1 / sqrt(N * Q_P)``."""
    return float(numel_per_scale * max(qmax, 1)) ** -0.5


def lsq_fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
                      factor: float) -> torch.Tensor:
    """Fake quantization with learnable ``scale`` and ``zero_point`` (LSQ / LSQ+); forward equals
    :func:`~smi.quant.quantizers.fake_quantize` for the same (rounded) zero point."""
    s = grad_scale(scale, factor).clamp_min(1e-8)
    z = round_ste(grad_scale(zero_point, factor))
    q = round_ste(torch.clamp(x / s + z, qmin, qmax))  # clip, then round: LSQ's gradient at the clipped ends
    return (q - z) * s


def set_learnable_(module: nn.Module, names: tuple[str, ...], learnable: bool) -> None:
    """Turn the tensors ``names`` of ``module`` into parameters (``learnable``) or back into buffers, in place:
    same names, same values, so state-dict keys do not change."""
    for name in names:
        value = getattr(module, name).detach().clone()
        if name in module._parameters:
            del module._parameters[name]
        elif name in module._buffers:
            del module._buffers[name]
        if learnable:
            module.register_parameter(name, nn.Parameter(value))
        else:
            module.register_buffer(name, value)


class AdaRound(nn.Module):
    """Learned up/down rounding of one weight tensor for a fixed per-channel scale.

    ``alpha`` starts where the soft rounding equals the weight's own fractional part, so the
    first soft-quantized weight is the float weight (clamped to the grid).
    """

    ZETA, GAMMA = 1.1, -0.1  # stretch of the rectified sigmoid, so h reaches 0 and 1 exactly

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor) -> None:
        super().__init__()
        w = weight.detach() / scale
        rest = (w - w.floor()).clamp(1e-4, 1 - 1e-4)
        self.alpha = nn.Parameter(-torch.log((self.ZETA - self.GAMMA) / (rest - self.GAMMA) - 1))
        self.soft = True

    def h(self) -> torch.Tensor:
        return torch.clamp(torch.sigmoid(self.alpha) * (self.ZETA - self.GAMMA) + self.GAMMA, 0, 1)

    def forward(self, weight: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
        base = torch.floor(weight.detach() / scale)
        up = self.h() if self.soft else (self.alpha >= 0).to(weight.dtype)
        return torch.clamp(base + up, qmin, qmax) * scale

    def regularizer(self, beta: float) -> torch.Tensor:
        """``sum(1 - |2h - 1|^beta)``: zero only when every weight has chosen up or down."""
        return (1 - (2 * self.h() - 1).abs().pow(beta)).sum()

    def hard_weight(self, weight: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
        """The weight on the grid at the rounding chosen (h >= 0.5 rounds up)."""
        base = torch.floor(weight.detach() / scale)
        return torch.clamp(base + (self.alpha >= 0).to(weight.dtype), qmin, qmax) * scale
