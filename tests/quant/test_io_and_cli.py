import json

import pytest
import torch

from smi.cli import main
from smi.data.datasets import eval_dataset
from smi.errors import SmiError
from smi.evaluation import evaluate
from smi.inversion import InversionConfig, SparsityConfig, synthesize
from smi.models.loading import load_teacher
from smi.quant import BaselineConfig, QuantConfig, calibrate, convert, prepare
from smi.quant.api import calibration_forward
from smi.quant.calibration import calibration_set
from smi.quant.io import load_quantized, save_quantized
from tests.helpers import write_image_folder, write_tiny_checkpoint


@pytest.fixture
def ckpt(tmp_path):
    return str(write_tiny_checkpoint(tmp_path))


@pytest.fixture
def sparse_pool(ckpt, tmp_path):
    teacher = load_teacher(ckpt)
    cfg = InversionConfig(iterations=4, batch_size=4, sparsity=SparsityConfig.parse("2:0.5"))
    return synthesize(teacher, cfg, 8, tmp_path / "pool", progress=False, grid=False).folder


def _quantize(ckpt, source, n=8):
    teacher = load_teacher(ckpt)
    calib = calibration_set(teacher, source, n)
    model = prepare(teacher.model, BaselineConfig(w_bits=4, a_bits=4))
    calibrate(model, calib.batches(4), forward=calibration_forward)
    return teacher, convert(model), calib


def test_save_load_round_trip_gives_the_same_outputs(ckpt, sparse_pool, tmp_path):
    teacher, model, calib = _quantize(ckpt, str(sparse_pool))
    assert calib.masks is not None and calib.masks.sum(1).tolist() == [8] * 8
    x = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
    save_quantized(model, tmp_path / "q", teacher)
    again, meta = load_quantized(tmp_path / "q", load_teacher(ckpt))
    with torch.no_grad():
        torch.testing.assert_close(again(x), ref, rtol=0, atol=0)
    assert meta["config"] == {"preset": "baseline", "version": 1, "w_bits": 4, "a_bits": 4}
    # a folder written before presets were types says {"quantizer": NAME}: it still loads, to the same outputs
    legacy = json.loads((tmp_path / "q" / "quantized.json").read_text())
    legacy["config"] = {"w_bits": 4, "a_bits": 4, "quantizer": "baseline"}
    (tmp_path / "q" / "quantized.json").write_text(json.dumps(legacy))
    old, _ = load_quantized(tmp_path / "q", load_teacher(ckpt))
    with torch.no_grad():
        torch.testing.assert_close(old(x), ref, rtol=0, atol=0)


def test_sparse_calibration_sees_only_kept_patches(ckpt, sparse_pool):
    """Observers calibrated on a sparse pool ignore what the stopped patches hold."""
    teacher = load_teacher(ckpt)
    calib = calibration_set(teacher, str(sparse_pool), 8)
    maxes = []
    for fill in (0.0, 1e3):
        images = calib.images.clone()
        stopped = ~calib.masks  # (N, 16)
        px = stopped.view(8, 1, 4, 1, 4, 1).expand(-1, 3, -1, 8, -1, 8).reshape(8, 3, 32, 32)
        images[px] = fill
        model = prepare(load_teacher(ckpt).model, BaselineConfig())
        calibrate(model, [(images, calib.masks)], forward=calibration_forward)
        maxes.append(model.patch_embed.proj.input_quant.max_val.item())
    assert maxes[0] == maxes[1]


def test_pool_from_another_teacher_is_refused(ckpt, sparse_pool, tmp_path):
    other = write_tiny_checkpoint(tmp_path / "other", seed=1)
    with pytest.raises(SmiError, match="another teacher"):
        calibration_set(load_teacher(str(other)), str(sparse_pool), 4)


def test_more_calibration_images_than_the_pool(ckpt, sparse_pool):
    with pytest.raises(SmiError, match="must be at most the 8 images of the pool"):
        calibration_set(load_teacher(ckpt), str(sparse_pool), 9)


def test_quantized_folder_for_another_model_is_refused(ckpt, tmp_path):
    teacher, model, _ = _quantize(ckpt, "noise")
    save_quantized(model, tmp_path / "q", teacher)
    other = write_tiny_checkpoint(tmp_path / "other", seed=1)
    with pytest.raises(SmiError, match="quantized from"):
        load_quantized(tmp_path / "q", load_teacher(str(other)))


def test_imagefolder_evaluation_fits_the_models_input(ckpt, tmp_path):
    write_image_folder(tmp_path / "d", classes=3, per_class=3, size=(40, 48), split=True)
    teacher = load_teacher(ckpt)
    ds = eval_dataset(f"imagefolder:{tmp_path / 'd'}", teacher)
    x, y = ds[0]
    assert x.shape == (3, 32, 32) and len(ds) == 3
    res = evaluate(teacher.model, ds, progress=False)
    assert res["n"] == 3 and 0 <= res["top1"] <= res["top5"] <= 100
    pred = torch.cat([teacher.model.eval()(x[None]).argmax(1) for x, _ in ds])  # one image per class here
    labels = torch.tensor([y for _, y in ds])
    expected = [100.0 * float(pred[labels == c] == c) if (labels == c).any() else None
                for c in range(teacher.num_classes)]
    assert res["per_class"] == expected


def test_cli_quantize_then_eval(ckpt, tmp_path, capsys):
    write_image_folder(tmp_path / "d", classes=1, per_class=1, size=(32, 32), split=True)
    out = str(tmp_path / "q")
    assert main(["quantize", "--model", ckpt, "--calib", "noise", "--calib-images", "4", "--w-bits", "6",
                 "--a-bits", "6", "--out", out, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["w_bits"] == 6
    assert main(["eval", "--model", ckpt, "--quantized", out, "--data", f"imagefolder:{tmp_path / 'd'}",
                 "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(res) >= {"top1", "top5", "n"} and res["n"] == 1


@pytest.mark.parametrize("args,needle", [
    (["--w-bits", "1"], "w-bits must be an integer from 2 to 8"),
    (["--a-bits", "9"], "a-bits must be an integer from 2 to 8"),
    (["--quantizer", "fancy"], "unknown quantizer"),
    (["--calib", "/nonexistent/pool"], "does not exist"),
    (["--calib-images", "0"], "--calib-images must be positive"),
    (["--edge-bits", "1"], "edge-bits must be an integer from 2 to 8"),
])
def test_cli_quantize_bad_input(ckpt, tmp_path, capsys, args, needle):
    base = ["quantize", "--model", ckpt, "--calib", "noise", "--out", str(tmp_path / "q")]
    assert main(base + args) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("smi: error:") and needle in err


def test_cli_empty_pool(ckpt, tmp_path, capsys):
    pool = tmp_path / "empty"
    pool.mkdir()
    (pool / "manifest.json").write_text(json.dumps({"format": "smi-pool/1", "identity": {}, "shards": []}))
    assert main(["quantize", "--model", ckpt, "--calib", str(pool), "--out", str(tmp_path / "q")]) == 2
    assert "empty" in capsys.readouterr().err


@pytest.mark.parametrize("data,needle", [("mnist", "is not a known dataset"), ("imagefolder", "needs a path"),
                                         ("imagefolder:/nonexistent", "does not exist")])
def test_cli_eval_bad_data(ckpt, capsys, data, needle):
    assert main(["eval", "--model", ckpt, "--data", data]) == 2
    assert needle in capsys.readouterr().err


def test_quantize_never_silently_replaces_another_quantized_model(ckpt, tmp_path, capsys):
    base = ["quantize", "--model", ckpt, "--calib", "noise", "--calib-images", "4", "--out", str(tmp_path / "q")]
    assert main(base + ["--w-bits", "8"]) == 0
    before = (tmp_path / "q" / "quantized.safetensors").read_bytes()
    assert main(base + ["--w-bits", "8"]) == 0  # the same command again: the same model, allowed
    assert main(base + ["--w-bits", "4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--out" in err and "other settings (differs in: config)" in err and "overwrite" in err
    assert (tmp_path / "q" / "quantized.safetensors").read_bytes() == before  # untouched
    assert main(base + ["--w-bits", "4", "--overwrite"]) == 0
    assert json.loads((tmp_path / "q" / "quantized.json").read_text())["config"]["w_bits"] == 4


def test_edge_bits_survive_the_saved_folder_and_the_cli(ckpt, tmp_path, capsys):
    from smi.quant import RepQConfig
    from smi.quant.modules import QuantConv2d

    out = str(tmp_path / "q")
    assert main(["quantize", "--model", ckpt, "--calib", "noise", "--calib-images", "4", "--w-bits", "3",
                 "--a-bits", "3", "--edge-bits", "8", "--quantizer", "repq", "--out", out, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["edge_bits"] == 8
    model, meta = load_quantized(out, load_teacher(ckpt))
    assert QuantConfig.from_dict(meta["config"]) == RepQConfig(w_bits=3, a_bits=3, edge_bits=8)
    convs = [m for m in model.modules() if isinstance(m, QuantConv2d)]
    assert convs and all(m.w_bits == 8 and m.input_quant.bits == 8 for m in convs)  # the patch embedding
    assert model.head.w_bits == 8 and model.head.input_quant.bits == 8
    assert model.blocks[0].mlp.fc1.w_bits == 3 and model.blocks[0].attn.proj.input_quant.bits == 3
    assert main(["eval", "--model", ckpt, "--quantized", out, "--data", "noise", "--json"]) in (0, 2)


def test_rotate_survives_the_saved_folder_and_the_cli(ckpt, tmp_path, capsys):
    from smi.evaluation import evaluate
    from smi.quant import RepQConfig
    from smi.quant.rotate import is_rotated

    out = str(tmp_path / "q")
    assert main(["quantize", "--model", ckpt, "--calib", "noise", "--calib-images", "4", "--w-bits", "4",
                 "--a-bits", "4", "--quantizer", "repq", "--rotate", "--out", out, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["rotate"] is True
    teacher = load_teacher(ckpt)
    x = torch.randn(4, *teacher.input_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        float_logits = teacher.model(x)
    model, meta = load_quantized(out, teacher)
    assert QuantConfig.from_dict(meta["config"]) == RepQConfig(w_bits=4, a_bits=4, rotate=True) and is_rotated(model)
    with torch.no_grad():  # the rotated, quantized model still computes (roughly) the float function
        agree = (model(x).argmax(-1) == float_logits.argmax(-1)).float().mean().item()
    assert agree >= 0.5
    write_image_folder(tmp_path / "d", classes=1, per_class=2, size=(32, 32), split=True)
    assert main(["eval", "--model", ckpt, "--quantized", out, "--data", f"imagefolder:{tmp_path / 'd'}",
                 "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    direct = evaluate(model, eval_dataset(f"imagefolder:{tmp_path / 'd'}", teacher))
    assert (res["n"], res["top1"]) == (direct["n"], direct["top1"])


def test_cli_pool_background_calibrates_and_trains_on_whole_images(ckpt, sparse_pool, tmp_path, capsys):
    q = tmp_path / "q"
    assert main(["quantize", "--model", ckpt, "--calib", str(sparse_pool), "--calib-images", "8",
                 "--pool-background", "0.25", "--w-bits", "4", "--a-bits", "4", "--out", str(q), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["sparse"] is False and "background 0.25" in summary["source"]  # whole images, said so
    record = json.loads((q / "quantized.json").read_text())
    assert "background 0.25" in json.dumps(record)
    assert main(["qat", "--model", ckpt, "--quantized", str(q), "--pool", str(sparse_pool), "--pool-background",
                 "0.25", "--pool-refill", "--epochs", "1", "--steps-per-epoch", "2", "--batch-size", "4",
                 "--eval-data", "none", "--out", str(tmp_path / "qat")]) == 0
    assert (tmp_path / "qat" / "quantized.safetensors").is_file()
    assert main(["quantize", "--model", ckpt, "--calib", str(sparse_pool), "--calib-images", "8",
                 "--pool-background", "0", "--pool-level", "0", "--out", str(tmp_path / "black"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "background 0, level 0" in summary["source"]  # black, said so
