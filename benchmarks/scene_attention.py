"""Does the scene teacher's attention keep the object? Sparse inversion's patch ranking on real test scenes.

Sparse inversion stops the patches a ViT attends to least, on the assumption that they are
background. This script applies the same ranking (``smi.models.sparse.rank_patches``: the
stopping schedule's kept counts, each stop ranked by the last block's class-token attention over
the patches still kept) to the *real* test scenes of ``fmnist-scenes``, whose object masks are
known, and reports:

- the share of kept patches that touch the object (any object pixel) and that are mostly object
  (at least half of its pixels), against the same shares over all patches (what a random choice
  of patches would give);
- the share of the object's patches that are kept (recall), and of its pixels;
- the teacher's top-1 when it sees the kept patches only, against all patches.

An overlay grid (``results/scene_attention.png``) shows kept patches in full, stopped ones dimmed,
and the object mask outlined.

Run:  python benchmarks/scene_attention.py          (about two minutes on 2 CPU cores)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, publish  # noqa: E402
from smi.data.datasets import fit_masks, model_input, open_dataset  # noqa: E402
from smi.inversion import SparsityConfig  # noqa: E402
from smi.models.loading import load_teacher  # noqa: E402
from smi.models.sparse import rank_patches, sparse_forward  # noqa: E402
from smi.viz import save_grid  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="fmnist_scene_vit", help="a ViT trained on a dataset with object masks")
    p.add_argument("--sparsity", default=SparsityConfig().spec(), help="stopping schedule (ITER:RATIO,...)")
    p.add_argument("--images", type=int, default=None, help="first N test scenes (default: all)")
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--name", default="scene_attention", help="results/NAME.{json,md,png}")
    args = p.parse_args()
    teacher = load_teacher(args.teacher)
    dataset = open_dataset(teacher.dataset or "fmnist-scenes")
    scenes, labels = dataset.tensors("test")
    masks = fit_masks(dataset.masks("test"), teacher)
    n = len(scenes) if args.images is None else min(args.images, len(scenes))
    patch = teacher.model.patch_embed.patch_size[0]
    N = teacher.model.patch_embed.num_patches
    counts = SparsityConfig.parse(args.sparsity).kept_counts(N)[1:]

    sums = dict.fromkeys(("kept_touch", "kept_mostly", "all_touch", "all_mostly", "recall_patches",
                          "recall_pixels", "top1_kept", "top1_all"), 0.0)
    shown: tuple[torch.Tensor, ...] | None = None
    for i in range(0, n, args.batch_size):
        x = model_input(scenes[i:i + args.batch_size], teacher)
        y, m = labels[i:i + len(x)], masks[i:i + len(x)].float()
        keep = rank_patches(teacher.model, x, counts)
        kept = torch.zeros(len(x), N, dtype=torch.bool).scatter_(1, keep, True)
        cover = F.avg_pool2d(m[:, None], patch).flatten(1)  # (B, N): share of each patch's pixels on the object
        touch, mostly = cover > 0, cover >= 0.5
        k = kept.sum(1).float()
        sums["kept_touch"] += ((touch & kept).sum(1) / k).sum().item()
        sums["kept_mostly"] += ((mostly & kept).sum(1) / k).sum().item()
        sums["all_touch"] += touch.float().mean(1).sum().item()
        sums["all_mostly"] += mostly.float().mean(1).sum().item()
        sums["recall_patches"] += ((touch & kept).sum(1) / touch.sum(1).clamp(min=1)).sum().item()
        sums["recall_pixels"] += ((cover * kept).sum(1) / cover.sum(1).clamp(min=1e-9)).sum().item()
        with torch.no_grad():
            sums["top1_kept"] += (sparse_forward(teacher.model, x, keep).logits.argmax(1) == y).sum().item()
            sums["top1_all"] += (teacher.model(x).argmax(1) == y).sum().item()
        if shown is None:
            shown = (x[:32], kept[:32], m[:32])
        print(f"{min(i + args.batch_size, n)}/{n} scenes", file=sys.stderr, flush=True)
    r = {key: round(100 * v / n, 2) for key, v in sums.items()}
    assert shown is not None
    plot = save_grid(shown[0], shown[1], patch, RESULTS / f"{args.name}.png", teacher.mean, teacher.std,
                     dim_stopped=True, outlines=shown[2])
    header = ["", "kept patches (schedule)", "all patches (= random choice)"]
    table = [
        ["patches kept", f"{counts[-1]} of {N}", f"{N} of {N}"],
        ["touching the object (%)", f"{r['kept_touch']:.1f}", f"{r['all_touch']:.1f}"],
        ["mostly object (%)", f"{r['kept_mostly']:.1f}", f"{r['all_mostly']:.1f}"],
        ["object patches kept (%)", f"{r['recall_patches']:.1f}", "100"],
        ["object pixels kept (%)", f"{r['recall_pixels']:.1f}", "100"],
        ["teacher top-1 (%)", f"{r['top1_kept']:.2f}", f"{r['top1_all']:.2f}"],
    ]
    note = (f"\n{args.teacher} on {'all ' if n == len(scenes) else 'the first '}{n:,} real {dataset.name} test "
            f"scenes; patches ranked as sparse inversion ranks them (schedule {args.sparsity}: kept "
            f"{' -> '.join(map(str, [N, *counts]))}, class-token attention of the last block over the kept "
            "patches). A patch touches the object if any of its pixels is on the object mask, is mostly object if "
            "at least half are. Shares are means over scenes. Overlay: `results/"
            f"{args.name}.png` (kept patches in full, stopped ones dimmed and tinted, object mask in green).\n")
    publish(args.name, "scene_attention", vars(args), header, table, note, [r], also=(plot,))


if __name__ == "__main__":
    main()
