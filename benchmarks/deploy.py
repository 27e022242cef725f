"""Deployment: quantized models exported to integer runtimes, their latency, size and accuracy.

For the shipped teacher and DeiT-Tiny / -Small / -Base (random weights: latency does not depend on
them), W8A8 quantized by smi (``--quantizer``, calibrated on ``--calib``), then exported by every
format in ``smi.quant.export.EXPORTERS``. Latency per batch size of: fp32 eager PyTorch, fp32
compiled by Inductor (with freezing, as the pt2e export is), smi's fake-quant simulation (eager),
fp32 onnxruntime, and each exported integer model, on the same threads (compiles happen in the
warm-up); contenders alternate within each repeat and the table gives medians. Model file sizes
(fp32 safetensors vs the exported file). For the shipped teacher, also top-1 on its whole test split
of the simulation and of each exported model.

Run:  python benchmarks/deploy.py --models fmnist_vit_tiny deit_tiny_patch16_224 deit_small_patch16_224
      (about 30 minutes on 2 CPU cores; DeiT-Base adds as much again)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Cells, publish, test_split  # noqa: E402
from smi.data.sources import parse_source  # noqa: E402
from smi.evaluation import evaluate  # noqa: E402
from smi.models.loading import load_teacher, save_teacher  # noqa: E402
from smi.quant import QuantConfig  # noqa: E402
from smi.quant.export import EXPORTERS, export_quantized, load_exported  # noqa: E402
from smi.quant.pipeline import quantize_teacher  # noqa: E402
from smi.quant.pt2e import Compiled  # noqa: E402

MODELS = ["fmnist_vit_tiny", "deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224"]


def _onnx_fp32(model: torch.nn.Module, example: torch.Tensor, path: Path) -> torch.nn.Module:
    """The float model through onnxruntime: the runtime's own fp32 baseline."""
    from smi.quant.export import _OrtModule, write_onnx

    write_onnx(model, example, path, optimize=True, slim=False)
    return _OrtModule(path)


def _latency(contenders: dict[str, torch.nn.Module], x: torch.Tensor, repeats: int, calls: int) -> dict[str, float]:
    """Median over ``repeats`` of the mean seconds per call, contenders alternating within each repeat."""
    times: dict[str, list[float]] = {k: [] for k in contenders}
    with torch.inference_mode():
        for m in contenders.values():  # warm-up (first-call allocations, onnxruntime's session set-up)
            for _ in range(3):
                m(x)
        for _ in range(repeats):
            for name, m in contenders.items():
                t0 = time.perf_counter()
                for _ in range(calls):
                    m(x)
                times[name].append((time.perf_counter() - t0) / calls)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=MODELS)
    p.add_argument("--quantizer", default="baseline")
    p.add_argument("--bits", default="W8A8")
    p.add_argument("--calib", default="noise", help="calibration source for every model (smi's source syntax)")
    p.add_argument("--calib-images", type=int, default=32)
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--calls", type=int, default=5, help="calls per timed repeat")
    p.add_argument("--name", default="deploy")
    args = p.parse_args()
    w, a = (int(v) for v in args.bits.strip("W").split("A"))
    cells = Cells(args.name)
    rows, table = [], []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name in args.models:
            teacher = load_teacher(name)
            cfg = QuantConfig.create(args.quantizer, w_bits=w, a_bits=a)
            q = quantize_teacher(teacher, cfg, parse_source(args.calib), num_images=args.calib_images, seed=0,
                                 out=tmp / f"{name}_q", progress=False)
            sim = q.model.eval()
            fp32_file = save_teacher(load_teacher(name).model, tmp / f"{name}.safetensors", arch=teacher.arch)
            contenders = {"fp32 eager": load_teacher(name).model.eval(), "fake-quant simulation": sim,
                          "fp32 compiled": Compiled(load_teacher(name).model.eval(), compiled=True)}
            example = torch.randn(2, *teacher.input_size)
            contenders["fp32 onnxruntime"] = _onnx_fp32(load_teacher(name).model.eval(), example,
                                                       tmp / f"{name}_fp32.onnx")
            sizes = {"fp32 safetensors": fp32_file.stat().st_size}
            for fmt in EXPORTERS.names():
                res = export_quantized(load_teacher(name), q.folder, fmt, tmp / f"{name}_{fmt}")
                contenders[f"int {fmt}"], _ = load_exported(res.folder, load_teacher(name))
                sizes[f"int {fmt}"] = res.file.stat().st_size
            accuracy = {}
            if teacher.dataset is not None:
                setting = {"quantizer": args.quantizer, "bits": args.bits, "calib": args.calib,
                           "calib_images": args.calib_images}
                for contender in ["fake-quant simulation", *(f"int {f}" for f in EXPORTERS.names())]:
                    key = f"{name}|{contender}|top1"
                    cell = cells.get(key, setting)
                    if cell is None:
                        data, _ = test_split(teacher)
                        cell = {"setting": setting, "top1": evaluate(contenders[contender], data)["top1"]}
                        cells.put(key, cell)
                    accuracy[contender] = cell["top1"]
            for bs in args.batch_sizes:
                x = torch.randn(bs, *teacher.input_size)
                lat = _latency(contenders, x, args.repeats, args.calls)
                for contender, seconds in lat.items():
                    rows.append({"model": name, "batch": bs, "runtime": contender, "ms": round(1e3 * seconds, 3),
                                 "speedup_vs_fp32_eager": round(lat["fp32 eager"] / seconds, 3),
                                 "bytes": sizes.get(contender), "top1": accuracy.get(contender)})
                    table.append([name, bs, contender, f"{1e3 * seconds:.2f}", f"{lat['fp32 eager'] / seconds:.2f}x",
                                  f"{sizes[contender] / 1e6:.2f}" if contender in sizes else "",
                                  f"{accuracy[contender]:.2f}" if contender in accuracy else ""])
                print(f"{name} batch {bs}: " + ", ".join(f"{k} {1e3 * v:.2f} ms" for k, v in lat.items()),
                      file=sys.stderr, flush=True)
            table.append([name, "", "fp32 safetensors", "", "", f"{sizes['fp32 safetensors'] / 1e6:.2f}", ""])
    header = ["model", "batch", "runtime", "ms / batch", "vs fp32 eager", "file MB", "top-1 (%)"]
    note = (f"\n{args.bits} `{args.quantizer}` calibrated on {args.calib_images} `{args.calib}` images; latency: "
            f"median of {args.repeats} repeats of {args.calls} calls, contenders alternating, "
            f"{torch.get_num_threads()} threads (onnxruntime's intra-op threads the same). DeiTs have random weights "
            "(latency only); top-1 of the shipped teacher on its whole test split.\n")
    publish(args.name, "deploy", vars(args), header, table, note, rows)


if __name__ == "__main__":
    main()
