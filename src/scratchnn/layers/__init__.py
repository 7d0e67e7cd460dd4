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
from scratchnn.layers.convolution import Conv2d
from scratchnn.layers.linear import Affine
from scratchnn.layers.losses import Loss, MeanSquaredError, SigmoidWithLoss, SoftmaxWithLoss
from scratchnn.layers.normalization import BatchNorm
from scratchnn.layers.pooling import AvgPool2d, Flatten, MaxPool2d
from scratchnn.layers.regularization import Dropout

__all__ = [
    "Affine",
    "AvgPool2d",
    "BatchNorm",
    "Conv2d",
    "Dropout",
    "Elu",
    "Flatten",
    "Gelu",
    "Identity",
    "Layer",
    "LeakyRelu",
    "Loss",
    "MaxPool2d",
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
