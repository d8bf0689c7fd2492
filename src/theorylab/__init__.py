"""theorylab: RNN gradients, momentum, efficient attention and weight decay, with claims verified by measurement."""

__version__ = "0.1.0"
