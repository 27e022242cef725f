import pytest
import torch

from smi.data.sources import SOURCES, ImageSet, NoiseSource, PoolSource, RealSource, parse_source
from smi.errors import SmiError
from smi.inversion.background import FilledPoolSource
from smi.inversion.config import InversionConfig, SparsityConfig
from smi.inversion.synthesis import OnlineSource, synthesize
from smi.quant.calibration import calibration_set


def test_registry_holds_every_source_kind():
    assert set(SOURCES.names()) == {"pool", "filled-pool", "real", "noise", "online", "generator", "online-generator"}
    for name, cls in SOURCES.items():
        assert cls.kind == name and SOURCES.help(name)


def test_parse_source_reads_words_as_sources_and_anything_else_as_a_pool(tmp_path, monkeypatch):
    assert parse_source("real") == RealSource() and parse_source("noise") == NoiseSource()
    assert parse_source("pools/x") == PoolSource("pools/x") and parse_source("pool:real") == PoolSource("real")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "real").mkdir()  # a pool folder that happens to be called real: never silently read as real data
    with pytest.raises(SmiError, match="both a data source and a folder"):
        parse_source("real")
    assert parse_source("./real") == PoolSource("./real")


def test_a_pool_folder_called_real_calibrates_from_its_images(tiny_teacher, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = InversionConfig(iterations=4, batch_size=4, sparsity=SparsityConfig(()))
    synthesize(tiny_teacher, cfg, 4, tmp_path / "real", progress=False, grid=False)
    calib = calibration_set(tiny_teacher, PoolSource("real"), 4)
    from smi.data.pool import load_pool

    assert torch.equal(calib.images, load_pool(tmp_path / "real").images)


def test_image_set_take_and_batches():
    x = torch.arange(10.0).view(10, 1, 1, 1)
    ordered = ImageSet(x, ordered=True)
    assert ordered.take(3, torch.Generator())[0].flatten().tolist() == [0, 1, 2]
    drawn, _ = ImageSet(x).take(3, torch.Generator().manual_seed(0))
    expected = x[torch.randperm(10, generator=torch.Generator().manual_seed(0))[:3]]
    assert torch.equal(drawn, expected)
    with pytest.raises(SmiError, match="at most the 10 images"):
        ordered.take(11, torch.Generator())
    seen = torch.cat([b for b, _ in ImageSet(x).batches(5, 4, torch.Generator())]).flatten().tolist()
    assert len(seen) == 20 and len(set(seen[:8])) == 8  # the first two batches come from one permutation
    noise = ImageSet(noise_shape=(1, 2, 2))
    assert noise.endless and noise.take(3, torch.Generator())[0].shape == (3, 1, 2, 2)


def test_online_source_is_refused_for_calibration(tiny_teacher):
    with pytest.raises(SmiError, match="online synthesis feeds training loops"):
        calibration_set(tiny_teacher, OnlineSource(InversionConfig()), 4)


@pytest.fixture
def sparse_pool(tiny_teacher, tmp_path):
    """A tiny sparse pool (half the patches stopped) and its kept pixels as a (N, C, H, W) boolean mask."""
    from smi.data.pool import load_pool
    from smi.inversion.augment import pixel_mask_from_indices
    from smi.models.sparse import mask_to_indices

    cfg = InversionConfig(iterations=4, batch_size=4, sparsity=SparsityConfig(((2, 0.5),)))
    synthesize(tiny_teacher, cfg, 4, tmp_path / "sparse", progress=False, grid=False)
    pool = load_pool(tmp_path / "sparse")
    assert pool.masks is not None and not pool.masks.all()
    g = int(pool.masks.shape[1] ** 0.5)
    kept = pixel_mask_from_indices(mask_to_indices(pool.masks), (g, g), pool.images.shape[-1] // g)
    return str(tmp_path / "sparse"), pool, kept.bool().expand_as(pool.images)


def test_pool_background_shows_a_sparse_pool_whole_with_its_stopped_patches_filled(tiny_teacher, tmp_path,
                                                                                   sparse_pool):
    from smi.data.pool import load_pool
    from smi.inversion.engine import valid_range

    path, pool, kept = sparse_pool
    whole = FilledPoolSource(path, background=0.25).open(tiny_teacher)
    assert whole.masks is None and whole.identity["background"] == 0.25
    assert torch.equal(whole.images[kept], pool.images[kept])  # the optimized patches are the pool's own
    lo, hi = valid_range(tiny_teacher.mean, tiny_teacher.std, "cpu")
    filled = whole.images.masked_fill(kept, float("nan"))
    assert bool(((filled >= lo) & (filled <= hi) | filled.isnan()).all())  # the fill stays in the pixel range
    assert float(whole.images[~kept].abs().sum()) > 0  # no longer the pool's zeros (the mean colour)
    again = FilledPoolSource(path, background=0.25).open(tiny_teacher)
    assert torch.equal(again.images, whole.images)  # one fill, the same at every open (resumable runs)
    assert PoolSource(path).open(tiny_teacher).masks is not None  # the default is unchanged
    synthesize(tiny_teacher, InversionConfig(iterations=4, batch_size=4, sparsity=SparsityConfig(())), 4,
               tmp_path / "dense", progress=False, grid=False)
    dense = FilledPoolSource(str(tmp_path / "dense"), background=0.25).open(tiny_teacher)
    assert torch.equal(dense.images, load_pool(tmp_path / "dense").images)  # nothing stopped, nothing filled
    black = FilledPoolSource(path, background=0.0, level=0.0).open(tiny_teacher)
    assert black.identity["level"] == 0.0 and "level" not in whole.identity
    assert torch.equal(black.images[kept], pool.images[kept])
    assert torch.equal(black.images[~kept], lo.expand_as(black.images)[~kept])  # the lowest valid pixel everywhere
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(SmiError, match="fraction of the pixel range"):
            FilledPoolSource("x", background=bad)
        with pytest.raises(SmiError, match="fraction of the pixel range") as e:
            FilledPoolSource("x", level=bad)
        assert e.value.param == "pool_level"


def test_pool_refill_gives_training_batches_a_fresh_background_and_fixed_draws_the_seeded_one(tiny_teacher,
                                                                                            sparse_pool):
    path, pool, kept = sparse_pool
    fixed = FilledPoolSource(path, background=0.25).open(tiny_teacher)
    refill = FilledPoolSource(path, background=0.25, refill=True).open(tiny_teacher)
    assert refill.identity["refill"] and "refill" not in fixed.identity
    g = torch.Generator()
    assert torch.equal(refill.take(4, g)[0], fixed.take(4, g)[0])  # calibration and reconstruction: the seeded fill
    one = refill.subset(1, g)  # what --train-images trains on: the first image, refilled at every draw
    (a, ma), (b, mb) = one.batches(2, 1, torch.Generator().manual_seed(1))
    assert ma is None and mb is None
    kept = kept[:1]
    assert torch.equal(a[kept], pool.images[:1][kept]) and torch.equal(b[kept], pool.images[:1][kept])
    assert not torch.equal(a[~kept], b[~kept])  # the same object, two backgrounds
    again = torch.cat([x for x, _ in one.batches(2, 1, torch.Generator().manual_seed(1))])
    assert torch.equal(again, torch.cat([a, b]))  # the batch generator decides the fill: a resumed epoch is the same
