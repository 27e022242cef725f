"""From a teacher and a calibration source to a quantized model: in a folder, or evaluated."""

from __future__ import annotations

import copy
import json
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
from smi.quant.io import (
    QUANT_FORMAT,
    RECON_LOG,
    RECON_STATE,
    apply_quant_state,
    check_quantized_folder,
    quant_state,
    quantized_meta,
    save_quantized,
)
from smi.quant.reconstruct import ReconstructConfig, reconstruct_, reconstruction_units
from smi.utils.io import atomic_save_tensors, atomic_write_json, read_format_json

__all__ = ["QuantizeResult", "quantize_teacher", "quantize_and_evaluate"]


@dataclass
class QuantizeResult:
    model: nn.Module
    calibration: CalibrationSet
    folder: Path | None
    reconstruction: list[dict[str, Any]] | None = None  # one row per unit with --reconstruct
    correction: list[dict[str, Any]] | None = None  # one row per corrected branch with --correct-activations


def quantize_teacher(
    teacher: Teacher, config: QuantConfig, source: DataSource | str, *, num_images: int = 32, seed: int = 0,
    batch_size: int = 32, out: str | Path | None = None, overwrite: bool = False, copy_model: bool = False,
    reconstruct: ReconstructConfig | None = None, correct_activations: bool | str = False, progress: bool = False,
) -> QuantizeResult:
    """Quantize ``teacher.model`` (or a copy) calibrated on ``num_images`` from ``source``; save it to ``out``.

    With ``reconstruct``, each unit is then reconstructed on the same images
    (:func:`~smi.quant.reconstruct.reconstruct_`); with ``out``, a checkpoint after every unit lets a rerun of
    the same command resume where a killed one stopped. With ``correct_activations``, each block's branch outputs
    then get per-channel corrections against the float model (:func:`~smi.quant.correct.correct_activations_`;
    ``"all"``: the inner attn.qkv and mlp.fc1 too, ``True`` or ``"outputs"``: the branch outputs only).

    >>> quantize_teacher(teacher, RepQConfig(w_bits=4, a_bits=4), PoolSource("pool/"), out="quant/w4a4")
    """
    if config.rotate:
        from smi.quant.rotate import check_rotatable

        check_rotatable(teacher.model)  # refused before any work
    layers = "outputs" if correct_activations is True else correct_activations or None
    if layers is not None:
        from smi.quant.correct import check_layers

        check_layers(layers)  # refused before any work
    calib = calibration_set(teacher, source, num_images, seed=seed, batch_size=batch_size)
    extra: dict[str, Any] = {"calibration": {"source": calib.source, "images": len(calib.images), "seed": seed,
                                             "sparse": calib.masks is not None}}
    if reconstruct is not None:
        extra["reconstruct"] = reconstruct.to_dict()
    if layers is not None:
        extra["correct_activations"] = True if layers == "outputs" else layers  # as recorded before "all" existed
    meta = quantized_meta(config, teacher, extra)
    if out is not None:  # refused before any work, not after it
        check_quantized_folder(out, meta, overwrite)
        if reconstruct is not None:
            _check_reconstruction_log(Path(out), meta, overwrite)
    fp_model = copy.deepcopy(teacher.model) if reconstruct is not None or correct_activations else None
    model = copy.deepcopy(teacher.model) if copy_model else teacher.model
    quantize_(model, config, calib, progress=progress)
    rows, state_is_ours = None, False
    if reconstruct is not None:
        rows, state_is_ours = _reconstruct(model, fp_model, calib, reconstruct, Path(out) if out is not None
                                           else None, meta, progress)
    corrections = None
    if layers is not None:
        from smi.quant.correct import correct_activations_

        corrections = correct_activations_(model, fp_model, calib, layers=layers)
    folder = None
    if out is not None:
        folder = save_quantized(model, out, teacher, extra=extra, overwrite=overwrite)
        if rows is not None:
            atomic_write_json(folder / RECON_LOG, {"format": QUANT_FORMAT, "identity": meta, "finished": True,
                                                   "units": rows})
            if state_is_ours:  # the checkpoint this run wrote or resumed from; never a file smi did not record
                (folder / RECON_STATE).unlink(missing_ok=True)
    return QuantizeResult(model, calib, folder, rows, corrections)


def _check_reconstruction_log(out: Path, meta: dict[str, Any], overwrite: bool) -> None:
    """A half-done reconstruction with other settings is refused (or, with ``overwrite``, forgotten)."""
    from smi.errors import SmiError

    log = out / RECON_LOG
    if not log.exists():
        return
    old = read_format_json(log, QUANT_FORMAT, "quantized model")
    if old.get("identity") != json.loads(json.dumps(meta)) and not old.get("finished"):
        if not overwrite:
            raise SmiError(f"{out} holds an unfinished reconstruction with other settings; use another folder or "
                           "overwrite it", param="out")
        log.unlink()  # smi's own (format checked above), and the checkpoint it records; nothing else
        (out / RECON_STATE).unlink(missing_ok=True)


def _reconstruct(model: nn.Module, fp_model: nn.Module, calib: CalibrationSet, cfg: ReconstructConfig,
                 out: Path | None, meta: dict[str, Any], progress: bool) -> tuple[list[dict[str, Any]], bool]:
    """Reconstruct unit by unit; with ``out``, resume from and write the per-unit checkpoint.

    Returns the per-unit rows and whether ``out`` holds a checkpoint this run wrote or resumed from."""
    from safetensors.torch import load_file

    identity = json.loads(json.dumps(meta))
    rows: list[dict[str, Any]] = []
    ours = [False]
    if out is not None and (out / RECON_LOG).exists() and (out / RECON_STATE).exists():
        old = read_format_json(out / RECON_LOG, QUANT_FORMAT, "quantized model")
        if old.get("identity") == identity and not old.get("finished"):
            apply_quant_state(model, load_file(str(out / RECON_STATE)), out / RECON_STATE)
            rows = list(old.get("units", []))
            ours[0] = True
            if progress and rows:
                from tqdm.auto import tqdm

                tqdm.write(f"resuming reconstruction after {len(rows)} of {len(reconstruction_units(model))} units")

    def checkpoint(index: int, name: str, row: dict[str, Any]) -> None:
        rows.append(row)
        if out is None:
            return
        out.mkdir(parents=True, exist_ok=True)
        atomic_save_tensors(out / RECON_STATE, quant_state(model))
        ours[0] = True
        atomic_write_json(out / RECON_LOG, {"format": QUANT_FORMAT, "identity": identity, "finished": False,
                                            "units": rows})

    reconstruct_(model, fp_model, calib, cfg, start=len(rows), on_unit=checkpoint, progress=progress)
    return rows, ours[0]


def quantize_and_evaluate(
    teacher: Teacher, config: QuantConfig, source: DataSource | str, data: Dataset, *, calib_images: int = 32,
    seed: int = 0, device: str = "cpu", progress: bool = False,
) -> dict[str, Any]:
    """Quantize a copy of ``teacher.model`` calibrated on ``source`` and evaluate it on ``data`` (top-1, or mIoU
    for a segmenter)."""
    from smi.evaluation import evaluate, evaluate_segmentation

    res = quantize_teacher(teacher, config, source, num_images=calib_images, seed=seed, copy_model=True)
    calib = res.calibration
    score = evaluate_segmentation if teacher.task == "segmentation" else evaluate
    return {**score(res.model, data, device=device, progress=progress), "calib": calib.source,
            "calib_images": len(calib.images), "sparse_calib": calib.masks is not None}
