import pytest
import torch
import torch.nn.functional as F

from smi.data.datasets import open_dataset
from smi.data.fashion_mnist import load_fashion_mnist
from smi.data.scenes import CHUNK, SCALE, SCENES_MEAN, SCENES_STD, SIDE, make_scenes


def _items(n: int, value: int = 0) -> torch.Tensor:
    return torch.full((n, 1, 28, 28), value, dtype=torch.uint8)


def test_scenes_are_deterministic_and_do_not_depend_on_how_many_are_made():
    items = load_fashion_mnist("test")[0][: CHUNK + 50]
    a, ma = make_scenes(items, "test", limit=CHUNK + 50)
    b, mb = make_scenes(items, "test", limit=7)
    assert torch.equal(a[:7], b) and torch.equal(ma[:7], mb)
    assert a.shape == (CHUNK + 50, 1, SIDE, SIDE) and a.dtype == torch.uint8 and ma.dtype == torch.bool
    c, _ = make_scenes(items, "test", seed=1, limit=7)
    d, _ = make_scenes(items, "train", limit=7)
    assert not torch.equal(b, c) and not torch.equal(b, d)  # the seed and the split change the draw


def test_nothing_but_the_given_items_reaches_a_scene():
    """Black items: no object, no fragment, so the scenes are the gradient and texture alone (no mask pixel,
    a dark, smooth background); the same scenes with other items elsewhere in the dataset do not change."""
    scenes, masks = make_scenes(_items(64), "train")
    assert not masks.any()
    assert scenes.float().mean() < 0.25 * 255
    items = load_fashion_mnist("train")[0][:64]
    with_items, _ = make_scenes(items, "train")
    assert not torch.equal(with_items, scenes)
    # train scenes are a function of train items only: the dataset's train split is make_scenes(train items)
    ds = open_dataset("fmnist-scenes")
    ds._made["train"] = (*make_scenes(items, "train"), torch.zeros(64, dtype=torch.long))  # as _make would
    assert torch.equal(ds.tensors("train")[0], with_items)


def test_mask_is_the_item_where_it_is_drawn():
    """A white square item: its mask is one square of the scale's range, fully on the canvas, where the scene is
    white; a white 28x28 item shows how big the object box is."""
    scenes, masks = make_scenes(_items(200, 255), "test")
    for scene, mask in zip(scenes[:20], masks[:20], strict=True):
        rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
        h, w = int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)
        assert abs(h - w) <= 1 and SCALE[0] - 1 <= h <= SCALE[1] + 1
        assert mask.sum() >= h * w - 4 and mask.sum() <= h * w  # a solid square (resampled corners may fall out)
        outside = F.pad((~mask)[None, None].float(), (2, 2, 2, 2), value=1.0)  # off the canvas counts as outside
        inner = F.max_pool2d(outside, 5, stride=1)[0, 0] == 0  # 2 px in
        assert (scene[0][inner] >= 250).all()  # the item; its edge pixels are partly covered
    share = masks.flatten(1).float().mean(1)
    assert 0.12 < share.mean() < 0.40  # the box covers about a quarter of the canvas


def test_real_scenes_keep_labels_and_objects_stay_on_the_canvas():
    items, labels = load_fashion_mnist("test")
    ds = open_dataset("fmnist-scenes")
    scenes, y = ds.tensors("test")
    masks = ds.masks("test").bool()
    assert torch.equal(y, labels) and scenes.shape == (10_000, 1, 56, 56) and ds.size == (56, 56)
    assert masks.flatten(1).any(1).float().mean() > 0.99  # every scene has its object
    # the object's pixels are drawn opaque: a scene is brighter on its mask than off it
    on = (scenes[:, 0].float() * masks).flatten(1).sum(1) / masks.flatten(1).sum(1).clamp(min=1)
    off = (scenes[:, 0].float() * ~masks).flatten(1).sum(1) / (~masks).flatten(1).sum(1)
    assert (on > off).float().mean() > 0.95
    # and the item is there: shrunk back to its box, the scene's object resembles the item
    i = 0
    r, c = masks[i].any(1).nonzero().flatten(), masks[i].any(0).nonzero().flatten()
    crop = scenes[i:i + 1, :, r[0]:r[-1] + 1, c[0]:c[-1] + 1].float()
    ref = items[i:i + 1].float()
    rr, cc = ref[0, 0].gt(20).any(1).nonzero().flatten(), ref[0, 0].gt(20).any(0).nonzero().flatten()
    ref = ref[:, :, rr[0]:rr[-1] + 1, cc[0]:cc[-1] + 1]
    a = F.interpolate(crop, size=(16, 16), mode="bilinear", antialias=True).flatten()
    b = F.interpolate(ref, size=(16, 16), mode="bilinear", antialias=True).flatten()
    assert torch.corrcoef(torch.stack([a, b]))[0, 1] > 0.8


@pytest.mark.slow
def test_normalization_constants_are_the_training_scenes_statistics():
    scenes = open_dataset("fmnist-scenes").tensors("train")[0].double() / 255  # 60,000 scenes: ~20 s
    assert abs(scenes.mean().item() - SCENES_MEAN[0]) < 1e-4
    assert abs(scenes.std().item() - SCENES_STD[0]) < 1e-4
