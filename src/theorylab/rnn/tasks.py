r"""Long-range sequence tasks for the h-form RNN, and a small training loop with the classic remedies.

* **Adding problem** (Hochreiter & Schmidhuber 1997; Le et al. 2015): inputs (value ~ U[0, 1], marker) over T
  steps; two markers, one in each half; target the sum of the two marked values. Predicting the mean 1 scores
  MSE = Var(u₁ + u₂) = 2/12 = 1/6, the trivial baseline.
* **Copy memory** (Arjovsky et al. 2016): 10 symbols from 8, T − 1 blanks, a delimiter, 10 blanks; the output must
  be blank for T + 10 steps and then repeat the 10 symbols. Always answering blank and then guessing uniformly
  scores cross-entropy 10·ln 8 / (T + 20), the trivial baseline.
* **Sequential digits**: scikit-learn's 8×8 digits read one pixel per step (64 steps), class from the last state.

The model is :class:`~theorylab.rnn.RNN` in h-form with tanh and a linear readout of σ(h_t). Remedies: norm
gradient clipping (``clip``) and an orthogonal initial W (``orthogonal``; the default is torch.nn.RNN's uniform
±1/√H). :func:`train` also measures the exact ‖∂h_T/∂h_0‖₂ before and after training.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..seeding import keeps_global_rng, seed_global
from ._threads import threads_for
from .model import RNN

COPY_SYMBOLS, COPY_LENGTH = 8, 10  # 10 symbols drawn from 8 categories
TASKS = ("adding", "copy", "digits")


def adding_problem(n: int, steps: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """x (n, T, 2): [value, marker]; y (n, 1): the sum of the two marked values. Needs T ≥ 2."""
    if steps < 2:
        raise ValueError(f"the adding problem needs T >= 2, got {steps}")
    values = torch.rand(n, steps, generator=gen)
    half = steps // 2
    first = torch.randint(0, half, (n,), generator=gen)
    second = torch.randint(half, steps, (n,), generator=gen)
    marker = torch.zeros(n, steps)
    rows = torch.arange(n)
    marker[rows, first] = 1.0
    marker[rows, second] = 1.0
    y = (values[rows, first] + values[rows, second])[:, None]
    return torch.stack([values, marker], dim=-1), y


def copy_memory(n: int, steps: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """x (n, T + 20, 10) one-hot inputs; y (n, T + 20) targets (0 = blank, 1..8 symbols). Needs T ≥ 1."""
    if steps < 1:
        raise ValueError(f"the copy task needs T >= 1, got {steps}")
    length = steps + 2 * COPY_LENGTH
    symbols = torch.randint(1, COPY_SYMBOLS + 1, (n, COPY_LENGTH), generator=gen)
    tokens = torch.zeros(n, length, dtype=torch.long)
    tokens[:, :COPY_LENGTH] = symbols
    tokens[:, COPY_LENGTH + steps - 1] = COPY_SYMBOLS + 1  # the delimiter
    y = torch.zeros(n, length, dtype=torch.long)
    y[:, -COPY_LENGTH:] = symbols
    return F.one_hot(tokens, COPY_SYMBOLS + 2).float(), y


def copy_baseline(steps: int) -> float:
    """Cross-entropy of 'blank, then uniform over the 8 symbols': 10 ln 8 / (T + 20)."""
    return COPY_LENGTH * math.log(COPY_SYMBOLS) / (steps + 2 * COPY_LENGTH)


ADDING_BASELINE = 1.0 / 6.0


@lru_cache(maxsize=2)
def digits_sequences(seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """scikit-learn digits as 64-step pixel sequences in [0, 1]: (x_train (n, 64, 1), y_train, x_test, y_test)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32)[:, :, None] / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    cut = int(0.75 * len(y))
    return x[perm[:cut]], y[perm[:cut]], x[perm[cut:]], y[perm[cut:]]


class SequenceModel(nn.Module):
    """h-form tanh RNN and a linear readout of σ(h_t) (at every step, or at the last one)."""

    def __init__(self, input_size: int, hidden_size: int, output_size: int, *, orthogonal: bool = False) -> None:
        super().__init__()
        self.rnn = RNN(input_size, hidden_size, activation="tanh", form="h")
        if orthogonal:
            with torch.no_grad():
                nn.init.orthogonal_(self.rnn.W)
                self.rnn.b.zero_()
        self.readout = nn.Linear(hidden_size, output_size)

    def forward(self, x: Tensor, every_step: bool = False, h0: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Returns (outputs, h_T): outputs (B, T, O) if every_step else (B, O)."""
        states, last = self.rnn(x, h0)
        feats = torch.tanh(states if every_step else last)
        return self.readout(feats), last


@dataclass
class TrainResult:
    task: str
    steps: int  # T
    clip: float | None
    orthogonal: bool
    metric: float  # adding: test MSE / (1/6); copy: test loss / baseline; digits: test accuracy
    solved: bool
    reach_init: float  # mean log10 ‖∂h_T/∂h_0‖₂ at initialisation (exact)
    reach_final: float  # the same after training
    max_grad_norm: float  # largest parameter-gradient norm seen during training (before clipping)
    train_loss: float  # mean of the last 10 minibatch losses


def _loss(task: str, model: SequenceModel, x: Tensor, y: Tensor, h0: Tensor | None = None
          ) -> tuple[Tensor, Tensor]:
    """(loss, h_T)."""
    if task == "adding":
        out, last = model(x, h0=h0)
        return F.mse_loss(out, y), last
    if task == "copy":
        out, last = model(x, every_step=True, h0=h0)
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1)), last
    out, last = model(x, h0=h0)
    return F.cross_entropy(out, y), last


def _batch(task: str, n: int, steps: int, gen: torch.Generator, split: str = "train",
           seed: int = 0) -> tuple[Tensor, Tensor]:
    if task == "adding":
        return adding_problem(n, steps, gen)
    if task == "copy":
        return copy_memory(n, steps, gen)
    x_tr, y_tr, x_te, y_te = digits_sequences(seed)  # the run's seed splits train and test, as elsewhere
    if split == "test":
        return x_te, y_te
    idx = torch.randint(0, len(y_tr), (n,), generator=gen)
    return x_tr[idx], y_tr[idx]


def jacobian_reach(model: SequenceModel, x: Tensor) -> float:
    """Mean over sequences of log10 ‖∂h_T/∂h_0‖₂, exact (float64, :func:`log_jacobian_norms`), from h_0 = 0."""
    from .jacobian import log_jacobian_norms

    return float(log_jacobian_norms(model.rnn, x)[:, -1].mean()) / math.log(10.0)


@keeps_global_rng
def train(task: str, steps: int, *, clip: float | None = None, orthogonal: bool = False, hidden: int = 64,
          iterations: int = 300, batch: int = 64, lr: float = 3e-3, seed: int = 0) -> TrainResult:
    """Train the h-form tanh RNN on ``task`` at horizon T = ``steps`` with Adam; evaluate on fresh data.

    ``seed`` seeds the model's initialisation (through torch's global generator, whose state the caller gets
    back), the batches and, for digits, the train/test split."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    if clip is not None and (isinstance(clip, bool) or not isinstance(clip, numbers.Real) or not 0 < clip < math.inf):
        # clip_grad_norm_ takes a negative max_norm and flips every gradient: gradient ascent
        raise ValueError(f"clip must be None or a finite number > 0, got {clip!r}")
    gen = torch.Generator().manual_seed(seed)
    seed_global(seed)  # the model's initialisation (CPU only: no CUDA seed queued)
    in_out = {"adding": (2, 1), "copy": (COPY_SYMBOLS + 2, COPY_SYMBOLS + 1), "digits": (1, 10)}[task]
    model = SequenceModel(in_out[0], hidden, in_out[1], orthogonal=orthogonal)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    with threads_for(0):  # a recurrence of tiny kernels: one thread (see _threads)
        probe = _batch(task, 8, steps, gen, seed=seed)[0]
        reach_init = jacobian_reach(model, probe)
        losses, max_grad = [], 0.0
        for _ in range(iterations):
            x, y = _batch(task, batch, steps, gen, seed=seed)
            opt.zero_grad()
            loss, _ = _loss(task, model, x, y)
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip if clip is not None else math.inf)
            max_grad = max(max_grad, float(norm))
            opt.step()
            losses.append(float(loss.detach()))
        with torch.no_grad():
            x, y = _batch(task, 512, steps, gen, split="test", seed=seed)
            if task == "digits":
                out, _ = model(x)
                metric = float((out.argmax(-1) == y).float().mean())
                solved = metric >= 0.8
            elif task == "adding":
                out, _ = model(x)
                metric = float(F.mse_loss(out, y)) / ADDING_BASELINE
                solved = metric <= 0.1
            else:
                loss, _ = _loss(task, model, x, y)
                metric = float(loss) / copy_baseline(steps)
                solved = metric <= 0.5
        reach_final = jacobian_reach(model, probe)
    return TrainResult(task, steps, clip, orthogonal, metric, solved, reach_init, reach_final, max_grad,
                       sum(losses[-10:]) / len(losses[-10:]))
