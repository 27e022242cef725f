import dataclasses
import math

import pytest
import torch

from smi.errors import SmiError
from smi.inversion.augment import pixel_mask_from_indices
from smi.inversion.config import InversionConfig, SparsityConfig
from smi.inversion.engine import invert, valid_range

SPARSE = InversionConfig(iterations=10, batch_size=3, sparsity=SparsityConfig.parse("3:0.5,6:0.5"))
TARGETS = torch.tensor([0, 1, 2])


def _run(teacher, cfg=SPARSE, seed=0, **kwargs):
    steps = []

    def record(info):
        steps.append((info.iteration, info.images.clone(), info.keep.clone()))

    batch = invert(teacher, cfg, TARGETS, generator=torch.Generator().manual_seed(seed), callback=record, **kwargs)
    return batch, steps


def _patch_values(x, patch=8):
    B, C, H, W = x.shape
    x = x.reshape(B, C, H // patch, patch, W // patch, patch).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(B, -1, C * patch * patch)  # (B, N, C*p*p)


@pytest.mark.parametrize("cfg", [SPARSE, dataclasses.replace(SPARSE, blur=0.5, color_shift=1.0)],
                         ids=["plain", "blur-and-color-shift"])
def test_stopped_patches_never_change_and_mask_is_what_was_optimized(tiny_teacher, cfg):
    batch, steps = _run(tiny_teacher, cfg)
    final_iter, final_x, final_keep = steps[-1]
    assert batch.mask.sum(1).tolist() == [4, 4, 4]
    for b in range(3):
        assert set(final_keep[b].tolist()) == set(batch.mask[b].nonzero().flatten().tolist())
    for b in range(3):
        for n in range(16):
            # the first step after which patch n is no longer optimized
            stop = next((it for it, _, keep in steps if n not in keep[b].tolist()), None)
            traj = [_patch_values(x)[b, n] for _, x, _ in steps]
            if stop is None:  # kept to the end: it was still being updated at the last step
                assert batch.mask[b, n]
                assert not torch.equal(traj[-1], traj[-2])
            else:
                assert not batch.mask[b, n]
                for later in traj[stop:]:
                    assert torch.equal(later, traj[stop - 1]), f"patch {n} of image {b} moved after iteration {stop}"


def test_returned_images_zero_stopped_patches(tiny_teacher):
    batch, steps = _run(tiny_teacher)
    x = steps[-1][1]
    m = pixel_mask_from_indices(steps[-1][2], (4, 4), 8)
    torch.testing.assert_close(batch.images, x * m)


def test_stopped_patches_leave_the_forward_pass(tiny_teacher):
    tokens = []
    hook = tiny_teacher.model.blocks[0].register_forward_pre_hook(lambda m, a: tokens.append(a[0].shape[1]))
    try:
        _run(tiny_teacher, recompute="never")  # recomputed blocks run their forward (and this hook) again
    finally:
        hook.remove()
    # 1 class token + kept patches; last entry is the final (un-jittered) evaluation
    assert tokens[:3] == [17] * 3 and tokens[3:6] == [9] * 3 and tokens[6:10] == [5] * 4


def test_teacher_weights_get_no_gradient(tiny_teacher):
    _run(tiny_teacher)
    assert all(p.grad is None and not p.requires_grad for p in tiny_teacher.model.parameters())


def test_deterministic_for_a_seed(tiny_teacher):
    a, _ = _run(tiny_teacher, seed=3)
    b, _ = _run(tiny_teacher, seed=3)
    c, _ = _run(tiny_teacher, seed=4)
    assert torch.equal(a.images, b.images) and torch.equal(a.mask, b.mask)
    assert not torch.equal(a.images, c.images)


def test_color_shift_and_blur_change_the_images_and_stay_deterministic(tiny_teacher):
    plain, _ = _run(tiny_teacher, seed=3)
    for cfg in (dataclasses.replace(SPARSE, color_shift=1.0), dataclasses.replace(SPARSE, blur=0.5)):
        a, _ = _run(tiny_teacher, cfg, seed=3)
        b, _ = _run(tiny_teacher, cfg, seed=3)
        assert torch.equal(a.images, b.images) and not torch.equal(a.images, plain.images)


def test_crops_change_dense_images_and_stay_deterministic(tiny_teacher):
    dense = dataclasses.replace(SPARSE, sparsity=SparsityConfig(()))
    plain, _ = _run(tiny_teacher, dense, seed=3)
    a, _ = _run(tiny_teacher, dataclasses.replace(dense, crop=0.5), seed=3)
    b, _ = _run(tiny_teacher, dataclasses.replace(dense, crop=0.5), seed=3)
    assert torch.equal(a.images, b.images) and not torch.equal(a.images, plain.images)
    with pytest.raises(SmiError, match="crop is dense-only"):  # kept patches given: sparse, whatever the schedule
        _run(tiny_teacher, dataclasses.replace(dense, crop=0.5), keep=torch.zeros(3, 2, dtype=torch.long))


def test_pixels_stay_in_valid_range(tiny_teacher):
    batch, steps = _run(tiny_teacher)
    lo, hi = valid_range(tiny_teacher.mean, tiny_teacher.std, "cpu")
    for _, x, _ in steps:
        assert torch.all(x >= lo - 1e-6) and torch.all(x <= hi + 1e-6)


def test_dense_keeps_everything(tiny_teacher):
    cfg = InversionConfig(iterations=5, batch_size=3, sparsity=SparsityConfig.parse("dense"))
    batch, steps = _run(tiny_teacher, cfg)
    assert batch.mask.all()
    torch.testing.assert_close(batch.images, steps[-1][1])


def test_inversion_lowers_the_loss(tiny_teacher):
    cfg = InversionConfig(iterations=60, batch_size=3, sparsity=SparsityConfig.parse("20:0.3"))
    losses = []
    invert(tiny_teacher, cfg, TARGETS, callback=lambda i: losses.append(i.loss))
    # a random-init teacher has nearly flat logits (CE starts near ln 5), so only ask for a clear decrease
    assert sum(losses[-5:]) / 5 < 0.95 * sum(losses[:5]) / 5


def test_nan_loss_stops_with_a_message_naming_the_learning_rate(tiny_teacher):
    init = torch.full((3, 3, 32, 32), float("nan"))
    with pytest.raises(SmiError, match="learning rate"):
        invert(tiny_teacher, SPARSE, TARGETS, init=init)


@pytest.mark.parametrize("every", [1, 4, 50])
def test_a_loss_read_every_n_steps_stops_at_the_same_iteration(tiny_teacher, monkeypatch, every):
    """On an accelerator the loop reads its finiteness check every SYNC_EVERY steps, not every step: the
    error still names the first bad iteration and its value, and no image leaves invert."""
    import smi.inversion.engine as engine

    monkeypatch.setattr(engine, "sync_every", lambda device: every)
    calls = {"n": 0}

    def poison(_m, _inp, out):  # finite for the first 6 forwards (iterations), NaN from iteration 7
        calls["n"] += 1
        return out * float("nan") if calls["n"] > 6 else out

    cfg = InversionConfig(iterations=10, batch_size=3, sparsity=SparsityConfig.parse("dense"))
    steps = []
    handle = tiny_teacher.model.head.register_forward_hook(poison)
    try:
        with pytest.raises(SmiError, match="loss became nan at iteration 7; lower the learning rate"):
            invert(tiny_teacher, cfg, TARGETS, callback=lambda i: steps.append(i.iteration))
    finally:
        handle.remove()
    # the run stops at the first read after iteration 7: at 7 itself, at 8 (a multiple of 4), at 10 (the last)
    assert steps == list(range(1, {1: 7, 4: 8, 50: 10}[every]))
    losses = {}
    for n in (1, 5):  # the same losses reach a callback whichever the read interval
        monkeypatch.setattr(engine, "sync_every", lambda device, n=n: n)
        losses[n] = []
        invert(tiny_teacher, cfg, TARGETS, callback=lambda i, n=n: losses[n].append(i.loss))
    assert losses[1] == losses[5] and all(math.isfinite(v) for v in losses[1])


@pytest.mark.parametrize("targets", [torch.tensor([0, 7]), torch.tensor([-1]), torch.zeros(0, dtype=torch.long)])
def test_bad_targets(tiny_teacher, targets):
    with pytest.raises(SmiError, match="targets"):
        invert(tiny_teacher, SPARSE, targets)


def test_initial_keep_is_honoured(tiny_teacher):
    keep = torch.tensor([[0, 5, 10, 15]] * 3)
    cfg = InversionConfig(iterations=4, batch_size=3, sparsity=SparsityConfig(()))
    batch = invert(tiny_teacher, cfg, TARGETS, keep=keep)
    assert batch.mask.nonzero()[:, 1].view(3, 4).tolist() == keep.tolist()


def test_cnn_teachers_invert_dense_and_refuse_sparse():
    import timm

    from tests.conftest import as_teacher

    cnn = as_teacher(timm.create_model("resnet10t", num_classes=5), spec="resnet10t")
    cfg = InversionConfig(iterations=3, batch_size=3, sparsity=SparsityConfig(()))
    batch = invert(cnn, cfg, TARGETS)
    assert batch.images.shape == (3, 3, 32, 32) and torch.isfinite(batch.loss).all()
    with pytest.raises(SmiError, match="use --sparsity dense"):
        invert(cnn, SPARSE, TARGETS)


@pytest.mark.parametrize("method", ["deepinversion", "psaq", "mimiq", "ris", "sardfq"])
def test_recomputed_blocks_give_the_same_images_step_by_step(method):
    from tests.conftest import as_teacher, tiny_vit

    teacher = as_teacher(tiny_vit(depth=3))  # the ranking block (the last) has blocks before it
    cfg = InversionConfig.for_method(method, iterations=10, batch_size=3,
                                     sparsity=SparsityConfig.parse("3:0.5,6:0.5"))
    runs = {mode: _run(teacher, cfg, recompute=mode) for mode in ("never", "auto", "always")}
    (ref, ref_steps) = runs["never"]
    for mode in ("auto", "always"):
        batch, steps = runs[mode]
        assert torch.equal(batch.images, ref.images) and torch.equal(batch.mask, ref.mask), mode
        assert torch.equal(batch.loss, ref.loss), mode
        assert all(torch.equal(a[1], b[1]) for a, b in zip(steps, ref_steps, strict=True)), mode


def test_recompute_always_on_a_dense_run_gives_the_same_images(tiny_teacher):
    dense = dataclasses.replace(SPARSE, sparsity=SparsityConfig(()))
    a, _ = _run(tiny_teacher, dense, recompute="never")
    b, _ = _run(tiny_teacher, dense, recompute="always")
    assert torch.allclose(a.images, b.images, atol=1e-6, rtol=0)  # timm's forward vs smi's: same ops, maybe fused


def test_auto_recomputes_exactly_the_steps_before_the_last_stop(tiny_teacher, monkeypatch):
    import smi.models.sparse as sparse

    tokens = []
    real = sparse.checkpoint_seq

    def spy(blocks, x, **kw):
        tokens.append(x.shape[1])
        return real(blocks, x, **kw)

    monkeypatch.setattr(sparse, "checkpoint_seq", spy)
    _run(tiny_teacher, recompute="auto")  # 16 patches -> 8 after step 3 -> 4 after step 6, 10 steps
    # steps 1-6 run with 16 or 8 patches (+ the class token); the rank steps 3 and 6 checkpoint the blocks
    # around the ranking block (the last here: one call, before it); steps 7-10 keep 4 patches and are not recomputed
    assert tokens == [17, 17, 17, 9, 9, 9]
    tokens.clear()
    _run(tiny_teacher, recompute="never")
    assert tokens == []


def test_recompute_keeps_only_each_blocks_input_for_backward():
    from smi.models.sparse import sparse_forward
    from tests.conftest import tiny_vit

    vit = tiny_vit(depth=6).requires_grad_(False)
    x = torch.randn(4, 3, 32, 32, requires_grad=True)

    def saved_bytes(recompute):
        total = []

        def pack(t):
            total.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = sparse_forward(vit, x, recompute=recompute).logits
        out.sum().backward()  # and backward still works
        return sum(total)

    kept, recomputed = saved_bytes(False), saved_bytes(True)
    assert recomputed < kept / 4, (kept, recomputed)


def test_bad_recompute_settings_are_refused(tiny_teacher):
    import timm

    from tests.conftest import as_teacher

    with pytest.raises(SmiError, match="must be one of auto, always, never"):
        invert(tiny_teacher, SPARSE, TARGETS, recompute="sometimes")
    cnn = as_teacher(timm.create_model("resnet10t", num_classes=5), spec="resnet10t")
    with pytest.raises(SmiError, match="'always' recomputes the blocks of a timm ViT"):
        invert(cnn, dataclasses.replace(SPARSE, sparsity=SparsityConfig(())), TARGETS, recompute="always")


@pytest.mark.parametrize("sparsity", ["dense", "3:0.5,6:0.5"])
def test_bf16_runs_the_teachers_products_in_bf16_and_keeps_the_images_fp32(tiny_teacher, sparsity):
    cfg = InversionConfig(iterations=30, batch_size=3, sparsity=SparsityConfig.parse(sparsity))
    seen = []
    handle = tiny_teacher.model.head.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    try:
        losses = []
        half = invert(tiny_teacher, dataclasses.replace(cfg, precision="bf16"), TARGETS,
                      callback=lambda i: losses.append(i.loss))
    finally:
        handle.remove()
    full = invert(tiny_teacher, cfg, TARGETS)
    assert torch.bfloat16 in seen  # the loop's forwards ran under autocast ...
    assert half.images.dtype == torch.float32 and torch.isfinite(half.images).all()  # ... the images did not
    assert not torch.equal(half.images, full.images)
    assert sum(losses[-5:]) < sum(losses[:5])  # it still optimizes
    assert half.loss.dtype == torch.float32  # the final per-image loss is measured in fp32 either way


def test_precision_is_recorded_only_when_not_fp32():
    assert "precision" not in InversionConfig().to_dict()  # pools made before the setting existed still resume
    d = InversionConfig(precision="bf16").to_dict()
    assert d["precision"] == "bf16" and InversionConfig.from_dict(d).precision == "bf16"
    with pytest.raises(SmiError, match="precision.*fp32 or bf16"):
        InversionConfig(precision="fp16")
