"""Segmenters: the per-token pixel head, mIoU, training on fmnist-scenes masks and `smi eval`."""

import json

import pytest
import timm
import torch
from torch.utils.data import TensorDataset

import smi.data.datasets as datasets
from smi.cli import main
from smi.errors import SmiError
from smi.evaluation import evaluate, evaluate_segmentation
from smi.models.loading import load_teacher
from smi.models.training import TeacherTrainConfig, _augment_with_labels, train_teacher

SMALL = {"embed_dim": 32, "depth": 1, "num_heads": 1}


def test_each_patch_is_labelled_from_its_own_token_alone():
    torch.manual_seed(0)
    model = timm.create_model("fmnist_scene_segmenter", **SMALL).eval()
    x = torch.randn(2, 1, 56, 56)
    with torch.no_grad():
        out = model(x)
        tokens = model.norm(model.blocks(model._pos_embed(model.patch_embed(x))))[:, 1:]
    assert out.shape == (2, 2, 56, 56)
    for t in range(196):
        i, j = divmod(t, 14)
        patch = model.head(tokens[:, t]).view(2, 2, 4, 4)  # (class, row, column) of the patch's pixels
        torch.testing.assert_close(out[:, :, 4 * i:4 * i + 4, 4 * j:4 * j + 4], patch)


class _Predicts(torch.nn.Module):
    """A 'segmenter' whose label maps are given: one-hot logits of ``pred`` for the batch it is called on."""

    def __init__(self, pred: torch.Tensor, classes: int) -> None:
        super().__init__()
        self.pred, self.classes, self.at = pred, classes, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.pred[self.at:self.at + len(x)]
        self.at += len(x)
        return torch.nn.functional.one_hot(p, self.classes).permute(0, 3, 1, 2).float()


def test_miou_is_the_mean_over_classes_of_intersection_over_union_counted_over_all_pixels():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (10, 8, 8), generator=g)
    pred = torch.where(torch.rand(10, 8, 8, generator=g) < 0.6, labels, torch.randint(0, 3, (10, 8, 8), generator=g))
    pred[pred == 2] = 1  # class 2 is never predicted: its IoU is 0, and it still counts in the mean
    res = evaluate_segmentation(_Predicts(pred, 3), TensorDataset(torch.zeros(10, 1, 8, 8), labels), batch_size=3,
                                progress=False)
    ious = []
    for c in range(3):
        inter = ((pred == c) & (labels == c)).sum().item()
        union = ((pred == c) | (labels == c)).sum().item()
        ious.append(100 * inter / union)
    assert res["iou"] == pytest.approx(ious, abs=1e-4) and ious[2] == 0
    assert res["miou"] == pytest.approx(sum(ious) / 3)
    assert res["pixel_acc"] == pytest.approx(100 * (pred == labels).float().mean().item())
    assert res["n"] == 10


def test_crop_and_flip_move_the_labels_with_the_pixels():
    g = torch.Generator().manual_seed(0)
    labels = (torch.rand(16, 12, 12, generator=g) < 0.3).long()
    x = labels[:, None].float() * 0.8 + 0.1  # the pixels say their label: > 0.5 on the object
    ax, ay = _augment_with_labels(x, labels, TeacherTrainConfig(crop_padding=3), torch.Generator().manual_seed(1))
    assert ay.dtype == torch.long and ay.shape == labels.shape
    assert torch.equal(ay, (ax[:, 0] > 0.5).long())
    assert not torch.equal(ay, labels)  # the batch was moved


@pytest.fixture
def small_scenes(monkeypatch):
    """fmnist-scenes from the first 300 items of each split (making all 70,000 scenes takes ~25 s)."""
    real = datasets.load_fashion_mnist
    monkeypatch.setattr(datasets, "load_fashion_mnist", lambda split: tuple(t[:300] for t in real(split)))


def test_a_segmenter_trains_on_the_scene_masks_and_smi_eval_reports_its_miou(tmp_path, small_scenes, capsys):
    cfg = TeacherTrainConfig(arch="fmnist_scene_segmenter", data="fmnist-scenes", model_kwargs=SMALL, epochs=1,
                             batch_size=64, train_images=256, test_images=100, warmup_epochs=0.5)
    result = train_teacher(cfg, tmp_path, progress=False)
    meta = json.loads((tmp_path / "fmnist_scene_segmenter.json").read_text())
    assert meta["class_names"] == ["background", "object"] and meta["input_size"] == [1, 56, 56]
    assert meta["test_miou"] == result["test_miou"] and 0 < result["test_miou"] <= 100
    log = json.loads((tmp_path / "log.jsonl").read_text().splitlines()[0])
    assert "miou" in log and "pixel_acc" in log and "top1" not in log
    teacher = load_teacher(str(tmp_path / "fmnist_scene_segmenter.safetensors"))
    assert teacher.task == "segmentation" and teacher.num_classes == 2 and teacher.dataset == "fmnist-scenes"
    assert main(["eval", "--model", str(tmp_path / "fmnist_scene_segmenter.safetensors"), "--limit", "100",
                 "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["n"] == 100 and res["miou"] == pytest.approx(result["test_miou"], abs=0.01)


def test_a_segmenter_needs_a_dataset_with_masks(tmp_path):
    with pytest.raises(SmiError, match="no per-pixel labels"):
        train_teacher(TeacherTrainConfig(arch="fmnist_scene_segmenter", data="fashion-mnist", model_kwargs=SMALL),
                      tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_paths_that_need_class_logits_refuse_a_segmenter_in_one_line(tmp_path, small_scenes):
    from smi.data.sources import RealSource
    from smi.inversion import InversionConfig, synthesize
    from smi.models.loading import save_teacher
    from smi.transfer import build_student, distill
    from smi.transfer.student import Student

    model = timm.create_model("fmnist_scene_segmenter", **SMALL)
    path = save_teacher(model, tmp_path / "seg.safetensors", arch="fmnist_scene_segmenter", model_kwargs=SMALL,
                        data_config={"dataset": "fmnist-scenes"})
    teacher = load_teacher(str(path))
    with pytest.raises(SmiError, match="the sardfq term reads per-image classes.*methods that fit it: .*dfq-sam"):
        synthesize(teacher, InversionConfig.for_method("sardfq", batch_size=2), 2, tmp_path / "pool", progress=False)
    with pytest.raises(SmiError, match="distillation needs a classifier"):
        build_student("fmnist_vit_mini", teacher)
    student = Student(timm.create_model("fmnist_vit_mini", num_classes=2), "fmnist_vit_mini", {}, "scratch", False)
    with pytest.raises(SmiError, match="distillation needs a classifier"):  # built by hand: distill checks too
        distill(teacher, student, RealSource(), tmp_path / "kd", progress=False)
    with pytest.raises(SmiError, match="not class logits"):
        evaluate(teacher.model, TensorDataset(torch.zeros(2, 1, 56, 56), torch.zeros(2, dtype=torch.long)),
                 progress=False)
    assert not (tmp_path / "pool").exists() and not (tmp_path / "kd").exists()


def test_a_sparse_dfq_sam_pool_calibrates_a_quantized_segmenter_that_smi_eval_scores_by_miou(tmp_path, small_scenes,
                                                                                           capsys):
    """The DFQ-SAM path end to end from the CLI: invert (sparse), quantize (repq, W4A4) on the pool, eval."""
    from smi.models.loading import save_teacher

    torch.manual_seed(0)
    seg = save_teacher(timm.create_model("fmnist_scene_segmenter", **SMALL), tmp_path / "seg.safetensors",
                       arch="fmnist_scene_segmenter", model_kwargs=SMALL, class_names=["background", "object"],
                       data_config={"dataset": "fmnist-scenes"})
    assert main(["invert", "--model", str(seg), "--method", "dfq-sam", "--iterations", "12", "--sparsity",
                 "4:0.5,8:0.5", "--num-images", "4", "--batch-size", "4", "--no-grid", "--out",
                 str(tmp_path / "pool")]) == 0
    assert main(["quantize", "--model", str(seg), "--calib", str(tmp_path / "pool"), "--calib-images", "4",
                 "--quantizer", "repq", "--w-bits", "4", "--a-bits", "4", "--out", str(tmp_path / "q")]) == 0
    assert "4 sparse" in capsys.readouterr().out  # calibrated on the kept patches only
    assert main(["eval", "--model", str(seg), "--quantized", str(tmp_path / "q"), "--limit", "50", "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["n"] == 50 and 0 <= res["miou"] <= 100 and "pixel_acc" in res
