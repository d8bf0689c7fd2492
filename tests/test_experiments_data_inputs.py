"""Argument checks of the data helpers: ``theorylab.data.digits_split``, ``CharVocab.decode`` and ``sample_batch``.

Each bad argument is refused by name (with its value and the range it must lie in) before it reaches scikit-learn,
numpy or torch, whose own messages named none of ours or let it through silently. Valid arguments give exactly
what they gave before: the references below are the earlier implementations.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from theorylab.data import digits_split
from theorylab.experiments.data import CharVocab, batch_generator, sample_batch

N_DIGITS, N_CLASSES = 1797, 10


# ----------------------------------------------------------------------------------------------- digits_split
def _reference_split(seed: int, test_fraction: float, dtype: torch.dtype):
    """The split as digits_split computed it before its arguments were checked."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_fraction, random_state=seed, stratify=y)
    mean, std = x_tr.mean(0), x_tr.std(0)
    std = np.where(std > 0, std, 1.0)
    return tuple(torch.as_tensor((a - mean) / std, dtype=dtype) for a in (x_tr, x_te)) + (
        torch.as_tensor(y_tr), torch.as_tensor(y_te))


@pytest.mark.parametrize("seed, test_fraction, dtype", [
    (0, 0.25, torch.float64), (7, 0.1, torch.float32), (2**32 - 1, 0.5, torch.float16), (3, 0.25, torch.bfloat16),
    (1, 9 / N_DIGITS + 1e-12, torch.float64), (2, 1787 / N_DIGITS, torch.float64),
])
def test_digits_split_of_valid_arguments_is_unchanged(seed, test_fraction, dtype):
    """Valid seeds, fractions (the extremes of the usable range included) and float dtypes give the same tensors,
    bit for bit, as the unchecked implementation."""
    s = digits_split(seed, test_fraction, dtype)
    x_tr, x_te, y_tr, y_te = _reference_split(seed, test_fraction, dtype)
    for got, want in ((s.x_train, x_tr), (s.x_test, x_te), (s.y_train, y_tr), (s.y_test, y_te)):
        assert got.dtype == want.dtype and torch.equal(got, want)
    assert len(s.y_test.unique()) == len(s.y_train.unique()) == N_CLASSES


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool, torch.complex64,
                                   torch.complex128, "float32", np.float32, float, None])
def test_digits_split_refuses_a_dtype_that_is_not_a_real_float(dtype):
    """An integer dtype had truncated the standardised features (74% of them became 0); complex, strings and numpy
    types are refused too, by the argument's name."""
    with pytest.raises(TypeError, match=r"dtype must be one of torch\.float16, torch\.bfloat16, .* got"):
        digits_split(0, 0.25, dtype)


@pytest.mark.parametrize("bad", [0.999, 0.995, 0.9945, 0.001, 0.005, 9 / N_DIGITS])
def test_digits_split_refuses_a_test_fraction_that_leaves_a_class_out(bad):
    """A part of fewer than 10 samples cannot hold each class: refused by name with the usable range, where
    scikit-learn's message ('train_size = 1 should be greater or equal to the number of classes') named none."""
    with pytest.raises(ValueError, match=rf"test_fraction = {bad!r} .*9/1797 < test_fraction <= 1787/1797"):
        digits_split(0, bad)


def test_digits_split_usable_range_is_exactly_what_scikit_learn_splits():
    """Around both ends of the range, within a few ulps: a fraction whose test part ceil(f * 1797) leaves 10 or
    more images on each side gives a split with every class on both sides; any other gives our error."""
    outcomes = set()
    for edge in (9 / N_DIGITS, 1787 / N_DIGITS):
        f = edge
        for _ in range(4):
            f = float(np.nextafter(f, 0))
        for _ in range(9):
            n_test = math.ceil(f * N_DIGITS)
            if N_CLASSES <= n_test <= N_DIGITS - N_CLASSES:
                s = digits_split(0, f)
                assert len(s.y_test) == n_test and len(s.y_test.unique()) == len(s.y_train.unique()) == N_CLASSES
                outcomes.add((edge, "split"))
            else:
                with pytest.raises(ValueError, match=rf"test_fraction = {f!r} leaves {n_test} test"):
                    digits_split(0, f)
                outcomes.add((edge, "refused"))
            f = float(np.nextafter(f, 1))
    assert len(outcomes) == 4  # both outcomes seen at both ends


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, 0, 1, 1.5, -0.25])
def test_digits_split_refuses_a_test_fraction_outside_the_open_interval(bad):
    with pytest.raises(ValueError, match=r"test_fraction must lie in \(0, 1\)"):
        digits_split(0, bad)


@pytest.mark.parametrize("bad", ["0.25", None, True, [0.25], 0.25j])
def test_digits_split_refuses_a_test_fraction_that_is_not_a_real_number(bad):
    """A list had raised 'unhashable type' from the cache, True had been taken as a count of 1."""
    with pytest.raises(TypeError, match="test_fraction must be a real number"):
        digits_split(0, bad)


@pytest.mark.parametrize("bad", [-1, 2**32, 2**64])
def test_digits_split_refuses_a_seed_out_of_range(bad):
    with pytest.raises(ValueError, match=rf"seed must lie in 0 \.\. 2\*\*32 - 1 .*got {bad}"):
        digits_split(bad)


@pytest.mark.parametrize("bad", [1.5, 2.0, True, False, "0", None, np.float64(1), np.True_, [0]])
def test_digits_split_refuses_a_seed_that_is_not_an_integer(bad):
    with pytest.raises(TypeError, match="seed must be an integer"):
        digits_split(bad)


def test_digits_split_checks_every_call_not_only_the_first():
    """The cache had answered digits_split(True) with digits_split(1)'s split (True == 1 as a key), unchecked."""
    digits_split(1)
    with pytest.raises(TypeError, match="seed"):
        digits_split(True)
    digits_split(0, 0.5)
    with pytest.raises(TypeError, match="test_fraction"):
        digits_split(0, True)  # True == 1 would hash like a count


def test_digits_split_shares_one_split_between_spellings_of_the_same_arguments():
    """Claims that share the data share it: positional, keyword and numpy-integer spellings hit the same entry."""
    s = digits_split(0)
    assert digits_split(seed=0) is s and digits_split(0, 0.25, torch.float64) is s
    assert digits_split(np.int64(0), test_fraction=np.float64(0.25)) is s


def test_digits_split_documents_its_arguments():
    doc = digits_split.__doc__ or ""
    for word in ("seed", "test_fraction", "dtype", "stratified", "2**32 - 1", "mean", "std"):
        assert word in doc


# ------------------------------------------------------------------------------------------------ CharVocab.decode
VOCAB = CharVocab("abc")


@pytest.mark.parametrize("ids", [[0, 1, 2, 1], torch.tensor([0, 1, 2, 1]),
                                 torch.tensor([0, 1, 2, 1], dtype=torch.uint8),
                                 torch.tensor([0, 1, 2, 1], dtype=torch.int32), np.array([0, 1, 2, 1]),
                                 (np.int64(i) for i in [0, 1, 2, 1]), [torch.tensor(i) for i in [0, 1, 2, 1]],
                                 range(3), bytes([0, 1, 2])])
def test_decode_reads_a_1d_tensor_or_an_iterable_of_ints(ids):
    assert VOCAB.decode(ids) in ("abcb", "abc")


def test_decode_of_nothing_is_the_empty_string():
    assert VOCAB.decode([]) == VOCAB.decode(torch.zeros(0, dtype=torch.long)) == ""


@pytest.mark.parametrize("ids, first", [([-1], -1), ([3], 3), ([0, 103, -1], 103), (torch.tensor([1, -1, 5]), -1),
                                        (np.array([2, 7]), 7)])
def test_decode_names_the_first_id_outside_the_vocabulary(ids, first):
    """-1 had wrapped around to the last character, 103 had raised a bare IndexError."""
    with pytest.raises(ValueError, match=rf"ids\[\d\] = {first} is not an id of this vocabulary of 3 characters"):
        VOCAB.decode(ids)


@pytest.mark.parametrize("ids", [torch.zeros(2, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long),
                                 np.zeros((2, 4), dtype=np.int64), torch.tensor(1)])
def test_decode_of_a_batch_says_to_decode_each_row(ids):
    """The (B, N) output of generation had raised 'only one element tensors can be converted'."""
    with pytest.raises(ValueError, match=r"\[vocab\.decode\(row\) for row in ids\]"):
        VOCAB.decode(ids)


@pytest.mark.parametrize("ids", [torch.tensor([0.0, 1.0]), torch.tensor([True, False]), [0, 1.0], [True],
                                 [np.float64(1)], [np.True_], [torch.tensor(1.0)], "abc", 5, None])
def test_decode_refuses_ids_that_are_not_integers(ids):
    with pytest.raises(TypeError, match="ids"):
        VOCAB.decode(ids)


def test_decode_has_a_docstring():
    assert "ids" in (CharVocab.decode.__doc__ or "")


# ------------------------------------------------------------------------------------------------- sample_batch
TOKENS = torch.arange(1000) % 97


def _reference_batch(tokens, batch_size, seq_len, *, seed, step, rank=0, world_size=1):
    """sample_batch as it was before its arguments were checked."""
    g = batch_generator(seed, step)
    starts = torch.randint(0, tokens.numel() - seq_len, (batch_size,), generator=g)[rank::world_size]
    windows = tokens[starts[:, None] + torch.arange(seq_len + 1)]
    return windows[:, :-1], windows[:, 1:]


@pytest.mark.parametrize("seed, step, rank, world_size", [
    (0, 0, 0, 1), (3, 5, 1, 2), (-1, 7, 3, 4), (2**70, 2**40, 0, 8),
    (np.int64(4), np.int64(2), np.int64(1), np.int64(2)), (torch.tensor(5), torch.tensor(1), 0, 1),
])
def test_sample_batch_of_valid_arguments_is_unchanged(seed, step, rank, world_size):
    got = sample_batch(TOKENS, 8, 16, seed=seed, step=step, rank=rank, world_size=world_size)
    want = _reference_batch(TOKENS, 8, 16, seed=int(seed), step=int(step), rank=int(rank),
                            world_size=int(world_size))
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    assert got[0].shape == (8 // int(world_size), 16)


def test_sample_batch_seed_is_reduced_modulo_2_63():
    """Any integer seed is taken (the generator is seeded by seed mod 2**63): -1 and 2**63 - 1 draw alike."""
    assert torch.equal(sample_batch(TOKENS, 4, 8, seed=-1, step=3)[0], sample_batch(TOKENS, 4, 8, seed=2**63 - 1,
                                                                                      step=3)[0])


@pytest.mark.parametrize("rank, world_size", [(5, 2), (2, 2), (-1, 2), (1, 1)])
def test_sample_batch_refuses_a_rank_outside_the_world(rank, world_size):
    """rank=5 of world_size=2 had returned an empty batch."""
    with pytest.raises(ValueError, match=rf"rank must lie in 0 \.\. {world_size - 1}.*got {rank}"):
        sample_batch(TOKENS, 4, 8, seed=0, step=0, rank=rank, world_size=world_size)


@pytest.mark.parametrize("world_size", [0, -2])
def test_sample_batch_refuses_a_world_size_below_one(world_size):
    """world_size=0 had raised ZeroDivisionError."""
    with pytest.raises(ValueError, match=rf"world_size must be a positive integer, got {world_size}"):
        sample_batch(TOKENS, 4, 8, seed=0, step=0, world_size=world_size)


@pytest.mark.parametrize("bad", [-1, -(2**40)])
def test_sample_batch_refuses_a_negative_step(bad):
    """step=-1 had failed in numpy with 'expected non-negative integer', naming no argument."""
    with pytest.raises(ValueError, match=rf"step must be a non-negative integer, got {bad}"):
        sample_batch(TOKENS, 4, 8, seed=0, step=bad)


@pytest.mark.parametrize("name", ["seed", "step", "rank", "world_size"])
@pytest.mark.parametrize("bad", [1.5, 1.0, True, "1", None, np.float64(1), np.True_, torch.tensor(1.0),
                                 torch.tensor(True), torch.tensor([1])])
def test_sample_batch_refuses_arguments_that_are_not_integers(name, bad):
    """True had been taken as 1 (seed=True drew seed 1's batches); 1.5 failed inside numpy or torch."""
    kw = {"seed": 0, "step": 0, "rank": 0, "world_size": 1, name: bad}
    if name == "rank":
        kw["world_size"] = 2
    with pytest.raises(TypeError, match=rf"{name} must be an integer"):
        sample_batch(TOKENS, 4, 8, **kw)
