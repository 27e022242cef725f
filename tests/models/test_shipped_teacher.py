"""The shipped teacher, measured on real Fashion-MNIST test images (no download: Debian's package)."""

import json

import pytest
import timm
import torch

from smi.data import load_pool
from smi.data.datasets import eval_dataset
from smi.data.fashion_mnist import load_fashion_mnist
from smi.data.scenes import SCENES_MEAN
from smi.evaluation import evaluate, evaluate_segmentation, teacher_accuracy_on_pool
from smi.inversion import InversionConfig, SparsityConfig, synthesize
from smi.models.loading import load_teacher
from smi.models.teachers import WEIGHTS_DIR


def test_accuracy_on_all_10000_test_images():
    teacher = load_teacher("fmnist_vit_tiny")
    top1 = evaluate(teacher.model, eval_dataset("fashion-mnist", teacher), progress=False)["top1"]
    meta = json.loads((WEIGHTS_DIR / "fmnist_vit_tiny.json").read_text())
    assert top1 >= 88.0
    assert abs(top1 - meta["test_top1"]) < 0.05  # the metadata's figure is what the weights give


def test_loads_by_name_through_timm_like_any_model(monkeypatch):
    # the pretrained config names a file inside the package, never a hub: with the hub switched off
    # (and no hub id to resolve) this must still load
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = timm.models.get_pretrained_cfg("fmnist_vit_tiny")
    assert cfg.hf_hub_id is None and cfg.url is None
    assert (WEIGHTS_DIR / "fmnist_vit_tiny.safetensors").samefile(cfg.file)
    model = timm.create_model("fmnist_vit_tiny", pretrained=True).eval()
    ref = load_teacher("fmnist_vit_tiny").model
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x))
    cfg = timm.data.resolve_model_data_config(model)
    assert cfg["input_size"] == (1, 28, 28) and model.patch_embed.num_patches >= 49


def test_teacher_recognizes_its_own_sparse_synthetic_images(tmp_path):
    teacher = load_teacher("fmnist_vit_tiny")
    cfg = InversionConfig(iterations=200, batch_size=10, sparsity=SparsityConfig.parse("25:0.3,50:0.3"))
    synthesize(teacher, cfg, 10, tmp_path / "pool", progress=False, grid=False)
    pool = load_pool(tmp_path / "pool")
    assert pool.masks.sum(1).tolist() == [23] * 10
    assert teacher_accuracy_on_pool(teacher, pool) >= 90.0


def test_w8a8_is_within_half_a_point_of_fp32_on_real_data():
    from smi.data.sources import RealSource
    from smi.quant import QuantConfig
    from smi.quant.pipeline import quantize_and_evaluate

    teacher = load_teacher("fmnist_vit_tiny")
    data = eval_dataset("fashion-mnist", teacher, limit=2000)
    fp32 = evaluate(teacher.model, data, progress=False)["top1"]
    for quantizer in ("baseline", "repq"):
        cfg = QuantConfig.create(quantizer, w_bits=8, a_bits=8)
        q = quantize_and_evaluate(teacher, cfg, RealSource(), data, calib_images=32)
        assert abs(q["top1"] - fp32) <= 0.5, (quantizer, q["top1"], fp32)


def test_shipped_cnn_teacher_accuracy_timm_loading_and_bn_inversion(monkeypatch):
    """fmnist_resnet_tiny: 89.66 % on all 10,000 test images, loads through timm offline, inverts with the BN prior."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    teacher = load_teacher("fmnist_resnet_tiny")
    x, _ = load_fashion_mnist("test")
    top1 = evaluate(teacher.model, eval_dataset("fashion-mnist", teacher), progress=False)["top1"]
    meta = json.loads((WEIGHTS_DIR / "fmnist_resnet_tiny.json").read_text())
    assert top1 >= 89.0 and abs(top1 - meta["test_top1"]) < 0.05
    cfg = timm.models.get_pretrained_cfg("fmnist_resnet_tiny")
    assert cfg.hf_hub_id is None and cfg.url is None  # a file in the package: pretrained=True cannot download
    assert (WEIGHTS_DIR / "fmnist_resnet_tiny.safetensors").samefile(cfg.file)
    model = timm.create_model("fmnist_resnet_tiny", pretrained=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x[:4].float()), teacher.model(x[:4].float()))
    from smi.inversion import invert

    # 200 steps: at 60 the share of hits depends on the CPU's kernels (0.7 on one machine, >= 0.8 on another)
    cfg = InversionConfig(iterations=200, batch_size=10, sparsity=SparsityConfig(()), jitter_unit="pixel")
    batch = invert(teacher, cfg, torch.arange(10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (teacher.model(batch.images).argmax(1) == torch.arange(10)).float().mean() >= 0.9


def test_scene_teacher_loads_through_timm_on_deits_grid(monkeypatch):
    """fmnist_scene_vit: 196 patches of 4x4 on 56x56 scenes, weights in the package, no download."""
    teacher = _loads_offline_through_timm("fmnist_scene_vit", monkeypatch)
    assert teacher.input_size == (1, 56, 56) and teacher.dataset == "fmnist-scenes"
    assert teacher.model.patch_embed.num_patches == 196 and teacher.mean == SCENES_MEAN


def _loads_offline_through_timm(name: str, monkeypatch):
    """The shipped ``name`` loads with no download, and timm's ``pretrained=True`` gives the same model."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    teacher = load_teacher(name)
    cfg = timm.models.get_pretrained_cfg(name)
    assert cfg.hf_hub_id is None and cfg.url is None
    assert (WEIGHTS_DIR / f"{name}.safetensors").samefile(cfg.file)
    model = timm.create_model(name, pretrained=True).eval()
    x = torch.randn(2, *teacher.input_size)
    with torch.no_grad():
        torch.testing.assert_close(model(x), teacher.model(x))
    return teacher


@pytest.mark.slow
def test_scene_teacher_accuracy_on_all_10000_test_scenes():
    teacher = load_teacher("fmnist_scene_vit")
    top1 = evaluate(teacher.model, eval_dataset("fmnist-scenes", teacher), progress=False)["top1"]
    meta = json.loads((WEIGHTS_DIR / "fmnist_scene_vit.json").read_text())
    assert abs(top1 - meta["test_top1"]) < 0.05  # the metadata's figure is what the weights give
    assert top1 >= 78.5


def test_scene_segmenter_loads_through_timm_on_deits_grid(monkeypatch):
    """fmnist_scene_segmenter: the scene teacher's shape with a per-token pixel head, weights in the package."""
    teacher = _loads_offline_through_timm("fmnist_scene_segmenter", monkeypatch)
    assert teacher.task == "segmentation" and teacher.input_size == (1, 56, 56) and teacher.num_classes == 2
    assert teacher.class_names == ["background", "object"] and teacher.dataset == "fmnist-scenes"


@pytest.mark.slow  # end to end, 15-30 s: make test-all (CI) runs it
def test_the_scene_segmenter_segments_its_dfq_sam_images_as_their_target_maps():
    """Data-free images of the shipped segmenter: it labels the kept pixels as the (evolved) maps say."""
    from smi.inversion import InversionConfig, SparsityConfig, invert

    teacher = load_teacher("fmnist_scene_segmenter")
    cfg = InversionConfig.for_method("dfq-sam", iterations=300, batch_size=4, sparsity=SparsityConfig(((40, 0.5),)),
                                     rounds=(), warmup=20)
    batch = invert(teacher, cfg, torch.ones(4, dtype=torch.long), generator=torch.Generator().manual_seed(0))
    from smi.models.sparse import mask_to_indices, sparse_forward

    with torch.no_grad():  # on the kept patches, as inversion optimized them
        pred = sparse_forward(teacher.model, batch.images, mask_to_indices(batch.mask)).logits.argmax(1)
    kept = torch.nn.functional.interpolate(batch.mask.view(4, 1, 14, 14).float(), scale_factor=4)[:, 0].bool()
    agree = (pred == batch.maps)[kept].float().mean()
    assert agree >= 0.9 and (batch.maps > 0).float().mean() > 0.05  # an object, drawn where the map has it


@pytest.mark.slow
def test_scene_segmenter_miou_on_all_10000_test_scenes():
    teacher = load_teacher("fmnist_scene_segmenter")
    res = evaluate_segmentation(teacher.model, eval_dataset("fmnist-scenes", teacher), progress=False)
    meta = json.loads((WEIGHTS_DIR / "fmnist_scene_segmenter.json").read_text())
    assert abs(res["miou"] - meta["test_miou"]) < 0.05  # the metadata's figure is what the weights give
    assert res["miou"] >= 90
