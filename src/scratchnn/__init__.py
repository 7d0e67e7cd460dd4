"""scratchnn: a NumPy neural-network library in the style of *Deep Learning from Scratch*."""

from scratchnn.layers import (
    Elu,
    Gelu,
    Identity,
    Layer,
    LeakyRelu,
    Relu,
    Sigmoid,
    Silu,
    Softmax,
    Softplus,
    Tanh,
)

__version__ = "0.1.0"

__all__ = [
    "Elu",
    "Gelu",
    "Identity",
    "Layer",
    "LeakyRelu",
    "Relu",
    "Sigmoid",
    "Silu",
    "Softmax",
    "Softplus",
    "Tanh",
    "__version__",
]
