"""Each loss term against an answer worked out independently on a tiny input."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from smi.errors import SmiError
from smi.inversion import InversionConfig, SparsityConfig, invert
from smi.inversion.augment import Jitter, jitter_indices, rejitter
from smi.inversion.labels import easy_to_hard, sample_labels, soft_cross_entropy
from smi.inversion.terms.bn import bn_statistics
from smi.inversion.terms.mimiq import head_agreement, ssim_global
from smi.inversion.terms.psaq import kde_entropy, patch_similarity_entropy
from smi.inversion.terms.ris_weight import with_weight_noise
from smi.inversion.terms.sardfq import gaussian_mixture_attention, sardfq_attention_alignment
from smi.inversion.terms.tv_target import tv_target
from tests.conftest import as_teacher, tiny_vit

OPTS = {"sardfq_logit_low": 5.0, "sardfq_logit_high": 10.0, "ris_label_noise": 0.5, "p_mix": 0.4, "mix_k": 2}


def _phi(z: float) -> float:
    return 0.5 * (1 + math.erf(z / math.sqrt(2)))


def test_kde_entropy_of_a_uniform_sample_matches_the_closed_form():
    # for many samples evenly filling [0, 1], the Gaussian KDE is the uniform density smoothed by the
    # kernel: p(t) = Phi((1 - t) / h) - Phi(-t / h); integrate -p log(p + 1e-4) by the trapezoid rule
    h, P = 0.01, 10
    samples = torch.linspace(0, 1, 200_001, dtype=torch.float64)[None]
    ts = [k / (P - 1) for k in range(P)]
    f = [-(p := _phi((1 - t) / h) - _phi(-t / h)) * math.log(p + 1e-4) for t in ts]
    expected = sum((f[k] + f[k + 1]) / 2 * (ts[k + 1] - ts[k]) for k in range(P - 1))
    got = kde_entropy(samples, bandwidth=h, points=P)
    assert got.shape == (1,)
    assert got.item() == pytest.approx(expected, rel=1e-3)
    assert expected == pytest.approx(2 * (1 / 18) * (-0.5 * math.log(0.5 + 1e-4)), rel=0.01)  # edges dominate


def test_kde_entropy_is_higher_for_spread_samples():
    g = torch.Generator().manual_seed(0)
    narrow = 0.5 + 0.001 * torch.randn(1, 500, generator=g)
    wide = torch.rand(1, 500, generator=g)
    assert kde_entropy(wide) > kde_entropy(narrow)


def _entropy_on_grid(row: np.ndarray, lo: float, hi: float, h: float, points: int = 10) -> float:
    """Independent numpy version: Gaussian KDE on a fixed grid, -p log(p + 1e-4), trapezoid rule."""
    t = np.linspace(lo, hi, points)
    p = np.exp(-0.5 * ((t[:, None] - row[None, :]) / h) ** 2).mean(1) / (h * math.sqrt(2 * math.pi))
    f = -p * np.log(p + 1e-4)
    return float(((f[1:] + f[:-1]) / 2 * np.diff(t)).sum())


def test_kde_entropy_evaluation_points_are_constants():
    # PSAQ-ViT evaluates the densities of a batch on one grid from the batch's min to its max, fixed
    # for the step: values and gradients must match a fixed-grid estimate (finite differences)
    g = torch.Generator().manual_seed(4)
    x = (0.2 * torch.randn(2, 30, generator=g, dtype=torch.float64)).requires_grad_()
    xs = x.detach().numpy().copy()
    lo, hi, h = xs.min(), xs.max(), 0.05
    got = kde_entropy(x, bandwidth=h)
    for r in range(2):
        assert got[r].item() == pytest.approx(_entropy_on_grid(xs[r], lo, hi, h), rel=1e-9)
    got.sum().backward()
    e = 1e-6
    for r, i in [(0, 3), (1, 7), (0, int(xs[0].argmax())), (1, int(xs[1].argmin()))]:
        up, down = xs[r].copy(), xs[r].copy()
        up[i] += e
        down[i] -= e
        fd = (_entropy_on_grid(up, lo, hi, h) - _entropy_on_grid(down, lo, hi, h)) / (2 * e)
        assert x.grad[r, i].item() == pytest.approx(fd, rel=1e-5, abs=1e-9)


def test_patch_similarity_entropy_uses_the_head_mean_and_off_diagonal_cosines():
    g = torch.Generator().manual_seed(1)
    attn_out = torch.randn(2, 1 + 5, 3, 4, generator=g)  # (B, T, heads, d); 1 class token, 5 patches
    got = patch_similarity_entropy(attn_out, num_prefix=1)
    sims = []
    for b in range(2):
        v = attn_out[b, 1:].mean(1).double().numpy()  # (5, 4), heads averaged
        v = v / np.linalg.norm(v, axis=1, keepdims=True)
        sims.append([float(v[i] @ v[j]) for i in range(5) for j in range(5) if i != j])
    span = (min(map(min, sims)), max(map(max, sims)))  # one grid for the batch
    for b in range(2):
        expected = kde_entropy(torch.tensor([sims[b]], dtype=torch.float64), span=span)
        assert got[b].item() == pytest.approx(expected.item(), rel=1e-4)


def test_ssim_of_identical_maps_is_one_and_matches_the_formula():
    g = torch.Generator().manual_seed(2)
    x, y = torch.rand(7, generator=g, dtype=torch.float64), torch.rand(7, generator=g, dtype=torch.float64)
    assert ssim_global(x, x).item() == pytest.approx(1.0)
    xs, ys = x.numpy(), y.numpy()
    c1, c2 = 0.01**2, 0.03**2
    cov = ((xs - xs.mean()) * (ys - ys.mean())).mean()
    expected = ((2 * xs.mean() * ys.mean() + c1) * (2 * cov + c2)) / (
        (xs.mean() ** 2 + ys.mean() ** 2 + c1) * (xs.var() + ys.var() + c2))
    assert ssim_global(x, y).item() == pytest.approx(expected)


def test_head_agreement_is_zero_for_identical_heads_and_one_minus_ssim_squared_otherwise():
    g = torch.Generator().manual_seed(3)
    one = torch.softmax(torch.randn(1, 1, 4, 4, generator=g), -1)
    assert head_agreement(one.expand(1, 3, 4, 4)).item() == pytest.approx(0.0, abs=1e-6)
    two = torch.softmax(torch.randn(1, 2, 4, 4, generator=g, dtype=torch.float64), -1)
    rows = []
    for q in range(4):  # numpy: min-max normalize each head's row, global SSIM, 1 - SSIM^2
        a, b = two[0, 0, q].numpy(), two[0, 1, q].numpy()
        a, b = (a - a.min()) / (a.max() - a.min()), (b - b.min()) / (b.max() - b.min())
        cov = ((a - a.mean()) * (b - b.mean())).mean()
        ssim = ((2 * a.mean() * b.mean() + 1e-4) * (2 * cov + 9e-4)) / (
            (a.mean() ** 2 + b.mean() ** 2 + 1e-4) * (a.var() + b.var() + 9e-4))
        rows.append(1 - ssim**2)
    assert head_agreement(two).item() == pytest.approx(sum(rows) / 4)
    assert head_agreement(two).item() > 0.01  # the two heads differ
    assert head_agreement(one).item() == 0.0  # one head: no pair, zero (not the NaN of an empty mean)


def test_sardfq_alignment_is_zero_on_the_prior_and_depth_weighted():
    g = torch.Generator().manual_seed(4)
    prior = gaussian_mixture_attention((3, 3), heads=2, components=2, sigma=(0.5, 1.0), generator=g, batch=1)
    assert prior.shape == (1, 2, 9) and torch.allclose(prior.sum(-1), torch.ones(1, 2))
    assert sardfq_attention_alignment([prior, prior], prior, None, depth=4).item() == pytest.approx(0.0)
    # block 2 of 4 off by d1, block 3 of 4 off by d2: weights 3/4 and 4/4
    a1 = torch.full((1, 2, 9), 1 / 9)
    m1 = F.mse_loss(a1, prior).item()
    got = sardfq_attention_alignment([a1, prior], prior, None, depth=4).item()
    assert got == pytest.approx((0.75 * m1 + 1.0 * 0.0) / 1.75)
    # sparse: only the kept patches, both sides renormalized over them
    keep = torch.tensor([[0, 4, 8]])
    sub = prior[:, :, [0, 4, 8]]
    assert sardfq_attention_alignment([sub], prior, keep, depth=1).item() == pytest.approx(0.0, abs=1e-12)


def test_single_narrow_gaussian_peaks_at_the_patch_nearest_its_centre():
    m = gaussian_mixture_attention((5, 5), heads=1, components=1, sigma=(0.3, 0.3),
                                     generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)  # the centre: row then column, uniform over the grid
    cy, cx = (torch.rand(1, 1, 1, 1, generator=g).item() * 4 for _ in range(2))
    assert m.argmax().item() == round(cy) * 5 + round(cx)
    d2 = torch.tensor([(r - cy) ** 2 + (c - cx) ** 2 for r in range(5) for c in range(5)])
    w = torch.exp(-d2 / (2 * 0.3**2))
    torch.testing.assert_close(m.flatten(), w / w.sum())


def test_bn_statistics():
    x = torch.randn(64, 3, 4, 4, dtype=torch.float64)
    mean = x.mean(dim=(0, 2, 3))
    var = x.permute(1, 0, 2, 3).flatten(1).var(1, unbiased=False)
    assert bn_statistics([x], [(mean, var)]).item() == pytest.approx(0.0, abs=1e-12)
    # running mean off by 1 in every channel: ||(1, 1, 1)|| = sqrt(3); first layer x10, second x1
    off = bn_statistics([x, x], [(mean + 1, var), (mean, var + 2)], first_weight=10.0).item()
    assert off == pytest.approx(10 * math.sqrt(3) + 2 * math.sqrt(3))


def test_soft_cross_entropy_equals_torch_with_probabilities():
    logits = torch.randn(5, 4)
    p = torch.softmax(torch.randn(5, 4), 1)
    torch.testing.assert_close(soft_cross_entropy(logits, p), F.cross_entropy(logits, p))
    y = torch.tensor([0, 1, 2, 3, 0])
    torch.testing.assert_close(soft_cross_entropy(logits, F.one_hot(y, 4).float()), F.cross_entropy(logits, y))
    assert tv_target(torch.tensor(7.0), 10.0).item() == 3.0


def test_label_samplers():
    g = torch.Generator().manual_seed(6)
    targets = torch.arange(10).repeat(100)
    sard = sample_labels("sardfq", targets, 10, g, OPTS)
    peak = sard.soft[torch.arange(1000), targets]
    lo, hi = math.exp(5) / (math.exp(5) + 9), math.exp(10) / (math.exp(10) + 9)  # softmax with other logits 0
    assert ((peak >= lo - 1e-6) & (peak <= hi + 1e-6)).all() and torch.equal(sard.hard, targets)
    ris = sample_labels("ris", targets, 10, g, OPTS)
    assert torch.allclose(ris.soft.sum(1), torch.ones(1000)) and (ris.soft.argmax(1) == targets).all()
    q = sample_labels("qimera", targets, 10, g, OPTS)
    mixed = (q.soft > 0).sum(1) == 2
    assert 0.3 < mixed.float().mean() < 0.5  # p_mix 0.4
    assert (q.soft[torch.arange(1000), targets] > 0).all()  # the planned class is always in the mixture
    assert torch.equal(q.hard[~mixed], targets[~mixed]) and torch.equal(q.hard, q.soft.argmax(1))
    assert torch.allclose(q.soft.sum(1), torch.ones(1000))


def test_easy_to_hard():
    g = torch.Generator().manual_seed(7)
    base = sample_labels("hard", torch.tensor([3, 1]), 5, g, OPTS)
    easy = easy_to_hard(base, 5, 0.0, 0.55, g)
    assert torch.equal(easy.soft, F.one_hot(torch.tensor([3, 1]), 5).float())
    hard = easy_to_hard(base, 5, 1.0, 0.55, g)
    assert hard.soft[0, 3].item() == pytest.approx(0.55) and hard.soft[1, 1].item() == pytest.approx(0.55)
    assert sorted(hard.soft[0].tolist())[-2] == pytest.approx(0.45)  # the rest on one other class


def test_rejitter_maps_kept_patches_between_views():
    grid, patch = (4, 4), 2
    keep = torch.tensor([[0, 5, 7, 10]])
    j1, j2 = Jitter(2, -4, True), Jitter(-2, 2, False)
    view1 = jitter_indices(keep, grid, patch, j1)
    assert torch.equal(rejitter(view1, j1, j2, grid, patch), jitter_indices(keep, grid, patch, j2))


def test_weight_noise_changes_the_output_but_not_the_model():
    model = tiny_vit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 32, 32)
    clean = model(x)
    noisy = with_weight_noise(model, lambda v, _k: model(v), 0.1, torch.Generator().manual_seed(0), x, None)
    assert not torch.allclose(noisy, clean)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    torch.testing.assert_close(model(x), clean)


def test_mean_pairwise_cosine():
    from smi.inversion.terms.diversity import mean_pairwise_cosine

    f = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
    # pairs (0,1): 0, (0,2): 1/sqrt2, (1,2): 1/sqrt2, each counted twice over 6 ordered pairs
    assert mean_pairwise_cosine(f).item() == pytest.approx(2 * (2 / math.sqrt(2)) / 6)
    assert mean_pairwise_cosine(torch.ones(4, 3)).item() == pytest.approx(1.0)


def test_divergences_match_their_formulas():
    from smi.inversion.terms.adversarial import divergence

    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 6, generator=gen), torch.randn(4, 6, generator=gen)
    p, q = a.softmax(1).double().numpy(), b.softmax(1).double().numpy()
    m = (p + q) / 2
    js = (0.5 * (p * np.log(p / m)).sum(1) + 0.5 * (q * np.log(q / m)).sum(1)).mean()
    kl = (p * np.log(p / q)).sum(1).mean()
    assert divergence(a, b, "js").item() == pytest.approx(js, rel=1e-5)
    assert divergence(a, b, "kl").item() == pytest.approx(kl, rel=1e-5)
    assert divergence(a, a, "js").abs() < 1e-6 and 0 < js < np.log(2)


def test_adversarial_images_raise_teacher_student_disagreement():
    """Inverting against a student with the adversarial term ends with images on which teacher and student disagree
    more than on images inverted without it (same seed, same everything else)."""
    from smi.inversion.terms.adversarial import divergence

    teacher = as_teacher(tiny_vit())
    student = tiny_vit(embed_dim=16, depth=1).requires_grad_(False)
    gaps = []
    for weight in (0.0, 20.0):
        cfg = InversionConfig(iterations=40, batch_size=4, sparsity=SparsityConfig(()), lr=0.05, tv_l2=0.0,
                              ce_weight=0.1, terms={"adversarial": weight} if weight else {})
        batch = invert(teacher, cfg, torch.tensor([0, 1, 2, 3]), generator=torch.Generator().manual_seed(1),
                       student=student, student_tokens=True)
        with torch.no_grad():
            gaps.append(divergence(teacher.model(batch.images), student(batch.images)).item())
    assert gaps[1] > 2 * gaps[0], gaps
    assert all(not p.requires_grad for p in student.parameters())


def test_adversarial_term_without_a_student_is_refused_before_any_work():
    teacher = as_teacher(tiny_vit())
    with pytest.raises(SmiError, match="needs a student"):
        invert(teacher, InversionConfig(iterations=2, batch_size=2, sparsity=SparsityConfig(()),
                                        terms={"adversarial": 1.0}), torch.arange(2))


def test_repulsion_matches_a_direct_sum():
    """tau * mean_i log(sum_{j != i} e^{s_ij / tau} + sum_k e^{s_ik / tau}), written out pair by pair."""
    from smi.inversion.terms.contrastive import repulsion

    gen = torch.Generator().manual_seed(0)
    f, bank, tau = torch.randn(3, 5, generator=gen), torch.randn(4, 5, generator=gen), 0.2

    def cos(a, b):
        return float(a @ b / (a.norm() * b.norm()))

    want = 0.0
    for i in range(3):
        terms = [math.exp(cos(f[i], f[j]) / tau) for j in range(3) if j != i]
        terms += [math.exp(cos(f[i], b) / tau) for b in bank]
        want += tau * math.log(sum(terms)) / 3
    assert repulsion(f, bank, tau).item() == pytest.approx(want, rel=1e-5)
    assert repulsion(f, None, tau).item() == pytest.approx(
        sum(tau * math.log(sum(math.exp(cos(f[i], f[j]) / tau) for j in range(3) if j != i)) for i in range(3)) / 3,
        rel=1e-5)
    lone = torch.randn(1, 5, requires_grad=True)
    assert repulsion(lone, None, tau).item() == 0.0  # nothing to repel
    repulsion(lone, None, tau).backward()
    assert torch.equal(lone.grad, torch.zeros(1, 5))


def test_repulsion_pushes_features_away_from_the_pool():
    """A gradient step on the term lowers the largest cosine similarity of the batch to the bank."""
    from smi.inversion.terms.contrastive import repulsion

    gen = torch.Generator().manual_seed(0)
    bank = torch.randn(16, 8, generator=gen)
    f = (bank[:4] + 0.3 * torch.randn(4, 8, generator=gen)).requires_grad_(True)  # near the pool

    def nearest(x):
        return (F.normalize(x, dim=1) @ F.normalize(bank, dim=1).T).max(1).values

    before = nearest(f.detach())
    repulsion(f, bank, 0.1).backward()
    after = nearest(f.detach() - 0.5 * f.grad)
    assert (after < before).all(), (before, after)


def test_contrastive_term_reads_the_pools_earlier_batches(tmp_path):
    """Batch b of a pool sees the teacher features of batches 0..b-1 (the same after a resume), and images made
    with the term are farther from each other in feature space than without it."""
    from smi.inversion.synthesis import PoolSynthesis, synthesize
    from smi.inversion.terms.contrastive import pool_features
    from smi.inversion.terms.diversity import mean_pairwise_cosine

    teacher = as_teacher(tiny_vit())
    sims = {}
    for weight in (0.0, 5.0):
        cfg = InversionConfig(iterations=30, batch_size=4, lr=0.1, sparsity=SparsityConfig(((10, 0.5),)),
                              terms={"contrastive": weight} if weight else {})
        out = tmp_path / f"w{weight}"
        synthesize(teacher, cfg, 12, out, progress=False, grid=False)
        from smi.data.pool import load_pool
        pool = load_pool(out)
        feats = pool_features(teacher.model, pool.images, pool.masks)
        sims[weight] = mean_pairwise_cosine(feats).item()
        if weight:
            job = PoolSynthesis(teacher, cfg, 12, out)  # a resumed job rebuilds the bank from the shards
            assert job.bank(0) is None
            torch.testing.assert_close(job.bank(2), feats[:8])
            assert job.bank(1).shape == (4, feats.shape[1])
    assert sims[5.0] < sims[0.0], sims


def _bn_student(seed: int = 0) -> torch.nn.Sequential:
    """A frozen two-BatchNorm CNN on (3, 16, 16) with made-up running statistics (a 'pretrained' backbone)."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                              torch.nn.Conv2d(4, 5, 3, padding=1), torch.nn.BatchNorm2d(5), torch.nn.ReLU(),
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(5, 10))
    for bn in (net[1], net[4]):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    return net.eval().requires_grad_(False)


def test_student_bn_term_is_the_distance_of_the_students_batch_statistics():
    """The term's value on a batch equals ||mean - running_mean|| + ||var - running_var|| per student BatchNorm layer,
    computed here by running the layers by hand; its gradient reaches the images and no student weight."""
    from smi.inversion.terms._base import Context, Step
    from smi.inversion.terms.student_bn import StudentBatchNorm

    student = _bn_student()
    x = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(3), requires_grad=True)
    cfg = InversionConfig(iterations=1, batch_size=6, sparsity=SparsityConfig(()))
    ctx = Context(torch.nn.Identity(), cfg, torch.arange(6), 10, (4, 4), 4, torch.Generator(), student=student)
    step = Step(ctx, x, x, Jitter(0, 0, False), 0, 4, None, None, torch.zeros(6, 10), None, None)  # type: ignore[arg-type]
    value = StudentBatchNorm(ctx)(step)

    expected, h = 0.0, x.detach()
    for conv, bn, weight in ((student[0], student[1], 10.0), (student[3], student[4], 1.0)):
        h = conv(h)
        mean, var = h.mean(dim=(0, 2, 3)), h.var(dim=(0, 2, 3), unbiased=False)
        expected += weight * ((mean - bn.running_mean).norm() + (var - bn.running_var).norm()).item()
        h = torch.relu(bn(h))
    assert value.item() == pytest.approx(expected, rel=1e-5)
    first = InversionConfig(iterations=1, batch_size=6, sparsity=SparsityConfig(()), options={"student_bn_layers": 1})
    only_first = StudentBatchNorm(Context(torch.nn.Identity(), first, torch.arange(6), 10, (4, 4), 4,
                                          torch.Generator(), student=student))(step)
    h = student[0](x.detach())
    mean, var = h.mean(dim=(0, 2, 3)), h.var(dim=(0, 2, 3), unbiased=False)
    assert only_first.item() == pytest.approx(
        10.0 * ((mean - student[1].running_mean).norm() + (var - student[1].running_var).norm()).item(), rel=1e-5)
    value.backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in student.parameters())


def test_student_bn_term_pulls_images_toward_the_students_statistics():
    """Inverting with the term ends closer to the student's running statistics than inverting without it."""
    from smi.inversion.terms.student_bn import StudentBatchNorm  # noqa: F401 (registered)

    teacher = as_teacher(tiny_vit())
    student = _bn_student()

    def distance(images: torch.Tensor) -> float:
        captured = []
        hooks = [bn.register_forward_hook(lambda _m, i, _o: captured.append(i[0])) for bn in (student[1], student[4])]
        with torch.no_grad():
            student(images)
        for hook in hooks:
            hook.remove()
        return bn_statistics(captured, [(bn.running_mean, bn.running_var) for bn in (student[1], student[4])]).item()

    found = []
    for weight in (0.0, 1.0):
        cfg = InversionConfig(iterations=30, batch_size=4, sparsity=SparsityConfig(()), lr=0.05,
                              terms={"student_bn": weight} if weight else {})
        batch = invert(teacher, cfg, torch.arange(4), generator=torch.Generator().manual_seed(1), student=student)
        found.append(distance(batch.images))
    assert found[1] < 0.7 * found[0], found
    assert not student.training and all(not p.requires_grad for p in student.parameters())


def test_student_bn_term_refuses_a_student_without_batchnorm():
    teacher = as_teacher(tiny_vit())
    cfg = InversionConfig(iterations=2, batch_size=2, sparsity=SparsityConfig(()), terms={"student_bn": 1.0})
    with pytest.raises(SmiError, match="needs a student"):
        invert(teacher, cfg, torch.arange(2))
    with pytest.raises(SmiError, match="BatchNorm"):
        invert(teacher, cfg, torch.arange(2), student=tiny_vit(embed_dim=16, depth=1).requires_grad_(False))
