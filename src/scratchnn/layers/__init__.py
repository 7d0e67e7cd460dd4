"""Layers: one module per family."""

from scratchnn.layers.activations import (
    Elu,
    Gelu,
    Identity,
    LeakyRelu,
    Relu,
    Sigmoid,
    Silu,
    Softmax,
    Softplus,
    Tanh,
)
from scratchnn.layers.base import Layer

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
]
