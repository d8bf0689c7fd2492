"""Training on real data: a character-level language model per attention kind, resumable, torchrun-ready.

- :mod:`.data`: the corpus (Python's own documentation, ``pydoc_data.topics``), its character vocabulary, the fixed
  held-out split, seeded batch sampling that shards each global batch over the ranks.
- :mod:`.charlm`: a small decoder-only Transformer on :class:`theorylab.attention.MultiheadAttention`.
- :mod:`.checkpoint`: atomic checkpoint writes, ``weights_only=True`` loads.
- :mod:`.distributed`: the torchrun/DDP environment (gloo on CPU, nccl on CUDA) and sharding helpers.
- :mod:`.trainer`: the training loop behind ``theorylab train charlm``.
"""

from .charlm import ATTENTION_KINDS, CharLMConfig, CharTransformer
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .data import CharCorpus, CharVocab, load_corpus, sample_batch
from .distributed import DistEnv, shard_items
from .trainer import (
    StepInfo,
    TrainResult,
    evaluate_bpc,
    load_trained_model,
    read_resume_checkpoint,
    train_charlm,
)

__all__ = [
    "ATTENTION_KINDS",
    "CharCorpus",
    "CharLMConfig",
    "CharTransformer",
    "CharVocab",
    "CheckpointError",
    "DistEnv",
    "StepInfo",
    "TrainResult",
    "evaluate_bpc",
    "load_checkpoint",
    "load_corpus",
    "read_resume_checkpoint",
    "sample_batch",
    "save_checkpoint",
    "shard_items",
    "train_charlm",
    "load_trained_model",
]
