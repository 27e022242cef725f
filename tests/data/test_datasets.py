"""Labelled datasets: the registry, image folders (splits, channels, sizes, bad files) and the fit to a model."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from smi.data.datasets import DATASETS, eval_dataset, fit_images, load_split, open_dataset
from smi.data.fashion_mnist import FMNIST_MEAN, FMNIST_STD, load_fashion_mnist, normalize_uint8
from smi.data.sources import RealSource, parse_source
from smi.errors import SmiError
from smi.models.loading import load_teacher
from tests.helpers import write_image_folder


def _reads(input_size, crop_pct=1.0, mean=None, std=None, dataset=None):
    C = input_size[0]
    return SimpleNamespace(spec="m", fingerprint="", input_size=input_size, crop_pct=crop_pct,
                           interpolation="bilinear", mean=mean or (0.5,) * C, std=std or (0.25,) * C, dataset=dataset)


def test_every_registered_dataset_says_what_it_is():
    assert {"fashion-mnist", "imagefolder", "cifar10", "cifar100"} <= set(DATASETS.names())
    for name in DATASETS.names():
        assert DATASETS.help(name)


def test_fashion_mnist_reads_exactly_as_the_normalized_idx_files():
    teacher = load_teacher("fmnist_vit_tiny")
    assert teacher.dataset == "fashion-mnist"
    x, y = load_fashion_mnist("test")
    ds = eval_dataset("fashion-mnist", teacher, limit=300)
    got = torch.stack([ds[i][0] for i in range(300)])
    assert torch.equal(got, normalize_uint8(x[:300], FMNIST_MEAN, FMNIST_STD))
    assert [int(ds[i][1]) for i in range(300)] == y[:300].tolist()


def test_a_plain_image_folder_is_split_per_class_by_a_seed(tmp_path):
    write_image_folder(tmp_path / "d", classes=3, per_class=5, mode="L")
    ds = open_dataset(f"imagefolder:{tmp_path / 'd'}")
    train, test = ds.samples["train"], ds.samples["test"]
    assert len(test) == 3 and len(train) == 12 and not set(train) & set(test)  # one of five per class held out
    assert sorted(label for _, label in test) == [0, 1, 2]
    assert ds.channels == 1 and ds.size == (20, 24) and ds.class_names == ["class_0", "class_1", "class_2"]
    assert open_dataset(f"imagefolder:{tmp_path / 'd'}").samples == ds.samples  # deterministic
    assert ds.spec == f"imagefolder:{(tmp_path / 'd').resolve()}"


def test_train_and_val_sub_folders_are_the_splits(tmp_path):
    write_image_folder(tmp_path / "d", classes=2, per_class=4, split=True)
    ds = open_dataset(f"imagefolder:{tmp_path / 'd'}")
    assert len(ds.samples["train"]) == 8 and len(ds.samples["test"]) == 2
    assert all("/val/" in p for p, _ in ds.samples["test"]) and ds.channels == 3
    x, y = load_split(ds, "train")
    assert x.dtype == torch.uint8 and x.shape == (8, 3, 20, 24) and y.tolist() == [0] * 4 + [1] * 4


def test_grey_and_colour_convert_to_the_models_channels():
    rgb = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    grey = fit_images(rgb, (1, 8, 8))
    luma = (0.299 * rgb[:, 0] + 0.587 * rgb[:, 1] + 0.114 * rgb[:, 2]).round()
    assert grey.shape == (2, 1, 8, 8) and (grey[:, 0].float() - luma).abs().max() <= 1
    back = fit_images(grey, (3, 8, 8))
    assert back.shape == (2, 3, 8, 8) and all(torch.equal(back[:, c], grey[:, 0]) for c in range(3))
    assert torch.equal(fit_images(rgb, (3, 8, 8)), rgb)  # nothing to do: the same pixels


def test_resize_and_centre_crop_match_timms_eval_transform(tmp_path):
    import timm.data

    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    ref = timm.data.create_transform(input_size=(3, 32, 32), crop_pct=0.875, interpolation="bilinear",
                                     mean=mean, std=std, is_training=False)(img)
    from torchvision.transforms.v2.functional import pil_to_tensor

    ours = fit_images(pil_to_tensor(img), (3, 32, 32), crop_pct=0.875)
    ours = (ours.float() / 255 - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    assert ours.shape == ref.shape == (3, 32, 32)
    # PIL's and torch's antialiased bilinear resize differ by rounding only
    assert (ours - ref).abs().mul(torch.tensor(std).view(3, 1, 1)).max() <= 3 / 255


def test_a_grey_model_evaluates_an_rgb_folder(tmp_path):
    write_image_folder(tmp_path / "d", classes=10, per_class=2, size=(28, 28), mode="RGB", split=True)
    teacher = load_teacher("fmnist_vit_tiny")
    ds = eval_dataset(f"imagefolder:{tmp_path / 'd'}", teacher)
    assert len(ds) == 10 and ds[0][0].shape == (1, 28, 28)


def test_an_unreadable_image_is_named(tmp_path):
    write_image_folder(tmp_path / "d", classes=2, per_class=3, split=True)
    bad = tmp_path / "d" / "val" / "class_1" / "0.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(SmiError, match="unreadable image .*class_1/0.png"):
        eval_dataset(f"imagefolder:{tmp_path / 'd'}", _reads((3, 20, 24)))[1]


@pytest.mark.parametrize("spec,needle", [
    ("imagefolder", "needs a path"), ("imagefolder:/nope", "does not exist"), ("fashion-mnist:/x", "takes no path"),
    ("mnist", "not a known dataset"), ("cifar10:{d}", "smi never downloads"), ("imagefolder:{d}", "no class"),
    ("fashion-mnist-classes", "expected classes"), ("fashion-mnist-classes:9-5", "expected classes"),
    ("fashion-mnist-classes:4", "at least two"), ("fashion-mnist-classes:8-10", "within 0..9"),
])
def test_bad_dataset_specs_are_one_line(tmp_path, spec, needle):
    with pytest.raises(SmiError, match=needle):
        open_dataset(spec.format(d=tmp_path))


def test_datasets_are_calibration_sources(tmp_path):
    write_image_folder(tmp_path / "d", classes=2, per_class=5)
    assert parse_source("fashion-mnist") == RealSource("fashion-mnist")
    assert parse_source(f"imagefolder:{tmp_path}") == RealSource(f"imagefolder:{tmp_path}")
    assert parse_source("real") == RealSource()
    images = RealSource(f"imagefolder:{tmp_path / 'd'}").open(_reads((1, 16, 16)))
    x, masks = images.take(3, torch.Generator().manual_seed(0))
    assert len(images) == 8 and x.shape == (3, 1, 16, 16) and masks is None
    with pytest.raises(SmiError, match="does not record the dataset"):
        RealSource().open(_reads((1, 16, 16)))
    assert RealSource().open(_reads((1, 28, 28), dataset="fashion-mnist")).identity["images"] == 60000


def test_fashion_mnist_classes_keeps_the_named_classes_relabelled_in_order():
    ds = open_dataset("fashion-mnist-classes:7,2-3")
    assert ds.class_names == ["Pullover", "Dress", "Sneaker"] and ds.spec == "fashion-mnist-classes:2,3,7"
    assert open_dataset(ds.spec).class_names == ds.class_names  # what a checkpoint records reopens
    x, y = load_fashion_mnist("test")
    xs, ys = ds.tensors("test")
    keep = (y == 2) | (y == 3) | (y == 7)
    assert torch.equal(xs, x[keep]) and ys.tolist() == [[2, 3, 7].index(v) for v in y[keep].tolist()]
    assert len(ds.tensors("train")[1]) == 18000 and ds.normalization() == (FMNIST_MEAN, FMNIST_STD)


def test_digits_are_sklearns_images_split_per_class_by_a_seed():
    from sklearn.datasets import load_digits

    ds = open_dataset("digits")
    (xtr, ytr), (xte, yte) = ds.tensors("train"), ds.tensors("test")
    assert xtr.shape == (1438, 1, 8, 8) and xte.shape == (359, 1, 8, 8) and xtr.dtype == torch.uint8
    assert (yte.bincount(minlength=10) >= 35).all()  # a fifth of every class held out
    ref = load_digits()  # every image exactly once, as 0..16 scaled to 0..255, with its label
    x, y = torch.cat([xtr, xte]), torch.cat([ytr, yte])
    flat = {(tuple(a.flatten().tolist()), int(b)) for a, b in zip(x, y, strict=True)}
    want = {(tuple(np.round(im * 255 / 16).astype(int).flatten().tolist()), int(t))
            for im, t in zip(ref.images, ref.target, strict=True)}
    assert flat == want
    assert torch.equal(open_dataset("digits").tensors("test")[0], xte)  # deterministic
    assert fit_images(xte[:2], (1, 28, 28)).shape == (2, 1, 28, 28)
