"""`smi export --format pt2e`: torchao's PT2E int8 graph at smi's own scales, compiled by Inductor."""

import json

import pytest
import torch
from safetensors.torch import load_file

from smi.cli import main
from smi.models.loading import load_teacher
from smi.quant.export import load_exported
from smi.quant.io import load_quantized
from smi.quant.modules import WeightQuantMixin
from smi.quant.pt2e import PT2EExporter, integer_graph
from tests.helpers import write_tiny_checkpoint

pytest.importorskip("torchao")


@pytest.fixture
def eager(monkeypatch):
    """The converted graph runs in eager (reference quantize/dequantize kernels), without Inductor's compile."""
    monkeypatch.setattr(PT2EExporter, "compiled", False)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("pt2e")
    ckpt = str(write_tiny_checkpoint(d, "tiny"))
    for preset, w, a in (("baseline", 8, 8), ("baseline", 4, 8), ("repq", 4, 4)):
        assert main(["quantize", "--model", ckpt, "--calib", "noise", "--calib-images", "8", "--quantizer", preset,
                     "--w-bits", str(w), "--a-bits", str(a), "--out", str(d / f"q_{preset}_w{w}a{a}")]) == 0
    return {"dir": d, "ckpt": ckpt}


def _export(world, name, out):
    return main(["export", "--model", world["ckpt"], "--quantized", str(world["dir"] / name), "--format", "pt2e",
                 "--out", str(out)])


def _x(n=16):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("bits", ["w8a8", "w4a8"])
def test_integer_graph_agrees_with_the_simulation(world, bits, eager, tmp_path):
    assert _export(world, f"q_baseline_{bits}", tmp_path / "x") == 0
    sim, _ = load_quantized(world["dir"] / f"q_baseline_{bits}", load_teacher(world["ckpt"]))
    model, meta = load_exported(tmp_path / "x", load_teacher(world["ckpt"]))
    with torch.no_grad():
        ref, out = sim.eval()(_x()), model(_x())
    # the same linear layers in integers; the attention's products run in float where smi quantizes their operands
    assert (ref.argmax(1) == out.argmax(1)).float().mean() >= 0.9
    assert (ref - out).abs().max() <= 0.05 * ref.abs().max()
    assert meta["export"] == "pt2e" and meta["check"]["argmax_agreement"] >= 0.75


def test_file_holds_smis_codes_and_the_graph_uses_smis_scales(world, eager, tmp_path):
    assert _export(world, "q_baseline_w8a8", tmp_path / "x") == 0
    tensors = load_file(str(tmp_path / "x" / "model.safetensors"))  # safetensors: no pickle
    sim, _ = load_quantized(world["dir"] / "q_baseline_w8a8", load_teacher(world["ckpt"]))
    layers = {n: m for n, m in sim.named_modules() if isinstance(m, WeightQuantMixin)}
    for name, m in layers.items():
        assert tensors[f"{name}.weight"].dtype == torch.int8
        assert torch.equal(tensors[f"{name}.weight"], m.int_weight())
        assert torch.equal(tensors[f"{name}.weight_scale"], m.weight_scale.reshape(-1))
    # every activation quantize in the converted graph is at one of smi's input scales and zero points
    from safetensors import safe_open

    with safe_open(str(tmp_path / "x" / "model.safetensors"), "pt") as f:
        meta = json.loads(f.metadata()["smi"])
    graph = integer_graph(tensors, meta, load_teacher(world["ckpt"]).model, torch.zeros(2, 3, 32, 32))
    quantizes = [n for n in graph.graph.nodes if n.op == "call_function" and "quantize_per_tensor" in str(n.target)
                 and "dequantize" not in str(n.target)]
    smi_params = {(round(float(m.input_quant.scale), 9), int(m.input_quant.zero_point)) for m in layers.values()}
    assert len(quantizes) == len(layers)
    assert {(round(float(n.args[1]), 9), int(n.args[2])) for n in quantizes} == smi_params


def test_eval_exported_pt2e(world, eager, tmp_path, capsys):
    from tests.helpers import write_image_folder

    images = write_image_folder(tmp_path / "images", classes=5, per_class=4, size=(32, 32), split=True)
    assert _export(world, "q_baseline_w8a8", tmp_path / "x") == 0
    capsys.readouterr()
    data = f"imagefolder:{images}"
    q = str(world["dir"] / "q_baseline_w8a8")
    assert main(["eval", "--model", world["ckpt"], "--quantized", q, "--data", data, "--json"]) == 0
    sim = json.loads(capsys.readouterr().out)
    assert main(["eval", "--model", world["ckpt"], "--exported", str(tmp_path / "x"), "--data", data, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n"] == sim["n"] == 5 and abs(out["top1"] - sim["top1"]) <= 20.0  # at most one image of the 5


@pytest.mark.parametrize("case", ["four-bit activations", "torchao missing", "batchnorm folded"])
def test_pt2e_refusals(world, case, capsys, monkeypatch, tmp_path):
    if case == "four-bit activations":
        code, needle = _export(world, "q_repq_w4a4", tmp_path / "x"), "use --format onnx"
    elif case == "torchao missing":
        import importlib.util

        real = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchao"
                            else real(name, *a))
        code, needle = _export(world, "q_baseline_w8a8", tmp_path / "x"), "torchao, which is not installed"
    else:  # prepare_pt2e folds a CNN's BatchNorm into its convolutions: smi's scales are not the weights' scales
        monkeypatch.setattr(PT2EExporter, "compiled", False)
        q = tmp_path / "q_cnn"
        assert main(["quantize", "--model", "fmnist_resnet_tiny", "--calib", "noise", "--calib-images", "4",
                     "--w-bits", "8", "--a-bits", "8", "--out", str(q)]) == 0
        capsys.readouterr()
        code = main(["export", "--model", "fmnist_resnet_tiny", "--quantized", str(q), "--format", "pt2e",
                     "--out", str(tmp_path / "x")])
        needle = "BatchNorm"
    assert code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "error:" in last and needle in last, last
    assert not (tmp_path / "x" / "model.safetensors").exists()


@pytest.mark.parametrize("damage", ["not safetensors", "no scales"])
def test_damaged_pt2e_file_is_one_error_line(world, eager, tmp_path, capsys, damage):
    from safetensors.torch import save_file

    assert _export(world, "q_baseline_w8a8", tmp_path / "x") == 0
    path = tmp_path / "x" / "model.safetensors"
    if damage == "not safetensors":
        path.write_bytes(b"junk")
    else:
        tensors = load_file(str(path))
        save_file({k: v for k, v in tensors.items() if not k.endswith("input_scale")}, str(path),
                  metadata={"smi": json.dumps({"layers": ["head"], "input_size": [3, 32, 32]})})
    capsys.readouterr()
    assert main(["eval", "--model", world["ckpt"], "--exported", str(tmp_path / "x"), "--limit", "2",
                 "--data", "noise"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "error:" in last and "not a pt2e export" in last, last


@pytest.mark.slow
def test_compiled_integer_model_agrees_with_the_simulation(tmp_path, monkeypatch):
    """The shipped teacher (a convolutional stem) compiled at two batch sizes, as an evaluation's last batch is."""
    assert main(["quantize", "--model", "fmnist_vit_tiny", "--calib", "noise", "--calib-images", "8",
                 "--out", str(tmp_path / "q")]) == 0
    assert main(["export", "--model", "fmnist_vit_tiny", "--quantized", str(tmp_path / "q"), "--format", "pt2e",
                 "--out", str(tmp_path / "x")]) == 0
    sim, _ = load_quantized(tmp_path / "q", load_teacher("fmnist_vit_tiny"))
    model, _ = load_exported(tmp_path / "x", load_teacher("fmnist_vit_tiny"))
    with monkeypatch.context() as m:
        m.setattr(PT2EExporter, "compiled", False)
        reference, _ = load_exported(tmp_path / "x", load_teacher("fmnist_vit_tiny"))  # the same graph in eager
    for n in (16, 5):  # a second batch size compiles again
        x = torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(n))
        with torch.no_grad():
            ref, out, sim_out = reference(x), model(x), sim.eval()(x)
        # Inductor's int8 kernels compute the reference graph's codes up to rounding ties
        assert (ref - out).abs().max() <= 0.01 * ref.abs().max()
        assert (sim_out.argmax(1) == out.argmax(1)).float().mean() >= 0.9
    # int8-mixed-bf16: the float operations in bfloat16
    assert main(["export", "--model", "fmnist_vit_tiny", "--quantized", str(tmp_path / "q"), "--format", "pt2e-bf16",
                 "--out", str(tmp_path / "xb")]) == 0
    mixed, meta = load_exported(tmp_path / "xb", load_teacher("fmnist_vit_tiny"))
    x = torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(16))
    with torch.no_grad():
        out, sim_out = mixed(x), sim.eval()(x)
    assert out.dtype == torch.float32 and meta["export"] == "pt2e-bf16"
    assert (sim_out.argmax(1) == out.argmax(1)).float().mean() >= 0.9
