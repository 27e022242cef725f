"""Labelled real datasets as registered types, named ``NAME`` or ``NAME:PATH`` on the command line.

Every command that reads real images names one (``train-teacher --data``, ``quantize --calib``,
``distill --real`` and ``--eval-data``, ``eval --data``, the demo). A checkpoint records the dataset
it was trained on, and that is the default wherever a command needs real images.

A dataset has a ``train`` and a ``test`` split of uint8 images at their stored size and channels.
:func:`fit_images` turns them into what a model reads, with the transform its checkpoint records:
grey and colour converted to the model's channels, the shorter side resized to ``H / crop_pct``
and the centre ``H x W`` cropped (timm's evaluation transform; a no-op when the sizes already
match and ``crop_pct`` is 1), then normalized by the model's mean and std.

>>> ds = open_dataset("imagefolder:my_images")   # train/ and val/ sub-folders, or one seeded split
>>> ds.channels, ds.size, ds.class_names[:2]
(1, (32, 32), ['cat', 'dog'])
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol

import torch
from torch.utils.data import Dataset, Subset

from smi.data.fashion_mnist import FMNIST_CLASSES, FMNIST_MEAN, FMNIST_STD, load_fashion_mnist, normalize_uint8
from smi.data.scenes import SEGMENT_CLASSES
from smi.errors import SmiError
from smi.registry import Registry

__all__ = ["DATASETS", "ImageDataset", "ModelSpec", "data_help", "eval_dataset", "fit_images", "fit_masks",
           "load_split", "model_dataset", "model_input", "open_dataset"]

Split = Literal["train", "test"]
GREY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "F", "La"})


class ModelSpec(Protocol):
    """What data needs to know about the model it feeds (a :class:`smi.models.Teacher` has it)."""

    spec: str
    fingerprint: str
    input_size: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_pct: float
    interpolation: str
    dataset: str | None


def fit_images(x: torch.Tensor, input_size: tuple[int, int, int], crop_pct: float = 1.0,
               interpolation: str = "bilinear") -> torch.Tensor:
    """uint8 images ``(C, H, W)`` or ``(N, C, H, W)`` -> the model's channels and ``H x W`` (uint8)."""
    import torchvision.transforms.v2.functional as TF

    C, H, W = input_size
    if x.shape[-3] != C:
        if x.shape[-3] == 1:
            x = x.expand(*x.shape[:-3], C, *x.shape[-2:])
        elif x.shape[-3] == 3 and C == 1:
            x = TF.rgb_to_grayscale(x)
        else:
            raise SmiError(f"cannot turn {x.shape[-3]}-channel images into the model's {C} channels", param="data")
    h, w = x.shape[-2:]
    if (h, w) != (H, W) or crop_pct != 1.0:
        if H == W:  # timm: shorter side to H / crop_pct, keeping the aspect ratio, then the centre crop
            scale: list[int] = [int(H / crop_pct)]
        else:
            scale = [int(H / crop_pct), int(W / crop_pct)]
        x = TF.center_crop(TF.resize(x, scale, interpolation=TF.InterpolationMode(interpolation), antialias=True),
                           [H, W])
    return x.contiguous()


class ImageDataset:
    """A labelled dataset: what a model trained on it reads, and its two splits.

    Subclasses are registered in :data:`DATASETS` and built from the text after ``NAME:``.
    ``images(split)`` returns a torch dataset of ``(uint8 (C, H, W) at the stored size, label)``;
    ``tensors(split)`` the whole split at once when it is held in memory (else None).
    """

    name: ClassVar[str] = ""
    needs_path: ClassVar[bool] = True
    path_help: ClassVar[str] = "PATH"  # what the text after ``NAME:`` is, in --help
    in_memory: ClassVar[bool] = True  # tensors(split) holds the whole split; False: files read one by one
    channels: int
    size: tuple[int, int]
    class_names: list[str]
    mask_classes: ClassVar[list[str] | None] = None  # names of the per-pixel labels masks() gives; None: no masks

    def __init__(self, path: str) -> None:
        self.path = path

    @property
    def spec(self) -> str:
        """How a checkpoint records this dataset (an absolute path, so it holds from any folder)."""
        return f"{self.name}:{Path(self.path).resolve()}" if self.needs_path else self.name

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
        """Known per-channel mean and std, or None (a teacher trained on it measures them)."""
        return None

    def tensors(self, split: Split) -> tuple[torch.Tensor, torch.Tensor] | None:
        return None

    def images(self, split: Split) -> Dataset:
        x, y = self.tensors(split)  # type: ignore[misc]
        return torch.utils.data.TensorDataset(x, y)

    def masks(self, split: Split) -> torch.Tensor:
        """Per-pixel labels ``(N, H, W)`` (indices into ``mask_classes``) of the split's images, for segmenters."""
        raise SmiError(f"{self.name} has no per-pixel labels, so it cannot train or evaluate a segmenter "
                       f"(fmnist-scenes has them)", param="data")


DATASETS: Registry[type[ImageDataset]] = Registry("dataset")


@DATASETS.register("fashion-mnist")
class FashionMNIST(ImageDataset):
    """Fashion-MNIST: 60,000 training and 10,000 test images, 1x28x28, 10 classes (no download: Debian's package)."""

    name = "fashion-mnist"
    needs_path = False
    channels, size, class_names = 1, (28, 28), list(FMNIST_CLASSES)

    def normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        return FMNIST_MEAN, FMNIST_STD

    def tensors(self, split: Split) -> tuple[torch.Tensor, torch.Tensor]:
        return load_fashion_mnist(split)


def parse_classes(spec: str, num_classes: int) -> list[int]:
    """``"5-9"`` or ``"0,2,4"`` (or both, comma-separated) -> sorted distinct class indices below ``num_classes``."""
    out: set[int] = set()
    try:
        for part in spec.split(","):
            lo, dash, hi = part.partition("-")
            first, last = int(lo), int(hi) if dash else int(lo)
            if first > last:
                raise ValueError
            out.update(range(first, last + 1))
    except ValueError:
        raise SmiError(f"expected classes like 5-9 or 0,2,4, got {spec!r}", param="data") from None
    if not out or min(out) < 0 or max(out) >= num_classes:
        raise SmiError(f"classes {spec!r} are not within 0..{num_classes - 1}", param="data")
    if len(out) < 2:
        raise SmiError(f"classes {spec!r}: a classifier needs at least two classes", param="data")
    return sorted(out)


@DATASETS.register("fashion-mnist-classes")
class FashionMNISTClasses(FashionMNIST):
    """Fashion-MNIST restricted to some classes, relabelled 0..k-1 in order: ``fashion-mnist-classes:5-9``.

    Both splits keep only the named classes' images. The other data of the transfer protocol when it is
    to share the domain but not the task (``benchmarks/distill.py --backbone-data``): a backbone trained on
    classes 5-9 has never been told what classes 0-4 are."""

    name = "fashion-mnist-classes"
    needs_path, path_help = True, "CLASSES"

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.classes = parse_classes(path, len(FMNIST_CLASSES))
        self.class_names = [FMNIST_CLASSES[c] for c in self.classes]

    @property
    def spec(self) -> str:
        return f"{self.name}:{','.join(map(str, self.classes))}"

    def tensors(self, split: Split) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = super().tensors(split)
        keep = torch.isin(y, torch.tensor(self.classes))
        relabel = torch.full((len(FMNIST_CLASSES),), -1, dtype=torch.long)
        relabel[self.classes] = torch.arange(len(self.classes))
        return x[keep].contiguous(), relabel[y[keep]]


@DATASETS.register("digits")
class Digits(ImageDataset):
    """scikit-learn's handwritten digits: 1,797 images, 1x8x8, 10 classes; a seeded 80/20 split per class.

    Real images that ship inside a registry package (no download), and nothing like Fashion-MNIST: the
    other data a student backbone is trained on in the transfer protocol (``benchmarks/distill.py``).
    Pixel values 0..16 are scaled to 0..255; a model of another size reads them resized (bilinear)."""

    name = "digits"
    needs_path = False
    channels, size, class_names = 1, (8, 8), [str(d) for d in range(10)]
    HELD_OUT, SEED = 0.2, 0

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self._splits: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None

    def tensors(self, split: Split) -> tuple[torch.Tensor, torch.Tensor]:
        if self._splits is None:
            try:
                from sklearn.datasets import load_digits
            except ImportError:
                raise SmiError("the digits dataset comes with scikit-learn: pip install scikit-learn",
                               param="data") from None
            d = load_digits()
            x = torch.from_numpy(d.images).mul(255 / 16).round().clamp(0, 255).to(torch.uint8)[:, None]
            y = torch.from_numpy(d.target).long()
            gen = torch.Generator().manual_seed(self.SEED)
            test = torch.zeros(len(y), dtype=torch.bool)
            for c in range(10):  # the same share of every class held out
                idx = (y == c).nonzero().flatten()
                test[idx[torch.randperm(len(idx), generator=gen)[:round(self.HELD_OUT * len(idx))]]] = True
            self._splits = {"train": (x[~test].contiguous(), y[~test]), "test": (x[test].contiguous(), y[test])}
        return self._splits[split]


@DATASETS.register("fmnist-scenes")
class FashionMNISTScenes(ImageDataset):
    """Fashion-MNIST scenes: each item at a random place and size on a 1x56x56 cluttered background, with its mask.

    Train scenes are made from train items only, test scenes from test items (see :mod:`smi.data.scenes`);
    deterministic, made in memory on first use (about 40 s for the training split on 2 cores). Labels are
    the items'; ``masks(split)`` gives the object's pixels, for segmentation."""

    name = "fmnist-scenes"
    needs_path = False
    channels, class_names = 1, list(FMNIST_CLASSES)
    mask_classes = list(SEGMENT_CLASSES)
    SEED = 0

    def __init__(self, path: str) -> None:
        from smi.data.scenes import SIDE

        super().__init__(path)
        self.size = (SIDE, SIDE)
        self._made: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def _make(self, split: Split) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if split not in self._made:
            from smi.data.scenes import make_scenes

            items, labels = load_fashion_mnist(split)
            self._made[split] = (*make_scenes(items, split, self.SEED), labels)
        return self._made[split]

    def tensors(self, split: Split) -> tuple[torch.Tensor, torch.Tensor]:
        scenes, _, labels = self._make(split)
        return scenes, labels

    def normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        from smi.data.scenes import SCENES_MEAN, SCENES_STD

        return SCENES_MEAN, SCENES_STD

    def masks(self, split: Split) -> torch.Tensor:
        """(N, 56, 56) uint8: 1 on the object's pixels in each scene of ``split``, 0 on the background."""
        return self._make(split)[1].to(torch.uint8)


def _folder(path: str, name: str) -> Path:
    if not path:
        raise SmiError(f"{name} needs a path: {name}:PATH", param="data")
    root = Path(path)
    if not root.is_dir():
        raise SmiError(f"{name}:{path}: folder {root} does not exist" if not root.exists()
                       else f"{name}:{path}: {root} is not a folder", param="data")
    return root


class _Cifar(ImageDataset):
    channels, size = 3, (32, 32)

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.root = _folder(path, self.name)
        self._splits: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.class_names = list(self._keep("test", self._load("test")).classes)

    def _keep(self, split: Split, ds: Any) -> Any:
        self._splits[split] = (torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(),
                               torch.tensor(ds.targets, dtype=torch.long))
        return ds

    def _load(self, split: Split) -> Any:
        import torchvision.datasets as tvd

        cls = tvd.CIFAR10 if self.name == "cifar10" else tvd.CIFAR100
        try:
            return cls(str(self.root), train=split == "train", download=False)
        except RuntimeError as e:  # "Dataset not found or corrupted"
            raise SmiError(f"{self.name}:{self.path}: {e} (smi never downloads; put torchvision's "
                           f"{self.name} folder there)", param="data") from None

    def tensors(self, split: Split) -> tuple[torch.Tensor, torch.Tensor]:
        if split not in self._splits:
            self._keep(split, self._load(split))
        return self._splits[split]


@DATASETS.register("cifar10")
class Cifar10(_Cifar):
    """cifar10:PATH, torchvision's CIFAR-10 folder (3x32x32, 50,000 train / 10,000 test)."""

    name = "cifar10"


@DATASETS.register("cifar100")
class Cifar100(_Cifar):
    """cifar100:PATH, torchvision's CIFAR-100 folder (3x32x32, 50,000 train / 10,000 test)."""

    name = "cifar100"


class _Files(Dataset):
    """(path, label) pairs read as uint8 tensors in one mode (``L`` or ``RGB``); an unreadable file is named."""

    def __init__(self, samples: list[tuple[str, int]], mode: str) -> None:
        self.samples, self.mode = samples, mode

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from PIL import Image, UnidentifiedImageError
        from torchvision.transforms.v2.functional import pil_to_tensor

        path, label = self.samples[i]
        try:
            with Image.open(path) as img:
                return pil_to_tensor(img.convert(self.mode)), label
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise SmiError(f"unreadable image {path}: {(str(e).splitlines() or [type(e).__name__])[0]}",
                           param="data") from None


@DATASETS.register("imagefolder")
class ImageFolder(ImageDataset):
    """imagefolder:PATH, one sub-folder per class; PATH/train + PATH/val (or test), else a seeded 80/20 split.

    Channels are 1 when every image is grey, else 3; the size is the most common one among the
    images (others are resized and centre-cropped to it).
    """

    name = "imagefolder"
    in_memory = False
    SPLIT_NAMES = ("val", "test", "validation")
    HELD_OUT = 0.2  # of each class, when the folder has no split sub-folders
    SEED = 0

    def __init__(self, path: str) -> None:
        from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

        super().__init__(path)
        root = _folder(path, self.name)
        test_dir = next((root / s for s in self.SPLIT_NAMES if (root / s).is_dir()), None)
        split_dirs = (root / "train", test_dir) if (root / "train").is_dir() and test_dir else None

        def scan(folder: Path, class_to_idx: dict[str, int]) -> list[tuple[str, int]]:
            try:
                return make_dataset(str(folder), class_to_idx, IMG_EXTENSIONS, allow_empty=True)
            except (FileNotFoundError, OSError) as e:
                raise SmiError(f"{self.name}:{path}: {e}", param="data") from None

        try:
            self.class_names, class_to_idx = find_classes(str(split_dirs[0] if split_dirs else root))
        except FileNotFoundError:
            raise SmiError(f"{self.name}:{path}: no class sub-folders in {root} (expected one folder per "
                           "class, holding its images)", param="data") from None
        if split_dirs:
            self.samples = {"train": scan(split_dirs[0], class_to_idx), "test": scan(split_dirs[1], class_to_idx)}
            extra = set(find_classes(str(split_dirs[1]))[0]) - set(class_to_idx)
            if extra:
                raise SmiError(f"{self.name}:{path}: {split_dirs[1].name}/ has classes that train/ lacks: "
                               f"{sorted(extra)[:5]}", param="data")
        else:
            self.samples = self._seeded_split(scan(root, class_to_idx))
        everything = self.samples["train"] + self.samples["test"]
        if not self.samples["train"] or not self.samples["test"]:
            raise SmiError(f"{self.name}:{path}: found {len(self.samples['train'])} training and "
                           f"{len(self.samples['test'])} test images (extensions: {' '.join(IMG_EXTENSIONS)})",
                           param="data")
        self.channels, self.size = self._measure(everything)

    def _seeded_split(self, samples: list[tuple[str, int]]) -> dict[str, list[tuple[str, int]]]:
        gen = torch.Generator().manual_seed(self.SEED)
        train, test = [], []
        for c in range(len(self.class_names)):
            mine = sorted(s for s in samples if s[1] == c)
            order = torch.randperm(len(mine), generator=gen).tolist()
            n_test = round(self.HELD_OUT * len(mine)) if len(mine) > 1 else 0
            test += [mine[i] for i in order[:n_test]]
            train += [mine[i] for i in order[n_test:]]
        return {"train": train, "test": test}

    @staticmethod
    def _measure(samples: list[tuple[str, int]], probe: int = 64) -> tuple[int, tuple[int, int]]:
        from PIL import Image, UnidentifiedImageError

        step = max(1, len(samples) // probe)
        modes, sizes = set(), Counter()
        for path, _ in samples[::step][:probe]:
            try:
                with Image.open(path) as img:
                    modes.add(img.mode)
                    sizes[(img.height, img.width)] += 1
            except (UnidentifiedImageError, OSError) as e:
                raise SmiError(f"unreadable image {path}: {(str(e).splitlines() or [type(e).__name__])[0]}",
                               param="data") from None
        return (1 if modes <= GREY_MODES else 3), sizes.most_common(1)[0][0]

    def images(self, split: Split) -> Dataset:
        return _Files(self.samples[split], "L" if self.channels == 1 else "RGB")


def data_help() -> str:
    return " | ".join(f"{n}:{cls.path_help}" if cls.needs_path else n for n, cls in DATASETS.items())


def open_dataset(spec: str) -> ImageDataset:
    """The dataset ``spec`` names (``NAME`` or ``NAME:PATH``)."""
    kind, _, path = spec.partition(":")
    if kind not in DATASETS:
        raise SmiError(f"{spec!r} is not a known dataset; use {data_help()}", param="data")
    cls = DATASETS.get(kind)
    if path and not cls.needs_path:
        raise SmiError(f"{kind} takes no path, got {spec!r}", param="data")
    return cls(path)


def model_dataset(model: ModelSpec, given: str | None = None) -> str:
    """``given``, else the dataset the model's checkpoint records; a clear error when there is neither."""
    if given:
        return given
    if model.dataset:
        return model.dataset
    raise SmiError(f"{model.spec} does not record the dataset it was trained on, so name the real data: "
                   f"{data_help()}")


def model_input(x: torch.Tensor, model: ModelSpec) -> torch.Tensor:
    """uint8 images ``(N, C, H, W)`` at any size -> what ``model`` reads: fitted and normalized floats."""
    return normalize_uint8(fit_images(x, model.input_size, model.crop_pct, model.interpolation), model.mean, model.std)


class _Fitted(Dataset):
    """A split as the model reads it: fitted to its input and normalized."""

    def __init__(self, images: Dataset, model: ModelSpec) -> None:
        self.ds, self.model = images, model

    def __len__(self) -> int:
        return len(self.ds)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, Any]:
        x, y = self.ds[i]
        return model_input(x[None], self.model)[0], y


def load_split(dataset: ImageDataset, split: Split, model: ModelSpec | None = None,
               progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """A whole split in memory as uint8 ``(N, C, H, W)`` and labels, fitted to ``model`` (or as stored)."""
    from tqdm.auto import tqdm

    size = (dataset.channels, *dataset.size)
    fit = ((model.input_size, model.crop_pct, model.interpolation) if model is not None else (size, 1.0, "bilinear"))
    held = dataset.tensors(split)
    if held is not None:
        x, y = held
        return fit_images(x, *fit), y
    images = dataset.images(split)
    xs, ys = [], []
    for i in tqdm(range(len(images)), desc=f"reading {split} images", unit="img", disable=not progress,  # type: ignore[arg-type]
                  leave=False):
        x, y = images[i]
        xs.append(fit_images(x, *fit))
        ys.append(y)
    return torch.stack(xs), torch.tensor(ys, dtype=torch.long)


def fit_masks(masks: torch.Tensor, model: ModelSpec) -> torch.Tensor:
    """Per-pixel labels ``(N, H, W)`` -> the model's input grid (nearest neighbour, the images' crop), as long."""
    size = (1, *model.input_size[1:])
    return fit_images(masks[:, None].to(torch.uint8), size, model.crop_pct, "nearest")[:, 0].long()


class _Segmentation(Dataset):
    """A split as a segmenter reads it: fitted, normalized images and their per-pixel labels."""

    def __init__(self, images: Dataset, masks: torch.Tensor, model: ModelSpec) -> None:
        self.images, self.masks = _Fitted(images, model), fit_masks(masks, model)

    def __len__(self) -> int:
        return len(self.masks)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[i][0], self.masks[i]


def eval_dataset(spec: str, model: ModelSpec, limit: int | None = None) -> Dataset:
    """The test split of ``spec`` as ``model`` reads it (its channels, size, crop and normalization).

    For a segmenter (``model.task == "segmentation"``) the targets are the per-pixel labels."""
    if limit is not None and limit < 1:
        raise SmiError(f"must be positive, got {limit}", param="limit")
    dataset = open_dataset(spec)
    if getattr(model, "task", "classification") == "segmentation":
        ds: Dataset = _Segmentation(dataset.images("test"), dataset.masks("test"), model)
    else:
        ds = _Fitted(dataset.images("test"), model)
    return Subset(ds, range(min(limit, len(ds)))) if limit is not None else ds  # type: ignore[arg-type]
