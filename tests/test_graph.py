"""The computational-graph nodes and the seed's four-node sigmoid.

Oracles: PyTorch autograd (float64), the book's printed numbers, mpmath, and
the seed's formulas for each backward step evaluated directly in float64.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import mpmath
import numpy as np
import pytest

import scratchnn as snn
from scratchnn.graph import (
    AddConstLayer,
    AddLayer,
    Chain,
    ExpLayer,
    MulConstLayer,
    MulLayer,
    ReciprocalLayer,
    sigmoid_chain,
)

torch = pytest.importorskip("torch", reason="PyTorch (the test oracle) is not installed")

EPS64 = float(np.finfo(np.float64).eps)


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), np.finfo(np.float64).tiny)))


# -- the book's numbers --------------------------------------------------------------


def test_apple_example_gives_the_books_numbers() -> None:
    apple, apple_num, tax = 100, 2, 1.1
    mul_apple_layer, mul_tax_layer = MulLayer(), MulLayer()
    price = mul_tax_layer.forward(mul_apple_layer.forward(apple, apple_num), tax)
    dapple_price, dtax = mul_tax_layer.backward(1)
    dapple, dapple_num = mul_apple_layer.backward(dapple_price)
    # printed by the book (chapter 5.4.1)
    assert float(price) == 220.00000000000003
    assert (float(dapple), float(dapple_num), float(dtax)) == (2.2, 110.00000000000001, 200)


def test_apple_orange_example_gives_the_books_numbers() -> None:
    apple, apple_num, orange, orange_num, tax = 100, 2, 150, 3, 1.1
    mul_apple, mul_orange, add, mul_tax = MulLayer(), MulLayer(), AddLayer(), MulLayer()
    apple_price = mul_apple.forward(apple, apple_num)
    orange_price = mul_orange.forward(orange, orange_num)
    all_price = add.forward(apple_price, orange_price)
    price = mul_tax.forward(all_price, tax)
    dall_price, dtax = mul_tax.backward(1)
    dapple_price, dorange_price = add.backward(dall_price)
    dorange, dorange_num = mul_orange.backward(dorange_price)
    dapple, dapple_num = mul_apple.backward(dapple_price)
    # printed by the book (chapter 5.4.2)
    assert float(price) == 715.0000000000001
    assert float(dapple) == 2.2
    assert float(dapple_num) == 110.00000000000001
    assert float(dorange) == 3.3000000000000003
    assert float(dorange_num) == 165.0
    assert float(dtax) == 650


# -- two-input nodes against PyTorch, with broadcasting ------------------------------

BROADCAST_SHAPES = [
    ((3,), (3,)),
    ((2, 3), (3,)),
    ((3,), (2, 3)),
    ((2, 1), (1, 3)),
    ((), (4,)),
    ((4, 2), ()),
    ((3, 1, 2), (2,)),
    ((2, 1, 4), (3, 1)),
    ((0, 3), (3,)),
]
TWO_INPUT = [(MulLayer, torch.mul), (AddLayer, torch.add)]


@pytest.mark.parametrize(("make", "torch_fn"), TWO_INPUT, ids=["Mul", "Add"])
@pytest.mark.parametrize(("x_shape", "y_shape"), BROADCAST_SHAPES, ids=str)
def test_two_input_nodes_match_torch_in_float64(
    make: type, torch_fn: Callable[..., Any], x_shape: tuple[int, ...], y_shape: tuple[int, ...]
) -> None:
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal(x_shape), rng.standard_normal(y_shape)
    node = make()
    out = node.forward(x, y)
    dout = rng.standard_normal(out.shape)
    dx, dy = node.backward(dout)

    xt = torch.tensor(x, requires_grad=True)
    yt = torch.tensor(y, requires_grad=True)
    outt = torch_fn(xt, yt)
    outt.backward(torch.tensor(dout))
    assert out.shape == tuple(outt.shape) and out.dtype == np.float64
    np.testing.assert_allclose(out, outt.detach().numpy(), rtol=1e-15, atol=0)
    assert dx.shape == x_shape and dy.shape == y_shape
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(dy, yt.grad.numpy(), rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize(("make", "torch_fn"), TWO_INPUT, ids=["Mul", "Add"])
def test_two_input_nodes_keep_each_inputs_dtype(make: type, torch_fn: Callable[..., Any]) -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3)).astype(np.float32)
    y = rng.standard_normal(3)
    node = make()
    out = node.forward(x, y)
    dx, dy = node.backward(np.ones_like(out))
    xt = torch.tensor(x.astype(np.float64), requires_grad=True)
    yt = torch.tensor(y, requires_grad=True)
    torch_fn(xt, yt).backward(torch.ones(2, 3, dtype=torch.float64))
    assert (out.dtype, dx.dtype, dy.dtype) == (np.float64, np.float32, np.float64)
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-6)
    np.testing.assert_allclose(dy, yt.grad.numpy(), rtol=1e-13)


# -- single-input nodes against PyTorch ----------------------------------------------

SINGLE_INPUT = [
    (ExpLayer, torch.exp),
    (ReciprocalLayer, torch.reciprocal),
    (lambda: MulConstLayer(-1), lambda t: -t),
    (lambda: MulConstLayer(2.5), lambda t: 2.5 * t),
    (lambda: AddConstLayer(1), lambda t: t + 1),
]


SINGLE_IDS = ["Exp", "Recip", "×-1", "×2.5", "+1"]


@pytest.mark.parametrize(("make", "torch_fn"), SINGLE_INPUT, ids=SINGLE_IDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_single_input_nodes_match_torch(
    make: Callable[[], Any], torch_fn: Callable[[Any], Any], dtype: type
) -> None:
    rng = np.random.default_rng(2)
    x = (rng.uniform(0.5, 3.0, (3, 4)) * rng.choice([-1, 1], (3, 4))).astype(dtype)
    dout = rng.standard_normal((3, 4)).astype(dtype)
    node = make()
    out = node.forward(x)
    dx = node.backward(dout)
    xt = torch.tensor(x, requires_grad=True)
    outt = torch_fn(xt)
    outt.backward(torch.tensor(dout))
    rtol = 1e-6 if dtype == np.float32 else 1e-15
    assert out.dtype == dtype and dx.dtype == dtype
    np.testing.assert_allclose(out, outt.detach().numpy(), rtol=rtol)
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=rtol)


def test_repr_shows_the_constants() -> None:
    assert repr(MulConstLayer(-1)) == "MulConstLayer(c=-1.0)"
    assert repr(AddConstLayer(1)) == "AddConstLayer(c=1.0)"
    assert repr(MulLayer()) == "MulLayer()"


def test_exp_overflows_like_numpy() -> None:
    # the primitive node does not hide the overflow, unlike the fused Sigmoid
    with pytest.raises(FloatingPointError), np.errstate(over="raise"):
        ExpLayer().forward(np.array([710.0]))
    with np.errstate(over="ignore"):
        assert np.isposinf(ExpLayer().forward(np.array([710.0]))[0])


# -- the contract: errors and no mutation --------------------------------------------

ALL_NODES: list[tuple[Callable[[], Any], int]] = [
    (MulLayer, 2),
    (AddLayer, 2),
    (ExpLayer, 1),
    (ReciprocalLayer, 1),
    (lambda: MulConstLayer(-1), 1),
    (lambda: AddConstLayer(1), 1),
]
NODE_IDS = ["Mul", "Add", "Exp", "Recip", "MulConst", "AddConst"]


@pytest.mark.parametrize(("make", "n_inputs"), ALL_NODES, ids=NODE_IDS)
def test_backward_before_forward_raises(make: Callable[[], Any], n_inputs: int) -> None:
    with pytest.raises(RuntimeError, match="before forward"):
        make().backward(np.ones(3))


@pytest.mark.parametrize(("make", "n_inputs"), ALL_NODES, ids=NODE_IDS)
def test_a_failed_forward_leaves_no_graph_for_backward(
    make: Callable[[], Any], n_inputs: int
) -> None:
    # backward would otherwise differentiate the previous, successful forward's inputs.
    node = make()
    node.forward(*[np.ones(2)] * n_inputs)
    failing = [[np.ones(2)] * (n_inputs + 1)]  # a wrong number of inputs
    if n_inputs == 2:
        failing.append([np.ones(3), np.ones(2)])  # shapes that do not broadcast
    for inputs in failing:
        with pytest.raises((TypeError, ValueError)):
            node.forward(*inputs)
        with pytest.raises(RuntimeError, match="before forward"):
            node.backward(np.ones(2))
        node.forward(*[np.ones(2)] * n_inputs)


@pytest.mark.parametrize(("make", "n_inputs"), ALL_NODES, ids=NODE_IDS)
def test_wrong_dout_shape_raises(make: Callable[[], Any], n_inputs: int) -> None:
    node = make()
    node.forward(*[np.ones((2, 3))] * n_inputs)
    with pytest.raises(ValueError, match="shape"):
        node.backward(np.ones(3))


COMPLEX_CASES = [
    pytest.param(make, n, position, id=f"{name}-input{position}")
    for (make, n), name in zip(ALL_NODES, NODE_IDS, strict=True)
    for position in range(n)
]


@pytest.mark.parametrize(("make", "n_inputs", "position"), COMPLEX_CASES)
def test_complex_input_raises(make: Callable[[], Any], n_inputs: int, position: int) -> None:
    inputs: list[Any] = [np.ones(3)] * n_inputs
    inputs[position] = np.ones(3, dtype=np.complex128)
    with pytest.raises(TypeError, match="complex"):
        make().forward(*inputs)


@pytest.mark.parametrize(("make", "n_inputs"), ALL_NODES, ids=NODE_IDS)
def test_no_mutation_of_inputs_or_dout(make: Callable[[], Any], n_inputs: int) -> None:
    rng = np.random.default_rng(3)
    inputs = [rng.uniform(0.5, 2.0, (2, 3)) for _ in range(n_inputs)]
    saved = [x.copy() for x in inputs]
    node = make()
    out = node.forward(*inputs)
    dout = rng.standard_normal(out.shape)
    saved_dout = dout.copy()
    grads = node.backward(dout)
    grads = grads if isinstance(grads, tuple) else (grads,)
    for x, x0 in zip(inputs, saved, strict=True):
        np.testing.assert_array_equal(x, x0)
    np.testing.assert_array_equal(dout, saved_dout)
    for g in grads:
        assert not np.may_share_memory(g, dout)


def test_mul_layer_keeps_its_inputs_safe_from_later_edits() -> None:
    x, y = np.array([1.0, 2.0]), np.array([3.0, 4.0])
    node = MulLayer()
    node.forward(x, y)
    x[:], y[:] = 100.0, 100.0
    dx, dy = node.backward(np.ones(2))
    np.testing.assert_array_equal(dx, [3.0, 4.0])
    np.testing.assert_array_equal(dy, [1.0, 2.0])


@pytest.mark.parametrize("make", [ExpLayer, ReciprocalLayer], ids=["Exp", "Recip"])
def test_kept_output_is_read_only(make: Callable[[], Any]) -> None:
    out = make().forward(np.array([1.0, 2.0]))
    with pytest.raises(ValueError, match="read-only"):
        out[0] = 5.0


# -- the seed's four-node sigmoid ----------------------------------------------------

GRID = np.linspace(-20.0, 20.0, 4001)


def mp_sigmoid_and_grad(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """y and y (1 - y) in 100-digit arithmetic, rounded to float64."""
    with mpmath.workdps(100):
        ys = [1 / (1 + mpmath.exp(-mpmath.mpf(float(v)))) for v in x]
        return np.array([float(y) for y in ys]), np.array([float(y * (1 - y)) for y in ys])


def test_chain_forward_equals_the_fused_sigmoid() -> None:
    y = sigmoid_chain().forward(GRID)
    assert rel_err(y, snn.Sigmoid().forward(GRID)) < 1e-12
    assert rel_err(y, mp_sigmoid_and_grad(GRID)[0]) < 1e-12


def test_chain_gradient_equals_the_fused_sigmoid() -> None:
    dout = np.random.default_rng(4).uniform(0.5, 2.0, GRID.shape)
    chain = sigmoid_chain()
    chain.forward(GRID)
    g = chain.backward(dout)
    fused = snn.Sigmoid()
    fused.forward(GRID)
    g_fused = fused.backward(dout)
    exact = dout * mp_sigmoid_and_grad(GRID)[1]
    # The chain's y**2 exp(-x) keeps its relative accuracy on the whole grid.
    assert rel_err(g, exact) < 1e-12
    # The fused y (1 - y) cancels in 1 - y for large x (relative error ~eps/exp(-x),
    # 5e-8 at x = 20); up to x = 9 it agrees with the chain to 1e-12.
    moderate = GRID <= 9.0
    assert rel_err(g[moderate], g_fused[moderate]) < 1e-12
    np.testing.assert_allclose(g, g_fused, rtol=0, atol=4 * EPS64)


def test_chain_edges_carry_the_seeds_intermediate_values() -> None:
    x = np.array([-3.0, -0.5, 0.0, 1.0, 4.0])
    chain = sigmoid_chain()
    chain.forward(x)
    e = np.exp(-x)
    expected = [x, -x, e, 1.0 + e, 1.0 / (1.0 + e)]
    assert [edge.name for edge in chain.edges] == ["x", "-x", "exp(-x)", "1+exp(-x)", "y"]
    for value, want in zip(chain.values, expected, strict=True):
        np.testing.assert_allclose(value, want, rtol=2 * EPS64)
    assert chain.grads == [None] * 5


def test_each_backward_step_multiplies_by_the_seeds_local_factor() -> None:
    x = np.linspace(-30.0, 30.0, 601)
    dout = np.random.default_rng(5).uniform(-2.0, 2.0, x.shape)
    chain = sigmoid_chain()
    chain.forward(x)
    # the seed's formulas, evaluated directly in float64
    e = np.exp(-x)
    y = 1.0 / (1.0 + e)
    factors = {1: -(y**2), 2: np.ones_like(x), 3: e, 4: -np.ones_like(x)}
    upstream = dout
    for step in range(1, 5):
        after = chain.backward(dout, steps=step)
        np.testing.assert_allclose(after, upstream * factors[step], rtol=4 * EPS64, atol=0)
        assert chain.grads[4 - step] is not None
        assert all(g is None for g in chain.grads[: 4 - step])
        upstream = after
    # step 2 (+1) passes the gradient on unchanged, step 4 (×-1) flips only its sign
    chain.backward(dout)
    np.testing.assert_array_equal(chain.grads[2], chain.grads[3])
    np.testing.assert_array_equal(chain.grads[0], -chain.grads[1])
    np.testing.assert_allclose(chain.grads[0], dout * e / (1.0 + e) ** 2, rtol=8 * EPS64)


def test_local_gradients_are_the_seeds_factors() -> None:
    x = np.array([-2.0, 0.5, 3.0])
    chain = sigmoid_chain()
    chain.forward(x)
    y = 1.0 / (1.0 + np.exp(-x))
    neg, exp, plus, recip = chain.local_gradients()
    np.testing.assert_array_equal(neg, -np.ones(3))
    np.testing.assert_allclose(exp, np.exp(-x), rtol=2 * EPS64)
    np.testing.assert_array_equal(plus, np.ones(3))
    np.testing.assert_allclose(recip, -(y**2), rtol=4 * EPS64)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_chain_breaks_once_exp_overflows_but_sigmoid_stays_finite(dtype: type) -> None:
    # exp(-x) overflows for -x above log(max float): 709.78 in float64, 88.72 in float32
    threshold = -float(np.log(np.finfo(dtype).max))
    assert threshold == pytest.approx(-709.78 if dtype == np.float64 else -88.72, abs=0.01)
    x = np.array([threshold + 0.01, threshold - 0.01, 2 * threshold], dtype=dtype)
    chain = sigmoid_chain()
    with np.errstate(over="ignore", invalid="ignore"):
        y = chain.forward(x)
        g = chain.backward(np.ones_like(x))
    assert np.isfinite(g[0])
    assert np.isnan(g[1]) and np.isnan(g[2])
    assert np.all(np.isfinite(y))  # 1 / inf = 0: only the backward pass breaks
    fused = snn.Sigmoid()
    y_fused = fused.forward(x)
    g_fused = fused.backward(np.ones_like(x))
    assert np.all(np.isfinite(y_fused)) and np.all(np.isfinite(g_fused))
    assert np.all(g_fused >= 0)


def test_chain_loses_the_gradient_before_it_breaks() -> None:
    # y**2 underflows in float64 once x < -372.5 (y ~ exp(x), y**2 < 5e-324), so
    # step 1 already gives 0 where the true gradient exp(x) ~ 1e-162 is representable.
    x = np.array([-380.0, -500.0, -700.0])
    chain = sigmoid_chain()
    chain.forward(x)
    assert np.all(chain.backward(np.ones(3)) == 0.0)
    fused = snn.Sigmoid()
    fused.forward(x)
    exact = mp_sigmoid_and_grad(x)[1]
    assert np.all(exact > 0)
    assert rel_err(fused.backward(np.ones(3)), exact) < 1e-12


def test_chain_keeps_float32() -> None:
    x = np.linspace(-5, 5, 11, dtype=np.float32)
    chain = sigmoid_chain()
    y = chain.forward(x)
    g = chain.backward(np.ones_like(x))
    assert y.dtype == np.float32 and g.dtype == np.float32
    y64 = 1.0 / (1.0 + np.exp(-x.astype(np.float64)))
    np.testing.assert_allclose(g, y64 * (1 - y64), rtol=1e-6)


def test_chain_scalar_dout_seeds_every_element() -> None:
    x = np.array([-1.0, 0.0, 2.0])
    chain = sigmoid_chain()
    chain.forward(x)
    g_scalar = chain.backward(1.0)
    y = 1.0 / (1.0 + np.exp(-x))
    np.testing.assert_allclose(g_scalar, y * (1 - y), rtol=8 * EPS64)
    assert g_scalar.shape == (3,)


def test_chain_errors() -> None:
    chain = sigmoid_chain()
    with pytest.raises(RuntimeError, match="before forward"):
        chain.backward()
    with pytest.raises(RuntimeError, match="before forward"):
        chain.local_gradients()
    chain.forward(np.ones(3))
    with pytest.raises(ValueError, match="steps"):
        chain.backward(steps=5)
    with pytest.raises(ValueError, match="steps"):
        chain.backward(steps=-1)
    with pytest.raises(TypeError, match="steps"):
        chain.backward(steps=1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="shape"):
        chain.backward(np.ones(2))
    with pytest.raises(TypeError, match="complex"):
        chain.forward(np.ones(3, dtype=np.complex128))
    with pytest.raises(TypeError, match="single-input"):
        Chain([MulLayer()])
    with pytest.raises(ValueError, match="names"):
        Chain([ExpLayer()], names=["x"])
    chain.forward(np.ones(3))
    for dout in (None, "a", np.array(["1"]), 1j):
        with pytest.raises(TypeError, match="dout must be a real number"):
            chain.backward(dout)


def test_a_node_used_twice_in_a_chain_is_refused() -> None:
    # One ExpLayer twice would backpropagate exp(exp(1)) * exp(exp(1)) (229.6), not the
    # true d/dx exp(exp(x)) = exp(exp(x)) * exp(x) = 41.19 that two nodes give.
    two = Chain([ExpLayer(), ExpLayer()])
    two.forward(1.0)
    np.testing.assert_allclose(two.backward(1.0), np.exp(np.e) * np.e, rtol=1e-15)
    node = ExpLayer()
    with pytest.raises(ValueError, match="a node appears twice"):
        Chain([node, node])


def test_two_input_nodes_name_shapes_that_do_not_broadcast() -> None:
    for node in (MulLayer(), AddLayer()):
        with pytest.raises(ValueError, match=rf"{type(node).__name__}.forward: x of shape \(2,\)"):
            node.forward(np.ones(2), np.ones(3))
        with pytest.raises(ValueError, match=rf"{type(node).__name__}.forward: an input is not"):
            node.forward([[1.0], [1.0, 2.0]], np.ones(2))


def test_constant_labels_show_the_sign_once() -> None:
    labels = [AddConstLayer(c).label for c in (1.0, 0.0, -0.0, -2.5)]
    assert labels == ["+1", "+0", "-0", "-2.5"]
    assert MulConstLayer(-1).label == "×-1"


def test_chain_does_not_mutate_or_alias_its_input() -> None:
    x = np.array([-1.0, 0.5])
    dout = np.array([1.0, 2.0])
    chain = sigmoid_chain()
    chain.forward(x)
    chain.backward(dout)
    np.testing.assert_array_equal(x, [-1.0, 0.5])
    np.testing.assert_array_equal(dout, [1.0, 2.0])
    x[:] = 7.0
    np.testing.assert_array_equal(chain.values[0], [-1.0, 0.5])


@pytest.mark.parametrize(
    ("x", "y"),
    [
        (np.ones(3, np.float32), 1.1),
        (2.5, np.ones(3, np.float32)),
        (np.ones(3, np.float16), 3),
        (np.ones(3, np.float16), np.ones(3, np.float32)),
        (np.float32(2.0), 1.5),
        (np.ones(3), 2),
        (100, 1.1),
    ],
)
@pytest.mark.parametrize(("node", "op"), [(MulLayer, np.multiply), (AddLayer, np.add)])
def test_binary_nodes_promote_as_numpy_does(node: Any, op: Any, x: Any, y: Any) -> None:
    # A Python number adapts to the array it meets (NEP 50): float32 × 1.1 stays float32.
    out = node().forward(x, y)
    want = op(x, y)
    expected = want.dtype if np.asarray(want).dtype.kind == "f" else np.float64
    assert out.dtype == expected
    np.testing.assert_allclose(out, want, rtol=1e-3 if expected == np.float16 else 1e-7)


@pytest.mark.parametrize("node", [MulConstLayer, AddConstLayer])
@pytest.mark.parametrize(
    ("c", "error"),
    [
        ("2", TypeError),
        (True, TypeError),
        (b"3", TypeError),
        (float("nan"), ValueError),
        (float("inf"), ValueError),
    ],
)
def test_constant_nodes_take_only_finite_real_constants(node: Any, c: Any, error: Any) -> None:
    with pytest.raises(error, match=f"{node.__name__}: c must be"):
        node(c)
