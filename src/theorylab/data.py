"""Real data that ships offline: scikit-learn's bundled digits (1,797 8×8 images, 10 classes)."""

from __future__ import annotations

import math
import numbers
import operator
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

N_SAMPLES, N_CLASSES = 1797, 10  # sklearn's digits
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
SEED_MAX = 2**32 - 1  # scikit-learn's random_state (numpy's RandomState) takes 0 .. 2**32 - 1


@dataclass(frozen=True)
class Split:
    """Standardised features (by the training split's mean and std) and integer labels."""

    x_train: torch.Tensor  # (N_train, 64)
    y_train: torch.Tensor  # (N_train,)
    x_test: torch.Tensor  # (N_test, 64)
    y_test: torch.Tensor  # (N_test,)


def digits_split(seed: int = 0, test_fraction: float = 0.25, dtype: torch.dtype = torch.float64) -> Split:
    """A stratified train/test split of sklearn's digits (1,797 images of 64 pixels, 10 classes), cached: claims
    that share the data share it.

    ``seed`` (default 0): the split's random state, an integer in 0 .. 2**32 - 1 (scikit-learn's ``random_state``);
    the same seed gives the same split.
    ``test_fraction`` (default 0.25): the share of the images held out. scikit-learn holds out
    ``ceil(test_fraction * 1797)`` of them, and *stratified* (each class in the same proportion on both sides), so
    each part needs at least one image per class: 10 <= ceil(test_fraction * 1797) <= 1787, that is
    9/1797 < test_fraction <= 1787/1797 (about 0.00501 .. 0.99444).
    ``dtype`` (default ``torch.float64``): the features' dtype, a real floating one (float16, bfloat16, float32 or
    float64); the labels are int64.

    The features are standardised by the training rows' statistics, ``(x - mean) / std`` with the per-pixel mean
    and (population) std of the training images, for both parts; a pixel constant over the training images (std
    0) is divided by 1. The returned tensors are shared between callers; treat them as read-only.
    """
    if isinstance(seed, (bool, np.bool_)):
        raise TypeError(f"seed must be an integer in 0 .. 2**32 - 1, got {seed!r}")
    try:
        seed_int = operator.index(seed)
    except TypeError:
        raise TypeError(f"seed must be an integer in 0 .. 2**32 - 1, got {seed!r} ({type(seed).__name__})") from None
    if not 0 <= seed_int <= SEED_MAX:
        raise ValueError(f"seed must lie in 0 .. 2**32 - 1 ({SEED_MAX}), got {seed_int}")
    if isinstance(test_fraction, (bool, np.bool_)) or not isinstance(test_fraction, numbers.Real):
        raise TypeError(f"test_fraction must be a real number in (0, 1), got {test_fraction!r} "
                        f"({type(test_fraction).__name__})")
    fraction = float(test_fraction)
    if not 0 < fraction < 1:  # NaN too
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    n_test = math.ceil(fraction * N_SAMPLES)  # as scikit-learn counts the test part
    if not N_CLASSES <= n_test <= N_SAMPLES - N_CLASSES:
        raise ValueError(
            f"test_fraction = {test_fraction!r} leaves {n_test} test and {N_SAMPLES - n_test} training images of "
            f"{N_SAMPLES}; the stratified split needs at least one per class ({N_CLASSES}) in each part, "
            f"{N_CLASSES} <= ceil(test_fraction * {N_SAMPLES}) <= {N_SAMPLES - N_CLASSES}: "
            f"{N_CLASSES - 1}/{N_SAMPLES} < test_fraction <= {N_SAMPLES - N_CLASSES}/{N_SAMPLES} "
            f"(about {(N_CLASSES - 1) / N_SAMPLES:.5f} .. {(N_SAMPLES - N_CLASSES) / N_SAMPLES:.5f})")
    if not isinstance(dtype, torch.dtype) or dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be one of {', '.join(map(str, FLOAT_DTYPES))} (a real floating dtype: the "
                        f"features are standardised), got {dtype!r}")
    return _digits_split(seed_int, fraction, dtype)


@lru_cache(maxsize=8)
def _digits_split(seed: int, test_fraction: float, dtype: torch.dtype) -> Split:
    """:func:`digits_split` of checked arguments (a Python int, a float, a float dtype: one cache key per split)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_fraction, random_state=seed, stratify=y)
    mean, std = x_tr.mean(0), x_tr.std(0)
    std = np.where(std > 0, std, 1.0)  # constant border pixels
    to = lambda a: torch.as_tensor((a - mean) / std, dtype=dtype)  # noqa: E731
    return Split(to(x_tr), torch.as_tensor(y_tr), to(x_te), torch.as_tensor(y_te))
