"""One call from a teacher and a calibration source to a quantized model and its accuracy."""

from __future__ import annotations

import copy
from typing import Any

from torch.utils.data import Dataset

from smi.data.eval_data import evaluate
from smi.models.loading import Teacher
from smi.quant.api import calibrate, convert, prepare
from smi.quant.calibration import calibration_forward, calibration_set
from smi.quant.config import QuantConfig

__all__ = ["quantize_and_evaluate"]


def quantize_and_evaluate(
    teacher: Teacher, config: QuantConfig, source: str, data: Dataset, *, calib_images: int = 32, seed: int = 0,
    device: str = "cpu", progress: bool = False,
) -> dict[str, Any]:
    """Quantize a copy of ``teacher.model`` calibrated on ``source`` and evaluate it on ``data``."""
    calib = calibration_set(teacher, source, calib_images, seed=seed)
    model = prepare(copy.deepcopy(teacher.model), config)
    calibrate(model, calib.batches(32), forward=calibration_forward)
    convert(model)
    res = evaluate(model, data, device=device, progress=progress)
    return {**res, "calib": calib.source, "calib_images": len(calib.images), "sparse_calib": calib.masks is not None}
