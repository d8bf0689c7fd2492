"""Optimizers built from composable gradient transforms (see :mod:`theorylab.optim.transforms`)."""

from .base import ChainOptimizer
from .momentum import (
    RunningAverageSGD,
    SGDMomentum,
    momentum_from_running_average,
    running_average_from_momentum,
)
from .transforms import RunningAverage, ScaleByLearningRate, StepContext, Trace, Transform

__all__ = [
    "ChainOptimizer",
    "RunningAverage",
    "RunningAverageSGD",
    "SGDMomentum",
    "ScaleByLearningRate",
    "StepContext",
    "Trace",
    "Transform",
    "momentum_from_running_average",
    "running_average_from_momentum",
]
