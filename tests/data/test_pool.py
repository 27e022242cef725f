import json

import pytest
import torch

import smi.inversion.synthesis as synth_mod
from smi.data.pool import load_pool
from smi.errors import SmiError
from smi.inversion.config import InversionConfig, SparsityConfig
from smi.inversion.synthesis import plan_targets, synthesize

CFG = InversionConfig(iterations=6, batch_size=2, sparsity=SparsityConfig.parse("2:0.5,4:0.5"))


def test_pool_contents(tiny_teacher, tmp_path):
    res = synthesize(tiny_teacher, CFG, 5, tmp_path / "pool", seed=1, progress=False)
    pool = load_pool(res.folder)
    assert len(pool) == 5
    image, mask, label = pool[0]
    assert image.shape == (3, 32, 32) and mask.shape == (16,) and mask.dtype == torch.bool
    assert pool.masks.sum(1).tolist() == [4] * 5
    assert torch.bincount(pool.labels, minlength=5).tolist() == [1, 1, 1, 1, 1]
    manifest = json.loads((res.folder / "manifest.json").read_text())
    assert manifest["num_images_done"] == 5 and len(manifest["shards"]) == 3
    assert manifest["identity"]["teacher"]["fingerprint"] == "test:tiny"
    assert {"torch", "timm", "smi"} <= set(manifest["versions"])
    assert (res.folder / "grid.png").stat().st_size > 0
    assert json.loads((res.folder / "config.json").read_text())["config"]["iterations"] == 6


def test_resume_after_interruption_equals_uninterrupted_run(tiny_teacher, tmp_path, monkeypatch):
    full = load_pool(synthesize(tiny_teacher, CFG, 5, tmp_path / "full", progress=False).folder)

    real_invert = synth_mod.invert
    calls = {"n": 0}

    def dies_on_second_batch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # the process is stopped mid-batch
        return real_invert(*args, **kwargs)

    monkeypatch.setattr(synth_mod, "invert", dies_on_second_batch)
    with pytest.raises(KeyboardInterrupt):
        synthesize(tiny_teacher, CFG, 5, tmp_path / "resumed", progress=False)
    partial = json.loads((tmp_path / "resumed" / "manifest.json").read_text())
    assert partial["num_images_done"] == 2
    assert not list((tmp_path / "resumed").glob("*.tmp"))

    monkeypatch.setattr(synth_mod, "invert", real_invert)
    resumed = load_pool(synthesize(tiny_teacher, CFG, 5, tmp_path / "resumed", progress=False).folder)
    assert calls["n"] == 2  # the finished shard was not redone
    assert torch.equal(full.images, resumed.images) and torch.equal(full.labels, resumed.labels)
    assert torch.equal(full.masks, resumed.masks)


def test_rerun_of_a_finished_pool_does_nothing(tiny_teacher, tmp_path, monkeypatch):
    synthesize(tiny_teacher, CFG, 3, tmp_path / "p", progress=False)
    monkeypatch.setattr(synth_mod, "invert", lambda *a, **k: pytest.fail("nothing should be inverted again"))
    synthesize(tiny_teacher, CFG, 3, tmp_path / "p", progress=False)
    assert len(load_pool(tmp_path / "p")) == 3


def test_other_config_is_refused_unless_overwrite(tiny_teacher, tmp_path):
    synthesize(tiny_teacher, CFG, 3, tmp_path / "p", progress=False)
    before = (tmp_path / "p" / "manifest.json").read_bytes()
    other = InversionConfig(iterations=6, batch_size=2, sparsity=SparsityConfig.parse("dense"))
    with pytest.raises(SmiError, match="another config.*sparsity"):
        synthesize(tiny_teacher, other, 3, tmp_path / "p", progress=False)
    assert (tmp_path / "p" / "manifest.json").read_bytes() == before  # nothing lost
    synthesize(tiny_teacher, other, 3, tmp_path / "p", progress=False, overwrite=True)
    assert load_pool(tmp_path / "p").masks.all()


def test_corrupt_shard_is_detected(tiny_teacher, tmp_path):
    synthesize(tiny_teacher, CFG, 3, tmp_path / "p", progress=False)
    shard = tmp_path / "p" / "shard-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(SmiError, match="shard-00001.safetensors: checksum mismatch"):
        load_pool(tmp_path / "p")


def test_plan_targets_is_balanced():
    t = plan_targets(103, 10, seed=0)
    counts = torch.bincount(t, minlength=10)
    assert counts.max() - counts.min() <= 1 and counts.sum() == 103


def test_pool_verify_names_each_bad_shard_and_info_reports_contents(tiny_teacher, tmp_path, capsys):
    from smi.cli import main

    synthesize(tiny_teacher, CFG, 5, tmp_path / "p", progress=False, grid=False)  # shards of 2, 2, 1
    assert main(["pool", "verify", str(tmp_path / "p")]) == 0
    assert capsys.readouterr().out.startswith("ok:")
    assert main(["pool", "info", str(tmp_path / "p"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["images_done"] == 5 and sum(info["per_class"]) == 5 and info["shards"] == 3
    assert info["teacher"]["fingerprint"] == "test:tiny" and info["method"] == "deepinversion"
    assert info["per_class"] == torch.bincount(plan_targets(5, 5, 0), minlength=5).tolist()

    first = tmp_path / "p" / "shard-00000.safetensors"
    first.write_bytes(first.read_bytes()[:100])  # truncated
    (tmp_path / "p" / "shard-00002.safetensors").unlink()
    assert main(["pool", "verify", str(tmp_path / "p")]) == 1
    out = capsys.readouterr()
    assert out.out.splitlines() == ["BAD shard-00000.safetensors: checksum mismatch (corrupt or changed)",
                                    "BAD shard-00002.safetensors: missing"]
    assert out.err.strip() == f"smi: error: 2 bad shard(s) in {tmp_path / 'p'}"


def test_nan_in_a_later_batch_stops_the_run_and_keeps_finished_shards(tiny_teacher, tmp_path):
    from smi.data.pool import verify_pool

    calls = {"n": 0}

    def poison(_m, _inp, out):  # finite for the first batch (6 iterations), NaN afterwards
        calls["n"] += 1
        return out * float("nan") if calls["n"] > 6 else out

    handle = tiny_teacher.model.head.register_forward_hook(poison)
    try:
        with pytest.raises(SmiError, match="loss became nan at iteration 1; lower the learning rate"):
            synthesize(tiny_teacher, CFG, 5, tmp_path / "p", progress=False)
    finally:
        handle.remove()
    manifest = json.loads((tmp_path / "p" / "manifest.json").read_text())
    assert [s["index"] for s in manifest["shards"]] == [0] and verify_pool(tmp_path / "p") == []
    synthesize(tiny_teacher, CFG, 5, tmp_path / "p", progress=False)  # fixed teacher: the rerun completes
    assert len(load_pool(tmp_path / "p")) == 5


def test_overwrite_keeps_files_the_pool_did_not_record(tiny_teacher, tmp_path):
    cfg = InversionConfig(iterations=4, batch_size=2, sparsity=SparsityConfig(()))
    synthesize(tiny_teacher, cfg, 2, tmp_path / "p", progress=False, grid=False)
    (tmp_path / "p" / "shard-99999.safetensors").write_text("a user's file with a shard-like name")
    (tmp_path / "p" / "readme.txt").write_text("mine")
    other = InversionConfig(iterations=5, batch_size=2, sparsity=SparsityConfig(()))
    synthesize(tiny_teacher, other, 2, tmp_path / "p", progress=False, grid=False, overwrite=True)
    assert (tmp_path / "p" / "readme.txt").read_text() == "mine"
    assert (tmp_path / "p" / "shard-99999.safetensors").read_text().startswith("a user's")
    assert load_pool(tmp_path / "p").manifest["identity"]["config"]["iterations"] == 5
