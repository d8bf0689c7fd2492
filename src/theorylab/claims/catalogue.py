"""The 16 claims of the problem set, with fixed IDs (see shared/CLAIMS.md for the full mathematics)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ClaimInfo:
    id: str
    question: str
    title: str
    statement: str


QUESTIONS = {
    "Q1": "An RNN unit and its gradients",
    "Q2": "Momentum and running averages",
    "Q3": "Attention and its cost",
    "Q4": "L2 regularisation vs weight decay",
}

CATALOGUE: tuple[ClaimInfo, ...] = (
    ClaimInfo("1.1", "Q1", "Equivalent recurrences",
              "With h_t = W σ(h_{t-1}) + U x_t + b and g_t = σ(W g_{t-1} + U x_t + b), g_0 = σ(h_0) implies "
              "g_t = σ(h_t) for every t."),
    ClaimInfo("1.2", "Q1", "Vanishing gradients",
              "∂h_t/∂h_{t-1} = W diag(σ'(h_{t-1})), so ‖∂h_T/∂h_0‖ ≤ (‖W‖γ)^T; if λ₁(WᵀW) ≤ δ²/γ² with δ < 1 "
              "then ‖∂h_T/∂h_0‖ ≤ δ^T → 0."),
    ClaimInfo("1.3", "Q1", "Exploding gradients: necessary, not sufficient",
              "σ_max(W)·γ > 1 is necessary but not sufficient for exploding gradients: there are W with "
              "σ_max(W)γ ≫ 1 whose gradients still vanish, and W for which they do explode."),
    ClaimInfo("2.1", "Q2", "Momentum ≡ SGD on a running average",
              "Momentum (v_t = α v_{t-1} + ε g_t, Δθ_t = −v_t) and SGD on a running average "
              "(v_t = β v_{t-1} + (1−β) g_t, Δθ_t = −δ v_t) give identical iterates iff α = β and ε = δ(1−β)."),
    ClaimInfo("2.2", "Q2", "The running average unrolled",
              "v_t = (1−β) Σ_{i=1..t} β^{t−i} g_i (v_0 = 0), and the weights sum to 1 − β^t."),
    ClaimInfo("2.3", "Q2", "Bias of the running average and its correction",
              "If E[g_t] = μ for all t then E[v_t] = (1−β^t) μ ≠ μ, and v̂_t = v_t / (1−β^t) is unbiased."),
    ClaimInfo("3.1", "Q3", "Cost of standard attention",
              "One head costs time Θ(n²d + nd²) and space Θ(n² + nd + d²); h sequential heads cost time "
              "Θ(h(n²d + nd²)) and space Θ(n² + hnd + hd²). For long sequences the n×n score matrix dominates."),
    ClaimInfo("3.2", "Q3", "Separable attention",
              "softmax_row(Q) softmax_col(K)ᵀ has rows that are categorical distributions; computing "
              "softmax_col(K)ᵀV first costs Θ(nd²) time and Θ(nd + d²) space, but the implied n×n matrix has "
              "rank ≤ d: it is less expressive."),
    ClaimInfo("3.3", "Q3", "Kernelised attention is linear in n",
              "If a_ij = f(q_i)ᵀ f(k_j) then D⁻¹AV = diag(f(Q)(f(K)ᵀ1))⁻¹ f(Q)(f(K)ᵀV), which costs time Θ(nmd) "
              "and space Θ(nm + nd + md) and never forms the n×n matrix."),
    ClaimInfo("3.4", "Q3", "Positive random features",
              "f(x) = m^{-1/2} exp(−‖x‖²/2)[exp(ω_iᵀx)]_i with ω_i ~ N(0, I) is positive and unbiased: "
              "E[f(q)ᵀf(k)] = exp(qᵀk)."),
    ClaimInfo("3.5", "Q3", "Choice of the number of features m",
              "Cost grows linearly in m and the estimator's MSE falls as 1/m, matching the Performer paper's "
              "closed forms; orthogonal features lower the MSE; trigonometric "
              "features fail where the kernel is small."),
    ClaimInfo("4.1", "Q4", "SGD: L2 ≡ weight decay",
              "SGD on L + γ‖θ‖² with learning rate η equals weight decay θ ← θ − η∇L − λθ iff λ = 2ηγ."),
    ClaimInfo("4.2", "Q4", "Adam + L2 changes one line",
              "Adam with L2 replaces the gradient by ∇L + 2γθ before the moment estimates; it equals Adam on "
              "autograd of L + γ‖θ‖², step for step."),
    ClaimInfo("4.3a", "Q4", "Adam + L2 regularises unevenly",
              "The L2 term passes through 1/(√r̂ + δ): weights with large gradients are decayed less, so weights "
              "with small gradients shrink faster relative to their size."),
    ClaimInfo("4.3b", "Q4", "Decoupled decay regularises evenly",
              "With Δθ = −(ε ŝ/(√r̂ + δ) + λθ) every weight decays at the same rate λ, whatever its gradient."),
    ClaimInfo("4.4", "Q4", "The best decay decoupled from the lr",
              "With adaptive optimizers decoupled decay regularises every weight at the same relative rate and "
              "decouples the best weight decay from the learning rate (axis-aligned basins; "
              "Loshchilov & Hutter 2019)."),
)

CLAIM_IDS: tuple[str, ...] = tuple(c.id for c in CATALOGUE)
BY_ID: dict[str, ClaimInfo] = {c.id: c for c in CATALOGUE}
