import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import smi.runner as runner_mod
from smi.cli import main
from smi.data.pool import load_pool
from smi.data.sources import NoiseSource, PoolSource, RealSource
from smi.errors import SmiError
from smi.inversion.config import InversionConfig, SparsityConfig
from smi.inversion.synthesis import OnlineSource, synthesize
from smi.models.loading import load_teacher
from smi.transfer import DistillConfig, Student, build_student, distill, kd_loss
from tests.conftest import as_teacher, tiny_vit
from tests.helpers import write_tiny_checkpoint

SPARSE = InversionConfig(iterations=6, batch_size=4, sparsity=SparsityConfig.parse("2:0.5,4:0.5"))


def _student(seed: int = 1) -> Student:
    torch.manual_seed(seed)
    return Student(tiny_vit(embed_dim=16).train(), "vit_tiny_test", {}, "scratch", tokens=True)


@pytest.fixture
def sparse_pool(tiny_teacher, tmp_path):
    return synthesize(tiny_teacher, SPARSE, 8, tmp_path / "pool", progress=False, grid=False).folder


def test_kd_loss_is_temperature_scaled_kl():
    s, t = torch.randn(6, 5), torch.randn(6, 5)
    T = 4.0
    p = F.softmax(t / T, 1)
    expected = (p * (p.log() - F.log_softmax(s / T, 1))).sum(1).mean() * T * T
    torch.testing.assert_close(kd_loss(s, t, T), expected)
    assert kd_loss(t, t, T).abs() < 1e-6
    ce = F.cross_entropy(s, t.argmax(1))
    torch.testing.assert_close(kd_loss(s, t, T, ce_weight=0.5), expected + 0.5 * ce)


def test_sparse_pool_reaches_teacher_and_student_as_kept_patches_only(tiny_teacher, sparse_pool, tmp_path):
    student = _student()
    kept = int(load_pool(sparse_pool).masks[0].sum())  # 16 patches -> 8 -> 4
    seen = {"teacher": [], "student": []}
    hooks = [m.blocks[0].register_forward_hook(lambda _m, i, _o, who=who: seen[who].append(i[0].shape[1]))
             for who, m in (("teacher", tiny_teacher.model), ("student", student.model))]
    try:
        distill(tiny_teacher, student, PoolSource(sparse_pool), tmp_path / "kd", DistillConfig(epochs=1, batch_size=4),
                eval_data=None, progress=False)
    finally:
        for h in hooks:
            h.remove()
    assert kept == 4
    assert seen["teacher"] == seen["student"] == [1 + kept] * 2  # class token + kept patches, 2 steps


def test_non_vit_student_gets_the_masked_image(tiny_teacher, sparse_pool, tmp_path):
    """A student that cannot take tokens sees the whole image, stopped patches zero (the pool's fill)."""
    cnn = build_student("resnet10t", tiny_teacher)
    assert not cnn.tokens
    inputs = []
    cnn.model.register_forward_pre_hook(lambda _m, i: inputs.append(i[0].detach().clone()))
    distill(tiny_teacher, cnn, PoolSource(sparse_pool), tmp_path / "kd",
            DistillConfig(epochs=1, batch_size=8, augment=False),
            eval_data=None, progress=False)
    pool = load_pool(sparse_pool)
    assert inputs[0].shape == (8, 3, 32, 32)
    by_content = sorted(inputs[0].flatten(1).tolist())
    assert by_content == sorted(pool.images.flatten(1).tolist())  # the pool's images, unchanged


def test_resume_equals_uninterrupted_run(tiny_teacher, sparse_pool, tmp_path, monkeypatch):
    cfg = DistillConfig(epochs=3, batch_size=4)
    full = distill(tiny_teacher, _student(), PoolSource(sparse_pool), tmp_path / "full", cfg, eval_data=None,
                   progress=False)

    real_save = runner_mod.save_checkpoint
    calls = {"n": 0}

    def dies_after_first_epoch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # killed while saving epoch 2
        return real_save(*args, **kwargs)

    monkeypatch.setattr(runner_mod, "save_checkpoint", dies_after_first_epoch)
    with pytest.raises(KeyboardInterrupt):
        distill(tiny_teacher, _student(), PoolSource(sparse_pool), tmp_path / "resumed", cfg, eval_data=None,
                progress=False)
    monkeypatch.setattr(runner_mod, "save_checkpoint", real_save)
    resumed = distill(tiny_teacher, _student(), PoolSource(sparse_pool), tmp_path / "resumed", cfg, eval_data=None,
                      progress=False)
    a, b = load_file(str(full.weights)), load_file(str(resumed.weights))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in full.log] == [r["loss"] for r in resumed.log]
    assert len((tmp_path / "resumed" / "log.jsonl").read_text().splitlines()) == 3


def test_other_settings_are_refused_unless_overwrite(tiny_teacher, sparse_pool, tmp_path):
    out = tmp_path / "kd"
    distill(tiny_teacher, _student(), PoolSource(sparse_pool), out, DistillConfig(epochs=1, batch_size=4),
            eval_data=None,
            progress=False)
    before = (out / "checkpoint.safetensors").read_bytes()
    with pytest.raises(SmiError, match=r"other settings \(differs in: config\)"):
        distill(tiny_teacher, _student(), PoolSource(sparse_pool), out, DistillConfig(epochs=1, batch_size=4, lr=2e-3),
                eval_data=None, progress=False)
    assert (out / "checkpoint.safetensors").read_bytes() == before  # nothing lost
    distill(tiny_teacher, _student(), PoolSource(sparse_pool), out, DistillConfig(epochs=1, batch_size=4, lr=2e-3),
            eval_data=None, progress=False, overwrite=True)
    assert json.loads((out / "config.json").read_text())["config"]["lr"] == 2e-3


def test_pool_of_another_teacher_is_refused(sparse_pool, tmp_path):
    other = as_teacher(tiny_vit(), spec="other")
    with pytest.raises(SmiError, match="made from another teacher"):
        distill(other, _student(), PoolSource(sparse_pool), tmp_path / "kd", DistillConfig(epochs=1), eval_data=None,
                progress=False)


def test_online_grows_the_pool_one_batch_per_epoch_and_resumes(tiny_teacher, tmp_path):
    cfg = DistillConfig(epochs=2, batch_size=4, online_steps=3)
    res = distill(tiny_teacher, _student(), OnlineSource(SPARSE), tmp_path / "kd", cfg, eval_data=None,
                  progress=False)
    assert [r["images"] for r in res.log] == [4, 8]
    assert res.log[1]["synthesis_s"] > res.log[0]["synthesis_s"] > 0
    pool = load_pool(tmp_path / "kd" / "pool")
    assert len(pool) == 8 and pool.masks.sum(1).tolist() == [4] * 8
    # the same pool as an offline synthesis with the same seed and settings
    offline = load_pool(synthesize(tiny_teacher, SPARSE, 8, tmp_path / "offline", progress=False, grid=False).folder)
    assert torch.equal(pool.images, offline.images)
    again = distill(tiny_teacher, _student(), OnlineSource(SPARSE), tmp_path / "kd", cfg, eval_data=None,
                    progress=False)
    assert again.log == res.log  # finished run: nothing redone


def test_time_budget_stops_early(tiny_teacher, sparse_pool, tmp_path):
    res = distill(tiny_teacher, _student(), PoolSource(sparse_pool), tmp_path / "kd",
                  DistillConfig(epochs=5, batch_size=4, time_budget_s=1e-3), eval_data=None, progress=False)
    assert res.epochs == 1


def test_linear_probe_trains_only_the_new_head(tmp_path):
    ckpt = write_tiny_checkpoint(tmp_path, name="backbone")
    teacher = as_teacher(tiny_vit(num_classes=3))
    s = build_student(None, teacher, checkpoint=str(ckpt), linear_probe=True)
    assert s.model.num_classes == 3
    trainable = {n for n, p in s.model.named_parameters() if p.requires_grad}
    assert trainable == {"head.weight", "head.bias"}


def test_new_head_fine_tunes_every_weight_of_a_backbone_with_other_classes(tmp_path):
    ckpt = write_tiny_checkpoint(tmp_path, name="backbone")  # 5 classes
    backbone = load_teacher(str(ckpt)).model
    teacher = as_teacher(tiny_vit(num_classes=3))
    with pytest.raises(SmiError, match="--new-head"):
        build_student(None, teacher, checkpoint=str(ckpt))
    s = build_student(None, teacher, checkpoint=str(ckpt), new_head=True)
    assert s.model.num_classes == 3 and s.model_kwargs["num_classes"] == 3
    assert all(p.requires_grad for p in s.model.parameters())
    kept = {k: v for k, v in backbone.state_dict().items() if not k.startswith("head.")}
    assert all(torch.equal(v, s.model.state_dict()[k]) for k, v in kept.items())  # the backbone's weights, untouched
    with pytest.raises(SmiError, match="--new-head needs a trained backbone"):
        build_student("vit_tiny_patch16_224", teacher, new_head=True)
    assert DistillConfig().to_dict() == {k: v for k, v in DistillConfig(new_head=True).to_dict().items()
                                         if k != "new_head"}  # runs recorded before the field existed resume


def test_linear_probe_keeps_a_cnn_backbones_batchnorm_statistics(tmp_path):
    """Under a linear probe a CNN backbone's BatchNorm layers normalize with their running statistics even in train
    mode, and no training step moves them: the probe's features are the backbone's eval-mode features."""
    import timm

    from smi.models.loading import batch_norms, save_teacher

    torch.manual_seed(0)
    cnn = timm.create_model("resnet10t", num_classes=4)
    with torch.no_grad():
        cnn.train()(2 + 3 * torch.randn(16, 3, 32, 32))  # running statistics far from a batch of N(0, 1) images
    ckpt = save_teacher(cnn.eval(), tmp_path / "cnn.safetensors", arch="resnet10t", model_kwargs={},
                        data_config={"input_size": (3, 32, 32)})
    s = build_student(None, as_teacher(tiny_vit(num_classes=3)), checkpoint=str(ckpt), linear_probe=True)
    stats = {k: v.clone() for k, v in s.model.state_dict().items() if "running" in k}
    x = torch.randn(8, 3, 32, 32)
    s.model.train()
    F.cross_entropy(s.model(x), torch.arange(8) % 3).backward()
    assert {n for n, p in s.model.named_parameters() if p.grad is not None} == {"fc.weight", "fc.bias"}
    assert all(torch.equal(v, s.model.state_dict()[k]) for k, v in stats.items())
    with torch.no_grad():
        assert torch.allclose(s.model.forward_features(x), cnn.eval().forward_features(x), atol=1e-5)
    assert len(batch_norms(s.model)) == len(batch_norms(cnn)) > 0  # the student_bn term still finds them
    # the probe's weights still load into the plain architecture (BatchNorm2d) it came from
    assert not timm.create_model("resnet10t", num_classes=3).load_state_dict(s.model.state_dict()).missing_keys
    # and the student smi writes is a plain resnet10t file that load_teacher (smi eval) reads back, same outputs
    # (up to float rounding: FrozenBatchNorm2d folds its statistics into a scale and shift), while the probe itself
    # keeps its frozen layers
    path = save_teacher(s.model.eval(), tmp_path / "probe.safetensors", arch="resnet10t", model_kwargs={},
                        data_config={"input_size": (3, 32, 32)})
    back = load_teacher(str(path)).model
    assert not any("Frozen" in type(m).__name__ for m in back.modules())
    assert any("Frozen" in type(m).__name__ for m in s.model.modules())
    with torch.no_grad():
        assert torch.allclose(back(x), s.model.eval()(x), atol=1e-5)
    # a file written without the step counters (as smi wrote probes before) loads too
    from safetensors.torch import save_file

    save_file({k: v for k, v in load_file(path).items() if not k.endswith("num_batches_tracked")}, path)
    with torch.no_grad():
        assert torch.equal(load_teacher(str(path)).model(x), back(x))


@pytest.mark.parametrize("case", ["classes", "input", "arch"])
def test_student_that_does_not_fit_is_refused(case, tmp_path):
    teacher = as_teacher(tiny_vit(num_classes=3 if case == "classes" else 5))
    if case == "input":
        teacher.input_size = (3, 48, 48)
    ckpt = write_tiny_checkpoint(tmp_path)
    arch = "resnet18" if case == "arch" else None
    needle = {"classes": "classes but the teacher has 3", "input": "reads (3, 32, 32) inputs",
              "arch": "holds a vit_tiny_patch16_224"}[case]
    with pytest.raises(SmiError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        build_student(arch, teacher, checkpoint=str(ckpt))


def test_fresh_student_is_built_for_the_teacher():
    teacher = load_teacher("fmnist_vit_tiny")
    s = build_student("fmnist_vit_mini", teacher)
    assert s.tokens and s.model.num_classes == 10 and s.origin == "scratch"
    cnn = build_student("resnet10t", teacher)
    assert not cnn.tokens and cnn.model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    with pytest.raises(SmiError, match="unknown student architecture"):
        build_student("fmnist_vit_mimi", teacher)


@pytest.mark.slow  # end to end, 15-30 s: make test-all (CI) runs it
def test_student_beats_chance_on_real_test_data(tmp_path):
    """The shipped teacher teaches a fresh fmnist_vit_mini for a few steps; the student learns the real classes.

    Trained on real training images (seconds); that synthetic pools transfer too is what
    benchmarks/distill.py measures, at a budget no unit test can afford.
    """
    teacher = load_teacher("fmnist_vit_tiny")
    res = distill(teacher, build_student("fmnist_vit_mini", teacher), RealSource(), tmp_path / "kd",
                  DistillConfig(epochs=2, batch_size=64, steps_per_epoch=40, eval_images=1000), progress=False)
    assert res.top1 is not None and res.top1 > 20.0, res.log  # chance is 10 %
    assert (tmp_path / "kd" / "accuracy.png").stat().st_size > 0
    # the saved student is an smi checkpoint that loads with the teacher's normalization
    back = load_teacher(str(res.weights))
    assert back.mean == teacher.mean and back.num_classes == 10


def test_cli_distill_and_bad_input(tmp_path, capsys):
    ckpt = str(write_tiny_checkpoint(tmp_path))
    pool = tmp_path / "pool"
    assert main(["invert", "--model", ckpt, "--num-images", "4", "--batch-size", "4", "--iterations", "6",
                 "--sparsity", "2:0.5", "--out", str(pool), "--no-grid"]) == 0
    base = ["distill", "--teacher", ckpt, "--student", "vit_tiny_patch16_224", "--pool", str(pool), "--epochs", "1",
            "--batch-size", "4", "--eval-data", "none", "--out", str(tmp_path / "kd")]
    capsys.readouterr()
    assert main(base + ["--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["epochs"] == 1 and summary["top1"] is None
    for extra, needle in ((["--lr", "0.002"], "other settings"), (["--temperature", "0"], "--temperature"),
                          (["--student", "vit_tiny_patch16_2244"], "unknown student"),
                          (["--linear-probe"], "needs a trained backbone"),
                          (["--new-head"], "--new-head needs a trained backbone")):
        assert main(base + extra) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("smi: error:") and needle in err and "\n" not in err, err


def test_nan_loss_stops_distillation_and_keeps_finished_epochs(tiny_teacher, sparse_pool, tmp_path):
    student = _student()
    calls = {"n": 0}

    def poison(_m, _inp, out):  # two steps per epoch: epoch 1 is finite, epoch 2 is not
        calls["n"] += 1
        return out * float("nan") if calls["n"] > 2 else out

    student.model.head.register_forward_hook(poison)
    with pytest.raises(SmiError, match="loss became nan at epoch 2, step 1; the learning rate"):
        distill(tiny_teacher, student, PoolSource(sparse_pool), tmp_path / "kd", DistillConfig(epochs=3, batch_size=4),
                eval_data=None, progress=False)
    assert len((tmp_path / "kd" / "log.jsonl").read_text().splitlines()) == 1
    assert (tmp_path / "kd" / "checkpoint.safetensors").is_file()


def test_the_same_cli_command_resumes_with_a_timm_student(tmp_path, capsys):
    """img_size is a tuple in memory and a list in config.json: the rerun must resume, not be refused."""
    ckpt = str(write_tiny_checkpoint(tmp_path))
    args = ["distill", "--teacher", ckpt, "--student", "vit_tiny_patch16_224", "--noise", "--epochs", "2",
            "--online-steps", "1", "--batch-size", "4", "--eval-data", "none", "--out", str(tmp_path / "kd")]
    assert main(args) == 0
    assert main(args) == 0, capsys.readouterr().err
    assert len((tmp_path / "kd" / "log.jsonl").read_text().splitlines()) == 2


def test_overwrite_removes_only_what_smi_made(tiny_teacher, tmp_path):
    """--overwrite of an online run clears its checkpoint, log and recorded pool shards; a user's own files in
    the run folder and in its pool folder survive."""
    cfg = DistillConfig(epochs=1, batch_size=4, online_steps=1)
    out = tmp_path / "kd"
    distill(tiny_teacher, _student(), OnlineSource(SPARSE), out, cfg, eval_data=None, progress=False)
    (out / "my_notes.txt").write_text("mine")
    (out / "pool" / "shard-mine.safetensors").write_text("mine too")  # looks like a shard, not recorded
    recorded = sorted(p.name for p in (out / "pool").glob("shard-0*.safetensors"))
    assert recorded
    distill(tiny_teacher, _student(), PoolSource(out / "pool"), tmp_path / "other", cfg, eval_data=None,
            progress=False)
    distill(tiny_teacher, _student(), NoiseSource(), out, cfg, eval_data=None, progress=False, overwrite=True)
    assert (out / "my_notes.txt").read_text() == "mine"
    assert (out / "pool" / "shard-mine.safetensors").read_text() == "mine too"
    assert not any((out / "pool" / name).exists() for name in [*recorded, "manifest.json", "grid.png"])


def test_mix_images_are_per_image_convex_combinations():
    from smi.transfer.loop import mix_images

    x = torch.randn(6, 1, 4, 4)
    gen = torch.Generator().manual_seed(3)
    mixed = mix_images(x, gen)
    g = torch.Generator().manual_seed(3)  # the same draws, worked out by hand
    lam, perm = torch.rand(6, generator=g), torch.randperm(6, generator=g)
    for i in range(6):
        torch.testing.assert_close(mixed[i], lam[i] * x[i] + (1 - lam[i]) * x[perm[i]])


def test_mixup_reaches_the_models_and_is_recorded(tiny_teacher, sparse_pool, tmp_path, monkeypatch):
    """With mixup=1 every training batch is mixtures of pool images, still seen through each image's own kept
    patches; the setting is part of the run's identity (and absent from it when off, so older runs resume)."""
    import smi.transfer.loop as loop

    inputs, logits = [], loop._logits
    monkeypatch.setattr(loop, "_logits",
                        lambda m, x, keep: (inputs.append((x.detach().clone(), keep)), logits(m, x, keep))[1])
    distill(tiny_teacher, _student(), PoolSource(sparse_pool), tmp_path / "kd",
            DistillConfig(epochs=1, batch_size=8, augment=False, mixup=1.0), eval_data=None, progress=False)
    assert inputs[0][1] is not None and inputs[0][1].shape == (8, 4)  # kept patches, as tokens
    pool = load_pool(sparse_pool).images.flatten(1)
    seen = inputs[0][0].flatten(1)
    assert not any(torch.equal(row, p) for row in seen for p in pool)  # no image passes unmixed
    lo, hi = pool.min(0).values, pool.max(0).values
    assert ((seen >= lo - 1e-6) & (seen <= hi + 1e-6)).all()  # inside the pool's pixel-wise hull
    assert json.loads((tmp_path / "kd" / "config.json").read_text())["config"]["mixup"] == 1.0
    assert "mixup" not in DistillConfig().to_dict()
    with pytest.raises(SmiError, match="mixup"):
        DistillConfig(mixup=1.5)


@pytest.mark.slow
def test_student_learns_from_synthetic_images_alone(tmp_path):
    """The shipped CNN teacher inverts 64 images (BatchNorm prior, 150 steps, seconds); a fresh student trained
    on nothing else (300 steps, mixup) beats chance (10 %) by far on real test images it never saw."""
    teacher = load_teacher("fmnist_resnet_tiny")
    cfg = InversionConfig(iterations=150, batch_size=64, sparsity=SparsityConfig(()))
    pool = synthesize(teacher, cfg, 64, tmp_path / "pool", progress=False, grid=False).folder
    res = distill(teacher, build_student("fmnist_resnet_tiny", teacher), PoolSource(str(pool)), tmp_path / "kd",
                  DistillConfig(epochs=1, steps_per_epoch=300, mixup=0.5, warmup_epochs=0.1, eval_images=1000),
                  progress=False)
    assert res.top1 is not None and res.top1 > 20.0, res.log  # measured: 31.6 % after 20 s


def test_color_shift_reaches_teacher_and_student_alike_inside_the_valid_range(tiny_teacher, sparse_pool, tmp_path,
                                                                                monkeypatch):
    """--augment-color: both models see the same shifted batch (the teacher labels what the student sees), every
    pixel stays a pixel a real image could have, and the setting joins the run's identity only when on."""
    import smi.transfer.loop as loop
    from smi.inversion.engine import valid_range

    inputs, logits = [], loop._logits
    monkeypatch.setattr(loop, "_logits",
                        lambda m, x, keep: (inputs.append(x.detach().clone()), logits(m, x, keep))[1])
    distill(tiny_teacher, _student(), PoolSource(sparse_pool), tmp_path / "kd",
            DistillConfig(epochs=1, batch_size=8, augment=False, color_shift=1.0), eval_data=None, progress=False)
    teacher_view, student_view = inputs[0], inputs[1]
    assert torch.equal(teacher_view, student_view)
    pool = load_pool(sparse_pool).images.flatten(1)
    assert not any(torch.equal(row, p) for row in teacher_view.flatten(1) for p in pool)  # every image shifted
    lo, hi = valid_range(tiny_teacher.mean, tiny_teacher.std, "cpu")
    assert (teacher_view >= lo - 1e-6).all() and (teacher_view <= hi + 1e-6).all()
    assert json.loads((tmp_path / "kd" / "config.json").read_text())["config"]["color_shift"] == 1.0
    assert "color_shift" not in DistillConfig().to_dict()
    with pytest.raises(SmiError, match="color_shift"):
        DistillConfig(color_shift=-1)


def test_background_fill_shows_the_student_the_teachers_object_on_a_random_background(tiny_teacher, sparse_pool,
                                                                                        tmp_path, monkeypatch):
    """--augment-background 1: the teacher labels every sparse image from its kept patches (tokens, as without the
    option); the student gets the whole image: the same kept patches, and stopped patches that are no longer the
    pool's zero fill."""
    import smi.transfer.loop as loop

    calls, logits = [], loop._logits
    monkeypatch.setattr(loop, "_logits",
                        lambda m, x, keep: (calls.append((x.detach().clone(), keep)), logits(m, x, keep))[1])
    distill(tiny_teacher, _student(), PoolSource(sparse_pool), tmp_path / "kd",
            DistillConfig(epochs=1, batch_size=8, augment=False, background=1.0), eval_data=None, progress=False)
    (teacher_view, t_keep), (student_view, s_keep) = calls[0], calls[1]
    assert t_keep is not None and t_keep.shape == (8, 4) and s_keep is None
    kept = load_pool(sparse_pool).masks.new_zeros(8, 16).scatter_(1, t_keep, True)
    kept = kept.view(-1, 1, 4, 1, 4, 1).expand(-1, 3, -1, 8, -1, 8).reshape(teacher_view.shape)
    assert torch.equal(student_view[kept], teacher_view[kept])
    for v, t, k in zip(student_view, teacher_view, kept, strict=True):
        assert not torch.equal(v[~k], t[~k])
    assert json.loads((tmp_path / "kd" / "config.json").read_text())["config"]["background"] == 1.0
    assert "background" not in DistillConfig().to_dict()
    with pytest.raises(SmiError, match="background"):
        DistillConfig(background=1.5)


def test_attention_transfer_is_rowwise_kl_headwise_or_head_averaged():
    """Against a direct computation: KL(t || s) of each query's row, head by head when the head counts match, of
    the head means when they do not; zero for identical maps."""
    from smi.transfer.loop import attention_transfer

    torch.manual_seed(0)
    s, t = torch.randn(3, 2, 5, 5).softmax(-1), torch.randn(3, 2, 5, 5).softmax(-1)
    expected = sum(float((t[b, h, q] * (t[b, h, q] / s[b, h, q]).log()).sum())
                   for b in range(3) for h in range(2) for q in range(5)) / (3 * 2 * 5)
    assert attention_transfer(s, t).item() == pytest.approx(expected, rel=1e-5)
    assert attention_transfer(t, t).abs() < 1e-6
    t4 = torch.randn(3, 4, 5, 5).softmax(-1)
    sm, tm = s.mean(1), t4.mean(1)
    expected = float((tm * (tm / sm).log()).sum(-1).mean())
    assert attention_transfer(s, t4).item() == pytest.approx(expected, rel=1e-5)


def test_attention_pairs_map_student_blocks_onto_teacher_depth():
    from smi.transfer.loop import attention_pairs

    teacher = tiny_vit(depth=4)
    for depth, expected in ((4, [0, 1, 2, 3]), (2, [1, 3]), (1, [3]), (3, [1, 2, 3])):
        student = tiny_vit(depth=depth, embed_dim=16)
        pairs = attention_pairs(teacher, student)
        assert [a is b.attn for (a, _), b in zip(pairs, student.blocks, strict=True)] == [True] * depth
        assert [[b.attn for b in teacher.blocks].index(t) for _, t in pairs] == expected
    with pytest.raises(SmiError, match="patch grid"):
        attention_pairs(teacher, tiny_vit(patch_size=4))
    with pytest.raises(SmiError, match="timm ViT student"):
        attention_pairs(teacher, torch.nn.Conv2d(3, 3, 1))


def test_attention_transfer_pulls_the_students_maps_to_the_teachers(tiny_teacher, sparse_pool, tmp_path, monkeypatch):
    """With --attention the loss holds the attention term over the kept tokens both models saw (each student
    block against its teacher block), training lowers it, and the setting joins the run's identity."""
    import smi.transfer.loop as loop
    from smi.models.sparse import AttentionCapture

    seen, transfer = [], loop.attention_transfer
    monkeypatch.setattr(loop, "attention_transfer", lambda s, t: (seen.append((s.shape, t.shape)), transfer(s, t))[1])

    def gap(student: Student) -> float:
        images = load_pool(sparse_pool)
        keep = loop.mask_to_indices(images.masks)
        x = images.images.float()
        with torch.no_grad(), AttentionCapture(student.model.blocks[1].attn) as s, \
                AttentionCapture(tiny_teacher.model.blocks[1].attn) as t:
            loop._logits(student.model.eval(), x, keep), loop._logits(tiny_teacher.model, x, keep)
        return float(transfer(s.attn, t.attn))

    student = _student()
    before = gap(student)
    distill(tiny_teacher, student, PoolSource(sparse_pool), tmp_path / "kd",
            DistillConfig(epochs=8, batch_size=8, augment=False, lr=1e-2, attention=100.0), eval_data=None,
            progress=False)
    assert seen and all(s == t == (8, 2, 5, 5) for s, t in seen)  # class token + 4 kept patches, both models
    assert len(seen) == 2 * 8  # two block pairs, one step per epoch
    assert gap(student) < 0.5 * before
    assert json.loads((tmp_path / "kd" / "config.json").read_text())["config"]["attention"] == 100.0
    assert "attention" not in DistillConfig().to_dict()
    with pytest.raises(SmiError, match="background"):
        DistillConfig(attention=1.0, background=0.5)
    with pytest.raises(SmiError, match="attention"):
        DistillConfig(attention=-1.0)


def test_attention_transfer_with_a_cnn_student_is_refused_before_the_run_folder(tiny_teacher, sparse_pool, tmp_path):
    cnn = Student(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(5)), "cnn", {}, "scratch", tokens=False)
    with pytest.raises(SmiError, match="timm ViT student"):
        distill(tiny_teacher, cnn, PoolSource(sparse_pool), tmp_path / "kd", DistillConfig(attention=1.0),
                eval_data=None, progress=False)
    assert not (tmp_path / "kd").exists()
