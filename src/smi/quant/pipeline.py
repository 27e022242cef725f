"""One call from a teacher and a calibration source to a quantized model and its accuracy."""

from __future__ import annotations

import copy
from typing import Any

from torch.utils.data import Dataset

from smi.data.eval_data import evaluate
from smi.models.loading import Teacher
from smi.quant.api import calibrate, convert, prepare
from smi.quant.calibration import CalibrationSet, calibration_forward, calibration_set
from smi.quant.config import QuantConfig

__all__ = ["quantize_from", "quantize_and_evaluate"]


def quantize_from(model, config: QuantConfig, calib: CalibrationSet, batch_size: int = 32, progress: bool = False):
    """prepare -> calibrate on ``calib`` (sparse images as kept patches only) -> convert, in place.

    Returns (model, number of calibration images seen).
    """
    from tqdm.auto import tqdm

    prepare(model, config)
    batches = tqdm(list(calib.batches(batch_size)), desc="calibrate", unit="batch", leave=False,
                   disable=not progress)
    seen = calibrate(model, batches, forward=calibration_forward)
    return convert(model), seen


def quantize_and_evaluate(
    teacher: Teacher, config: QuantConfig, source: str, data: Dataset, *, calib_images: int = 32, seed: int = 0,
    device: str = "cpu", progress: bool = False,
) -> dict[str, Any]:
    """Quantize a copy of ``teacher.model`` calibrated on ``source`` and evaluate it on ``data``."""
    calib = calibration_set(teacher, source, calib_images, seed=seed)
    model, _ = quantize_from(copy.deepcopy(teacher.model), config, calib)
    res = evaluate(model, data, device=device, progress=progress)
    return {**res, "calib": calib.source, "calib_images": len(calib.images), "sparse_calib": calib.masks is not None}
