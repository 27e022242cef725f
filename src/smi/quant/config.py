"""Quantization configs as types: one frozen dataclass per preset, one handler per config type.

After torchao's ``quantize_(model, config)`` with ``register_quantize_module_handler``: a preset is
one file in :mod:`smi.quant.presets` holding its config type (registered by name in
:data:`PRESETS`, for the CLI and saved folders) and its :class:`QuantHandler` (registered for the
type with :func:`register_handler`), which says which quantizer goes where and what convert does.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from smi.errors import SmiError
from smi.registry import Registry

if TYPE_CHECKING:
    import torch.nn as nn

__all__ = ["PRESETS", "QuantConfig", "QuantHandler", "handler_for", "register_handler"]

PRESETS: Registry[type[QuantConfig]] = Registry("quantizer preset")


@dataclass(frozen=True)
class QuantConfig:
    """Bit widths; a subclass per preset says how (``BaselineConfig``, ``RepQConfig``).

    ``to_dict`` records the preset's name and the format version, so a saved folder reads back
    as the same type; folders written before presets were types (``{"quantizer": "repq", ...}``)
    still load.
    """

    w_bits: int = 8
    a_bits: int = 8
    edge_bits: int | None = None  # the first layer's and the classifier head's weights and input; None: as the rest
    rotate: bool = False  # rotate the ViT first (:func:`smi.quant.rotate.rotate_`): same float function, fewer outliers

    name: ClassVar[str] = ""  # the preset's name in PRESETS
    version: ClassVar[int] = 1  # bump when a preset's saved state changes meaning

    def __post_init__(self) -> None:
        if type(self) is QuantConfig:
            raise SmiError(f"QuantConfig is abstract; use a preset: {', '.join(PRESETS.names())}", param="quantizer")
        for name in ("w_bits", "a_bits", "edge_bits"):
            bits = getattr(self, name)
            if name == "edge_bits" and bits is None:
                continue
            if not isinstance(bits, int) or isinstance(bits, bool) or not 2 <= bits <= 8:
                raise SmiError(f"must be an integer from 2 to 8, got {bits!r}", param=name)
        if not isinstance(self.rotate, bool):
            raise SmiError(f"must be true or false, got {self.rotate!r}", param="rotate")

    def to_dict(self) -> dict[str, Any]:
        fields = asdict(self)
        if self.edge_bits is None:  # folders written before edge_bits existed read back as the same config
            del fields["edge_bits"]
        if not self.rotate:  # as for edge_bits: folders written before rotate existed read back unchanged
            del fields["rotate"]
        return {"preset": self.name, "version": self.version, **fields}

    def at_edge(self) -> QuantConfig:
        """The config of the first layer and the classifier head: ``edge_bits`` for weights and input, if set.

        Low-bit quantization-aware training (LSQ, Q-ViT) keeps these two layers at 8 bits; they hold a
        tiny share of the weights and compute and see the raw image and the logits' inputs."""
        return self if self.edge_bits is None else replace(self, w_bits=self.edge_bits, a_bits=self.edge_bits)

    def label(self) -> str:
        """``W4A4``; ``W3A3 (edges 8)`` with ``edge_bits``, ``W3A3 rotated`` with ``rotate``."""
        return (f"W{self.w_bits}A{self.a_bits}" + ("" if self.edge_bits is None else f" (edges {self.edge_bits})")
                + (" rotated" if self.rotate else ""))

    @staticmethod
    def from_dict(d: dict[str, Any]) -> QuantConfig:
        """The config ``to_dict`` wrote (or an older folder's ``{"quantizer": NAME, ...}``)."""
        d = dict(d)
        name = d.pop("preset", None) or d.pop("quantizer", "baseline")
        d.pop("quantizer", None)
        cls = PRESETS.get(name, param="quantizer")
        version = d.pop("version", 1)
        if version > cls.version:
            raise SmiError(f"{name} config version {version} is newer than this smi's ({cls.version}); upgrade smi")
        return cls(**d)

    @staticmethod
    def create(name: str, **fields: Any) -> QuantConfig:
        """The preset called ``name`` with ``fields``: ``QuantConfig.create("repq", w_bits=4, a_bits=4)``."""
        return PRESETS.get(name, param="quantizer")(**fields)


class QuantHandler:
    """What a preset does to a model: the activation quantizer at each place, the weight scale search,
    the transform that runs before convert, and how to rebuild a converted model's structure for loading."""

    weight_search: str = "minmax"  # or "mse"

    def act_quantizer(self, config: QuantConfig, role: str) -> nn.Module:
        """The activation quantizer for ``role``: input, ln_out (after a LayerNorm), qk, v or softmax."""
        raise NotImplementedError

    def before_prepare(self, model: nn.Module, config: QuantConfig) -> None:
        """Runs on the float model before its layers are swapped (the integer preset folds BatchNorm here and
        inserts its output quantizers); it also runs when a saved model is rebuilt, so it must be idempotent."""

    def before_convert(self, model: nn.Module, config: QuantConfig) -> None:
        """Runs on the calibrated model before ranges are frozen (RepQ folds its scales here)."""

    def rebuild(self, model: nn.Module, config: QuantConfig) -> None:
        """Turns a freshly prepared model into the converted structure, so saved state loads into it."""


_HANDLERS: dict[type[QuantConfig], QuantHandler] = {}
C = TypeVar("C", bound=type[QuantHandler])


def register_handler(config_type: type[QuantConfig]):
    """Decorator: ``handler_cls`` handles configs of ``config_type``."""

    def add(handler_cls: C) -> C:
        _HANDLERS[config_type] = handler_cls()
        return handler_cls

    return add


def handler_for(config: QuantConfig) -> QuantHandler:
    try:
        return _HANDLERS[type(config)]
    except KeyError:
        raise SmiError(f"no quantization handler for {type(config).__name__}", param="quantizer") from None
