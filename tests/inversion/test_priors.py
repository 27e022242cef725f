import torch

from smi.inversion.priors import image_l2, total_variation


def test_tv_of_constant_image_is_zero():
    l1, l2 = total_variation(torch.full((2, 3, 8, 8), 0.7))
    assert l1.item() == 0 and l2.item() == 0


def test_tv_matches_hand_computation():
    x = torch.zeros(1, 1, 2, 2)
    x[0, 0, 0, 0] = 1.0  # differences: right 1 (one pair of two), down 1 (one of two), diagonals: 1 and 0
    l1, l2 = total_variation(x)
    assert torch.isclose(l2, torch.tensor(3.0))  # three directions with one unit difference each
    assert torch.isclose(l1, torch.tensor(0.5 + 0.5 + 0.0 + 1.0))


def test_tv_gives_no_gradient_to_stopped_pixels():
    x = torch.randn(1, 1, 6, 6, requires_grad=True)
    mask = torch.ones(1, 1, 6, 6)
    mask[..., :3, :3] = 0
    _, l2 = total_variation(x, mask)
    l2.backward()
    assert torch.all(x.grad[..., :3, :3] == 0)
    assert torch.any(x.grad[..., 3:, 3:] != 0)


def test_tv_with_full_mask_equals_unmasked():
    x = torch.randn(2, 3, 5, 5)
    a = total_variation(x)
    b = total_variation(x, torch.ones(2, 1, 5, 5))
    torch.testing.assert_close(a, b)


def test_image_l2():
    x = torch.tensor([[[[3.0, 4.0]]], [[[0.0, 0.0]]]])
    assert torch.isclose(image_l2(x), torch.tensor(2.5))
