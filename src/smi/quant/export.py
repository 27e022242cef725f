"""Export a quantized model so that a runtime executes it in integers: ``smi export``.

smi's quantized models are simulations (fake quantization in float). An exporter turns a converted
model into a file an integer runtime runs, at **smi's own calibrated scales** (nothing is
recalibrated): one class per format, registered in :data:`EXPORTERS`.

``onnx``: the graph of the quantized model in ONNX with QuantizeLinear / DequantizeLinear pairs
(the "QDQ" form onnxruntime fuses into integer kernels): every per-tensor activation quantizer becomes
a uint8 Q/DQ pair with its scale and zero point (a width below 8 bits is a clamp to its range before
the pair, which is the same function), every weight is stored as its int8 codes with a
DequantizeLinear per output channel. Per-head and per-channel activation quantizers (RepQ's attention
operands) and RepQ's log-sqrt(2) softmax quantizer stay float operations computing the same values:
onnxruntime's integer matmul takes one zero point per operand, and ONNX has no log-domain type. The
result is checked against the simulation when it is written.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from smi.errors import SmiError
from smi.models.loading import Teacher
from smi.quant.modules import WeightQuantMixin
from smi.quant.quantizers import ActQuantizer, LogSqrt2Quantizer
from smi.registry import Registry
from smi.utils.io import atomic_write_bytes, atomic_write_json, claim_folder, read_format_json

__all__ = ["EXPORTERS", "EXPORT_FORMAT", "ExportResult", "export_quantized", "load_exported"]

EXPORT_FORMAT = "smi-export/1"
META = "export.json"
EXPORTERS: Registry[type[Exporter]] = Registry("export format")


@dataclass
class ExportResult:
    folder: Path
    file: Path
    agreement: dict[str, float]  # the exported model against the simulation on the check batch


class Exporter:
    """One export format: ``write`` a converted quantized model to a file, ``load`` it as a callable module."""

    file_name: str
    requires: tuple[str, ...] = ()  # importable modules the format needs

    @classmethod
    def check_available(cls) -> None:
        import importlib.util

        missing = [m for m in cls.requires if importlib.util.find_spec(m) is None]
        if missing:
            raise SmiError(f"exporting needs {', '.join(missing)}, which is not installed: "
                           f"pip install 'smi[export]'")

    def write(self, model: nn.Module, example: torch.Tensor, path: Path, float_model: nn.Module) -> None:
        """Write ``model`` (converted, quantized) to ``path``; ``float_model`` is a float copy of the teacher."""
        raise NotImplementedError

    def load(self, path: Path, float_model: nn.Module, threads: int | None = None) -> nn.Module:
        """The integer model in ``path`` as a module; ``float_model`` is the teacher's (its architecture)."""
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------------------------------
# ONNX with QuantizeLinear / DequantizeLinear


def _qdq_ops():
    """torch's ``quantized_decomposed`` operators (PT2E's quantize / dequantize), which torch.export traces and
    the ONNX exporter translates to QuantizeLinear / DequantizeLinear."""
    import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers the operators)

    return torch.ops.quantized_decomposed


class _QDQ(nn.Module):
    """A frozen uniform activation quantizer; per tensor, a quantize / dequantize pair of uint8 (Q/DQ in ONNX).

    The pair's range is uint8's, so a narrower width is first clamped to its own range (the same function
    as smi's clamp of the codes).
    """

    def __init__(self, q: ActQuantizer) -> None:
        super().__init__()
        self.granularity = q.granularity
        scale, zero = q.scale.detach().float(), torch.round(q.zero_point.detach()).float()
        self.clamp, self.qmax = q.qmax < 255, q.qmax
        self.scale_value, self.zero_value = float(scale.reshape(-1)[0]), int(zero.reshape(-1)[0])
        if q.granularity == "head":  # (B, heads, N, d)
            scale, zero = scale.view(1, -1, 1, 1), zero.view(1, -1, 1, 1)
        self.register_buffer("scale_b", scale)  # a scalar, (C,) over the last dimension, or (1, heads, 1, 1)
        self.register_buffer("zero_b", zero)
        self.lo_value = -self.zero_value * self.scale_value
        self.hi_value = (q.qmax - self.zero_value) * self.scale_value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.granularity != "tensor":  # onnxruntime's integer matmul takes one zero point per operand: these
            # (RepQ's per-head attention operands) stay float operators computing the same codes
            return (torch.clamp(torch.round(x / self.scale_b) + self.zero_b, 0, self.qmax) - self.zero_b) * self.scale_b
        if self.clamp:
            x = torch.clamp(x, self.lo_value, self.hi_value)
        ops = _qdq_ops()
        q = ops.quantize_per_tensor(x, self.scale_value, self.zero_value, 0, 255, torch.uint8)
        return ops.dequantize_per_tensor(q, self.scale_value, self.zero_value, 0, 255, torch.uint8)


class _LogSqrt2(nn.Module):
    """:class:`LogSqrt2Quantizer`'s function in plain float operators (ONNX has no log-domain integer type)."""

    def __init__(self, q: LogSqrt2Quantizer) -> None:
        super().__init__()
        self.levels = 2**q.bits - 1
        self.register_buffer("scale", q.scale.detach().float().reshape(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = torch.round(torch.log(torch.clamp(x / self.scale, min=1e-30)) * (-2.0 / math.log(2.0)))
        out = torch.pow(2.0, torch.clamp(k, 0, self.levels) * -0.5) * self.scale
        return torch.where(k > self.levels, torch.zeros_like(out), out)


def _int_weight(m: WeightQuantMixin) -> None:
    """Give a quantized layer its int8 weight codes and per-channel scales as buffers and a ``qweight`` that
    dequantizes them: the exported file holds int8 weights, each read through one DequantizeLinear."""
    m.register_buffer("weight_codes", m.int_weight())
    m.register_buffer("weight_scale_1d", m.weight_scale.detach().float().reshape(-1))
    m.register_buffer("weight_zero_1d", torch.zeros(m.weight_scale.numel(), dtype=torch.int64))
    ops = _qdq_ops()

    def qweight() -> torch.Tensor:
        return ops.dequantize_per_channel(m.weight_codes, m.weight_scale_1d, m.weight_zero_1d, 0, -128, 127,
                                          torch.int8)

    m.qweight = qweight  # type: ignore[method-assign]


def exportable(model: nn.Module) -> nn.Module:
    """A copy of a converted quantized model whose quantizers are operators the ONNX exporter understands."""
    out = copy.deepcopy(model).eval()
    for name, m in list(out.named_modules()):
        for cname, child in list(m.named_children()):
            if isinstance(child, ActQuantizer):
                if child.mode != "quant":
                    raise SmiError(f"{name}.{cname}: activation quantizer is not converted; export a quantized model")
                if isinstance(child.scale, nn.Parameter):
                    child.learnable_(False)
                setattr(m, cname, _QDQ(child))
            elif isinstance(child, LogSqrt2Quantizer):
                setattr(m, cname, _LogSqrt2(child))
        if isinstance(m, WeightQuantMixin):
            if not m.w_quant:
                raise SmiError(f"{name}: weight is not quantized; export a quantized model")
            _int_weight(m)
    return out


def _slim(proto: Any) -> Any:
    """Without the exporter's optimizer (whose constant folding would turn the int8 weights back into floats),
    every state tensor stays in the file, the float weights and smi's observer statistics too: drop what no node
    reads, and the per-node provenance the exporter records."""
    graph = proto.graph
    used = {name for n in graph.node for name in n.input} | {o.name for o in graph.output}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    inputs = [i for i in graph.input if i.name in used]
    del graph.input[:]
    graph.input.extend(inputs)
    for node in graph.node:  # the exporter's per-node provenance (stack traces, local paths): most of the bytes
        del node.metadata_props[:]
        node.doc_string = ""
    return proto


def write_onnx(model: nn.Module, example: torch.Tensor, path: Path, *, optimize: bool, slim: bool) -> None:
    """``model`` as ONNX (input ``image``, any batch size) written atomically to ``path``. ``optimize`` runs the
    exporter's optimizer (constant folding: right for a float model, wrong for int8 weights); ``slim`` drops
    unread state and per-node provenance (:func:`_slim`)."""
    import io
    import warnings

    import onnx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, (example,), dynamo=True, optimize=optimize, verbose=False,
                                    input_names=["image"], output_names=["logits"],
                                    dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    buf = io.BytesIO()
    onnx.save(_slim(program.model_proto) if slim else program.model_proto, buf)
    atomic_write_bytes(path, buf.getvalue())


@EXPORTERS.register("onnx")
class OnnxExporter(Exporter):
    """ONNX with QuantizeLinear/DequantizeLinear at smi's scales (int8 weights), run by onnxruntime."""

    file_name = "model.onnx"
    requires = ("onnx", "onnxscript", "onnxruntime")

    def write(self, model: nn.Module, example: torch.Tensor, path: Path, float_model: nn.Module) -> None:
        write_onnx(exportable(model), example, path, optimize=False, slim=True)

    def load(self, path: Path, float_model: nn.Module, threads: int | None = None) -> nn.Module:
        return _OrtModule(path, threads)


class _OrtModule(nn.Module):
    """An onnxruntime session behind a module's call: images in, logits out (CPU tensors)."""

    def __init__(self, path: Path, threads: int | None = None) -> None:
        super().__init__()
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or torch.get_num_threads()
        opts.inter_op_num_threads = 1
        # idle runtime threads sleep instead of spinning: a spinning pool would take the cores from torch's own
        # threads running next in the same process (a timing of anything after an onnxruntime call, data loading)
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime's own error types: the file is what is wrong
            raise SmiError(f"{path}: onnxruntime cannot load it ({(str(e).splitlines() or ['?'])[0][:200]})") from None
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        try:
            out = self.session.run(None, {self.input_name: x.detach().float().cpu().contiguous().numpy()})[0]
        except Exception as e:  # onnxruntime's own error types
            raise SmiError(f"onnxruntime cannot run the exported model: "
                           f"{(str(e).splitlines() or ['?'])[0][:300]}") from None
        return torch.from_numpy(out)


# ---------------------------------------------------------------------------------------------------------------------


def _agreement(reference: torch.Tensor, exported: torch.Tensor) -> dict[str, float]:
    """How close the exported model's outputs are to the simulation's (logits or per-pixel logits)."""
    ref, out = reference.float(), exported.float()
    return {"argmax_agreement": float((ref.argmax(1) == out.argmax(1)).float().mean()),
            "max_abs_diff": float((ref - out).abs().max()),
            "logit_range": float(ref.abs().max())}


def export_quantized(teacher: Teacher, quantized: str | Path, fmt: str, out: str | Path, *,
                     check_images: torch.Tensor | None = None, overwrite: bool = False) -> ExportResult:
    """Export the quantized model in ``quantized`` (a folder ``smi quantize`` wrote for ``teacher``) as ``fmt``
    into the folder ``out``: the model file and ``export.json`` (format, teacher, quantization config, how the
    exported model agreed with the simulation on ``check_images``, by default 8 images of noise).
    ``teacher.model`` is quantized in place on the way (as :func:`~smi.quant.io.load_quantized` does)."""
    from smi.quant.io import load_quantized

    exporter_cls = EXPORTERS.get(fmt, param="format")
    exporter_cls.check_available()
    folder = claim_folder(out, (META,), "export", EXPORT_FORMAT)
    if (folder / META).exists() and not overwrite and read_format_json(folder / META, EXPORT_FORMAT, "export"
                                                                        ).get("file"):
        raise SmiError(f"{folder} already holds an export; use another folder or --overwrite", param="out")
    float_model = copy.deepcopy(teacher.model).eval()  # before load_quantized quantizes teacher.model in place
    model, meta = load_quantized(quantized, teacher)
    model.eval()
    images = check_images if check_images is not None else \
        torch.randn(8, *teacher.input_size, generator=torch.Generator().manual_seed(0))
    exporter = exporter_cls()
    folder.mkdir(parents=True, exist_ok=True)
    # claims the folder; "file" stays null until the export is written and checked (a rerun may then replace it)
    atomic_write_json(folder / META, {"format": EXPORT_FORMAT, "export": fmt, "file": None})
    path = folder / exporter_cls.file_name
    try:
        exporter.write(model, images[:2], path, float_model)
    except SmiError:
        raise
    except Exception as e:  # the exporter's own failure on this model: one line, not a traceback
        raise SmiError(f"cannot export {teacher.spec} as {fmt}: {(str(e).splitlines() or [type(e).__name__])[0][:300]}"
                       ) from None
    with torch.no_grad():
        agreement = _agreement(model(images), exporter.load(path, float_model)(images))
    atomic_write_json(folder / META, {"format": EXPORT_FORMAT, "export": fmt, "file": path.name,
                                      "teacher": teacher.identity(), "quantization": meta["config"],
                                      "quantized_from": str(Path(quantized)), "check": agreement})
    return ExportResult(folder, path, agreement)


def load_exported(folder: str | Path, teacher: Teacher, threads: int | None = None) -> tuple[nn.Module, dict]:
    """The exported model in ``folder`` (``smi export --out``) as a module, after checking it is ``teacher``'s."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SmiError(f"export folder {folder} does not exist" if not folder.exists()
                       else f"{folder} is a file; give the folder `smi export --out` wrote")
    meta = read_format_json(folder / META, EXPORT_FORMAT, "export")
    if not isinstance(meta.get("file"), str) or not isinstance(meta.get("teacher"), dict):
        raise SmiError(f"{folder / META}: names no exported file (an export that did not finish?)")
    if meta["teacher"].get("fingerprint") != teacher.fingerprint:
        raise SmiError(f"{folder} was exported from {meta['teacher'].get('spec')}, not from {teacher.spec} "
                       "(teacher fingerprints differ)")
    exporter_cls = EXPORTERS.get(str(meta.get("export")), param="exported")
    exporter_cls.check_available()
    path = folder / meta["file"]
    if path.name != meta["file"] or not path.is_file():
        raise SmiError(f"{folder}: the exported file {meta['file']!r} is not there")
    return exporter_cls().load(path, teacher.model.eval(), threads), json.loads(json.dumps(meta))


from smi.quant import pt2e as _pt2e  # noqa: E402,F401  (registers the pt2e format)
