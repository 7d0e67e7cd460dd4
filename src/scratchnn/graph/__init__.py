"""The computational-graph nodes of the seed series, and chains of them."""

from scratchnn.graph.chain import Chain, Edge, sigmoid_chain
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
    "Edge",
    "ExpLayer",
    "MulConstLayer",
    "MulLayer",
    "ReciprocalLayer",
    "sigmoid_chain",
]
