"""``smi export --format pt2e``: torchao's PT2E int8 flow at smi's scales, compiled by Inductor with freezing.

The exported file (``model.safetensors``, no pickle) holds the teacher's parameters with every quantized
layer's weight as its int8 codes and per-channel scales, and each layer's input scale and zero point.
Loading it rebuilds the integer model: the teacher's float architecture with the on-grid weights is
traced by ``torch.export``, torchao's ``X86InductorQuantizer`` annotates it (int8 per-channel weights and
uint8 per-tensor inputs of every linear and convolution), every observer it inserts is **seeded with
smi's calibrated scale and zero point** instead of observing data (nothing is recalibrated; an observer
no smi quantizer accounts for is refused), ``convert_pt2e`` folds the weights to int8, and
``torch.compile`` with Inductor's freezing lowers the quantize/dequantize pairs into oneDNN's int8
kernels (the compile happens on the first call of each batch size: a minute or two for a DeiT).

What differs from smi's simulation: the attention's matrix products (query-key, softmax-value) run in
float, as X86InductorQuantizer leaves them, where smi's presets also quantize their operands; the
check written to ``export.json`` and ``smi eval --exported`` measure what that costs. Widths: any weight
width up to 8 bits (its codes are int8 values), activations at 8 bits (uint8 is the kernels' only
activation type: a narrower width would need a clamp the integer kernels do not have; use
``--format onnx``).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import json
import logging
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from smi.errors import SmiError
from smi.quant.export import EXPORTERS, Exporter
from smi.quant.modules import WeightQuantMixin
from smi.quant.quantizers import ActQuantizer
from smi.utils.io import atomic_write_bytes

__all__ = ["Compiled", "PT2EExporter", "integer_graph"]

_LAYER_KEYS = ("weight", "weight_scale", "input_scale", "input_zero_point")  # a quantized layer's tensors in the file
_EPS = 1e-12  # observers' smallest scale (torchao's default 2**-12 would clamp small per-channel weight scales)


@contextlib.contextmanager
def _quiet():
    """torchao's import, convert and Inductor's compile log notes (deprecations, "no CUDA runtime") that say nothing
    to a user of smi."""
    loggers = [logging.getLogger(n) for n in ("torch.utils._pytree", "torch.utils.cpp_extension")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _layers(model: nn.Module) -> dict[str, WeightQuantMixin]:
    return {name: m for name, m in model.named_modules() if isinstance(m, WeightQuantMixin)}


def _input_quantizer(name: str, m: nn.Module) -> ActQuantizer:
    q = getattr(m, "input_quant", None)
    if not isinstance(q, ActQuantizer) or q.mode != "quant":
        raise SmiError(f"{name}: its input quantizer is not a converted uniform quantizer; export a quantized model")
    if q.granularity != "tensor" or q.qmax != 255:
        raise SmiError(f"{name}: pt2e runs uint8 per-tensor inputs, this layer's input quantizer is "
                       f"{q.granularity}-wise at {q.bits} bits; use --format onnx")
    return q


def pack(model: nn.Module, float_model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors of the exported file: ``float_model``'s state with ``model``'s values (smi's presets may change
    float parameters, RepQ its LayerNorms), every quantized weight as int8 codes + ``.weight_scale``, every
    quantized layer's ``.input_scale`` / ``.input_zero_point``."""
    sim = {k: v.detach() for k, v in model.state_dict().items()}
    layers = _layers(model)
    tensors: dict[str, torch.Tensor] = {}
    for key in float_model.state_dict():
        if key not in sim:
            raise SmiError(f"the quantized model has no {key!r}: it was not made from this teacher")
        tensors[key] = sim[key].float().contiguous()
    for name, m in layers.items():
        if not m.w_quant:
            raise SmiError(f"{name}: weight is not quantized; export a quantized model")
        q = _input_quantizer(name, m)
        tensors[f"{name}.weight"] = m.int_weight().contiguous()
        tensors[f"{name}.weight_scale"] = m.weight_scale.detach().float().reshape(-1).contiguous()
        tensors[f"{name}.input_scale"] = q.scale.detach().float().reshape(())
        tensors[f"{name}.input_zero_point"] = torch.round(q.zero_point.detach()).float().reshape(())
    return tensors, {"layers": sorted(layers)}


def _on_grid(layer: dict[str, torch.Tensor]) -> torch.Tensor:
    """A quantized layer's float weight: its codes times its per-channel scales (smi's fake-quantized weight)."""
    codes = layer["weight"]
    return codes.float() * layer["weight_scale"].view(-1, *([1] * (codes.dim() - 1)))


def _unpack(tensors: dict[str, torch.Tensor], meta: dict[str, Any], float_model: nn.Module
            ) -> tuple[nn.Module, dict[str, dict[str, torch.Tensor]]]:
    """``float_model``'s architecture holding the file's parameters, quantized weights on their grid (codes times
    scales), and each quantized layer's scales."""
    layers = {name: {k: tensors[f"{name}.{k}"] for k in _LAYER_KEYS} for name in meta["layers"]}
    state = {}
    for key in float_model.state_dict():
        if key not in tensors:
            raise SmiError(f"the exported file has no {key!r}: it was not exported from this teacher")
        state[key] = tensors[key]
    for name, q in layers.items():
        state[f"{name}.weight"] = _on_grid(q)
    twin = copy.deepcopy(float_model).eval()
    twin.load_state_dict(state)
    return twin, layers


def _config():
    """X86InductorQuantizer's default static int8 configuration with min-max observers (seeded, never run)."""
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
    from torchao.quantization.pt2e import MinMaxObserver, PerChannelMinMaxObserver

    base = xiq.get_default_x86_inductor_quantization_config()
    act = dataclasses.replace(base.input_activation, observer_or_fake_quant_ctr=MinMaxObserver.with_args(eps=_EPS))
    weight = dataclasses.replace(base.weight, observer_or_fake_quant_ctr=PerChannelMinMaxObserver.with_args(eps=_EPS))
    quantizer = xiq.X86InductorQuantizer()
    quantizer.set_global(dataclasses.replace(base, input_activation=act, output_activation=None, weight=weight))
    return quantizer


def _module_of(node: torch.fx.Node) -> str | None:
    stack = node.meta.get("nn_module_stack")
    return list(stack.values())[-1][0] if stack else None


def _fix(obs: nn.Module, scale: torch.Tensor, zero: torch.Tensor) -> None:
    """Make an observer report smi's scale and zero point, bit for bit.

    Its range is set to the one that gives them (the observer's own arithmetic in float32 would land within an
    ulp of smi's scale); ``calculate_qparams``, which ``convert_pt2e`` reads, then returns smi's exact values.
    """
    if obs.qscheme in (torch.per_channel_symmetric, torch.per_tensor_symmetric):
        half = (obs.quant_max - obs.quant_min) / 2  # torch's symmetric scale: max|range| / half the levels
        obs.min_val, obs.max_val = -half * scale, half * scale
    else:
        obs.min_val, obs.max_val = (obs.quant_min - zero) * scale, (obs.quant_max - zero) * scale
    exact = (scale.clone(), zero.to(torch.int64).clone())
    obs.calculate_qparams = lambda: exact


@torch.no_grad()
def _seed(prepared: torch.fx.GraphModule, layers: dict[str, dict[str, torch.Tensor]]) -> None:
    """Give every observer ``prepare_pt2e`` inserted smi's scale and zero point for the tensor it observes."""
    seeded = set()
    for node in prepared.graph.nodes:
        if node.op != "call_module" or not str(node.target).startswith("activation_post_process"):
            continue
        users = [_module_of(u) for u in node.users]
        if not users or any(u not in layers for u in users):
            raise SmiError(f"pt2e: X86InductorQuantizer quantizes an input of {users} that no smi quantizer "
                           "accounts for; use --format onnx")
        obs, src = getattr(prepared, node.target), node.args[0]
        if src.op == "get_attr":  # a weight: per output channel, symmetric
            (name,) = set(users)
            q = layers[name]
            if not torch.equal(functools.reduce(getattr, src.target.split("."), prepared), _on_grid(q)):
                raise SmiError(f"pt2e: {name}'s weight is changed before it is quantized (BatchNorm folded into "
                               "it?): smi's scales do not apply; use --format onnx")
            _fix(obs, q["weight_scale"], torch.zeros_like(q["weight_scale"]))
            seeded.add((name, "weight"))
        else:  # an input: per tensor, affine
            params = {(float(layers[u]["input_scale"]), float(layers[u]["input_zero_point"])) for u in users}
            if len(params) != 1:
                raise SmiError(f"pt2e: layers {users} read one tensor at different smi scales; use --format onnx")
            _fix(obs, layers[users[0]]["input_scale"].reshape(1), layers[users[0]]["input_zero_point"].reshape(1))
            seeded.update((u, "input") for u in users)
    missing = sorted({n for n in layers for kind in ("input", "weight") if (n, kind) not in seeded})
    if missing:
        raise SmiError(f"pt2e: X86InductorQuantizer leaves {', '.join(missing)} in float where smi quantizes it; "
                       "use --format onnx")


def integer_graph(tensors: dict[str, torch.Tensor], meta: dict[str, Any], float_model: nn.Module,
                  example: torch.Tensor) -> torch.fx.GraphModule:
    """The converted PT2E graph (quantize/dequantize pairs at smi's scales, int8 weights) of the exported model."""
    with _quiet():
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

        twin, layers = _unpack(tensors, meta, float_model)
        batch = torch.export.Dim("batch", min=1)
        try:
            graph = torch.export.export(twin, (example,), dynamic_shapes=({0: batch},)).module()
        except Exception as e:  # torch.export's own failures on an architecture: one line
            raise SmiError(f"pt2e: torch.export cannot trace this model ({(str(e).splitlines() or ['?'])[0][:200]})"
                           ) from None
        prepared = prepare_pt2e(graph, _config())
        _seed(prepared, layers)
        return convert_pt2e(prepared)


class Compiled(nn.Module):
    """A graph (or any module) compiled by Inductor with freezing: weights become constants, and in a converted
    PT2E graph the quantize/dequantize pairs fuse into int8 kernels."""

    def __init__(self, graph: nn.Module, compiled: bool, bf16: bool = False) -> None:
        super().__init__()
        self.graph_module, self.bf16 = graph, bf16
        # one static compile per batch size: Inductor's int8 convolution lowering fails on a dynamic batch
        self.fn = torch.compile(graph, dynamic=False) if compiled else graph

    def train(self, mode: bool = True) -> Compiled:
        """Inference only: the flag flips, the graph is left alone (an exported graph refuses ``train``/``eval``)."""
        self.training = mode
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch._inductor.config as inductor

        with torch.no_grad(), inductor.patch(freezing=True, cpp_wrapper=True), _quiet(), \
                torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            return self.fn(x.detach().float().cpu()).float()


@EXPORTERS.register("pt2e")
class PT2EExporter(Exporter):
    """torchao PT2E (X86InductorQuantizer) at smi's scales, compiled by Inductor with freezing; int8 weights in a
    safetensors file, the integer model rebuilt on load (the first call of a batch size compiles it)."""

    file_name = "model.safetensors"
    requires = ("torchao",)
    compiled = True  # False: the converted graph runs in eager (reference quantize/dequantize; for tests)
    bf16 = False  # the float operations in bfloat16 (PyTorch's "int8-mixed-bf16")

    def write(self, model: nn.Module, example: torch.Tensor, path: Path, float_model: nn.Module) -> None:
        from safetensors.torch import save

        tensors, meta = pack(model, float_model)
        meta["input_size"] = list(example.shape[1:])
        integer_graph(tensors, meta, float_model, example)  # refuses here what cannot be exported, before writing
        atomic_write_bytes(path, save(tensors, metadata={"smi": json.dumps(meta)}))

    def load(self, path: Path, float_model: nn.Module, threads: int | None = None) -> nn.Module:
        from safetensors import safe_open
        from safetensors.torch import load_file

        try:
            with safe_open(str(path), "pt") as f:
                meta = json.loads((f.metadata() or {})["smi"])
            tensors = load_file(str(path))
        except Exception as e:  # safetensors' own errors, a missing or malformed header
            raise SmiError(f"{path}: not a pt2e export ({(str(e).splitlines() or ['?'])[0][:200]})") from None
        layers, size = meta.get("layers"), meta.get("input_size")
        if not isinstance(layers, list) or not isinstance(size, list) or any(
                f"{n}.{k}" not in tensors for n in layers for k in _LAYER_KEYS):
            raise SmiError(f"{path}: not a pt2e export (its layer list, input size or a layer's scales are missing)")
        example = torch.zeros(2, *size)
        return Compiled(integer_graph(tensors, meta, float_model, example), self.compiled, self.bf16)


@EXPORTERS.register("pt2e-bf16")
class PT2EBf16Exporter(PT2EExporter):
    """pt2e with the float operations (attention products, softmax, norms, GELU, the int8 layers' outputs) in
    bfloat16 under autocast, PyTorch's "int8-mixed-bf16"; for CPUs with native bf16 (AVX512-BF16, AMX)."""

    bf16 = True

