import pytest
import torch

from smi.data.sources import SOURCES, ImageSet, NoiseSource, PoolSource, RealSource, parse_source
from smi.errors import SmiError
from smi.inversion.config import InversionConfig, SparsityConfig
from smi.inversion.synthesis import OnlineSource, synthesize
from smi.quant.calibration import calibration_set


def test_registry_holds_every_source_kind():
    assert set(SOURCES.names()) == {"pool", "real", "noise", "online", "generator", "online-generator"}
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
