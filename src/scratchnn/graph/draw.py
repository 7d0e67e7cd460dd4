"""Drawings of computational graphs, with the numbers of a real forward and backward pass.

Each ``*_drawing`` function runs the nodes of :mod:`scratchnn.graph` (or the
layers of :mod:`scratchnn.layers`) forward and backward and records what
every edge carried; no number in a drawing is computed here. A
:class:`Drawing` then becomes text as the book draws it: each node shows its
operation, each edge its forward value above (black, left to right) and its
gradient below (red, right to left).

* :meth:`Drawing.to_dot` gives Graphviz DOT text (no program needed);
* :meth:`Drawing.to_mermaid` gives Mermaid text for Markdown;
* :meth:`Drawing.save` writes ``.dot``, ``.mmd``, ``.svg`` or ``.png``
  (the last two through Graphviz's ``dot``, when it is installed).

>>> drawing = sigmoid_drawing(0.0, 1.0)
>>> [(w.name, w.value, w.grad) for w in drawing.wires]  # doctest: +NORMALIZE_WHITESPACE
[('x', '0', '0.25'), ('-x', '-0', '-0.25'), ('exp(-x)', '1', '-0.25'),
 ('1+exp(-x)', '2', '-0.25'), ('y', '0.5', '1')]
>>> print(drawing.to_dot().splitlines()[0])
digraph "sigmoid" {
"""

from __future__ import annotations

import html
import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from scratchnn.files import atomic_path, write_text_atomically
from scratchnn.graph.chain import Chain, sigmoid_chain
from scratchnn.graph.nodes import AddLayer, MulLayer
from scratchnn.layers import Relu, Sigmoid

FORWARD_COLOUR = "#1a1a1a"
BACKWARD_COLOUR = "#c62828"
PENDING_COLOUR = "#9e9e9e"  # a gradient that the backward pass has not reached yet

#: The formats :meth:`Drawing.save` writes, by file suffix.
FORMATS = {".dot": "dot", ".gv": "dot", ".mmd": "mermaid", ".svg": "svg", ".png": "png"}

# Arrays with at most this many elements show their values; larger ones only their shape.
MAX_VALUES = 6


class GraphvizNotFoundError(RuntimeError):
    """Graphviz's ``dot`` is not on the PATH, so SVG and PNG cannot be made."""


def format_value(value: Any, digits: int = 4) -> str:
    """A number or a small array as a drawing shows it: ``digits`` significant digits.

    >>> format_value(220.00000000000003)
    '220'
    >>> format_value(np.array([[0.5, -1.25], [3.0, 1e-5]]))
    '[[0.5, -1.25], [3, 1e-05]]'
    """
    if isinstance(digits, bool) or not isinstance(digits, (int, np.integer)) or digits < 1:
        raise ValueError(f"digits must be a whole number of at least 1, got {digits!r}")
    array = np.asarray(value)
    if array.ndim == 0:
        return f"{float(array):.{digits}g}"
    text = np.array2string(
        array,
        separator=", ",
        formatter={"float_kind": lambda v: f"{v:.{digits}g}", "int_kind": str},
        max_line_width=10**6,
    )
    return text.replace("\n", "").replace(",  ", ", ").replace("  ", " ")


def _describe(value: Any, digits: int, max_values: int) -> str:
    """Values of a small array (with its shape when not a scalar), only the shape of a large one."""
    array = np.asarray(value)
    if array.ndim == 0:
        return format_value(array, digits)
    if array.size <= max_values:
        return f"{array.shape} {format_value(array, digits)}"
    return f"{array.shape}"


def _numbers(who: str, name: str, value: Any) -> np.ndarray:
    """``value`` as an array of real numbers, or an error naming the argument ``name``."""
    if isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**63:
        # Beyond int64 NumPy keeps a Python int as an object: as a float, if it is one.
        try:
            value = float(value)
        except OverflowError:
            raise ValueError(
                f"{who}: {name} has {len(str(abs(value)))} digits, beyond float64"
            ) from None
    try:
        array = np.asarray(value)
    except ValueError as error:  # a ragged list
        raise ValueError(f"{who}: {name} is not a rectangular array: {error}") from None
    if array.dtype.kind not in "biuf":
        raise TypeError(
            f"{who}: {name} must be a real number or an array of them, got "
            f"{type(value).__name__}" + (f" of {array.dtype}" if array.ndim else "")
        )
    return array


def _check_prices(who: str, **values: Any) -> None:
    """A shopping graph's numbers are one finite real number each, as in the book (an array
    would meet the nodes' scalar gradient; an inf would stand where a price is drawn). They
    keep their type: a float32 price is computed in float32."""
    for name, value in values.items():
        array = _numbers(who, name, value)
        if array.ndim:
            raise ValueError(f"{who}: {name} must be one number, got an array of shape {array.shape}")
        if not np.isfinite(array):
            raise ValueError(f"{who}: {name} is {float(array)}; give a finite number")


def _title_value(value: Any, digits: int) -> str:
    """An input as a title shows it: a small array's values, only the shape of a large one."""
    array = np.asarray(value)
    return (
        format_value(array, digits)
        if array.size <= MAX_VALUES
        else f"an array of shape {array.shape}"
    )


@dataclass(frozen=True)
class Node:
    """One node of a drawing: an operation (``circle``), a layer (``box``) or an open end (``end``)."""

    id: str
    label: str
    kind: Literal["circle", "box", "end"] = "circle"
    note: str = ""  # a second line, such as a ReLU's switch state
    highlight: bool = False  # the node whose backward step ran last


@dataclass(frozen=True)
class Wire:
    """One edge: its tail and head node ids, its name, and its formatted value and gradient.

    ``grad`` is None where the backward pass has not reached the edge yet;
    ``differentiable`` is False for an edge that gets no gradient (labels ``t``).
    """

    tail: str
    head: str
    name: str
    value: str
    grad: str | None
    differentiable: bool = True


@dataclass(frozen=True)
class Drawing:
    """A computational graph with the numbers of one forward and backward pass."""

    name: str
    title: str
    nodes: tuple[Node, ...]
    wires: tuple[Wire, ...]

    def to_dot(self) -> str:
        """Graphviz DOT text: forward edges above in black, backward edges below in red."""
        lines = [
            f"digraph {_quote(self.name)} {{",
            "  graph [rankdir=LR, nodesep=0.5, ranksep=0.9, fontname=Helvetica, "
            f"fontsize=12, labelloc=b, label={_quote(self.title)}];",
            "  node [fontname=Helvetica, fontsize=14];",
            "  edge [fontname=Helvetica, fontsize=12, arrowsize=0.7];",
        ]
        for node in self.nodes:
            lines.append(f"  {_quote(node.id)} [{_dot_node_attributes(node)}];")
        for wire in self.wires:
            forward = _html_label([(f"{wire.name} = {wire.value}", FORWARD_COLOUR)])
            lines.append(
                f"  {_quote(wire.tail)} -> {_quote(wire.head)} "
                f'[label={forward}, color="{FORWARD_COLOUR}"];'
            )
        # Backward edges after all forward ones: dot then stacks each pair with
        # the forward edge on top, as in the book's figures.
        for wire in self.wires:
            if not wire.differentiable:
                continue
            colour = BACKWARD_COLOUR if wire.grad is not None else PENDING_COLOUR
            style = "solid" if wire.grad is not None else "dashed"
            text = wire.grad if wire.grad is not None else "?"
            lines.append(
                f"  {_quote(wire.tail)} -> {_quote(wire.head)} "
                f'[label={_html_label([(text, colour)])}, color="{colour}", dir=back, '
                f"style={style}];"
            )
        lines.append("}")
        return "\n".join(lines) + "\n"

    def to_mermaid(self) -> str:
        """Mermaid flowchart text: forward edges solid, backward edges dotted and red."""
        lines = ["flowchart LR"]
        for node in self.nodes:
            text = _mermaid_text(node.label + (f"<br/>{node.note}" if node.note else ""))
            node_id = _mermaid_id(node.id)
            if node.kind == "end":
                lines.append(f'  {node_id}[" "]:::terminal')
            elif node.kind == "box":
                lines.append(f"  {node_id}[{text}]")
            else:
                lines.append(f"  {node_id}(({text}))")
        backward_links = []
        link = 0
        for wire in self.wires:
            tail, head = _mermaid_id(wire.tail), _mermaid_id(wire.head)
            lines.append(f"  {tail} -->|{_mermaid_text(f'{wire.name} = {wire.value}')}| {head}")
            link += 1
        for wire in self.wires:
            if not wire.differentiable:
                continue
            text = wire.grad if wire.grad is not None else "?"
            tail, head = _mermaid_id(wire.tail), _mermaid_id(wire.head)
            lines.append(f"  {head} -.->|{_mermaid_text(text)}| {tail}")
            if wire.grad is not None:
                backward_links.append(str(link))
            link += 1
        lines.append("  classDef terminal fill:none,stroke:none")
        if backward_links:
            lines.append(
                f"  linkStyle {','.join(backward_links)} "
                f"stroke:{BACKWARD_COLOUR},color:{BACKWARD_COLOUR}"
            )
        return "\n".join(lines) + "\n"

    def save(self, path: str | os.PathLike[str], format: str | None = None) -> Path:
        """Write the drawing to ``path``; return the path written.

        ``format`` is ``dot``, ``mermaid``, ``svg`` or ``png``; by default the
        suffix of ``path`` chooses (``.dot``/``.gv``, ``.mmd``, ``.svg``, ``.png``).
        SVG and PNG need Graphviz's ``dot``; without it the DOT text is written
        beside ``path`` (suffix ``.dot``) and :class:`GraphvizNotFoundError`
        says where. Every file is written atomically.
        """
        if not os.fspath(path):  # (Path("") would be the current directory)
            raise ValueError("Drawing.save: the path to write is empty")
        path = Path(path)
        format = format if format is not None else FORMATS.get(path.suffix.lower())
        if format is None:
            raise ValueError(
                f"cannot tell the format of {str(path)!r}: use a suffix among "
                f"{', '.join(FORMATS)} or give the format"
            )
        if format == "dot":
            write_text_atomically(path, self.to_dot())
        elif format == "mermaid":
            write_text_atomically(path, self.to_mermaid())
        elif format in ("svg", "png"):
            data = render(self.to_dot(), format, dot_path=path.with_suffix(".dot"), target=path)
            with atomic_path(path) as temporary:
                temporary.write_bytes(data)
        else:
            raise ValueError(f"unknown format {format!r}: choose dot, mermaid, svg or png")
        return path

    def _repr_svg_(self) -> str | None:
        """The drawing as SVG in a Jupyter notebook, when Graphviz is installed."""
        if shutil.which("dot") is None:
            return None
        return render(self.to_dot(), "svg").decode("utf-8")


def render(
    dot_text: str,
    format: str,
    *,
    dot_path: str | os.PathLike[str] | None = None,
    target: str | os.PathLike[str] | None = None,
) -> bytes:
    """Render DOT text to ``svg`` or ``png`` bytes with Graphviz's ``dot``.

    Without ``dot`` on the PATH it raises :class:`GraphvizNotFoundError`,
    after writing ``dot_text`` to ``dot_path`` when one is given and no file
    is there (so that the drawing can be rendered elsewhere: the message gives
    the command, with ``target`` as its output file).
    """
    program = shutil.which("dot")
    if program is None:
        where = ""
        if dot_path is not None and os.path.exists(dot_path):
            where = f" ({dot_path} exists, so the DOT text was not written there)"
        elif dot_path is not None:
            write_text_atomically(dot_path, dot_text)
            command = f"dot -T{format} {shlex.quote(str(dot_path))}"
            if target is not None:
                command += f" -o {shlex.quote(str(target))}"
            where = f"; wrote the DOT text to {dot_path} (render it with: {command})"
        raise GraphvizNotFoundError(
            f"Graphviz's dot is not installed, so no {format.upper()} can be made{where}; "
            "install Graphviz (https://graphviz.org/download/) or use the dot or mermaid format"
        )
    result = subprocess.run(
        [program, f"-T{format}"], input=dot_text.encode("utf-8"), capture_output=True, check=False
    )
    if result.returncode != 0:
        message = result.stderr.decode("utf-8", "replace").strip()
        how = (
            f"was killed by signal {-result.returncode}"
            if result.returncode < 0
            else f"failed (exit status {result.returncode})"
        )
        raise RuntimeError(f"Graphviz's dot {how}" + (f": {message}" if message else ""))
    return result.stdout


# -- DOT and Mermaid text ----------------------------------------------------------


# C0 control characters (but tab) and DEL: Graphviz's XML parser refuses them in labels.
_CONTROL = {code: "\ufffd" for code in (*range(0x00, 0x09), *range(0x0A, 0x20), 0x7F)}


def _quote(text: str) -> str:
    # Graphviz reads entities (&amp;) in quoted strings too, so & is escaped as one.
    text = text.translate(_CONTROL).replace("&", "&amp;")
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _html_label(lines: Sequence[tuple[str, str]]) -> str:
    body = "<BR/>".join(
        f'<FONT COLOR="{colour}">{html.escape(text.translate(_CONTROL), quote=False)}</FONT>'
        for text, colour in lines
    )
    return f"<{body}>"


def _dot_node_attributes(node: Node) -> str:
    if node.kind == "end":
        return 'label="", shape=point, width=0.03, color="#bdbdbd"'
    lines = [(node.label, FORWARD_COLOUR)]
    if node.note:
        lines.append((node.note, "#455a64"))
    shape = "box, style=rounded" if node.kind == "box" else "circle"
    attributes = f"label={_html_label(lines)}, shape={shape}"
    if node.highlight:
        attributes += f', color="{BACKWARD_COLOUR}", penwidth=2.5'
    return attributes


def _mermaid_id(node_id: str) -> str:
    """``node_id`` where Mermaid reads it as one id, else ``u_`` and its UTF-8 bytes in hex
    (a parameter name with a space or a quote, or Mermaid's keyword ``end``). One to one:
    the ids kept never start with ``u_``, the ones made always do."""
    if (
        re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", node_id)
        and not node_id.startswith("u_")
        and node_id.lower() != "end"
    ):
        return node_id
    return "u_" + node_id.encode("utf-8").hex()


def _mermaid_text(text: str) -> str:
    # Mermaid reads a quoted label verbatim except for its entity codes, and one that opens
    # with a backtick as Markdown: both characters as entity codes.
    return '"' + text.replace('"', "#quot;").replace("`", "#96;") + '"'


# -- drawings of the seed's graphs --------------------------------------------------


def _node_label(node: Any) -> str:
    return str(getattr(node, "label", type(node).__name__.lower()))


def chain_drawing(
    chain: Chain,
    x: Any,
    dout: Any = 1.0,
    *,
    step: int | None = None,
    name: str = "chain",
    title: str | None = None,
    digits: int = 4,
    notes: Callable[[int, Any], str] | None = None,
) -> Drawing:
    """Run ``chain`` forward on ``x`` and ``step`` backward steps from ``dout`` (all by default).

    Each node of the chain is a circle with its ``label``; each of its
    ``len(chain) + 1`` edges shows the chain's own value and gradient.
    Overflow and invalid values are allowed silently: showing where a chain
    breaks is part of the point. ``notes(i, node)`` may add a line under node ``i``.
    """
    if not isinstance(chain, Chain):
        raise TypeError(f"chain_drawing draws a Chain, got {type(chain).__name__}")
    with np.errstate(over="ignore", invalid="ignore", divide="ignore", under="ignore"):
        chain.forward(x)
        chain.backward(dout, steps=step)
    n = len(chain)
    done = n if step is None else step
    nodes = [Node("in", "", "end")]
    for i, node in enumerate(chain.nodes):
        nodes.append(
            Node(
                f"n{i}",
                _node_label(node),
                note=notes(i, node) if notes is not None else "",
                highlight=step is not None and done > 0 and i == n - done,
            )
        )
    nodes.append(Node("out", "", "end"))
    ids = [node.id for node in nodes]
    wires = [
        Wire(
            ids[i],
            ids[i + 1],
            edge.name,
            _describe(edge.value, digits, MAX_VALUES),
            None if edge.grad is None else _describe(edge.grad, digits, MAX_VALUES),
        )
        for i, edge in enumerate(chain.edges)
    ]
    if title is None:
        title = f"x = {_title_value(x, digits)}, dL/dy = {_title_value(dout, digits)}"
    return Drawing(name, title, tuple(nodes), tuple(wires))


def sigmoid_drawing(
    x: Any = 0.5,
    dout: Any = 1.0,
    *,
    form: Literal["detailed", "grouped"] = "detailed",
    step: int | None = None,
    digits: int = 4,
) -> Drawing:
    """The seed's sigmoid graph: four nodes (``detailed``) or one ``sigmoid`` node (``grouped``).

    ``step=K`` (detailed form only) draws the graph after the first ``K`` of
    the seed's four backward steps, the node of step ``K`` outlined in red;
    the edges not yet reached show ``?``. The numbers are those of
    :func:`~scratchnn.graph.sigmoid_chain` (detailed) or of the fused
    :class:`~scratchnn.Sigmoid` layer (grouped).
    """
    if form == "detailed":
        chain = sigmoid_chain()
    elif form == "grouped":
        if step is not None:
            raise ValueError("sigmoid_drawing: step applies to the detailed form only")
        chain = Chain([Sigmoid()], names=["x", "y"])
    else:
        raise ValueError(f"sigmoid_drawing: form must be 'detailed' or 'grouped', got {form!r}")
    x, dout = _numbers("sigmoid_drawing", "x", x), _numbers("sigmoid_drawing", "dout", dout)
    title = f"sigmoid, x = {_title_value(x, digits)}, dL/dy = {_title_value(dout, digits)}"
    if step is not None:
        title += f": backward step {step} of {len(chain)}"
    title += "  (forward values in black above, gradients in red below)"
    return chain_drawing(chain, x, dout, step=step, name="sigmoid", title=title, digits=digits)


def relu_drawing(x: Any = 1.0, dout: Any = 1.0, *, digits: int = 4) -> Drawing:
    """The seed's ReLU node at ``x``: the "switch" is on where ``x > 0`` and passes ``dout``.

    The switch state under the node is read from the layer's own ``mask``.
    """

    def switch(_: int, node: Any) -> str:
        mask = np.asarray(node.mask)
        if mask.ndim == 0:
            return "switch off" if mask else "switch on"
        return f"{int(np.count_nonzero(~mask))} of {mask.size} on"

    x, dout = _numbers("relu_drawing", "x", x), _numbers("relu_drawing", "dout", dout)
    title = (
        f"ReLU, x = {_title_value(x, digits)}, dL/dy = {_title_value(dout, digits)}"
        "  (forward values in black above, gradients in red below)"
    )
    chain = Chain([Relu()], names=["x", "y"])
    return chain_drawing(chain, x, dout, name="relu", title=title, digits=digits, notes=switch)


class _Builder:
    """Collects the nodes and wires of a drawing whose nodes take several inputs."""

    def __init__(self, digits: int, max_values: int = MAX_VALUES) -> None:
        self.nodes: list[Node] = []
        self.wires: list[Wire] = []
        self.digits = digits
        self.max_values = max_values

    def node(self, id: str, label: str, kind: Literal["circle", "box", "end"] = "circle") -> str:
        self.nodes.append(Node(id, label, kind))
        return id

    def wire(self, tail: str, head: str, name: str, value: Any, grad: Any) -> None:
        self.wires.append(
            Wire(
                tail,
                head,
                name,
                _describe(value, self.digits, self.max_values),
                None if grad is None else _describe(grad, self.digits, self.max_values),
                differentiable=grad is not None,
            )
        )

    def wire_in(self, head: str, name: str, value: Any, grad: Any) -> None:
        """An input edge that starts from an open end."""
        self.wire(self.node(f"in_{name}", "", "end"), head, name, value, grad)

    def drawing(self, name: str, title: str) -> Drawing:
        return Drawing(name, title, tuple(self.nodes), tuple(self.wires))


def _refuse_overflow(graph: str, **values: Any) -> None:
    """``ValueError`` naming the first value of a shopping graph beyond float64: an
    ``inf`` on its edge would stand where the book's number is."""
    for name, value in values.items():
        if not np.isfinite(value):
            dtype = np.asarray(value).dtype  # float64 for Python numbers
            raise ValueError(
                f"{graph}: {name} is {float(value)}, beyond the {dtype} range; give smaller numbers"
            )


def mul_drawing(
    apple: float = 100.0,
    apple_num: float = 2.0,
    tax: float = 1.1,
    dout: float = 1.0,
    *,
    digits: int = 4,
) -> Drawing:
    """The book's apple shopping: ``apple × apple_num × tax``, through two ``MulLayer`` nodes."""
    _check_prices("mul", apple=apple, apple_num=apple_num, tax=tax, dout=dout)
    mul_apple_layer, mul_tax_layer = MulLayer(), MulLayer()
    with np.errstate(over="ignore", invalid="ignore"):  # refused below, naming the number
        apple_price = mul_apple_layer.forward(apple, apple_num)
        price = mul_tax_layer.forward(apple_price, tax)
        dapple_price, dtax = mul_tax_layer.backward(dout)
        dapple, dapple_num = mul_apple_layer.backward(dapple_price)
    _refuse_overflow("mul", apple_price=apple_price, price=price, dapple_price=dapple_price,
                     dtax=dtax, dapple=dapple, dapple_num=dapple_num)  # fmt: skip

    b = _Builder(digits)
    b.node("mul_apple", mul_apple_layer.label)
    b.node("mul_tax", mul_tax_layer.label)
    b.wire_in("mul_apple", "apple", apple, dapple)
    b.wire_in("mul_apple", "apple_num", apple_num, dapple_num)
    b.wire("mul_apple", "mul_tax", "apple_price", apple_price, dapple_price)
    b.wire_in("mul_tax", "tax", tax, dtax)
    b.wire("mul_tax", b.node("out", "", "end"), "price", price, dout)
    return b.drawing(
        "mul", f"apples: {apple:g} × {apple_num:g} × tax {tax:g}, dL/dprice = {dout:g}"
    )


def add_drawing(
    apple: float = 100.0,
    apple_num: float = 2.0,
    orange: float = 150.0,
    orange_num: float = 3.0,
    tax: float = 1.1,
    dout: float = 1.0,
    *,
    digits: int = 4,
) -> Drawing:
    """The book's apples and oranges: ``(apple × apple_num + orange × orange_num) × tax``."""
    _check_prices("add", apple=apple, apple_num=apple_num, orange=orange,
                  orange_num=orange_num, tax=tax, dout=dout)  # fmt: skip
    mul_apple_layer, mul_orange_layer = MulLayer(), MulLayer()
    add_apple_orange_layer, mul_tax_layer = AddLayer(), MulLayer()
    with np.errstate(over="ignore", invalid="ignore"):  # refused below, naming the number
        apple_price = mul_apple_layer.forward(apple, apple_num)
        orange_price = mul_orange_layer.forward(orange, orange_num)
        all_price = add_apple_orange_layer.forward(apple_price, orange_price)
        price = mul_tax_layer.forward(all_price, tax)
        dall_price, dtax = mul_tax_layer.backward(dout)
        dapple_price, dorange_price = add_apple_orange_layer.backward(dall_price)
        dorange, dorange_num = mul_orange_layer.backward(dorange_price)
        dapple, dapple_num = mul_apple_layer.backward(dapple_price)
    _refuse_overflow("add", apple_price=apple_price, orange_price=orange_price,
                     all_price=all_price, price=price, dall_price=dall_price, dtax=dtax,
                     dapple_price=dapple_price, dorange_price=dorange_price, dorange=dorange,
                     dorange_num=dorange_num, dapple=dapple, dapple_num=dapple_num)  # fmt: skip

    b = _Builder(digits)
    b.node("mul_apple", mul_apple_layer.label)
    b.node("mul_orange", mul_orange_layer.label)
    b.node("add", add_apple_orange_layer.label)
    b.node("mul_tax", mul_tax_layer.label)
    b.wire_in("mul_apple", "apple", apple, dapple)
    b.wire_in("mul_apple", "apple_num", apple_num, dapple_num)
    b.wire_in("mul_orange", "orange", orange, dorange)
    b.wire_in("mul_orange", "orange_num", orange_num, dorange_num)
    b.wire("mul_apple", "add", "apple_price", apple_price, dapple_price)
    b.wire("mul_orange", "add", "orange_price", orange_price, dorange_price)
    b.wire("add", "mul_tax", "all_price", all_price, dall_price)
    b.wire_in("mul_tax", "tax", tax, dtax)
    b.wire("mul_tax", b.node("out", "", "end"), "price", price, dout)
    title = (
        f"apples and oranges: ({apple:g} × {apple_num:g} + {orange:g} × {orange_num:g}) "
        f"× tax {tax:g}, dL/dprice = {dout:g}"
    )
    return b.drawing("add", title)


def network_drawing(
    net: Any, x: Any, t: Any, *, digits: int = 3, max_values: int = MAX_VALUES
) -> Drawing:
    """A ``Sequential`` network as a graph: one box per layer, its loss, and its parameters.

    Runs ``x`` forward through ``net.layers`` and ``net.last_layer`` with
    labels ``t``, then backward from ``dL/dL = 1``, as ``net.gradient`` does,
    keeping what each edge carried. Edges show array shapes, and the values of
    arrays with at most ``max_values`` elements; each parameter (``W1``,
    ``b1``, ...) enters its layer with its gradient. The pass runs in the
    network's current mode, as ``net.gradient`` would: in training mode it
    draws new Dropout masks and moves BatchNorm's running statistics (call
    ``net.eval()`` first to draw the network as it predicts).
    """
    # Duck-typed: a user's own network class with a list of layers, a last_layer
    # and a params dict draws as well as Sequential.
    missing = [name for name in ("layers", "last_layer", "params") if not hasattr(net, name)]
    if missing:
        raise TypeError(
            f"network_drawing draws a network with layers, last_layer and params "
            f"(such as Sequential); {type(net).__name__} has no {', '.join(missing)}"
        )
    from scratchnn.parameters import (  # any style of layer
        backward_noted,
        forward_in_mode,
        gradients_of,
        parameters_of,
    )

    values = [np.asarray(x)]
    for layer in net.layers:
        values.append(np.asarray(forward_in_mode(layer, values[-1], getattr(net, "training", True))))
    loss = net.last_layer.forward(values[-1], t)
    grads: list[Any] = [np.asarray(net.last_layer.backward(1.0))]
    for layer in reversed(net.layers):
        dx = backward_noted(layer, grads[0])
        grads.insert(0, None if dx is None else np.asarray(dx))  # None: indices (Embedding)

    # Parameter names as the network's own params dict gives them, matched by identity.
    param_names = {id(array): key for key, array in net.params.items()}
    b = _Builder(digits, max_values)
    ids = [b.node(f"layer{i}", type(layer).__name__, "box") for i, layer in enumerate(net.layers)]
    loss_id = b.node("loss", type(net.last_layer).__name__, "box")
    heads = [*ids, loss_id]
    b.wire_in(heads[0], "x", values[0], grads[0])
    for i, layer in enumerate(net.layers):
        name = "scores" if i == len(net.layers) - 1 else f"h{i + 1}"
        b.wire(ids[i], heads[i + 1], name, values[i + 1], grads[i + 1])
        layer_grads = gradients_of(layer)
        for key, array in parameters_of(layer).items():
            if id(array) in param_names:  # not a cache, nor a tied array drawn already
                b.wire_in(ids[i], param_names.pop(id(array)), array, layer_grads.get(key))
    b.wire_in(loss_id, "t", t, None)
    b.wire(loss_id, b.node("out", "", "end"), "L", loss, 1.0)
    shapes = " → ".join(str(v.shape) for v in values)
    return b.drawing("network", f"{type(net).__name__}: {shapes}, loss L, dL/dL = 1")


def _default_network(sizes: Sequence[int] = (3, 4, 2), batch: int = 1, seed: int = 0) -> Drawing:
    from scratchnn.models import mlp

    rng = np.random.default_rng(seed)
    net = mlp(list(sizes), rng=rng, dtype=np.float64)
    x = rng.standard_normal((batch, sizes[0]))
    t = rng.integers(0, sizes[-1], size=batch)
    return network_drawing(net, x, t)


#: The drawings the command line offers, by name.
DRAWINGS: dict[str, Callable[..., Drawing]] = {
    "sigmoid": sigmoid_drawing,
    "relu": relu_drawing,
    "mul": mul_drawing,
    "add": add_drawing,
    "network": _default_network,
}
