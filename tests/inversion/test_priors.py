import torch

from smi.inversion.priors import blur_, image_l2, total_variation


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


def test_blur_spreads_an_impulse_into_the_binomial_kernel():
    x = torch.zeros(1, 2, 5, 5)
    x[0, 0, 2, 2] = 16.0
    blur_(x, 0.5)
    expected = torch.zeros(5, 5)
    expected[1:4, 1:4] = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]) * 0.5
    expected[2, 2] += 8.0  # half of the impulse stays where it was
    torch.testing.assert_close(x[0, 0], expected)
    assert torch.equal(x[0, 1], torch.zeros(5, 5))  # channels are blurred apart


def test_blur_leaves_a_constant_image_alone_up_to_its_border():
    x = torch.full((2, 1, 4, 6), 0.7)
    torch.testing.assert_close(blur_(x.clone(), 1.0), x)
