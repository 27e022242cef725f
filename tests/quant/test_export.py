"""`smi export`: a quantized folder as an ONNX QDQ model that onnxruntime runs in integers."""

import json

import pytest
import torch

from smi.cli import main
from smi.models.loading import load_teacher
from smi.quant.export import EXPORTERS, load_exported
from smi.quant.io import load_quantized
from smi.quant.quantizers import ActQuantizer
from tests.helpers import write_image_folder, write_tiny_checkpoint

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("export")
    ckpt = str(write_tiny_checkpoint(d, "tiny"))
    other = str(write_tiny_checkpoint(d, "other", seed=1))
    folders = {}
    for key, w, a in (("baseline", 8, 8), ("repq", 4, 4), ("repq-rotated", 4, 4)):
        q, preset = d / f"q_{key}", key.split("-")[0]
        assert main(["quantize", "--model", ckpt, "--calib", "noise", "--calib-images", "8", "--quantizer", preset,
                     "--w-bits", str(w), "--a-bits", str(a), "--out", str(q)]
                    + (["--rotate"] if key.endswith("rotated") else [])) == 0
        assert main(["export", "--model", ckpt, "--quantized", str(q), "--out", str(d / f"x_{key}")]) == 0
        folders[key] = (q, d / f"x_{key}")
    images = write_image_folder(d / "images", classes=5, per_class=4, size=(32, 32), split=True)
    return {"dir": d, "ckpt": ckpt, "other": other, "folders": folders, "images": images}


@pytest.mark.parametrize("key", ["baseline", "repq", "repq-rotated"])
def test_exported_model_agrees_with_the_simulation(world, key):
    quantized, exported = world["folders"][key]
    preset = key.split("-")[0]
    teacher = load_teacher(world["ckpt"])
    sim, _ = load_quantized(quantized, teacher)
    ort_model, meta = load_exported(exported, load_teacher(world["ckpt"]))
    x = torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(7))  # not the export's own check images
    with torch.no_grad():
        ref, out = sim.eval()(x), ort_model(x)
    assert out.shape == ref.shape
    # the same integers up to rounding ties (x * 1/s in torch vs x / s in onnxruntime) that move a code by one step
    assert (ref.argmax(1) == out.argmax(1)).float().mean() >= 0.9
    assert (ref - out).abs().max() <= 0.05 * ref.abs().max()
    assert meta["quantization"]["preset"] == preset and meta["check"]["argmax_agreement"] >= 0.75


def test_onnx_file_holds_int8_weights_and_smis_own_scales(world):
    quantized, exported = world["folders"]["baseline"]
    model = onnx.load(str(exported / "model.onnx"))
    from onnx import numpy_helper

    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}  # and constants, by output name
    inits.update({n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in model.graph.node
                  if n.op_type == "Constant" and n.attribute[0].name == "value"})
    dq_inputs = {n.input[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    int8_weights = [k for k in dq_inputs if k in inits and inits[k].dtype.name == "int8"]
    sim, _ = load_quantized(quantized, load_teacher(world["ckpt"]))
    weighted = [m for m in sim.modules() if hasattr(m, "weight_fq")]
    assert len(int8_weights) == len(weighted)  # every quantized weight is stored as int8 codes
    assert sorted(int(inits[k].size) for k in int8_weights) == sorted(m.weight.numel() for m in weighted)
    # the activation scales in the file are the ones smi calibrated, not new ones
    q_scales = set()
    for n in model.graph.node:
        if n.op_type == "QuantizeLinear" and n.input[1] in inits:
            q_scales.add(round(float(inits[n.input[1]].reshape(-1)[0]), 7))
    smi_scales = {round(float(m.scale.reshape(-1)[0]), 7) for m in sim.modules() if isinstance(m, ActQuantizer)}
    assert smi_scales and smi_scales <= q_scales
    # and no float copy of them: what stays float (embeddings, norms, biases) is small beside the weights
    floats = sum(v.size for k, v in inits.items() if v.dtype.name == "float32")
    assert floats < 0.25 * sum(m.weight.numel() for m in weighted)


def test_eval_exported_reports_the_integer_models_accuracy(world, capsys):
    quantized, exported = world["folders"]["baseline"]
    data = f"imagefolder:{world['images']}"
    assert main(["eval", "--model", world["ckpt"], "--quantized", str(quantized), "--data", data, "--json"]) == 0
    sim = json.loads(capsys.readouterr().out)
    assert main(["eval", "--model", world["ckpt"], "--exported", str(exported), "--data", data, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n"] == sim["n"] == 5 and abs(out["top1"] - sim["top1"]) <= 20.0  # at most one image of the 5


def test_export_registry_drives_the_cli(capsys):
    assert EXPORTERS.names() == ["onnx", "pt2e", "pt2e-bf16"]
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    out = capsys.readouterr().out
    assert "onnx" in out and "pt2e" in out


@pytest.mark.parametrize("case", ["another teacher", "unknown format", "runtime missing", "a user's folder",
                                  "eval of another teacher's export", "both quantized and exported"])
def test_export_refusals(world, case, capsys, monkeypatch, tmp_path):
    quantized, exported = world["folders"]["baseline"]
    argv = {
        "another teacher": ["export", "--model", world["other"], "--quantized", str(quantized), "--out",
                            str(tmp_path / "x")],
        "unknown format": ["export", "--model", world["ckpt"], "--quantized", str(quantized), "--format", "onx",
                           "--out", str(tmp_path / "x")],
        "runtime missing": ["export", "--model", world["ckpt"], "--quantized", str(quantized), "--out",
                            str(tmp_path / "x")],
        "a user's folder": ["export", "--model", world["ckpt"], "--quantized", str(quantized), "--out",
                            str(tmp_path / "mine")],
        "eval of another teacher's export": ["eval", "--model", world["other"], "--exported", str(exported)],
        "both quantized and exported": ["eval", "--model", world["ckpt"], "--quantized", str(quantized),
                                        "--exported", str(exported)],
    }[case]
    needle = {"another teacher": "not from", "unknown format": "did you mean onnx", "runtime missing":
              "onnxruntime, which is not installed", "a user's folder": "smi did not write",
              "eval of another teacher's export": "not from", "both quantized and exported": "not both"}[case]
    if case == "runtime missing":
        import importlib.util

        real = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime"
                            else real(name, *a))
    if case == "a user's folder":
        (tmp_path / "mine").mkdir()
        (tmp_path / "mine" / "notes.txt").write_text("mine")
    assert main(argv) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "error:" in last and needle in last, last
    assert not (tmp_path / "x").exists()
    if case == "a user's folder":
        assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["notes.txt"]
