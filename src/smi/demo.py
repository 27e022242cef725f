"""The demo that ``make demo`` runs: invert a teacher dense and sparse, then quantize and distil from its images.

Any teacher whose checkpoint records its dataset (or with ``data=``) gets every section; without a
dataset the demo inverts only, and says so.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import torch

from smi.data.datasets import eval_dataset
from smi.data.pool import load_pool
from smi.data.sources import PoolSource, RealSource
from smi.errors import SmiError
from smi.evaluation import evaluate, teacher_accuracy_on_pool
from smi.inversion.config import InversionConfig, SparsityConfig
from smi.inversion.engine import StepInfo
from smi.inversion.synthesis import OnlineSource, synthesize
from smi.models.loading import Teacher, load_teacher
from smi.models.sparse import check_sparse_capable

__all__ = ["run_demo"]


def run_demo(out: str | Path = "demo_out", model: str = "fmnist_vit_tiny", num_images: int = 32,
             iterations: int = 1000, device: str = "cpu", distill_seconds: float = 120.0,
             data: str | None = None, student: str | None = None,
             distill_teacher: str | None = None) -> dict[str, Any]:
    """Dense and sparse inversion of one batch; prints a short report.

    The paper's batch (32) and stopping schedule (50/100/200/300, 0.3 each), with 1000 instead of
    4000 iterations by default so that the whole demo stays within a few minutes on 2 CPU cores.
    The distillation section distils ``distill_teacher`` (default: ``model``) into a fresh ``student``
    (default: :data:`STUDENTS`, else fmnist_vit_mini).
    """
    out = Path(out)
    # built first so that a bad --iterations fails before any work (the last stop is at 300)
    configs = {name: InversionConfig(iterations=iterations, batch_size=num_images, sparsity=sparsity)
               for name, sparsity in (("dense", SparsityConfig(())), ("sparse", SparsityConfig()))}
    teacher = load_teacher(model, device=device)
    data = data or teacher.dataset  # a bad --data fails in eval_dataset below, before any inversion
    kd_name = distill_teacher or model  # loaded now: a bad name fails before any work
    kd_teacher = teacher if kd_name == model or data is None else load_teacher(kd_name, device=device)
    report: dict[str, Any] = {}
    params = f"{sum(p.numel() for p in teacher.model.parameters()) / 1e6:.2f} M parameters"
    if data is not None:
        test = eval_dataset(data, teacher)
        res = evaluate(teacher.model, test, batch_size=500, device=device, progress=False)
        report["teacher_test_top1"] = res["top1"]
        print(f"teacher {model}: {params}, {res['top1']:.2f} % top-1 on the {res['n']:,} test images of {data}")
    else:
        print(f"teacher {model}: {params}; it records no dataset, so the demo inverts only (quantization and "
              "distillation need real test images: give --data)")
    for name, cfg in configs.items():
        t0 = time.perf_counter()
        steps = StepClock()
        res = synthesize(teacher, cfg, num_images, out / f"pool_{name}", device=device, overwrite=True,
                         callback=steps)
        pool = load_pool(res.folder)
        report[name] = {"seconds": res.seconds, "wall_s": time.perf_counter() - t0, "median_s": steps.estimate(),
                        "teacher_top1_on_synthetic": teacher_accuracy_on_pool(teacher, pool),
                        "patches_kept": int(pool.masks[0].sum()), "patches": pool.masks.shape[1],
                        "folder": str(res.folder), "grid": str(res.grid)}
    d, s = report["dense"], report["sparse"]
    print(f"\n{'':8}{'inversion s':>12}{'patches kept':>14}{'teacher top-1 on its images':>30}")
    for name in ("dense", "sparse"):
        r = report[name]
        print(f"{name:8}{r['seconds']:12.1f}{r['patches_kept']:>9}/{r['patches']:<4}"
              f"{r['teacher_top1_on_synthetic']:29.1f} %")
    report["threads"] = torch.get_num_threads()
    if d["median_s"] and s["median_s"]:
        report["speedup"] = d["median_s"] / s["median_s"]
        how = ("from the median step time of each phase, so a burst of other load cannot skew it; wall clock "
               f"{d['seconds']:.1f} s vs {s['seconds']:.1f} s")
    else:  # both pools were already there (the same demo again): the times they recorded
        report["speedup"] = d["seconds"] / s["seconds"]
        how = "from the times the existing pools recorded"
    print(f"\nsparse inversion was {report['speedup']:.2f}x faster than dense ({num_images} images, {iterations} "
          f"iterations, batch {num_images}, {device}, {report['threads']} threads; {how})")
    print(f"grids: {d['grid']}  {s['grid']}")
    print(f"pools: {d['folder']}  {s['folder']}")
    if data is not None:
        report["quantized"] = _quantization_demo(teacher, s["folder"], num_images, device,
                                                 report["teacher_test_top1"], data)
        report["distilled"] = _distillation_demo(kd_teacher, out / "distill", device, distill_seconds, data,
                                                 student or STUDENTS.get(kd_name, "fmnist_vit_mini"),
                                                 report["teacher_test_top1"] if kd_teacher is teacher else None)
    return report


class StepClock:
    """A step callback that times every step; :meth:`estimate` is the run's time from per-phase medians.

    A phase is a stretch of steps with the same number of kept patches; its median step time
    times its length is what the phase costs without the outliers another process's burst adds.
    """

    def __init__(self) -> None:
        self.last = time.perf_counter()
        self.steps: list[tuple[int, float]] = []

    def __call__(self, info: StepInfo) -> None:
        now = time.perf_counter()
        self.steps.append((info.kept, now - self.last))
        self.last = now

    def estimate(self) -> float | None:
        """None when no step ran (the pool was already complete)."""
        if len(self.steps) < 2:
            return None
        phases: dict[int, list[float]] = {}
        for kept, dt in self.steps[1:]:  # the first step includes start-up work
            phases.setdefault(kept, []).append(dt)
        return sum(statistics.median(dts) * len(dts) for dts in phases.values())


# the shipped ViT's sparse synthetic images teach a fresh ViT of its own architecture within the demo's two
# minutes once the student sees them colour-shifted and follows the teacher's attention head by head (README,
# "Data-free knowledge transfer"); the shipped CNN's teach a fresh CNN of its own architecture
STUDENTS = {"fmnist_resnet_tiny": "fmnist_resnet_tiny",
            "fmnist_vit_tiny": "fmnist_vit_tiny"}  # distillation teacher -> default student (else fmnist_vit_mini)


def _distillation_demo(teacher: Teacher, out: Path, device: str, budget: float, data: str,
                       student: str, teacher_top1: float | None) -> dict[str, Any]:
    """A short online distillation into a fresh ``student`` (sparse synthesis where the teacher allows it), with its
    accuracy plot: 128 images of 200 inversion steps per epoch, then 200 training steps with mixup; a sparse
    run's student also sees colour-shifted batches and, when both are ViTs on one patch grid, learns the
    teacher's attention (weight 10)."""
    from smi.transfer import DistillConfig, build_student, distill
    from smi.transfer.loop import attention_pairs

    iterations = 200
    try:  # sparse where the teacher allows it (a timm ViT reading each patch on its own), else dense
        check_sparse_capable(teacher.model)
        sparse = True
    except SmiError:
        sparse = False
    synthesis = InversionConfig(iterations=iterations, batch_size=128,
                                sparsity=SparsityConfig().scaled(iterations / 4000) if sparse else SparsityConfig(()))
    fresh = build_student(student, teacher, device=device)
    attention = 0.0
    if sparse:
        try:
            attention_pairs(teacher.model, fresh.model)
            attention = 10.0
        except SmiError:  # another kind of student: logits only
            pass
    cfg = DistillConfig(epochs=1000, lr_schedule="constant", steps_per_epoch=200, mixup=1.0, time_budget_s=budget,
                        color_shift=2.0 if sparse else 0.0, attention=attention)
    if teacher_top1 is None:  # another teacher than the demo's, not measured yet
        teacher_top1 = evaluate(teacher.model, eval_dataset(data, teacher), batch_size=500, device=device,
                                progress=False)["top1"]
    print(f"\ndata-free distillation: {teacher.spec} ({teacher_top1:.2f} % top-1) into a fresh {student} (online, "
          f"{'sparse' if sparse else 'dense'} synthesis{'' if sparse else ' with the BatchNorm prior'}, "
          + ("colour-shifted batches, " if cfg.color_shift else "") + ("attention transfer, " if attention else "")
          + f"{budget:.0f} s budget)")
    res = distill(teacher, fresh, OnlineSource(synthesis), out,
                  cfg, eval_data=data, device=device, overwrite=True)
    print(f"student top-1 {res.top1:.2f} % after {res.wall_s:.0f} s and {res.log[-1]['images']} synthetic images "
          f"(teacher {teacher_top1:.2f} %); plot: {res.plot}")
    return {"teacher": teacher.spec, "teacher_top1": teacher_top1, "student": student, "top1": res.top1,
            "wall_s": res.wall_s, "images": res.log[-1]["images"], "plot": str(res.plot)}


def _quantization_demo(teacher: Teacher, sparse_pool: str, num_images: int, device: str,
                       fp32_top1: float, dataset: str) -> list[dict[str, Any]]:
    """W8A8 and W4A8 calibrated on the sparse pool, beside real-data calibration and FP32."""
    from smi.quant import BaselineConfig
    from smi.quant.pipeline import quantize_and_evaluate

    data = eval_dataset(dataset, teacher)
    rows = []
    print(f"\ndata-free quantization ({num_images} calibration images, baseline quantizer, "
          f"top-1 on the {len(data):,} test images)")
    print(f"{'':8}{'sparse synthetic':>18}{'real images':>14}")
    for w, a in ((8, 8), (4, 8)):
        cfg = BaselineConfig(w_bits=w, a_bits=a)
        syn = quantize_and_evaluate(teacher, cfg, PoolSource(sparse_pool), data, calib_images=num_images,
                                    device=device)
        real = quantize_and_evaluate(teacher, cfg, RealSource(dataset), data, calib_images=num_images, device=device)
        rows.append({"w_bits": w, "a_bits": a, "sparse_synthetic": syn["top1"], "real": real["top1"]})
        print(f"W{w}A{a}{'':4}{syn['top1']:17.2f}%{real['top1']:13.2f}%")
    print(f"FP32{'':4}{fp32_top1:17.2f}%{fp32_top1:13.2f}%")
    return rows
