"""Real data that ships offline: scikit-learn's bundled digits (1,797 8×8 images, 10 classes)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch


@dataclass(frozen=True)
class Split:
    """Standardised features (by the training split's mean and std) and integer labels."""

    x_train: torch.Tensor  # (N_train, 64)
    y_train: torch.Tensor  # (N_train,)
    x_test: torch.Tensor  # (N_test, 64)
    y_test: torch.Tensor  # (N_test,)


@lru_cache(maxsize=8)
def digits_split(seed: int = 0, test_fraction: float = 0.25, dtype: torch.dtype = torch.float64) -> Split:
    """A stratified train/test split of sklearn's digits, cached: claims that share the data share it.

    The returned tensors are shared between callers; treat them as read-only.
    """
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_fraction, random_state=seed, stratify=y)
    mean, std = x_tr.mean(0), x_tr.std(0)
    std = np.where(std > 0, std, 1.0)  # constant border pixels
    to = lambda a: torch.as_tensor((a - mean) / std, dtype=dtype)  # noqa: E731
    return Split(to(x_tr), torch.as_tensor(y_tr), to(x_te), torch.as_tensor(y_te))
