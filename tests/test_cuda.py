"""The CUDA paths: the same guarantees as on the CPU, and results that agree with the CPU's.

Skipped where no GPU is visible (CI); run on a GPU with ``pytest tests/test_cuda.py``.
"""

import pytest
import torch

from smi.cli import main
from smi.inversion.augment import pixel_mask_from_indices
from smi.inversion.config import InversionConfig, SparsityConfig
from smi.inversion.engine import invert
from smi.models.loading import load_teacher

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

TARGETS = torch.arange(10)


def _invert(device, cfg, **kwargs):
    teacher = load_teacher("fmnist_vit_tiny", device=device)
    return teacher, invert(teacher, cfg, TARGETS, generator=torch.Generator().manual_seed(0), **kwargs)


def _top1(teacher, images):
    with torch.no_grad():
        return (teacher.model(images.to(next(teacher.model.parameters()).device)).argmax(1).cpu() == TARGETS).float()


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_stopped_patches_stay_bit_exact_on_cuda(precision):
    n, keep_k = 49, 12
    gen = torch.Generator().manual_seed(3)
    keep = torch.stack([torch.randperm(n, generator=gen)[:keep_k] for _ in range(10)])
    init = torch.randn(10, 1, 28, 28, generator=gen)
    cfg = InversionConfig(iterations=20, batch_size=10, sparsity=SparsityConfig(()), precision=precision)
    last = []
    _, batch = _invert("cuda", cfg, init=init, keep=keep, callback=lambda info: last.append(info.images.cpu()))
    images = last[-1]  # the optimized tensor itself (the returned images zero the stopped patches)
    stopped = (pixel_mask_from_indices(keep, (7, 7), 4) == 0).expand_as(images)
    assert torch.equal(images[stopped], init[stopped])
    assert not torch.equal(images[~stopped], init[~stopped])
    assert torch.isfinite(images).all()
    assert torch.equal(batch.images, images * ~stopped)


@pytest.mark.parametrize("stops", [(), ((10, 0.5), (20, 0.5))], ids=["dense", "sparse"])
def test_cuda_inversion_agrees_with_cpu(stops):
    cfg = InversionConfig(iterations=60, batch_size=10, sparsity=SparsityConfig(stops))
    cpu_teacher, cpu = _invert("cpu", cfg)
    _, gpu = _invert("cuda", cfg)
    assert gpu.mask.sum(1).tolist() == cpu.mask.sum(1).tolist()
    # float rounding differs (cuDNN's convolution may use TF32), so the runs drift apart where gradients are
    # near zero; the images must still mostly agree and the teacher must read them alike
    diff = (gpu.images.cpu() - cpu.images).abs()
    assert diff.median() < 0.05, diff.median()
    assert (gpu.mask.cpu() == cpu.mask).float().mean() > 0.8
    assert _top1(cpu_teacher, gpu.images.cpu()).sum() >= _top1(cpu_teacher, cpu.images).sum() - 1


def test_cli_inverts_and_quantizes_on_cuda(tmp_path):
    pool = tmp_path / "pool"
    assert main(["invert", "--num-images", "20", "--batch-size", "10", "--iterations", "40", "--sparsity", "10:0.5",
                 "--device", "cuda", "--out", str(pool), "--no-grid"]) == 0
    assert main(["quantize", "--calib", str(pool), "--calib-images", "20", "--w-bits", "4", "--a-bits", "8",
                 "--quantizer", "repq", "--device", "cuda", "--out", str(tmp_path / "q")]) == 0
    assert (tmp_path / "q" / "quantized.safetensors").exists()
