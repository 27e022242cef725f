import itertools

import pytest
import torch

from smi.inversion.augment import (
    Jitter,
    apply_jitter,
    color_shift,
    crop_resize,
    fill_background,
    jitter_indices,
    pixel_mask_from_indices,
    sample_crops,
)


def _brute_force(idx: torch.Tensor, grid, patch, j: Jitter) -> torch.Tensor:
    """Paint each patch with its index, move the picture, read each patch's index back."""
    gh, gw = grid
    ids = torch.arange(gh * gw, dtype=torch.float32).view(1, 1, gh, 1, gw, 1)
    img = ids.expand(1, 1, gh, patch, gw, patch).reshape(1, 1, gh * patch, gw * patch)
    moved = apply_jitter(img, j)[0, 0]
    where = {}
    for r, c in itertools.product(range(gh), range(gw)):
        cell = moved[r * patch:(r + 1) * patch, c * patch:(c + 1) * patch]
        assert torch.all(cell == cell[0, 0]), "a shifted patch must stay one grid cell"
        where[int(cell[0, 0])] = r * gw + c
    return torch.tensor([[where[int(i)] for i in row] for row in idx])


@pytest.mark.parametrize("grid", [(4, 4), (3, 5)])
@pytest.mark.parametrize("dy,dx,flip", [(0, 0, False), (1, 0, False), (0, -2, False), (2, 3, True), (-1, -1, True),
                                        (0, 0, True), (5, -7, True)])
def test_jitter_indices_match_brute_force(grid, dy, dx, flip):
    patch = 3
    n = grid[0] * grid[1]
    idx = torch.stack([torch.randperm(n, generator=torch.Generator().manual_seed(s))[:7] for s in range(3)])
    j = Jitter(dy * patch, dx * patch, flip)
    assert torch.equal(jitter_indices(idx, grid, patch, j), _brute_force(idx, grid, patch, j))


def test_jitter_rejects_sub_patch_shift():
    with pytest.raises(ValueError):
        jitter_indices(torch.zeros(1, 1, dtype=torch.long), (4, 4), 4, Jitter(2, 0, False))


def test_pixel_mask():
    m = pixel_mask_from_indices(torch.tensor([[0, 3]]), (2, 2), 2)
    assert m.shape == (1, 1, 4, 4)
    assert m[0, 0].tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]]


def test_color_shift_is_one_affine_map_per_image_and_channel():
    x = torch.randn(6, 3, 5, 5)
    y = color_shift(x, 0.5, torch.Generator().manual_seed(0))
    for b in range(6):
        for c in range(3):
            xs, ys = x[b, c].flatten(), y[b, c].flatten()
            scale = ((ys - ys.mean()) @ (xs - xs.mean())) / ((xs - xs.mean()) @ (xs - xs.mean()))  # least squares
            shift = ys.mean() - scale * xs.mean()
            torch.testing.assert_close(ys, scale * xs + shift, atol=1e-5, rtol=1e-5)
            assert torch.exp(torch.tensor(-0.5)) <= scale <= torch.exp(torch.tensor(0.5))
            assert -0.5 <= shift <= 0.5
    scales = (y[:, :, 0, 0] - y[:, :, 0, 1]) / (x[:, :, 0, 0] - x[:, :, 0, 1])
    assert scales.flatten().unique().numel() == 18  # drawn per image and channel
    assert torch.equal(y, color_shift(x, 0.5, torch.Generator().manual_seed(0)))  # from the generator alone


def test_fill_background_changes_only_stopped_patches_within_the_range():
    """Kept patches are untouched; each stopped patch becomes a flat level per image and channel (noise 0) or that
    level plus noise, always inside the valid range; levels differ between images."""
    grid, patch = (4, 4), 2
    x = torch.randn(5, 3, 8, 8) * 3
    idx = torch.stack([torch.randperm(16, generator=torch.Generator().manual_seed(b))[:6] for b in range(5)])
    lo, hi = torch.full((1, 3, 1, 1), -1.5), torch.full((1, 3, 1, 1), 2.0)
    kept = pixel_mask_from_indices(idx, grid, patch).bool().expand_as(x)
    flat = fill_background(x, idx, grid, patch, lo, hi, 0.0, torch.Generator().manual_seed(0))
    assert torch.equal(flat[kept], x[kept])
    for b in range(5):
        for c in range(3):
            stopped = flat[b, c][~kept[b, c]]
            assert stopped.numel() == 10 * 4 and torch.all(stopped == stopped[0]) and -1.5 <= stopped[0] <= 2.0
    assert len({round(float(flat[b, 0][~kept[b, 0]][0]), 6) for b in range(5)}) == 5
    noisy = fill_background(x, idx, grid, patch, lo, hi, 0.25, torch.Generator().manual_seed(0))
    assert torch.equal(noisy[kept], x[kept])
    assert (noisy[~kept] >= -1.5).all() and (noisy[~kept] <= 2.0).all()
    assert noisy[0, 0][~kept[0, 0]].std() > 0
    assert torch.equal(noisy, fill_background(x, idx, grid, patch, lo, hi, 0.25, torch.Generator().manual_seed(0)))
    black = fill_background(x, idx, grid, patch, lo, hi, 0.0, torch.Generator().manual_seed(0), level=0.0)
    assert torch.equal(black[kept], x[kept]) and torch.all(black[~kept] == -1.5)  # the lowest valid pixel
    mid = fill_background(x, idx, grid, patch, lo, hi, 0.0, torch.Generator().manual_seed(0), level=0.5)
    assert torch.allclose(mid[~kept], torch.tensor(0.25))  # halfway between -1.5 and 2.0
    textured = fill_background(x, idx, grid, patch, lo, hi, 0.25, torch.Generator().manual_seed(0), level=0.0)
    assert torch.all(textured[~kept] >= -1.5) and textured[~kept].max() > -1.5  # noise above black, clamped below


def test_crop_resize_samples_the_box_bilinearly():
    """On a ramp (value = column index) bilinear sampling is exact, so every output pixel must equal the input
    coordinate its centre maps to: column ``a + (j + 0.5) * w / W - 0.5`` for a box from column a, w wide."""
    H, W = 12, 16
    ramp = torch.arange(W, dtype=torch.float64).expand(2, 1, H, W).clone()
    # box 1: columns 4..12 (8 wide), rows 0..12; box 2: the whole image
    boxes = torch.tensor([[(2 * 4 + 8) / W - 1, 0.0, 8 / W, 1.0], [0.0, 0.0, 1.0, 1.0]], dtype=torch.float64)
    out = crop_resize(ramp, boxes)
    j = torch.arange(W, dtype=torch.float64)
    expected = (4 + (j + 0.5) * 8 / W - 0.5).clamp(0, W - 1)
    assert torch.allclose(out[0, 0], expected.expand(H, W), atol=1e-9)
    assert torch.allclose(out[1], ramp[1], atol=1e-9)  # the whole-image box is the identity


def test_sampled_crops_fit_the_image_and_cover_the_asked_area():
    boxes = sample_crops(4000, 0.5, torch.Generator().manual_seed(0))
    cx, cy, w, h = boxes.unbind(1)
    assert torch.all(cx.abs() <= 1 - w + 1e-6) and torch.all(cy.abs() <= 1 - h + 1e-6)  # inside the image
    area = w * h  # the image's own half-sides are 1, so this is the fraction of its area
    assert area.min() >= 0.5 - 1e-6 and area.max() <= 1 + 1e-6
    assert area.min() < 0.55 and area.max() > 0.95  # the whole range is drawn
    assert torch.equal(sample_crops(8, 0.5, torch.Generator().manual_seed(1)),
                       sample_crops(8, 0.5, torch.Generator().manual_seed(1)))
