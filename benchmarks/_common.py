"""Helpers shared by the benchmark scripts: result files and markdown tables."""

from __future__ import annotations

import json
import platform
import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from smi.utils.io import atomic_write_bytes, atomic_write_json
from smi.utils.threads import configure_threads

configure_threads()  # the CPUs this process may use, as the CLI does (a script's --threads may change it)
RESULTS = Path(__file__).resolve().parent.parent / "results"


def machine() -> dict[str, Any]:
    import os

    return {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
            "threads": torch.get_num_threads(), "processor": platform.processor() or platform.machine()}


def test_split(teacher: Any, limit: int | None = None) -> tuple[Any, str]:
    """The test split of the dataset ``teacher`` was trained on, as it reads it, and how a table note names it
    (e.g. "all 10,000 fashion-mnist test images")."""
    from smi.data.datasets import eval_dataset, model_dataset

    spec = model_dataset(teacher)
    data = eval_dataset(spec, teacher, limit)
    return data, f"{'all ' if limit is None else 'the first '}{len(data):,} {spec} test images"  # type: ignore[arg-type]


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def write_results(name: str, payload: dict[str, Any], table: str) -> tuple[Path, Path]:
    RESULTS.mkdir(exist_ok=True)
    jpath, mpath = RESULTS / f"{name}.json", RESULTS / f"{name}.md"
    atomic_write_json(jpath, payload)
    atomic_write_bytes(mpath, table.encode())
    return jpath, mpath


def publish(name: str, benchmark: str, args: dict[str, Any], header: list[str], table: list[list[Any]], note: str,
            rows: list[dict[str, Any]], also: tuple[Path, ...] = (), **extra: Any) -> None:
    """Write ``results/NAME.json`` (benchmark, machine, args, ``extra``, rows) and ``results/NAME.md``
    (the table and its note), print the table and every file written (``also``: e.g. a plot)."""
    text = markdown_table(header, table) + note
    if "threads" not in note:
        text += f"\n({torch.get_num_threads()} torch threads.)\n"
    j, m = write_results(name, {"benchmark": benchmark, "machine": machine(), "args": args, **extra, "rows": rows},
                         text)
    print(text)
    files = [str(f) for f in (j, m, *also)]
    print(f"wrote {', '.join(files[:-1])} and {files[-1]}")


def mean_std(xs: list[float], digits: int = 2) -> str:
    """``"mean ± std"`` of ``xs`` (std 0 for a single value), to ``digits`` decimals."""
    import statistics

    std = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.mean(xs):.{digits}f} ± {std:.{digits}f}"


class Cells:
    """Finished cells of a benchmark in ``results/NAME_cells.json`` (committed), each kept with the settings that
    made it: a rerun with the same settings skips the cell, so a restarted benchmark runs only what is missing."""

    def __init__(self, name: str) -> None:
        self.path = RESULTS / f"{name}_cells.json"
        self.data: dict[str, Any] = json.loads(self.path.read_text()) if self.path.exists() else {}

    def get(self, key: str, setting: dict[str, Any]) -> dict[str, Any] | None:
        cell = self.data.get(key)
        return cell if cell is not None and cell["setting"] == setting else None

    def put(self, key: str, cell: dict[str, Any]) -> None:
        self.data[key] = cell
        atomic_write_json(self.path, self.data)


SYNTHESIS_SETTINGS = {"lr": float, "tv_l2": float, "tv_l1": float, "l2": float, "jitter": float, "iterations": int,
                      "color_shift": float, "jitter_unit": str, "blur": float, "crop": float, "bn_weight": float,
                      "ce_weight": float, "lr_schedule": str, "warmup": int}  # InversionConfig fields
STUDENT_SETTINGS = {"augment_color": "color_shift", "augment_background": "background",
                    "attention": "attention", "ema": "ema", "augment": "augment",
                    "temperature": "temperature"}  # -> DistillConfig fields
GENERATOR_SETTINGS = {"seek": ("style_seek_weight", float), "bounded": ("pixel_range", lambda v: bool(int(v))),
                      "bn": ("bn_weight", float),
                      "ce": ("ce_weight", float)}  # a generator's NAME=VALUE -> GeneratorConfig fields


def generator_overrides(other: dict[str, Any]) -> dict[str, Any]:
    """The GeneratorConfig fields that ``seek=W``, ``bounded=1``, ``bn=W``, ``ce=W`` among ``other`` set (only those
    given)."""
    return {GENERATOR_SETTINGS[k][0]: GENERATOR_SETTINGS[k][1](v) for k, v in other.items() if k in GENERATOR_SETTINGS}


@dataclass
class Settings:
    """A benchmark contender's ``NAME=VALUE`` settings, sorted by what they configure."""

    synthesis: dict[str, Any] = field(default_factory=dict)  # InversionConfig fields
    options: dict[str, float] = field(default_factory=dict)  # the terms' knobs (InversionConfig.options)
    terms: dict[str, float] = field(default_factory=dict)  # extra synthesis terms: name -> weight
    student: dict[str, float] = field(default_factory=dict)  # DistillConfig fields (the student's augmentations)
    other: dict[str, Any] = field(default_factory=dict)  # the script's own settings

    def changes(self) -> dict[str, Any]:
        """What these settings change in the synthesis, by the names :func:`parse_settings` reads
        (``option.KNOB``, ``term.TERM``)."""
        return {**self.synthesis, **{f"option.{k}": v for k, v in self.options.items()},
                **{f"term.{k}": v for k, v in self.terms.items()}}

    def synthesis_config(self, method: str, **fields: Any) -> Any:
        """The InversionConfig of ``method`` with ``fields``, these settings and their extra terms (validated)."""
        from smi.inversion import InversionConfig

        options = {"options": self.options} if self.options else {}  # merged knob by knob with the method's
        cfg = InversionConfig.for_method(method, **{**fields, **self.synthesis, **options})
        return InversionConfig.from_dict({**cfg.to_dict(), "terms": {**cfg.terms, **self.terms}})


def parse_settings(items: Iterable[str], other: dict[str, type] | None = None) -> Settings:
    """``["lr=0.05", "term.contrastive=1", "augment_color=2", "steps=100"]`` -> :class:`Settings`: synthesis fields
    (``SYNTHESIS_SETTINGS``), ``term.NAME=W`` (a registered term), ``option.NAME=V`` (a term's knob, e.g.
    ``option.bn_first_weight=1``), the student's augmentations
    (``STUDENT_SETTINGS``, by their ``smi distill`` flag names) and ``other`` (the script's own, name -> type).
    Raises ValueError naming the first item that is none of these."""
    from smi.inversion.config import known_options
    from smi.inversion.terms import TERMS

    out, other = Settings(), other or {}
    for item in items:
        name, eq, value = item.partition("=")
        try:
            if not eq:
                raise ValueError
            if name in SYNTHESIS_SETTINGS:
                out.synthesis[name] = SYNTHESIS_SETTINGS[name](value)
            elif name.startswith("term.") and name[5:] in TERMS:
                out.terms[name[5:]] = float(value)
            elif name.startswith("option.") and name[7:] in known_options():
                out.options[name[7:]] = float(value)
            elif name == "augment":  # the student's whole-patch shift and flip: 0 (off) or 1 (on, the default)
                if value not in ("0", "1"):
                    raise ValueError
                out.student["augment"] = value == "1"
            elif name in STUDENT_SETTINGS:
                out.student[STUDENT_SETTINGS[name]] = float(value)
            elif name in other:
                out.other[name] = other[name](value)
            else:
                raise ValueError
        except ValueError:
            raise ValueError(f"{item!r} is not NAME=VALUE with NAME one of "
                             f"{'|'.join([*SYNTHESIS_SETTINGS, *STUDENT_SETTINGS, *other])}, option.KNOB or term.TERM "
                             f"({'|'.join(TERMS.names())})") from None
    return out


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def dump(obj: Any) -> str:
    return json.dumps(obj)


def bits(setting: str) -> tuple[int, int]:
    """``"W4A8"`` -> (4, 8); the edge and rotation suffixes (``"W3A3E8"``, ``"W3A3R"``) are read by
    :func:`quant_config`."""
    w, a = setting[1:].removesuffix("R").split("E")[0].split("A")
    return int(w), int(a)


def quant_config(quantizer: str, setting: str) -> Any:
    """``("repq", "W3A3")`` -> RepQConfig(3, 3); ``"W3A3E8"``: the first layer and the head at 8 bits (edge_bits);
    a final ``R`` (``"W3A3R"``, ``"W3A3E8R"``): the ViT rotated first (``rotate``, ``smi quantize --rotate``)."""
    from smi.quant import QuantConfig

    w, a = bits(setting)
    rest = setting.removesuffix("R")
    edge = int(rest.split("E")[1]) if "E" in rest else None
    return QuantConfig.create(quantizer, w_bits=w, a_bits=a, edge_bits=edge, rotate=setting.endswith("R"))


def stops_tag(sparse_stops: str) -> str:
    """A folder-name suffix for a sparse schedule other than the default ('' for the default):
    ``50:0.3,100:0.3`` -> ``-stops50x0.3-100x0.3``."""
    from smi.inversion import SparsityConfig

    if sparse_stops.strip() == "default":
        return ""
    return "-stops" + "-".join(f"{it}x{ratio:g}" for it, ratio in SparsityConfig.parse(sparse_stops).stops)


def synthetic_pools(teacher: Any, model_name: str, seeds: list[int], kinds: list[str], folder: Path,
                    iterations: int, num_images: int, grid_seed: int | None = None, method: str = "deepinversion",
                    sparse_stops: str = "default", settings: Settings | None = None,
                    ) -> tuple[dict[tuple[str, int], str], dict[tuple[str, int], float]]:
    """One pool of ``method`` per (kind, seed) in ``folder`` (a kind: ``dense`` or ``sparse``, the default
    schedule or ``sparse_stops`` (``ITER:RATIO,...``, its folder named after it); ``-bf16`` after it synthesizes
    under bfloat16 autocast; batch min(32, images); ``settings`` changes the method's recipe); an existing pool
    resumes or is reused. Returns the folders and each pool's synthesis seconds."""
    import sys
    import time

    from smi.data.pool import read_manifest
    from smi.inversion import SparsityConfig, synthesize

    pools, seconds = {}, {}
    for seed in seeds:
        for kind in kinds:
            sparsity = SparsityConfig(()) if kind.startswith("dense") else SparsityConfig.parse(sparse_stops)
            fields = dict(iterations=iterations, batch_size=min(32, num_images), sparsity=sparsity,
                          precision="bf16" if kind.endswith("-bf16") else "fp32")
            cfg = (settings or Settings()).synthesis_config(method, **fields)
            tag = "" if method == "deepinversion" else f"{method}_"  # deepinversion pools keep their older names
            out = folder / f"{model_name}_{tag}{kind}{stops_tag(sparse_stops) if kind.startswith('sparse') else ''}" \
                f"_seed{seed}"
            t0 = time.perf_counter()
            synthesize(teacher, cfg, num_images, out, seed=seed, grid=seed == grid_seed)
            print(f"{out.name}: ready ({time.perf_counter() - t0:.0f} s this run)", file=sys.stderr)
            pools[(kind, seed)] = str(out)
            seconds[(kind, seed)] = float(read_manifest(out)["seconds_total"])
    return pools, seconds
