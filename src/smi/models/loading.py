"""Load a teacher from a timm name, a shipped teacher, or a local checkpoint.

A checkpoint is two files side by side: ``NAME.safetensors`` (the state dict) and ``NAME.json``
(metadata: timm architecture and kwargs, number of classes, mean/std, input size, class names).
A ``NAME.pt``/``.pth``/``.bin`` state dict is accepted in place of the safetensors file; it is read
with ``torch.load(weights_only=True)``, so a file that would run code when unpickled is refused.
"""

from __future__ import annotations

import copy
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file

from smi.errors import SmiError
from smi.utils.io import atomic_save_tensors, atomic_write_json, read_format_json, sha256_file

__all__ = ["Teacher", "batch_norms", "check_fits", "create_model", "in_channels", "load_teacher", "require_classifier",
           "save_teacher", "TEACHER_FORMAT"]

TEACHER_FORMAT = "smi-teacher/1"
TORCH_SUFFIXES = (".pt", ".pth", ".bin")  # read with torch.load(weights_only=True), never plain unpickling


@dataclass
class Teacher:
    """A model in eval mode with frozen weights, plus what it needs to read images."""

    model: nn.Module
    spec: str  # what the user asked for: a timm name, a shipped name or a path
    arch: str  # timm architecture name
    num_classes: int
    input_size: tuple[int, int, int]  # (C, H, W)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: list[str] | None = None
    fingerprint: str = ""  # sha256 of the weights file, or 'random-init:<arch>' / 'timm-pretrained:<arch>'
    extra: dict[str, Any] = field(default_factory=dict)
    crop_pct: float = 1.0  # evaluation transform: shorter side to H / crop_pct, then the centre crop
    interpolation: str = "bilinear"
    dataset: str | None = None  # what it was trained on (smi.data.DATASETS spec), the default real data

    @property
    def task(self) -> str:
        """``"classification"`` (logits per image), or ``"segmentation"`` (logits per pixel: a TokenSegmenter)."""
        return getattr(self.model, "task", "classification")

    def data_config(self) -> dict[str, Any]:
        """How the model reads images: what a checkpoint of it (or of a student of it) records."""
        return {"input_size": list(self.input_size), "mean": list(self.mean), "std": list(self.std),
                "crop_pct": self.crop_pct, "interpolation": self.interpolation, "dataset": self.dataset}

    def identity(self) -> dict[str, Any]:
        """What a pool or quantized model records to say which teacher made it."""
        return {"spec": self.spec, "arch": self.arch, "fingerprint": self.fingerprint,
                "num_classes": self.num_classes, "input_size": list(self.input_size)}


def require_classifier(teacher: Teacher, what: str) -> None:
    """One clear error where a segmenter reaches a path that needs per-image class logits."""
    if teacher.task != "classification":
        raise SmiError(f"{teacher.spec} is a {teacher.task} model; {what} needs a classifier (segmenters train "
                       "with smi train-teacher, invert with --method dfq-sam or deepinversion, are quantized with smi "
                       "quantize and measured with smi eval)")


def did_you_mean(name: str) -> str:
    names = timm.list_models()
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
    return f" (did you mean {', '.join(close)}?)" if close else ""


def _freeze(model: nn.Module, device: torch.device | str) -> nn.Module:
    model.eval().to(device)
    model.requires_grad_(False)  # inversion needs input gradients only; weight grads are pure overhead
    return model


def batch_norms(model: nn.Module) -> list[nn.Module]:
    """``model``'s BatchNorm layers with running statistics, in module order: PyTorch's, and the frozen ones that
    timm's ``freeze_batch_norm_2d`` makes (a backbone under a linear probe)."""
    from timm.layers.norm_act import FrozenBatchNormAct2d
    from torchvision.ops import FrozenBatchNorm2d

    kinds = (nn.modules.batchnorm._BatchNorm, FrozenBatchNorm2d, FrozenBatchNormAct2d)
    return [m for m in model.modules() if isinstance(m, kinds)]


def in_channels(model: nn.Module) -> int | None:
    """The channels the model's first layer takes (not timm's pretrained config, which says 3 for ``in_chans=1``)."""
    first = getattr(model, "pretrained_cfg", {}).get("first_conv")
    names = [first] if isinstance(first, str) else list(first or [])
    for name in names:
        try:
            weight = model.get_submodule(name.removesuffix(".weight")).weight
        except AttributeError:
            continue
        return int(weight.shape[1])
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)), None)
    return int(conv.weight.shape[1]) if isinstance(conv, nn.Conv2d) else None


def _data_cfg(model: nn.Module) -> dict[str, Any]:
    """timm's data config, with the input the model was built for (its first layer's channels, ``img_size``)."""
    cfg = dict(timm.data.resolve_model_data_config(model))
    C, H, W = cfg["input_size"]
    pe = getattr(model, "patch_embed", None)
    if pe is not None and getattr(pe, "img_size", None) is not None:
        H, W = pe.img_size
    C = in_channels(model) or C
    cfg["input_size"] = (C, H, W)
    if len(cfg["mean"]) != C:  # timm's RGB statistics for a grey model: their average
        cfg["mean"], cfg["std"] = ((sum(cfg["mean"]) / len(cfg["mean"]),) * C, (sum(cfg["std"]) / len(cfg["std"]),) * C)
    return cfg


def create_model(arch: str, input_size: tuple[int, int, int], num_classes: int, what: str = "model",
                 **kwargs: Any) -> tuple[nn.Module, dict[str, Any]]:
    """A fresh timm ``arch`` for ``num_classes`` classes reading ``input_size`` images.

    Returns the model and the kwargs it was built with (what a checkpoint records). ``img_size``
    is passed where the architecture takes it (ViTs); CNNs read any size. ``kwargs`` go to timm.
    """
    import smi.models.teachers  # noqa: F401  (registers the Fashion-MNIST architectures)

    if not timm.is_model(arch):
        raise SmiError(f"unknown {what} architecture {arch!r}{did_you_mean(arch)}")
    C, H, W = input_size
    built: dict[str, Any] = {"num_classes": num_classes, "in_chans": C, "img_size": (H, W), **kwargs}
    for attempt in range(2):
        try:
            return timm.create_model(arch, pretrained=False, **built), built
        except TypeError as e:  # architectures without an img_size argument (CNNs) take any size
            if attempt or "img_size" in kwargs or "img_size" not in str(e):
                error: Exception = e
                break
            built.pop("img_size")
        except Exception as e:  # timm raises many types for bad kwargs; this is the boundary
            error = e
            break
    raise SmiError(f"cannot create {what} {arch!r}: {(str(error).splitlines() or [type(error).__name__])[0]}")


def check_fits(model: nn.Module, name: str, input_size: tuple[int, int, int], num_classes: int,
               what: str = "model") -> None:
    """One forward pass of a zero image: ``model`` must read ``input_size`` and predict ``num_classes``
    (per image, or per pixel of the input for a segmenter)."""
    was_training = model.training
    try:
        with torch.no_grad():
            out = model.eval()(torch.zeros(1, *input_size, device=next(model.parameters()).device))
    except Exception as e:  # a shape error inside any timm model: this is the boundary
        raise SmiError(f"{what} {name} cannot read {'x'.join(map(str, input_size))} images: "
                       f"{(str(e).splitlines() or [type(e).__name__])[0]}") from None
    finally:
        model.train(was_training)
    if getattr(model, "task", "classification") == "segmentation":
        if out.ndim != 4 or out.shape[1] != num_classes or tuple(out.shape[2:]) != tuple(input_size[1:]):
            raise SmiError(f"{what} {name} predicts {tuple(out.shape[1:])} per image, not {num_classes} classes "
                           f"per pixel of {input_size[1]}x{input_size[2]}")
    elif out.ndim != 2 or out.shape[1] != num_classes:
        raise SmiError(f"{what} {name} predicts {out.shape[-1]} classes, not {num_classes}")


def load_teacher(
    spec: str, *, pretrained: bool = False, device: torch.device | str = "cpu", **model_kwargs: Any
) -> Teacher:
    """Load a frozen teacher.

    Args:
        spec: a path to ``*.safetensors`` (with its ``*.json`` beside it), the name of a teacher
            smi ships (``fmnist_vit_tiny``, loaded with its weights), or any timm model name.
        pretrained: for a timm name, download timm's pretrained weights (needs the internet);
            without it the model is randomly initialised (useful for speed measurements).
        device: where the model lives.
        model_kwargs: passed to ``timm.create_model`` for a timm name.

    >>> teacher = load_teacher("fmnist_vit_tiny")
    >>> teacher.num_classes, teacher.input_size
    (10, (1, 28, 28))
    """
    import smi.models.teachers as shipped  # registers the shipped teachers with timm

    path = Path(spec)
    if spec.endswith((".safetensors", ".json", *TORCH_SUFFIXES)) or path.exists():
        return _load_checkpoint(path, device)
    if spec in {**shipped.SHIPPED_TEACHERS, **shipped.SHIPPED_CNN_TEACHERS, **shipped.SEGMENTERS}:
        weights = shipped.WEIGHTS_DIR / f"{spec}.safetensors"
        if not weights.is_file():
            raise SmiError(f"shipped teacher {spec!r} has no weights at {weights}; train it with "
                           f"`smi train-teacher --arch {spec}`")
        return _load_checkpoint(weights, device, spec=spec)
    if not timm.is_model(spec):
        raise SmiError(f"unknown model {spec!r}{did_you_mean(spec)}")
    try:
        model = timm.create_model(spec, pretrained=pretrained, **model_kwargs)
    except Exception as e:  # bad kwargs, hub and network errors surface as many types; this is the boundary
        raise SmiError(f"cannot create {spec!r}: {(str(e).splitlines() or [type(e).__name__])[0]}") from None
    cfg = _data_cfg(model)
    label_names = getattr(model, "pretrained_cfg", {}).get("label_names")
    return Teacher(
        model=_freeze(model, device), spec=spec, arch=spec, num_classes=model.num_classes,
        input_size=tuple(cfg["input_size"]), mean=tuple(cfg["mean"]), std=tuple(cfg["std"]),
        class_names=list(label_names) if label_names else None,
        fingerprint=f"{'timm-pretrained' if pretrained else 'random-init'}:{spec}",
        crop_pct=float(cfg.get("crop_pct", 1.0)), interpolation=str(cfg.get("interpolation", "bilinear")),
    )


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from safetensors, or from a .pt/.pth/.bin file without running any pickled code."""
    if path.suffix in TORCH_SUFFIXES:
        import pickle
        import warnings

        try:
            with warnings.catch_warnings():  # torch warns about the pickle protocol before refusing: one line only
                warnings.simplefilter("ignore")
                state = torch.load(str(path), map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
            raise SmiError(f"{path}: refused: not a plain tensor file, and smi never unpickles code "
                           f"({(str(e).splitlines() or ['?'])[0][:120]}); convert it to safetensors") from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise SmiError(f"{path}: expected a state dict of tensors")
        return state
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise SmiError(f"{path}: unreadable safetensors file ({e})") from None


def _check_input_size(model: nn.Module, input_size: tuple[int, ...], where: Path) -> None:
    """The recorded input size must be one the model reads: its first layer's channels, a ViT's fixed image size."""
    channels = in_channels(model)
    if channels is not None and channels != input_size[0]:
        raise SmiError(f"{where}: input_size says {input_size[0]} channels, but the model's first layer takes "
                       f"{channels}")
    pe = getattr(model, "patch_embed", None)
    size = getattr(pe, "img_size", None)
    if size is not None and not getattr(pe, "dynamic_img_size", False) and tuple(size) != tuple(input_size[1:]):
        raise SmiError(f"{where}: input_size says {input_size[1]}x{input_size[2]} images, but the model is built "
                       f"for {size[0]}x{size[1]}")


def _check_forward(model: nn.Module, input_size: tuple[int, ...], where: Path) -> None:
    """One image through the model: a hand-edited ``model_kwargs`` (a negative head count, say) can build a
    model whose weights load but whose forward pass fails; say so here rather than deep in a later command."""
    training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, *input_size))
    except Exception as e:  # whatever the built model raises: the metadata is what is wrong
        raise SmiError(f"{where}: the model its model_kwargs build cannot read a {'x'.join(map(str, input_size))} "
                       f"image: {(str(e).splitlines() or [type(e).__name__])[0][:200]}") from None
    finally:
        model.train(training)


_INTERPOLATIONS = {"nearest", "nearest-exact", "bilinear", "bicubic", "box", "hamming", "lanczos"}  # torchvision's


def _load_checkpoint(path: Path, device: torch.device | str, spec: str | None = None) -> Teacher:
    weights = path if path.suffix in TORCH_SUFFIXES else path.with_suffix(".safetensors")
    meta_path = path.with_suffix(".json")
    if path.is_dir():
        raise SmiError(f"{path} is a folder; give the checkpoint's .safetensors file")
    for p in (weights, meta_path):
        if not p.is_file():
            raise SmiError(f"checkpoint file {p} not found (a checkpoint is NAME.safetensors + NAME.json)")
    meta = read_format_json(meta_path, TEACHER_FORMAT, "teacher checkpoint")
    try:
        arch, kwargs = meta["architecture"], dict(meta.get("model_kwargs", {}))
        if not isinstance(arch, str) or not arch:
            raise ValueError("architecture (a timm model name)")
        kwargs.pop("num_classes", None)  # the metadata's own field says it
        if any(isinstance(v, bool) for v in [meta["num_classes"], *meta["input_size"], *meta["mean"], *meta["std"]]):
            raise ValueError("num_classes, input_size, mean or std (numbers, not true/false)")
        num_classes = int(meta["num_classes"])
        input_size = tuple(int(v) for v in meta["input_size"])
        mean, std = tuple(float(v) for v in meta["mean"]), tuple(float(v) for v in meta["std"])
        if len(input_size) != 3 or min(input_size) < 1 or len(mean) != input_size[0] or len(std) != input_size[0]:
            raise ValueError("input_size (C, H, W) with one mean and std per channel")
        crop_pct = float(meta["crop_pct"]) if meta.get("crop_pct") is not None else None
        interpolation = meta.get("interpolation")
        dataset = meta.get("dataset")
        if not (dataset is None or isinstance(dataset, str)) or not (crop_pct is None or 0 < crop_pct <= 1):
            raise ValueError("dataset (a string) or crop_pct (in (0, 1])")
        if not (interpolation is None or interpolation in _INTERPOLATIONS):
            raise ValueError(f"interpolation (one of {', '.join(sorted(_INTERPOLATIONS))})")
        names = meta.get("class_names")
        if names is not None and not (isinstance(names, list) and len(names) == num_classes
                                      and all(isinstance(n, str) for n in names)):
            raise ValueError("class_names (a list of num_classes strings)")
    except (KeyError, TypeError, ValueError) as e:
        raise SmiError(f"{meta_path}: missing or malformed field {e}") from None
    import smi.models.teachers  # noqa: F401  (registers shipped architectures)

    if not timm.is_model(arch):
        raise SmiError(f"{meta_path}: unknown architecture {arch!r}{did_you_mean(arch)}")
    state = _read_weights(weights)
    try:
        model = timm.create_model(arch, pretrained=False, num_classes=num_classes, **kwargs)
    except Exception as e:  # any kwarg a hand-edited JSON may hold reaches timm; this is the boundary
        raise SmiError(f"{meta_path}: cannot build {arch} from its model_kwargs: "
                       f"{(str(e).splitlines() or [type(e).__name__])[0][:200]}") from None
    expected = model.state_dict()
    # BatchNorm's step counter carries no weights, and a backbone frozen under a linear probe (timm's
    # FrozenBatchNorm2d) has none: files that lack it load, as torch's own BatchNorm loading allows
    missing = sorted(k for k in set(expected) - set(state) if not k.endswith(".num_batches_tracked"))
    unexpected = sorted(set(state) - set(expected))
    wrong = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        detail = (f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}" if unexpected
                  else f"{wrong[0]} is {tuple(state[wrong[0]].shape)}, expected {tuple(expected[wrong[0]].shape)}")
        raise SmiError(f"{weights}: weights do not match the metadata's {arch}: {detail}")
    model.load_state_dict(state)
    _check_input_size(model, input_size, meta_path)
    _check_forward(model, input_size, meta_path)
    timm_cfg = _data_cfg(model)  # checkpoints written before smi recorded the transform: timm's
    return Teacher(
        model=_freeze(model, device), spec=spec or str(path), arch=arch, num_classes=num_classes,
        input_size=input_size, mean=mean, std=std, class_names=meta.get("class_names"),
        fingerprint=f"sha256:{sha256_file(weights)}", extra={"metadata": meta},
        crop_pct=crop_pct if crop_pct is not None else float(timm_cfg.get("crop_pct", 1.0)),
        interpolation=str(interpolation or timm_cfg.get("interpolation", "bilinear")), dataset=dataset,
    )


def _plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s state dict as its architecture has it: BatchNorm layers frozen under a linear probe (timm's
    ``FrozenBatchNorm2d``) are written as the ``BatchNorm2d`` they were, step counter included, so the file loads
    into the plain architecture; the model itself is left as it is."""
    from timm.layers import unfreeze_batch_norm_2d
    from timm.layers.norm_act import FrozenBatchNorm2d, FrozenBatchNormAct2d

    if not any(isinstance(m, (FrozenBatchNorm2d, FrozenBatchNormAct2d)) for m in model.modules()):
        return model.state_dict()
    return unfreeze_batch_norm_2d(copy.deepcopy(model)).state_dict()


def save_teacher(
    model: nn.Module, path: str | Path, *, arch: str, model_kwargs: dict[str, Any] | None = None,
    class_names: list[str] | None = None, extra: dict[str, Any] | None = None,
    data_config: dict[str, Any] | None = None,
) -> Path:
    """Write ``path`` (.safetensors) and its .json metadata, atomically. Returns the weights path.

    The metadata says how the model reads images: ``data_config`` (``input_size``, ``mean``,
    ``std``, ``crop_pct``, ``interpolation``, ``dataset``; see :meth:`Teacher.data_config`), with
    anything it leaves out taken from the model itself (its first layer's channels, its
    ``img_size``) and timm's config. A student passes its teacher's.
    """
    path = Path(path).with_suffix(".safetensors")
    cfg = _data_cfg(model)
    cfg = {"input_size": list(cfg["input_size"]), "mean": list(cfg["mean"]), "std": list(cfg["std"]),
           "crop_pct": float(cfg.get("crop_pct", 1.0)), "interpolation": str(cfg.get("interpolation", "bilinear")),
           "dataset": None, **{k: list(v) if isinstance(v, tuple) else v for k, v in (data_config or {}).items()}}
    meta = {
        "format": TEACHER_FORMAT, "architecture": arch, "model_kwargs": model_kwargs or {},
        "num_classes": model.num_classes, **cfg, "class_names": class_names,
        "timm_version": timm.__version__, "torch_version": torch.__version__, **(extra or {}),
    }
    atomic_save_tensors(path, _plain_state_dict(model))
    atomic_write_json(path.with_suffix(".json"), meta)
    return path
