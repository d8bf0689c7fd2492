"""What a typed caller writes, checked by mypy in test_static_checks (never run): the types the docs promise."""

from __future__ import annotations

import torch
from torch import nn

from theorylab.attention import DropInMultiheadAttention, swap_attention, unswap_attention
from theorylab.optim import AdamW


def _usage() -> None:
    model = nn.Linear(3, 1)
    opt = AdamW(model.parameters(), lr=1e-3)
    nothing: None = opt.step()  # torch.optim's overloads: no closure, None
    loss: float = opt.step(lambda: float(model(torch.ones(3)).sum()))  # a closure's float comes back a float
    tensor: torch.Tensor = opt.step(lambda: model(torch.ones(3)).sum())
    layer = nn.TransformerEncoderLayer(16, 2, batch_first=True)
    encoder: nn.TransformerEncoder = swap_attention(nn.TransformerEncoder(layer, 2), "favor")
    first = encoder.layers[0]  # the model keeps its own type: no cast before indexing
    drop_in: DropInMultiheadAttention = swap_attention(nn.MultiheadAttention(16, 2), "linear")
    back: nn.MultiheadAttention = unswap_attention(drop_in)
    plain: nn.TransformerEncoder = unswap_attention(encoder)
    del nothing, loss, tensor, first, back, plain
