"""Inverting a segmenter: blob target maps, their evolution (dfq-sam), sparse ranking, pools and refusals."""

import pytest
import timm
import torch
import torch.nn.functional as F

from smi.cli import main
from smi.data.pool import load_pool
from smi.errors import SmiError
from smi.inversion import InversionConfig, SparsityConfig, invert, synthesize
from smi.inversion.augment import Jitter, apply_jitter
from smi.inversion.segmentation import TargetMaps, _unjitter, blob_maps, planned_classes
from smi.models.loading import Teacher
from smi.models.sparse import sparse_forward
from tests.conftest import as_teacher, tiny_vit

SMALL = {"embed_dim": 32, "depth": 1, "num_heads": 1}


def segmenter(seed: int = 0):
    torch.manual_seed(seed)
    model = timm.create_model("fmnist_scene_segmenter", **SMALL).eval().requires_grad_(False)
    return Teacher(model, "seg", "fmnist_scene_segmenter", 2, (1, 56, 56), (0.2,), (0.18,), fingerprint="test:seg")


def options(**kw):
    return lambda name: {**dict(seg_area_low=0.1, seg_area_high=0.4, seg_evolve=1.0, seg_evolve_start=0.0,
                                seg_evolve_every=1, seg_confidence=0.9), **kw}[name]


def test_blobs_cover_the_asked_share_of_the_frame_in_the_images_class_and_repeat_with_the_seed():
    targets = torch.tensor([1, 2, 3, 1] * 50)
    maps = blob_maps(targets, (56, 56), torch.Generator().manual_seed(0), (0.1, 0.4))
    again = blob_maps(targets, (56, 56), torch.Generator().manual_seed(0), (0.1, 0.4))
    assert torch.equal(maps, again)
    share = (maps > 0).float().mean((1, 2))
    assert share.min() > 0.05 and share.max() < 0.5  # the ellipse's area, give or take the wobble and the frame
    assert 0.2 < share.mean() < 0.3  # U(0.1, 0.4) has mean 0.25
    for b in range(len(targets)):  # one object per image, of the image's class
        assert set(maps[b].unique().tolist()) == {0, int(targets[b])}
    assert blob_maps(targets[:4], (56, 56), torch.Generator().manual_seed(1)).ne(maps[:4]).any()


def test_planned_classes_are_foreground_and_balanced():
    c = planned_classes(30, 4, seed=0)
    assert c.min() >= 1 and torch.bincount(c, minlength=4).tolist() == [0, 10, 10, 10]
    with pytest.raises(SmiError, match="background and at least one object class"):
        planned_classes(3, 1, seed=0)


@pytest.mark.parametrize("j", [Jitter(4, -8, False), Jitter(-4, 12, True), Jitter(0, 0, True)])
def test_unjitter_undoes_the_views_jitter(j):
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(_unjitter(apply_jitter(x, j), j), x)


def test_evolution_gives_confident_pixels_the_segmenters_label_and_leaves_the_rest():
    maps = TargetMaps(torch.tensor([1, 1]), 2, (8, 8), torch.Generator().manual_seed(0), options(), iterations=10)
    before = maps.maps.clone()
    pred = torch.zeros(2, 8, 8, dtype=torch.long)
    pred[:, :4] = 1  # the segmenter: object in the top half
    logits = 5.0 * F.one_hot(pred, 2).permute(0, 3, 1, 2).float()  # p = 0.9933 on every pixel
    logits[0, :, 6:] = 0  # image 0: unsure about the bottom two rows
    maps.evolve(logits, None)
    assert torch.equal(maps.maps[1], pred[1])
    assert torch.equal(maps.maps[0, :6], pred[0, :6]) and torch.equal(maps.maps[0, 6:], before[0, 6:])
    # an evolution that would leave (almost) no object is not applied to that image
    maps.evolve(5.0 * F.one_hot(torch.zeros(2, 8, 8, dtype=torch.long), 2).permute(0, 3, 1, 2).float(), None)
    assert torch.equal(maps.maps[1], pred[1])


def test_stopped_pixels_never_evolve_and_never_count_in_the_loss():
    maps = TargetMaps(torch.tensor([1]), 2, (8, 8), torch.Generator().manual_seed(0), options(), iterations=10)
    before = maps.maps.clone()
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :4, :] = 1
    logits = torch.randn(1, 2, 8, 8)
    maps.evolve(10 * logits, mask)
    assert torch.equal(maps.maps[0, 4:], before[0, 4:])
    changed = logits.clone()
    changed[..., 4:, :] = torch.randn(1, 2, 4, 8) * 100  # outside the mask: no effect on the loss
    j = Jitter(0, 0, False)
    torch.testing.assert_close(maps.per_image(logits, mask, j), maps.per_image(changed, mask, j))
    direct = F.cross_entropy(logits, maps.maps, reduction="none")[:, :4].mean()  # an independent count
    torch.testing.assert_close(maps.per_image(logits, mask, j)[0], direct)


def test_the_segmenters_sparse_forward_labels_kept_patches_as_the_dense_one_does_when_all_are_kept():
    teacher = segmenter()
    x = torch.randn(2, 1, 56, 56)
    with torch.no_grad():
        dense = teacher.model(x)
        sparse = sparse_forward(teacher.model, x, torch.arange(196).expand(2, 196)).logits
        some = sparse_forward(teacher.model, x, torch.tensor([[0, 5, 100], [1, 2, 195]])).logits
    torch.testing.assert_close(sparse, dense)
    assert some[0, :, :4, :4].abs().sum() > 0 and some[0, :, 4:8, :4].abs().sum() == 0  # patch 14: not kept


def test_sparse_stops_keep_the_patches_that_hold_the_object():
    """With a segmenter that predicts nothing useful, the stop keeps the patches the target map marks as object."""
    teacher = segmenter()
    cfg = InversionConfig(iterations=3, batch_size=4, sparsity=SparsityConfig(((1, 0.75),)), jitter=0.0, flip=False)
    seen = {}
    batch = invert(teacher, cfg, torch.ones(4, dtype=torch.long), generator=torch.Generator().manual_seed(0),
                   callback=lambda info: seen.setdefault(info.iteration, info.keep.clone()))
    fg = F.avg_pool2d((batch.maps > 0).float()[:, None], 4).flatten(1)  # (B, 196) object share of each patch
    kept = fg.gather(1, batch.mask.nonzero()[:, 1].view(4, -1))
    dropped = fg.masked_select(~batch.mask).view(4, -1)
    assert batch.mask.sum(1).tolist() == [49] * 4
    assert (kept.mean(1) > 3 * dropped.mean(1)).all()


def test_a_segmenter_pool_learns_its_maps_and_stores_them(tmp_path):
    teacher = segmenter()
    cfg = InversionConfig(iterations=40, batch_size=4, sparsity=SparsityConfig(((10, 0.5),)))  # fixed blobs
    res = synthesize(teacher, cfg, 8, tmp_path / "pool", progress=False)
    pool = load_pool(res.folder)
    assert pool.maps is not None and pool.maps.shape == (8, 56, 56) and pool.maps.dtype == torch.uint8
    assert pool.labels.tolist() == [1] * 8 and pool.masks.sum(1).tolist() == [98] * 8
    with torch.no_grad():
        ce = F.cross_entropy(teacher.model(pool.images), pool.maps.long(), reduction="none")
    start = F.cross_entropy(teacher.model(torch.randn(8, 1, 56, 56)), pool.maps.long(), reduction="none")
    keep = F.interpolate(pool.masks.view(8, 1, 14, 14).float(), scale_factor=4)[:, 0].bool()
    assert ce[keep].mean() < 0.8 * start[keep].mean()  # the images learned their maps
    assert main(["pool", "verify", str(res.folder)]) == 0


def test_segmentation_method_and_classifier_mismatches_are_refused_before_any_folder(tmp_path, capsys):
    seg, clf = segmenter(), as_teacher(tiny_vit())
    with pytest.raises(SmiError, match="dfq-sam synthesizes for a segmenter"):
        synthesize(clf, InversionConfig.for_method("dfq-sam"), 4, tmp_path / "a", progress=False)
    with pytest.raises(SmiError, match="the contrastive term reads per-image classes"):
        synthesize(seg, InversionConfig(terms={"contrastive": 1.0}), 4, tmp_path / "b", progress=False)
    with pytest.raises(SmiError, match="labels must be hard"):
        synthesize(seg, InversionConfig(labels="ris"), 4, tmp_path / "c", progress=False)
    with pytest.raises(SmiError, match="0 is the background"):
        invert(seg, InversionConfig(iterations=2, sparsity=SparsityConfig(())), torch.zeros(2, dtype=torch.long))
    assert not any(tmp_path.iterdir())
    assert main(["invert", "--model", "fmnist_vit_tiny", "--method", "dfq-sam", "--out", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("smi: error: --method dfq-sam synthesizes for a segmenter") and "\n" not in err
    assert not (tmp_path / "d").exists()


def test_the_methods_a_refusal_names_for_a_segmenter_are_the_ones_that_run_on_it(tmp_path):
    from smi.inversion.methods import METHODS

    seg = segmenter()
    with pytest.raises(SmiError, match="methods that fit it: ") as refused:
        synthesize(seg, InversionConfig.for_method("sardfq"), 2, tmp_path / "refused", progress=False)
    named = str(refused.value).split("methods that fit it: ")[1].split(", ")
    assert {"deepinversion", "psaq", "mimiq", "dfq-sam"} <= set(named)
    stops = SparsityConfig.parse("2:0.5")
    for name in METHODS.names():
        if METHODS.get(name).task == "diffusion":
            continue
        cfg = InversionConfig.for_method(name, batch_size=2, iterations=4, sparsity=stops)
        if name in named:  # runs, sparse, and writes its maps
            pool = load_pool(synthesize(seg, cfg, 2, tmp_path / name, progress=False).folder)
            assert pool.maps is not None and len(pool.images) == 2
        else:
            with pytest.raises(SmiError):
                synthesize(seg, cfg, 2, tmp_path / name, progress=False)
            assert not (tmp_path / name).exists()
