"""A small decoder-only Transformer over characters, one per attention kind.

Pre-LayerNorm blocks (GPT-2 / nanoGPT layout) on :class:`theorylab.attention.MultiheadAttention` with
``causal=True``::

    h_0 = E[x] + P[0..N)                         token + learned position embeddings, (B, N, W)
    h   = h + Attn_kind(LN(h))                   causal: position i sees positions <= i
    h   = h + W_2 GELU(W_1 LN(h))                 MLP of width 4W
    logits = W_out LN(h_L)                       (B, N, V): a distribution over the next character

The attention kinds ("softmax", "separable", "linear", "favor") differ only in that one module, so the models of a
sweep have the same parameters apart from what the attention module itself holds.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

ATTENTION_KINDS = ("softmax", "separable", "linear", "favor")
# Adam's first step size is lr / (1 - β₁) = 10·lr, a float32 scalar in torch's kernel: lr must leave room for it
_MAX_LR = float(torch.finfo(torch.float32).max) * (1 - 0.9)
# Upper bounds on the sizes: far beyond what fits in memory (so they refuse only nonsense), below what overflows a
# C++ int64 shape product. A run inside them can still run out of memory: the CLI says so then.
SIZE_LIMITS = {"seq_len": 2**24, "layers": 4096, "width": 2**16, "heads": 2**12, "num_features": 2**16,
               "batch_size": 2**20}
#: steps of warm-up: beyond 2**53 (an exact float), warmup / step overflowed a float on the first step
MAX_WARMUP = 2**53


@dataclass(frozen=True)
class CharLMConfig:
    """Everything that determines a training run (saved in the checkpoint and in metrics.json)."""

    attention: str = "softmax"  # which MultiheadAttention kind
    seq_len: int = 256  # characters of context per training window
    layers: int = 2  # Transformer blocks
    width: int = 128  # embedding width W
    heads: int = 4  # attention heads (W must be divisible by it)
    num_features: int = 256  # random features per head for "favor"
    batch_size: int = 32  # global batch: windows per step over all ranks together
    lr: float = 3e-3  # peak learning rate (Adam)
    warmup: int = 50  # linear warm-up steps, then lr * sqrt(warmup / step)
    grad_clip: float = 1.0  # max global gradient norm
    seed: int = 0  # model initialisation and batch sampling

    def __post_init__(self) -> None:
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(f"unknown attention kind {self.attention!r}; choose one of {', '.join(ATTENTION_KINDS)}")
        for name in ("seq_len", "layers", "width", "heads", "num_features", "batch_size", "warmup", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):  # 16.5 from a tampered checkpoint
                raise ValueError(f"{name.replace('_', '-')} must be an integer, got {value!r}")
        for name in ("seq_len", "layers", "width", "heads", "num_features", "batch_size"):
            value, limit = getattr(self, name), SIZE_LIMITS[name]
            if value <= 0:
                raise ValueError(f"{name.replace('_', '-')} must be positive, got {value}")
            if value > limit:  # beyond: an overflow traceback in torch, or blocks built until memory ends
                raise ValueError(f"{name.replace('_', '-')} must be at most {limit}, got {value}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        if not (0 < self.lr <= _MAX_LR):
            raise ValueError(f"lr must be a positive number at most {_MAX_LR:.4g} (float32's largest over 10: "
                             "Adam's first step is lr/(1−β₁)), "
                             f"got {self.lr}")
        if not 0 <= self.warmup <= MAX_WARMUP:
            raise ValueError(f"warmup must lie in [0, {MAX_WARMUP}], got {self.warmup}")
        if not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be positive, got {self.grad_clip}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CharLMConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def lr_at(self, step: int) -> float:
        """Learning rate of step ``step`` (0-based): linear warm-up, then inverse square root (Vaswani et al.,
        2017). It depends on the step only, not on the run's length, so a run extended with ``--resume
        --steps M`` is the same run as one started with ``--steps M``."""
        t = step + 1
        if self.warmup == 0:
            return self.lr
        return self.lr * min(t / self.warmup, math.sqrt(self.warmup / t))


class Block(nn.Module):
    """Pre-LN Transformer block: causal self-attention then an MLP, each with a residual connection."""

    def __init__(self, width: int, heads: int, attention: str, num_features: int):
        super().__init__()
        from ..attention import MultiheadAttention

        self.ln1 = nn.LayerNorm(width)
        self.attn = MultiheadAttention(width, heads, kind=attention, causal=True, num_features=num_features)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (B, N, W) -> (B, N, W)
        h = h + self.attn(self.ln1(h))
        return h + self.mlp(self.ln2(h))


class CharTransformer(nn.Module):
    """Decoder-only character model: ``forward(tokens (B, N)) -> logits (B, N, vocab_size)``, N <= max_len."""

    def __init__(self, vocab_size: int, config: CharLMConfig):
        super().__init__()
        c = config
        self.config = config
        self.token_embedding = nn.Embedding(vocab_size, c.width)
        self.position_embedding = nn.Embedding(c.seq_len, c.width)
        blocks = [Block(c.width, c.heads, c.attention, c.num_features) for _ in range(c.layers)]
        self.blocks = nn.ModuleList(blocks)
        self.ln_f = nn.LayerNorm(c.width)
        self.head = nn.Linear(c.width, vocab_size, bias=False)
        # GPT-2 initialisation of the layers defined here (the attention module keeps its own): N(0, 0.02), the
        # second MLP layer scaled by 1/sqrt(2 L) so the residual stream's variance does not grow with depth.
        for m in [self.token_embedding, self.position_embedding, self.head, *(b.mlp for b in blocks)]:
            for p_name, p in m.named_parameters():
                if p_name.endswith("bias"):
                    nn.init.zeros_(p)
                else:
                    nn.init.normal_(p, std=0.02)
        for b in blocks:
            nn.init.normal_(cast(nn.Linear, b.mlp[2]).weight, std=0.02 / math.sqrt(2 * c.layers))

    @property
    def max_len(self) -> int:
        return self.position_embedding.num_embeddings

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        n = tokens.shape[1]
        if n > self.max_len:
            raise ValueError(f"sequence of length {n} is longer than the model's {self.max_len} positions")
        positions = torch.arange(n, device=tokens.device)
        h = self.token_embedding(tokens) + self.position_embedding(positions)  # (B, N, W)
        for block in self.blocks:
            h = block(h)
        return self.head(self.ln_f(h))  # (B, N, V)

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean next-character cross-entropy in nats; divide by ln 2 for bits per character."""
        logits = self(x)  # (B, N, V)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))
