"""Block-wise reconstruction of a converted quantized model (BRECQ, with QDrop's random dropping).

After calibration has fixed every range, each *unit* of the model (the patch embedding, every
transformer or residual block, the head), in order, learns

- the rounding of its weights (AdaRound: soft rounding annealed to hard), and
- the step sizes and zero points of its activation quantizers (LSQ),

so that its output on the calibration images matches the full-precision unit's output. The
quantized unit reads the output of the already reconstructed quantized units before it (so
errors do not accumulate unseen), and during reconstruction each of its activation quantizers
leaves a random half of its elements unquantized (QDrop, Wei et al., ICLR 2022), which
flattens the loss landscape the rounding is learned on. Sparse pool images reach both models
as their kept patches only, as in calibration.

With ``prediction_weight`` > 0 the unit also learns to keep the model's *prediction* (PD-Quant,
Liu et al., CVPR 2023): its output is run through the rest of the float model, and the KL
divergence from the float model's prediction on the same images is added to the output error
(weighted), so the unit spends its few levels on what changes the class, not on every feature. A unit whose rows
are not images (the sparse path's patch embedding sees patches) keeps the output error alone.

Settings (:class:`ReconstructConfig`) follow BRECQ/QDrop: Adam, lr 1e-3 for the rounding and
4e-5 (cosine) for the step sizes, rounding regularizer weight 0.01 with beta from 20 to 2 after
a 20 % warm-up without it, drop probability 0.5; the iteration count is smaller than their
20,000 because the units here are small (SARDFQ uses a few hundred per block).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from smi.errors import SmiError
from smi.quant.api import Batch, batch_images, calibration_forward, calibration_logits
from smi.quant.modules import QuantModule, WeightQuantMixin
from smi.quant.quantizers import ActQuantizer

__all__ = ["ReconstructConfig", "reconstruct_", "reconstruction_units", "unit_error"]

Forward = Callable[[nn.Module, Batch], int]
Logits = Callable[[nn.Module, Batch], torch.Tensor]


@dataclass(frozen=True)
class ReconstructConfig:
    """How each unit is reconstructed (defaults after BRECQ and QDrop, fewer iterations)."""

    iterations: int = 500  # optimizer steps per unit
    batch_size: int = 32  # images per step
    lr: float = 1e-3  # Adam, the rounding variables
    act_lr: float = 4e-5  # Adam, the activation step sizes and zero points (cosine to 0)
    reg_weight: float = 0.01  # weight of the rounding regularizer
    beta_start: float = 20.0  # regularizer exponent, annealed linearly ...
    beta_end: float = 2.0  # ... to this
    warmup: float = 0.2  # fraction of the iterations without the regularizer
    drop_prob: float = 0.5  # QDrop: fraction of activation elements left unquantized while learning
    learn_activations: bool = True  # train activation step sizes too (else rounding only)
    prediction_weight: float = 0.0  # PD-Quant: weight of KL(float prediction || prediction through the unit); 0 = off
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("iterations", "batch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise SmiError(f"must be a positive integer, got {v!r}", param=f"reconstruct_{name}")
        for name in ("lr", "act_lr", "reg_weight", "beta_start", "beta_end", "prediction_weight"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise SmiError(f"must be a finite number >= 0, got {v!r}", param=f"reconstruct_{name}")
        for name in ("warmup", "drop_prob"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and 0 <= v < 1):
                raise SmiError(f"must be in [0, 1), got {v!r}", param=f"reconstruct_{name}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["prediction_weight"] == 0.0:  # runs recorded before the field existed still resume
            del d["prediction_weight"]
        return d


def _quant_count(module: nn.Module) -> int:
    return sum(isinstance(m, QuantModule) for m in module.modules())


def reconstruction_units(model: nn.Module, probe: Batch | None = None, forward: Forward | None = None) -> list[str]:
    """Names of the units reconstructed one by one, in forward order.

    A quantized wrapper is a unit; so is a module that is not a plain container (``Sequential``,
    ``ModuleList``) and holds more than one quantized wrapper (a transformer or residual block);
    containers and single-wrapper modules (timm's ``PatchEmbed``) are searched inside. With a
    ``probe`` batch, the order is the order of the calls in a forward pass, and a candidate the
    forward never calls as a whole (a patch embedding the sparse path bypasses) is searched inside.
    """
    called: dict[str, int] | None = None
    if probe is not None:
        called = {}

        def record(name: str):
            def hook(module, args) -> None:
                called.setdefault(name, len(called))
            return hook

        hooks = [m.register_forward_pre_hook(record(name)) for name, m in model.named_modules()
                 if name and _quant_count(m)]
        try:
            with torch.no_grad():
                (forward or calibration_forward)(model, probe)
        finally:
            for h in hooks:
                h.remove()
    units: list[str] = []

    def visit(module: nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            full = f"{prefix}{name}"
            count = _quant_count(child)
            if count == 0 or (called is not None and full not in called and isinstance(child, QuantModule)):
                continue
            whole = isinstance(child, QuantModule) or (count > 1 and not isinstance(child, (nn.Sequential,
                                                                                             nn.ModuleList)))
            if whole and (called is None or full in called):
                units.append(full)
            else:
                visit(child, f"{full}.")

    visit(model, "")
    if called is not None:
        units.sort(key=lambda n: called[n])
    return units


class _Stop(Exception):
    """Raised by a capture hook: the rest of the forward pass is not needed."""


@torch.no_grad()
def _capture(model: nn.Module, unit: nn.Module, batches: Iterable[Batch], forward: Forward, output: bool
             ) -> list[torch.Tensor]:
    """The unit's input (or output) for each calibration batch; the forward stops at the unit."""
    seen: list[torch.Tensor] = []

    def hook(module, args, result=None):
        if not args or not isinstance(args[0], torch.Tensor):
            raise SmiError(f"cannot reconstruct {type(module).__name__}: its input is not one tensor")
        seen.append((result if output else args[0]).detach())
        raise _Stop

    handle = unit.register_forward_hook(hook) if output else unit.register_forward_pre_hook(hook)
    try:
        for batch in batches:
            try:
                forward(model, batch)
            except _Stop:
                continue
            raise SmiError(f"{type(unit).__name__} was not called by the model's forward; it cannot be reconstructed")
    finally:
        handle.remove()
    return seen


def _feature_error(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared error summed over the feature dimension (channels of a map, last dim of tokens), mean over the rest."""
    dim = 1 if out.ndim == 4 else -1
    return (out - target).pow(2).sum(dim).mean()


@torch.no_grad()
def unit_error(unit: nn.Module, inputs: list[torch.Tensor], targets: list[torch.Tensor]) -> float:
    """Mean per-row output error of ``unit`` on captured inputs against captured targets."""
    total, n = 0.0, 0
    for x, y in zip(inputs, targets, strict=True):
        total += _feature_error(unit(x), y).item() * len(x)
        n += len(x)
    return total / max(n, 1)


def _rows(batch: Batch, rows: torch.Tensor) -> Batch:
    if isinstance(batch, tuple):
        images, masks = batch
        return images[rows], (None if masks is None else masks[rows])
    return batch[rows]


class _Prediction:
    """PD-Quant's term for one unit: its output, run through the rest of the float model, against the float model's
    prediction on the same images (KL, batch mean)."""

    def __init__(self, fp_model: nn.Module, fp_unit: nn.Module, batches: list[Batch], logits: Logits) -> None:
        self.fp_model, self.fp_unit, self.batches, self.logits = fp_model, fp_unit, batches, logits
        with torch.no_grad():
            self.targets = [F.log_softmax(logits(fp_model, batch).float(), -1) for batch in batches]

    def __call__(self, b: int, rows: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        handle = self.fp_unit.register_forward_hook(lambda module, args, result: out)
        try:
            pred = self.logits(self.fp_model, _rows(self.batches[b], rows.cpu()))
        finally:
            handle.remove()
        target = self.targets[b][rows.to(self.targets[b].device)]
        return F.kl_div(F.log_softmax(pred.float(), -1), target, reduction="batchmean", log_target=True)


def _act_quantizers(unit: nn.Module) -> list[ActQuantizer]:
    return [m for m in unit.modules() if isinstance(m, ActQuantizer) and m.mode == "quant"]


def _weights(unit: nn.Module) -> list[WeightQuantMixin]:
    return [m for m in unit.modules() if isinstance(m, WeightQuantMixin) and m.w_quant]


def _reconstruct_unit(unit: nn.Module, inputs: list[torch.Tensor], targets: list[torch.Tensor],
                      cfg: ReconstructConfig, gen: torch.Generator, predict: _Prediction | None = None) -> None:
    weights, acts = _weights(unit), (_act_quantizers(unit) if cfg.learn_activations else [])
    frozen = [(p, p.requires_grad) for p in unit.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    for m in weights:
        m.start_rounding()
    for q in acts:
        q.learnable_(True)
    for q in _act_quantizers(unit):
        q.drop_prob = cfg.drop_prob
    groups = [{"params": [m.weight_rounding.alpha for m in weights], "lr": cfg.lr}]
    act_params = [p for q in acts for p in (q.scale, q.zero_point)]
    if act_params:
        groups.append({"params": act_params, "lr": cfg.act_lr})
    opt = torch.optim.Adam(groups)
    sizes = torch.tensor([len(x) for x in inputs], dtype=torch.float)
    warm = int(cfg.warmup * cfg.iterations)
    try:
        for it in range(cfg.iterations):
            b = int(torch.multinomial(sizes, 1, generator=gen))
            rows = torch.randperm(len(inputs[b]), generator=gen)[:cfg.batch_size].to(inputs[b].device)
            out = unit(inputs[b][rows])
            loss = _feature_error(out, targets[b][rows])
            if predict is not None:
                loss = loss + cfg.prediction_weight * predict(b, rows, out)
            if it >= warm and weights:
                progress = (it - warm) / max(cfg.iterations - warm, 1)
                beta = cfg.beta_end + (cfg.beta_start - cfg.beta_end) * (1 - progress)
                loss = loss + cfg.reg_weight * sum(m.weight_rounding.regularizer(beta) for m in weights)
            if not torch.isfinite(loss):
                raise SmiError(f"reconstruction loss became {loss.item()} at iteration {it + 1}; lower the learning "
                               f"rates (reconstruct_lr {cfg.lr}, reconstruct_act_lr {cfg.act_lr})")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if len(groups) > 1:
                groups[1]["lr"] = cfg.act_lr * 0.5 * (1 + math.cos(math.pi * (it + 1) / cfg.iterations))
                opt.param_groups[1]["lr"] = groups[1]["lr"]
            opt.step()
    finally:
        for q in _act_quantizers(unit):
            q.drop_prob = 0.0
        for q in acts:
            q.learnable_(False)
        for m in weights:
            m.finish_rounding()
        for p, flag in frozen:
            p.requires_grad_(flag)


def _float_twin(model: nn.Module, fp_model: nn.Module) -> nn.Module:
    """``fp_model`` with the quantized model's wrappers, every quantizer off: the float function computed along the
    same code path (the sparse forward embeds kept patches differently for a plain and a wrapped convolution)."""
    from smi.quant.api import config_of, prepare
    from smi.quant.quantizers import LogSqrt2Quantizer

    if any(isinstance(m, QuantModule) for m in fp_model.modules()):
        return fp_model
    twin = prepare(copy.deepcopy(fp_model), config_of(model))
    for m in twin.modules():
        if isinstance(m, (ActQuantizer, LogSqrt2Quantizer)):
            m.mode = "off"
    return twin


@torch.no_grad()
def _restore(unit: nn.Module, state: dict[str, torch.Tensor]) -> None:
    unit.load_state_dict(state)
    for m in _weights(unit):
        m.cache_weight()


def reconstruct_(
    model: nn.Module, fp_model: nn.Module, calibration: Iterable[Batch], config: ReconstructConfig | None = None,
    *, forward: Forward | None = None, logits: Logits | None = None, units: list[str] | None = None,
    progress: bool = False, on_unit: Callable[[int, str, dict[str, Any]], None] | None = None, start: int = 0,
) -> list[dict[str, Any]]:
    """Reconstruct the converted quantized ``model`` unit by unit against ``fp_model`` (its float original, which is
    not changed).

    ``calibration`` yields the batches calibration used (images, or ``(images, masks)`` for sparse
    pools); it is iterated twice per unit. ``on_unit(index, name, row)`` runs after each unit (a
    checkpoint); ``start`` skips units already done. Returns one row per unit reconstructed here:
    output error before and after, whether the reconstruction was kept, and seconds. A unit whose
    error did not fall keeps its calibrated state. ``logits`` (a batch's logits; needed with a custom ``forward``
    when ``config.prediction_weight`` > 0) feeds PD-Quant's prediction term.
    """
    cfg = config or ReconstructConfig()
    if cfg.prediction_weight > 0 and forward is not None and logits is None:
        raise SmiError("a custom forward needs the matching logits function for the prediction term",
                       param="reconstruct_prediction_weight")
    forward = forward or calibration_forward
    logits = logits or calibration_logits
    batches = list(calibration)
    names = units if units is not None else reconstruction_units(model, batches[0] if batches else None, forward)
    if not names:
        raise SmiError("the model has no quantized units to reconstruct (was it prepared and converted?)",
                       param="reconstruct")
    fp_model = _float_twin(model, fp_model)
    q_modules, fp_modules = dict(model.named_modules()), dict(fp_model.named_modules())
    missing = [n for n in names if n not in fp_modules]
    if missing:
        raise SmiError(f"the float model has no module {missing[0]}; pass the model quantized was copied from")
    from tqdm.auto import tqdm

    rows = []
    bar = tqdm(list(enumerate(names))[start:], desc="reconstruct", unit="unit", leave=False, disable=not progress)
    fp_frozen = [(p, p.requires_grad) for p in fp_model.parameters()]
    try:
        for p, _ in fp_frozen:  # the float model only carries gradients to the unit (the prediction term)
            p.requires_grad_(False)
        for index, name in bar:
            rows.append(_reconstruct_one(model, fp_model, q_modules[name], fp_modules[name], batches, cfg, index,
                                         name, forward, logits))
            bar.set_postfix(unit=name, error=f"{rows[-1]['error_before']:.3g}->{rows[-1]['error_after']:.3g}",
                            refresh=False)
            if on_unit is not None:
                on_unit(index, name, rows[-1])
    finally:
        for p, flag in fp_frozen:
            p.requires_grad_(flag)
    return rows


def _reconstruct_one(model: nn.Module, fp_model: nn.Module, unit: nn.Module, fp_unit: nn.Module, batches: list[Batch],
                     cfg: ReconstructConfig, index: int, name: str, forward: Forward, logits: Logits
                     ) -> dict[str, Any]:
    """Reconstruct one unit; its row of the log. A unit whose error did not fall keeps its calibrated state."""
    t0 = time.perf_counter()
    model.eval()
    fp_model.eval()
    inputs = _capture(model, unit, batches, forward, output=False)
    targets = _capture(fp_model, fp_unit, batches, forward, output=True)
    per_image = all(len(x) == len(batch_images(batch))
                    for x, batch in zip(inputs, batches, strict=True))  # not the sparse path's patch rows
    predict = _Prediction(fp_model, fp_unit, batches, logits) if cfg.prediction_weight > 0 and per_image else None
    before = unit_error(unit, inputs, targets)
    saved = {k: v.clone() for k, v in unit.state_dict().items()}
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + index)
    torch.manual_seed(cfg.seed * 1_000_003 + index)  # QDrop's random masks: a resumed run is exact
    with torch.enable_grad():
        _reconstruct_unit(unit, inputs, targets, cfg, gen, predict)
    after = unit_error(unit, inputs, targets)
    kept = after < before
    if not kept:  # never leave a unit worse on its own data than calibration left it
        _restore(unit, saved)
        after = unit_error(unit, inputs, targets)
    return {"unit": name, "error_before": before, "error_after": after, "reconstructed": kept,
            "seconds": round(time.perf_counter() - t0, 2)}
