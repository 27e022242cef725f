"""Named synthesis methods: frozen presets of loss terms, options, label sampler, curriculum and schedule.

A method is one decorated function here that returns what it changes in
:class:`~smi.inversion.config.InversionConfig`'s defaults; its docstring is its ``--help`` line.
Any field can still be set explicitly on top (``InversionConfig.for_method(name, lr=0.1)``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from smi.registry import Registry

__all__ = ["GENQ_OPTIONS", "METHODS", "Method", "register_method"]


@dataclass(frozen=True)
class Method:
    name: str
    defaults: Mapping[str, Any]  # InversionConfig fields the method sets
    task: str | None = None  # "segmentation": for segmenters only; "diffusion": sampled from a diffusion model


METHODS: Registry[Method] = Registry("method")


def register_method(name: str, task: str | None = None) -> Callable[[Callable[[], dict[str, Any]]], Method]:
    """Decorator: the function returns the method's config defaults; its docstring says what it is.
    ``task="segmentation"``: the method synthesizes for segmenters only."""

    def add(fn: Callable[[], dict[str, Any]]) -> Method:
        method = Method(name, MappingProxyType(fn()), task)
        METHODS.register(name, help=fn.__doc__ or name)(method)
        return method

    return add


def pool_methods() -> list[str]:
    """The classification methods that make a pool from the teacher alone (no segmenter or diffusion task, no
    term that needs a student: psaq-v2 runs only inside smi qat/distill --online)."""
    from smi.inversion.terms import TERMS

    return [n for n, m in METHODS.items() if m.task is None
            and not any(TERMS.get(t).needs_student for t in m.defaults.get("terms", {}))]


@register_method("deepinversion")
def deepinversion() -> dict[str, Any]:
    """Cross-entropy on the planned classes + total variation, jitter and flip (CVPR 2020)."""
    return {}


@register_method("psaq")
def psaq() -> dict[str, Any]:
    """PSAQ-ViT: maximize the KDE entropy of patch similarities in every block + CE + |TV - v|; two rounds
    (jitter 15/224 then 30/224 of the side), cosine lr (ECCV 2022)."""
    return dict(lr=0.2, betas=(0.5, 0.9), iterations=1000, tv_l2=0.0, rounds=(15 / 224, 30 / 224),
                lr_schedule="cosine", warmup=100, terms={"psaq": 1.0, "tv_target": 0.05})


@register_method("psaq-v2")
def psaq_v2() -> dict[str, Any]:
    """PSAQ-ViT V2: psaq's patch-similarity entropy and TV without class labels, and images that maximize the KL
    between the teacher and the model being trained (online only: smi qat/distill --online) (TNNLS 2023)."""
    return dict(psaq.defaults, ce_weight=0.0, terms={"psaq": 1.0, "tv_target": 0.05, "adversarial": 1.0},
                options={"adversarial_kl": 1.0})


@register_method("sardfq")
def sardfq() -> dict[str, Any]:
    """SARDFQ: align deeper blocks' class-token attention to random Gaussian-mixture maps; soft labels with the
    target logit in U(5, 10); TV (ICCV 2025)."""
    return dict(labels="sardfq", tv_l2=0.0, tv_l1=0.05, terms={"sardfq": 50.0})


@register_method("mimiq")
def mimiq() -> dict[str, Any]:
    """MimiQ: make the attention maps of different heads agree (1 - SSIM^2) + CE + TV (AAAI 2025)."""
    return dict(tv_l2=2.5e-5, terms={"mimiq": 1.0})


@register_method("ris")
def ris() -> dict[str, Any]:
    """RIS: deepinversion + robustness to input and weight perturbations + diversity-aware soft labels
    (AAAI 2024)."""
    return dict(labels="ris", terms={"ris_input": 1.0, "ris_weight": 1.0})


@register_method("qimera-mix")
def qimera_mix() -> dict[str, Any]:
    """Qimera: deepinversion with boundary-supporting samples, mixtures of 2 classes with probability 0.4
    (NeurIPS 2021)."""
    return dict(labels="qimera")


@register_method("e2h")
def e2h() -> dict[str, Any]:
    """DFQ-ViT's easy-to-hard curriculum on deepinversion: later batches ask for less confident targets, near a
    boundary with a second class (2025)."""
    return dict(curriculum="e2h")


@register_method("dfq-sam", task="segmentation")
def dfq_sam() -> dict[str, Any]:
    """DFQ-SAM, for segmenters: per-pixel targets that start as random object-shaped blobs and evolve toward the
    segmenter's own confident labels (pseudo-positive label evolution) + psaq's patch-similarity entropy and TV
    (2024)."""
    return dict(psaq.defaults, terms={"psaq": 1.0, "tv_target": 0.05}, options={"seg_evolve": 1.0})


# the knobs of the diffusion methods (smi.generators.diffusion); p_mix and mix_k are shared with qimera's labels
GENQ_OPTIONS: dict[str, float] = {
    "genq_mix": 0.0,  # 1: mixup-class prompting (genq-mix), else one class per image (genq)
    "genq_fuse": 0.0,  # 1: one prompt naming the mixed classes; 0: their text embeddings mixed
    "genq_steps": 25,  # denoising steps
    "genq_guidance": 7.5,  # classifier-free guidance scale
    "genq_min_confidence": 0.0,  # keep images the teacher agrees with at least this much (0: keep all)
    "genq_max_tries": 8,  # rounds of drawing per batch before the confidence filter gives up
}


@register_method("genq", task="diffusion")
def genq() -> dict[str, Any]:
    """GenQ: a local text-to-image diffusion model (--diffusion-model PATH) prompted "a photo of a CLASS" with the
    teacher's class names; sampled, not optimized (CVPR 2024)."""
    return {}


@register_method("genq-mix", task="diffusion")
def genq_mix() -> dict[str, Any]:
    """Mixup-class prompting: genq, with mix_k classes per image (probability p_mix), their text embeddings mixed
    by softmax(N(0, 1)) weights (genq_fuse=1: one prompt naming them all), the weights kept as soft targets."""
    return dict(options={"genq_mix": 1.0, "p_mix": 1.0})
