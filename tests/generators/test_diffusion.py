"""GenQ / mixup-class prompting: prompts, mixing weights, embedding mixing, and pools from a tiny local pipeline."""

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from smi.cli import main
from smi.data.pool import load_pool
from smi.errors import SmiError
from smi.generators import diffusion
from smi.generators.diffusion import GenQConfig, class_prompt, mix_plan, to_teacher_input
from smi.models.loading import load_teacher
from tests.helpers import write_tiny_pipeline

pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> Path:
    return write_tiny_pipeline(tmp_path_factory.mktemp("diffusion"))


def test_prompts_name_the_teachers_classes():
    assert class_prompt(["shirt"]) == "a photo of a shirt"
    assert class_prompt(["shirt", "coat", "bag"]) == "a photo of a shirt and a coat and a bag"
    assert class_prompt(["bag"], "a sketch of a {}, centred") == "a sketch of a bag, centred"
    with pytest.raises(SmiError, match="must hold"):
        GenQConfig(template="no slot")


@pytest.mark.parametrize("fuse", [False, True])
def test_mixing_weights_are_a_distribution_over_the_planned_class_and_others(fuse):
    targets = torch.arange(10).repeat(20)
    cfg = GenQConfig(mix=True, p_mix=0.5, mix_k=3, fuse=fuse)
    classes, weights = mix_plan(targets, 10, cfg, torch.Generator().manual_seed(0))
    assert classes.shape == weights.shape == (200, 3)
    torch.testing.assert_close(weights.sum(1), torch.ones(200))
    assert torch.equal(classes[:, 0], targets)
    mixed = weights[:, 0] < 1
    assert 70 < int(mixed.sum()) < 130  # p_mix = 0.5
    for row in classes[mixed]:
        assert len(set(row.tolist())) == 3  # the planned class and two others, no repeats
    if fuse:
        torch.testing.assert_close(weights[mixed], torch.full((int(mixed.sum()), 3), 1 / 3))
    assert (weights[~mixed, 1:] == 0).all()
    single = mix_plan(targets, 10, GenQConfig(), torch.Generator())
    assert single[0].shape == (200, 1) and (single[1] == 1).all()


def test_mixed_images_are_drawn_from_the_weighted_sum_of_their_classes_text_embeddings(monkeypatch):
    table = {f"a photo of a {n}": torch.full((1, 2, 3), float(i + 1)) for i, n in enumerate("abc")}
    seen = {}

    class Pipe:
        unet = SimpleNamespace(config=SimpleNamespace(sample_size=4))
        vae_scale_factor = 2

        def encode_prompt(self, prompts, device, n, cfg):
            return torch.cat([table.get(p, torch.zeros(1, 2, 3)) for p in prompts]), None

        def __call__(self, prompt_embeds, **kw):
            seen["embeds"], seen["kw"] = prompt_embeds, kw
            return SimpleNamespace(images=torch.rand(prompt_embeds.shape[0], 3, 8, 8))

    teacher = load_teacher("fmnist_vit_tiny")
    names = ["a", "b", "c"]
    classes, weights = torch.tensor([[0, 2], [1, 0]]), torch.tensor([[0.25, 0.75], [1.0, 0.0]])
    x = diffusion._generate(Pipe(), teacher, names, classes, weights, [1, 2], GenQConfig(mix=True), "cpu")
    torch.testing.assert_close(seen["embeds"][:, 0, 0], torch.tensor([0.25 * 1 + 0.75 * 3, 2.0]))
    assert x.shape == (2, 1, 28, 28) and seen["kw"]["height"] == 8
    diffusion._generate(Pipe(), teacher, names, classes, weights, [1, 2], GenQConfig(mix=True, fuse=True), "cpu")
    assert seen["embeds"][:, 0, 0].tolist() == [0.0, 2.0]  # "a photo of a a and a c" is its own prompt


def test_generated_images_become_the_teachers_normalized_grey_input():
    teacher = load_teacher("fmnist_vit_tiny")
    white, black = torch.ones(1, 3, 64, 64), torch.zeros(1, 3, 64, 64)
    x = to_teacher_input(torch.cat([white, black]), teacher)
    mean, std = teacher.mean[0], teacher.std[0]
    assert x.shape == (2, 1, 28, 28)
    torch.testing.assert_close(x[0], torch.full((1, 28, 28), (1 - mean) / std))
    torch.testing.assert_close(x[1], torch.full((1, 28, 28), -mean / std))


def test_genq_mix_writes_a_pool_with_soft_targets_that_resumes_and_verifies(pipeline, tmp_path, capsys):
    args = ["invert", "--model", "fmnist_vit_tiny", "--method", "genq-mix", "--diffusion-model", str(pipeline),
            "--num-images", "4", "--batch-size", "2", "--option", "genq_steps=2", "--out", str(tmp_path / "pool")]
    assert main(args) == 0
    pool = load_pool(tmp_path / "pool")
    from safetensors.torch import load_file

    soft = torch.cat([load_file(str(f))["soft"] for f in sorted((tmp_path / "pool").glob("shard-*.safetensors"))])
    torch.testing.assert_close(soft.sum(1), torch.ones(4))
    assert ((soft > 0).sum(1) == 2).all() and torch.equal(pool.labels, soft.argmax(1))  # p_mix = 1, k = 2
    assert pool.masks.sum(1).tolist() == [11] * 4  # the default schedule: 49 -> 34 -> 23 -> 16 -> 11 patches
    assert pool.manifest["identity"]["method"] == "genq-mix"
    assert main(["pool", "verify", str(tmp_path / "pool")]) == 0
    before = json.loads((tmp_path / "pool" / "manifest.json").read_text())["shards"]
    assert main(args) == 0  # resumes: nothing left to draw, every shard kept as it was
    assert json.loads((tmp_path / "pool" / "manifest.json").read_text())["shards"] == before
    assert main(["invert", "--model", "fmnist_vit_tiny", "--method", "genq", "--diffusion-model", str(pipeline),
                 "--num-images", "2", "--batch-size", "2", "--sparsity", "dense", "--option", "genq_steps=1",
                 "--out", str(tmp_path / "single")]) == 0
    single = load_pool(tmp_path / "single")
    assert single.masks.all() and torch.isfinite(single.images).all()


@pytest.mark.parametrize("case", ["not-a-pipeline", "no-diffusers", "no-folder-flag", "other-method", "pixel-flag",
                                  "segmenter", "unmet-confidence"])
def test_bad_diffusion_input_is_one_error_line_and_writes_nothing(case, pipeline, tmp_path, capsys, monkeypatch):
    out = tmp_path / "pool"
    base = ["invert", "--model", "fmnist_vit_tiny", "--method", "genq", "--diffusion-model", str(pipeline),
            "--num-images", "2", "--batch-size", "2", "--option", "genq_steps=1", "--out", str(out)]
    bad = {"not-a-pipeline": (["--diffusion-model", str(tmp_path)], "not a diffusers pipeline folder"),
           "no-diffusers": ([], "needs the diffusers and transformers packages"),
           "no-folder-flag": (["--diffusion-model", None], "give its folder with --diffusion-model"),
           "other-method": (["--method", "deepinversion"], "read by the diffusion methods"),
           "pixel-flag": (["--iterations", "5"], "--iterations shapes pixel optimization"),
           "segmenter": ([], "needs a classifier"),
           "unmet-confidence": (["--option", "genq_min_confidence=0.999999", "--option", "genq_max_tries=1"],
                                "still fall below genq_min_confidence")}
    extra, message = bad[case]
    args = list(base)
    for flag, value in zip(extra[::2], extra[1::2], strict=True):
        i = args.index(flag) if flag in args and flag != "--option" else None
        if value is None:
            del args[i:i + 2]
        elif i is None:
            args += [flag, value]
        else:
            args[i + 1] = value
    if case == "no-diffusers":
        monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers raises ImportError
    if case == "segmenter":
        import timm

        from smi.models.loading import save_teacher

        small = {"embed_dim": 32, "depth": 1, "num_heads": 1}
        seg = save_teacher(timm.create_model("fmnist_scene_segmenter", **small), tmp_path / "seg.safetensors",
                           arch="fmnist_scene_segmenter", model_kwargs=small, class_names=["background", "object"])
        args[args.index("--model") + 1] = str(seg)
    code = main(args)
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("smi: error:") and "\n" not in err and message in err, err
    if case != "unmet-confidence":  # refused before any folder exists
        assert not out.exists()
    else:  # the folder it made holds no shard
        assert not list(out.glob("shard-*"))
