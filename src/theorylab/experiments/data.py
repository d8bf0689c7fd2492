"""The character-level corpus: Python's own documentation text, a character vocabulary, a fixed held-out split.

The text is ``pydoc_data.topics.topics`` (the help topics that ship with every CPython, about 465 000 characters),
joined in sorted key order with a blank line between topics. The help repeats itself: the topic ``compound`` holds
``while`` and ``with`` nearly whole, ``break``, ``continue`` and ``return`` share paragraphs. A cut at 90% of the
characters had put 8.4% of the held-out characters in spans of 100+ characters that the training text holds
verbatim. So the split is by *groups* of topics: topics that share any span of ``SHARED_SPAN`` characters form one
group (transitively), and a group lies wholly on one side. Held out are groups from the last (ordered by their
first key) until ``heldout_fraction`` of the characters is reached, passing over a group that would overshoot it
by more than half; each side is its topics joined in sorted key order.
No span of ``SHARED_SPAN`` characters of a held-out topic occurs in a training topic. The vocabulary is every
character of the whole text, sorted, so held-out text never meets an unknown one.

Batches are drawn independently per step from a generator seeded by ``(seed, step)``: a run resumed at step ``t``
sees exactly the batches an uninterrupted run sees, with no sampler state to save. A *global* batch of
``batch_size`` windows is drawn and rank ``r`` of ``world_size`` takes rows ``r, r + world_size, ...`` (its own
shard, as ``DistributedSampler`` does), so the same command gives the same training on 1 or on several processes.
"""

from __future__ import annotations

import functools
import hashlib
import operator
import platform
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

SOURCE = "pydoc_data.topics"


SHARED_SPAN = 100  # characters: topics sharing a span this long stay on one side of the split
JOIN = "\n\n"


def _topics() -> dict[str, str]:
    from pydoc_data.topics import topics

    return topics


@functools.lru_cache(maxsize=1)
def pydoc_text() -> str:
    """The documentation text that ships with this Python: every help topic, in sorted key order."""
    topics = _topics()
    return JOIN.join(topics[key] for key in sorted(topics))


def topic_groups(topics: dict[str, str], span: int = SHARED_SPAN) -> list[list[str]]:
    """The keys of ``topics`` in groups: two topics sharing any ``span`` consecutive characters are in one group
    (union-find over every window of ``span`` characters). Groups and their keys are in sorted key order."""
    parent = {k: k for k in topics}

    def root(k: str) -> str:
        while parent[k] != k:
            parent[k] = parent[parent[k]]
            k = parent[k]
        return k

    first_seen: dict[str, str] = {}
    for key in sorted(topics):
        text = topics[key]
        for i in range(len(text) - span + 1):
            other = first_seen.setdefault(text[i:i + span], key)
            if other != key and (a := root(other)) != (b := root(key)):
                parent[max(a, b)] = min(a, b)
    groups: dict[str, list[str]] = {}
    for key in sorted(topics):
        groups.setdefault(root(key), []).append(key)
    return sorted(groups.values())


def split_topics(topics: dict[str, str], heldout_fraction: float) -> tuple[list[str], list[str]]:
    """(training keys, held-out keys): groups of :func:`topic_groups` are held out from the last (by first key)
    until they hold ``heldout_fraction`` of the characters; a group that would overshoot that by more than half is
    passed over."""
    groups = topic_groups(topics)
    total = sum(len(t) for t in topics.values())
    target = heldout_fraction * total
    heldout: list[str] = []
    size = 0
    for group in reversed(groups):
        if size >= target:
            break
        grown = size + sum(len(topics[k]) for k in group)
        # a group that would overshoot by more than half the target is passed over for earlier, smaller ones
        if grown - target <= target / 2 and len(heldout) + len(group) < len(topics):
            heldout += group
            size = grown
    if not heldout:
        smallest = min(sum(len(topics[k]) for k in group) for group in groups)
        raise ValueError(f"heldout_fraction {heldout_fraction} holds out nothing: the smallest group of topics has "
                         f"{smallest} characters, {smallest / total:.2g} of the text")
    return sorted(set(topics) - set(heldout)), sorted(heldout)


def _integer(name: str, value: Any) -> int:
    """``value`` as a Python int: an int, a numpy integer or a 0-d integer tensor; TypeError naming ``name`` for
    anything else (bools, floats, integral ones too, and strings)."""
    if isinstance(value, torch.Tensor):
        if value.ndim != 0 or value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer, got a tensor of {value.dtype} and shape "
                            f"{tuple(value.shape)}")
        return int(value.item())
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__})") from None


@dataclass(frozen=True)
class CharVocab:
    """Characters <-> integer ids; ``chars[i]`` is the character of id ``i``."""

    chars: str

    def __post_init__(self) -> None:
        if len(set(self.chars)) != len(self.chars):
            raise ValueError("vocabulary characters must be distinct")

    @classmethod
    def from_text(cls, text: str) -> CharVocab:
        """The vocabulary of the distinct characters of ``text``, sorted (ids follow that order)."""
        return cls("".join(sorted(set(text))))

    @functools.cached_property
    def _index(self) -> dict[str, int]:
        return {c: i for i, c in enumerate(self.chars)}

    def __len__(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> torch.Tensor:
        """``text`` -> int64 tensor of ids, shape ``(len(text),)``; ValueError names an unknown character."""
        index = self._index
        try:
            ids = [index[c] for c in text]
        except KeyError as e:
            raise ValueError(f"character {e.args[0]!r} is not in the vocabulary") from None
        return torch.tensor(ids, dtype=torch.long)

    def decode(self, ids: torch.Tensor | np.ndarray | Iterable[int]) -> str:
        """Ids -> text: the string of ``chars[i]`` for each id ``i`` of ``ids``, in order (the inverse of
        :meth:`encode`).

        ``ids`` is a 1-D tensor (or numpy array) of an integer dtype, or any iterable of integers (Python or numpy
        ints, 0-d integer tensors); every id must lie in ``0 .. len(self) - 1``. A ValueError names the first id
        outside that range (a negative id does not count from the end), and refuses a tensor of more than one
        dimension, such as the ``(B, N)`` output of generation: decode each row, ``[vocab.decode(row) for row in
        ids]``. A TypeError refuses floating-point, complex or bool ids.
        """
        n = len(self.chars)
        if isinstance(ids, (torch.Tensor, np.ndarray)):
            if ids.ndim != 1:
                raise ValueError(f"ids must be 1-D, got shape {tuple(ids.shape)}: decode each row, "
                                 "[vocab.decode(row) for row in ids]")
            if isinstance(ids, torch.Tensor):
                if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
                    raise TypeError(f"ids must be integer ids, got a tensor of {ids.dtype}")
            elif ids.dtype.kind not in "iu":
                raise TypeError(f"ids must be integer ids, got an array of {ids.dtype}")
            values = ids.tolist()  # Python ints: the checks below see their values, not a wrapped dtype
        elif isinstance(ids, str) or not isinstance(ids, Iterable):  # a string's characters are not ids
            raise TypeError(f"ids must be a 1-D tensor of integer ids or an iterable of ints, got "
                            f"{type(ids).__name__}")
        else:
            values = [_integer(f"ids[{i}]", x) for i, x in enumerate(ids)]
        if values and not (min(values) >= 0 and max(values) < n):  # then find the first one outside
            i, v = next((i, v) for i, v in enumerate(values) if not 0 <= v < n)
            raise ValueError(f"ids[{i}] = {v} is not an id of this vocabulary of {n} characters (ids 0 .. {n - 1})")
        return "".join([self.chars[v] for v in values])


@dataclass(frozen=True)
class CharCorpus:
    """The encoded corpus: ``train`` and ``heldout`` are int64 tensors of character ids."""

    vocab: CharVocab
    train: torch.Tensor  # (N_train,)
    heldout: torch.Tensor  # (N_heldout,)
    sha256: str  # of the two split texts: checkpoints remember which text and split they were trained on
    python: str  # the Python whose pydoc_data this is (the text differs between versions)

    def describe(self) -> dict:
        """What the corpus is, for metrics.json: its source, the Python whose docs it is, its SHA-256, sizes."""
        return {"source": SOURCE, "python": self.python, "sha256": self.sha256,
                "train_chars": int(self.train.numel()), "heldout_chars": int(self.heldout.numel()),
                "vocab_size": len(self.vocab)}


def legacy_sha256() -> str:
    """The corpus hash of the split used before 2026-11-26 (the whole text, cut at 90%), to name it on refusal."""
    return hashlib.sha256(pydoc_text().encode("utf-8")).hexdigest()


@functools.lru_cache(maxsize=4)
def load_corpus(heldout_fraction: float = 0.1) -> CharCorpus:
    """The pydoc corpus split by groups of topics (module docstring): about ``heldout_fraction`` of the characters
    held out, the rest training text."""
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    topics = _topics()
    vocab = CharVocab.from_text(pydoc_text())
    train_keys, heldout_keys = split_topics(topics, heldout_fraction)
    train, heldout = (JOIN.join(topics[k] for k in keys) for keys in (train_keys, heldout_keys))
    # the hash covers the split too: a checkpoint trained on another split is refused
    digest = hashlib.sha256(f"{train}\0{heldout}".encode()).hexdigest()
    return CharCorpus(vocab=vocab, train=vocab.encode(train), heldout=vocab.encode(heldout), sha256=digest,
                      python=platform.python_version())


def batch_generator(seed: int, step: int) -> torch.Generator:
    """A generator that depends only on ``(seed mod 2**63, step)`` (mixed by numpy's SeedSequence: no collisions).

    ``seed`` is any integer (negative ones too: -1 draws as 2**63 - 1); ``step`` a non-negative integer.
    """
    seed, step = _integer("seed", seed), _integer("step", step)
    if step < 0:
        raise ValueError(f"step must be a non-negative integer, got {step}")
    state = np.random.SeedSequence([seed % 2**63, step]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def sample_batch(tokens: torch.Tensor, batch_size: int, seq_len: int, *, seed: int, step: int,
                 rank: int = 0, world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's shard of the global batch of step ``step``: inputs and next-character targets.

    ``batch_size`` random windows of ``seq_len + 1`` characters are drawn from ``tokens`` (the global batch);
    rank ``r`` keeps rows ``r::world_size``. Returns ``(x, y)``, each ``(batch_size // world_size, seq_len)``,
    with ``y[:, i] = x[:, i + 1]`` shifted by one position in the text.

    ``seed``: any integer, reduced modulo 2**63 (so -1 draws as 2**63 - 1); ``step``: a non-negative integer;
    ``world_size``: a positive integer; ``rank``: an integer in ``0 .. world_size - 1``. A non-integer (bool and
    integral floats included) is a TypeError naming the argument, an integer out of range a ValueError.
    """
    seed, step = _integer("seed", seed), _integer("step", step)
    rank, world_size = _integer("rank", rank), _integer("world_size", world_size)
    if world_size < 1:
        raise ValueError(f"world_size must be a positive integer, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must lie in 0 .. {world_size - 1} (world_size {world_size}), got {rank}")
    if step < 0:
        raise ValueError(f"step must be a non-negative integer, got {step}")
    if seq_len <= 0:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    if batch_size <= 0 or batch_size % world_size:
        raise ValueError(f"batch_size {batch_size} must be a positive multiple of world_size {world_size}")
    if tokens.numel() < seq_len + 1:
        raise ValueError(f"seq_len {seq_len} is too long for a text of {tokens.numel()} characters")
    g = batch_generator(seed, step)
    starts = torch.randint(0, tokens.numel() - seq_len, (batch_size,), generator=g)  # (B,)
    starts = starts[rank::world_size]  # (B / world,)
    windows = tokens[starts[:, None] + torch.arange(seq_len + 1)]  # (B / world, L + 1)
    return windows[:, :-1], windows[:, 1:]


def eval_windows(tokens: torch.Tensor, seq_len: int) -> list[tuple[int, int]]:
    """Non-overlapping ``(start, length)`` windows covering every next-character prediction in ``tokens``.

    Window ``w`` predicts characters ``start + 1 .. start + length`` from those before them in the window; the last
    window may be shorter. Every character but the first is predicted exactly once.
    """
    if seq_len <= 0:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    n = tokens.numel() - 1  # predictions
    return [(s, min(seq_len, n - s)) for s in range(0, n, seq_len)]
