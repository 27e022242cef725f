"""Where a step of sparse inversion spends its time, phase by phase (torch.profiler).

For each ``--model`` (default DeiT-Base/224, random weights: cost does not depend on them) and
each phase of the default schedule (196, 137, 95, 66 and 46 of 196 patches kept), the sparse loop
runs with that many patches kept from the start (``invert(..., keep=...)``, the path every
phase takes), ``--warmup`` steps unprofiled and then ``--steps`` steps under ``torch.profiler``.
The first phase is run twice: as it runs by default (``--recompute auto``: block activations
recomputed in backward) and keeping them (``never``); later phases run as the default runs them
(the final phase is never recomputed).

Two tables (``results/NAME.md``): milliseconds per step of each part of the loop, as the engine
labels them with ``record_function`` (view: jitter, flip and token indices; forward; loss: the
recipe's terms and the cross-entropy; backward; adam; project: clamp, restoring stopped pixels,
ranking at a stop); and the operators with the most self time, per phase, with the ratio of
their time in the first phase to the final one (a ratio near 1 is work that does not shrink
with the kept patches; near 196/46 = 4.3 it shrinks in proportion).

Run:  python benchmarks/inversion_profile.py          (about 10 minutes for DeiT-Base on 2 CPU cores)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, schedule

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import publish  # noqa: E402

PARTS = ["smi.view", "smi.forward", "smi.loss", "smi.backward", "smi.adam", "smi.project"]


def profile_phase(teacher, kept: int, args: argparse.Namespace, recompute: str) -> dict:
    """ms per step of each labelled part and of every operator (self time), averaged over the profiled steps."""
    from smi.inversion.config import InversionConfig, SparsityConfig
    from smi.inversion.engine import invert

    n = teacher.model.patch_embed.num_patches
    gen = torch.Generator().manual_seed(0)
    keep = torch.stack([torch.randperm(n, generator=gen)[:kept] for _ in range(args.batch_size)])
    targets = torch.arange(args.batch_size) % teacher.num_classes
    # one step more than the schedule needs: the profiler collects its last active step when stepped past it
    cfg = InversionConfig(iterations=args.warmup + args.steps + 1, batch_size=args.batch_size,
                          sparsity=SparsityConfig(()))
    sched = schedule(wait=0, warmup=args.warmup, active=args.steps, repeat=1)
    with profile(activities=[ProfilerActivity.CPU], schedule=sched) as prof:
        # the first phase of a default run recomputes: reproduce it with a dense schedule and recompute=always
        invert(teacher, cfg, targets, keep=keep, generator=gen,
               recompute="always" if recompute == "auto" and kept > args.final else "never",
               callback=lambda _info: prof.step())
    events = prof.key_averages()
    parts = {e.key: e.cpu_time_total / 1e3 / args.steps for e in events if e.key in PARTS}
    ops = {e.key: e.self_cpu_time_total / 1e3 / args.steps for e in events
           if e.key not in PARTS and e.self_cpu_time_total > 0}
    return {"kept": kept, "recompute": recompute, "parts_ms": parts, "ops_ms": ops,
            "step_ms": sum(parts.get(p, 0.0) for p in PARTS)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="deit_base_patch16_224")
    p.add_argument("--batch-size", type=int, default=4, help="as benchmarks/inversion_speed.py")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--top", type=int, default=14, help="operators listed")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--name", default="inversion_profile")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from smi.inversion.config import SparsityConfig
    from smi.models.loading import load_teacher

    teacher = load_teacher(args.model)
    counts = SparsityConfig().kept_counts(teacher.model.patch_embed.num_patches)
    args.final = counts[-1]
    phases = [profile_phase(teacher, counts[0], args, "never"), profile_phase(teacher, counts[0], args, "auto")]
    phases += [profile_phase(teacher, k, args, "auto") for k in counts[1:]]
    for ph in phases:
        print(f"{ph['kept']} patches, recompute {ph['recompute']}: {ph['step_ms']:.0f} ms/step", file=sys.stderr)

    def title(ph: dict) -> str:
        again = ph["recompute"] == "auto" and ph["kept"] > args.final
        return f"{ph['kept']} kept{' (recomputed)' if again else ''}"

    header = ["part of a step (ms)"] + [title(ph) for ph in phases]
    table = [[name.removeprefix("smi.")] + [f"{ph['parts_ms'].get(name, 0.0):.1f}" for ph in phases]
             for name in PARTS]
    table.append(["**whole step**"] + [f"**{ph['step_ms']:.0f}**" for ph in phases])
    first, final = phases[0], phases[-1]
    top = sorted(first["ops_ms"], key=first["ops_ms"].get, reverse=True)[:args.top]
    top += [k for k in sorted(final["ops_ms"], key=final["ops_ms"].get, reverse=True)[:args.top] if k not in top]
    ops_rows = []
    for op in top:
        a, b = first["ops_ms"].get(op, 0.0), final["ops_ms"].get(op, 0.0)
        ops_rows.append([f"`{op}`", f"{a:.1f}", f"{b:.1f}", f"{a / b:.1f}" if b > 0 else "-",
                         f"{100 * b / final['step_ms']:.1f} %"])
    ops_text = ("\n\nOperators with the most self time (ms per step), first phase (kept activations) against the "
                f"final phase; ratio: first / final ({counts[0]} / {args.final} = {counts[0] / args.final:.1f} "
                "would be in proportion to the kept patches):\n\n"
                + "| operator | all patches | final phase | ratio | share of final step |\n|---|---|---|---|---|\n"
                + "\n".join("| " + " | ".join(r) + " |" for r in ops_rows) + "\n")
    note = (f"\n{args.model}, batch {args.batch_size}, random weights; per phase {args.warmup} warm-up steps then "
            f"{args.steps} profiled (torch.profiler, CPU), milliseconds per step; the profiler adds its own overhead, "
            f"so the parts sum to more than an unprofiled step. {args.threads} threads.\n" + ops_text)
    publish(args.name, "inversion_profile", {k: v for k, v in vars(args).items()}, header, table, note, phases)


if __name__ == "__main__":
    main()
