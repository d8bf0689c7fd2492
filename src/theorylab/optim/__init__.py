"""Optimizers built from composable gradient transforms (see :mod:`theorylab.optim.transforms`)."""

from .adam import Adam, AdamW
from .base import ChainOptimizer, NonFiniteGradientError
from .decay import DECAY_MODES, with_decay
from .momentum import (
    RunningAverageSGD,
    SGDMomentum,
    momentum_from_running_average,
    running_average_from_momentum,
)
from .param_groups import decay_param_groups, decayed_names
from .sgd import SGD
from .transforms import (
    AddDecayedWeights,
    Negate,
    RunningAverage,
    ScaleByAdam,
    ScaleByLearningRate,
    StepContext,
    Trace,
    Transform,
    chain_step,
    scaled,
    writable,
)

__all__ = [
    "DECAY_MODES",
    "SGD",
    "Adam",
    "AdamW",
    "AddDecayedWeights",
    "ChainOptimizer",
    "Negate",
    "NonFiniteGradientError",
    "RunningAverage",
    "RunningAverageSGD",
    "SGDMomentum",
    "ScaleByAdam",
    "ScaleByLearningRate",
    "StepContext",
    "Trace",
    "Transform",
    "chain_step",
    "decay_param_groups",
    "decayed_names",
    "momentum_from_running_average",
    "running_average_from_momentum",
    "scaled",
    "with_decay",
    "writable",
]
