"""From a teacher and a calibration source to a quantized model: in a folder, or evaluated."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.nn as nn
from torch.utils.data import Dataset

from smi.data.sources import DataSource
from smi.models.loading import Teacher
from smi.quant.api import quantize_
from smi.quant.calibration import CalibrationSet, calibration_set
from smi.quant.config import QuantConfig
from smi.quant.io import check_quantized_folder, quantized_meta, save_quantized

__all__ = ["QuantizeResult", "quantize_teacher", "quantize_and_evaluate"]


@dataclass
class QuantizeResult:
    model: nn.Module
    calibration: CalibrationSet
    folder: Path | None


def quantize_teacher(
    teacher: Teacher, config: QuantConfig, source: DataSource | str, *, num_images: int = 32, seed: int = 0,
    batch_size: int = 32, out: str | Path | None = None, overwrite: bool = False, copy_model: bool = False,
    progress: bool = False,
) -> QuantizeResult:
    """Quantize ``teacher.model`` (or a copy) calibrated on ``num_images`` from ``source``; save it to ``out``.

    >>> quantize_teacher(teacher, RepQConfig(w_bits=4, a_bits=4), PoolSource("pool/"), out="quant/w4a4")
    """
    calib = calibration_set(teacher, source, num_images, seed=seed, batch_size=batch_size)
    extra = {"calibration": {"source": calib.source, "images": len(calib.images), "seed": seed,
                             "sparse": calib.masks is not None}}
    if out is not None:  # refused before any work, not after it
        check_quantized_folder(out, quantized_meta(config, teacher, extra), overwrite)
    model = copy.deepcopy(teacher.model) if copy_model else teacher.model
    quantize_(model, config, calib, progress=progress)
    folder = None
    if out is not None:
        folder = save_quantized(model, out, teacher, extra=extra, overwrite=overwrite)
    return QuantizeResult(model, calib, folder)


def quantize_and_evaluate(
    teacher: Teacher, config: QuantConfig, source: DataSource | str, data: Dataset, *, calib_images: int = 32,
    seed: int = 0, device: str = "cpu", progress: bool = False,
) -> dict[str, Any]:
    """Quantize a copy of ``teacher.model`` calibrated on ``source`` and evaluate it on ``data``."""
    from smi.evaluation import evaluate

    res = quantize_teacher(teacher, config, source, num_images=calib_images, seed=seed, copy_model=True)
    calib = res.calibration
    return {**evaluate(res.model, data, device=device, progress=progress), "calib": calib.source,
            "calib_images": len(calib.images), "sparse_calib": calib.masks is not None}
