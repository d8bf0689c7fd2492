import math

import pytest
import torch

from theorylab.attention import EluFeatures, PositiveRandomFeatures, ReluFeatures, TrigRandomFeatures
from theorylab.attention.features import gaussian_orthogonal_random_matrix


def _pair(d=6, seed=0, norm=0.8):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(d, generator=g, dtype=torch.float64)
    k = torch.randn(d, generator=g, dtype=torch.float64)
    return q / q.norm() * norm, k / k.norm() * norm


@pytest.mark.parametrize("cls", [PositiveRandomFeatures, TrigRandomFeatures])
@pytest.mark.parametrize("orthogonal", [False, True])
def test_unbiased_for_exp_scaled_dot_product(cls, orthogonal):
    d, m, draws = 6, 8, 500
    q, k = _pair(d)
    fm = cls(d, m, orthogonal=orthogonal, scale=1.0, seed=0).double()
    estimates = []
    for _ in range(draws):
        estimates.append(float(fm(q[None]) @ fm(k[None]).mT))
        fm.redraw()
    est = torch.tensor(estimates)
    target = math.exp(float(q @ k))
    stderr = est.std().item() / math.sqrt(draws)
    assert abs(est.mean().item() - target) < 4 * stderr + 1e-12, (est.mean().item(), target, stderr)


def test_default_scale_is_inverse_sqrt_d():
    fm = PositiveRandomFeatures(16, 8, seed=0)
    assert fm.scale == pytest.approx(0.25)


def test_positive_features_are_positive_and_match_the_formula():
    d, m = 8, 20
    fm = PositiveRandomFeatures(d, m, scale=0.5, seed=3).double()
    x = torch.randn(5, d, dtype=torch.float64)
    phi = fm(x)
    assert (phi > 0).all() and phi.shape == (5, m)
    xs = x * math.sqrt(0.5)
    expected = torch.exp(xs @ fm.projection.mT - 0.5 * (xs * xs).sum(-1, keepdim=True)) / math.sqrt(m)
    torch.testing.assert_close(phi, expected)
    # the pieces linear_attention stabilises with: log φ = ωᵀx' + the per-row offset, and project(x) = ωᵀx'
    proj, offset = fm.log_features_rowwise(x)
    torch.testing.assert_close(fm.project(x), xs @ fm.projection.mT)
    torch.testing.assert_close(proj, fm.project(x))
    torch.testing.assert_close(proj + offset[:, None], torch.log(expected))


def test_trig_features_formula():
    d, m = 4, 10
    fm = TrigRandomFeatures(d, m, scale=1.0, seed=0).double()
    x = torch.randn(3, d, dtype=torch.float64)
    proj = x @ fm.projection.mT  # (3, 5)
    h = torch.exp(0.5 * (x * x).sum(-1, keepdim=True)) / math.sqrt(m // 2)
    torch.testing.assert_close(fm(x), torch.cat([proj.sin(), proj.cos()], -1) * h)
    assert fm.projection.shape == (5, d)


def test_orthogonal_blocks_and_chi_norms():
    d, m = 8, 20
    w = gaussian_orthogonal_random_matrix(m, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert w.shape == (m, d)
    for block in (w[:8], w[8:16], w[16:]):
        unit = block / block.norm(dim=1, keepdim=True)
        gram = unit @ unit.mT
        torch.testing.assert_close(gram, torch.eye(len(block), dtype=torch.float64), atol=1e-12, rtol=0)
    # norms are chi(d): E[|ω|²] = d over many draws
    g = torch.Generator().manual_seed(1)
    sq = gaussian_orthogonal_random_matrix(400 * d, d, generator=g, dtype=torch.float64).norm(dim=1) ** 2
    assert abs(sq.mean().item() - d) < 4 * sq.std().item() / math.sqrt(sq.numel())


def test_sign_correction_makes_directions_uniform():
    """Householder QR fixes the sign of R's diagonal, so without the correction the r-th direction always has
    the same sign in coordinate r; with it, each coordinate's sign is a fair coin."""
    d, draws = 5, 600
    g = torch.Generator().manual_seed(0)
    # draws * d rows = draws independent orthogonal blocks of d rows
    corrected = gaussian_orthogonal_random_matrix(draws * d, d, generator=g, dtype=torch.float64)
    uncorrected = gaussian_orthogonal_random_matrix(draws * d, d, generator=g, dtype=torch.float64,
                                                    sign_correction=False)
    corrected, uncorrected = corrected.view(draws, d, d), uncorrected.view(draws, d, d)
    diag_sign = lambda w: torch.sign(torch.diagonal(w, dim1=-2, dim2=-1)).mean(0)  # noqa: E731
    assert diag_sign(corrected).abs().max() < 0.15
    assert diag_sign(uncorrected)[0].abs() == 1  # the first direction keeps one sign in coordinate 0
    assert diag_sign(uncorrected).abs().min() > 0.3


def test_seeded_redraw_state_dict_and_dtype():
    a, b = PositiveRandomFeatures(8, 16, seed=7), PositiveRandomFeatures(8, 16, seed=7)
    torch.testing.assert_close(a.projection, b.projection)
    assert not torch.equal(a.projection, PositiveRandomFeatures(8, 16, seed=8).projection)
    x = torch.randn(3, 8)
    a.eval()
    torch.testing.assert_close(a(x), a(x))  # deterministic: nothing random in forward
    before = a.projection.clone()
    a.redraw()
    assert not torch.equal(before, a.projection)
    b.redraw()
    torch.testing.assert_close(a.projection, b.projection)  # same seed, same sequence of draws
    c = PositiveRandomFeatures(8, 16, seed=0)
    c.load_state_dict(a.state_dict())
    torch.testing.assert_close(c(x), a(x))
    assert "projection" in dict(c.named_buffers())
    assert c.double()(x.double()).dtype == torch.float64


def test_unseeded_features_follow_torch_manual_seed():
    torch.manual_seed(0)
    a = PositiveRandomFeatures(4, 8)
    torch.manual_seed(0)
    b = PositiveRandomFeatures(4, 8)
    torch.testing.assert_close(a.projection, b.projection)


def test_deterministic_feature_maps():
    x = torch.randn(4, 6)
    torch.testing.assert_close(EluFeatures(6)(x), torch.nn.functional.elu(x) + 1)
    assert (EluFeatures()(x) > 0).all()
    torch.testing.assert_close(ReluFeatures(6)(x), x.clamp_min(0))
