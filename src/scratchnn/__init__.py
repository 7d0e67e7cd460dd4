"""scratchnn: a NumPy neural-network library in the style of *Deep Learning from Scratch*."""

from scratchnn.gradient_check import GradcheckResult, gradcheck
from scratchnn.graph import (
    AddConstLayer,
    AddLayer,
    Chain,
    ExpLayer,
    MulConstLayer,
    MulLayer,
    ReciprocalLayer,
)
from scratchnn.layers import (
    Affine,
    Elu,
    Gelu,
    Identity,
    Layer,
    LeakyRelu,
    Loss,
    MeanSquaredError,
    Relu,
    Sigmoid,
    SigmoidWithLoss,
    Silu,
    Softmax,
    SoftmaxWithLoss,
    Softplus,
    Tanh,
)
from scratchnn.models import Sequential, mlp

__version__ = "0.1.0"

__all__ = [
    "AddConstLayer",
    "AddLayer",
    "Affine",
    "Chain",
    "Elu",
    "ExpLayer",
    "Gelu",
    "GradcheckResult",
    "Identity",
    "Layer",
    "LeakyRelu",
    "Loss",
    "MeanSquaredError",
    "MulConstLayer",
    "MulLayer",
    "ReciprocalLayer",
    "Relu",
    "Sequential",
    "Sigmoid",
    "SigmoidWithLoss",
    "Silu",
    "Softmax",
    "SoftmaxWithLoss",
    "Softplus",
    "Tanh",
    "__version__",
    "gradcheck",
    "mlp",
]
