import pytest
import timm
import torch
from timm.models.deit import VisionTransformerDistilled

from smi.errors import SmiError
from smi.models.sparse import AttentionCapture, patchify, rank_patches, sparse_forward
from tests.conftest import tiny_vit

SMALL = dict(embed_dim=32, depth=2, num_heads=2)
ARCHS = {
    "class_token": lambda: tiny_vit(),
    "class_token_no_embed_class": lambda: tiny_vit(no_embed_class=True),
    "registers": lambda: tiny_vit(reg_tokens=4, no_embed_class=True),
    "avg_pool_no_class_token": lambda: tiny_vit(class_token=False, global_pool="avg"),
    "avg_pool_registers": lambda: tiny_vit(class_token=False, global_pool="avg", reg_tokens=2, no_embed_class=True),
    "distilled": lambda: VisionTransformerDistilled(img_size=32, patch_size=8, num_classes=5, **SMALL).eval(),
    "timm_test_vit": lambda: timm.create_model("test_vit", num_classes=5).eval(),
    "deit_tiny_shape": lambda: timm.create_model("deit_tiny_patch16_224", depth=2).eval(),
    "deit_small_distilled_shape": lambda: timm.create_model("deit_small_distilled_patch16_224", depth=1).eval(),
    "shipped_stem": lambda: timm.create_model("fmnist_vit_tiny").eval(),
}


def _input(model):
    pe = model.patch_embed
    C = pe.proj.in_channels if hasattr(pe.proj, "in_channels") else pe.proj[0].in_channels
    H, W = pe.img_size
    return torch.randn(2, C, H, W, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", ARCHS)
def test_all_patches_kept_matches_timm(name):
    model = ARCHS[name]()
    x = _input(model)
    n = model.patch_embed.num_patches
    with torch.no_grad():
        ref = model(x)
        idx = torch.arange(n).expand(2, n)
        out = sparse_forward(model, x, idx, return_importance=True)
        dense = sparse_forward(model, x)
    torch.testing.assert_close(out.logits, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dense.logits, ref, atol=1e-5, rtol=1e-5)
    assert out.importance.shape == (2, n)
    assert all(b.attn.fused_attn == timm.layers.use_fused_attn() for b in model.blocks)  # restored


@pytest.mark.parametrize("name", ["class_token", "avg_pool_no_class_token", "shipped_stem", "distilled"])
def test_permuted_and_subset_tokens(name):
    """Token order is irrelevant, and a subset equals the model run on those patches alone."""
    model = ARCHS[name]()
    x = _input(model)
    n = model.patch_embed.num_patches
    sub = torch.stack([torch.randperm(n, generator=torch.Generator().manual_seed(s))[: n // 2] for s in (0, 1)])
    with torch.no_grad():
        a = sparse_forward(model, x, sub).logits
        b = sparse_forward(model, x, sub.sort(1).values).logits
        # what the other patches hold does not matter
        noisy = x + 5 * torch.randn_like(x) * _stopped_pixels(model, sub, x)
        c = sparse_forward(model, noisy, sub).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-5)


def _stopped_pixels(model, idx, x):
    from smi.inversion.augment import pixel_mask_from_indices

    p = model.patch_embed.patch_size[0]
    return 1 - pixel_mask_from_indices(idx, tuple(model.patch_embed.grid_size), p)


def test_importance_is_cls_attention_of_last_block():
    model = tiny_vit()
    x = _input(model)
    n = model.patch_embed.num_patches
    with torch.no_grad():
        out = sparse_forward(model, x, torch.arange(n).expand(2, n), return_importance=True)
        # independent path: recompute the last block's attention by hand from its input
        captured = {}
        h = model.blocks[-1].register_forward_pre_hook(lambda m, a: captured.setdefault("x", a[0]))
        model(x)
        h.remove()
        attn = model.blocks[-1].attn
        t = model.blocks[-1].norm1(captured["x"])
        qkv = attn.qkv(t).reshape(2, -1, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        a = (qkv[0] @ qkv[1].transpose(-2, -1) * attn.scale).softmax(-1)
    torch.testing.assert_close(out.importance, a.mean(1)[:, 0, 1:], atol=1e-6, rtol=1e-5)


def test_attention_capture_equals_fused_path():
    model = tiny_vit()
    x = _input(model)
    with torch.no_grad():
        ref = model(x)
        with AttentionCapture(model.blocks[0].attn) as cap:
            out = model(x)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
    assert cap.attn.shape == (2, 2, 17, 17)
    torch.testing.assert_close(cap.attn.sum(-1), torch.ones(2, 2, 17))


def test_patchify_row_major():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    p = patchify(x, 2)
    assert p.shape == (1, 4, 1, 2, 2)
    assert p[0, 1, 0].tolist() == [[2.0, 3.0], [6.0, 7.0]]


@pytest.mark.parametrize(
    "name,kwargs", [("resnet10t", {}), ("swin_tiny_patch4_window7_224", dict(depths=(1, 1, 1, 1)))]
)
def test_unsupported_models_raise_one_clear_error(name, kwargs):
    model = timm.create_model(name, **kwargs).eval()
    with pytest.raises(SmiError, match="VisionTransformer"):
        sparse_forward(model, torch.randn(1, 3, 224, 224), torch.zeros(1, 4, dtype=torch.long))


def test_rank_patches_follows_the_schedule_over_the_kept_tokens():
    model = tiny_vit()
    x = _input(model)
    n = model.patch_embed.num_patches
    with torch.no_grad():
        first = sparse_forward(model, x, torch.arange(n).expand(2, n), return_importance=True).importance
    one = rank_patches(model, x, [n // 2])
    # one stop: the n/2 patches of highest class-token attention over all of them
    assert torch.equal(one, first.topk(n // 2, dim=1).indices.sort(dim=1).values)
    two = rank_patches(model, x, [n // 2, n // 4])
    assert two.shape == (2, n // 4) and all(set(b.tolist()) <= set(a.tolist()) for a, b in zip(one, two, strict=True))
    # the second stop ranks by attention among the kept tokens only (not the first ranking cut shorter)
    with torch.no_grad():
        again = sparse_forward(model, x, one, return_importance=True).importance
    assert torch.equal(two, one.gather(1, again.topk(n // 4, dim=1).indices).sort(dim=1).values)
