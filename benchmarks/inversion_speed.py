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
* ``--device cuda``: the wall time is taken after ``torch.cuda.synchronize``, each child first runs three
  untimed steps (kernels loaded, allocator warm), and memory is the rise of
  ``torch.cuda.max_memory_allocated`` over what is allocated before the loop.
* Every finished run is cached in ``results/<name>_cells.json`` with the settings that made it: a restarted
  run only runs what is missing (``--deadline`` stops starting runs that cannot end in time, repeat 1 of
  every model first), and ``--cached-only`` tables what is cached without running anything.

Run:  python benchmarks/inversion_speed.py            (about 30 min on 2 cores)
      bash benchmarks/gpu_speed.sh                    (on a GPU: the paper's batch 32 and 4000 iterations)
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Cells, median, publish  # noqa: E402

MODELS = ["deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224"]
MODES = ["dense", "sparse", "sparse-never"]  # sparse: the default --recompute auto; sparse-never: activations kept
BF16_MODES = ["dense-bf16", "sparse-bf16"]  # with --bf16: the same runs under bfloat16 autocast (--precision bf16)
PAPER_ITERATIONS = 4000
START = time.monotonic()


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _peak_rss_bytes() -> int:
    """This process's own peak RSS (VmHWM). Not ``getrusage``'s ru_maxrss: Linux carries that across fork and
    exec, so a child would report the parent's RSS when it forked (the parent grows by counting FLOPs of the
    models) whenever its own peak is lower."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child(args: argparse.Namespace) -> None:
    """One timed inversion in this process; prints one JSON line."""
    from smi.inversion.config import InversionConfig, SparsityConfig
    from smi.inversion.engine import invert
    from smi.models.loading import load_teacher

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    teacher = load_teacher(args.model, device=device)
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
    recompute = "never" if args.mode == "sparse-never" else "auto"
    if cuda:  # kernels loaded, cuBLAS and the allocator warmed by a few steps of the same run (not timed)
        invert(teacher, InversionConfig(iterations=3, batch_size=args.batch_size, sparsity=SparsityConfig(stops=()),
                                        precision=precision), targets, generator=torch.Generator().manual_seed(1))
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        base = _rss_bytes()
    t0 = time.perf_counter()
    batch = invert(teacher, cfg, targets, keep=keep, generator=gen, recompute=recompute)
    if cuda:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    if cuda:  # the allocator's peak of tensors (what the run needs), not the cached pool
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = _peak_rss_bytes()
    name = torch.cuda.get_device_name(device) if cuda else (platform.processor() or platform.machine())
    print(json.dumps({"seconds": seconds, "mem_before": base, "mem_peak": peak, "peak_rise": peak - base,
                      "kept": int(batch.mask[0].sum()), "device_name": name}))


def _run_child(model: str, mode: str, args: argparse.Namespace, iterations: int) -> dict:
    cmd = [sys.executable, __file__, "--child", "--model", model, "--mode", mode, "--iterations", str(iterations),
           "--batch-size", str(args.batch_size), "--threads", str(args.threads), "--device", args.device]
    left = None if args.deadline is None else args.deadline - (time.monotonic() - START)
    if left is not None and left <= 0:
        raise TimeoutError
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=left)
    except subprocess.TimeoutExpired as e:
        raise TimeoutError from e
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
    dense = PAPER_ITERATIONS * step_flops(None)
    sparse = 0
    for phase, (k, its) in enumerate(zip(counts, _phase_lengths(sched), strict=True)):
        ranked = 1 if phase < len(sched.stops) else 0  # the stop iteration itself reads attention
        sparse += (its - ranked) * step_flops(k) + ranked * step_flops(k, importance=True)
    return {"dense_tflops": dense / 1e12, "sparse_tflops": sparse / 1e12, "kept_counts": counts}


def _phase_lengths(sched) -> list[int]:  # noqa: ANN001
    """Iterations of each phase of ``sched`` over the paper's 4000 (one more phase than stops)."""
    bounds = [0] + [it for it, _ in sched.stops] + [PAPER_ITERATIONS]
    return [b - a for a, b in zip(bounds, bounds[1:], strict=False)]


@functools.cache
def token_ceiling(model_name: str) -> float:
    """Dense over sparse token count of the paper's schedule (tokens = kept patches + prefix tokens, summed over
    the 4000 iterations): the speed-up a sparse run reaches if a step costs in proportion to its tokens (attention's
    quadratic part, which shrinks faster, aside), before any per-step overhead."""
    from smi.inversion.config import SparsityConfig
    from smi.models.loading import load_teacher

    model = load_teacher(model_name).model
    n, prefix = model.patch_embed.num_patches, model.num_prefix_tokens
    sched = SparsityConfig()
    sparse = sum(its * (k + prefix) for k, its in zip(sched.kept_counts(n), _phase_lengths(sched), strict=True))
    return PAPER_ITERATIONS * (n + prefix) / sparse


def _row(model: str, runs: dict[str, list[dict]], final: dict | None, flops: dict | None,
         args: argparse.Namespace) -> dict:
    """One model's row from the runs so far (medians over the repeats each contender finished)."""
    def med(mode: str, key: str) -> float | None:
        return median([x[key] for x in runs[mode]]) if runs.get(mode) else None

    d_s, s_s, d_m, s_m = med("dense", "seconds"), med("sparse", "seconds"), med("dense", "peak_rise"), \
        med("sparse", "peak_rise")
    row: dict = {
        "model": model, "device": args.device, "batch_size": args.batch_size, "iterations": args.iterations,
        "stops": [[max(1, round(it * args.iterations / PAPER_ITERATIONS)), r] for it, r in
                  [(50, 0.3), (100, 0.3), (200, 0.3), (300, 0.3)]],
        "dense_s": round(d_s, 2), "sparse_s": round(s_s, 2), "speedup": round(d_s / s_s, 2),
        "speedup_per_repeat": [round(d["seconds"] / s["seconds"], 2)
                               for d, s in zip(runs["dense"], runs["sparse"], strict=False)],
        "repeats": min(len(runs["dense"]), len(runs["sparse"])),
        "dense_peak_mib": round(d_m / 2**20, 1), "sparse_peak_mib": round(s_m / 2**20, 1),
        "memory_reduction": round(1 - s_m / d_m, 4), "token_ceiling": round(token_ceiling(model), 2),
    }
    if flops:
        row.update({"dense_tflops_4000": round(flops["dense_tflops"], 2),
                    "sparse_tflops_4000": round(flops["sparse_tflops"], 2),
                    "flops_reduction": round(1 - flops["sparse_tflops"] / flops["dense_tflops"], 4),
                    "kept_counts": flops["kept_counts"]})
    if runs.get("sparse-never"):
        n_s, n_m = med("sparse-never", "seconds"), med("sparse-never", "peak_rise")
        row.update({"sparse_never_s": round(n_s, 2), "speedup_never": round(d_s / n_s, 2),
                    "sparse_never_peak_mib": round(n_m / 2**20, 1), "memory_reduction_never": round(1 - n_m / d_m, 4)})
    if final:
        row.update({"final_phase_peak_mib": round(final["peak_rise"] / 2**20, 1),
                    "memory_reduction_final_phase": round(1 - final["peak_rise"] / d_m, 4)})
    if runs.get("dense-bf16") and runs.get("sparse-bf16"):
        db_s, sb_s = med("dense-bf16", "seconds"), med("sparse-bf16", "seconds")
        row.update({"dense_bf16_s": round(db_s, 2), "sparse_bf16_s": round(sb_s, 2),
                    "bf16_speedup_dense": round(d_s / db_s, 2), "bf16_speedup_sparse": round(s_s / sb_s, 2),
                    "speedup_bf16": round(db_s / sb_s, 2), "sparse_bf16_over_dense_fp32": round(d_s / sb_s, 2)})
    row.update({f"{mode.replace('-', '_')}_runs": r for mode, r in runs.items()})
    return row


def _cells(row: dict, bf16: bool) -> list[str]:
    def opt(key: str, fmt) -> str:
        return fmt(row) if key in row else "–"

    cells = [row["model"], f"{row['dense_s']:.1f}", f"{row['sparse_s']:.1f}", f"**{row['speedup']:.2f}x**",
             f"{row['token_ceiling']:.2f}x" + (f" / {row['dense_tflops_4000'] / row['sparse_tflops_4000']:.2f}x"
                                               if "dense_tflops_4000" in row else ""),
             opt("dense_tflops_4000", lambda r: f"{r['dense_tflops_4000']:.0f} / {r['sparse_tflops_4000']:.0f}"),
             opt("flops_reduction", lambda r: f"{100 * r['flops_reduction']:.1f} %"),
             f"{row['dense_peak_mib']:.0f} / {row['sparse_peak_mib']:.0f} ({100 * row['memory_reduction']:.0f} %)",
             opt("final_phase_peak_mib", lambda r: f"{r['final_phase_peak_mib']:.0f} "
                                                    f"({100 * r['memory_reduction_final_phase']:.0f} %)"),
             opt("speedup_never", lambda r: f"{r['speedup_never']:.2f}x, {r['sparse_never_peak_mib']:.0f} MiB "
                                            f"({100 * r['memory_reduction_never']:.0f} %)")]
    if bf16:
        cells += [opt("dense_bf16_s", lambda r: f"{r['dense_bf16_s']:.1f} / {r['sparse_bf16_s']:.1f} = "
                                                f"**{r['speedup_bf16']:.2f}x** ({r['bf16_speedup_dense']:.2f}x / "
                                                f"{r['bf16_speedup_sparse']:.2f}x over fp32)"),
                  opt("sparse_bf16_over_dense_fp32", lambda r: f"{r['sparse_bf16_over_dense_fp32']:.2f}x")]
    return cells


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
    p.add_argument("--modes", nargs="+", choices=MODES + BF16_MODES, default=None,
                   help=f"contenders (default {' '.join(MODES)}, plus the bf16 ones with --bf16); dense and sparse "
                        "are always among them")
    p.add_argument("--device", default="cpu", help="cpu, or cuda: time on a GPU; memory is then "
                                                   "torch.cuda.max_memory_allocated's rise over the loop")
    p.add_argument("--no-flops", action="store_true", help="skip counting FLOPs (they do not depend on the device)")
    p.add_argument("--deadline", type=float, default=None,
                   help="seconds: start no run that cannot end by then; the tables hold the repeats that finished "
                        "(repeat 1 of every model first)")
    p.add_argument("--cached-only", action="store_true",
                   help="run nothing: write the tables from the runs cached in results/<name>_cells.json (for "
                        "example runs made on a GPU machine, tabled on a machine without one)")
    p.add_argument("--name", default="inversion_speed",
                   help="results/<name>.json and .md; finished runs are cached in results/<name>_cells.json, so a "
                        "rerun with the same settings only runs what is missing")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--mode", choices=MODES + BF16_MODES + ["final-phase"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    if args.iterations % 80:
        p.error("--iterations must be a multiple of 80 so that the stops 50/100/200/300 of 4000 scale to integers")

    modes = args.modes or MODES + (BF16_MODES if args.bf16 else [])
    modes = ["dense", "sparse"] + [m for m in modes if m not in ("dense", "sparse")]
    bf16 = any(m.endswith("-bf16") for m in modes)
    device_type = torch.device(args.device).type
    cuda = device_type == "cuda"
    runs = {model: {mode: [] for mode in modes} for model in args.models}
    finals: dict[str, dict] = {}
    flops: dict[str, dict] = {}
    failed: set[tuple[str, str]] = set()
    cells = Cells(args.name)

    def run(model: str, mode: str, repeat: int, iterations: int) -> dict | None:
        """The cached run, else a fresh one (cached as soon as it ends); None with --cached-only and no cache, or
        when this contender failed (say, out of memory: reported once, and the others' rows stay)."""
        if (model, mode) in failed:
            return None
        key = f"{model}|{mode}|{repeat}"
        setting = {"device": device_type, "batch_size": args.batch_size, "iterations": iterations,
                   **({} if cuda else {"threads": args.threads})}  # on a GPU the host's threads do not enter
        cell = cells.get(key, setting)
        if cell is not None:
            return cell["result"]
        if args.cached_only:
            return None
        try:
            res = _run_child(model, mode, args, iterations)
        except RuntimeError as e:
            print(e, file=sys.stderr)
            failed.add((model, mode))
            return None
        cells.put(key, {"setting": setting, "result": res})
        return res

    def write() -> None:
        rows = [_row(m, runs[m], finals.get(m), flops.get(m), args) for m in args.models
                if runs[m]["dense"] and runs[m]["sparse"]]
        if not rows:
            return
        header = ["model", "dense s", "sparse s", "speed-up", "ceiling: tokens / FLOPs",
                  "TFLOPs dense / sparse (4000 it)", "FLOPs saved",
                  "peak MiB dense / sparse, whole run (saved)", "sparse final-phase peak MiB (saved)",
                  "sparse with --recompute never: speed-up, whole-run peak (saved)"]
        if bf16:
            header += ["bf16 s dense / sparse = speed-up", "sparse bf16 over dense fp32"]
        names = sorted({x.get("device_name", "?") for m in args.models for rs in runs[m].values() for x in rs})
        where = (f"GPU {', '.join(names)}; memory is the rise of "
                 "torch.cuda.max_memory_allocated over the allocated memory before the loop (model loaded; the "
                 "host's CPU threads do not enter)" if cuda else
                 f"CPU, {args.threads} threads; memory is the rise of the process's peak RSS over its RSS before the "
                 "loop (model and data loaded)")
        reps = sorted({r["repeats"] for r in rows})
        note = (f"\nBatch {args.batch_size}, 224x224, {args.iterations} iterations with stops at "
                f"{', '.join(str(s[0]) for s in rows[0]['stops'])} (the paper's 4000 with 50/100/200/300"
                f"{', scaled' if args.iterations != PAPER_ITERATIONS else ''}), default ratios 0.3; "
                f"{'one run of each contender' if reps == [1] else 'medians of ' + '/'.join(map(str, reps)) + ' runs'}"
                f", alternating, each in its own process; {where}; random-init weights. "
                f"{'' if args.no_flops else 'FLOPs counted for the full 4000-iteration schedule. '}"
                "Ceilings: the dense/sparse ratio of tokens (kept patches + class token) and of counted FLOPs over "
                "the schedule, what the speed-up would be if a step cost in proportion to either. "
                "Sparse runs at the default --recompute auto "
                "(block activations recomputed in backward until the last stop; identical images); the "
                "'--recompute never' column is the same run keeping them.\n")
        args_kept = {k: v for k, v in vars(args).items() if k not in ("child", "model", "mode")}
        publish(args.name, "inversion_speed", args_kept, header, [_cells(r, bf16) for r in rows], note, rows)

    try:
        for r in range(args.repeats):
            for model in args.models:
                order = modes[r % len(modes):] + modes[:r % len(modes)]  # rotate who goes first
                for mode in order:
                    res = run(model, mode, r, args.iterations)
                    if res is None:
                        continue
                    runs[model][mode].append(res)
                    print(f"{model} {mode} repeat {r + 1}: {res['seconds']:.1f} s, peak rise "
                          f"{res['peak_rise'] / 2**20:.0f} MiB ({time.monotonic() - START:.0f} s so far)",
                          file=sys.stderr, flush=True)
                if r == 0:
                    final = run(model, "final-phase", 0, args.final_phase_iterations)
                    if final is not None:
                        finals[model] = final
                    if not args.no_flops:
                        flops[model] = count_flops(model, args.batch_size)
                write()
    except TimeoutError:
        print(f"deadline of {args.deadline:.0f} s reached: the tables hold the runs that finished", file=sys.stderr)
        write()
    if args.cached_only:
        write()


if __name__ == "__main__":
    main()
