"""Q3 — attention and its cost (claims 3.1–3.5), measured on theorylab.attention and theorylab.cost.

Cost is measured, not asserted: FLOPs by PyTorch's FlopCounterMode (matmuls only, not softmax/exp) and peak
memory as the most bytes of tensor storage a call had alive at once (:class:`theorylab.cost.PeakMemory`, exact
and reproducible), then power laws fitted over grids of n, d, h, m.
"""

from __future__ import annotations

import functools
import itertools
import math

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter
from torch import Tensor, nn

from ..attention import PositiveRandomFeatures, TrigRandomFeatures, linear_attention, softmax_attention
from ..attention.exact import batched_heads_attention, sequential_heads_attention
from ..attention.linear import linear_attention_reference
from ..attention.separable import separable_attention_matrix
from ..cost import count_flops, fit_power_law, median_time, peak_memory
from .base import Evidence, claim, torch_threads


def _draw_seed(seed: int, *tags: int) -> int:
    """A seed for one family of draws of a claim run at ``seed``, from ``SeedSequence([seed, *tags])``: distinct
    for every (seed, tags), so that runs at different ``--seed`` never share draws (``seed + m`` had made --seed 4's
    m = 4 draws --seed 0's first m = 8 draws)."""
    word = int(np.random.SeedSequence([seed, *tags]).generate_state(1, np.uint64)[0])  # numpy < 2: no uint64 >> 1
    return word >> 1  # below 2**63, as torch.Generator.manual_seed takes


def _one_thread(fn):
    """Run a claim on one intra-op thread: its tensors are small (a few MB at most), so a second thread buys
    little, and on a busy machine it spin-waits for a core (several-fold slower)."""

    @functools.wraps(fn)
    def wrapped(seed: int, quick: bool) -> Evidence:
        with torch_threads(1):
            return fn(seed, quick)

    return wrapped


def _within(x: float, lo: float, hi: float) -> bool:
    return lo <= x <= hi


def _ratio(a: float, b: float) -> float:
    """a / b for a summary line: ±inf (nan for 0/0) where b = 0, which a broken estimator can give (every
    estimate equal: no spread); the verdict itself compares without dividing, so it must not raise here."""
    if b:
        return a / b
    return math.copysign(math.inf, a) if a else math.nan


def _loglog(ax, x, y, fit, label, marker="o"):
    """Measured points and their fitted power law (``fit`` must be a fit of exactly these y)."""
    line, = ax.loglog(x, y, marker, label=f"{label}: slope {fit.exponent:.2f}")
    xs = np.geomspace(min(x), max(x), 20)
    ax.loglog(xs, fit(xs), "--", lw=1, color=line.get_color())


def _theory(ax, x, y, slope: float, label: str) -> None:
    """The theory's power law x^slope through the first measured point: a broad pale band under the points, so
    that a fit that follows it stays visible on top of it."""
    xs = np.geomspace(min(x), max(x), 20)
    ax.loglog(xs, y[0] * (xs / x[0]) ** slope, "-", color="0.5", lw=6, alpha=0.3, zorder=0, label=label)


def _finish(fig: Figure) -> Figure:
    """No minor tick labels on log axes (they collide), then a tight layout."""
    for ax in fig.axes:
        if ax.get_xscale() == "log":
            ax.xaxis.set_minor_formatter(NullFormatter())
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------------- 3.1
def _mha_weights(n: int, d: int, h: int, gen: torch.Generator) -> tuple[Tensor, ...]:
    x = torch.randn(n, d, generator=gen)
    w = [torch.randn(h, d, d, generator=gen) * d**-0.5 for _ in range(3)]
    w_o = torch.randn(h * d, d, generator=gen) * (h * d) ** -0.5
    return x, *w, w_o


def _mha_cost(n: int, d: int, h: int, gen: torch.Generator, fn=sequential_heads_attention) -> tuple[int, int]:
    args = _mha_weights(n, d, h, gen)
    with torch.no_grad():
        return count_flops(fn, *args), peak_memory(fn, *args)


@claim("3.1")
@_one_thread
def cost_of_standard_attention(seed: int, quick: bool) -> Evidence:
    gen = torch.Generator().manual_seed(seed)
    d0, h0 = 16, 2
    ns = [128, 256, 512, 1024] if quick else [256, 512, 1024, 2048]
    n_d = 512 if quick else 1024
    ds = [4, 8, 16, 32]
    hs = [1, 2, 4, 8]
    n_h = 256 if quick else 512

    by_n = [_mha_cost(n, d0, h0, gen) for n in ns]
    by_d = [_mha_cost(n_d, d, h0, gen) for d in ds]
    by_h = [_mha_cost(n_h, d0, h, gen) for h in hs]
    by_h_batched = [_mha_cost(n_h, d0, h, gen, batched_heads_attention) for h in hs]

    fit = {
        "time_n": fit_power_law(ns, [f for f, _ in by_n]),
        "time_d": fit_power_law(ds, [f for f, _ in by_d]),
        "time_h": fit_power_law(hs, [f for f, _ in by_h]),
        "memory_n": fit_power_law(ns, [m for _, m in by_n]),
        "memory_h_sequential": fit_power_law(hs, [m for _, m in by_h]),
        "memory_h_batched": fit_power_law(hs, [m for _, m in by_h_batched]),
    }
    # the exact counts, as the theory writes them: per head 3 projections 2nd², scores 2n²d, mixing 2n²d; W^O
    predicted = [h0 * (6 * n * d0**2 + 4 * n * n * d0) + 2 * n * h0 * d0 * d0 for n in ns]
    flops_match = all(f == p for (f, _), p in zip(by_n, predicted, strict=True))
    n_by_n_bytes = 4 * ns[-1] ** 2
    # what is measured computes multi-head attention: against torch's SDPA per head (float64), batched heads too
    x, w_q, w_k, w_v, w_o = (t.double() for t in _mha_weights(64, d0, h0, gen))
    sdpa = F.scaled_dot_product_attention(x @ w_q, x @ w_k, x @ w_v)  # (h, n, d): scale 1/√d
    reference = torch.cat(list(sdpa), dim=-1) @ w_o
    output_diff = max(float((fn(x, w_q, w_k, w_v, w_o) - reference).abs().max())
                      for fn in (sequential_heads_attention, batched_heads_attention))
    checks = {
        f"output vs SDPA per head {output_diff:.1e} (needs < 1e-12)": output_diff < 1e-12,
        f"FLOPs ∝ n^{fit['time_n'].exponent:.3f} (needs 1.85–2.05)": _within(fit["time_n"].exponent, 1.85, 2.05),
        f"FLOPs ∝ d^{fit['time_d'].exponent:.3f} (needs 0.95–1.2)": _within(fit["time_d"].exponent, 0.95, 1.2),
        f"FLOPs ∝ h^{fit['time_h'].exponent:.3f} (needs 0.98–1.02)": _within(fit["time_h"].exponent, 0.98, 1.02),
        f"peak memory ∝ n^{fit['memory_n'].exponent:.3f} (needs 1.8–2.05)":
            _within(fit["memory_n"].exponent, 1.8, 2.05),
        f"memory ∝ h^{fit['memory_h_sequential'].exponent:.3f} with heads in turn (needs < 0.2)":
            fit["memory_h_sequential"].exponent < 0.2,
        f"memory ∝ h^{fit['memory_h_batched'].exponent:.3f} with heads batched (needs > 0.8)":
            fit["memory_h_batched"].exponent > 0.8,
        f"FLOPs {'equal' if flops_match else 'differ from'} h(6nd² + 4n²d) + 2nhd²": flops_match,
    }
    confirmed = all(checks.values())

    fig = Figure(figsize=(13, 3.8))
    ax1, ax2, ax3 = fig.subplots(1, 3)
    _loglog(ax1, ns, [f for f, _ in by_n], fit["time_n"], f"FLOPs vs n (d={d0}, h={h0})")
    ax1.loglog(ns, predicted, "k+", ms=10, label="h(6nd² + 4n²d) + 2nhd²")
    ax1.set(xlabel="n", ylabel="FLOPs (FlopCounterMode)", title="Time: Θ(n²d + nd²) per head")
    ax1.legend(fontsize=8)
    _loglog(ax2, ns, [m for _, m in by_n], fit["memory_n"], f"peak bytes vs n (d={d0}, h={h0})")
    ax2.loglog(ns, [8 * n * n for n in ns], "k:", label="two n×n float32 matrices")
    ax2.set(xlabel="n", ylabel="peak tensor bytes", title="Space: the n×n score matrix")
    ax2.legend(fontsize=8)
    _loglog(ax3, hs, [m for _, m in by_h], fit["memory_h_sequential"], "memory, heads sequential")
    _loglog(ax3, hs, [m for _, m in by_h_batched], fit["memory_h_batched"], "memory, heads batched", "s")
    _loglog(ax3, hs, [f / 1000 for f, _ in by_h], fit_power_law(hs, [f / 1000 for f, _ in by_h]),
            "kFLOPs", "^")
    ax3.set(xlabel="h (heads)", ylabel="bytes / kFLOPs", title=f"Heads (n={n_h}, d={d0})")
    ax3.legend(fontsize=8)
    _finish(fig)
    return Evidence(
        confirmed=confirmed,
        checks=checks,
        numbers={**{f"exponent_{k}": v.exponent for k, v in fit.items()},
                 "flops_equal_formula": flops_match, "max_abs_diff_vs_sdpa": output_diff,
                 "peak_bytes_at_max_n": by_n[-1][1], "n_by_n_float32_bytes_at_max_n": n_by_n_bytes,
                 "min_r2": min(v.r2 for v in fit.values())},
        key=["exponent_time_n", "exponent_memory_n", "exponent_memory_h_sequential"],
        summary=(f"FLOPs ∝ n^{fit['time_n'].exponent:.3f} (needs 1.85–2.05), peak memory ∝ "
                 f"n^{fit['memory_n'].exponent:.3f} (needs 1.8–2.05); memory ∝ "
                 f"h^{fit['memory_h_sequential'].exponent:.3f} with heads in turn (needs < 0.2), "
                 f"h^{fit['memory_h_batched'].exponent:.3f} batched (needs > 0.8); "
                 f"FLOPs {'equal' if flops_match else 'differ from'} h(6nd² + 4n²d) + 2nhd²"),
        method=(
            "The naive reference theorylab.attention.exact.sequential_heads_attention — per head Q = XW^Q, "
            "K, V likewise, softmax_row(QKᵀ/√d)V, one head after another, then [heads]W^O — in float32 on "
            "real tensors (torch SDPA's CPU kernel is flash-style and never holds n×n, so it is not the "
            "object here). FLOPs from torch.utils.flop_counter.FlopCounterMode (matmuls; softmax not counted); "
            "peak memory = most bytes of tensor storage alive at once during the call (inputs and weights "
            "excluded), tracked exactly by a TorchDispatchMode. Power laws fitted over "
            f"n ∈ {ns} (d={d0}, h={h0}), d ∈ {ds} (n={n_d}), h ∈ {hs} (n={n_h}); the same with heads batched "
            "for comparison. Confirmed when time exponents are n ∈ [1.85, 2.05], d ∈ [0.95, 1.2], "
            "h ∈ [0.98, 1.02], memory n ∈ [1.8, 2.05], memory h < 0.2 sequential and > 0.8 batched, the "
            "counted FLOPs equal h(6nd² + 4n²d) + 2nhd² exactly, and both (sequential and batched heads) equal "
            "torch SDPA per head, concatenated and projected, to 1e-12 in float64 (n = 64): the cost measured "
            "is the cost of attention."),
        figures={"cost": fig},
    )


# ---------------------------------------------------------------------------------------------------- 3.2
def _learn_pattern(kind: str, target: Tensor, d: int, steps: int, gen: torch.Generator) -> Tensor:
    """Fit free queries and keys (n, d) so that attention(Q, K) puts its mass on key target[i] for query i."""
    n = target.numel()
    q = nn.Parameter(torch.randn(n, d, generator=gen, dtype=torch.float64))
    k = nn.Parameter(torch.randn(n, d, generator=gen, dtype=torch.float64))
    opt = torch.optim.Adam([q, k], lr=0.1)

    def matrix() -> Tensor:
        if kind == "exact":
            return torch.softmax(q @ k.mT, dim=-1)
        return separable_attention_matrix(q, k)

    for _ in range(steps):
        opt.zero_grad()
        a = matrix()
        loss = -torch.log(a[torch.arange(n), target] + 1e-30).mean()  # cross-entropy of the attention rows
        loss.backward()
        opt.step()
    with torch.no_grad():
        return matrix()


@claim("3.2")
@_one_thread
def separable_attention_claim(seed: int, quick: bool) -> Evidence:
    gen = torch.Generator().manual_seed(seed)
    from ..attention import separable_attention

    # (a) rows are categorical distributions; the implied matrix has rank <= d
    n_r, d_r = 200, 8
    q, k = torch.randn(2, 1, n_r, d_r, generator=gen, dtype=torch.float64) * 2
    a = separable_attention_matrix(q, k)[0]  # (n, n)
    row_sum_err = float((a.sum(-1) - 1).abs().max())
    min_entry = float(a.min())
    rank = int(torch.linalg.matrix_rank(a))

    # (b) cost of softmax_row(Q)(softmax_col(K)ᵀV) in n
    d0 = 16
    ns = [512, 1024, 2048, 4096] if quick else [1024, 2048, 4096, 8192, 16384]

    def cost(n):
        q, k, v = (torch.randn(1, 1, n, d0, generator=gen) for _ in range(3))
        with torch.no_grad():
            return count_flops(separable_attention, q, k, v), peak_memory(separable_attention, q, k, v)

    costs = [cost(n) for n in ns]
    fit_t = fit_power_law(ns, [c[0] for c in costs])
    fit_m = fit_power_law(ns, [c[1] for c in costs])

    # the fast path measured in (b) computes the operator of (a): separable_attention(q, k, v) = A v
    v_r = torch.randn(1, 1, n_r, d_r, generator=gen, dtype=torch.float64)
    link_diff = float((separable_attention(q[None], k[None], v_r)[0, 0] - a @ v_r[0, 0]).abs().max())

    # (c) expressiveness: a shift pattern (query i attends to key i-1) with n > d
    n_e, d_e = 64, 8
    steps = 150 if quick else 400
    target = (torch.arange(n_e) - 1) % n_e
    learned = {kind: _learn_pattern(kind, target, d_e, steps, gen) for kind in ("exact", "separable")}
    mass = {kind: float(m[torch.arange(n_e), target].mean()) for kind, m in learned.items()}
    accuracy = {kind: float((m.argmax(-1) == target).double().mean()) for kind, m in learned.items()}
    bound = d_e / n_e  # Σ_i A_{i,σ(i)} <= Σ_c Σ_j B_jc = d for separable attention

    checks = {
        f"row sums of the implied matrix within {row_sum_err:.1e} of 1 (needs < 1e-12)": row_sum_err < 1e-12,
        f"smallest entry {min_entry:.2g} (needs ≥ 0)": min_entry >= 0,
        f"rank {rank} (needs ≤ d = {d_r})": rank <= d_r,
        f"separable_attention vs the implied matrix {link_diff:.1e} (needs < 1e-12)": link_diff < 1e-12,
        f"FLOPs ∝ n^{fit_t.exponent:.3f} (needs 0.95–1.05)": _within(fit_t.exponent, 0.95, 1.05),
        f"memory ∝ n^{fit_m.exponent:.3f} (needs 0.9–1.1)": _within(fit_m.exponent, 0.9, 1.1),
        f"exact attention's mass on the shift {mass['exact']:.3f} (needs > 0.9)": mass["exact"] > 0.9,
        f"exact attention's argmax accuracy {accuracy['exact']:.2f} (needs 1)": accuracy["exact"] == 1.0,
        f"separable's mass on the shift {mass['separable']:.5f} (needs ≤ d/n = {bound:.5f})":
            mass["separable"] <= bound + 1e-9,
        f"separable's argmax accuracy {accuracy['separable']:.2f} (needs < 0.5)": accuracy["separable"] < 0.5,
    }
    confirmed = all(checks.values())

    fig = Figure(figsize=(13, 3.8))
    ax1, ax2, ax3 = fig.subplots(1, 3)
    _loglog(ax1, ns, [c[0] for c in costs], fit_t, "FLOPs")
    _loglog(ax1, ns, [c[1] for c in costs], fit_m, "peak bytes", "s")
    _theory(ax1, ns, [c[0] for c in costs], 1.0, "theory: ∝ n (Θ(nd²) time, Θ(nd + d²) space)")
    ax1.set(xlabel="n", ylabel="FLOPs; peak bytes", title=f"softmax_row(Q)(softmax_col(K)ᵀV), d={d0}")
    ax1.legend(fontsize=7)
    for ax, kind in ((ax2, "exact"), (ax3, "separable")):
        image = ax.imshow(learned[kind].numpy(), cmap="viridis", vmin=0, vmax=1)
        fig.colorbar(image, ax=ax, label="attention weight", fraction=0.046, pad=0.04)
        ax.set(title=f"{kind}: mass on target {mass[kind]:.3f}, argmax acc {accuracy[kind]:.2f}",
               xlabel="key", ylabel="query")
    _finish(fig)
    return Evidence(
        confirmed=confirmed,
        checks=checks,
        numbers={"max_row_sum_error": row_sum_err, "min_entry": min_entry, "rank": rank, "d": d_r, "n": n_r,
                 "exponent_time_n": fit_t.exponent, "exponent_memory_n": fit_m.exponent,
                 "shift_mass_exact": mass["exact"], "shift_mass_separable": mass["separable"],
                 "separable_mass_bound_d_over_n": bound, "shift_accuracy_exact": accuracy["exact"],
                 "shift_accuracy_separable": accuracy["separable"], "max_abs_diff_fast_vs_matrix": link_diff},
        key=["exponent_time_n", "rank", "shift_mass_separable"],
        summary=(f"FLOPs ∝ n^{fit_t.exponent:.3f} (needs 0.95–1.05), memory ∝ n^{fit_m.exponent:.3f} (needs "
                 f"0.9–1.1); rank {rank} (needs ≤ d = {d_r}); a learned shift pattern: separable puts "
                 f"{mass['separable']:.5f} of the mass on it (needs ≤ d/n = {bound:.5f}), exact attention "
                 f"{mass['exact']:.3f} (needs > 0.9)"),
        method=(
            f"(a) The implied matrix softmax_row(Q) softmax_col(K)ᵀ for n={n_r}, d={d_r} (float64): row sums, "
            "sign, numerical rank; theorylab.attention.separable_attention(q, k, v) must equal that matrix times "
            "v (1e-12), so that (b) measures the cost of this operator. (b) FLOPs (FlopCounterMode) and peak "
            "tensor memory of "
            f"theorylab.attention.separable_attention over n ∈ {ns}, d={d0}, fitted power laws. (c) Expressiveness: "
            f"free queries and keys (n={n_e}, d={d_e}) fitted by Adam ({steps} steps) to the shift pattern "
            "'query i attends to key i−1' (cross-entropy of each attention row). Exact attention can realise any "
            "permutation (place q_i and k_σ(i) on a circle); for separable attention the mass on the targets "
            "obeys Σ_i A_{iσ(i)} = Σ_c Σ_i a_ic b_σ(i)c ≤ Σ_c Σ_j b_jc = d, i.e. mean mass ≤ d/n. Confirmed when "
            "rows sum to 1 (1e-12), rank ≤ d, exponents ∈ [0.95, 1.05] (time) and [0.9, 1.1] (memory), exact "
            "attention learns the shift (mass > 0.9, argmax accuracy 1) and separable stays under d/n with "
            "argmax accuracy < 0.5."),
        figures={"separable": fig},
    )


# ---------------------------------------------------------------------------------------------------- 3.3
class TaylorFeatures(nn.Module):
    """Exact finite features of the truncated exponential kernel: f(q)ᵀf(k) = Σ_{p ≤ P} (qᵀk)^p / p!.

    f_α(x) = x^α / sqrt(α!) over the multi-indices |α| ≤ P (multinomial theorem), C(D + P, P) features; for
    |qᵀk| ≤ 1/2 and P = 10 the truncation error is < 1e-10 relative, so f(Q)f(K)ᵀ = exp(QKᵀ) to that accuracy."""

    powers: Tensor  # registered buffers
    inv_sqrt_factorial: Tensor

    def __init__(self, head_dim: int, degree: int) -> None:
        super().__init__()
        alphas = [a for p in range(degree + 1) for a in _multi_indices(head_dim, p)]
        powers = torch.tensor(alphas, dtype=torch.float64)  # (M, D)
        self.head_dim = head_dim
        self.num_features = len(alphas)
        self.register_buffer("powers", powers)
        self.register_buffer("inv_sqrt_factorial", torch.exp(-0.5 * torch.lgamma(powers + 1).sum(-1)))

    def forward(self, x: Tensor) -> Tensor:
        return torch.prod(x[..., None, :] ** self.powers, dim=-1) * self.inv_sqrt_factorial  # (..., N, M)


def _multi_indices(dim: int, total: int) -> list[tuple[int, ...]]:
    out = []
    for combo in itertools.combinations_with_replacement(range(dim), total):
        alpha = [0] * dim
        for i in combo:
            alpha[i] += 1
        out.append(tuple(alpha))
    return out


@claim("3.3")
@_one_thread
def kernelised_attention_claim(seed: int, quick: bool) -> Evidence:
    gen = torch.Generator().manual_seed(seed)
    # (a) exact factorisation of exp(qᵀk): linear attention with Taylor features equals softmax attention
    d_t, n_t = 4, 256
    x = torch.randn(3, 1, 1, n_t, d_t, generator=gen, dtype=torch.float64)
    q, k = (t / t.norm(dim=-1, keepdim=True) * 0.7 for t in x[:2])  # |qᵀk| <= 0.49
    v = x[2]
    taylor = TaylorFeatures(d_t, 10)
    out_linear = linear_attention(q, k, v, taylor, chunk_size=64)
    out_quadratic = linear_attention_reference(q, k, v, taylor)  # D⁻¹AV with A = f(Q)f(K)ᵀ formed
    out_softmax = softmax_attention(q, k, v, scale=1.0)
    err_softmax = float((out_linear - out_softmax).abs().max())
    err_quadratic = float((out_linear - out_quadratic).abs().max())
    # and for the map whose cost is measured below (FAVOR+ takes another code path: the column-stabilised one)
    prf = PositiveRandomFeatures(d_t, 64, seed=seed).double()
    err_favor = float((linear_attention(q, k, v, prf, chunk_size=64) - linear_attention_reference(q, k, v, prf))
                      .abs().max())

    # (b) cost of the kernelised form D⁻¹ f(Q)(f(K)ᵀV) (one chunk = the formula as written) in n and in m
    d0, m0 = 16, 64
    ns = [512, 1024, 2048, 4096] if quick else [1024, 2048, 4096, 8192, 16384]
    ms = [64, 128, 256, 512] if quick else [64, 128, 256, 512, 1024]
    n_m = 1024 if quick else 2048

    def cost(n, m):
        fm = PositiveRandomFeatures(d0, m, seed=seed)
        q, k, v = (torch.randn(1, 1, n, d0, generator=gen) for _ in range(3))
        with torch.no_grad():
            fn = lambda: linear_attention(q, k, v, fm, chunk_size=n)  # noqa: E731
            return count_flops(fn), peak_memory(fn)

    by_n = [cost(n, m0) for n in ns]
    by_m = [cost(n_m, m) for m in ms]
    fits = {"time_n": fit_power_law(ns, [c[0] for c in by_n]), "memory_n": fit_power_law(ns, [c[1] for c in by_n]),
            "time_m": fit_power_law(ms, [c[0] for c in by_m]), "memory_m": fit_power_law(ms, [c[1] for c in by_m])}
    n_by_n = 4 * ns[-1] ** 2
    checks = {
        f"Taylor features vs softmax attention {err_softmax:.1e} (needs < 1e-6)": err_softmax < 1e-6,
        f"Taylor features vs D⁻¹AV formed {err_quadratic:.1e} (needs < 1e-12)": err_quadratic < 1e-12,
        f"FAVOR+ vs D⁻¹AV formed {err_favor:.1e} (needs < 1e-12)": err_favor < 1e-12,
        f"FLOPs ∝ n^{fits['time_n'].exponent:.3f} (needs 0.95–1.05)": _within(fits["time_n"].exponent, 0.95, 1.05),
        f"FLOPs ∝ m^{fits['time_m'].exponent:.3f} (needs 0.95–1.05)": _within(fits["time_m"].exponent, 0.95, 1.05),
        f"memory ∝ n^{fits['memory_n'].exponent:.3f} (needs 0.9–1.1)": _within(fits["memory_n"].exponent, 0.9, 1.1),
        f"memory ∝ m^{fits['memory_m'].exponent:.3f} (needs 0.8–1.1)": _within(fits["memory_m"].exponent, 0.8, 1.1),
        f"peak memory at n = {ns[-1]}: {by_n[-1][1] / n_by_n:.2g}× one n×n matrix (needs < 1)": by_n[-1][1] < n_by_n,
    }
    confirmed = all(checks.values())

    fig = Figure(figsize=(10, 3.8))
    ax1, ax2 = fig.subplots(1, 2)
    _loglog(ax1, ns, [c[0] for c in by_n], fits["time_n"], "FLOPs")
    _loglog(ax1, ns, [c[1] for c in by_n], fits["memory_n"], "peak bytes", "s")
    ax1.loglog(ns, [4 * n * n for n in ns], "k:", label="one n×n float32 matrix (bytes)")
    _theory(ax1, ns, [c[0] for c in by_n], 1.0, "theory: ∝ n (Θ(nmd) time, Θ(nm + md) space)")
    ax1.set(xlabel="n", ylabel="FLOPs; peak bytes", title=f"D⁻¹f(Q)(f(K)ᵀV): FAVOR+, m={m0}, d={d0}")
    ax1.legend(fontsize=7)
    _loglog(ax2, ms, [c[0] for c in by_m], fits["time_m"], "FLOPs")
    _loglog(ax2, ms, [c[1] for c in by_m], fits["memory_m"], "peak bytes", "s")
    _theory(ax2, ms, [c[0] for c in by_m], 1.0, "theory: ∝ m")
    ax2.set(xlabel="m (features)", ylabel="FLOPs; peak bytes", title=f"n={n_m}, d={d0}")
    ax2.legend(fontsize=7)
    _finish(fig)
    return Evidence(
        confirmed=confirmed,
        checks=checks,
        numbers={"max_abs_diff_vs_softmax": err_softmax, "max_abs_diff_vs_quadratic_form": err_quadratic,
                 "max_abs_diff_favor_vs_quadratic_form": err_favor, "taylor_features": taylor.num_features,
                 **{f"exponent_{key}": f.exponent for key, f in fits.items()},
                 "peak_bytes_at_max_n": by_n[-1][1], "n_by_n_float32_bytes_at_max_n": n_by_n},
        key=["max_abs_diff_vs_softmax", "exponent_time_n", "exponent_memory_n"],
        summary=(f"D⁻¹f(Q)(f(K)ᵀV) with Taylor features vs softmax attention: max |diff| {err_softmax:.1e} (needs "
                 f"< 1e-6); Taylor and FAVOR+ vs D⁻¹AV formed {max(err_quadratic, err_favor):.1e} (need < 1e-12); "
                 f"FAVOR+ FLOPs ∝ n^{fits['time_n'].exponent:.3f} (needs 0.95–1.05), memory ∝ "
                 f"n^{fits['memory_n'].exponent:.3f} "
                 f"(needs 0.9–1.1), {by_n[-1][1] / n_by_n:.2g}× one n×n matrix at n = {ns[-1]} (needs < 1)"),
        method=(
            f"(a) An exact finite factorisation: Taylor features f_α(x) = x^α/√α! (|α| ≤ 10, d={d_t}, "
            f"{taylor.num_features} features) give f(q)ᵀf(k) = exp(qᵀk) to < 1e-10 for |qᵀk| ≤ 0.49; "
            f"theorylab.attention.linear_attention (which computes f(K)ᵀ[V, 1] first) on n={n_t}, float64, is "
            "compared with softmax attention (scale 1) and with the quadratic D⁻¹AV (A = f(Q)f(K)ᵀ formed); so is "
            "linear_attention with the FAVOR+ map of (b) (m = 64, its column-stabilised code path). "
            "(b) FLOPs (FlopCounterMode) and peak tensor memory of linear_attention with FAVOR+ features and "
            f"one chunk (the formula as written, f(Q) and f(K) held whole) over n ∈ {ns} (m={m0}) and "
            f"m ∈ {ms} (n={n_m}), d={d0}, float32. Confirmed when the errors are < 1e-6 and < 1e-12 (both), time "
            "exponents ∈ [0.95, 1.05], memory exponents ∈ [0.9, 1.1] in n and [0.8, 1.1] in m (the nd terms "
            "weigh at small m), and the peak stays below one n×n matrix."),
        figures={"kernelised": fig},
    )


# ---------------------------------------------------------------------------------------------------- 3.4/3.5
def _pair(d: int, norm_x: float, norm_y: float, cos: float, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """Two float64 vectors with the given norms and cosine."""
    u, w = torch.randn(2, d, generator=gen, dtype=torch.float64)
    u = u / u.norm()
    w = w - (w @ u) * u
    w = w / w.norm()
    return u * norm_x, (cos * u + math.sqrt(max(0.0, 1 - cos * cos)) * w) * norm_y


def _kernel_estimates(cls, x: Tensor, y: Tensor, m: int, draws: int, *, orthogonal: bool, seed: int,
                      sign_correction: bool = True) -> Tensor:
    """``draws`` independent estimates f(x)ᵀf(y) of exp(xᵀy), each with m random vectors ω (m features for
    positive, m frequencies = 2m features for trigonometric), through the package's feature modules."""
    d = x.numel()
    total = m * draws
    fm = cls(d, total if cls is PositiveRandomFeatures else 2 * total, orthogonal=orthogonal, scale=1.0,
             seed=seed).double()
    if not sign_correction:
        from ..attention.features import gaussian_orthogonal_random_matrix

        fm.projection.copy_(gaussian_orthogonal_random_matrix(total, d, generator=torch.Generator().manual_seed(seed),
                                                              sign_correction=False, dtype=torch.float64))
    prod = fm(x[None])[0] * fm(y[None])[0]  # each term carries 1/total
    if cls is TrigRandomFeatures:
        prod = prod[:total] + prod[total:]  # sin·sin + cos·cos per frequency
    return prod.view(draws, m).sum(-1) * draws  # (draws,): mean over the m vectors of each draw


def mse_positive(x: Tensor, y: Tensor, m: int) -> float:
    """Lemma 2 of Choromanski et al. (2021): (1/m) e^{|x+y|²} SM² (1 − e^{−|x+y|²}), SM = exp(xᵀy)."""
    s, sm = float((x + y).square().sum()), math.exp(float(x @ y))
    return math.exp(s) * sm**2 * (1 - math.exp(-s)) / m


def mse_trig(x: Tensor, y: Tensor, m: int) -> float:
    """Lemma 2 of Choromanski et al. (2021), m frequencies: (1/2m) e^{|x+y|²} SM⁻² (1 − e^{−|x−y|²})²."""
    s, t, sm = float((x + y).square().sum()), float((x - y).square().sum()), math.exp(float(x @ y))
    return math.exp(s) * sm**-2 * (1 - math.exp(-t)) ** 2 / (2 * m)


@claim("3.4")
@_one_thread
def positive_random_features_claim(seed: int, quick: bool) -> Evidence:
    gen = torch.Generator().manual_seed(seed)
    d = 4
    x, y = _pair(d, 0.8, 0.7, 0.5, gen)
    exact = math.exp(float(x @ y))

    # (a) Monte-Carlo mean over R i.i.d. ω converges to exp(xᵀy), error ∝ R^{-1/2}
    trials, r_max = (100, 4096) if quick else (200, 16384)
    single = _kernel_estimates(PositiveRandomFeatures, x, y, 1, trials * r_max, orthogonal=False, seed=seed)
    single = single.view(trials, r_max)
    rs = [2**p for p in range(2, int(math.log2(r_max)) + 1)]
    running = single.cumsum(-1)[:, [r - 1 for r in rs]] / torch.tensor(rs, dtype=torch.float64)
    rmse = (running - exact).square().mean(0).sqrt() / exact
    fit_mc = fit_power_law(rs, rmse.tolist())
    mean_all = float(single.mean())
    stderr_all = float(single.std() / math.sqrt(single.numel()))

    # positivity: every feature on many inputs, large norms included (finite ones)
    fm = PositiveRandomFeatures(16, 256, seed=seed)
    probe = torch.randn(512, 16, generator=gen) * torch.logspace(-2, 0.5, 512)[:, None]
    min_feature = float(fm(probe).min())
    trig_neg = float((_kernel_estimates(TrigRandomFeatures, *_pair(d, 1.2, 1.2, -0.9, gen), 4, 2000,
                                        orthogonal=False, seed=seed) < 0).double().mean())

    # (b) attention built from f approaches softmax attention as m grows
    n, da = 128, 16
    qa, ka, va = (torch.randn(1, 2, n, da, generator=gen, dtype=torch.float64) for _ in range(3))
    qa, ka = qa * 0.5, ka * 0.5  # |q'|² ≈ 1: the estimator's variance factor e^{|q'+k'|²} stays moderate
    exact_att = softmax_attention(qa, ka, va)
    ms = [16, 128, 1024, 4096] if quick else [16, 64, 256, 1024, 4096]
    att_err = []
    for m in ms:
        errs = []
        for rep in range(4 if quick else 6):
            fmr = PositiveRandomFeatures(da, m, seed=seed * 1000 + rep).double()
            errs.append(float((linear_attention(qa, ka, va, fmr) - exact_att).square().mean().sqrt()))
        att_err.append(float(np.mean(errs)))
    fit_att = fit_power_law(ms, att_err)

    checks = {
        f"Monte-Carlo error ∝ R^{fit_mc.exponent:.3f} (needs −0.6…−0.4)": _within(fit_mc.exponent, -0.6, -0.4),
        f"mean {_ratio(abs(mean_all - exact), stderr_all):.1f} standard errors from exp(xᵀy) (needs < 4)":
            abs(mean_all - exact) < 4 * stderr_all,
        f"smallest feature {min_feature:.1e} (needs > 0)": min_feature > 0,
        f"attention error ∝ m^{fit_att.exponent:.3f} (needs < −0.3)": fit_att.exponent < -0.3,
        f"attention error {_ratio(att_err[-1], att_err[0]):.3f}× from m = {ms[0]} to {ms[-1]} (needs < 0.25)":
            att_err[-1] < att_err[0] / 4,
    }
    confirmed = all(checks.values())

    fig = Figure(figsize=(10, 3.8))
    ax1, ax2 = fig.subplots(1, 2)
    _loglog(ax1, rs, rmse.tolist(), fit_mc, "relative RMSE of the mean")
    ax1.loglog(rs, [float(rmse[0]) * (r / rs[0]) ** -0.5 for r in rs], "k:", label="∝ R^(-1/2)")
    ax1.set(xlabel="R (random vectors ω)", ylabel="relative RMSE of the mean estimate",
            title=f"E[f(x)ᵀf(y)] = exp(xᵀy) = {exact:.3f}")
    ax1.legend(fontsize=8)
    _loglog(ax2, ms, att_err, fit_att, "RMS(FAVOR+ − softmax)")
    ax2.set(xlabel="m (features)", ylabel="RMS error of the attention output",
            title=f"Attention, n={n}, d={da} (orthogonal features)")
    ax2.legend(fontsize=8)
    _finish(fig)
    return Evidence(
        confirmed=confirmed,
        checks=checks,
        numbers={"exponent_mc_error": fit_mc.exponent, "mc_mean": mean_all, "exp_xy": exact,
                 "mc_stderr": stderr_all, "min_positive_feature": min_feature,
                 "trig_fraction_negative_estimates": trig_neg,
                 "exponent_attention_error_m": fit_att.exponent, "attention_rms_error_min_m": att_err[0],
                 "attention_rms_error_max_m": att_err[-1]},
        key=["exponent_mc_error", "min_positive_feature", "exponent_attention_error_m"],
        summary=(f"Monte-Carlo error ∝ R^{fit_mc.exponent:.3f} (needs −0.6…−0.4), mean "
                 f"{_ratio(abs(mean_all - exact), stderr_all):.1f} standard errors from exp(xᵀy) (needs < 4); "
                 f"smallest feature {min_feature:.1e} (needs > 0); attention error ∝ m^{fit_att.exponent:.3f} (needs "
                 f"< −0.3), {_ratio(att_err[-1], att_err[0]):.3f}× from m = {ms[0]} to {ms[-1]} (needs < 0.25)"),
        method=(
            "f(x) = m^{-1/2} exp(−|x|²/2)[exp(ω_iᵀx)]_i through theorylab.attention.PositiveRandomFeatures "
            f"(scale 1, float64). (a) For x, y in R^{d} (|x|=0.8, |y|=0.7, cos 0.5), {trials} independent "
            f"running means over R ≤ {r_max} i.i.d. ω: relative RMSE vs R, fitted slope; the grand mean within "
            "4 standard errors of exp(xᵀy). Every feature of 512 inputs of norms 0.01–3 (×√d; d = 16, the default "
            "scale 1/√d, float32, so this shows the features stay representable) is > 0, while "
            "trigonometric estimates go negative (fraction reported, |x|=|y|=1.2, cos −0.9). (b) linear_attention "
            f"with m orthogonal FAVOR+ features vs softmax_attention (n={n}, d={da}, q and k ~ N(0, 0.25 I), "
            f"several seeds per m ∈ {ms}). "
            "Confirmed when the MC slope ∈ [−0.6, −0.4], the mean is unbiased, features > 0, and the attention "
            "error falls with m (slope < −0.3, 4× lower at the largest m)."),
        figures={"random_features": fig},
    )


@claim("3.5")
@_one_thread
def choice_of_m_claim(seed: int, quick: bool) -> Evidence:
    gen = torch.Generator().manual_seed(seed)
    d = 4
    draws = 4000 if quick else 20000
    ms = [4, 8, 16, 32, 64]
    x, y = _pair(d, 0.6, 0.6, 0.3, gen)
    sm = math.exp(float(x @ y))

    def mse(est: Tensor) -> tuple[float, float]:
        err2 = (est - sm).square()
        return float(err2.mean()), float(err2.std() / math.sqrt(err2.numel()))

    results = {}
    for name, cls, orth in (("positive_iid", PositiveRandomFeatures, False),
                            ("positive_orthogonal", PositiveRandomFeatures, True),
                            ("trig_iid", TrigRandomFeatures, False)):
        results[name] = [mse(_kernel_estimates(cls, x, y, m, draws, orthogonal=orth, seed=_draw_seed(seed, 1, m)))
                         for m in ms]
    closed = {"positive_iid": [mse_positive(x, y, m) for m in ms], "trig_iid": [mse_trig(x, y, m) for m in ms]}
    ratio = {k: [r[0] / c for r, c in zip(results[k], closed[k], strict=True)] for k in closed}
    z_scores = {k: max(abs(r[0] - c) / r[1] for r, c in zip(results[k], closed[k], strict=True)) for k in closed}
    fits = {k: fit_power_law(ms, [r[0] for r in v]) for k, v in results.items()}
    orth_gain = float(np.mean([o[0] / i[0] for o, i in zip(results["positive_orthogonal"], results["positive_iid"],
                                                           strict=True)]))
    # the gain is small here (~10%) and a ratio near 1 can come out below 1 by noise: the draws themselves must be
    # orthogonal within each block of d directions (a wrong-axis reshape had kept "confirmed" at 0.96-0.99)
    omega = PositiveRandomFeatures(d, 64 * d, orthogonal=True, scale=1.0, seed=seed).double().projection
    blocks = (omega / omega.norm(dim=-1, keepdim=True)).view(-1, d, d)
    orth_dev = float((blocks @ blocks.mT - torch.eye(d, dtype=torch.float64)).abs().max())

    # bias of orthogonal features without the QR sign correction (what the public implementations draw)
    # a pair in the plane of the first two coordinates: without the sign correction the directions are not
    # rotation invariant (direction r keeps one sign in coordinate r), so the bias depends on the orientation
    xb = torch.zeros(d, dtype=torch.float64)
    yb = torch.zeros(d, dtype=torch.float64)
    xb[0], yb[0], yb[1] = 0.7, 0.7 * 0.2, 0.7 * math.sqrt(1 - 0.2**2)
    smb = math.exp(float(xb @ yb))
    bias = {}
    for corrected in (True, False):
        est = _kernel_estimates(PositiveRandomFeatures, xb, yb, d, 2 * draws, orthogonal=True,
                                seed=_draw_seed(seed, 2), sign_correction=corrected)
        bias[corrected] = (float(est.mean()) / smb - 1, float(est.std()) / math.sqrt(est.numel()) / smb)

    # trigonometric features fail where the kernel is small: relative RMSE vs exp(xᵀy)
    cosines = [-0.9, -0.5, 0.0, 0.5, 0.9]
    m_rel = 16
    rel: dict[str, list[float]] = {"positive": [], "trig": []}
    sms = []
    for c in cosines:
        xc, yc = _pair(d, 1.5, 1.5, c, gen)
        smc = math.exp(float(xc @ yc))
        sms.append(smc)
        for name, cls in (("positive", PositiveRandomFeatures), ("trig", TrigRandomFeatures)):
            est = _kernel_estimates(cls, xc, yc, m_rel, draws // 4, orthogonal=False, seed=_draw_seed(seed, 3))
            rel[name].append(float((est - smc).square().mean().sqrt()) / smc)

    # attention-output MSE vs m (i.i.d. positive features) and cost vs m
    n, da = 64, 8
    qa, ka, va = (torch.randn(1, 1, n, da, generator=gen, dtype=torch.float64) for _ in range(3))
    qa, ka = qa * 0.35, ka * 0.35
    exact_att = softmax_attention(qa, ka, va)
    ms_att = [16, 64, 256, 1024]
    reps = 48 if quick else 128  # the estimator's errors are heavy-tailed: average many redraws
    att_mse = []
    for m in ms_att:
        fm = PositiveRandomFeatures(da, m, orthogonal=False, seed=seed).double()
        errs = []
        for _ in range(reps):
            errs.append(float((linear_attention(qa, ka, va, fm) - exact_att).square().mean()))
            fm.redraw()
        att_mse.append(float(np.mean(errs)))
    fit_att = fit_power_law(ms_att, att_mse)
    n_t, d_t = 4096, 16
    qt, kt, vt = (torch.randn(1, 2, n_t, d_t, generator=gen) for _ in range(3))
    ms_t = [64, 128, 256, 512, 1024]
    flops, seconds = [], []
    for m in ms_t:
        fm = PositiveRandomFeatures(d_t, m, seed=seed)
        with torch.no_grad():
            flops.append(count_flops(linear_attention, qt, kt, vt, fm))
            seconds.append(median_time(functools.partial(linear_attention, qt, kt, vt, fm),
                                       repeats=3 if quick else 5))
    fit_flops, fit_time = fit_power_law(ms_t, flops), fit_power_law(ms_t, seconds)

    checks = {
        **{f"kernel MSE of {k} ∝ m^{f.exponent:.3f} (needs −1.1…−0.9)": _within(f.exponent, -1.1, -0.9)
           for k, f in fits.items()},
        **{f"{k}: max |z| vs the closed form {z:.2f} (needs < 4)": z < 4 for k, z in z_scores.items()},
        f"orthogonal/i.i.d. MSE {orth_gain:.3f} (needs < 1)": orth_gain < 1.0,
        f"orthogonal blocks' Gram matrix {orth_dev:.1e} from I (needs < 1e-5)": orth_dev < 1e-5,
        f"attention-output MSE ∝ m^{fit_att.exponent:.3f} (needs −1.2…−0.8)": _within(fit_att.exponent, -1.2, -0.8),
        f"FLOPs ∝ m^{fit_flops.exponent:.3f} (needs 0.95–1.05)": _within(fit_flops.exponent, 0.95, 1.05),
        f"mean with the QR sign correction {_ratio(abs(bias[True][0]), bias[True][1]):.1f} standard errors off "
        "(needs < 4)": abs(bias[True][0]) < 4 * bias[True][1],
        f"mean without it {_ratio(abs(bias[False][0]), bias[False][1]):.1f} standard errors off (needs > 4)":
            abs(bias[False][0]) > 4 * bias[False][1],
        f"trigonometric error {_ratio(rel['trig'][0], rel['positive'][0]):.1f}× positive's where the kernel is "
        "smallest (needs > 10×)": rel["trig"][0] > 10 * rel["positive"][0],
        f"trigonometric error there {_ratio(rel['trig'][0], rel['trig'][-1]):.1f}× its own where the kernel is "
        "largest (needs > 5×)": rel["trig"][0] > 5 * rel["trig"][-1],
    }
    confirmed = all(checks.values())

    fig = Figure(figsize=(13, 3.8))
    ax1, ax2, ax3 = fig.subplots(1, 3)
    styles = {"positive_iid": "o", "positive_orthogonal": "s", "trig_iid": "^"}
    for name, vals in results.items():
        _loglog(ax1, ms, [v[0] for v in vals], fits[name], name, styles[name])
    for name in closed:
        ax1.loglog(ms, closed[name], "k+", ms=10)
    ax1.plot([], [], "k+", label="closed form (Performers, Lemma 2)")
    ax1.set(xlabel="m (random vectors ω)", ylabel="MSE of f(x)ᵀf(y)", title=f"Kernel MSE, exp(xᵀy)={sm:.3f}")
    ax1.legend(fontsize=7)
    ax2.semilogy(sms, rel["positive"], "o-", label="positive")
    ax2.semilogy(sms, rel["trig"], "^-", label="trigonometric")
    ax2.set(xscale="log", xlabel="exp(xᵀy) (|x| = |y| = 1.5)", ylabel="relative RMSE",
            title=f"Where the kernel is small (m={m_rel})")
    ax2.legend(fontsize=8)
    _loglog(ax3, ms_att, att_mse, fit_att, "attention-output MSE")
    for values, label, marker in ((flops, "FLOPs", "s"), (seconds, "wall time", "^")):
        normalised = [x / max(values) for x in values]
        _loglog(ax3, ms_t, normalised, fit_power_law(ms_t, normalised), f"{label} (÷ max)", marker)
    _theory(ax3, ms_att, att_mse, -1.0, "theory: ∝ 1/m (error)")
    normalised_flops = [x / max(flops) for x in flops]
    _theory(ax3, ms_t, normalised_flops, 1.0, "theory: ∝ m (cost)")
    ax3.set(xlabel="m", ylabel="MSE; FLOPs and wall time ÷ their max", title="Error falls as 1/m, cost grows as m")
    ax3.legend(fontsize=7)
    _finish(fig)
    return Evidence(
        confirmed=confirmed,
        checks=checks,
        numbers={**{f"exponent_mse_{k}": f.exponent for k, f in fits.items()},
                 **{f"mse_ratio_measured_over_closed_{k}_m{ms[0]}": v[0] for k, v in ratio.items()},
                 **{f"max_z_vs_closed_form_{k}": v for k, v in z_scores.items()},
                 "mse_orthogonal_over_iid": orth_gain, "orthogonal_blocks_max_gram_deviation": orth_dev,
                 "exponent_attention_mse_m": fit_att.exponent,
                 "exponent_flops_m": fit_flops.exponent, "exponent_wall_time_m": fit_time.exponent,
                 "relative_bias_sign_corrected": bias[True][0], "relative_bias_no_sign_correction": bias[False][0],
                 "bias_stderr_no_sign_correction": bias[False][1], "bias_stderr_sign_corrected": bias[True][1],
                 "trig_relative_rmse_smallest_kernel": rel["trig"][0],
                 "positive_relative_rmse_smallest_kernel": rel["positive"][0],
                 "trig_relative_rmse_largest_kernel": rel["trig"][-1]},
        key=["exponent_mse_positive_iid", "max_z_vs_closed_form_positive_iid", "mse_orthogonal_over_iid"],
        summary=("kernel MSE ∝ m^" + ", m^".join(f"{f.exponent:.3f}" for f in fits.values())
                 + f" ({', '.join(fits)}; need −1.1…−0.9), max |z| vs the closed forms {max(z_scores.values()):.2f} "
                 f"(needs < 4); orthogonal/i.i.d. MSE {orth_gain:.3f} (needs < 1); mean with the QR sign correction "
                 f"{_ratio(abs(bias[True][0]), bias[True][1]):.1f} standard errors off (needs < 4), without "
                 f"{_ratio(abs(bias[False][0]), bias[False][1]):.1f} (needs > 4); trigonometric error "
                 f"{_ratio(rel['trig'][0], rel['positive'][0]):.1f}× positive's where the kernel is smallest "
                 "(needs > 10×)"),
        method=(
            f"Kernel estimates through the package's feature modules (scale 1, float64, d={d}): {draws} "
            f"independent estimators per m ∈ {ms}, each averaging m random vectors (trigonometric: m frequencies, "
            f"sin and cos). x, y with |x|=|y|=0.6, cos 0.3. The closed forms, derived here and equal to Lemma 2 "
            "of Choromanski et al. (2021): positive Var[e^{ωᵀ(x+y)−|x|²/2−|y|²/2}] = e^{|x+y|²}SM²(1−e^{−|x+y|²}) "
            "(from E[e^{2ωᵀz}] = e^{2|z|²}); trigonometric Var[e^{(|x|²+|y|²)/2}cos ωᵀ(x−y)] = "
            "½e^{|x+y|²}SM⁻²(1−e^{−|x−y|²})² (from E cos²θ = (1+E cos 2θ)/2); divided by m. The measured MSE is "
            "compared to them by z-score (standard error of the squared errors). Orthogonal blocks (chi norms, "
            "sign-corrected QR) vs i.i.d.; the mean estimate with and without the QR sign correction "
            "(|x|=|y|=0.7, cos 0.2, in the plane of the first two coordinates, "
            f"m=d, {2 * draws} draws). Relative RMSE at m={m_rel} as the kernel shrinks (cos from 0.9 to −0.9). "
            f"Attention-output MSE of linear_attention (n={n}, d={da}, q, k ~ N(0, 0.35² I), i.i.d. features, "
            f"{reps} redraws) vs m; FLOPs (FlopCounterMode) "
            f"and median wall time of linear_attention at n={n_t} vs m (wall time is reported, not judged: "
            "machines are noisy). Confirmed when the MSE slopes ∈ [−1.1, −0.9], every |z| < 4, orthogonal < "
            "i.i.d. with the drawn directions orthogonal within each block of d (unit-norm Gram matrix within "
            "1e-5 of I: they are drawn in float32; a wrong-axis reshape gave 2.9), the attention slope "
            "∈ [−1.2, −0.8], the FLOP slope ∈ [0.95, 1.05], the sign-corrected mean "
            "is unbiased (< 4 s.e.) while the uncorrected one is biased (> 4 s.e.), and the trigonometric "
            "relative error at the smallest kernel is > 10× the positive one's and > 5× its own at the largest."),
        figures={"choice_of_m": fig},
    )
