"""Where the data-free W3A3 model falls short: its activation ranges or its weights?

A diagnostic, not a method: it uses real training images. The best data-free W3A3 recipe of
``benchmarks/dfq_training.py`` (QDrop reconstruction, then 20 x 50 QAT steps at lr 1e-3 with attention
transfer 10 and mixup 0.5) runs on a sparse synthetic pool; then, from that model, one group of its parameters
at a time is fine-tuned on real training images (KL from the float teacher, T=1, AdamW, cosine, batch 32):

* ``none``: the data-free model as it is;
* ``activation quantizers``: only the activation step sizes and zero points (its ranges);
* ``weights``: only the weight matrices (every other parameter, the weight step sizes included, kept);
* ``all``: every parameter.

If real images mostly fix the ranges, the synthetic images set them wrong; if they mostly fix the weights, the
synthetic images do not carry what the weights need. Finished cells are cached in ``results/NAME_cells.json``.

Run:  python benchmarks/w3a3_diagnosis.py      (about 10 minutes on 2 CPU cores)
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, Cells, publish, quant_config, test_split  # noqa: E402
from smi.data.sources import PoolSource, RealSource  # noqa: E402
from smi.evaluation import evaluate  # noqa: E402
from smi.models.loading import load_teacher  # noqa: E402
from smi.quant.io import load_quantized  # noqa: E402
from smi.quant.pipeline import quantize_teacher  # noqa: E402
from smi.quant.qat import QatConfig, learnable_quant_, qat  # noqa: E402
from smi.quant.quantizers import ActQuantizer, LogSqrt2Quantizer  # noqa: E402
from smi.quant.reconstruct import ReconstructConfig  # noqa: E402
from smi.utils.io import atomic_write_json  # noqa: E402

GROUPS = {"none": "none (the data-free model)", "act": "activation quantizers only", "weights": "weight matrices only",
          "all": "every parameter"}


def group_of(model: torch.nn.Module, group: str) -> list[torch.nn.Parameter]:
    """The parameters a group fine-tunes (after ``learnable_quant_``, so the step sizes are parameters)."""
    act = {id(p) for m in model.modules() if isinstance(m, ActQuantizer | LogSqrt2Quantizer) for p in m.parameters()}
    if group == "act":
        return [p for p in model.parameters() if id(p) in act]
    if group == "weights":
        return [p for n, p in model.named_parameters() if n.endswith(".weight") and p.dim() > 1 and id(p) not in act]
    return list(model.parameters()) if group == "all" else []


def finetune(teacher, folder: Path, group: str, x: torch.Tensor, steps: int, lr: float, seed: int
             ) -> tuple[torch.nn.Module, int]:
    """The quantized model in ``folder`` with one parameter group fine-tuned on the real images ``x``, and the
    number of values that group trains."""
    model, _ = load_quantized(folder, copy.deepcopy(teacher))
    learnable_quant_(model, True)
    model.requires_grad_(False)
    params = group_of(model, group)
    for p in params:
        p.requires_grad_(True)
    if params:
        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        with torch.no_grad():
            target = F.softmax(teacher.model(x), -1)
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
        model.train()
        for _ in range(steps):
            rows = torch.randint(0, len(x), (32,), generator=gen)
            loss = F.kl_div(F.log_softmax(model(x[rows]), -1), target[rows], reduction="batchmean")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    learnable_quant_(model, False)
    model.requires_grad_(False)
    return model.eval(), sum(p.numel() for p in params)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="fmnist_vit_tiny")
    p.add_argument("--setting", default="W3A3")
    p.add_argument("--pool", default=str(RESULTS / "dfq_work_128" / "fmnist_vit_tiny_sparse_seed0"),
                   help="the sparse synthetic pool the data-free recipe runs on")
    p.add_argument("--images", type=int, default=128, help="pool images, and real images for the fine-tuning")
    p.add_argument("--steps", type=int, default=300, help="fine-tuning steps on real images")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--groups", nargs="+", default=list(GROUPS), choices=list(GROUPS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default=str(RESULTS / "w3a3_diagnosis_work"))
    p.add_argument("--name", default="w3a3_diagnosis")
    args = p.parse_args()
    teacher = load_teacher(args.teacher)
    teacher.model.eval()
    data, tested = test_split(teacher)
    cells, work = Cells(args.name), Path(args.work)
    recon = ReconstructConfig(iterations=1000, drop_prob=0.5)
    recipe = QatConfig(epochs=20, steps_per_epoch=50, train_images=args.images, lr=1e-3, mixup=0.5, attention=10,
                       seed=args.seed)
    start = {"teacher": args.teacher, "setting": args.setting, "pool": args.pool, "images": args.images,
             "seed": args.seed, "reconstruct": recon.to_dict(), "qat": recipe.to_dict()}
    folder = work / "qat"
    t0 = time.perf_counter()
    made = work / "start.json"  # the settings of the model in ``folder``, written once it is complete
    try:
        ready = (folder / "quantized.json").exists() and json.loads(made.read_text()) == start
    except (OSError, ValueError):  # missing, or not this script's JSON: make the model again
        ready = False
    if not ready:
        pool = PoolSource(args.pool)
        quantize_teacher(teacher, quant_config("repq", args.setting), pool, num_images=args.images, seed=args.seed,
                         copy_model=True, reconstruct=recon, out=work / "recon", overwrite=True)
        qat(teacher, work / "recon", pool, folder, recipe, eval_data=None, progress=False, overwrite=True)
        atomic_write_json(made, start)
        print(f"data-free recipe: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    x, _ = RealSource().open(teacher).take(args.images, torch.Generator().manual_seed(args.seed))
    rows, table = [], []
    for group in args.groups:
        setting = {**start, "group": group, "steps": args.steps, "lr": args.lr, "real_images": args.images}
        cell = cells.get(group, setting)
        if cell is None:
            model, count = finetune(teacher, folder, group, x, args.steps, args.lr, args.seed)
            cell = {"setting": setting, "top1": evaluate(model, data, progress=False)["top1"],
                    "parameters": count}
            cells.put(group, cell)
        print(f"{group}: {cell['top1']:.2f} %", file=sys.stderr, flush=True)
        rows.append({"group": group, "top1": round(cell["top1"], 2), "parameters": cell["parameters"]})
        table.append([GROUPS[group], cell["parameters"], f"{cell['top1']:.2f}"])
    note = (f"\n{args.teacher} {args.setting} repq; the data-free model: QDrop reconstruction (1000 steps per block, "
            f"drop 0.5) and QAT (20 x 50 steps, lr 1e-3, attention transfer 10, mixup 0.5) on {args.images} images "
            f"of `{os.path.relpath(args.pool, RESULTS.parent)}`; then {args.steps} steps of fine-tuning on "
            f"{args.images} real training images (lr "
            f"{args.lr}, AdamW, cosine, batch 32, KL at T=1 from the float teacher). Top-1 on {tested}; seed "
            f"{args.seed}.\n")
    publish(args.name, "w3a3_diagnosis", vars(args), ["fine-tuned on real images", "parameters", "top-1 (%)"],
            table, note, rows)


if __name__ == "__main__":
    main()
