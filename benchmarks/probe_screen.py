"""Is the linear probe's gap in its head or in its images? A screen of seconds per row on one generator.

``benchmarks/probe_features.py`` trains the probe's head (linear, KL at T=20 to the teacher's logits, 2000 Adam
steps) on a generator's images and scores it on the second half of the teacher's test split, against the same head
on real images. This script keeps that generator and backbone and changes one thing per row:

- **the head's training**: fewer or more steps, weight decay, a lower rate, mixup of the features, the teacher's
  argmax as a hard target, another temperature;
- **the images**: blurred, their dark pixels pushed to black (a real image's frame), Gaussian noise added,
  all before the teacher labels them;
- **which images**: 3000 chosen from ``--pool-factor`` times as many by the teacher's entropy (high or low), by
  greedy k-center cover of the backbone's normalized features, or balanced over the teacher's argmax.

Every row is data-free (the test split scores, nothing else reads it). One generator, seed 0.

Run:  python benchmarks/probe_screen.py     (a minute or two once probe_features' generator and backbone exist)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import publish  # noqa: E402
from probe_features import (  # noqa: E402
    add_probe_args,
    features,
    generated,
    generator_config,
    kl_head,
    probe_setup,
    teacher_logits,
)
from smi.inversion.engine import valid_range  # noqa: E402

HEADS: dict[str, dict] = {
    "the probe's head (2000 steps, lr 1e-2, T=20)": {},
    "500 steps": {"steps": 500},
    "8000 steps": {"steps": 8000},
    "weight decay 0.1": {"weight_decay": 0.1},
    "weight decay 1": {"weight_decay": 1.0},
    "lr 1e-3": {"lr": 1e-3},
    "mixup of the features": {"mixup": True},
    "hard targets (teacher's argmax, T=1)": {"hard": True, "temperature": 1.0},
    "T=4": {"temperature": 4.0},
}


def blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur (5 taps, replicated edges)."""
    k = torch.exp(-torch.arange(-2, 3, dtype=x.dtype) ** 2 / (2 * sigma * sigma))
    k = (k / k.sum()).repeat(x.shape[1], 1, 1, 1)
    x = F.conv2d(F.pad(x, (2, 2, 0, 0), mode="replicate"), k.view(-1, 1, 1, 5), groups=x.shape[1])
    return F.conv2d(F.pad(x, (0, 0, 2, 2), mode="replicate"), k.view(-1, 1, 5, 1), groups=x.shape[1])


def k_center(feats: torch.Tensor, n: int) -> torch.Tensor:
    """Greedy k-center: ``n`` rows of ``feats`` (L2-normalized), each the farthest from those chosen before."""
    f = F.normalize(feats, dim=1)
    chosen, dist = [0], (f - f[0]).norm(dim=1)
    for _ in range(n - 1):
        j = int(dist.argmax())
        chosen.append(j)
        dist = torch.minimum(dist, (f - f[j]).norm(dim=1))
    return torch.tensor(chosen)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kind", default="gdfq,bounded=1,bn=1", help="the generator, as probe_features.py --kinds")
    p.add_argument("--pool-factor", type=int, default=10, help="the selection rows choose from this many times more")
    add_probe_args(p, "probe_screen")
    args = p.parse_args()
    work = Path(args.work)
    teacher, net, _, x, y, real, tested = probe_setup(args)
    half = len(x) // 2
    test, labels = real[half:], y[half:]

    cfg = generator_config(args.kind, args.gen_epochs)
    classes = teacher.num_classes

    images, _ = generated(teacher, cfg, work, args.per_class)
    n = len(images)
    logits, syn = teacher_logits(teacher, images), features(net, images)
    rows: list[dict] = [{"group": "bound", "row": "real images (test images 0..N/2), the probe's head",
                         "top1": kl_head(real[:half], teacher_logits(teacher, x[:half]), test, labels)}]
    for row, kw in HEADS.items():
        rows.append({"group": "head", "row": row, "top1": kl_head(syn, logits, test, labels, **kw)})
    lo, hi = valid_range(teacher.mean, teacher.std, "cpu")
    noise = torch.Generator().manual_seed(1)
    posts: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "blurred, sigma 0.5 px": lambda im: blur(im, 0.5),
        "blurred, sigma 1 px": lambda im: blur(im, 1.0),
        "pixels under 10 % of the range set to black": lambda im: torch.where(im < lo + 0.1 * (hi - lo), lo, im),
        "pixels under 20 % of the range set to black": lambda im: torch.where(im < lo + 0.2 * (hi - lo), lo, im),
        "Gaussian noise, std 10 % of the range": lambda im: (im + 0.1 * (hi - lo) * torch.randn(
            im.shape, generator=noise)).clamp(lo, hi),
    }
    for row, post in posts.items():
        with torch.no_grad():
            changed = post(images)
        rows.append({"group": "images", "row": row,
                     "top1": kl_head(features(net, changed), teacher_logits(teacher, changed), test, labels)})
    many, _ = generated(teacher, cfg, work, args.per_class * args.pool_factor)
    big_logits, big = teacher_logits(teacher, many), features(net, many)
    entropy = -(big_logits.softmax(1) * big_logits.log_softmax(1)).sum(1)
    argmax = big_logits.argmax(1)
    picks = {
        "random": torch.randperm(len(many), generator=torch.Generator().manual_seed(1))[:n],
        "highest teacher entropy": entropy.argsort(descending=True)[:n],
        "lowest teacher entropy": entropy.argsort()[:n],
        "k-center cover of the backbone's features": k_center(big, n),
        "balanced over the teacher's argmax": torch.cat([torch.nonzero(argmax == c).flatten()[:n // classes]
                                                         for c in range(classes)]),
    }
    for row, idx in picks.items():
        rows.append({"group": f"which {n} of {len(many)}", "row": row, "images": len(idx),
                     "top1": kl_head(big[idx], big_logits[idx], test, labels)})
    table = [[r["group"], r["row"], f"{r['top1']:.2f}"] for r in rows]
    note = (f"\n{args.kind} generator ({args.gen_epochs} x 100 steps), {n} images ({args.per_class} per asked class) "
            f"unless the group says otherwise; {teacher.spec} backbone trained on {args.backbone_data} "
            f"({args.backbone_epochs} epochs), frozen, pooled features; scored on the second half of {args.teacher}'s "
            f"test split ({tested}). The first row trains the same head on the first half's real images.\n")
    publish(args.name, "probe_screen", vars(args), ["what changes", "row", "KL head top-1 (%)"], table, note, rows)


if __name__ == "__main__":
    main()
