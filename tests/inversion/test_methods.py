"""Every method runs dense and sparse through the same engine, from the CLI; CNN teachers get the BN prior."""

import pytest
import timm
import torch

from smi.cli import main
from smi.data.pool import load_pool
from smi.errors import SmiError
from smi.inversion import CURRICULA, LABELS, METHODS, TERMS, InversionConfig, SparsityConfig, invert
from smi.inversion.augment import Jitter
from smi.inversion.recipe import Recipe, active_terms
from smi.inversion.terms import Step
from smi.models.sparse import sparse_forward
from tests.conftest import as_teacher, tiny_vit
from tests.helpers import write_tiny_checkpoint

FAST = ["--num-images", "4", "--batch-size", "2", "--iterations", "6", "--no-grid"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return str(write_tiny_checkpoint(tmp_path_factory.mktemp("m")))


@pytest.fixture(scope="module")
def seg_ckpt(tmp_path_factory):
    from smi.models.loading import save_teacher

    torch.manual_seed(0)
    small = {"embed_dim": 32, "depth": 1, "num_heads": 1}
    model = timm.create_model("fmnist_scene_segmenter", **small)
    return str(save_teacher(model, tmp_path_factory.mktemp("s") / "seg.safetensors", arch="fmnist_scene_segmenter",
                            model_kwargs=small))


@pytest.mark.parametrize("sparsity", ["dense", "2:0.5,4:0.5"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_runs_dense_and_sparse_from_the_cli(method, sparsity, ckpt, seg_ckpt, tmp_path, capsys):
    out = tmp_path / "pool"
    if METHODS.get(method).task == "diffusion":  # sampled from a local pipeline: needs its folder
        assert main(["invert", "--model", ckpt, "--method", method, *FAST, "--out", str(out)]) == 2
        assert "--diffusion-model" in capsys.readouterr().err and not out.exists()
        pytest.importorskip("diffusers")
        from tests.helpers import write_tiny_pipeline

        pipe = write_tiny_pipeline(tmp_path / "diffusion")
        assert main(["invert", "--model", ckpt, "--method", method, "--sparsity", sparsity, "--diffusion-model",
                     str(pipe), "--option", "genq_steps=1", "--num-images", "4", "--batch-size", "2", "--no-grid",
                     "--out", str(out)]) == 0
        pool = load_pool(out)
        assert len(pool) == 4 and torch.isfinite(pool.images).all()
        assert pool.masks.sum(1).tolist() == ([16] * 4 if sparsity == "dense" else [4] * 4)
        return
    if METHODS.get(method).task == "segmentation":  # a classifier is refused; a segmenter (196 patches) runs
        assert main(["invert", "--model", ckpt, "--method", method, "--sparsity", sparsity, *FAST,
                     "--out", str(out)]) == 2
        assert "synthesizes for a segmenter" in capsys.readouterr().err and not out.exists()
        assert main(["invert", "--model", seg_ckpt, "--method", method, "--sparsity", sparsity, *FAST,
                     "--out", str(out)]) == 0
        pool = load_pool(out)
        assert pool.maps is not None and pool.maps.shape == (4, 56, 56) and torch.isfinite(pool.images).all()
        assert pool.masks.sum(1).tolist() == ([196] * 4 if sparsity == "dense" else [49] * 4)
        return
    if any(TERMS.get(n).needs_student for n in InversionConfig.for_method(method).terms):
        # synthesizes against a student: refused on its own (nothing written), run inside online training
        assert main(["invert", "--model", ckpt, "--method", method, "--sparsity", sparsity, *FAST,
                     "--out", str(out)]) == 2
        assert "needs a student" in capsys.readouterr().err and not out.exists()
        assert main(["distill", "--teacher", ckpt, "--online", "--method", method, "--sparsity", sparsity,
                     "--iterations", "6", "--synth-batch-size", "2", "--epochs", "2", "--online-steps", "1",
                     "--batch-size", "2", "--eval-data", "none", "--out", str(tmp_path / "kd")]) == 0
        pool = load_pool(tmp_path / "kd" / "pool")
        assert len(pool) == 4 and torch.isfinite(pool.images).all()
        return
    assert main(["invert", "--model", ckpt, "--method", method, "--sparsity", sparsity, *FAST, "--out", str(out)]) == 0
    pool = load_pool(out)
    assert len(pool) == 4 and torch.isfinite(pool.images).all()
    assert pool.manifest["identity"]["method"] == method
    assert pool.masks.sum(1).tolist() == ([16] * 4 if sparsity == "dense" else [4] * 4)


def test_method_defaults_and_overrides():
    psaq = InversionConfig.for_method("psaq")
    assert (psaq.lr, psaq.betas, psaq.iterations, psaq.rounds) == (0.2, (0.5, 0.9), 1000, (15 / 224, 30 / 224))
    assert psaq.terms == {"psaq": 1.0, "tv_target": 0.05} and psaq.lr_schedule == "cosine"
    assert InversionConfig.for_method("psaq", lr=0.1).lr == 0.1
    with pytest.raises(SmiError, match="unknown loss term"):
        InversionConfig(terms={"magic": 1.0})
    with pytest.raises(SmiError, match="unknown option"):
        InversionConfig(options={"magic": 1.0})


def test_psaq_term_pushes_similarity_entropy_up():
    """A few steps with only the PSAQ term (no CE, no TV) raise the summed entropy it measures."""
    teacher = as_teacher(tiny_vit())
    cfg = InversionConfig(iterations=30, batch_size=2, sparsity=SparsityConfig(()), ce_weight=0.0, tv_l2=0.0,
                          jitter=0.0, flip=False, lr=0.05, terms={"psaq": 1.0})
    losses = []
    invert(teacher, cfg, torch.tensor([0, 1]), callback=lambda s: losses.append(s.loss))
    assert losses[-1] < losses[0]  # loss = -entropy


def test_sardfq_stores_soft_labels_in_the_pool(ckpt, tmp_path):
    assert main(["invert", "--model", ckpt, "--method", "sardfq", *FAST, "--sparsity", "dense",
                 "--out", str(tmp_path / "p")]) == 0
    from safetensors.torch import load_file

    shard = load_file(str(next((tmp_path / "p").glob("shard-*"))))
    assert "soft" in shard and torch.allclose(shard["soft"].sum(1), torch.ones(2))


def _tiny_cnn():
    """A resnet10t whose BN running statistics are those of images 0.3 + 0.5 N(0, 1): a reachable target."""
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=5, in_chans=3)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # cumulative average
    with torch.no_grad():
        model.train()(0.3 + 0.5 * torch.randn(64, 3, 32, 32))
    return model.eval()


def test_cnn_teachers_get_the_bn_prior_and_it_decreases():
    model = _tiny_cnn()
    teacher = as_teacher(model, "cnn")
    teacher.input_size = (3, 32, 32)
    cfg = InversionConfig(iterations=40, batch_size=4, sparsity=SparsityConfig(()), ce_weight=0.0, tv_l2=0.0,
                          bn_weight=1.0, jitter=0.0, flip=False, lr=0.05)
    assert active_terms(cfg, model) == {"bn": 1.0}
    assert active_terms(InversionConfig(bn_weight=0.0), model) == {}
    losses = []
    invert(teacher, cfg, torch.arange(4), callback=lambda s: losses.append(s.loss))
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("method", ["psaq", "sardfq", "mimiq"])
def test_attention_methods_refuse_a_cnn(method):
    teacher = as_teacher(_tiny_cnn(), "cnn")
    teacher.input_size = (3, 32, 32)
    cfg = InversionConfig.for_method(method, iterations=4, batch_size=2, sparsity=SparsityConfig(()),
                                     jitter_unit="pixel")
    with pytest.raises(SmiError, match="reads attention maps"):
        invert(teacher, cfg, torch.arange(2))


def test_sparsity_on_a_cnn_is_a_clear_error():
    teacher = as_teacher(_tiny_cnn(), "cnn")
    teacher.input_size = (3, 32, 32)
    with pytest.raises(SmiError, match="use --sparsity dense"):
        invert(teacher, InversionConfig(iterations=6, batch_size=2, sparsity=SparsityConfig.parse("2:0.5")),
               torch.arange(2))


def _one_step(cfg: InversionConfig, model: torch.nn.Module, sparse: bool, student: torch.nn.Module | None = None):
    """The loss and image gradient of one step through the recipe (no jitter), dense or on half the patches."""
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3)).requires_grad_()
    keep = torch.tensor([[0, 2, 5, 7, 8, 10, 13, 15], [1, 2, 4, 6, 9, 11, 12, 14]]) if sparse else None

    def fwd(v, k):
        return model(v) if k is None else sparse_forward(model, v, k).logits

    if student is None:  # for terms that synthesize against a student
        student = tiny_vit(embed_dim=16).requires_grad_(False)
    recipe = Recipe(cfg, model, torch.tensor([1, 3]), 5, torch.Generator().manual_seed(4), grid=(4, 4), patch=8,
                    student=student, student_tokens=True)
    with recipe:
        logits, captured = recipe.captures.record(lambda: fwd(x, keep))
        step = Step(recipe.ctx, x, x, Jitter(0, 0, False), 1, 8, keep, None, logits, captured,
                    lambda v, k: recipe.captures.record(lambda: fwd(v, k)))
        loss = recipe.loss(step)
    return loss.detach(), torch.autograd.grad(loss, x)[0]


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("name", TERMS.names())
def test_every_term_changes_the_loss_and_its_gradient(name, sparse):
    """Each registered term, added at weight 1 to plain CE + TV, changes both the loss and the image gradient."""
    needs_bn = "bn_inputs" in TERMS.get(name).captures
    if needs_bn and sparse:
        pytest.skip("BatchNorm teachers are CNNs, which invert dense")
    if needs_bn:
        model = _tiny_cnn()
        model.requires_grad_(False)
    else:
        model = tiny_vit().requires_grad_(False)
    base = InversionConfig(iterations=10, batch_size=2, bn_weight=0.0, sparsity=SparsityConfig(()))
    with_term = InversionConfig(**{**base.to_dict(), "terms": {name: 1.0}})
    # a term that reads the student's BatchNorm layers synthesizes against a CNN student
    student = _tiny_cnn().requires_grad_(False) if "bn_inputs" in TERMS.get(name).student_captures else None
    loss0, grad0 = _one_step(base, model, sparse, student)
    loss1, grad1 = _one_step(with_term, model, sparse, student)
    assert torch.isfinite(loss1) and torch.isfinite(grad1).all()
    assert not torch.isclose(loss0, loss1, rtol=1e-6, atol=0), f"{name} leaves the loss unchanged"
    assert not torch.allclose(grad0, grad1, rtol=1e-5, atol=0), f"{name} leaves the gradient unchanged"


@pytest.mark.parametrize("method", METHODS.names())
def test_every_method_changes_what_deepinversion_optimizes(method):
    """A method's preset is a real change: its config differs from deepinversion's, and on the tiny ViT its
    first step's loss or labels differ too (every name in the registry, nothing hard-coded)."""
    if method == "deepinversion" or METHODS.get(method).task == "diffusion":  # diffusion: sampled, not optimized
        return
    model = tiny_vit().requires_grad_(False)
    cfg = InversionConfig.for_method(method, iterations=1000, batch_size=2)
    ref = InversionConfig(iterations=1000, batch_size=2)
    assert cfg.to_dict() != {**ref.to_dict(), "method": method}
    loss0, grad0 = _one_step(ref, model, False)
    loss1, grad1 = _one_step(cfg, model, False)
    recipe = Recipe(cfg, model, torch.tensor([1, 3]), 5, torch.Generator().manual_seed(4), grid=(4, 4), patch=8,
                    difficulty=1.0)
    changed = not torch.isclose(loss0, loss1) or recipe.labels.soft is not None or cfg.lr != ref.lr
    assert changed


@pytest.mark.parametrize("name", LABELS.names())
def test_every_label_sampler_keeps_the_planned_class_counts(name):
    targets = torch.arange(5).repeat(20)
    cfg = InversionConfig(labels=name)
    labels = LABELS.get(name)(targets, 5, torch.Generator().manual_seed(0), cfg.option)
    assert labels.hard.shape == targets.shape
    if labels.soft is not None:
        assert torch.allclose(labels.soft.sum(1), torch.ones(100)) and (labels.soft >= 0).all()
    if name == "hard":
        assert labels.soft is None and torch.equal(labels.hard, targets)


@pytest.mark.parametrize("name", CURRICULA.names())
def test_every_curriculum_leaves_the_easiest_batch_alone(name):
    targets = torch.tensor([0, 1, 2])
    base = LABELS.get("hard")(targets, 5, torch.Generator(), InversionConfig().option)
    out = CURRICULA.get(name)(base, 5, 0.0, torch.Generator().manual_seed(0), InversionConfig().option)
    target = torch.nn.functional.one_hot(targets, 5).float()
    assert torch.equal(out.hard, targets)
    assert out.soft is None or torch.allclose(out.soft, target)


def test_registered_options_are_what_the_config_accepts():
    from smi.inversion.config import known_options

    opts = known_options()
    assert {"kde_bandwidth", "p_mix", "e2h_min_confidence", "bn_first_weight"} <= set(opts)
    for name in TERMS.names():
        assert set(TERMS.options(name)) <= set(opts)
    with pytest.raises(SmiError, match="unknown option"):
        InversionConfig(options={"magic": 1.0})
    with pytest.raises(SmiError, match="unknown label sampler 'hardd' .did you mean hard"):
        InversionConfig(labels="hardd")


def test_pool_methods_are_those_that_synthesize_from_the_teacher_alone():
    from smi.inversion.methods import METHODS, pool_methods
    from smi.inversion.terms import TERMS

    names = pool_methods()
    assert "deepinversion" in names and "psaq" in names
    assert "psaq-v2" not in names  # its adversarial term needs a student (online only)
    for name, method in METHODS.items():
        offline = method.task is None and not any(TERMS.get(t).needs_student for t in method.defaults.get("terms", {}))
        assert (name in names) == offline, name
