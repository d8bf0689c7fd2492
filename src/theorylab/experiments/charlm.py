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
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from ..attention.multihead import DecodingState

ATTENTION_KINDS = ("softmax", "separable", "linear", "favor")
# what each kind carries from one generated character to the next (CharTransformer.generate): a state of fixed size
# (a cost per character that does not grow with the text), or every key and value so far
DECODING = {"softmax": "KV cache", "separable": "recurrent state", "linear": "recurrent state",
            "favor": "recurrent state"}
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
    """Everything that determines a training run (saved in the checkpoint and in metrics.json).

    Attributes:
        attention: the :class:`~theorylab.attention.MultiheadAttention` kind of every block (``ATTENTION_KINDS``;
            default "softmax").
        seq_len: characters of context per training window (default 256).
        layers: Transformer blocks (default 2).
        width: embedding width W (default 128; divisible by ``heads``).
        heads: attention heads (default 4).
        num_features: random features per head, used by kind "favor" only (default 256).
        batch_size: the global batch, windows per step over all ranks together (default 32; a multiple of the
            number of ranks).
        lr: the peak learning rate of Adam (default 3e-3), reached after ``warmup`` steps.
        warmup: linear warm-up steps, then lr · sqrt(warmup / step) (default 50).
        grad_clip: the largest global gradient norm (default 1.0).
        seed: the model's initialisation and the batches' sampling (default 0).

    Sizes are capped (``SIZE_LIMITS``); a bad value is a ValueError naming the field. ``to_dict`` and
    ``from_dict`` convert to and from the plain dict a checkpoint holds.
    """

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
        """The settings as a plain dict (JSON-able), as checkpoints and ``metrics.json`` record them."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CharLMConfig:
        """The config of a dict from :meth:`to_dict`; keys it does not know (from a later version) are ignored."""
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

    def step(self, h: torch.Tensor, state: DecodingState | None) -> tuple[torch.Tensor, DecodingState]:
        """``forward`` on the next positions of a sequence whose attention state is ``state`` (None: the first
        positions): (B, N, W) -> (B, N, W) and the state after them."""
        a, state = self.attn(self.ln1(h), state=state, return_state=True)
        h = h + a
        return h + self.mlp(self.ln2(h)), state


class CharTransformer(nn.Module):
    """Decoder-only character model: ``forward(tokens (B, N)) -> logits (B, N, vocab_size)``, N <= max_len."""

    def __init__(self, vocab_size: int, config: CharLMConfig):
        super().__init__()
        c = config
        self._config = config
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
        """The longest context the model takes (its position embeddings' count)."""
        return self.position_embedding.num_embeddings

    @property
    def config(self) -> CharLMConfig:
        """The settings it was built with, its attention as its blocks hold it now: a model changed by
        :func:`~theorylab.attention.swap_attention` reads as the kind it was given (with favor's number of
        features), so a checkpoint of ``config.to_dict()`` rebuilds this model. ValueError where the blocks' kinds
        differ (no config describes that model)."""
        attentions = [cast(Block, block).attn for block in self.blocks]
        kinds = {str(attn.kind) for attn in attentions}
        if len(kinds) != 1:
            raise ValueError(f"the blocks' attention kinds differ ({', '.join(sorted(kinds))}): no CharLMConfig "
                             "describes this model")
        kind = kinds.pop()
        features = getattr(attentions[0].feature_map, "num_features", None) if kind == "favor" else None
        return dataclasses.replace(self._config, attention=kind, num_features=features or self._config.num_features)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Next-character logits (B, N, V) of integer character ids ``tokens`` (B, N), N <= ``seq_len``: position i
        sees the characters up to i (causal). :meth:`loss` gives the training loss, :meth:`generate` samples."""
        n = tokens.shape[1]
        if n > self.max_len:
            raise ValueError(f"sequence of length {n} is longer than the model's {self.max_len} positions")
        positions = torch.arange(n, device=tokens.device)
        h = self.token_embedding(tokens) + self.position_embedding(positions)  # (B, N, W)
        for block in self.blocks:
            h = block(h)
        return self.head(self.ln_f(h))  # (B, N, V)

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, steps: int, *, temperature: float = 1.0,
                 generator: torch.Generator | None = None, incremental: bool = True) -> torch.Tensor:
        """Sample ``steps`` characters after ``prompt``: (B, P) token ids -> (B, P + steps).

        Each next character is drawn from softmax(logits / temperature) (``temperature=0``: the most likely one).
        ``incremental`` (default): the prompt is read once, then every character runs one position through the
        layers, which carry their attention's state (:data:`DECODING`): kinds "linear", "favor" and "separable"
        a state of fixed size, so each character costs the same whatever came before; "softmax" a KV cache.
        ``incremental=False`` runs the whole text so far for every character. Both give the same logits up to
        rounding. The model is put in eval mode for the call (dropout off) and restored after.

        Raises:
            ValueError: prompt not a non-empty (B, P) integer tensor of valid ids; steps < 0; P + steps beyond the
                model's positions; temperature negative or not finite.
            FloatingPointError: the model's logits are not finite (non-finite or overflowing weights).
        """
        prompt, steps, temperature = self._check_generate(prompt, steps, temperature)
        training = self.training
        self.eval()
        try:
            return self._generate(prompt, steps, temperature, generator, bool(incremental))
        finally:
            self.train(training)

    def _check_generate(self, prompt: Any, steps: Any, temperature: Any) -> tuple[torch.Tensor, int, float]:
        if not isinstance(prompt, torch.Tensor) or prompt.dim() != 2 or prompt.shape[1] == 0 or \
                prompt.dtype.is_floating_point or prompt.dtype.is_complex or prompt.dtype == torch.bool:
            got = f"{prompt.dtype} of shape {tuple(prompt.shape)}" if isinstance(prompt, torch.Tensor) else \
                type(prompt).__name__
            raise ValueError(f"generate: prompt must be a (B, P) integer tensor with P >= 1; got {got}")
        vocab = self.token_embedding.num_embeddings
        if prompt.numel() and not bool(((prompt >= 0) & (prompt < vocab)).all()):
            raise ValueError(f"generate: prompt holds ids outside 0..{vocab - 1}")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"generate: steps must be an integer >= 0; got {steps!r}")
        if prompt.shape[1] + steps > self.max_len:
            raise ValueError(f"generate: the prompt ({prompt.shape[1]}) and steps ({steps}) exceed the model's "
                             f"{self.max_len} positions")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or \
                not math.isfinite(temperature) or temperature < 0:
            raise ValueError(f"generate: temperature must be a finite number >= 0; got {temperature!r}")
        return prompt.long(), steps, float(temperature)

    def _generate(self, tokens: torch.Tensor, steps: int, temperature: float, generator: torch.Generator | None,
                  incremental: bool) -> torch.Tensor:
        states: list[DecodingState | None] = [None] * len(self.blocks)
        out, read = [tokens], 0  # read: positions already in the states
        for _ in range(steps):
            if not incremental:  # the whole text so far, every time
                logits = self(torch.cat(out, dim=1))[:, -1]
            else:  # the prompt once, then one position per character
                new = out[-1]
                positions = torch.arange(read, read + new.shape[1], device=new.device)
                h = self.token_embedding(new) + self.position_embedding(positions)
                for j, block in enumerate(self.blocks):
                    h, states[j] = cast(Block, block).step(h, states[j])
                logits = self.head(self.ln_f(h[:, -1]))
                read += new.shape[1]
            if not bool(torch.isfinite(logits).all()):
                raise FloatingPointError(f"generate: the model gave non-finite logits after "
                                         f"{sum(t.shape[1] for t in out)} positions (non-finite or overflowing "
                                         "weights)")
            out.append(_sample(logits, temperature, generator))
        return torch.cat(out, dim=1)

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean next-character cross-entropy in nats; divide by ln 2 for bits per character. Half-precision
        logits are taken in float32; a float64 model's loss is float64."""
        logits = self(x).flatten(0, 1)  # (B·N, V)
        return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), y.reshape(-1))


def _sample(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    """(B, V) logits -> (B, 1) ids: softmax(logits / temperature) sampled, or the argmax at temperature 0."""
    if temperature == 0:
        return logits.argmax(-1, keepdim=True)
    # shifted first, so that a tiny temperature sends the others to -inf rather than the largest to +inf (inf - inf is
    # NaN); in float64, where a temperature such as 1e-300 is not 0 (0 / 0 is NaN too)
    logits = logits.double()
    probs = torch.softmax((logits - logits.amax(-1, keepdim=True)) / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)
