r"""Does claim 4.4's design premise hold? The angular step of scale-invariant weights under Adam with decay.

The 4.4 grids were designed on this theory (van Laarhoven 2017; Wan et al. 2021; Kosson et al. 2024): weights that
feed a LayerNorm are scale-invariant, and under Adam with the paper's decoupled decay (shrink λ per step) their norm
settles where the decay balances the growth from the update, at an angular step per step of about
:math:`\sqrt{2\lambda}` times a constant, *whatever the learning rate*; under torch's convention (shrink lr·λ) it is
:math:`\sqrt{2\,\mathrm{lr}\,\lambda}`. That is why the best λ should not move with lr.

This script measures the angular step of the second hidden layer (mean over the last ``--tail`` steps of a constant-lr
run) on the 4.4 network and data, full batch (as designs 1-3 of the claim trained) and with minibatches of 32 (as
design 4 trains), at three learning rates. If the premise holds, the "decoupled" rows are flat across lr.

    .venv/bin/python benchmarks/q4_rotational_equilibrium.py [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import math

import torch
import torch.nn.functional as F

from theorylab.claims import q4_weight_decay as q4
from theorylab.optim import Adam

LRS = (1e-3, 1e-2, 1e-1)
DECAYS = {"decoupled": (3e-3, 1e-2, 3e-2, 0.1, 0.3), "decoupled_lr": (0.3, 3.0)}


def angular_step(x: torch.Tensor, y: torch.Tensor, lr: float, lam: float, decay: str, batch: int | None,
                 steps: int, tail: int, seed: int = 0, hidden: int = 32) -> float:
    """Mean angle (radians) between consecutive values of the second hidden layer's weights over the last
    ``tail`` of ``steps`` Adam steps at a constant lr; ``batch`` None is full batch."""
    g = torch.Generator().manual_seed(seed)
    w1 = (torch.randn(x.shape[1], hidden, generator=g) / math.sqrt(x.shape[1])).requires_grad_()
    w2 = (torch.randn(hidden, hidden, generator=g) / math.sqrt(hidden)).requires_grad_()
    w3 = (torch.randn(hidden, 10, generator=g) / math.sqrt(hidden)).requires_grad_()
    opt = Adam([{"params": [w1, w2], "weight_decay": lam}, {"params": [w3], "weight_decay": 0.0}], lr=lr,
               decay=decay)
    angles = []
    for t in range(steps):
        idx = torch.randint(0, x.shape[0], (batch,), generator=g) if batch else slice(None)
        before = w2.detach().flatten().clone()
        opt.zero_grad()
        z = torch.relu(F.layer_norm(x[idx] @ w1, (hidden,)))
        z = torch.relu(F.layer_norm(z @ w2, (hidden,)))
        F.cross_entropy(z @ w3, y[idx]).backward()
        opt.step()
        if t >= steps - tail:
            cos = F.cosine_similarity(before, w2.detach().flatten(), dim=0).clamp(-1, 1)
            angles.append(float(torch.arccos(cos)))
    return sum(angles) / len(angles)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--tail", type=int, default=200)
    parser.add_argument("--json", help="write the table here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    x, y, _, _ = q4._replicate_data(q4.GridConfig(seeds=1), data_seed=0)  # the claim's first replicate
    x, y = x[0], y[0]
    rows = []
    for batch in (None, 32):
        for decay, lams in DECAYS.items():
            for lam in lams:
                steps = [angular_step(x, y, lr, lam, decay, batch, args.steps, args.tail) for lr in LRS]
                theory = [math.sqrt(2 * lam) if decay == "decoupled" else math.sqrt(2 * lr * lam) for lr in LRS]
                rows.append({"batch": batch or "full", "decay": decay, "lambda": lam, "angular_step": steps,
                             "theory_shape": theory})
                print(f"batch {batch or 'full':>4}  {decay:12s} λ={lam:<6g} angular step at lr "
                      f"{', '.join(f'{v:g}' for v in LRS)}: {', '.join(f'{s:.4f}' for s in steps)}   "
                      f"(theory up to a constant: {', '.join(f'{s:.4f}' for s in theory)})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"lrs": LRS, "steps": args.steps, "tail": args.tail, "rows": rows,
                       "torch": torch.__version__}, f, indent=1)


if __name__ == "__main__":
    main()
