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
from scratchnn.layers.linear import Affine
from scratchnn.layers.losses import Loss, MeanSquaredError, SigmoidWithLoss, SoftmaxWithLoss

__all__ = [
    "Affine",
    "Elu",
    "Gelu",
    "Identity",
    "Layer",
    "LeakyRelu",
    "Loss",
    "MeanSquaredError",
    "Relu",
    "Sigmoid",
    "SigmoidWithLoss",
    "Silu",
    "Softmax",
    "SoftmaxWithLoss",
    "Softplus",
    "Tanh",
]
