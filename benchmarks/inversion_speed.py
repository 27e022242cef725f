"""Dense vs sparse inversion of DeiT-Tiny/Small/Base at 224x224: wall time, FLOPs, peak memory.

Cost does not depend on the weights, so the models are randomly initialised (no download).

* Time and memory: each contender runs in a fresh subprocess (so peak RSS is its own), dense
  and sparse alternating, ``--repeats`` times; medians are reported. Iterations are scaled down
  from the paper's 4000 with the stop iterations scaled in proportion (4000 -> 80 keeps
  50/100/200/300 -> 1/2/4/6), so each phase keeps its share of the run.
* Peak memory is the rise of the process's peak RSS over its RSS just before the loop (model
  and data already loaded). "whole run" is the peak over the run. A sparse run optimizes every
  patch before its first stop; by default (``recompute="auto"``) it recomputes the block
  activations in backward until its last stop, so those phases need about the final phase's
  memory; the ``sparse-never`` contender keeps them (its whole-run peak is then about dense's).
  "final phase" runs the sparse loop with the final number of kept patches from the start and
  measures its peak: the memory of the phase that takes 92.5 % of the iterations.
* FLOPs are counted (``torch.utils.flop_counter``) for one forward+backward of each phase and
  summed over the paper's full 4000-iteration schedule.

Run:  python benchmarks/inversion_speed.py            (about 30 min on 2 cores)
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import median, publish  # noqa: E402

MODELS = ["deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224"]
MODES = ["dense", "sparse", "sparse-never"]  # sparse: the default --recompute auto; sparse-never: activations kept
BF16_MODES = ["dense-bf16", "sparse-bf16"]  # with --bf16: the same runs under bfloat16 autocast (--precision bf16)
PAPER_ITERATIONS = 4000


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def child(args: argparse.Namespace) -> None:
    """One timed inversion in this process; prints one JSON line."""
    from smi.inversion.config import InversionConfig, SparsityConfig
    from smi.inversion.engine import invert
    from smi.models.loading import load_teacher

    torch.set_num_threads(args.threads)
    teacher = load_teacher(args.model)
    factor = args.iterations / PAPER_ITERATIONS
    sparsity = SparsityConfig().scaled(factor) if args.mode.startswith("sparse") else SparsityConfig(stops=())
    precision = "bf16" if args.mode.endswith("-bf16") else "fp32"
    cfg = InversionConfig(iterations=args.iterations, batch_size=args.batch_size, sparsity=sparsity,
                          precision=precision)
    targets = torch.arange(args.batch_size) % teacher.num_classes
    gen = torch.Generator().manual_seed(0)
    keep = None
    if args.mode == "final-phase":
        # the sparse loop with the final kept count from the very first step
        n = teacher.model.patch_embed.num_patches
        k_final = SparsityConfig().kept_counts(n)[-1]
        keep = torch.stack([torch.randperm(n, generator=gen)[:k_final] for _ in range(args.batch_size)])
        cfg = InversionConfig(iterations=args.iterations, batch_size=args.batch_size, sparsity=SparsityConfig(()))
    base = _rss_bytes()
    t0 = time.perf_counter()
    batch = invert(teacher, cfg, targets, keep=keep, generator=gen,
                   recompute="never" if args.mode == "sparse-never" else "auto")
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"seconds": seconds, "rss_before": base, "rss_peak": peak, "peak_rise": peak - base,
                      "kept": int(batch.mask[0].sum())}))


def _run_child(model: str, mode: str, args: argparse.Namespace, iterations: int) -> dict:
    cmd = [sys.executable, __file__, "--child", "--model", model, "--mode", mode, "--iterations", str(iterations),
           "--batch-size", str(args.batch_size), "--threads", str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def count_flops(model_name: str, batch: int) -> dict[str, float]:
    """FLOPs of the paper's 4000-iteration schedule, dense and sparse (forward + input backward)."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

    from smi.inversion.config import SparsityConfig
    from smi.models.loading import load_teacher
    from smi.models.sparse import sparse_forward

    aten = torch.ops.aten

    def cpu_sdpa(q, k, v, *args, out_shape=None, **kwargs):
        return sdpa_flop_count(q, k, v)

    def cpu_sdpa_bwd(grad_out, q, k, v, *args, out_shape=None, **kwargs):
        return sdpa_backward_flop_count(grad_out, q, k, v)

    mapping = {aten._scaled_dot_product_flash_attention_for_cpu: cpu_sdpa,
               aten._scaled_dot_product_flash_attention_for_cpu_backward: cpu_sdpa_bwd}
    teacher = load_teacher(model_name)
    model = teacher.model
    n = model.patch_embed.num_patches

    def step_flops(k: int | None, importance: bool = False) -> int:
        x = torch.randn(batch, *teacher.input_size, requires_grad=True)
        idx = None if k is None else torch.arange(k).expand(batch, k)
        with FlopCounterMode(display=False, custom_mapping=mapping) as fc:
            out = sparse_forward(model, x, idx, return_importance=importance) if k is not None else None
            logits = model(x) if k is None else out.logits
            logits.sum().backward()
        return fc.get_total_flops()

    sched = SparsityConfig()
    counts = sched.kept_counts(n)
    bounds = [0] + [it for it, _ in sched.stops] + [PAPER_ITERATIONS]
    dense = PAPER_ITERATIONS * step_flops(None)
    sparse = 0
    for phase, k in enumerate(counts):
        its = bounds[phase + 1] - bounds[phase]
        ranked = 1 if phase < len(sched.stops) else 0  # the stop iteration itself reads attention
        sparse += (its - ranked) * step_flops(k) + ranked * step_flops(k, importance=True)
    return {"dense_tflops": dense / 1e12, "sparse_tflops": sparse / 1e12, "kept_counts": counts}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=MODELS)
    p.add_argument("--batch-size", type=int, default=4, help="images per batch (same for dense and sparse)")
    p.add_argument("--iterations", type=int, default=80, help="scaled from 4000; stops scaled in proportion")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--final-phase-iterations", type=int, default=10)
    p.add_argument("--bf16", action="store_true",
                   help="also time dense and sparse under bfloat16 autocast, alternating with the fp32 runs")
    p.add_argument("--name", default="inversion_speed", help="results/<name>.json and .md")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--mode", choices=MODES + BF16_MODES + ["final-phase"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    if args.iterations % 80:
        p.error("--iterations must be a multiple of 80 so that the stops 50/100/200/300 of 4000 scale to integers")

    modes = MODES + (BF16_MODES if args.bf16 else [])
    rows, table_rows = [], []
    for model in args.models:
        runs = {mode: [] for mode in modes}
        for r in range(args.repeats):
            order = modes[r % len(modes):] + modes[:r % len(modes)]  # rotate who goes first
            for mode in order:
                res = _run_child(model, mode, args, args.iterations)
                runs[mode].append(res)
                print(f"{model} {mode} repeat {r + 1}: {res['seconds']:.1f} s, peak rise "
                      f"{res['peak_rise'] / 2**20:.0f} MiB", file=sys.stderr, flush=True)
        final = _run_child(model, "final-phase", args, args.final_phase_iterations)
        flops = count_flops(model, args.batch_size)
        d_s, s_s = median([x["seconds"] for x in runs["dense"]]), median([x["seconds"] for x in runs["sparse"]])
        speedups = [d["seconds"] / s["seconds"] for d, s in zip(runs["dense"], runs["sparse"], strict=True)]
        d_m = median([x["peak_rise"] for x in runs["dense"]])
        s_m = median([x["peak_rise"] for x in runs["sparse"]])
        n_s = median([x["seconds"] for x in runs["sparse-never"]])
        n_m = median([x["peak_rise"] for x in runs["sparse-never"]])
        row = {
            "model": model, "batch_size": args.batch_size, "iterations": args.iterations,
            "stops": [[max(1, round(it * args.iterations / PAPER_ITERATIONS)), r] for it, r in
                      [(50, 0.3), (100, 0.3), (200, 0.3), (300, 0.3)]],
            "dense_s": round(d_s, 2), "sparse_s": round(s_s, 2), "speedup": round(d_s / s_s, 2),
            "speedup_per_repeat": [round(x, 2) for x in speedups],
            "dense_tflops_4000": round(flops["dense_tflops"], 2),
            "sparse_tflops_4000": round(flops["sparse_tflops"], 2),
            "flops_reduction": round(1 - flops["sparse_tflops"] / flops["dense_tflops"], 4),
            "kept_counts": flops["kept_counts"],
            "dense_peak_mib": round(d_m / 2**20, 1), "sparse_peak_mib": round(s_m / 2**20, 1),
            "memory_reduction": round(1 - s_m / d_m, 4),
            "sparse_never_s": round(n_s, 2), "speedup_never": round(d_s / n_s, 2),
            "sparse_never_peak_mib": round(n_m / 2**20, 1), "memory_reduction_never": round(1 - n_m / d_m, 4),
            "final_phase_peak_mib": round(final["peak_rise"] / 2**20, 1),
            "memory_reduction_final_phase": round(1 - final["peak_rise"] / d_m, 4),
            "dense_runs": runs["dense"], "sparse_runs": runs["sparse"], "sparse_never_runs": runs["sparse-never"],
        }
        if args.bf16:
            db_s = median([x["seconds"] for x in runs["dense-bf16"]])
            sb_s = median([x["seconds"] for x in runs["sparse-bf16"]])
            row.update({"dense_bf16_s": round(db_s, 2), "sparse_bf16_s": round(sb_s, 2),
                        "bf16_speedup_dense": round(d_s / db_s, 2), "bf16_speedup_sparse": round(s_s / sb_s, 2),
                        "sparse_bf16_over_dense_fp32": round(d_s / sb_s, 2),
                        "dense_bf16_runs": runs["dense-bf16"], "sparse_bf16_runs": runs["sparse-bf16"]})
        rows.append(row)
        table_rows.append([
            model, f"{row['dense_s']:.1f}", f"{row['sparse_s']:.1f}", f"**{row['speedup']:.2f}x**",
            f"{row['dense_tflops_4000']:.0f} / {row['sparse_tflops_4000']:.0f}",
            f"{100 * row['flops_reduction']:.1f} %",
            f"{row['dense_peak_mib']:.0f} / {row['sparse_peak_mib']:.0f} ({100 * row['memory_reduction']:.0f} %)",
            f"{row['final_phase_peak_mib']:.0f} ({100 * row['memory_reduction_final_phase']:.0f} %)",
            f"{row['speedup_never']:.2f}x, {row['sparse_never_peak_mib']:.0f} MiB "
            f"({100 * row['memory_reduction_never']:.0f} %)",
        ] + ([f"{row['dense_bf16_s']:.1f} / {row['sparse_bf16_s']:.1f} ({row['bf16_speedup_dense']:.2f}x / "
              f"{row['bf16_speedup_sparse']:.2f}x)", f"{row['sparse_bf16_over_dense_fp32']:.2f}x"]
             if args.bf16 else []))
    header = ["model", "dense s", "sparse s", "speed-up", "TFLOPs dense / sparse (4000 it)", "FLOPs saved",
              "peak MiB dense / sparse, whole run (saved)", "sparse final-phase peak MiB (saved)",
              "sparse with --recompute never: speed-up, whole-run peak (saved)"]
    if args.bf16:
        header += ["bf16 s dense / sparse (over fp32)", "sparse bf16 over dense fp32"]
    note = (f"\nBatch {args.batch_size}, 224x224, {args.iterations} iterations with stops at "
            f"{', '.join(str(s[0]) for s in rows[0]['stops'])} (the paper's 4000 with 50/100/200/300, scaled), "
            f"default ratios 0.3; medians of {args.repeats} alternating runs, each in its own process; CPU, "
            f"{args.threads} threads; random-init weights. FLOPs counted for the full 4000-iteration schedule. "
            "Sparse runs at the default --recompute auto (block activations recomputed in backward until the "
            "last stop; identical images); the last column is the same run keeping them.\n")
    args_kept = {k: v for k, v in vars(args).items() if k not in ("child", "model", "mode")}
    publish(args.name, "inversion_speed", args_kept, header, table_rows, note, rows)


if __name__ == "__main__":
    main()
