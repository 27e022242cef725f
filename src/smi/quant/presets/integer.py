"""A CNN quantized as an integer runtime runs it: BatchNorm folded, every tensor between kernels quantized."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn
from timm.models.resnet import BasicBlock, Bottleneck, ResNet
from torch.nn.utils.fusion import fuse_conv_bn_eval

from smi.errors import SmiError
from smi.quant.config import PRESETS, QuantConfig, QuantHandler, register_handler
from smi.quant.quantizers import ActQuantizer

__all__ = ["IntegerConfig", "OutputQuant", "fold_batchnorm_"]


@PRESETS.register("integer")
@dataclass(frozen=True)
class IntegerConfig(QuantConfig):
    """For timm ResNets: BatchNorm folded into the convolutions (the weights quantized are the folded ones), and
    every activation an integer runtime stores quantized: the input, the stem's output, each residual branch's
    output before the add, the shortcut's, each block's output after the add and ReLU, the pooled features;
    weights symmetric per output channel, activations asymmetric per tensor (min-max).

    >>> IntegerConfig(w_bits=4, a_bits=4).to_dict()
    {'preset': 'integer', 'version': 1, 'w_bits': 4, 'a_bits': 4}
    """

    name = "integer"


class OutputQuant(nn.Sequential):
    """``module`` followed by the quantizer of its output: (module, quantizer)."""


def _pairs(block: nn.Module) -> list[tuple[str, str]]:
    """(conv, bn) attribute pairs of a timm ResNet block, in order; the last pair is the residual branch's end."""
    if isinstance(block, BasicBlock):
        return [("conv1", "bn1"), ("conv2", "bn2")]
    if isinstance(block, Bottleneck):
        return [("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")]
    raise SmiError(f"the integer preset knows timm's BasicBlock and Bottleneck, not {type(block).__name__}")


def _fold(parent: nn.Module, conv: str, bn: str, bn_parent: nn.Module | None = None) -> None:
    """Fold ``bn_parent.bn`` (default: ``parent.bn``) into ``parent.conv``; the BatchNorm becomes an Identity."""
    bn_parent = parent if bn_parent is None else bn_parent
    c, b = getattr(parent, conv), getattr(bn_parent, bn)
    if not isinstance(b, nn.BatchNorm2d):
        return  # folded already (a model prepared again, or rebuilt for loading)
    if not isinstance(c, nn.Conv2d) or b.num_features != c.out_channels:
        raise SmiError(f"cannot fold {type(b).__name__} into {type(c).__name__} ({conv} -> {bn})")
    setattr(parent, conv, fuse_conv_bn_eval(c.eval(), b.eval()))
    setattr(bn_parent, bn, nn.Identity())


def _fold_sequential(seq: nn.Sequential) -> None:
    """Fold each BatchNorm of ``seq`` into the convolution just before it."""
    for i in range(len(seq) - 1):
        if isinstance(seq[i], nn.Conv2d) and isinstance(seq[i + 1], nn.BatchNorm2d):
            _fold(seq, str(i), str(i + 1))


def fold_batchnorm_(model: nn.Module, quantizer=None) -> nn.Module:
    """Fold every BatchNorm of a timm ResNet into its convolution, in place (eval-mode statistics); with
    ``quantizer`` (a function returning a fresh activation quantizer), also insert the integer runtime's
    quantization points. The float function is unchanged by the fold (up to rounding)."""
    if not isinstance(model, ResNet):
        raise SmiError(f"the integer preset is for timm ResNets (BatchNorm CNNs); {type(model).__name__} is not one: "
                       "use --quantizer baseline or repq")

    def after(parent: nn.Module, name: str) -> None:
        if quantizer is not None and not isinstance(getattr(parent, name), OutputQuant):
            setattr(parent, name, OutputQuant(getattr(parent, name), quantizer()))

    stem = model.conv1
    if isinstance(stem, nn.Sequential) and isinstance(stem[-1], nn.Conv2d):  # a deep stem (resnet*d, *t)
        _fold_sequential(stem)
        _fold(stem, str(len(stem) - 1), "bn1", bn_parent=model)
    elif isinstance(stem, nn.Conv2d):
        _fold(model, "conv1", "bn1")
    else:
        raise SmiError(f"the integer preset cannot fold this stem ({type(stem).__name__})")
    after(model, "act1")  # the stem's output (max pooling keeps the integer grid)
    for stage in (model.layer1, model.layer2, model.layer3, model.layer4):
        for block in stage:
            pairs = _pairs(block)
            for conv, bn in pairs:
                _fold(block, conv, bn)
            after(block, pairs[-1][1])  # the residual branch's output, before the add
            down = block.downsample
            if down is not None:
                if not (isinstance(down, nn.Sequential) and isinstance(down[-2], nn.Conv2d)):
                    raise SmiError("the integer preset needs a shortcut that ends in a convolution and its "
                                   "BatchNorm (timm's downsample, with or without average pooling)")
                _fold_sequential(down)
                after(down, str(len(down) - 1))  # the shortcut's output
            after(block, "act3" if isinstance(block, Bottleneck) else "act2")  # the block's output: add + ReLU
    return model


@register_handler(IntegerConfig)
class IntegerHandler(QuantHandler):
    weight_search = "minmax"

    def act_quantizer(self, config: QuantConfig, role: str) -> nn.Module:
        return ActQuantizer(config.a_bits)

    def before_prepare(self, model: nn.Module, config: QuantConfig) -> None:
        fold_batchnorm_(model, lambda: ActQuantizer(config.a_bits))
