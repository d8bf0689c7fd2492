r"""Feature maps φ for kernelised (linear) attention: :math:`\exp(s\, q^\top k) \approx φ(q)^\top φ(k)`.

Random-feature maps follow Choromanski et al., "Rethinking Attention with Performers" (ICLR 2021).
Let s be the scale (1/sqrt(D) by default), x' = sqrt(s) x and ω_1..ω_M ~ N(0, I_D). Then

* positive (FAVOR+), Lemma 1:  φ(x) = M^{-1/2} exp(-|x'|²/2) [exp(ω_rᵀx')]_r, so E[φ(q)ᵀφ(k)] = exp(s qᵀk);
* trigonometric:  φ(x) = (M/2)^{-1/2} exp(|x'|²/2) [sin(ω_rᵀx'), cos(ω_rᵀx')]_{r ≤ M/2}, also unbiased
  (it estimates the Gaussian kernel exp(-|q'-k'|²/2), rescaled), but not positive.

Both factor as (a bounded part) x exp(a per-row log-scale): ``PositiveRandomFeatures.log_features_rowwise`` and
``TrigRandomFeatures.log_scaled_features`` expose the pieces, so that
:func:`~theorylab.attention.linear_attention` can stabilise without ever forming exp(|x'|²/2) or exp(-|x'|²/2),
which overflow or underflow for |x'|² of a few hundred.

Orthogonal random features (Performers, section 2.4) draw the ω in blocks of D exactly orthogonal directions:
Q from the QR decomposition of a Gaussian matrix **with the sign correction** Q ← Q diag(sign(diag R)) — without
it Q is not Haar-distributed (Householder QR fixes the signs of R's diagonal, so each direction keeps a fixed
sign in one coordinate) and the estimator is biased — and each row rescaled by an independent chi(D) norm, so
that every ω_r is marginally N(0, I_D).

Feature maps are nn.Modules: the random matrices are buffers (.to(), .double(), state_dict() work); the same
seed gives the same features; ``redraw()`` draws new ones; nothing random happens in ``forward``. A seeded map's
generator state is a uint8 buffer, ``generator_state``, so a map loaded from a checkpoint redraws exactly what the
saved one would have.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._checks import no_autocast, positive_finite, positive_int


def floating_input(x: Tensor, name: str) -> Tensor:
    """``x``, refused unless floating point (TypeError naming the dtype, as the attention functions do): an
    integer input would be cast or truncated, a complex one has no meaning for these kernels."""
    if not x.is_floating_point():
        raise TypeError(f"{name}: the input must be floating point (float16, bfloat16, float32, float64); "
                        f"got {x.dtype}")
    return x


def _widened(x: Tensor, name: str) -> Tensor:
    """float32 for half-precision ``x``: the random maps exponentiate a per-row log-scale |x'|²/2 (≈ 4 for
    ordinary inputs), whose rounding in bfloat16 exp turns into a 10% error of the kernel estimate, against 0.65%
    when only the features are rounded (as :func:`~theorylab.attention.linear_attention` computes them)."""
    x = floating_input(x, name)
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def gaussian_orthogonal_random_matrix(num_rows: int, dim: int, *, generator: torch.Generator | None = None,
                                      sign_correction: bool = True, dtype: torch.dtype = torch.float32) -> Tensor:
    """(num_rows, dim) rows ω_r, each marginally N(0, I_dim), orthogonal within blocks of ``dim`` rows.

    ``sign_correction=False`` reproduces what public implementations do (for the comparison in claim 3.5)."""
    num_blocks = math.ceil(num_rows / dim)
    g = torch.randn(num_blocks, dim, dim, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(g)  # g = q r, one (dim, dim) block each
    if sign_correction:  # column j times sign(r_jj): q is Haar-distributed
        q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))[:, None, :]
    directions = q.mT.reshape(num_blocks * dim, dim)[:num_rows]  # rows orthonormal within each block
    norms = torch.randn(num_rows, dim, generator=generator, dtype=torch.float64).norm(dim=1)  # chi(dim)
    return (directions * norms[:, None]).to(dtype)


def gaussian_random_matrix(num_rows: int, dim: int, *, generator: torch.Generator | None = None,
                           dtype: torch.dtype = torch.float32) -> Tensor:
    """(num_rows, dim) i.i.d. N(0, 1) entries."""
    return torch.randn(num_rows, dim, generator=generator, dtype=torch.float64).to(dtype)


def _generator_state(state: object, name: str) -> Tensor:
    """A saved generator state as uint8 on the CPU, or ValueError. Any dtype that holds 0..255 exactly is taken
    (a .float() or .half() mapped over a checkpoint keeps the bytes)."""
    if not isinstance(state, Tensor) or state.dim() != 1 or state.is_complex() or state.dtype == torch.bool:
        got = f"{state.dtype} of shape {tuple(state.shape)}" if isinstance(state, Tensor) else type(state).__name__
        raise ValueError(f"{name}: generator_state must be a 1-D tensor of bytes; got {got}")
    values = state.detach().to("cpu", torch.float64)
    if not bool(((values >= 0) & (values <= 255) & (values == values.round())).all()):
        raise ValueError(f"{name}: generator_state holds values that are not bytes (0..255)")
    state = values.to(torch.uint8)
    try:
        torch.Generator().set_state(state)
    except RuntimeError as e:  # torch checks the size of its generator's state
        raise ValueError(f"{name}: generator_state is not a CPU generator's state ({state.numel()} bytes): {e}") from e
    return state


class _RandomFeatures(nn.Module):
    """Shared machinery: a seeded generator, the projection buffer, redraw()."""

    projection: Tensor  # a registered buffer
    generator_state: Tensor  # a registered buffer of seeded maps only
    _version = 2  # 2: seeded maps save generator_state; state_dicts of version 1 lack it

    def __init__(self, head_dim: int, num_projections: int, num_features: int, *, orthogonal: bool,
                 scale: float | None, seed: int | None) -> None:
        super().__init__()
        name = type(self).__name__
        head_dim = positive_int(head_dim, what="head_dim", name=name)
        num_features = positive_int(num_features, what="num_features", name=name)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
            raise TypeError(f"{name}: seed must be an integer or None; got {seed!r}")
        self.head_dim = head_dim
        self.num_features = num_features
        self.orthogonal = bool(orthogonal)
        # s = 0 or < 0 has no real sqrt(s) x; NaN would only surface as NaN outputs much later
        self.scale = head_dim ** -0.5 if scale is None else positive_finite(scale, what="scale", name=name)
        self.seed = seed
        self._num_projections = num_projections
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        self.register_buffer("projection", self._draw(generator))  # (num_projections, head_dim): the ω_r
        if generator is not None:
            # the seeded generator's state after the latest draw. A buffer (not a Generator attribute), so that
            # state_dict, functional_call, torch.export and DCP carry it, and a map loaded from a checkpoint
            # redraws what the saved one would have; uint8, so .half() or .to(dtype) of the module leaves it alone
            self.register_buffer("generator_state", generator.get_state())

    def _draw(self, generator: torch.Generator | None) -> Tensor:
        draw = gaussian_orthogonal_random_matrix if self.orthogonal else gaussian_random_matrix
        return draw(self._num_projections, self.head_dim, generator=generator)

    def _seeded_generator(self) -> torch.Generator | None:
        """A generator in this map's saved state; None without a seed (torch's global generator draws)."""
        if "generator_state" not in self._buffers:
            return None
        generator = torch.Generator()
        try:
            if self.generator_state.is_meta:
                raise RuntimeError("it is on the meta device")
            generator.set_state(self.generator_state.to("cpu", torch.uint8))  # assign=True may have kept floats
        except RuntimeError as e:  # e.g. the uninitialised bytes that to_empty() leaves
            raise RuntimeError(f"{type(self).__name__}: generator_state is not a generator's state ({e}); after "
                               "to_empty(), call reset_parameters()") from e
        return generator

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Draw ω afresh as at construction: the seed's first draw (or the global generator's next), and the seeded
        generator's state after it. What ``to_empty()`` needs, as for torch's own modules."""
        if self.seed is None:  # as constructed: torch's global generator draws (a loaded generator is dropped)
            self._buffers.pop("generator_state", None)
            self.redraw()
            return
        generator = torch.Generator().manual_seed(self.seed)
        self.projection.copy_(self._draw(generator).to(self.projection))
        self.generator_state.copy_(generator.get_state())

    @torch.no_grad()
    def redraw(self) -> None:
        """Draw new ω (the next draw of this module's seeded generator, or of torch's global one)."""
        generator = self._seeded_generator()
        self.projection.copy_(self._draw(generator).to(self.projection))
        if generator is not None:
            self.generator_state.copy_(generator.get_state())

    def __setstate__(self, state: dict) -> None:
        # a whole module pickled before version 2 kept its seeded torch.Generator as an attribute
        generator = state.pop("_generator", None)
        super().__setstate__(state)
        if generator is not None and "generator_state" not in self._buffers:
            self.register_buffer("generator_state", generator.get_state())

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        key = prefix + "generator_state"
        if key in state_dict:
            try:
                state = _generator_state(state_dict[key], type(self).__name__)
            except ValueError as e:  # reported as torch reports a size mismatch: the other entries load, then an error
                error_msgs.append(f"{key}: {e}")
                state_dict = {k: v for k, v in state_dict.items() if k != key}
            else:
                if "generator_state" not in self._buffers:  # an unseeded map takes on the saved map's generator
                    self.register_buffer("generator_state", torch.empty_like(state, device=self.projection.device))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        # saved by an unseeded map (its draws came from torch's global generator, which it does not own) or before
        # version 2: the map keeps its own generator, as loading always did
        if key in missing_keys:
            missing_keys.remove(key)

    def project(self, x: Tensor) -> Tensor:
        """ω_rᵀ x' for every row: (..., N, D) -> (..., N, num_projections)."""
        floating_input(x, type(self).__name__)
        w = self.projection.to(x.dtype) * math.sqrt(self.scale)
        return x @ w.mT

    def extra_repr(self) -> str:
        return (f"head_dim={self.head_dim}, num_features={self.num_features}, orthogonal={self.orthogonal}, "
                f"scale={self.scale:.4g}, seed={self.seed}")


class PositiveRandomFeatures(_RandomFeatures):
    """FAVOR+ positive random features: fm(q) @ fm(k).mT is an unbiased estimate of exp(scale · qᵀk).

    φ(x) = M^{-1/2} exp(ω_rᵀx' − |x'|²/2), r = 1..M, with x' = sqrt(scale)·x and ω_r ~ N(0, I_D) (Performers,
    Lemma 1). ``log_features`` gives log φ exactly; :func:`~theorylab.attention.linear_attention` uses it to
    stabilise the exponentials (the stabilisation lives there, not here: ``forward`` overflows or underflows where
    exp does).

    Args:
        head_dim: D, the last dimension of the inputs.
        num_features: M, the number of features (and of random directions ω).
        orthogonal: draw the ω in blocks of D exactly orthogonal directions (lower variance; default True).
        scale: s in exp(s·qᵀk); None means 1/sqrt(D), as softmax attention's.
        seed: seeds the draws (this one and every ``redraw()``); None uses torch's global generator.

    Raises:
        TypeError: head_dim, num_features or seed is not an integer, scale not a real number.
        ValueError: head_dim or num_features <= 0, scale not finite and > 0.
    """

    def __init__(self, head_dim: int, num_features: int, *, orthogonal: bool = True, scale: float | None = None,
                 seed: int | None = None) -> None:
        super().__init__(head_dim, num_features, num_features, orthogonal=orthogonal, scale=scale, seed=seed)

    def log_features(self, x: Tensor) -> Tensor:
        """log φ(x) = ωᵀx' - |x'|²/2 - log(M)/2: (..., N, D) -> (..., N, M)."""
        projection, offset = self.log_features_rowwise(x)
        return projection + offset[..., None]

    def log_features_rowwise(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """log φ(x) split as (ωᵀx' of shape (..., N, M), the per-row offset -|x'|²/2 - log(M)/2 of shape
        (..., N)), so that a caller can fold the offset into its own per-row stabiliser in one pass."""
        offset = -0.5 * self.scale * (x * x).sum(-1) - 0.5 * math.log(self.num_features)
        return self.project(x), offset

    def forward(self, x: Tensor) -> Tensor:
        """φ(x): (..., N, D) -> (..., N, M), positive wherever representable. Half-precision x is computed in
        float32 (autocast off, as in linear_attention) and the features returned in x's dtype."""
        with no_autocast(x.device):
            return torch.exp(self.log_features(_widened(x, type(self).__name__))).to(x.dtype)


class TrigRandomFeatures(_RandomFeatures):
    """sin/cos random features of num_features/2 frequencies; unbiased for exp(scale · qᵀk) but not positive.

    φ(x) = (M/2)^{-1/2} exp(|x'|²/2) [sin(ω_rᵀx'), cos(ω_rᵀx')], r = 1..M/2, with x' = sqrt(scale)·x and
    ω_r ~ N(0, I_D): E[φ(q)ᵀφ(k)] = exp(scale·qᵀk). Negative entries make attention normalisers that can be
    near zero or negative, which is why FAVOR+ uses positive features.

    Args:
        head_dim: D, the last dimension of the inputs.
        num_features: M, even: sin and cos of M/2 random frequencies.
        orthogonal: draw the ω in blocks of D orthogonal directions (default False).
        scale: s in exp(s·qᵀk); None means 1/sqrt(D).
        seed: seeds the draws (this one and every ``redraw()``); None uses torch's global generator.

    Raises:
        TypeError: head_dim, num_features or seed is not an integer, scale not a real number.
        ValueError: head_dim or num_features <= 0, num_features odd, scale not finite and > 0.
    """

    def __init__(self, head_dim: int, num_features: int, *, orthogonal: bool = False, scale: float | None = None,
                 seed: int | None = None) -> None:
        num_features = positive_int(num_features, what="num_features", name="TrigRandomFeatures")
        if num_features % 2:
            raise ValueError(f"TrigRandomFeatures: num_features must be even (sin and cos of num_features/2 "
                             f"frequencies); got {num_features}")
        super().__init__(head_dim, num_features // 2, num_features, orthogonal=orthogonal,
                         scale=scale, seed=seed)

    def log_scaled_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """φ(x) split as (the bounded part (M/2)^{-1/2} [sin(ωᵀx'), cos(ωᵀx')] of shape (..., N, M), the per-row
        log-scale |x'|²/2 of shape (..., N)): φ(x) = bounded · exp(log-scale)."""
        proj = self.project(x)  # (..., N, M/2)
        bounded = torch.cat([torch.sin(proj), torch.cos(proj)], dim=-1) / math.sqrt(self._num_projections)
        return bounded, 0.5 * self.scale * (x * x).sum(-1)

    def forward(self, x: Tensor) -> Tensor:
        """φ(x): (..., N, D) -> (..., N, M). Half-precision x is computed in float32 (autocast off) and the
        features returned in x's dtype."""
        with no_autocast(x.device):
            bounded, log_scale = self.log_scaled_features(_widened(x, type(self).__name__))
            return (bounded * torch.exp(log_scale)[..., None]).to(x.dtype)  # overflows for |x'|² > ~176 in float32


class EluFeatures(nn.Module):
    """φ(x) = elu(x) + 1 (Katharopoulos et al. 2020): positive, deterministic, M = D.

    Computed as x + 1 for x > 0 and exp(x) otherwise: elu(x) + 1 = (exp(x) - 1) + 1 rounds to exactly 0 in float32
    for x < about -17 (exp(-20) = 2.1e-9 is lost against 1).

    Args:
        head_dim: D, the last dimension of the inputs; optional (default None: any D), since the map has no
            parameters. When given, it is also ``num_features`` (M = D), and
            :func:`~theorylab.attention.linear_attention` checks it against the head dim D of q and k (ValueError
            "the feature map's head_dim is 8 but q and k have head dim D=16").

    Raises:
        TypeError: head_dim is not an integer (bool included); ``forward``: x is not floating point.
        ValueError: head_dim <= 0.
    """

    def __init__(self, head_dim: int | None = None) -> None:
        super().__init__()
        if head_dim is not None:
            head_dim = positive_int(head_dim, what="head_dim", name="EluFeatures")
        self.head_dim = head_dim
        self.num_features = head_dim

    def forward(self, x: Tensor) -> Tensor:
        """φ(x) = elu(x) + 1: (..., N, D) -> (..., N, D), positive."""
        # φ = r + exp(x - r) with r = relu(x): x + 1 above 0 and exp(x) below, exactly (not 1 + expm1(x), which is 0
        # below x ≈ -17 in float32). x - r is min(x, 0) with gradient 1 at x = 0 (relu'(0) = 0), so φ'(0) = 1 in
        # every torch version (clamp(max=0)'s gradient at its bound is 0 from torch 2.14 on); at x = +inf it is
        # inf - inf = NaN, which nan_to_num makes 0 (φ = inf, gradient 1). The values and gradients of the two
        # torch.where it replaces, bit for bit, at 1/6 of their time on the CPU (6.8 against 1.2 ms, 512k entries),
        # but one: at a NaN input (output NaN) the gradient is relu's, the upstream one, where theirs was NaN (no
        # where-free form found keeps both that and +inf's)
        r = torch.relu(floating_input(x, "EluFeatures"))
        return r + torch.exp(torch.nan_to_num(x - r, nan=0.0))


class ReluFeatures(nn.Module):
    """φ(x) = relu(x): non-negative, deterministic, M = D (a query whose features are all zero outputs zeros).

    Args:
        head_dim: D, the last dimension of the inputs; optional (default None: any D), since the map has no
            parameters. When given, it is also ``num_features`` (M = D), and
            :func:`~theorylab.attention.linear_attention` checks it against the head dim D of q and k (ValueError
            "the feature map's head_dim is 8 but q and k have head dim D=16").

    Raises:
        TypeError: head_dim is not an integer (bool included); ``forward``: x is not floating point.
        ValueError: head_dim <= 0.
    """

    def __init__(self, head_dim: int | None = None) -> None:
        super().__init__()
        if head_dim is not None:
            head_dim = positive_int(head_dim, what="head_dim", name="ReluFeatures")
        self.head_dim = head_dim
        self.num_features = head_dim

    def forward(self, x: Tensor) -> Tensor:
        """φ(x) = relu(x): (..., N, D) -> (..., N, D), non-negative."""
        return F.relu(floating_input(x, "ReluFeatures"))
