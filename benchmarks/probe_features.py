"""Where synthetic images fall in a probe backbone's features, against real ones: a check of minutes before a probe.

The linear-probe protocol (``benchmarks/distill.py``, ``probe``) trains a head on a frozen backbone from synthetic
images; the head can only be as good as where those images land among the backbone's features. This script
trains (or reuses) a generator against the teacher, draws ``--per-class`` images per class, and classifies the
second half of the teacher's test split by the nearest class mean of the backbone's pooled features, the means
taken (a) from the first half of the test split (real images: what a perfect synthetic set would give) and
(b) from the generated images. It also names, for each class, the real class means nearest to its synthetic
mean. Nearest-mean needs no head, so it depends on no learning rate or budget; it is not the probe, though: a
last column trains the probe's own head (linear, KL at T=20 to the teacher's logits on the same images; 2000
Adam steps, batch 256, lr 1e-2) and scores it on the same second half.

A generator is named by its kind, then settings: ``gdfq,bounded=1,bn=1`` is ``smi train-generator --kind gdfq
--pixel-range --bn-weight 1``.

Run:  python benchmarks/probe_features.py      (about 8 minutes on 2 CPU cores, most of it the generator; cached)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import GENERATOR_SETTINGS, RESULTS, generator_overrides, parse_settings, publish, test_split  # noqa: E402
from distill import backbone, trained_generator  # noqa: E402
from smi.generators import GeneratorConfig  # noqa: E402
from smi.generators.train import load_generator  # noqa: E402
from smi.models.loading import load_teacher  # noqa: E402
from smi.transfer.student import build_student  # noqa: E402


def features(model: torch.nn.Module, x: torch.Tensor, batch: int = 500) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model.forward_head(model.forward_features(x[i:i + batch]), pre_logits=True)
                          for i in range(0, len(x), batch)])


def teacher_logits(teacher: Any, x: torch.Tensor, batch: int = 500) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([teacher.model(x[i:i + batch]) for i in range(0, len(x), batch)])


def generated(teacher: Any, cfg: GeneratorConfig, work: Path, per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``per_class`` images of every class from the generator ``cfg`` of ``teacher`` (trained once, cached in
    ``work``), drawn from seed 0 one class per batch, and the class each was asked for."""
    gen, _ = load_generator(trained_generator(teacher, cfg, work), teacher)
    gen.eval()
    g = torch.Generator().manual_seed(0)
    asked = torch.arange(teacher.num_classes).repeat_interleave(per_class)
    with torch.no_grad():
        images = torch.cat([gen(torch.randn(per_class, gen.latent_dim, generator=g), asked[i:i + per_class])
                            for i in range(0, len(asked), per_class)])
    return images, asked


def nearest_mean(feats: torch.Tensor, labels: torch.Tensor, means: torch.Tensor) -> tuple[float, list[float]]:
    """Top-1 (%) of nearest-class-mean classification, and per class."""
    pred = torch.cdist(feats, means).argmin(1)
    per = [round(100 * (pred[labels == c] == c).float().mean().item(), 1) for c in range(len(means))]
    return round(100 * (pred == labels).float().mean().item(), 2), per


def kl_head(feats: torch.Tensor, logits: torch.Tensor, test: torch.Tensor, labels: torch.Tensor,
            temperature: float = 20.0, steps: int = 2000, lr: float = 1e-2, weight_decay: float = 0.0,
            mixup: bool = False, hard: bool = False) -> float:
    """Top-1 (%) on ``test`` of a linear head trained on ``feats`` by KL to the teacher's ``logits`` (the probe's
    loss; Adam, or AdamW with ``weight_decay``). ``mixup``: each batch's features and targets mixed pairwise at a
    uniform ratio; ``hard``: the teacher's argmax as a one-hot target instead of its softened logits."""
    torch.manual_seed(0)
    head = torch.nn.Linear(feats.shape[1], logits.shape[1])
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay) if weight_decay else \
        torch.optim.Adam(head.parameters(), lr=lr)
    target = F.one_hot(logits.argmax(1), logits.shape[1]).float() if hard else F.softmax(logits / temperature, 1)
    for _ in range(steps):
        idx = torch.randint(0, len(feats), (256,))
        f, t = feats[idx], target[idx]
        if mixup:
            lam, pair = torch.rand(len(idx), 1), torch.randperm(len(idx))
            f, t = lam * f + (1 - lam) * f[pair], lam * t + (1 - lam) * t[pair]
        loss = F.kl_div(F.log_softmax(head(f) / temperature, 1), t, reduction="batchmean")
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return round(100 * (head(test).argmax(1) == labels).float().mean().item(), 2)


def add_probe_args(p: argparse.ArgumentParser, name: str) -> None:
    """The teacher, backbone and work folder arguments this script and probe_screen.py share."""
    p.add_argument("--teacher", default="fmnist_resnet_tiny")
    p.add_argument("--gen-epochs", type=int, default=12, help="generator epochs of 100 steps (teacher only)")
    p.add_argument("--per-class", type=int, default=300, help="generated images per class")
    p.add_argument("--backbone-data", default="fashion-mnist-classes:5-9")
    p.add_argument("--backbone-epochs", type=int, default=10)
    p.add_argument("--work", default=str(RESULTS / "distill_work"), help="backbones and generators")
    p.add_argument("--name", default=name)


def probe_setup(args: argparse.Namespace) -> tuple[Any, torch.nn.Module, float, torch.Tensor, torch.Tensor,
                                                   torch.Tensor, str]:
    """The teacher, its frozen backbone (trained on ``--backbone-data``; resumable) and that backbone's top-1 on
    its own data, the teacher's test images and labels, their pooled backbone features, and how a note names the
    split."""
    torch.manual_seed(0)
    teacher = load_teacher(args.teacher)
    weights, backbone_top1 = backbone(teacher.spec, Path(args.work), args.backbone_data, args.backbone_epochs)
    net = build_student(None, teacher, checkpoint=weights, linear_probe=True, seed=0).model.eval()
    data, tested = test_split(teacher)
    xs, ys = zip(*[data[i] for i in range(len(data))], strict=True)
    x, y = torch.stack(xs), torch.tensor(ys)
    return teacher, net, backbone_top1, x, y, features(net, x), tested


def generator_config(variant: str, epochs: int) -> GeneratorConfig:
    """``"gdfq,bounded=1,bn=1"`` -> GeneratorConfig(kind="gdfq", pixel_range=True, bn_weight=1.0, epochs=...)."""
    kind, *items = variant.split(",")
    try:
        settings = parse_settings(items, dict.fromkeys(GENERATOR_SETTINGS, str))  # generator_overrides casts
        if settings.changes() or settings.student:
            raise ValueError(f"a generator takes only {', '.join(f'{k}=' for k in GENERATOR_SETTINGS)}")
    except ValueError as e:
        raise SystemExit(f"error: --kinds {variant!r}: {e}") from None
    return GeneratorConfig(kind=kind, epochs=epochs, **generator_overrides(settings.other))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kinds", nargs="+", default=["gdfq"],
                   help="generators: a kind (smi train-generator --kind), then optionally ',bounded=1' "
                        "(--pixel-range), ',bn=W' (--bn-weight) and ',ce=W' (GeneratorConfig.ce_weight)")
    add_probe_args(p, "probe_features")
    args = p.parse_args()
    work = Path(args.work)
    teacher, net, backbone_top1, x, y, real, tested = probe_setup(args)
    arch = teacher.spec
    half = len(x) // 2
    classes = teacher.num_classes
    real_means = torch.stack([real[:half][y[:half] == c].mean(0) for c in range(classes)])
    top1, per = nearest_mean(real[half:], y[half:], real_means)
    real_logits = teacher_logits(teacher, x[:half])
    head_top1 = kl_head(real[:half], real_logits, real[half:], y[half:])
    rows = [{"means": "real (test images 0..N/2)", "top1": top1, "per_class": per, "kl_head_top1": head_top1}]
    table = [["real images", "-", f"{top1:.2f}", " / ".join(f"{a:.0f}" for a in per), "-", f"{head_top1:.2f}"]]
    configs = [generator_config(kind, args.gen_epochs) for kind in args.kinds]
    for kind, cfg in zip(args.kinds, configs, strict=True):
        images, labels = generated(teacher, cfg, work, args.per_class)
        logits = teacher_logits(teacher, images)
        teacher_top1 = round(100 * (logits.argmax(1) == labels).float().mean().item(), 2)
        syn = features(net, images)
        head_top1 = kl_head(syn, logits, real[half:], y[half:])
        syn_means = torch.stack([syn[labels == c].mean(0) for c in range(classes)])
        top1, per = nearest_mean(real[half:], y[half:], syn_means)
        nearest = [torch.cdist(syn_means[c:c + 1], real_means)[0].argsort()[:2].tolist() for c in range(classes)]
        rows.append({"means": f"{kind} generator", "top1": top1, "per_class": per, "teacher_top1": teacher_top1,
                     "nearest_real_means": nearest, "feature_norm": round(syn.norm(dim=1).mean().item(), 2),
                     "kl_head_top1": head_top1, "generator": cfg.to_dict()})
        table.append([f"{kind} generator ({args.gen_epochs} x 100 steps)", f"{teacher_top1:.1f}", f"{top1:.2f}",
                      " / ".join(f"{a:.0f}" for a in per),
                      " ".join(f"{c}>{n[0]}" for c, n in enumerate(nearest) if n[0] != c) or "none",
                      f"{head_top1:.2f}"])
    header = ["class means from", "teacher top-1 on them (%)", "nearest-mean top-1 (%)", "per class (%)",
              "synthetic class > nearest real class, where not its own", "KL-trained linear head top-1 (%)"]
    note = (f"\n{arch} backbone trained on {args.backbone_data} ({args.backbone_epochs} epochs; {backbone_top1:.2f} % "
            f"on its own test split), pooled features; {args.teacher}'s test split ({tested}): class means from "
            f"its first half (real) or from {args.per_class} generated images per class, scored on its second half; "
            f"the linear head learns from the same images (real: the first half) by KL at T=20 to the teacher's "
            f"logits. "
            f"Real feature norm {real.norm(dim=1).mean().item():.2f}.\n")
    publish(args.name, "probe_features", vars(args), header, table, note, rows)


if __name__ == "__main__":
    main()
