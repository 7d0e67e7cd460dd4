"""The computational-graph nodes of the seed series, chains of them, and their drawings."""

from scratchnn.graph.chain import Chain, Edge, sigmoid_chain
from scratchnn.graph.draw import (
    Drawing,
    GraphvizNotFoundError,
    add_drawing,
    chain_drawing,
    mul_drawing,
    network_drawing,
    relu_drawing,
    sigmoid_drawing,
)
from scratchnn.graph.nodes import (
    AddConstLayer,
    AddLayer,
    ExpLayer,
    MulConstLayer,
    MulLayer,
    ReciprocalLayer,
)

__all__ = [
    "AddConstLayer",
    "AddLayer",
    "Chain",
    "Drawing",
    "Edge",
    "ExpLayer",
    "GraphvizNotFoundError",
    "MulConstLayer",
    "MulLayer",
    "ReciprocalLayer",
    "add_drawing",
    "chain_drawing",
    "mul_drawing",
    "network_drawing",
    "relu_drawing",
    "sigmoid_chain",
    "sigmoid_drawing",
]
