"""The GDFQ generator: shapes, conditioning, its loss against a hand computation, training, use as a source."""

import json

import pytest
import timm
import torch
import torch.nn.functional as F

from smi.cli import main
from smi.data.sources import NoiseSource, parse_source
from smi.errors import SmiError
from smi.generators import (
    ConditionalGenerator,
    GeneratorConfig,
    GeneratorSource,
    QimeraGenerator,
    build_generator,
    generator_loss,
    train_generator,
)
from smi.generators.train import load_generator, sample_labels, sample_targets
from smi.inversion.terms.psaq import kde_entropy
from smi.models.loading import load_teacher
from tests.conftest import as_teacher, tiny_vit


def _tiny_cnn():
    torch.manual_seed(0)
    return timm.create_model("resnet10t", num_classes=5, in_chans=3).eval()


def test_shapes_and_conditioning():
    torch.manual_seed(0)
    g = ConditionalGenerator(5, (3, 32, 32), latent_dim=8, width=16).eval()
    z = torch.randn(6, 8)
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    x = g(z, y)
    assert x.shape == (6, 3, 32, 32)
    torch.testing.assert_close(g(z, F.one_hot(y, 5).float()), x)  # one-hot weights are the labels
    assert not torch.allclose(g(z, (y + 1) % 5), x)  # the class changes the image
    # superposed embeddings: weights mix the class embeddings linearly
    w = torch.zeros(6, 5)
    w[:, 1], w[:, 3] = 0.3, 0.7
    torch.testing.assert_close(g.embedding(w), 0.3 * g.embed.weight[1] + 0.7 * g.embed.weight[3]
                               + torch.zeros(6, 8))
    with pytest.raises(SmiError, match="multiple of 4"):
        ConditionalGenerator(5, (1, 30, 30))


def test_labels_are_balanced():
    y = sample_labels(23, 5, torch.Generator().manual_seed(0))
    assert sorted(torch.bincount(y, minlength=5).tolist()) == [4, 4, 5, 5, 5]


def test_cnn_loss_is_cross_entropy_plus_bn_statistics_by_hand():
    teacher = as_teacher(_tiny_cnn())
    g = ConditionalGenerator(5, (3, 32, 32), latent_dim=8, width=16)
    z, y = torch.randn(4, 8), torch.tensor([0, 1, 2, 3])
    cfg = GeneratorConfig(bn_weight=0.1, bn_first_weight=1.0)
    torch.manual_seed(1)
    loss, parts = generator_loss(teacher, g, z, y, cfg)
    # independent: record every BN layer's input with plain hooks, then the formula
    inputs, hooks = [], [m.register_forward_hook(lambda m, i, o: inputs.append((m, i[0])))
                         for m in teacher.model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    torch.manual_seed(1)
    x = g(z, y)
    logits = teacher.model(x)
    for h in hooks:
        h.remove()
    bn = sum(torch.sqrt(((a.mean((0, 2, 3)) - m.running_mean) ** 2).sum())
             + torch.sqrt(((a.transpose(0, 1).flatten(1).var(1, unbiased=False) - m.running_var) ** 2).sum())
             for m, a in inputs)
    expected = F.cross_entropy(logits, y) + 0.1 * bn
    torch.testing.assert_close(loss, expected)
    assert parts["bn"] == pytest.approx(bn.item(), rel=1e-5) and "entropy" not in parts


def test_vit_loss_is_cross_entropy_minus_patch_similarity_entropy_by_hand():
    teacher = as_teacher(tiny_vit())
    g = ConditionalGenerator(5, (3, 32, 32), latent_dim=8, width=16)
    z, y = torch.randn(4, 8), torch.tensor([0, 1, 2, 3])
    torch.manual_seed(1)
    loss, parts = generator_loss(teacher, g, z, y, GeneratorConfig(psaq_weight=0.5))
    outs, hooks = [], [b.attn.proj.register_forward_pre_hook(lambda m, i: outs.append(i[0]))
                       for b in teacher.model.blocks]
    torch.manual_seed(1)
    logits = teacher.model(g(z, y))
    for h in hooks:
        h.remove()
    entropy = 0.0
    for o in outs:  # (B, T, D): the heads' outputs side by side; their mean over heads, patch tokens only
        t = F.normalize(o.view(4, o.shape[1], 2, -1).mean(2)[:, 1:], dim=-1)
        sim = t @ t.transpose(1, 2)
        off = ~torch.eye(sim.shape[1], dtype=torch.bool)
        entropy = entropy + kde_entropy(sim[:, off]).mean()
    torch.testing.assert_close(loss, F.cross_entropy(logits, y) - 0.5 * entropy)
    assert "bn" not in parts


def test_training_lowers_the_bn_loss_and_the_generator_is_a_source(tmp_path, capsys):
    cfg = GeneratorConfig(epochs=3, steps_per_epoch=8, batch_size=16, latent_dim=16, width=16)
    teacher = load_teacher("fmnist_resnet_tiny")
    res = train_generator(teacher, tmp_path / "gen", cfg, progress=False)
    log = [json.loads(line) for line in (tmp_path / "gen" / "log.jsonl").read_text().splitlines()]
    assert len(log) == 3 and log[-1]["train_bn"] < log[0]["train_bn"]
    meta = json.loads((tmp_path / "gen" / "generator.json").read_text())
    assert meta["format"] == "smi-generator/1" and meta["teacher_top1"] == res["teacher_top1"]
    # a data source: fresh images each draw, the teacher's input size
    source = parse_source(f"generator:{tmp_path / 'gen'}")
    assert isinstance(source, GeneratorSource)
    images = source.open(teacher)
    a, _ = images.take(4, torch.Generator().manual_seed(0))
    b, _ = images.take(4, torch.Generator().manual_seed(0))
    c, _ = images.take(4, torch.Generator().manual_seed(1))
    assert a.shape == (4, 1, 28, 28) and torch.equal(a, b) and not torch.equal(a, c)
    # another teacher's generator is refused
    with pytest.raises(SmiError, match="another teacher"):
        load_generator(tmp_path / "gen", load_teacher("fmnist_vit_tiny"))
    # the CLI: calibration and distillation read it
    assert main(["quantize", "--model", "fmnist_resnet_tiny", "--calib", f"generator:{tmp_path / 'gen'}",
                 "--calib-images", "8", "--w-bits", "8", "--a-bits", "8", "--out", str(tmp_path / "q")]) == 0
    assert main(["distill", "--teacher", "fmnist_resnet_tiny", "--student", "fmnist_vit_mini", "--generator",
                 str(tmp_path / "gen"), "--epochs", "1", "--online-steps", "3", "--batch-size", "8",
                 "--eval-images", "50", "--out", str(tmp_path / "kd"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["epochs"] == 1
    row = json.loads((tmp_path / "kd" / "log.jsonl").read_text().splitlines()[0])
    assert row["images"] == 24  # fresh images: steps x batch


def test_bad_generator_settings_are_refused():
    with pytest.raises(SmiError, match="two images"):
        GeneratorConfig(batch_size=1)
    with pytest.raises(SmiError, match="must be >= 0"):
        GeneratorConfig(bn_weight=-1)


def test_a_trained_generator_writes_pools_that_verify_dense_and_sparse(tmp_path, capsys):
    teacher = load_teacher("fmnist_vit_tiny")
    train_generator(teacher, tmp_path / "gen", GeneratorConfig(epochs=1, steps_per_epoch=2, batch_size=8,
                                                               latent_dim=8, width=8), progress=False)
    from smi.data.pool import load_pool, pool_info
    from smi.generators.pool import generate_pool

    for sparsity in ("dense", "default"):
        out = tmp_path / sparsity
        assert main(["invert", "--model", "fmnist_vit_tiny", "--generator", str(tmp_path / "gen"), "--num-images",
                     "10", "--batch-size", "4", "--sparsity", sparsity, "--out", str(out)]) == 0
        assert main(["pool", "verify", str(out)]) == 0
        pool = load_pool(out)
        assert len(pool) == 10 and pool_info(out)["method"] == "generator"
        kept = pool.masks.sum(1)
        assert (kept == (49 if sparsity == "dense" else 11)).all()  # 49 -> 34 -> 23 -> 16 -> 11
    # sparse: stopped patches are zero, and the kept ones are what the teacher ranks highest
    from smi.inversion import SparsityConfig
    from smi.models.sparse import rank_patches

    dense, sparse = load_pool(tmp_path / "dense"), load_pool(tmp_path / "default")
    torch.testing.assert_close(dense.labels, sparse.labels)
    keep = rank_patches(teacher.model, dense.images, SparsityConfig().kept_counts(49)[1:])
    assert torch.equal(torch.zeros(10, 49, dtype=torch.bool).scatter_(1, keep, True), sparse.masks)
    stopped = ~sparse.masks.view(10, 1, 7, 1, 7, 1).expand(-1, -1, -1, 4, -1, 4).reshape(10, 1, 28, 28)
    assert (sparse.images[stopped] == 0).all()
    # resuming rewrites nothing; pixel-optimization flags are refused with the generator
    shards = sorted((tmp_path / "dense").glob("shard-*.safetensors"))
    before = [(p.stat().st_mtime_ns, p.read_bytes()) for p in shards]
    generate_pool(teacher, tmp_path / "gen", 10, tmp_path / "dense", sparsity=SparsityConfig(()), batch_size=4)
    assert [(p.stat().st_mtime_ns, p.read_bytes()) for p in shards] == before
    capsys.readouterr()
    assert main(["invert", "--model", "fmnist_vit_tiny", "--generator", str(tmp_path / "gen"), "--iterations", "5",
                 "--out", str(tmp_path / "x")]) == 2
    assert "--iterations shapes pixel optimization" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_superposed_targets_mix_distinct_classes_with_weights_summing_to_one():
    g = torch.Generator().manual_seed(0)
    y = sample_targets(12, 5, g, superpose_prob=1.0, superpose_classes=3)
    assert y.shape == (12, 5) and ((y > 0).sum(1) == 3).all()
    torch.testing.assert_close(y.sum(1), torch.ones(12))
    assert sample_targets(12, 5, g, superpose_prob=0.0).shape == (12,)


def test_qimera_mixes_mapped_codes_of_the_classes_by_hand():
    torch.manual_seed(0)
    g = QimeraGenerator(5, (3, 32, 32), latent_dim=6, width=8, mapped_dim=4)
    z = torch.randn(3, 6)
    w = torch.zeros(3, 5)
    w[0, [1, 2]] = torch.tensor([0.25, 0.75])
    w[1, [0, 4]] = torch.tensor([0.5, 0.5])
    w[2, [3, 1]] = torch.tensor([0.9, 0.1])
    classes = w.topk(2, dim=1).indices
    rows = (g.embed.weight[classes] + z[:, None]).flatten(0, 1)  # (6, 6): each (image, class) pair
    normed = (rows - rows.mean(0)) / torch.sqrt(rows.var(0, unbiased=False) + 1e-5)  # batch statistics only
    mapped = (normed @ g.mapping.weight.T + g.mapping.bias).view(3, 2, 4)
    expected = (w.gather(1, classes)[..., None] * mapped).sum(1)
    torch.testing.assert_close(g.code(z, w), expected)
    assert g(z, w).shape == (3, 3, 32, 32)


def test_qimera_embeddings_start_as_the_teacher_classifier_and_its_pool_holds_soft_targets(tmp_path):
    teacher = load_teacher("fmnist_resnet_tiny")
    g = build_generator(teacher, GeneratorConfig(kind="qimera"))
    head = teacher.model.get_classifier()
    assert g.latent_dim == head.in_features and torch.equal(g.embed.weight, head.weight)
    cfg = GeneratorConfig(kind="qimera", epochs=1, steps_per_epoch=2, batch_size=8, width=8, mapped_dim=8,
                          superpose_prob=1.0)
    train_generator(teacher, tmp_path / "gen", cfg, progress=False)
    assert main(["invert", "--model", "fmnist_resnet_tiny", "--generator", str(tmp_path / "gen"), "--sparsity",
                 "dense", "--num-images", "6", "--batch-size", "3", "--out", str(tmp_path / "pool")]) == 0
    assert main(["pool", "verify", str(tmp_path / "pool")]) == 0
    from safetensors.torch import load_file

    shard = load_file(str(tmp_path / "pool" / "shard-00000.safetensors"))
    torch.testing.assert_close(shard["soft"].sum(1), torch.ones(3))
    assert ((shard["soft"] > 0).sum(1) == 2).all() and torch.equal(shard["soft"].argmax(1), shard["targets"])


def test_soft_targets_give_the_soft_cross_entropy():
    teacher = as_teacher(_tiny_cnn())
    g = ConditionalGenerator(5, (3, 32, 32), latent_dim=8, width=16)
    z = torch.randn(4, 8)
    w = sample_targets(4, 5, torch.Generator().manual_seed(0), superpose_prob=1.0)
    torch.manual_seed(1)
    loss, _ = generator_loss(teacher, g, z, w, GeneratorConfig(bn_weight=0.0))
    torch.manual_seed(1)
    expected = -(w * teacher.model(g(z, w)).log_softmax(1)).sum(1).mean()
    torch.testing.assert_close(loss, expected)


def test_online_generator_trains_alongside_the_student_and_resumes_exactly(tmp_path, monkeypatch):
    import smi.runner as runner_mod
    from smi.generators import OnlineGeneratorSource
    from smi.transfer import DistillConfig, Student, distill

    teacher = as_teacher(tiny_vit())

    def student():
        torch.manual_seed(1)
        return Student(tiny_vit(embed_dim=16).train(), "vit_tiny_test", {}, "scratch", tokens=False)

    source = OnlineGeneratorSource(GeneratorConfig(batch_size=4, latent_dim=8, width=8), steps=3, adversarial=1.0)
    cfg = DistillConfig(epochs=3, batch_size=4, online_steps=2)
    full = distill(teacher, student(), source, tmp_path / "full", cfg, eval_data=None, progress=False)
    assert (tmp_path / "full" / "generator" / "state.safetensors").is_file()
    assert [r["images"] for r in full.log] == [8, 16, 24] and full.log[-1]["synthesis_s"] > 0

    real_save, calls = runner_mod.save_checkpoint, {"n": 0}

    def dies_saving_epoch_2(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_save(*args, **kwargs)

    monkeypatch.setattr(runner_mod, "save_checkpoint", dies_saving_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        distill(teacher, student(), source, tmp_path / "resumed", cfg, eval_data=None, progress=False)
    monkeypatch.setattr(runner_mod, "save_checkpoint", real_save)
    resumed = distill(teacher, student(), source, tmp_path / "resumed", cfg, eval_data=None, progress=False)
    from safetensors.torch import load_file

    a, b = load_file(str(full.weights)), load_file(str(resumed.weights))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in full.log] == [r["loss"] for r in resumed.log]
    # another generator setting is another run
    with pytest.raises(SmiError, match="other settings"):
        distill(teacher, student(), OnlineGeneratorSource(source.config, steps=4), tmp_path / "full", cfg,
                eval_data=None, progress=False)


def test_an_online_generator_starts_from_a_trained_one(tmp_path, capsys):
    from smi.generators import OnlineGeneratorSource

    teacher = load_teacher("fmnist_resnet_tiny")
    cfg = GeneratorConfig(epochs=1, steps_per_epoch=2, batch_size=4, latent_dim=8, width=8)
    train_generator(teacher, tmp_path / "gen", cfg, progress=False)
    trained, meta = load_generator(tmp_path / "gen", teacher)
    source = OnlineGeneratorSource(cfg, steps=1, adversarial=1.0, init=str(tmp_path / "gen"))
    images = source.open(teacher, folder=tmp_path / "run", progress=False)
    start = images.model.state_dict()
    assert all(torch.equal(start[k], v) for k, v in trained.state_dict().items())
    assert images.seconds == pytest.approx(meta["train_s"]) and meta["train_s"] > 0  # its training counts
    images.before_epoch(0, progress=False)  # then it trains on: its weights move, its seconds grow
    assert not torch.equal(images.model.state_dict()["fc.weight"], trained.state_dict()["fc.weight"])
    assert images.seconds > meta["train_s"]
    cold = OnlineGeneratorSource(cfg, steps=1, adversarial=1.0)
    assert source.identity()["init"] != cold.identity().get("init")  # a warm start is another run
    with pytest.raises(SmiError, match="another architecture"):  # its architecture must match
        OnlineGeneratorSource(GeneratorConfig(latent_dim=8, width=16), init=str(tmp_path / "gen")).open(
            teacher, folder=tmp_path / "bad", progress=False)
    assert main(["distill", "--teacher", "fmnist_resnet_tiny", "--student", "fmnist_vit_mini", "--online-generator",
                 "gdfq", "--generator-init", str(tmp_path / "missing"), "--out", str(tmp_path / "kd")]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "holds no trained generator" in err and not (tmp_path / "kd").exists()
    assert main(["distill", "--teacher", "fmnist_resnet_tiny", "--generator-init", str(tmp_path / "gen"),
                 "--noise", "--out", str(tmp_path / "kd")]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "--online-generator" in err and not (tmp_path / "kd").exists()


def test_online_generator_from_the_cli_and_its_bad_settings(tmp_path, capsys):
    assert main(["distill", "--teacher", "fmnist_resnet_tiny", "--student", "fmnist_vit_mini", "--online-generator",
                 "qimera", "--generator-steps", "2", "--generator-bn-weight", "0.5", "--epochs", "1", "--online-steps",
                 "2", "--batch-size", "8", "--eval-images", "20", "--out", str(tmp_path / "kd"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["epochs"] == 1
    recorded = json.loads((tmp_path / "kd" / "config.json").read_text())["data"]["generator"]
    assert recorded["kind"] == "qimera" and recorded["bn_weight"] == 0.5
    assert main(["distill", "--teacher", "fmnist_resnet_tiny", "--online-generator", "qimera", "--generator-steps",
                 "0", "--out", str(tmp_path / "bad")]) == 2
    assert "--generator-steps" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    for kind, seek in (("gdfq", "1"), ("causal", "-1")):  # style seeking: the causal generator only, and >= 0
        assert main(["distill", "--teacher", "fmnist_resnet_tiny", "--online-generator", kind,
                     "--generator-style-seek", seek, "--out", str(tmp_path / "bad")]) == 2
        err = capsys.readouterr().err
        assert err.count("error:") == 1 and "--generator-style-seek" in err and not (tmp_path / "bad").exists()
    assert main(["distill", "--teacher", "fmnist_resnet_tiny", "--online-generator", "gdfq", "--generator-bn-weight",
                 "-1", "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "--generator-bn-weight" in err and not (tmp_path / "bad").exists()
    assert main(["quantize", "--model", "fmnist_resnet_tiny", "--calib", "online", "--out", str(tmp_path / "q")]) != 0


def test_adadfq_margin_by_hand():
    from smi.generators.train import adadfq_margin

    g = torch.Generator().manual_seed(0)
    t, s = torch.randn(6, 4, generator=g) * 3, torch.randn(6, 4, generator=g) * 3
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    p = torch.softmax(t - s, 1)
    h = -(p * p.log()).sum(1)
    h = (h - h.min()) / (torch.log(torch.tensor(4.0)) - h.min())
    margin = torch.clamp(0.1 - h, min=0).mean() + torch.clamp(h - 0.8, min=0).mean()
    ce = lambda z: -torch.log_softmax(z, 1)[torch.arange(6), y].mean()  # noqa: E731
    torch.testing.assert_close(adadfq_margin(t, s, y), margin + 0.2 * ce(t - s) + 0.1 * ce(t + s))
    assert margin > 0  # the rescaled entropies span [0, ...]: the smallest sits below the lower bound


def test_akt_recipe_runs_from_the_cli(tmp_path):
    """AKT = QAT with a generator trained alongside (AdaDFQ's game) and refined feature distillation."""
    assert main(["quantize", "--model", "fmnist_vit_tiny", "--calib", "noise", "--calib-images", "8", "--w-bits", "4",
                 "--a-bits", "4", "--out", str(tmp_path / "q")]) == 0
    assert main(["qat", "--model", "fmnist_vit_tiny", "--quantized", str(tmp_path / "q"), "--online-generator", "gdfq",
                 "--generator-game", "adadfq", "--generator-adversarial", "1", "--generator-steps", "2",
                 "--feature-loss", "akt", "--epochs", "1", "--online-steps", "2", "--batch-size", "8",
                 "--eval-images", "20", "--out", str(tmp_path / "akt")]) == 0
    assert (tmp_path / "akt" / "generator" / "state.safetensors").is_file()


def test_laws_features_by_direct_convolution():
    from smi.generators.texture import LAWS_VECTORS, laws_features

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 12, 12, generator=g)
    grey = F.pad(x.mean(1, keepdim=True), (2, 2, 2, 2), mode="reflect")[:, 0]  # (2, 16, 16)
    patches = grey.unfold(1, 5, 1).unfold(2, 5, 1)  # (2, 12, 12, 5, 5): every 5x5 window
    names = list(LAWS_VECTORS)
    energy = {}
    for a in names:
        for b in names:
            mask = torch.outer(torch.tensor(LAWS_VECTORS[a]), torch.tensor(LAWS_VECTORS[b]))
            energy[a, b] = (patches * mask).sum((-1, -2)).abs().mean((1, 2))  # cross-correlation, as conv2d
    expected = torch.stack([(energy[a, b] + energy[b, a]) / 2 / energy["L5", "L5"]
                            for i, a in enumerate(names) for b in names[i:] if (a, b) != ("L5", "L5")], 1)
    torch.testing.assert_close(laws_features(x), expected)
    flat = torch.full((1, 1, 12, 12), 0.7)
    assert laws_features(flat).abs().max() < 1e-6  # no texture in a flat image


def test_texq_needs_its_pool_and_trains_toward_the_texture_centres(tmp_path):
    from smi.generators.texture import laws_features, texture_centres
    from smi.inversion import InversionConfig, SparsityConfig, synthesize

    with pytest.raises(SmiError, match="texq needs a pool"):
        GeneratorConfig(kind="texq")
    with pytest.raises(SmiError, match="only texq reads one"):
        GeneratorConfig(kind="gdfq", texture_pool="x")
    teacher = load_teacher("fmnist_resnet_tiny")
    pool = synthesize(teacher, InversionConfig(iterations=20, batch_size=10, sparsity=SparsityConfig(()),
                                               jitter_unit="pixel"), 10, tmp_path / "pool", progress=False,
                      grid=False).folder
    from smi.data.pool import load_pool

    p = load_pool(pool)
    centres = texture_centres(p.images, p.labels, 10)
    feats = laws_features(p.images)
    for c in range(10):  # each planned class has one image here: its centre is that image's features
        torch.testing.assert_close(centres[c], feats[p.labels == c].mean(0))
    # the texture term alone (no CE, no BN statistics) moves the images' textures toward the centres
    cfg = GeneratorConfig(kind="texq", texture_pool=str(pool), epochs=3, steps_per_epoch=5, batch_size=10,
                          latent_dim=8, width=8, ce_weight=0.0, bn_weight=0.0)
    train_generator(teacher, tmp_path / "gen", cfg, progress=False)
    log = [json.loads(line) for line in (tmp_path / "gen" / "log.jsonl").read_text().splitlines()]
    assert "train_texture" in log[0] and log[-1]["train_texture"] < 0.5 * log[0]["train_texture"], log


def test_attention_centre_and_the_teacher_maps_it_reads():
    from smi.generators.attention import AttentionMap, attention_centre
    from smi.models.sparse import sparse_forward

    delta = torch.zeros(1, 4, 8)
    delta[0, 1, 6] = 1.0
    torch.testing.assert_close(attention_centre(delta), torch.tensor([[6.5 / 8, 1.5 / 4]]))
    torch.testing.assert_close(attention_centre(torch.ones(2, 3, 5)), torch.full((2, 2), 0.5))
    vit = tiny_vit()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), AttentionMap(vit) as att:
        vit(x)
        cls = sparse_forward(vit, x, torch.arange(16).expand(2, 16), return_importance=True).importance
    torch.testing.assert_close(att.map, cls.view(2, 4, 4))
    cnn = _tiny_cnn()
    with torch.no_grad(), AttentionMap(cnn) as att:
        cnn(x)
        torch.testing.assert_close(att.map, cnn.forward_features(x).pow(2).mean(1))


def test_acq_pairs_conditions_and_its_losses_by_hand(tmp_path):
    from smi.generators import ACQGenerator
    from smi.generators.train import mode_seeking

    g = ACQGenerator(5, (3, 32, 32), latent_dim=6, width=8)
    z, y = torch.randn(6, 6), torch.tensor([0, 1, 2, 3, 4, 0])
    z2, y2 = g.training_batch(z, y)
    assert torch.equal(z2[3:, :2], z2[:3, :2]) and torch.equal(y2[3:], y2[:3]) and torch.equal(z2[:, 2:], z[:, 2:])
    c = g.condition(z2)
    assert ((c > 0) & (c < 1)).all() and torch.equal(c[3:], c[:3])
    x = torch.randn(6, 3, 4, 4)
    dz = (z2[:3, 2:] - z2[3:, 2:]).abs().mean(1)
    dx = (x[:3] - x[3:]).abs().mean((1, 2, 3))
    torch.testing.assert_close(mode_seeking(x, z2[:, 2:]), (dz / (dx + 1e-5)).mean())
    teacher = as_teacher(tiny_vit())
    train_generator(teacher, tmp_path / "gen", GeneratorConfig(kind="acq", epochs=1, steps_per_epoch=2, batch_size=8,
                                                               latent_dim=8, width=8), progress=False)
    row = json.loads((tmp_path / "gen" / "log.jsonl").read_text().splitlines()[0])
    assert row["train_centre"] >= 0 and row["train_seek"] > 0
    gen, meta = load_generator(tmp_path / "gen", teacher)
    assert isinstance(gen, ACQGenerator) and meta["generator"]["kind"] == "acq"


def test_causal_generator_separates_content_from_style_and_the_student_matches_across_styles(tmp_path):
    from smi.generators import CausalGenerator
    from smi.generators.train import pair_disagreement
    from smi.transfer import DistillConfig, Student, distill

    g = CausalGenerator(5, (3, 32, 32), latent_dim=6, width=8)
    z, y = torch.randn(6, 6), torch.tensor([0, 1, 2, 3, 4, 0])
    z2, y2 = g.training_batch(z, y)
    assert torch.equal(y2[3:], y2[:3]) and torch.equal(z2, z)  # same contents, their own styles
    torch.testing.assert_close(g.code(z2, y2), torch.cat([g.embed(y2), z2], 1))
    # the pair term by hand: teacher on one style against the student on the other
    t, s = torch.randn(6, 5), torch.randn(6, 5)

    def kl(a, b):
        p = a.softmax(1)
        return (p * (p.log() - b.log_softmax(1))).sum(1).mean()

    torch.testing.assert_close(pair_disagreement(t, s), 0.5 * (kl(t[:3], s[3:]) + kl(t[3:], s[:3])))
    torch.testing.assert_close(pair_disagreement(t), 0.5 * (kl(t[:3], t[3:]) + kl(t[3:], t[:3])))
    # a causal generator's batches are pairs, and the loop adds the pair term only then
    teacher = as_teacher(tiny_vit())
    train_generator(teacher, tmp_path / "gen", GeneratorConfig(kind="causal", epochs=1, steps_per_epoch=2,
                                                               batch_size=8, latent_dim=8, width=8), progress=False)
    assert "train_style" in json.loads((tmp_path / "gen" / "log.jsonl").read_text().splitlines()[0])
    images = GeneratorSource(str(tmp_path / "gen")).open(teacher)
    assert images.paired

    def student():
        torch.manual_seed(1)
        return Student(tiny_vit(embed_dim=16).train(), "vit_tiny_test", {}, "scratch", tokens=False)

    cfg = DistillConfig(epochs=1, batch_size=8, online_steps=2, style_pairs=1.0, augment=False)
    plain = DistillConfig(epochs=1, batch_size=8, online_steps=2, augment=False)
    with_pairs = distill(teacher, student(), GeneratorSource(str(tmp_path / "gen")), tmp_path / "a", cfg,
                         eval_data=None, progress=False)
    without = distill(teacher, student(), GeneratorSource(str(tmp_path / "gen")), tmp_path / "b", plain,
                      eval_data=None, progress=False)
    assert with_pairs.log[0]["loss"] > without.log[0]["loss"]  # the same first batch, plus a positive term
    with pytest.raises(SmiError, match="style pairs"):
        distill(teacher, student(), NoiseSource(), tmp_path / "c", cfg, eval_data=None, progress=False)
    assert not (tmp_path / "c").exists()


def test_overwriting_an_online_generator_run_removes_only_its_state(tmp_path):
    """--overwrite replaces an online-generator run: smi's state file goes, a user's file beside it stays."""
    from smi.generators import OnlineGeneratorSource
    from smi.transfer import DistillConfig, Student, distill

    teacher = as_teacher(tiny_vit())

    def student():
        torch.manual_seed(1)
        return Student(tiny_vit(embed_dim=16).train(), "vit_tiny_test", {}, "scratch", tokens=False)

    source = OnlineGeneratorSource(GeneratorConfig(batch_size=4, latent_dim=8, width=8), steps=2)
    cfg = DistillConfig(epochs=1, batch_size=4, online_steps=1)
    distill(teacher, student(), source, tmp_path / "kd", cfg, eval_data=None, progress=False)
    state = tmp_path / "kd" / "generator" / "state.safetensors"
    mine = tmp_path / "kd" / "generator" / "my_notes.txt"
    mine.write_text("mine")
    before = state.read_bytes()
    distill(teacher, student(), NoiseSource(), tmp_path / "kd", cfg, eval_data=None, progress=False, overwrite=True)
    assert not state.exists() and mine.read_text() == "mine"
    assert before  # it was there before the overwrite


def test_causal_style_seeking_keeps_the_noise_changing_the_image(tmp_path):
    """The pair term alone is met by a generator that ignores its noise; mode seeking between a class's two styles
    (``style_seek_weight``) must leave the two styles further apart than the same training without it."""
    from smi.generators.train import mode_seeking

    teacher = as_teacher(tiny_vit())
    gaps = {}
    for weight in (0.0, 1.0):
        cfg = GeneratorConfig(kind="causal", epochs=1, steps_per_epoch=100, batch_size=8, latent_dim=8, width=8,
                              style_weight=10.0, style_seek_weight=weight)
        train_generator(teacher, tmp_path / f"gen{weight}", cfg, progress=False)
        row = json.loads((tmp_path / f"gen{weight}" / "log.jsonl").read_text().splitlines()[0])
        assert ("train_seek" in row) == bool(weight)
        gen, _ = load_generator(tmp_path / f"gen{weight}", teacher)
        torch.manual_seed(0)
        z, y = gen.training_batch(torch.randn(64, 8), torch.arange(64) % 5)
        with torch.no_grad():
            x = gen(z, y)
            gaps[weight] = (x[:32] - x[32:]).abs().mean().item()
            if weight:  # the term the objective adds: MSGAN's ratio over these pairs, by hand
                dz = (z[:32] - z[32:]).abs().mean(1)
                torch.testing.assert_close(mode_seeking(x, z), (dz / ((x[:32] - x[32:]).abs().mean((1, 2, 3))
                                                                      + 1e-5)).mean())
    assert gaps[1.0] > 1.3 * gaps[0.0], gaps  # 1.04 against 0.64 here; with the sign flipped 0.08
    # recorded only when set, so that folders and cells made before the setting existed keep matching
    assert "style_seek_weight" not in GeneratorConfig(kind="causal").to_dict()
    assert GeneratorConfig(kind="causal", style_seek_weight=0.5).to_dict()["style_seek_weight"] == 0.5
    with pytest.raises(SmiError, match="only the causal generator"):
        GeneratorConfig(kind="gdfq", style_seek_weight=1.0)


def test_pixel_range_bounds_every_image_to_the_teachers_valid_pixels_and_survives_saving(tmp_path):
    """GDFQ's last BatchNorm puts pixels anywhere; --pixel-range maps tanh onto (0 - mean) / std .. (1 - mean) / std."""
    teacher = load_teacher("fmnist_resnet_tiny")
    lo, hi = (0 - teacher.mean[0]) / teacher.std[0], (1 - teacher.mean[0]) / teacher.std[0]  # by hand
    z, y = torch.randn(64, 16, generator=torch.Generator().manual_seed(0)) * 3, torch.arange(64) % 10
    plain = build_generator(teacher, GeneratorConfig(latent_dim=16, width=16)).train()
    assert plain(z, y).min() < lo - 0.1  # the default (unit variance over the batch) is unbounded
    for kind in ("gdfq", "qimera", "acq", "causal"):
        cfg = GeneratorConfig(kind=kind, latent_dim=16, width=16, pixel_range=True)
        gen = build_generator(teacher, cfg).train()
        x = gen(*gen.training_batch(z[:, :gen.latent_dim] if kind != "qimera" else torch.randn(64, gen.latent_dim),
                                    y))
        assert lo - 1e-5 <= x.min() and x.max() <= hi + 1e-5 and x.max() - x.min() > 0.1 * (hi - lo), kind
        assert cfg.to_dict()["pixel_range"] is True
        assert "pixel_range" not in GeneratorConfig(kind=kind).to_dict()  # old run folders and cells keep matching
    # trained and saved, it is rebuilt bounded, with the same images
    cfg = GeneratorConfig(epochs=1, steps_per_epoch=2, batch_size=8, latent_dim=16, width=16, pixel_range=True)
    train_generator(teacher, tmp_path / "gen", cfg, progress=False)
    meta = json.loads((tmp_path / "gen" / "generator.json").read_text())
    assert meta["generator"]["pixel_range"] == [[pytest.approx(lo)], [pytest.approx(hi)]]
    assert "pixel_range" not in build_generator(teacher, GeneratorConfig(latent_dim=16, width=16)).config()
    loaded, _ = load_generator(tmp_path / "gen", teacher)
    images = loaded(z, y)
    assert lo - 1e-5 <= images.min() and images.max() <= hi + 1e-5
    assert main(["train-generator", "--model", "fmnist_resnet_tiny", "--pixel-range", "--epochs", "1",
                 "--steps-per-epoch", "1", "--batch-size", "4", "--width", "8", "--out", str(tmp_path / "cli")]) == 0
    assert json.loads((tmp_path / "cli" / "generator.json").read_text())["train_config"]["pixel_range"] is True


def test_an_ensemble_of_generators_splits_each_draw_among_them(tmp_path, capsys):
    teacher = load_teacher("fmnist_resnet_tiny")
    folders = []
    for name, kind, seed in (("a", "gdfq", 0), ("b", "gdfq", 1), ("pairs", "causal", 0), ("pairs2", "causal", 1)):
        train_generator(teacher, tmp_path / name, GeneratorConfig(kind=kind, epochs=1, steps_per_epoch=2, batch_size=4,
                                                                  latent_dim=8, width=8, seed=seed), progress=False)
        folders.append(str(tmp_path / name))
    a, b, pairs, pairs2 = folders
    images = GeneratorSource(a, (b,)).open(teacher)
    x, _ = images.take(5, torch.Generator().manual_seed(3))
    # by hand: the first generator draws 3 (noise, then balanced labels), the second 2 from the same random stream
    g, expected = torch.Generator().manual_seed(3), []
    for folder, n in ((a, 3), (b, 2)):
        gen, _ = load_generator(folder, teacher)
        z = torch.randn(n, 8, generator=g)
        expected.append(gen(z, sample_targets(n, 10, g)))
    torch.testing.assert_close(x, torch.cat(expected), rtol=0, atol=0)
    metas = [json.loads((tmp_path / n / "generator.json").read_text()) for n in ("a", "b")]
    assert images.seconds == pytest.approx(metas[0]["train_s"] + metas[1]["train_s"])
    assert isinstance(images.identity["weights"], list) and len(images.identity["weights"]) == 2
    assert isinstance(GeneratorSource(a).open(teacher).identity["weights"], str)  # one generator: as before
    with pytest.raises(SmiError, match="twice"):
        GeneratorSource(a, (str(tmp_path / "b" / ".." / "a"),)).open(teacher)
    with pytest.raises(SmiError, match="mixes paired"):
        GeneratorSource(a, (pairs,)).open(teacher)
    # paired generators together: each draws whole pairs, laid out as first halves then second halves
    both = GeneratorSource(pairs, (pairs2,)).open(teacher)
    assert both.paired
    x, _ = both.take(9, torch.Generator().manual_seed(4))  # 4 pairs (2 + 2) and one unpaired image
    g, halves = torch.Generator().manual_seed(4), []
    for folder in (pairs, pairs2):
        gen, _ = load_generator(folder, teacher)
        z, y = gen.training_batch(torch.randn(4, 8, generator=g), sample_targets(4, 10, g))
        halves.append(gen(z, y))
    gen, _ = load_generator(pairs, teacher)
    z = torch.randn(1, 8, generator=g)
    odd = gen(z, sample_targets(1, 10, g))
    torch.testing.assert_close(x, torch.cat([halves[0][:2], halves[1][:2], halves[0][2:], halves[1][2:], odd]),
                               rtol=0, atol=0)
    # the CLI: --generator takes several folders; a bad ensemble is one error line, exit 2, nothing written
    base = ["distill", "--teacher", "fmnist_resnet_tiny", "--student", "fmnist_vit_mini", "--epochs", "1",
            "--online-steps", "2", "--batch-size", "6", "--eval-images", "50", "--json"]
    assert main(base + ["--generator", a, b, "--out", str(tmp_path / "kd")]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["epochs"] == 1
    assert main(base + ["--generator", a, pairs, "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("smi: error:") and "mixes paired" in err and "\n" not in err, err
    assert not (tmp_path / "bad").exists()
