"""Every subcommand, fed bad input: one line naming the problem, a non-zero exit, no traceback."""

import json
import os

import pytest

from smi.cli import main
from tests.helpers import write_image_folder, write_tiny_checkpoint

INV = ["--num-images", "4", "--batch-size", "2", "--iterations", "6", "--sparsity", "2:0.5", "--no-grid"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny teacher, another teacher, a pool of the first, and broken files of every kind."""
    d = tmp_path_factory.mktemp("hostile")
    w = {"dir": d, "ckpt": str(write_tiny_checkpoint(d, "tiny")), "other": str(write_tiny_checkpoint(d, "other", 1))}
    assert main(["invert", "--model", w["ckpt"], *INV, "--out", str(d / "pool")]) == 0
    w["pool"] = str(d / "pool")
    assert main(["quantize", "--model", w["ckpt"], "--calib", "noise", "--calib-images", "4", "--w-bits", "4",
                 "--a-bits", "4", "--out", str(d / "quant")]) == 0
    assert main(["quantize", "--model", w["other"], "--calib", "noise", "--calib-images", "4", "--out",
                 str(d / "quant_other")]) == 0
    (d / "empty.safetensors").write_bytes(b"")
    (d / "empty.json").write_text((d / "tiny.json").read_text())
    data = (d / "tiny.safetensors").read_bytes()
    (d / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    (d / "trunc.json").write_text((d / "tiny.json").read_text())
    (d / "neghead.safetensors").write_bytes(data)  # weights load, yet no image passes: num_heads = -1
    (d / "neghead.json").write_text(json.dumps({**(meta := json.loads((d / "tiny.json").read_text())),
                                                "model_kwargs": {**meta["model_kwargs"], "num_heads": -1}}))
    (d / "badjson").mkdir()
    (d / "badjson" / "manifest.json").write_text("{ not json")
    (d / "emptypool").mkdir()
    (d / "emptypool" / "manifest.json").write_text("")
    (d / "truncpool").mkdir()
    for f in (d / "pool").iterdir():
        (d / "truncpool" / f.name).write_bytes(f.read_bytes())
    shard = next((d / "truncpool").glob("shard-*"))
    shard.write_bytes(shard.read_bytes()[:64])
    (d / "afile.txt").write_text("hello")
    mine = d / "users_folder"  # a folder a user owns, with names smi also writes
    mine.mkdir()
    for name in ("config.json", "grid.png", "shard-00000.safetensors", "quantized.json", "notes.txt"):
        (mine / name).write_text("the user's own")
    write_image_folder(d / "images", classes=5, per_class=2, size=(32, 32), split=True)
    write_image_folder(d / "badimages", classes=5, per_class=2, size=(32, 32), split=True)
    (d / "badimages" / "val" / "class_3" / "0.png").write_bytes(b"\x89PNG broken")
    for name, edit in (("nullpool", lambda m: m["shards"][0].update(sha256=None)),
                       ("nofieldpool", lambda m: m["shards"][0].pop("file")),
                       ("countpool", lambda m: m.update(num_images_done=400)),
                       ("escapepool", lambda m: m["shards"][0].update(file="../afile.txt")),
                       ("intconfigpool", lambda m: m["identity"].update(config=2**64)),
                       ("keptpool", lambda m: m["shards"][-1].update(kept="")),
                       ("noteacherpool", lambda m: m["identity"].update(tEacher=m["identity"].pop("teacher")))):
        (d / name).mkdir()
        for f in (d / "pool").iterdir():
            (d / name / f.name).write_bytes(f.read_bytes())
        manifest = json.loads((d / name / "manifest.json").read_text())
        edit(manifest)
        (d / name / "manifest.json").write_text(json.dumps(manifest))
    import timm

    from smi.models.loading import save_teacher

    headless = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=32, patch_size=8, embed_dim=32,
                                 depth=1, num_heads=2)
    cnn = timm.create_model("resnet10t", num_classes=5)
    w["cnn"] = str(save_teacher(cnn.eval(), d / "cnn.safetensors", arch="resnet10t", model_kwargs={}))
    w["headless"] = str(save_teacher(headless, d / "headless.safetensors", arch="vit_tiny_patch16_224",
                                     model_kwargs=dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2)))
    return w


def _cases():
    # (argv built from the world dict, expected fragment of the message)
    return {
        # missing paths
        "invert: missing model": (lambda w: ["invert", "--model", "/nope/x.safetensors", *INV, "--out", "{d}/o"],
                                  "not found"),
        "invert: --recompute always on a CNN": (
            lambda w: ["invert", "--model", w["cnn"], *INV, "--sparsity", "dense", "--recompute", "always",
                       "--out", "{d}/o"], "'always' recomputes the blocks of a timm ViT"),
        "invert: --recompute with a generator": (
            lambda w: ["invert", "--model", w["ckpt"], "--generator", "{d}", "--recompute", "never", "--out", "{d}/o"],
            "--recompute shapes pixel optimization"),
        "invert: --precision with a generator": (
            lambda w: ["invert", "--model", w["ckpt"], "--generator", "{d}", "--precision", "bf16", "--out", "{d}/o"],
            "--precision shapes pixel optimization"),
        "invert: --precision fp16": (
            lambda w: ["invert", "--model", w["ckpt"], *INV, "--precision", "fp16", "--out", "{d}/o"],
            "invalid choice: 'fp16'"),
        "quantize: a folder that holds no generator": (
            lambda w: ["quantize", "--model", w["ckpt"], "--calib", "generator:{d}", "--out", "{d}/q"],
            "holds no trained generator"),
        "train-generator: batch of one": (lambda w: ["train-generator", "--model", w["ckpt"], "--batch-size", "1",
                                                     "--out", "{d}/o"], "--batch-size"),
        "train-generator: unknown kind": (lambda w: ["train-generator", "--model", w["ckpt"], "--kind", "gdfqq",
                                                     "--out", "{d}/o"], "unknown generator 'gdfqq'"),
        "train-generator: superposition above one": (
            lambda w: ["train-generator", "--model", w["ckpt"], "--superpose-prob", "1.5", "--out", "{d}/o"],
            "--superpose-prob"),
        "train-generator: texq without its pool": (lambda w: ["train-generator", "--model", w["ckpt"], "--kind",
                                                              "texq", "--out", "{d}/o"], "texq needs a pool"),
        "distill: style pairs from noise": (lambda w: ["distill", "--teacher", w["ckpt"], "--noise", "--style-pairs",
                                                       "1", "--out", "{d}/o"], "style pairs"),
        "distill: one generator twice in an ensemble": (
            lambda w: ["distill", "--teacher", w["ckpt"], "--generator", "{d}", "{d}/", "--out", "{d}/o"],
            "names one generator twice"),
        "distill: warm start from a folder without a generator": (
            lambda w: ["distill", "--teacher", w["ckpt"], "--online-generator", "gdfq", "--generator-init", "{d}",
                       "--out", "{d}/o"], "holds no trained generator"),
        "train-generator: negative BN weight": (lambda w: ["train-generator", "--model", w["ckpt"], "--bn-weight",
                                                           "-1", "--out", "{d}/o"], "--bn-weight"),
        "quantize: missing pool": (lambda w: ["quantize", "--model", w["ckpt"], "--calib", "/nope/pool",
                                              "--out", "{d}/q"], "does not exist"),
        "eval: missing quantized": (lambda w: ["eval", "--model", w["ckpt"], "--quantized", "/nope/q"], "/nope/q"),
        "distill: missing pool": (lambda w: ["distill", "--teacher", w["ckpt"], "--pool", "/nope/p",
                                             "--out", "{d}/k"], "does not exist"),
        "pool info: missing": (lambda w: ["pool", "info", "/nope/p"], "does not exist"),
        "pool verify: missing": (lambda w: ["pool", "verify", "/nope/p"], "does not exist"),
        # a folder where a file is expected, a file where a folder is expected
        "invert: model is a folder": (lambda w: ["invert", "--model", "{d}/pool", *INV, "--out", "{d}/o"],
                                      "is a folder"),
        "invert: out is a file": (lambda w: ["invert", "--model", w["ckpt"], *INV, "--out", "{d}/afile.txt"],
                                  "is a file"),
        "pool info: a file": (lambda w: ["pool", "info", "{d}/afile.txt"], "is a file"),
        "distill: out is a file": (lambda w: ["distill", "--teacher", w["ckpt"], "--pool", w["pool"],
                                              "--out", "{d}/afile.txt", "--eval-data", "none"], "is a file"),
        # empty and truncated files
        "eval: empty weights": (lambda w: ["eval", "--model", "{d}/empty.safetensors"], "unreadable"),
        "invert: truncated weights": (lambda w: ["invert", "--model", "{d}/trunc.safetensors", *INV,
                                                 "--out", "{d}/o"], "unreadable"),
        "pool info: empty manifest": (lambda w: ["pool", "info", "{d}/emptypool"], "not valid JSON"),
        "pool info: wrong JSON": (lambda w: ["pool", "info", "{d}/badjson"], "not valid JSON"),
        "quantize: truncated shard": (lambda w: ["quantize", "--model", w["ckpt"], "--calib", "{d}/truncpool",
                                                 "--calib-images", "2", "--out", "{d}/q"], "checksum mismatch"),
        "distill: truncated shard": (lambda w: ["distill", "--teacher", w["ckpt"], "--pool", "{d}/truncpool",
                                                "--out", "{d}/k", "--eval-data", "none"], "checksum mismatch"),
        # a pool from another teacher
        "quantize: other teacher's pool": (lambda w: ["quantize", "--model", w["other"], "--calib", w["pool"],
                                                      "--calib-images", "2", "--out", "{d}/q"], "another teacher"),
        "distill: other teacher's pool": (lambda w: ["distill", "--teacher", w["other"], "--pool", w["pool"],
                                                     "--out", "{d}/k", "--eval-data", "none"], "another teacher"),
        # numbers out of range
        "invert: zero iterations": (lambda w: ["invert", "--model", w["ckpt"], *INV, "--iterations", "0",
                                               "--out", "{d}/o"], "iterations"),
        "invert: zero batch": (lambda w: ["invert", "--model", w["ckpt"], *INV, "--batch-size", "0",
                                          "--out", "{d}/o"], "--batch-size must be >= 1, got 0"),
        "quantize: 9-bit weights": (lambda w: ["quantize", "--model", w["ckpt"], "--calib", "noise", "--w-bits", "9",
                                               "--out", "{d}/q"], "w-bits"),
        "quantize: 1-bit activations": (lambda w: ["quantize", "--model", w["ckpt"], "--calib", "noise",
                                                   "--a-bits", "1", "--out", "{d}/q"], "a-bits"),
        "quantize: 9-bit edges": (lambda w: ["quantize", "--model", w["ckpt"], "--calib", "noise", "--edge-bits",
                                             "9", "--out", "{d}/q"], "edge-bits"),
        "quantize: --rotate on a CNN": (lambda w: ["quantize", "--model", w["cnn"], "--calib", "noise", "--rotate",
                                                   "--out", "{d}/q"], "needs a plain pre-norm timm ViT"),
        "quantize: zero images": (lambda w: ["quantize", "--model", w["ckpt"], "--calib", "noise",
                                             "--calib-images", "0", "--out", "{d}/q"], "--calib-images"),
        "eval: zero limit": (lambda w: ["eval", "--model", w["ckpt"], "--data", "imagefolder:{d}", "--limit", "0"],
                             "--limit"),
        "distill: a segmenter teacher": (lambda w: ["distill", "--teacher", "fmnist_scene_segmenter", "--noise",
                                                    "--out", "{d}/o"], "needs a classifier"),
        "distill: zero epochs": (lambda w: ["distill", "--teacher", w["ckpt"], "--pool", w["pool"], "--epochs", "0",
                                            "--out", "{d}/k"], "--epochs"),
        "distill: negative temperature": (lambda w: ["distill", "--teacher", w["ckpt"], "--pool", w["pool"],
                                                     "--temperature", "-1", "--out", "{d}/k"], "--temperature"),
        "train-teacher: zero epochs": (lambda w: ["train-teacher", "--epochs", "0", "--out", "{d}/t"], "epochs"),
        "train-teacher: a segmenter on data without masks": (
            lambda w: ["train-teacher", "--arch", "fmnist_scene_segmenter", "--out", "{d}/t"], "no per-pixel labels"),
        "invert: not a number": (lambda w: ["invert", "--model", w["ckpt"], "--num-images", "many",
                                            "--out", "{d}/o"], "invalid int value"),
        # unknown names
        "invert: unknown method": (lambda w: ["invert", "--model", w["ckpt"], *INV, "--method", "magic",
                                              "--out", "{d}/o"], "unknown method"),
        "quantize: unknown quantizer": (lambda w: ["quantize", "--model", w["ckpt"], "--calib", "noise",
                                                   "--quantizer", "magic", "--out", "{d}/q"], "magic"),
        "eval: unknown data": (lambda w: ["eval", "--model", w["ckpt"], "--data", "mnist-ish"],
                               "is not a known dataset"),
        "distill: unknown student": (lambda w: ["distill", "--teacher", w["ckpt"], "--student", "resnet1000",
                                                "--pool", w["pool"], "--out", "{d}/k"], "unknown student"),
        "eval: unknown model": (lambda w: ["eval", "--model", "deit_tiny_patch16_22"], "did you mean"),
        "unknown subcommand": (lambda w: ["compress"], "invalid choice"),
        "pool: unknown action": (lambda w: ["pool", "fix", "{d}/pool"], "invalid choice"),
        "demo: unknown device": (lambda w: ["demo", "--device", "tpu:0", "--out", "{d}/demo"], "not a torch device"),
        "demo: iterations within the schedule": (lambda w: ["demo", "--iterations", "200", "--out", "{d}/demo"],
                                                 "--iterations must exceed the last stop iteration (300)"),
        # a folder the user owns is never written into
        "invert: a user's folder": (lambda w: ["invert", "--model", w["ckpt"], *INV, "--out", "{d}/users_folder"],
                                    "smi did not write"),
        "invert: a user's folder, --overwrite": (lambda w: ["invert", "--model", w["ckpt"], *INV, "--overwrite",
                                                            "--out", "{d}/users_folder"], "smi did not write"),
        "quantize: a user's folder": (lambda w: ["quantize", "--model", w["ckpt"], "--calib", "noise",
                                                 "--out", "{d}/users_folder"], "smi did not write"),
        "distill: a user's folder": (lambda w: ["distill", "--teacher", w["ckpt"], "--noise", "--epochs", "1",
                                                "--eval-data", "none", "--out", "{d}/users_folder"],
                                     "smi did not write"),
        "train-teacher: a user's folder": (lambda w: ["train-teacher", "--data", "imagefolder:{d}/images",
                                                      "--arch", "resnet10t", "--batch-size", "4",
                                                      "--out", "{d}/users_folder"], "smi did not write"),
        "train-teacher: batch size 1 with batch norm": (lambda w: ["train-teacher", "--data", "imagefolder:{d}/images",
                                                                   "--arch", "resnet10t", "--batch-size", "1",
                                                                   "--epochs", "1", "--out", "{d}/bn1"],
                                                        "batch normalization needs two"),
        "quantize: --reconstruct-iterations 0": (lambda w: ["quantize", "--model", w["ckpt"], "--calib", "noise",
                                                            "--reconstruct", "--reconstruct-iterations", "0",
                                                            "--out", "{d}/q0"], "--reconstruct-iterations"),
        "quantize: --correct-activations on a CNN": (lambda w: ["quantize", "--model", w["cnn"], "--calib", "noise",
                                                                "--calib-images", "2", "--correct-activations",
                                                                "--out", "{d}/q"], "needs a quantized timm ViT"),
        "quantize: --correct-activations of unknown layers": (
            lambda w: ["quantize", "--model", w["ckpt"], "--calib", "noise", "--correct-activations", "inner",
                       "--out", "{d}/q"], "--correct-activations"),
        "qat: missing quantized folder": (lambda w: ["qat", "--model", w["ckpt"], "--quantized", "/nope/q", "--noise",
                                                     "--eval-data", "none", "--out", "{d}/o"], "does not exist"),
        "qat: a quantized folder of another model": (lambda w: ["qat", "--model", w["other"], "--quantized",
                                                                "{d}/quant", "--noise", "--eval-data", "none",
                                                                "--out", "{d}/o"], "was quantized from"),
        "qat: other teacher's pool": (lambda w: ["qat", "--model", w["other"], "--quantized", "{d}/quant_other",
                                                 "--pool", w["pool"], "--eval-data", "none", "--out", "{d}/o"],
                                      "another teacher"),
        "qat: zero epochs": (lambda w: ["qat", "--model", w["ckpt"], "--quantized", "{d}/quant", "--noise",
                                        "--epochs", "0", "--out", "{d}/o"], "--epochs"),
        "qat: negative time budget": (lambda w: ["qat", "--model", w["ckpt"], "--quantized", "{d}/quant", "--noise",
                                                 "--time-budget", "-1", "--out", "{d}/o"], "--time-budget"),
        "qat: a user's folder": (lambda w: ["qat", "--model", w["ckpt"], "--quantized", "{d}/quant", "--noise",
                                            "--eval-data", "none", "--out", "{d}/users_folder"], "smi did not write"),
        "qat: into the quantized folder it reads": (lambda w: ["qat", "--model", w["ckpt"], "--quantized",
                                                               "{d}/quant", "--noise", "--eval-data", "none",
                                                               "--out", "{d}/quant"], "smi did not write"),
        "invert: --out below a file": (lambda w: ["invert", "--model", w["ckpt"], *INV, "--out", "{d}/afile.txt/p"],
                                       "Not a directory"),
        # numbers
        "quantize: batch size 0": (lambda w: ["quantize", "--model", w["ckpt"], "--calib", "noise", "--batch-size",
                                              "0", "--out", "{d}/q"], "--batch-size"),
        "eval: batch size 0": (lambda w: ["eval", "--model", w["ckpt"], "--data", "imagefolder:{d}/images",
                                          "--batch-size", "0"], "--batch-size"),
        "invert: negative seed": (lambda w: ["invert", "--model", w["ckpt"], *INV, "--seed", "-1", "--out", "{d}/o"],
                                  "--seed"),
        "invert: seed past 64 bits": (lambda w: ["invert", "--model", w["ckpt"], *INV, "--seed", str(2**70),
                                                 "--out", "{d}/o"], "--seed"),
        "invert: infinite tv": (lambda w: ["invert", "--model", w["ckpt"], *INV, "--tv-l2", "inf", "--out", "{d}/o"],
                                "finite number"),
        "invert: zero contrastive temperature": (lambda w: ["invert", "--model", w["ckpt"], *INV, "--term",
                                                            "contrastive=1", "--option", "contrastive_temperature=0",
                                                            "--out", "{d}/o"], "contrastive_temperature must be"),
        "distill: nan term weight": (lambda w: ["distill", "--teacher", w["ckpt"], "--online", "--term", "bn=nan",
                                                "--out", "{d}/o"], "--term"),
        "distill: negative adversarial weight": (lambda w: ["distill", "--teacher", w["ckpt"], "--online", "--term",
                                                            "adversarial=-1", "--out", "{d}/o"], "adversarial"),
        "distill: the student's BN prior on a student without BatchNorm": (
            lambda w: ["distill", "--teacher", w["ckpt"], "--online", "--term", "student_bn=1", "--eval-data", "none",
                       "--out", "{d}/o"], "needs a student with BatchNorm layers"),
        "distill: a fractional count of student BN layers": (
            lambda w: ["distill", "--teacher", w["ckpt"], "--online", "--option", "student_bn_layers=1.5",
                       "--out", "{d}/o"], "student_bn_layers must be a whole number"),
        "distill: zero time budget": (lambda w: ["distill", "--teacher", w["ckpt"], "--noise", "--time-budget", "0",
                                                 "--out", "{d}/o"], "--time-budget"),
        "distill: zero images per synthesis": (lambda w: ["distill", "--teacher", w["ckpt"], "--online",
                                                          "--synth-batch-size", "0", "--out", "{d}/o"],
                                               "--synth-batch-size"),
        "distill: mixup probability above 1": (lambda w: ["distill", "--teacher", w["ckpt"], "--noise", "--mixup",
                                                          "1.5", "--out", "{d}/o"], "--mixup"),
        "distill: negative student colour shift": (lambda w: ["distill", "--teacher", w["ckpt"], "--noise",
                                                              "--augment-color", "-1", "--out", "{d}/o"],
                                                   "--augment-color"),
        "distill: background probability above 1": (lambda w: ["distill", "--teacher", w["ckpt"], "--noise",
                                                                "--augment-background", "2", "--out", "{d}/o"],
                                                     "--augment-background"),
        "distill: pool background above 1": (lambda w: ["distill", "--teacher", w["ckpt"], "--pool", w["pool"],
                                                         "--pool-background", "2", "--out", "{d}/o"],
                                              "--pool-background"),
        "distill: pool background without a pool": (lambda w: ["distill", "--teacher", w["ckpt"], "--noise",
                                                                "--pool-background", "0.25", "--out", "{d}/o"],
                                                     "--pool-background"),
        "qat: pool background and background augmentation": (
            lambda w: ["qat", "--model", w["ckpt"], "--quantized", "{d}/quant", "--pool", w["pool"],
                       "--pool-background", "0.25", "--augment-background", "0.5", "--out", "{d}/o"],
            "--augment-background"),
        "qat: pool refill without a background": (lambda w: ["qat", "--model", w["ckpt"], "--quantized", "{d}/quant",
                                                              "--pool", w["pool"], "--pool-refill", "--out", "{d}/o"],
                                                   "--pool-refill"),
        "quantize: pool background on noise": (lambda w: ["quantize", "--model", w["ckpt"], "--calib", "noise",
                                                           "--pool-background", "0.25", "--out", "{d}/o"],
                                                "not a pool folder"),
        "quantize: pool level 0 on noise": (lambda w: ["quantize", "--model", w["ckpt"], "--calib", "noise",
                                                        "--pool-level", "0", "--out", "{d}/o"], "not a pool folder"),
        "qat: pool refill on noise": (lambda w: ["qat", "--model", w["ckpt"], "--quantized", "{d}/quant", "--noise",
                                                  "--pool-refill", "--out", "{d}/o"], "--pool-refill"),
        "qat: pool level without a background": (lambda w: ["qat", "--model", w["ckpt"], "--quantized", "{d}/quant",
                                                             "--pool", w["pool"], "--pool-level", "0", "--out",
                                                             "{d}/o"], "--pool-level"),
        "quantize: pool level above 1": (lambda w: ["quantize", "--model", w["ckpt"], "--calib", w["pool"],
                                                     "--pool-background", "0", "--pool-level", "1.5", "--out",
                                                     "{d}/o"], "--pool-level"),
        "quantize: negative pool background": (lambda w: ["quantize", "--model", w["ckpt"], "--calib", w["pool"],
                                                           "--pool-background", "-0.1", "--out", "{d}/o"],
                                                "--pool-background"),
        "invert: colour shift out of range": (lambda w: ["invert", "--model", w["ckpt"], *INV, "--color-shift", "3",
                                                         "--out", "{d}/o"], "--color-shift"),
        "invert: blur above 1": (lambda w: ["invert", "--model", w["ckpt"], *INV, "--blur", "1.5", "--out", "{d}/o"],
                                 "--blur"),
        "invert: random crops in a sparse run": (lambda w: ["invert", "--model", w["ckpt"], *INV, "--crop", "0.5",
                                                            "--out", "{d}/o"], "--crop is dense-only"),
        "invert: negative BN-statistics weight": (lambda w: ["invert", "--model", w["ckpt"], *INV, "--bn-weight", "-1",
                                                             "--out", "{d}/o"], "--bn-weight"),
        # students that cannot take the teacher's images
        "distill: attention transfer to a CNN student": (lambda w: ["distill", "--teacher", w["ckpt"], "--student",
                                                                    "resnet10t", "--attention", "1", "--noise",
                                                                    "--eval-data", "none", "--out", "{d}/o"],
                                                         "timm ViT student"),
        "distill: negative attention weight": (lambda w: ["distill", "--teacher", w["ckpt"], "--noise", "--attention",
                                                          "-1", "--out", "{d}/o"], "--attention"),
        "distill: weight-average decay of 1": (lambda w: ["distill", "--teacher", w["ckpt"], "--noise", "--ema", "1",
                                                          "--out", "{d}/o"], "--ema"),
        "distill: a student that cannot read the images": (lambda w: ["distill", "--teacher", w["ckpt"], "--student",
                                                                      "efficientformer_l1", "--noise", "--eval-data",
                                                                      "none", "--out", "{d}/o"], "cannot read 3x32x32"),
        "distill: a backbone of another input size": (lambda w: ["distill", "--teacher", w["ckpt"],
                                                                 "--student-checkpoint", w["cnn"], "--linear-probe",
                                                                 "--noise", "--eval-data", "none", "--out", "{d}/o"],
                                                      "inputs but the teacher"),
        # data and pools
        "eval: a corrupt image": (lambda w: ["eval", "--model", w["ckpt"], "--data", "imagefolder:{d}/badimages"],
                                  "unreadable image"),
        "pool info: a null field": (lambda w: ["pool", "info", "{d}/nullpool"], "no valid 'sha256'"),
        "quantize: a manifest without a field": (lambda w: ["quantize", "--model", w["ckpt"], "--calib",
                                                            "{d}/nofieldpool", "--out", "{d}/q"], "no valid 'file'"),
        "pool info: a hand-edited count": (lambda w: ["pool", "info", "{d}/countpool"], "num_images_done"),
        "pool info: a number for the config": (lambda w: ["pool", "info", "{d}/intconfigpool"],
                                               "'identity.config' is not an object"),
        "quantize: a manifest whose teacher key was renamed": (lambda w: ["quantize", "--model", w["ckpt"],
                                                                          "--calib", "{d}/noteacherpool",
                                                                          "--out", "{d}/q"],
                                                               "names no teacher fingerprint"),
        "quantize: model_kwargs that build a model no image passes": (lambda w: ["quantize", "--model",
                                                                                 "{d}/neghead.safetensors", "--calib",
                                                                                 "noise", "--out", "{d}/q"],
                                                                        "cannot read a 3x32x32 image"),
        "pool info: a string for kept patches": (lambda w: ["pool", "info", "{d}/keptpool"], "malformed 'kept'"),
        "pool verify: a shard outside the folder": (lambda w: ["pool", "verify", "{d}/escapepool"],
                                                    "not a shard file"),
        # models that cannot be inverted as asked
        "invert: a model without a head": (lambda w: ["invert", "--model", w["headless"], *INV, "--out", "{d}/o"],
                                           "needs a classifier head"),
        "invert: sparse on a hybrid ViT": (lambda w: ["invert", "--model", "vit_small_r26_s32_224", *INV,
                                                      "--out", "{d}/o"], "reads each patch on its own"),
    }


CASES = _cases()


@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_input(case, world, capsys):
    build, needle = CASES[case]
    argv = [a.replace("{d}", str(world["dir"])) for a in build(world)]
    before = {p: p.stat().st_mtime_ns for p in world["dir"].rglob("*") if p.is_file()}
    try:
        code = main(argv)
    except SystemExit as e:  # argparse errors exit from inside main
        code = e.code
    assert code not in (0, None)
    err = capsys.readouterr().err.strip().splitlines()
    assert err, "no message"
    last = err[-1]
    assert "error:" in last and needle in last, last
    assert not any("Traceback" in line for line in err)
    after = {p: p.stat().st_mtime_ns for p in world["dir"].rglob("*") if p.is_file()}
    assert after == before  # nothing that existed was touched, and nothing was written
    assert not (world["dir"] / "o").exists() and not (world["dir"] / "q").exists()  # not even an empty folder


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_checkpoint(world, capsys, tmp_path):
    ckpt = write_tiny_checkpoint(tmp_path, "locked")
    ckpt.chmod(0)
    assert main(["eval", "--model", str(ckpt)]) == 2
    assert "smi: error:" in capsys.readouterr().err


def test_manifest_of_another_format_is_refused(world, capsys, tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "something-else/9"}))
    assert main(["pool", "verify", str(tmp_path)]) == 2
    assert "not an smi pool manifest" in capsys.readouterr().err
