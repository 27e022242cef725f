"""The ``smi`` command: parses, calls one library function, shows progress, writes files."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from smi.errors import SmiError

__all__ = ["main"]


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def _cmd_train_teacher(args: argparse.Namespace) -> int:
    from smi.models.training import TeacherTrainConfig, train_teacher

    cfg = TeacherTrainConfig(arch=args.arch, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                             seed=args.seed)
    result = train_teacher(cfg, args.out, device=args.device)
    print(f"test top-1 {result['test_top1']:.2f}% after {result['epochs']} epochs; weights: {result['weights']}")
    return 0


def _add_train_teacher(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train-teacher", help="train a shipped teacher on Fashion-MNIST (resumable)",
                       formatter_class=_Formatter,
                       description="Train a teacher with smi's recipe; rerun the same command to resume.")
    p.add_argument("--arch", default="fmnist_vit_tiny", help="registered architecture to train")
    p.add_argument("--epochs", type=int, default=24, help="training epochs")
    p.add_argument("--batch-size", type=int, default=128, help="training batch size")
    p.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate")
    p.add_argument("--seed", type=int, default=0, help="seed for shuffling, augmentation and init")
    p.add_argument("--device", default="cpu", help="torch device")
    p.add_argument("--out", required=True, help="run folder (checkpoints, log, final weights)")
    p.set_defaults(func=_cmd_train_teacher)


_SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_train_teacher]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="smi", description=__doc__, formatter_class=_Formatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in _SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "device", "cpu") != "cpu":
            import torch

            torch.device(args.device)  # reject a malformed device string early
        return args.func(args)
    except SmiError as e:
        print(f"smi: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("smi: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
