"""Every method runs dense and sparse through the same engine, from the CLI; CNN teachers get the BN prior."""

import pytest
import timm
import torch

from smi.cli import main
from smi.data.pool import load_pool
from smi.errors import SmiError
from smi.inversion import InversionConfig, SparsityConfig, invert
from smi.inversion.config import METHODS
from smi.inversion.recipe import Recipe
from tests.conftest import as_teacher, tiny_vit
from tests.helpers import write_tiny_checkpoint

FAST = ["--num-images", "4", "--batch-size", "2", "--iterations", "6", "--no-grid"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return str(write_tiny_checkpoint(tmp_path_factory.mktemp("m")))


@pytest.mark.parametrize("sparsity", ["dense", "2:0.5,4:0.5"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_runs_dense_and_sparse_from_the_cli(method, sparsity, ckpt, tmp_path):
    out = tmp_path / "pool"
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
    recipe = Recipe(cfg, model, torch.arange(4), 5, torch.Generator())
    assert "bn" in recipe.weights and len(recipe.bns) > 5
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
