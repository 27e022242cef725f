"""Training a conditional generator against a frozen full-precision teacher, and using it as a data source.

The generator is any kind in :data:`smi.generators.GENERATORS` (``gdfq``, ``qimera``). Qimera's
superposed samples (``superpose_prob``: the share of batches whose images each mix
``superpose_classes`` random classes with softmax(N(0, 1)) weights) are trained toward those weights
as soft targets, and a trained Qimera generator keeps drawing them as a source and into pools
(where the weights are the images' soft targets).

GDFQ's generator objective, teacher-only: for noise ``z`` and uniformly drawn classes ``y``, the
images ``G(z, y)`` must be classified as ``y`` by the teacher (cross-entropy) and, for a teacher
with BatchNorm, reproduce every BN layer's running statistics in their batch statistics
(DeepInversion's prior, :func:`smi.inversion.terms.bn.bn_statistics`). A ViT teacher has no BN
statistics; in their place the generator maximizes PSAQ-ViT's patch-similarity entropy
(:func:`smi.inversion.terms.psaq.patch_similarity_entropy`), as PSAQ-ViT does for pixels. Adam
(lr 1e-3, betas 0.5/0.999 as GDFQ) with a cosine schedule; the run folder resumes after an
interruption like every other smi training run.

Once trained, ``generator:PATH`` is a data source (:class:`GeneratorSource`): every draw is a
fresh batch of images from new noise, one forward pass each, so calibration (``smi quantize
--calib generator:PATH``) and training loops (``smi distill --generator PATH``) read it like a
pool that never runs out.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file

from smi.data.pool import check_pool_teacher, load_pool, read_manifest
from smi.data.sources import SOURCES, DataSource, ImageSet, ModelSpec
from smi.errors import SmiError
from smi.generators.attention import AttentionMap, attention_centre
from smi.generators.model import GENERATORS, ACQGenerator, ConditionalGenerator
from smi.generators.texture import texture_centres, texture_loss
from smi.inversion.engine import valid_range
from smi.inversion.terms._base import Captures
from smi.inversion.terms.adversarial import divergence
from smi.inversion.terms.bn import bn_statistics
from smi.inversion.terms.psaq import patch_similarity_entropy
from smi.models.loading import Teacher, batch_norms, require_classifier
from smi.runner import FitConfig, RunFolder, fit
from smi.utils.io import atomic_save_tensors, atomic_write_json, read_format_json, sha256_file
from smi.utils.state import load_checkpoint, save_checkpoint

__all__ = ["GENERATOR_FORMAT", "GeneratorConfig", "GeneratorSource", "OnlineGeneratorSource", "adadfq_margin",
           "build_generator", "generator_loss", "load_generator", "mode_seeking", "pair_disagreement", "sample_labels",
           "sample_targets", "train_generator"]

GENERATOR_FORMAT = "smi-generator/1"
RUN_FORMAT = "smi-generator-run/1"
WEIGHTS, META = "generator.safetensors", "generator.json"
STATE = "state.safetensors"  # an online generator's weights and optimizer after its last trained epoch


@dataclass
class GeneratorConfig:
    """How a generator is trained against the teacher (GDFQ's settings where it states them)."""

    kind: str = "gdfq"  # a smi.generators.GENERATORS name
    epochs: int = 10
    steps_per_epoch: int = 100
    batch_size: int = 64
    lr: float = 1e-3
    latent_dim: int = 100  # qimera with init_from_head: the classifier's input width instead
    width: int = 128
    superpose_prob: float | None = None  # share of superposed batches; None: the kind's (qimera 0.4, gdfq 0)
    superpose_classes: int = 2  # classes mixed in a superposed image (Qimera's K)
    mapped_dim: int = 100  # qimera: output size of the disentanglement mapping layer
    init_from_head: bool = True  # qimera: class embeddings start as the teacher's classifier weights
    texture_pool: str | None = None  # texq: the pool whose images give the per-class texture centres
    texture_weight: float = 1.0  # texq: weight of the squared distance to the class's texture centre
    centre_weight: float = 10.0  # acq: weight of the squared distance of the attention centre to the asked one
    seek_weight: float = 1.0  # acq: weight of the mode-seeking loss between images of one condition
    style_weight: float = 1.0  # causal: weight of the teacher's disagreement between two styles of one content
    style_seek_weight: float = 0.0  # causal: mode seeking between a content's two styles (0: off; see to_dict)
    ce_weight: float = 1.0
    bn_weight: float = 0.1  # BatchNorm teachers: GDFQ's weight of the BN-statistics loss
    bn_first_weight: float = 1.0  # GDFQ weighs every BN layer alike (DeepInversion: 10 on the first)
    psaq_weight: float = 1.0  # ViT teachers: minus the patch-similarity entropy, summed over blocks
    pixel_range: bool = False  # images bounded to the teacher's valid pixels, not GDFQ's last BatchNorm (see to_dict)
    seed: int = 0

    def __post_init__(self) -> None:
        GENERATORS.get(self.kind, param="kind")
        if self.superpose_prob is None:
            self.superpose_prob = 0.4 if self.kind == "qimera" else 0.0
        if not 0 <= self.superpose_prob <= 1:
            raise SmiError(f"must be in [0, 1], got {self.superpose_prob}", param="superpose_prob")
        if self.superpose_classes < 2:
            raise SmiError(f"must be >= 2, got {self.superpose_classes}", param="superpose_classes")
        for name in ("epochs", "steps_per_epoch", "batch_size", "latent_dim", "width", "mapped_dim"):
            if getattr(self, name) < 1:
                raise SmiError(f"must be >= 1, got {getattr(self, name)}", param=name)
        if self.batch_size < 2:
            raise SmiError(f"must be >= 2 (the generator's BatchNorm needs two images), got {self.batch_size}",
                           param="batch_size")
        if not 0 < self.lr < 1:
            raise SmiError(f"must be in (0, 1), got {self.lr}", param="lr")
        if (self.kind == "texq") != (self.texture_pool is not None):
            raise SmiError("texq needs a pool of calibration images for its texture centres (texture_pool), and only "
                           "texq reads one", param="texture_pool")
        for name in ("ce_weight", "bn_weight", "bn_first_weight", "psaq_weight", "texture_weight", "centre_weight",
                     "seek_weight", "style_weight", "style_seek_weight"):
            if getattr(self, name) < 0:
                raise SmiError(f"must be >= 0, got {getattr(self, name)}", param=name)
        if self.style_seek_weight and self.kind != "causal":
            raise SmiError(f"only the causal generator has styles to seek modes between, not {self.kind!r}",
                           param="style_seek_weight")

    def to_dict(self) -> dict[str, Any]:
        """The settings as recorded in run folders and benchmark cells: ``style_seek_weight`` and ``pixel_range``
        only when set, so that folders and cells made before they existed keep matching."""
        d = asdict(self)
        for name in ("style_seek_weight", "pixel_range"):
            if not d[name]:
                del d[name]
        return d


def sample_labels(n: int, num_classes: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` labels, each class equally often (up to one) in a random order."""
    return (torch.arange(n) % num_classes)[torch.randperm(n, generator=generator)]


def sample_targets(n: int, num_classes: int, generator: torch.Generator, superpose_prob: float = 0.0,
                   superpose_classes: int = 2) -> torch.Tensor:
    """A batch's targets: balanced labels (n,), or with probability ``superpose_prob`` class weights (n, classes)
    mixing ``superpose_classes`` distinct random classes per image with softmax(N(0, 1)) weights (Qimera)."""
    superpose = superpose_prob > 0 and bool(torch.rand((), generator=generator) < superpose_prob)
    if not superpose:
        return sample_labels(n, num_classes, generator)
    k = min(superpose_classes, num_classes)
    classes = torch.rand(n, num_classes, generator=generator).argsort(1)[:, :k]
    weights = torch.randn(n, k, generator=generator).softmax(1)
    return torch.zeros(n, num_classes).scatter_(1, classes, weights)


def build_generator(teacher: Teacher, cfg: GeneratorConfig) -> ConditionalGenerator:
    """A fresh generator of ``cfg.kind`` for ``teacher``'s classes and input (Qimera: embeddings from its head)."""
    kind = GENERATORS.get(cfg.kind, param="kind")
    head = teacher.model.get_classifier() if hasattr(teacher.model, "get_classifier") else None
    from_head = cfg.kind == "qimera" and cfg.init_from_head and isinstance(head, torch.nn.Linear)
    latent = head.in_features if from_head else cfg.latent_dim  # type: ignore[union-attr]
    extra: dict[str, Any] = {"mapped_dim": cfg.mapped_dim} if cfg.kind == "qimera" else {}
    if cfg.pixel_range:
        lo, hi = valid_range(teacher.mean, teacher.std, "cpu")
        extra["pixel_range"] = (lo.flatten().tolist(), hi.flatten().tolist())
    model = kind(teacher.num_classes, teacher.input_size, latent, cfg.width, **extra)
    if from_head:
        with torch.no_grad():
            model.embed.weight.copy_(head.weight)  # type: ignore[union-attr]
    return model


def pair_disagreement(logits: torch.Tensor, others: torch.Tensor | None = None,
                      temperature: float = 1.0) -> torch.Tensor:
    """Symmetric KL between the predictions on the pairs (i, i + B/2) of a batch (Causal-DFQ's style
    interventions): ``logits`` on both halves, or with ``others`` the first model's logits against the second's
    on the swapped halves (the teacher on one style, the quantized model on the other)."""
    h = len(logits) // 2
    a, b = logits[:h], logits[h:2 * h]
    if others is None:
        return 0.5 * (_kl(a, b, temperature) + _kl(b, a, temperature))
    return 0.5 * (_kl(a, others[h:2 * h], temperature) + _kl(b, others[:h], temperature))


def _kl(target_logits: torch.Tensor, logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(target / T) || softmax(logits / T)), batch mean."""
    p = F.log_softmax(target_logits / temperature, 1)
    return (p.exp() * (p - F.log_softmax(logits / temperature, 1))).sum(1).mean()


def mode_seeking(x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """MSGAN's mode-seeking loss over the pairs (i, i + B/2) of a batch laid out by ACQ: mean |z_i - z_j| over
    mean |x_i - x_j| (smaller when images of one condition differ more for the same change of noise)."""
    h = len(x) // 2
    dx = (x[:h] - x[h:2 * h]).abs().flatten(1).mean(1)
    dz = (z[:h] - z[h:2 * h]).abs().mean(1)
    return (dz / (dx + 1e-5)).mean()


class _Objective:
    """The generator's loss against one teacher: the priors its architecture allows."""

    def __init__(self, teacher: Teacher, cfg: GeneratorConfig) -> None:
        self.teacher, self.cfg = teacher, cfg
        self.attention = AttentionMap(teacher.model) if cfg.kind == "acq" else None
        self.styles = cfg.kind == "causal"
        model = teacher.model
        self.bns = batch_norms(model)
        self.vit = not self.bns and hasattr(model, "blocks")
        kinds = {"bn_inputs"} if self.bns and cfg.bn_weight else {"attn_out"} if self.vit and cfg.psaq_weight else set()
        self.captures = Captures(model, kinds, "the generator's objective")
        self.num_prefix = getattr(model, "num_prefix_tokens", 0)
        self.centres = None
        if cfg.texture_pool is not None:  # TexQ: the per-class texture calibration centres of a pool of this teacher
            pool = load_pool(cfg.texture_pool)
            check_pool_teacher(pool, teacher.fingerprint, teacher.spec, cfg.texture_pool)
            device = next(model.parameters()).device
            self.centres = texture_centres(pool.images.to(device), pool.labels.to(device), teacher.num_classes)

    def __enter__(self) -> _Objective:
        self.captures.__enter__()
        if self.attention is not None:
            self.attention.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.attention is not None:
            self.attention.__exit__(*exc)
        self.captures.__exit__(*exc)

    def __call__(self, x: torch.Tensor, y: torch.Tensor, z: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, dict[str, float], torch.Tensor]:
        """Loss on images ``x`` of targets ``y`` (labels (B,) or class weights (B, classes), a soft target) made
        from noise ``z`` (ACQ reads its conditions there), its parts, and the teacher's logits (with their
        graph, for terms that also read the student)."""
        logits, cap = self.captures.record(lambda: self.teacher.model(x))
        ce = F.cross_entropy(logits, y)  # class weights are probability targets
        loss, parts = self.cfg.ce_weight * ce, {"ce": ce.item()}
        if cap.bn_inputs:
            bn = bn_statistics(cap.bn_inputs, [(m.running_mean, m.running_var) for m in self.bns],
                               self.cfg.bn_first_weight)
            loss = loss + self.cfg.bn_weight * bn
            parts["bn"] = bn.item()
        if cap.attn_out:
            entropy = sum(patch_similarity_entropy(a, self.num_prefix).mean() for a in cap.attn_out)
            loss = loss - self.cfg.psaq_weight * entropy
            parts["entropy"] = entropy.item()
        if self.attention is not None and z is not None:  # ACQ: the teacher looks where the noise asks
            centre = ((attention_centre(self.attention.map) - ACQGenerator.condition(z)) ** 2).sum(1).mean()
            seek = mode_seeking(x, z[:, 2:])
            loss = loss + self.cfg.centre_weight * centre + self.cfg.seek_weight * seek
            parts.update(centre=centre.item(), seek=seek.item())
        if self.styles:  # Causal-DFQ: the class is the content; the teacher must not care about the style
            style = pair_disagreement(logits)
            loss = loss + self.cfg.style_weight * style
            parts["style"] = style.item()
            if self.cfg.style_seek_weight and z is not None:  # ... and the style must still change the image
                seek = mode_seeking(x, z)
                loss = loss + self.cfg.style_seek_weight * seek
                parts["seek"] = seek.item()
        if self.centres is not None:
            texture = texture_loss(x, y, self.centres)
            loss = loss + self.cfg.texture_weight * texture
            parts["texture"] = texture.item()
        label = y if y.ndim == 1 else y.argmax(1)
        parts["teacher_acc"] = 100.0 * (logits.argmax(1) == label).float().mean().item()
        return loss, parts, logits


def generator_loss(teacher: Teacher, generator: ConditionalGenerator, z: torch.Tensor, y: torch.Tensor,
                   cfg: GeneratorConfig | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """The training loss of ``generator`` on one batch (``z``, ``y``), and its parts."""
    with _Objective(teacher, cfg or GeneratorConfig()) as objective:
        return objective(generator(z, y), y, z)[:2]


def train_generator(teacher: Teacher, out: str | Path, cfg: GeneratorConfig | None = None, *,
                    device: torch.device | str = "cpu", overwrite: bool = False, progress: bool = True
                    ) -> dict[str, Any]:
    """Train a :class:`ConditionalGenerator` for ``teacher`` in the run folder ``out`` (resumable).

    Writes ``generator.safetensors`` + ``generator.json`` (its architecture, the teacher's identity, the
    config and the teacher's top-1 on a fixed batch of generated images after each epoch), which
    :func:`load_generator` and ``generator:OUT`` read.
    """
    cfg = cfg or GeneratorConfig()
    require_classifier(teacher, "a generator")
    torch.manual_seed(cfg.seed)
    gen_model = build_generator(teacher, cfg).to(device)
    texture = {} if cfg.texture_pool is None else {  # what the centres are made of, not only where it was
        "texture_pool_shards": [sh["sha256"] for sh in read_manifest(cfg.texture_pool)["shards"]]}
    run = RunFolder(out, {"config": cfg.to_dict(), "teacher": teacher.identity(), **texture}, fmt=RUN_FORMAT,
                    what="generator training run", products=(WEIGHTS, META), overwrite=overwrite)
    opt = torch.optim.Adam(gen_model.parameters(), lr=cfg.lr, betas=(0.5, 0.999))
    probe_gen = torch.Generator().manual_seed(cfg.seed + 7)
    probe_z = torch.randn(max(100, teacher.num_classes), gen_model.latent_dim, generator=probe_gen).to(device)
    probe_y = sample_labels(len(probe_z), teacher.num_classes, probe_gen).to(device)
    seen: dict[str, float] = {}

    def batches(epoch: int, g: torch.Generator):
        for _ in range(cfg.steps_per_epoch):
            z = torch.randn(cfg.batch_size, gen_model.latent_dim, generator=g)
            y = sample_targets(cfg.batch_size, teacher.num_classes, g, cfg.superpose_prob,  # type: ignore[arg-type]
                               cfg.superpose_classes)
            yield z.to(device), y.to(device)

    with _Objective(teacher, cfg) as objective:
        def step(batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
            z, y = gen_model.training_batch(*batch)
            loss, parts, _ = objective(gen_model(z, y), y, z)
            for k, v in parts.items():
                seen[k] = seen.get(k, 0.0) + v
            seen["n"] = seen.get("n", 0) + 1
            return loss

        def end_of_epoch(epoch: int) -> dict[str, Any]:
            row = {f"train_{k}": round(v / seen["n"], 4) for k, v in seen.items() if k != "n"}
            seen.clear()
            gen_model.eval()
            with torch.no_grad():
                row["teacher_top1"] = round(100.0 * (teacher.model(gen_model(probe_z, probe_y)).argmax(1)
                                                     == probe_y).float().mean().item(), 2)
            gen_model.train()
            return row

        fit_cfg = FitConfig(epochs=cfg.epochs, steps_per_epoch=cfg.steps_per_epoch, lr=cfg.lr, min_lr=cfg.lr / 100,
                            schedule="cosine", seed=cfg.seed, desc="generator epoch")
        log = fit(run, gen_model, opt, fit_cfg, batches, step, end_of_epoch=end_of_epoch, progress=progress)
    gen_model.eval()
    state = {k: v.detach().cpu().contiguous() for k, v in gen_model.state_dict().items()}
    atomic_save_tensors(run.out / WEIGHTS, state)
    meta = {"format": GENERATOR_FORMAT, "generator": gen_model.config(), "teacher": teacher.identity(),
            "train_config": cfg.to_dict(), "teacher_top1": log[-1]["teacher_top1"],
            "train_s": log[-1]["train_s"], "epochs": len(log)}
    atomic_write_json(run.out / META, meta)
    return {"out": str(run.out), "teacher_top1": log[-1]["teacher_top1"], "epochs": len(log),
            "wall_s": log[-1]["wall_s"]}


def load_generator(path: str | Path, teacher: ModelSpec, device: torch.device | str = "cpu"
                   ) -> tuple[ConditionalGenerator, dict[str, Any]]:
    """A trained generator (eval mode, frozen) from its run folder, refused if another teacher trained it."""
    folder = Path(path)
    if not (folder / META).is_file() or not (folder / WEIGHTS).is_file():
        raise SmiError(f"{folder} holds no trained generator ({META} and {WEIGHTS}; smi train-generator writes them)")
    meta = read_format_json(folder / META, GENERATOR_FORMAT, "generator")
    if meta.get("teacher", {}).get("fingerprint") != teacher.fingerprint:
        raise SmiError(f"generator {folder} was trained for another teacher ({meta.get('teacher', {}).get('spec')}), "
                       f"not {teacher.spec}")
    try:
        arch = dict(meta["generator"])
        kind = GENERATORS.get(str(arch.pop("kind", "gdfq")))
        bounds = arch.pop("pixel_range", None)
        extra = {} if bounds is None else {"pixel_range": ([float(v) for v in bounds[0]],
                                                           [float(v) for v in bounds[1]])}
        model = kind(int(arch.pop("num_classes")), tuple(int(v) for v in arch.pop("input_size")),
                     **{k: int(v) for k, v in arch.items()}, **extra)
        model.load_state_dict(load_file(str(folder / WEIGHTS)))
    except (KeyError, TypeError, ValueError, RuntimeError, SafetensorError, OSError, SmiError) as e:
        raise SmiError(f"{folder}: unreadable generator ({(str(e).splitlines() or [type(e).__name__])[0][:160]})"
                       ) from None
    model.eval().requires_grad_(False).to(device)
    return model, meta


def superposition(meta: dict[str, Any]) -> tuple[float, int]:
    """A trained generator's (superpose_prob, superpose_classes), as its metadata records them."""
    train = meta.get("train_config") or {}
    return float(train.get("superpose_prob") or 0.0), int(train.get("superpose_classes", 2))


class _Generated(ImageSet):
    """Endless images from a frozen generator: each draw is new noise and balanced classes, one forward pass.

    ``others``: more generators (with their superposition), an ensemble: each draw is split evenly among all,
    each share with its own noise and balanced classes. Paired generators (all of them, or none) split the
    pairs: the draw is every member's first halves, then their second halves in the same order, so image i and
    i + n/2 stay one member's pair."""

    def __init__(self, model: ConditionalGenerator, identity: dict[str, Any], seconds: float,
                 superpose: tuple[float, int] = (0.0, 2),
                 others: tuple[tuple[ConditionalGenerator, tuple[float, int]], ...] = ()) -> None:
        super().__init__(identity=identity, seconds=seconds)
        self.model, self.superpose, self.others = model, superpose, others

    @property
    def endless(self) -> bool:
        return True

    @property
    def fresh(self) -> bool:
        return True

    @property
    def paired(self) -> bool:
        """Draws are pairs (i, i + B/2) of one class in two styles (a Causal-DFQ generator)."""
        return self.model.paired

    def __len__(self) -> int:
        return 0

    @torch.no_grad()
    def _draw(self, n: int, generator: torch.Generator) -> torch.Tensor:
        if self.others:  # an ensemble: shares of n / len (of pairs, when paired), the first ones one larger
            members = ((self.model, self.superpose), *self.others)
            units = n // 2 if self.paired else n
            shares = [units // len(members) + (i < units % len(members)) for i in range(len(members))]
            if not self.paired:
                return torch.cat([self._one(m, k, sup, generator)
                                  for (m, sup), k in zip(members, shares, strict=True) if k])
            parts = [self._one(m, 2 * k, sup, generator) for (m, sup), k in zip(members, shares, strict=True) if k]
            odd = [self._one(self.model, 1, self.superpose, generator)] if n % 2 else []  # unpaired, as alone
            return torch.cat([p[:len(p) // 2] for p in parts] + [p[len(p) // 2:] for p in parts] + odd)
        return self._one(self.model, n, self.superpose, generator)

    @staticmethod
    def _one(model: ConditionalGenerator, n: int, superpose: tuple[float, int], generator: torch.Generator
             ) -> torch.Tensor:
        z = torch.randn(n, model.latent_dim, generator=generator)
        y = sample_targets(n, model.num_classes, generator, *superpose)
        if model.paired:
            z, y = model.training_batch(z, y)
        device = model.embed.weight.device
        return model(z.to(device), y.to(device)).cpu()

    def take(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self._draw(n, generator), None

    def batches(self, steps: int, batch_size: int, generator: torch.Generator):
        for _ in range(steps):
            yield self._draw(batch_size, generator), None


@SOURCES.register("generator")
@dataclass(frozen=True)
class GeneratorSource(DataSource):
    """A generator trained by `smi train-generator`: fresh images from new noise at every draw.

    ``others``: more generators of the same teacher, an ensemble (e.g. one kind trained from several seeds): each
    draw is split evenly among them; its synthesis time is the sum of their training times. Paired generators
    (causal: (content, style) pairs) join an ensemble only of paired ones, each drawing whole pairs."""

    path: str
    others: tuple[str, ...] = ()
    kind: ClassVar[str] = "generator"

    def open(self, model: ModelSpec, **context: Any) -> ImageSet:
        paths = (self.path, *self.others)
        if len({Path(p).resolve() for p in paths}) < len(paths):
            raise SmiError(f"an ensemble names one generator twice: {', '.join(paths)}", param="generator")
        loaded = [load_generator(p, model) for p in paths]
        if len({gen.paired for gen, _ in loaded}) > 1:
            raise SmiError("an ensemble mixes paired generators (causal: content-style pairs) with unpaired ones; "
                           "give paired ones together or alone", param="generator")
        weights = [sha256_file(Path(p) / WEIGHTS) for p in paths]
        identity = {"kind": "generator", "weights": weights if self.others else weights[0]}
        (gen, meta), *rest = loaded
        return _Generated(gen, identity, sum(float(m.get("train_s", 0.0)) for _, m in loaded), superposition(meta),
                          tuple((g, superposition(m)) for g, m in rest))

    def describe(self) -> str:
        return f"generator:{self.path}" + "".join(f"+{p}" for p in self.others)


GAMES = ("js", "adadfq")


def adadfq_margin(t_logits: torch.Tensor, s_logits: torch.Tensor, y: torch.Tensor, low: float = 0.1,
                  high: float = 0.8, disagree: float = 0.2, agree: float = 0.1) -> torch.Tensor:
    """AdaDFQ's generator term (CVPR 2023; AKT's generator): images neither too easy nor too hard for the student.

    The entropy of softmax(teacher logits - student logits) per image, rescaled to [0, 1] between the
    batch's smallest value and log(classes), is kept inside [``low``, ``high``] by two hinges (the
    margin between disagreement and agreement samples), plus ``disagree`` x CE(softmax(t - s), y) and
    ``agree`` x CE(softmax(t + s), y) (its one-hot terms). Settings: AdaDFQ's CIFAR-10 ones. ``y``: labels,
    or class weights (soft targets)."""
    diff = (t_logits - s_logits).log_softmax(1)
    h = -(diff.exp() * diff).sum(1)
    top = math.log(t_logits.shape[1])
    h = (h - h.min()) / (top - h.min()).clamp_min(1e-12)
    margin = F.relu(low - h).mean() + F.relu(h - high).mean()
    return margin + disagree * F.cross_entropy(t_logits - s_logits, y) + agree * F.cross_entropy(t_logits + s_logits, y)


class _OnlineGenerated(_Generated):
    """A generator that trains while the loop trains: ``steps`` generator steps before each epoch's batches."""

    def __init__(self, teacher: Teacher, source: OnlineGeneratorSource, folder: Path, seed: int,
                 device: torch.device | str, progress: bool, student: torch.nn.Module | None) -> None:
        cfg = source.config
        torch.manual_seed(cfg.seed)
        model = build_generator(teacher, cfg).to(device)
        super().__init__(model, source.identity(), 0.0, (float(cfg.superpose_prob or 0.0), cfg.superpose_classes))
        self.teacher, self.source, self.seed, self.device, self.progress = teacher, source, seed, device, progress
        self.student = student
        self.init_s = source.warm_start(model, teacher)  # a warm start's training seconds count as this one's
        self.opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(0.5, 0.999))
        self.folder = folder
        self.state = folder / STATE
        self.trained_epochs, self._seconds = 0, 0.0
        if self.state.exists():
            meta = load_checkpoint(self.state, model, self.opt)
            self.trained_epochs, self._seconds = int(meta["epoch"]), float(meta["seconds"])
        model.eval()  # draws use the running statistics; before_epoch trains in train mode

    def before_epoch(self, epoch: int, progress: bool = True) -> None:
        """Train the generator for this epoch (unless a resumed run already did), then draw from it."""
        from tqdm.auto import tqdm

        from smi.inversion.synthesis import _frozen

        if self.trained_epochs > epoch:
            if self.trained_epochs > epoch + 1:
                raise SmiError(f"{self.state} is {self.trained_epochs} epochs ahead of the run's checkpoint "
                               f"(epoch {epoch}); the folder was changed by hand: use --overwrite")
            return
        src, cfg, model = self.source, self.source.config, self.model
        g = torch.Generator().manual_seed(int(np.random.SeedSequence([self.seed, epoch, 3]).generate_state(1)[0]))
        t0 = time.perf_counter()
        model.train()
        with _frozen(self.student), _Objective(self.teacher, cfg) as objective:
            for _ in tqdm(range(src.steps), desc=f"epoch {epoch + 1}: generator", leave=False,
                          disable=not (self.progress and progress)):
                z = torch.randn(cfg.batch_size, model.latent_dim, generator=g).to(self.device)
                y = sample_targets(cfg.batch_size, model.num_classes, g, cfg.superpose_prob or 0.0,
                                   cfg.superpose_classes).to(self.device)
                z, y = model.training_batch(z, y)
                x = model(z, y)
                loss, _, t_logits = objective(x, y, z)
                if src.adversarial and self.student is not None:
                    s_logits = self.student(x)
                    game = -divergence(t_logits, s_logits) if src.game == "js" else adadfq_margin(t_logits, s_logits, y)
                    loss = loss + src.adversarial * game
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
                self.opt.step()
        model.eval()
        self._seconds += time.perf_counter() - t0
        self.trained_epochs = epoch + 1
        self.folder.mkdir(parents=True, exist_ok=True)
        save_checkpoint(self.state, model, self.opt, {"epoch": self.trained_epochs, "seconds": self._seconds})

    @property
    def seconds(self) -> float:
        return self.init_s + self._seconds


@SOURCES.register("online-generator")
@dataclass(frozen=True)
class OnlineGeneratorSource(DataSource):
    """A generator trained while the loop trains (GDFQ's joint loop): before every epoch ``steps`` generator
    steps against the teacher and, with ``adversarial`` > 0, a term that reads the current student: ``game``
    ``"js"``, minus the teacher-student JS divergence (images it still gets wrong, as DFAD and Adaptive
    DeepInversion), or ``"adadfq"``, :func:`adadfq_margin` (AdaDFQ's, the generator of AKT); the epoch then
    trains on fresh draws. ``config``'s epochs and steps_per_epoch do not apply (the loop's epochs do), and its learning
    rate stays constant. ``init``: a generator trained by :func:`train_generator` (same kind and architecture) to
    start from instead of fresh weights, its training time counted as this one's (a warm-started game)."""

    config: GeneratorConfig
    steps: int = 50
    adversarial: float = 0.0
    game: str = "js"  # the student term: "js" (minus JS, DFAD) or "adadfq" (AdaDFQ's margin; AKT's generator)
    init: str | None = None
    kind: ClassVar[str] = "online-generator"
    grows: ClassVar[bool] = True  # made while the loop trains: open_run opens it with the run's folder
    folder: ClassVar[str] = "generator"

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise SmiError(f"must be >= 1, got {self.steps}", param="generator_steps")
        if self.adversarial < 0:
            raise SmiError(f"must be >= 0, got {self.adversarial}", param="generator_adversarial")
        if self.game not in GAMES:
            raise SmiError(f"must be one of {', '.join(GAMES)}, got {self.game!r}", param="generator_game")

    @property
    def paired(self) -> bool:
        return GENERATORS.get(self.config.kind).paired

    def warm_start(self, model: ConditionalGenerator, teacher: ModelSpec) -> float:
        """Load ``init``'s weights into ``model`` (if given) and return the seconds its training took."""
        if self.init is None:
            return 0.0
        trained, meta = load_generator(self.init, teacher)
        try:
            model.load_state_dict(trained.state_dict())
        except RuntimeError:
            raise SmiError(f"{self.init} holds a generator of another architecture than a {self.config.kind} "
                           "generator of these settings (kind, pixel range, sizes)", param="generator_init") from None
        return float(meta.get("train_s", 0.0))

    def check(self, model: Teacher, **context: Any) -> None:  # type: ignore[override]
        self.warm_start(build_generator(model, self.config), model)  # refused before a run folder is claimed

    def identity(self) -> dict[str, Any]:
        """What the run records before any image exists (a resumed run must have the same)."""
        init = Path(self.init or "") / WEIGHTS
        return {"kind": self.kind, "generator": self.config.to_dict(), "steps": self.steps,
                "adversarial": self.adversarial, "game": self.game,
                **({"init": sha256_file(init) if init.is_file() else self.init} if self.init is not None else {})}

    def open(self, model: Teacher, *, folder: str | Path, seed: int = 0,  # type: ignore[override]
             device: torch.device | str = "cpu", progress: bool = True, student: torch.nn.Module | None = None,
             **context: Any) -> ImageSet:
        require_classifier(model, "a generator")
        return _OnlineGenerated(model, self, Path(folder), seed, device, progress, student)

    def describe(self) -> str:
        return f"online {self.config.kind} generator" + (f" from {self.init}" if self.init is not None else "")
