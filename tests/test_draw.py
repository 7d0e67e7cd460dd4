"""Drawn computational graphs: the numbers on every edge are the nodes' own.

Oracles: the nodes and layers run here, independently of the drawing code
(``sigmoid_chain()``, ``Sigmoid``, ``Relu``, ``Sequential.gradient``), the
book's apple-shopping numbers, and the seed's order of the four backward
steps. The DOT text is read back by a small parser of our own.
"""

from __future__ import annotations

import ast
import re
import shutil
import struct
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import scratchnn as snn
from scratchnn import Relu, Sigmoid, mlp
from scratchnn.cli import main
from scratchnn.graph import (
    GraphvizNotFoundError,
    add_drawing,
    mul_drawing,
    network_drawing,
    relu_drawing,
    sigmoid_chain,
    sigmoid_drawing,
)

# Four significant digits are drawn: a drawn number is within this relative error.
RTOL = 5e-4

EDGE = re.compile(r'^\s*"(?P<tail>[^"]+)"\s*->\s*"(?P<head>[^"]+)"\s*\[(?P<attrs>.*)\];$')
NODE = re.compile(r'^\s*"(?P<id>[^"]+)"\s*\[(?P<attrs>.*)\];$')
FONT = re.compile(r'<FONT COLOR="(?P<colour>#[0-9a-fA-F]{6})">(?P<text>.*?)</FONT>')
RED = "#c62828"


def parse_dot(text: str) -> tuple[dict[str, dict[str, object]], list[dict[str, object]]]:
    """Nodes by id and edges in order, each with its label lines and attributes."""
    assert text.startswith("digraph ") and text.rstrip().endswith("}")
    nodes: dict[str, dict[str, object]] = {}
    edges: list[dict[str, object]] = []
    for line in text.splitlines():
        if match := EDGE.match(line):
            attrs = match["attrs"]
            edges.append(
                {
                    "tail": match["tail"],
                    "head": match["head"],
                    "backward": "dir=back" in attrs,
                    "texts": [m["text"] for m in FONT.finditer(attrs)],
                    "colours": [m["colour"] for m in FONT.finditer(attrs)],
                }
            )
        elif match := NODE.match(line):
            attrs = match["attrs"]
            nodes[match["id"]] = {
                "texts": [m["text"] for m in FONT.finditer(attrs)],
                "highlight": "penwidth" in attrs,
                "end": "shape=point" in attrs,
            }
    return nodes, edges


def forward_edges(edges: list[dict[str, object]]) -> dict[str, tuple[str, str, str]]:
    """Forward edges by name: (tail, head, value text)."""
    result = {}
    for edge in edges:
        if not edge["backward"]:
            (text,) = edge["texts"]  # type: ignore[misc]
            name, value = str(text).split(" = ", 1)
            result[name] = (str(edge["tail"]), str(edge["head"]), value)
    return result


def backward_texts(edges: list[dict[str, object]]) -> dict[tuple[str, str], str]:
    """Backward edges by (tail, head): their gradient text."""
    return {
        (str(e["tail"]), str(e["head"])): str(e["texts"][0])  # type: ignore[index]
        for e in edges
        if e["backward"]
    }


def gradients_by_name(text: str) -> dict[str, str]:
    _, edges = parse_dot(text)
    grads = backward_texts(edges)
    return {
        name: grads[(t, h)] for name, (t, h, _) in forward_edges(edges).items() if (t, h) in grads
    }


def values_by_name(text: str) -> dict[str, str]:
    return {name: value for name, (_, _, value) in forward_edges(parse_dot(text)[1]).items()}


def path_labels(text: str) -> list[str]:
    """The node labels from the open input end to the open output end, following forward edges."""
    nodes, edges = parse_dot(text)
    successor = {e["tail"]: e["head"] for e in edges if not e["backward"]}
    node, labels = "in", []
    while node in successor:
        node = str(successor[node])
        if not nodes[node]["end"]:
            labels.append(str(nodes[node]["texts"][0]))  # type: ignore[index]
    return labels


# -- the sigmoid -----------------------------------------------------------------------


@pytest.mark.parametrize(("x", "dout"), [(0.5, 1.0), (0.0, 1.0), (-2.0, 2.5), (3.0, -0.7)])
def test_sigmoid_edges_carry_the_chains_values_and_gradients(x: float, dout: float) -> None:
    chain = sigmoid_chain()
    chain.forward(x)
    chain.backward(dout)
    dot = sigmoid_drawing(x, dout).to_dot()
    values, grads = values_by_name(dot), gradients_by_name(dot)
    assert list(values) == [edge.name for edge in chain.edges]
    for edge in chain.edges:
        assert float(values[edge.name]) == pytest.approx(float(edge.value), rel=RTOL, abs=1e-12)
        assert float(grads[edge.name]) == pytest.approx(float(edge.grad), rel=RTOL, abs=1e-12)
    # and the ends agree with the fused layer
    sigmoid = Sigmoid()
    y = float(sigmoid.forward(np.array(x)))
    assert float(values["y"]) == pytest.approx(y, rel=RTOL)
    assert float(grads["x"]) == pytest.approx(float(sigmoid.backward(np.array(dout))), rel=RTOL)
    assert float(grads["y"]) == pytest.approx(dout, rel=RTOL)
    assert path_labels(dot) == ["×-1", "exp", "+1", "/"]


def test_sigmoid_at_zero_gives_the_books_numbers() -> None:
    dot = sigmoid_drawing(0.0, 1.0).to_dot()
    assert values_by_name(dot)["y"] == "0.5"
    assert gradients_by_name(dot)["x"] == "0.25"  # y (1 - y) at y = 1/2


# The seed's steps 1 to 4 run the "/", "+", "exp" and "×" nodes, in that order.
SEED_STEP_NODES = ["/", "+1", "exp", "×-1"]


@pytest.mark.parametrize("step", [0, 1, 2, 3, 4])
def test_step_k_draws_only_the_first_k_backward_steps(step: int) -> None:
    chain = sigmoid_chain()
    chain.forward(0.5)
    chain.backward(1.0, steps=step)
    dot = sigmoid_drawing(0.5, 1.0, step=step).to_dot()
    grads = gradients_by_name(dot)
    names = [edge.name for edge in chain.edges]
    reached = [name for name in names if grads[name] != "?"]
    assert reached == names[len(names) - 1 - step :]
    for edge in chain.edges:
        if edge.grad is not None:
            assert float(grads[edge.name]) == pytest.approx(float(edge.grad), rel=RTOL)
    nodes, _ = parse_dot(dot)
    highlighted = [node["texts"][0] for node in nodes.values() if node["highlight"]]  # type: ignore[index]
    assert highlighted == ([] if step == 0 else [SEED_STEP_NODES[step - 1]])
    if step:
        assert f"backward step {step} of 4" in dot


def test_grouped_sigmoid_is_one_node_with_the_layers_gradient() -> None:
    layer = Sigmoid()
    y = float(layer.forward(np.array(1.5)))
    dx = float(layer.backward(np.array(2.0)))
    dot = sigmoid_drawing(1.5, 2.0, form="grouped").to_dot()
    assert path_labels(dot) == ["sigmoid"]
    assert float(values_by_name(dot)["y"]) == pytest.approx(y, rel=RTOL)
    assert float(gradients_by_name(dot)["x"]) == pytest.approx(dx, rel=RTOL)


def test_sigmoid_rejects_bad_form_and_step() -> None:
    with pytest.raises(ValueError, match="form"):
        sigmoid_drawing(form="compact")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="detailed"):
        sigmoid_drawing(form="grouped", step=1)
    with pytest.raises(ValueError, match=r"0\.\.4"):
        sigmoid_drawing(step=5)


# -- ReLU, the apple shopping, the network --------------------------------------------------


@pytest.mark.parametrize(
    ("x", "switch"), [(2.0, "switch on"), (-1.0, "switch off"), (0.0, "switch off")]
)
def test_relu_shows_the_switch_and_the_layers_gradient(x: float, switch: str) -> None:
    relu = Relu()
    relu.forward(np.array(x))
    dx = float(relu.backward(np.array(3.0)))
    dot = relu_drawing(x, 3.0).to_dot()
    nodes, _ = parse_dot(dot)
    assert nodes["n0"]["texts"] == ["relu", switch]
    assert float(gradients_by_name(dot)["x"]) == dx
    assert dx == (3.0 if x > 0 else 0.0)  # the seed: dout passes where x > 0, stops elsewhere


def test_mul_graph_gives_the_books_apple_numbers() -> None:
    dot = mul_drawing().to_dot()
    values, grads = values_by_name(dot), gradients_by_name(dot)
    assert values == {
        "apple": "100",
        "apple_num": "2",
        "apple_price": "200",
        "tax": "1.1",
        "price": "220",
    }
    assert grads == {
        "apple": "2.2",
        "apple_num": "110",
        "apple_price": "1.1",
        "tax": "200",
        "price": "1",
    }
    assert path_labels(dot) == []  # no chain from "in": every input is its own open end
    assert [n["texts"] for n in parse_dot(dot)[0].values() if not n["end"]] == [["×"], ["×"]]


def test_add_graph_gives_the_books_apple_and_orange_numbers() -> None:
    dot = add_drawing().to_dot()
    values, grads = values_by_name(dot), gradients_by_name(dot)
    assert values == {
        "apple": "100", "apple_num": "2", "orange": "150", "orange_num": "3",
        "apple_price": "200", "orange_price": "450", "all_price": "650", "tax": "1.1",
        "price": "715",
    }  # fmt: skip
    assert grads == {
        "apple": "2.2", "apple_num": "110", "orange": "3.3", "orange_num": "165",
        "apple_price": "1.1", "orange_price": "1.1", "all_price": "1.1", "tax": "650",
        "price": "1",
    }  # fmt: skip


def parse_array(text: str) -> tuple[tuple[int, ...], np.ndarray | None]:
    """``(2, 2) [[1, 2], [3, 4]]`` -> shape and values (None when only the shape is drawn)."""
    match = re.fullmatch(r"\((?P<shape>[\d, ]*)\)(?: (?P<values>\[.*\]))?", text)
    assert match, text
    shape = tuple(int(n) for n in match["shape"].split(",") if n.strip())
    values = None if match["values"] is None else np.array(ast.literal_eval(match["values"]))
    return shape, values


def test_network_edges_carry_the_networks_own_gradients() -> None:
    rng = np.random.default_rng(1)
    net = mlp([2, 2, 2], rng=rng, dtype=np.float64)
    x = rng.standard_normal((1, 2))
    t = np.array([1])
    dot = network_drawing(net, x, t).to_dot()
    reference = net.gradient(x, t)  # the oracle: Sequential's own backward pass
    loss = net.loss(x, t)
    values, grads = values_by_name(dot), gradients_by_name(dot)
    for key, grad in reference.items():
        shape, drawn = parse_array(grads[key])
        assert shape == grad.shape
        assert drawn is not None
        np.testing.assert_allclose(drawn, grad, rtol=5e-3, atol=1e-6)
        shape, drawn = parse_array(values[key])
        np.testing.assert_allclose(drawn, net.params[key], rtol=5e-3, atol=1e-6)  # type: ignore[arg-type]
    assert float(values["L"]) == pytest.approx(loss, rel=5e-3)
    assert "t" not in grads  # labels get no gradient
    assert parse_array(values["x"])[0] == (1, 2)
    nodes, _ = parse_dot(dot)
    boxes = [n["texts"][0] for n in nodes.values() if not n["end"]]  # type: ignore[index]
    assert boxes == ["Affine", "Relu", "Affine", "SoftmaxWithLoss"]


def test_network_draws_the_parameters_of_layers_in_the_books_and_the_sequels_styles() -> None:
    from test_models import BookAffine, SequelAffine

    rng = np.random.default_rng(2)
    net = snn.Sequential([BookAffine(rng.standard_normal((2, 2)), np.zeros(2)), Relu(),
                          SequelAffine(rng.standard_normal((2, 2)), np.zeros(2))])  # fmt: skip
    x, t = rng.standard_normal((1, 2)), np.array([1])
    grads = gradients_by_name(network_drawing(net, x, t).to_dot())
    reference = net.gradient(x, t)
    assert sorted(reference) == ["W1", "b1", "params1[0]", "params1[1]"]
    for key, grad in reference.items():
        np.testing.assert_allclose(parse_array(grads[key])[1], grad, rtol=5e-3, atol=1e-6)  # type: ignore[arg-type]


def test_network_drawing_runs_in_the_networks_mode_and_takes_indices_in() -> None:
    from test_models import SequelEmbedding

    class BookDropout:  # the book's: a new mask in training, the mean scaling otherwise
        def forward(self, x: np.ndarray, train_flg: bool = True) -> np.ndarray:
            if train_flg:
                self.mask = np.random.default_rng().random(x.shape) > 0.5
                return x * self.mask
            return x * 0.5

        def backward(self, dout: np.ndarray) -> np.ndarray:
            return dout * 0.5

    rng = np.random.default_rng(3)
    net = snn.Sequential([SequelEmbedding(rng.standard_normal((4, 3))), BookDropout()]).eval()
    idx, t = np.array([1, 3]), np.array([0, 2])
    dot = network_drawing(net, idx, t).to_dot()
    assert dot == network_drawing(net, idx, t).to_dot()  # no mask drawn: the same drawing
    assert "params1[0]" in gradients_by_name(dot) and "x" not in gradients_by_name(dot)


def test_network_shows_only_shapes_of_large_arrays() -> None:
    rng = np.random.default_rng(0)
    net = mlp([5, 4, 3], rng=rng, dtype=np.float64)
    x = rng.standard_normal((2, 5))
    dot = network_drawing(net, x, np.array([0, 2])).to_dot()
    values, grads = values_by_name(dot), gradients_by_name(dot)
    assert parse_array(values["W1"]) == ((5, 4), None)
    assert parse_array(grads["W1"]) == ((5, 4), None)
    assert parse_array(values["h1"]) == ((2, 4), None)
    assert parse_array(values["scores"])[0] == (2, 3)
    assert parse_array(grads["b2"])[1] is not None  # 3 values: drawn


# -- Mermaid -----------------------------------------------------------------------


def test_mermaid_has_every_edge_both_ways_and_red_backward_links() -> None:
    drawing = sigmoid_drawing(0.5, 1.0, step=2)
    text = drawing.to_mermaid()
    lines = text.splitlines()
    assert lines[0] == "flowchart LR"
    links = [line.strip() for line in lines if "-->" in line or "-.->" in line]
    forward = [link for link in links if "-->|" in link]
    backward = [link for link in links if "-.->|" in link]
    assert len(forward) == len(backward) == len(drawing.wires) == 5
    values = values_by_name(drawing.to_dot())
    for wire, link in zip(drawing.wires, forward):
        assert link == f'{wire.tail} -->|"{wire.name} = {values[wire.name]}"| {wire.head}'
    (style,) = [line for line in lines if line.strip().startswith("linkStyle")]
    red = [int(i) for i in style.split()[1].split(",")]
    # the reached gradients (steps 1, 2 and dL/dy) are red; "?" links are not
    assert [links[i].split("|")[1] for i in red] == ['"-0.3875"', '"-0.3875"', '"1"']
    assert '(("×-1"))' in text


# -- files -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("suffix", "method"), [(".dot", "to_dot"), (".gv", "to_dot"), (".mmd", "to_mermaid")]
)
def test_save_writes_text_formats_atomically(tmp_path: Path, suffix: str, method: str) -> None:
    drawing = mul_drawing()
    path = drawing.save(tmp_path / f"mul{suffix}")
    assert path.read_text(encoding="utf-8") == getattr(drawing, method)()
    assert [p.name for p in tmp_path.iterdir()] == [f"mul{suffix}"]  # no temporary left


def test_save_rejects_unknown_suffix(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="format"):
        mul_drawing().save(tmp_path / "mul.txt")


@pytest.mark.parametrize(
    ("script", "message"),
    [
        ("echo 'Error: syntax error in line 1' >&2; exit 1", "failed (exit status 1): Error: syntax"),
        ("exit 3", "failed (exit status 3)"),
        ("kill -9 $$", "was killed by signal 9"),
    ],
)
def test_a_failing_dot_is_named_with_its_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, script: str, message: str
) -> None:
    fake = tmp_path / "dot"
    fake.write_text(f"#!/bin/sh\ncat > /dev/null\n{script}\n")
    fake.chmod(0o755)
    monkeypatch.setattr(shutil, "which", lambda name: str(fake))
    with pytest.raises(RuntimeError, match=re.escape(f"Graphviz's dot {message}")):
        sigmoid_drawing(0.5, 1.0).save(tmp_path / "sigmoid.svg")
    assert not (tmp_path / "sigmoid.svg").exists()


def test_missing_dot_writes_the_dot_file_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    drawing = sigmoid_drawing(0.5, 1.0)
    with pytest.raises(GraphvizNotFoundError, match="not installed"):
        drawing.save(tmp_path / "sigmoid.svg")
    assert (tmp_path / "sigmoid.dot").read_text(encoding="utf-8") == drawing.to_dot()
    assert not (tmp_path / "sigmoid.svg").exists()
    assert drawing._repr_svg_() is None

    out = tmp_path / "cli.png"
    assert main(["graph", "sigmoid", "--x", "0.5", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "dot" in err and str(tmp_path / "cli.dot") in err
    assert (tmp_path / "cli.dot").read_text(encoding="utf-8") == drawing.to_dot()


needs_dot = pytest.mark.skipif(
    shutil.which("dot") is None, reason="Graphviz's dot is not installed: rendering not tested"
)


@needs_dot
def test_svg_shows_the_numbers(tmp_path: Path) -> None:
    path = sigmoid_drawing(0.5, 1.0).save(tmp_path / "sigmoid.svg")
    root = ET.parse(path).getroot()
    texts = ["".join(t.itertext()) for t in root.iter("{http://www.w3.org/2000/svg}text")]
    chain = sigmoid_chain()
    chain.forward(0.5)
    chain.backward(1.0)
    for edge in chain.edges:
        assert f"{edge.name} = {float(edge.value):.4g}" in texts
        assert f"{float(edge.grad):.4g}" in texts
    assert {"×-1", "exp", "+1", "/"} <= set(texts)


@needs_dot
def test_png_through_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "add.png"
    assert main(["graph", "add", "--out", str(path)]) == 0
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert width > 300 and height > 100
    assert capsys.readouterr().out == f"wrote {path}\n"


# -- the command line ------------------------------------------------------------------


def test_cli_prints_the_dot_text(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["graph", "sigmoid", "--x", "0.5", "--dout", "1.0", "--step", "3"]) == 0
    assert capsys.readouterr().out == sigmoid_drawing(0.5, 1.0, step=3).to_dot()
    assert main(["graph", "relu", "--x", "-1", "--format", "mermaid"]) == 0
    assert capsys.readouterr().out == relu_drawing(-1.0).to_mermaid()
    assert main(["graph", "sigmoid", "--form", "grouped"]) == 0
    assert capsys.readouterr().out == sigmoid_drawing(form="grouped").to_dot()


def test_cli_network_options(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["graph", "network", "--sizes", "4,3,2", "--batch", "2", "--seed", "3"]) == 0
    values = values_by_name(capsys.readouterr().out)
    assert parse_array(values["x"])[0] == (2, 4)
    assert parse_array(values["W2"])[0] == (3, 2)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["graph", "mul", "--x", "3"], "--x does not apply to the mul graph"),
        (["graph", "network", "--dout", "2"], "--dout does not apply"),
        (["graph", "relu", "--step", "1"], "--step does not apply"),
        (["graph", "sigmoid", "--step", "5"], "--step must lie in 0..4"),
        (["graph", "sigmoid", "--step", "-1"], "--step must lie in 0..4"),
        (["graph", "sigmoid", "--form", "grouped", "--step", "1"], "detailed"),
        (["graph", "sigmoid", "--out", "s.txt"], "cannot tell the format"),
        (["graph", "sigmoid", "--out", "s.png", "--format", "svg"], "does not match"),
        (["graph", "sigmoid", "--format", "png"], "needs --out"),
    ],
)
def test_cli_bad_options_give_one_line_and_status_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert len(captured.err.strip().splitlines()) == 1 and message in captured.err


@pytest.mark.parametrize(
    "argv",
    [["graph", "tanh"], ["graph", "sigmoid", "--form", "flat"], ["graph", "sigmoid", "--x", "nan"]],
)
def test_cli_argparse_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_drawing_something_that_is_not_a_chain_or_network_names_it() -> None:
    from scratchnn.graph.draw import chain_drawing

    with pytest.raises(TypeError, match="chain_drawing draws a Chain, got NoneType"):
        chain_drawing(None, 1.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="dict has no layers, last_layer"):
        network_drawing({"W1": np.ones(2)}, np.ones(2), np.ones(2))


@pytest.mark.parametrize("digits", [0, -1, 2.5, True, "3"])
def test_digits_must_be_a_whole_number_of_at_least_one(digits: object) -> None:
    with pytest.raises(ValueError, match="digits must be a whole number of at least 1"):
        sigmoid_drawing(1.0, digits=digits)  # type: ignore[arg-type]
    assert sigmoid_drawing(1.0, digits=2).wires[-1].value == "0.73"


def test_titles_show_the_shape_of_a_large_input_not_its_values() -> None:
    drawing = sigmoid_drawing(np.zeros((30, 30)))
    assert "an array of shape (30, 30)" in drawing.title and "0, 0" not in drawing.title
    assert "x = [0.5, -1]" in relu_drawing(np.array([0.5, -1.0])).title


@needs_dot
def test_control_characters_and_entities_in_names_give_valid_dot(tmp_path: Path) -> None:
    from scratchnn.graph import Chain, MulConstLayer
    from scratchnn.graph.draw import chain_drawing

    chain = Chain([MulConstLayer(2)], names=["x\x01&amp;", "y"])
    drawing = chain_drawing(chain, 1.0, title="a &amp; b\x02")
    svg = drawing.save(tmp_path / "c.svg").read_text()
    # Graphviz wrote what it read: the names as written, the control characters replaced.
    texts = [t.text for t in ET.fromstring(svg).iter("{http://www.w3.org/2000/svg}text")]
    assert "a &amp; b\ufffd" in texts
    assert "x\ufffd&amp; = 1" in texts


@needs_dot
def test_notebook_display_is_svg() -> None:
    svg = relu_drawing(2.0)._repr_svg_()
    assert svg is not None and "<svg" in svg and "switch on" in svg


FIGURES = Path(__file__).resolve().parent.parent / "docs" / "figures"


@pytest.mark.parametrize("step", [1, 2, 3, 4])
def test_committed_figures_show_the_chains_numbers(step: int) -> None:
    # docs/figures/make_figures.py draws the sigmoid at x = 1, dL/dy = 1.
    path = FIGURES / f"sigmoid-step{step}.svg"
    if not path.exists():
        pytest.skip(f"{path} is not in this checkout")
    root = ET.parse(path).getroot()
    texts = ["".join(t.itertext()) for t in root.iter("{http://www.w3.org/2000/svg}text")]
    chain = sigmoid_chain()
    chain.forward(1.0)
    chain.backward(1.0, steps=step)
    drawn_grads = [t for t in texts if t != "?" and " = " not in t and t not in SEED_STEP_NODES]
    expected = [f"{float(e.grad):.4g}" for e in chain.edges if e.grad is not None]
    assert sorted(drawn_grads) == sorted(expected)
    assert texts.count("?") == len(chain.edges) - 1 - step


@pytest.mark.parametrize("key", ["log-scale", "s.x", "end", "a b", 'q"', "u_1"])
def test_mermaid_ids_are_single_ids_whatever_a_parameter_is_called(key: str) -> None:
    # A custom layer names its parameters freely; Mermaid reads an id up to a space, a
    # quote or a dash, and "end" closes a subgraph: each would break the flowchart.
    from scratchnn.graph import network_drawing
    from scratchnn.layers.base import Layer

    class Scale(Layer):
        def __init__(self) -> None:
            super().__init__()
            self.s, self.ds = np.array([2.0, 3.0]), None
            self.x: np.ndarray | None = None

        @property
        def params(self) -> dict[str, Any]:
            return {key: self.s}

        @property
        def grads(self) -> dict[str, Any]:
            return {key: self.ds}

        def _forward(self, x: np.ndarray) -> np.ndarray:
            self.x = x
            return x * self.s

        def _backward(self, dout: np.ndarray) -> np.ndarray:
            self.ds = (dout * self.x).sum(0)
            return dout * self.s

    network = snn.Sequential([Scale(), snn.Relu(), Scale()])
    drawing = network_drawing(network, np.array([[1.0, -1.0]]), np.array([0]))
    text = drawing.to_mermaid()
    ids = set()
    for line in text.splitlines()[1:]:
        line = line.strip()
        if line.startswith(("classDef", "linkStyle")):
            continue
        if "-->|" in line or "-.->|" in line:
            ids.update([line.split(" ", 1)[0], line.rsplit(" ", 1)[1]])
        else:
            ids.add(re.split(r"[\[(]", line, maxsplit=1)[0])
    assert all(re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", i) and i.lower() != "end" for i in ids)
    # one id per node, as the DOT text has
    assert len(ids) == len(drawing.nodes)


@pytest.mark.parametrize("graph", ["mul", "add"])
def test_a_shopping_graph_beyond_float64_is_one_line(
    graph: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # It drew inf where the gradient is 2.2e308, with two raw overflow warnings.
    assert main(["graph", graph, "--dout", "1e308", "--format", "mermaid"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and "beyond the float64 range" in captured.err
    with pytest.raises(ValueError, match=f"{graph}: dtax is inf"):
        (mul_drawing if graph == "mul" else add_drawing)(dout=1e308)


def test_the_overflow_named_is_of_the_numbers_dtype() -> None:
    with pytest.raises(ValueError, match="apple_price is inf, beyond the float32 range"):
        mul_drawing(apple=np.float32(3e38), apple_num=np.float32(10))


# -- after an audit: encodings, an existing .dot, Mermaid's backtick, names in errors ----------


@pytest.mark.parametrize("console", ["cp1252", "ascii"])
def test_cli_writes_utf8_to_stdout_whatever_the_console(console: str) -> None:
    # The drawings hold "×" and "→"; dot reads UTF-8 and an SVG says so in its header. A
    # cp1252 console wrote other bytes (dot refused them), an ASCII one raised.
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONIOENCODING": console}
    code = "import sys; from scratchnn.cli import main; sys.exit(main(sys.argv[1:]))"
    result = subprocess.run(
        [sys.executable, "-c", code, "graph", "add"], capture_output=True, env=env, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode("utf-8") == add_drawing().to_dot()


def test_missing_dot_leaves_an_existing_dot_file_and_quotes_its_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    folder = tmp_path / "my figures"
    folder.mkdir()
    kept = folder / "keep.dot"
    kept.write_text("my hand-edited graph", encoding="utf-8")
    with pytest.raises(GraphvizNotFoundError, match=r"keep\.dot exists, so the DOT text was not"):
        sigmoid_drawing().save(folder / "keep.svg")
    assert kept.read_text(encoding="utf-8") == "my hand-edited graph"
    with pytest.raises(GraphvizNotFoundError) as raised:
        sigmoid_drawing().save(folder / "new.svg")
    command = re.search(r"render it with: (.*?)\); install", str(raised.value))
    assert command is not None
    import shlex

    assert shlex.split(command.group(1)) == [
        "dot", "-Tsvg", str(folder / "new.dot"), "-o", str(folder / "new.svg")
    ]  # fmt: skip


def test_mermaid_labels_escape_a_leading_backtick() -> None:
    from scratchnn.graph.draw import _mermaid_text

    # Mermaid reads a quoted label that opens with a backtick as Markdown (and fails to parse
    # an unclosed one): the character goes as its entity code, as the quote does.
    assert _mermaid_text('`x" = 1') == '"#96;x#quot; = 1"'


def test_the_shopping_and_chain_drawings_name_a_wrong_argument() -> None:
    with pytest.raises(ValueError, match="mul: apple must be one number, got an array of shape"):
        mul_drawing(apple=np.array([100.0, 200.0]))
    with pytest.raises(ValueError, match="add: tax must be one number"):
        add_drawing(tax=[1.1, 1.08])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="mul: apple is inf; give a finite number"):
        mul_drawing(apple=float("inf"))
    with pytest.raises(TypeError, match=r"sigmoid_drawing: x must be a real number .* NoneType"):
        sigmoid_drawing(None)
    with pytest.raises(ValueError, match="sigmoid_drawing: x has 401 digits, beyond float64"):
        sigmoid_drawing(10**400)
    assert "x = 1e+20" in sigmoid_drawing(10**20).title  # an int beyond int64, as a float
    with pytest.raises(TypeError, match="relu_drawing: dout must be a real number"):
        relu_drawing(1.0, "one")


def test_cli_graph_names_an_empty_out_and_takes_underscored_negative_numbers(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["graph", "sigmoid", "--format", "dot", "--out", ""]) == 2
    assert "--out is empty" in capsys.readouterr().err
    assert main(["graph", "sigmoid", "--x", "-1_0.5"]) == 0
    assert capsys.readouterr().out == sigmoid_drawing(-10.5).to_dot()
