"""Optimisers against torch.optim in float64, against the book's formulas, and their contract."""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

import scratchnn as snn
from scratchnn.optim import (
    SGD,
    AdaGrad,
    Adam,
    Momentum,
    Nesterov,
    Optimizer,
    RMSprop,
    make_optimizer,
)

torch = pytest.importorskip("torch", reason="PyTorch (the test oracle) is not installed")

SHAPES = {"W1": (4, 3), "b1": (3,), "W2": (2, 3, 5), "s": ()}
N_STEPS = 6

# name -> (our optimiser from kwargs, torch's from (tensors, kwargs), hyperparameters)
CASES: dict[str, tuple[Callable[..., Optimizer], Callable[..., Any], dict[str, float]]] = {
    "sgd": (
        SGD,
        lambda ps, lr, weight_decay: torch.optim.SGD(ps, lr=lr, weight_decay=weight_decay),
        {"lr": 0.1},
    ),
    "momentum": (
        Momentum,
        lambda ps, lr, momentum, weight_decay: torch.optim.SGD(
            ps, lr=lr, momentum=momentum, weight_decay=weight_decay
        ),
        {"lr": 0.1, "momentum": 0.8},
    ),
    "nesterov": (
        Nesterov,
        lambda ps, lr, momentum, weight_decay: torch.optim.SGD(
            ps, lr=lr, momentum=momentum, nesterov=True, weight_decay=weight_decay
        ),
        {"lr": 0.1, "momentum": 0.8},
    ),
    "adagrad": (
        AdaGrad,
        lambda ps, lr, eps, weight_decay: torch.optim.Adagrad(
            ps, lr=lr, eps=eps, weight_decay=weight_decay
        ),
        {"lr": 0.1, "eps": 1e-3},
    ),
    "rmsprop": (
        RMSprop,
        lambda ps, lr, decay_rate, eps, weight_decay: torch.optim.RMSprop(
            ps, lr=lr, alpha=decay_rate, eps=eps, weight_decay=weight_decay
        ),
        {"lr": 0.05, "decay_rate": 0.9, "eps": 1e-3},
    ),
    "adam": (
        Adam,
        lambda ps, lr, beta1, beta2, eps, weight_decay: torch.optim.Adam(
            ps, lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=weight_decay
        ),
        {"lr": 0.05, "beta1": 0.8, "beta2": 0.95, "eps": 1e-3},
    ),
}


def random_params(rng: np.random.Generator, dtype: Any = np.float64) -> dict[str, np.ndarray]:
    return {
        key: np.asarray(rng.standard_normal(shape), dtype=dtype) for key, shape in SHAPES.items()
    }


def random_grads(rng: np.random.Generator, dtype: Any = np.float64) -> dict[str, np.ndarray]:
    # Gradients of changing scale, so that adaptive optimisers see varied moments.
    return {
        key: np.asarray(rng.standard_normal(shape) * rng.uniform(0.1, 3.0), dtype=dtype)
        for key, shape in SHAPES.items()
    }


def assert_close(actual: np.ndarray, expected: np.ndarray, rtol: float = 1e-12) -> None:
    """Relative error of the whole array, max |a - e| / max |e|, at most ``rtol``."""
    scale = max(float(np.max(np.abs(expected), initial=0.0)), 1e-300)
    error = float(np.max(np.abs(actual - expected), initial=0.0)) / scale
    assert error <= rtol, f"relative error {error:.3g} > {rtol:g}"


# -- against torch.optim -----------------------------------------------------------------


@pytest.mark.parametrize("weight_decay", [0.0, 0.05], ids=["plain", "weight_decay"])
@pytest.mark.parametrize("name", list(CASES))
def test_matches_torch_step_for_step(name: str, weight_decay: float) -> None:
    ours_cls, torch_cls, hyper = CASES[name]
    rng = np.random.default_rng(42)
    params = random_params(rng)
    tensors = {key: torch.tensor(value, requires_grad=True) for key, value in params.items()}
    ours = ours_cls(**hyper, weight_decay=weight_decay)
    theirs = torch_cls(list(tensors.values()), **hyper, weight_decay=weight_decay)
    for _ in range(N_STEPS):
        step_both(ours, theirs, params, tensors, random_grads(rng))


def step_both(
    ours: Optimizer,
    theirs: Any,
    params: dict[str, np.ndarray],
    tensors: dict[str, Any],
    grads: dict[str, np.ndarray],
) -> None:
    """One step of our optimiser and of torch's on the same gradients (a parameter without
    one is skipped: its grad None for torch); the same parameters after."""
    for key, tensor in tensors.items():
        tensor.grad = torch.tensor(grads[key]) if key in grads else None
    ours.update(params, grads)
    theirs.step()
    for key, tensor in tensors.items():
        assert_close(params[key], tensor.detach().numpy())


@pytest.mark.parametrize(
    ("name", "eps"),
    [(name, None) for name in CASES] + [(name, 0.0) for name in CASES if "eps" in CASES[name][2]],
)
def test_a_learning_rate_of_zero_then_a_schedule_match_torch(name: str, eps: float | None) -> None:
    # lr = 0 (a warm-up's first steps, a frozen phase): the state still moves, the
    # parameters do not; then the rate changes between steps, as schedules do.
    ours_cls, torch_cls, hyper = CASES[name]
    if eps is not None:
        hyper = {**hyper, "eps": eps}
    rng = np.random.default_rng(8)
    params = random_params(rng)
    tensors = {key: torch.tensor(value, requires_grad=True) for key, value in params.items()}
    ours = ours_cls(**{**hyper, "lr": 0.0})
    theirs = torch_cls(list(tensors.values()), **{**hyper, "lr": 0.0}, weight_decay=0.0)
    before = {key: value.copy() for key, value in params.items()}
    for step, lr in enumerate([0.0, 0.0, 0.0, hyper["lr"], hyper["lr"] / 2, 0.0]):
        ours.lr = lr
        theirs.param_groups[0]["lr"] = lr
        step_both(ours, theirs, params, tensors, random_grads(rng))
        if step < 3:
            assert all(np.array_equal(params[key], before[key]) for key in params)


def test_adam_hyperparameters_changed_between_steps_match_torch() -> None:
    # Adam works out its folded scalars once a step for all parameters: a beta or eps
    # changed between steps (set anew, or a NumPy number changed in place) must be seen.
    rng = np.random.default_rng(9)
    params = random_params(rng)
    tensors = {key: torch.tensor(value, requires_grad=True) for key, value in params.items()}
    ours = Adam(lr=0.05)
    theirs = torch.optim.Adam(list(tensors.values()), lr=0.05)
    group = theirs.param_groups[0]
    step_both(ours, theirs, params, tensors, random_grads(rng))
    ours.beta1, group["betas"] = 0.5, (0.5, 0.999)
    step_both(ours, theirs, params, tensors, random_grads(rng))
    # Two updates at one step count (each parameter counts its own steps), eps changed
    # in place between them: the same object, a new value.
    ours.eps = np.array(1e-3)
    group["eps"] = 1e-3
    for keys, eps in ((["W1", "b1"], 1e-3), (["W2", "s"], 0.5)):
        ours.eps[...] = group["eps"] = eps
        grads = {key: value for key, value in random_grads(rng).items() if key in keys}
        step_both(ours, theirs, params, tensors, grads)


def test_adam_skipped_parameter_keeps_its_own_step_count_as_torch() -> None:
    rng = np.random.default_rng(3)
    params = random_params(rng)
    tensors = {key: torch.tensor(value, requires_grad=True) for key, value in params.items()}
    ours = Adam(lr=0.05)
    theirs = torch.optim.Adam(list(tensors.values()), lr=0.05)
    for step in range(N_STEPS):
        grads = random_grads(rng)
        if step % 2:
            del grads["b1"]  # b1 has no gradient on odd steps: torch skips it (grad None)
        step_both(ours, theirs, params, tensors, grads)
    assert ours.steps == {"W1": N_STEPS, "b1": N_STEPS // 2, "W2": N_STEPS, "s": N_STEPS}


# -- against the book's formulas (common/optimizer.py), float64 --------------------------


def book_momentum(lr: float, momentum: float) -> Callable[[dict, dict], None]:
    v: dict[str, np.ndarray] = {}

    def update(params: dict, grads: dict) -> None:
        for key in params:
            v[key] = momentum * v.get(key, 0.0) - lr * grads[key]
            params[key] += v[key]

    return update


def paper_nesterov(lr: float, momentum: float) -> Callable[[dict, dict], None]:
    # Bengio et al. 2012 (arXiv:1212.0901), eq. 7, which the book cites, in the book's variables.
    v: dict[str, np.ndarray] = {}

    def update(params: dict, grads: dict) -> None:
        for key in params:
            old = v.get(key, np.zeros_like(params[key]))
            params[key] += momentum * momentum * old - (1 + momentum) * lr * grads[key]
            v[key] = momentum * old - lr * grads[key]

    return update


def book_adagrad(lr: float) -> Callable[[dict, dict], None]:
    h: dict[str, np.ndarray] = {}

    def update(params: dict, grads: dict) -> None:
        for key in params:
            h[key] = h.get(key, 0.0) + grads[key] * grads[key]
            params[key] -= lr * grads[key] / (np.sqrt(h[key]) + 1e-7)

    return update


def book_rmsprop(lr: float, decay_rate: float) -> Callable[[dict, dict], None]:
    h: dict[str, np.ndarray] = {}

    def update(params: dict, grads: dict) -> None:
        for key in params:
            h[key] = decay_rate * h.get(key, 0.0) + (1 - decay_rate) * grads[key] * grads[key]
            params[key] -= lr * grads[key] / (np.sqrt(h[key]) + 1e-7)

    return update


def book_adam(lr: float, beta1: float, beta2: float, eps: float) -> Callable[[dict, dict], None]:
    m: dict[str, np.ndarray] = {}
    v: dict[str, np.ndarray] = {}
    t = [0]

    def update(params: dict, grads: dict) -> None:
        t[0] += 1
        lr_t = lr * np.sqrt(1.0 - beta2 ** t[0]) / (1.0 - beta1 ** t[0])
        for key in params:
            m[key] = m.get(key, 0.0) + (1 - beta1) * (grads[key] - m.get(key, 0.0))
            v[key] = v.get(key, 0.0) + (1 - beta2) * (grads[key] ** 2 - v.get(key, 0.0))
            params[key] -= lr_t * m[key] / (np.sqrt(v[key]) + eps)

    return update


BOOK_CASES = {
    "momentum": (lambda: Momentum(0.1, 0.8), lambda: book_momentum(0.1, 0.8)),
    "nesterov": (lambda: Nesterov(0.1, 0.8), lambda: paper_nesterov(0.1, 0.8)),
    # default eps: the book's 1e-7
    "adagrad": (lambda: AdaGrad(0.1), lambda: book_adagrad(0.1)),
    "rmsprop": (lambda: RMSprop(0.05, 0.9), lambda: book_rmsprop(0.05, 0.9)),
    # the book adds eps before the bias correction, so the two agree when eps = 0
    "adam": (lambda: Adam(0.05, 0.8, 0.95, eps=0.0), lambda: book_adam(0.05, 0.8, 0.95, 0.0)),
}


@pytest.mark.parametrize("name", list(BOOK_CASES))
def test_equals_the_books_formula_for_constant_lr(name: str) -> None:
    make_ours, make_book = BOOK_CASES[name]
    ours, book = make_ours(), make_book()
    rng = np.random.default_rng(7)
    params = random_params(rng)
    expected = {key: value.copy() for key, value in params.items()}
    for _ in range(N_STEPS):
        grads = random_grads(rng)
        ours.update(params, grads)
        book(expected, grads)
        for key in params:
            assert_close(params[key], expected[key])


def test_adam_first_moment_never_turns_subnormal_and_the_step_is_unchanged() -> None:
    # A dead unit's gradient is 0 for good: m decays by beta1 a step, and would be
    # subnormal (slow arithmetic) after about 800 float32 steps without the flush.
    params = {"W": np.ones(4, np.float32)}
    reference = {"W": np.ones(4)}
    optimizer, exact = Adam(), Adam()
    first = np.array([1e-3, -2.0, 5.0, 0.0])
    optimizer.update(params, {"W": first.astype(np.float32)})
    exact.update(reference, {"W": first})
    for _ in range(1500):
        optimizer.update(params, {"W": np.zeros(4, np.float32)})
        exact.update(reference, {"W": np.zeros(4)})
        m = np.abs(optimizer.m["W"])
        assert not np.any((m > 0) & (m < np.finfo(np.float32).tiny))
    np.testing.assert_allclose(params["W"], reference["W"], rtol=1e-6)


def test_adam_with_eps_differs_from_the_book_only_by_eps_placement() -> None:
    # The book's eps added to sqrt(v) equals torch's eps / sqrt(1 - beta2**t): on step 1
    # with beta2 = 0.75 that is 2 * eps, so the book's update equals ours with eps doubled.
    params = {"W": np.array([0.5, -1.0, 2.0])}
    expected = {"W": params["W"].copy()}
    grads = {"W": np.array([1e-3, -2e-3, 4e-3])}
    same_eps = {"W": params["W"].copy()}
    Adam(0.1, 0.9, 0.75, eps=2e-3).update(params, grads)
    Adam(0.1, 0.9, 0.75, eps=1e-3).update(same_eps, grads)
    book_adam(0.1, 0.9, 0.75, 1e-3)(expected, grads)
    assert_close(params["W"], expected["W"])
    assert not np.allclose(same_eps["W"], expected["W"], rtol=1e-3, atol=0.0)


# -- the in-place contract, dtypes, allocations -------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_updates_the_arrays_in_place_and_trains_a_layer(name: str) -> None:
    rng = np.random.default_rng(0)
    layer = snn.Affine(rng.standard_normal((3, 2)), rng.standard_normal(2))
    params = {"W": layer.W, "b": layer.b}
    before = {key: value.copy() for key, value in params.items()}
    ids = {key: id(value) for key, value in params.items()}
    optimizer = make_optimizer(name, lr=0.1)
    for _ in range(3):
        optimizer.update(params, {"W": rng.standard_normal((3, 2)), "b": rng.standard_normal(2)})
    assert {key: id(value) for key, value in params.items()} == ids
    assert layer.W is params["W"] and layer.b is params["b"]
    assert not np.array_equal(layer.W, before["W"])


@pytest.mark.parametrize("grad_dtype", [np.float32, np.float64])
@pytest.mark.parametrize("weight_decay", [0.0, 0.05], ids=["plain", "weight_decay"])
@pytest.mark.parametrize("name", list(CASES))
def test_float32_parameters_stay_float32_and_follow_the_float64_path(
    name: str, weight_decay: float, grad_dtype: Any
) -> None:
    ours_cls, _, hyper = CASES[name]
    rng = np.random.default_rng(5)
    params32 = random_params(rng, np.float32)
    params64 = {key: value.astype(np.float64) for key, value in params32.items()}
    ids = {key: id(value) for key, value in params32.items()}
    opt32, opt64 = (
        ours_cls(**hyper, weight_decay=weight_decay),
        ours_cls(**hyper, weight_decay=weight_decay),
    )
    for _ in range(N_STEPS):
        grads = random_grads(rng, grad_dtype)
        opt32.update(params32, grads)
        opt64.update(params64, {key: value.astype(np.float64) for key, value in grads.items()})
    for key in params32:
        assert params32[key].dtype == np.float32 and id(params32[key]) == ids[key]
        assert_close(params32[key].astype(np.float64), params64[key], rtol=1e-5)
    for array in opt32.state_dict().values():
        assert array.dtype in (np.float32, np.int64)


@pytest.mark.parametrize("name", list(CASES))
def test_gradients_are_not_written_to(name: str) -> None:
    rng = np.random.default_rng(9)
    params = random_params(rng)
    grads = random_grads(rng)
    copies = {key: value.copy() for key, value in grads.items()}
    optimizer = make_optimizer(name, weight_decay=0.1)
    for _ in range(2):
        optimizer.update(params, grads)
    for key in grads:
        np.testing.assert_array_equal(grads[key], copies[key])


@pytest.mark.parametrize("name", list(CASES))
def test_a_step_allocates_no_parameter_sized_arrays(name: str) -> None:
    params = {"W": np.ones((500, 400))}  # 1.6 MB
    grads = {"W": np.full((500, 400), 0.5)}
    optimizer = make_optimizer(name, weight_decay=0.01)
    optimizer.update(params, grads)  # the first step allocates state and scratch
    tracemalloc.start()
    try:
        optimizer.update(params, grads)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < params["W"].nbytes // 4


# -- errors -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_bad_gradients_raise_naming_the_key_and_change_nothing(name: str) -> None:
    params = {"W": np.ones((2, 3)), "b": np.zeros(3)}
    optimizer = make_optimizer(name)
    with pytest.raises(ValueError, match="'bias'"):
        optimizer.update(params, {"W": np.ones((2, 3)), "bias": np.ones(3)})
    with pytest.raises(ValueError, match=r"'b'.*\(4,\)"):
        optimizer.update(params, {"W": np.ones((2, 3)), "b": np.ones(4)})
    with pytest.raises(TypeError, match="'W'"):
        optimizer.update(params, {"W": np.ones((2, 3), dtype=complex)})
    with pytest.raises(TypeError, match="'n'"):
        optimizer.update({"n": np.ones(3, dtype=np.int64)}, {"n": np.ones(3)})
    np.testing.assert_array_equal(params["W"], np.ones((2, 3)))  # the valid W was not stepped
    assert optimizer.state_dict() == {}


@pytest.mark.parametrize(
    ("name", "kwargs", "error"),
    [
        ("sgd", {"lr": -0.1}, ValueError),
        ("sgd", {"lr": float("nan")}, ValueError),
        ("sgd", {"lr": float("inf")}, ValueError),
        ("sgd", {"lr": True}, TypeError),
        ("sgd", {"lr": "0.1"}, TypeError),
        ("sgd", {"weight_decay": -1e-4}, ValueError),
        ("momentum", {"momentum": 1.0}, ValueError),
        ("momentum", {"momentum": -0.1}, ValueError),
        ("nesterov", {"momentum": 0.0}, ValueError),
        ("adagrad", {"eps": -1e-7}, ValueError),
        ("rmsprop", {"decay_rate": 1.0}, ValueError),
        ("adam", {"beta1": 1.0}, ValueError),
        ("adam", {"beta2": -0.5}, ValueError),
        ("adam", {"eps": -1e-8}, ValueError),
    ],
    ids=str,
)
def test_bad_hyperparameters_raise_at_construction(
    name: str, kwargs: dict[str, Any], error: type[Exception]
) -> None:
    with pytest.raises(error, match=next(iter(kwargs))):
        make_optimizer(name, **kwargs)


def test_make_optimizer_builds_each_by_name_and_lists_the_names_when_unknown() -> None:
    expected = {
        "sgd": SGD,
        "momentum": Momentum,
        "nesterov": Nesterov,
        "adagrad": AdaGrad,
        "rmsprop": RMSprop,
        "adam": Adam,
    }
    for name, cls in expected.items():
        assert type(make_optimizer(name.upper())) is cls
    assert make_optimizer("adam", lr=0.5, beta2=0.9).hyperparameters() == {
        "lr": 0.5,
        "beta1": 0.9,
        "beta2": 0.9,
        "eps": 1e-8,
        "weight_decay": 0.0,
    }
    with pytest.raises(ValueError, match=r"adagrad.*adam.*momentum.*nesterov.*rmsprop.*sgd"):
        make_optimizer("adamw")


def test_defaults_and_repr_are_the_books() -> None:
    assert repr(SGD()) == "SGD(lr=0.01, weight_decay=0.0)"
    assert repr(Momentum()) == "Momentum(lr=0.01, momentum=0.9, weight_decay=0.0)"
    assert AdaGrad().hyperparameters() == {"lr": 0.01, "eps": 1e-7, "weight_decay": 0.0}
    assert RMSprop().hyperparameters()["decay_rate"] == 0.99
    assert Adam().hyperparameters() == {
        "lr": 0.001,
        "beta1": 0.9,
        "beta2": 0.999,
        "eps": 1e-8,
        "weight_decay": 0.0,
    }


# -- state for checkpoints ----------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_saving_state_midway_continues_bit_identically(name: str) -> None:
    rng = np.random.default_rng(11)
    params = random_params(rng, np.float32)
    grads = [random_grads(rng, np.float32) for _ in range(2 * N_STEPS)]
    first = make_optimizer(name, lr=0.05, weight_decay=0.01)
    for g in grads[:N_STEPS]:
        first.update(params, g)
    state = first.state_dict()
    resumed_params = {key: value.copy() for key, value in params.items()}
    for g in grads[N_STEPS:]:
        first.update(params, g)

    second = make_optimizer(name, **first.hyperparameters())
    second.load_state_dict(state)
    for g in grads[N_STEPS:]:
        second.update(resumed_params, g)
    for key in params:
        np.testing.assert_array_equal(resumed_params[key], params[key])
        assert resumed_params[key].dtype == np.float32


def test_state_dict_names_and_copies() -> None:
    rng = np.random.default_rng(2)
    params = random_params(rng)
    optimizer = Adam()
    optimizer.update(params, random_grads(rng))
    state = optimizer.state_dict()
    assert set(state) == {f"{slot}/{key}" for slot in ("m", "v", "step") for key in SHAPES}
    assert state["step/W1"].shape == () and state["step/W1"].dtype == np.int64
    assert int(state["step/W1"]) == 1
    # the export and the import are copies: changing them later does not reach the optimiser
    state["m/W1"][...] = 123.0
    assert not np.any(optimizer.m["W1"] == 123.0)
    optimizer.load_state_dict(state)
    state["m/W1"][...] = 0.0
    assert np.all(optimizer.m["W1"] == 123.0)
    assert SGD().state_dict() == {}
    momentum = Momentum()
    momentum.update(params, random_grads(rng))
    assert set(momentum.state_dict()) == {f"v/{key}" for key in SHAPES}


@pytest.mark.parametrize(
    ("name", "state", "match"),
    [
        ("sgd", {"v/W": np.zeros(2)}, "unexpected entry 'v/W'"),
        ("momentum", {"m/W": np.zeros(2)}, "unexpected entry 'm/W'"),
        ("momentum", {"vW": np.zeros(2)}, "unexpected entry 'vW'"),
        ("momentum", {"v/W": np.zeros(2, dtype=np.int64)}, "float"),
        ("adam", {"m/W": np.zeros(2), "step/W": np.array(1)}, r"lacks \['v/W'\]"),
        ("adam", {"m/W": np.zeros(2), "v/W": np.zeros(3), "step/W": np.array(1)}, "shape"),
        ("adam", {"m/W": np.zeros(2), "v/W": np.zeros(2)}, "step"),
        ("adam", {"m/W": np.zeros(2), "v/W": np.zeros(2), "step/W": np.array(0)}, "step/W"),
        ("adam", {"m/W": np.zeros(2), "v/W": np.zeros(2), "step/W": np.array(1.5)}, "step/W"),
    ],
    ids=str,
)
def test_load_state_dict_rejects_bad_state_and_keeps_the_old(
    name: str, state: dict[str, np.ndarray], match: str
) -> None:
    optimizer = make_optimizer(name)
    params = {"W": np.ones(2)}
    optimizer.update(params, {"W": np.ones(2)})
    before = optimizer.state_dict()
    with pytest.raises(ValueError, match=match):
        optimizer.load_state_dict(state)
    after = optimizer.state_dict()
    assert before.keys() == after.keys()
    for key in before:
        np.testing.assert_array_equal(after[key], before[key])


def test_loaded_state_of_another_shape_raises_at_update_naming_the_key() -> None:
    optimizer = Momentum()
    optimizer.load_state_dict({"v/W": np.zeros(3)})
    with pytest.raises(ValueError, match="v/W"):
        optimizer.update({"W": np.ones(2)}, {"W": np.ones(2)})
    optimizer.load_state_dict({"v/W": np.zeros(2, dtype=np.float32)})
    with pytest.raises(ValueError, match="float32"):
        optimizer.update({"W": np.ones(2)}, {"W": np.ones(2)})


def test_check_state_finds_loaded_state_that_fits_no_parameter() -> None:
    params = {"W": np.ones((2, 3)), "b": np.ones(3)}
    optimizer = make_optimizer("adam", lr=0.1)
    optimizer.check_state(params)  # no state yet: nothing to refuse
    optimizer.update(params, {"W": np.ones((2, 3)), "b": np.ones(3)})
    optimizer.check_state(params)
    state = optimizer.state_dict()
    for bad_params, message in [
        ({"W": params["W"]}, "state m/b belongs to no parameter"),
        ({**params, "W": np.ones((3, 2))}, r"state m/W has shape \(2, 3\)"),
        ({**params, "b": np.ones(3, np.float32)}, "dtype float64, its parameter"),
    ]:
        loaded = make_optimizer("adam", lr=0.1)
        loaded.load_state_dict(state)
        with pytest.raises(ValueError, match=message):
            loaded.check_state(bad_params)


@pytest.mark.parametrize("step", [0, 2**63 - 1])
def test_adam_refuses_a_step_count_it_could_not_save(step: int) -> None:
    optimizer = make_optimizer("adam", lr=0.1)
    params = {"W": np.ones(2)}
    optimizer.update(params, {"W": np.ones(2)})
    state = {**optimizer.state_dict(), "step/W": np.array(step, dtype=np.uint64)}
    with pytest.raises(ValueError, match=r"step/W must be an integer in \[1, 2\*\*63 - 1\)"):
        make_optimizer("adam", lr=0.1).load_state_dict(state)


# -- edges the audit found (each against torch or against the same step on a plain copy) ---


def _torch_run(name: str, hyper: dict[str, float], start: np.ndarray,
               grads: list[np.ndarray]) -> np.ndarray:  # fmt: skip
    tensor = torch.tensor(start.copy(), requires_grad=True)
    optimizer = CASES[name][1]([tensor], **hyper, weight_decay=0.0)
    for grad in grads:
        tensor.grad = torch.tensor(grad)
        optimizer.step()
    return tensor.detach().numpy()


@pytest.mark.parametrize("lr", [3e-5, 1e-3])
def test_adam_on_float16_parameters_follows_torch(lr: float) -> None:
    # 1 / (c2 * step_size), folded, overflows float16 at small lr: nothing moved, or NaN.
    rng = np.random.default_rng(16)
    start = (0.5 * rng.standard_normal(64)).astype(np.float16)
    grads = [(rng.standard_normal(64) * 800 * (rng.random(64) < 0.8)).astype(np.float16)
             for _ in range(12)]  # fmt: skip
    params = {"w": start.copy()}
    ours = Adam(lr=lr, eps=1e-4)
    for grad in grads:
        ours.update(params, {"w": grad})
    want = _torch_run("adam", {"lr": lr, "beta1": 0.9, "beta2": 0.999, "eps": 1e-4}, start, grads)
    assert params["w"].dtype == np.float16 and np.all(np.isfinite(params["w"]))
    np.testing.assert_allclose(params["w"], want, rtol=2e-3, atol=2e-3 * lr)
    assert np.any(params["w"] != start)


@pytest.mark.parametrize(("dtype", "lr"), [(np.float32, 1e-39), (np.float32, 1e-44), (np.float64, 1e-310)])
def test_adam_with_a_learning_rate_below_the_dtypes_range_follows_torch(
    dtype: Any, lr: float
) -> None:
    # Folded, 1 / (c2 * step_size) overflows the dtype, and an entry whose gradients were
    # all 0 became inf * 0 = NaN: unfolded, as PyTorch, it stays where it is.
    rng = np.random.default_rng(18)
    start = np.zeros(40, dtype)  # zeros: the tiny moves are not lost to rounding
    grads = [(rng.standard_normal(40) * (np.arange(40) % 4 != 0)).astype(dtype) for _ in range(3)]
    params = {"w": start.copy()}
    ours = Adam(lr=lr)
    for grad in grads:
        ours.update(params, {"w": grad})
    want = _torch_run("adam", {"lr": lr, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8}, start, grads)
    assert not np.isnan(params["w"]).any()
    # The moves are subnormal, with fewer digits: a few of their units apart.
    tiny = np.finfo(dtype).smallest_subnormal
    np.testing.assert_allclose(params["w"], want, rtol=1e-5, atol=64 * tiny)
    assert np.any(params["w"] != 0) and not np.any(params["w"][::4])


def test_adam_float32_with_tiny_gradients_follows_torch_over_many_steps() -> None:
    # Gradients of 1e-9 keep the first moment far above the subnormal flush bound, over
    # enough steps for several flushes (and for one with a bound as high as 1e-8).
    rng = np.random.default_rng(17)
    start = rng.standard_normal(50).astype(np.float32)
    grads = [(1e-9 * rng.standard_normal(50)).astype(np.float32) for _ in range(700)]
    params = {"w": start.copy()}
    ours = Adam(lr=1e-3)
    for grad in grads:
        ours.update(params, {"w": grad})
    want = _torch_run("adam", {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8}, start, grads)
    np.testing.assert_allclose(params["w"], want, rtol=1e-5, atol=1e-7)


def test_adam_with_beta1_zero_follows_torch() -> None:
    rng = np.random.default_rng(18)
    start = rng.standard_normal(20)
    grads = [rng.standard_normal(20) for _ in range(5)]
    params = {"w": start.copy()}
    ours = Adam(lr=0.1, beta1=0.0)
    for grad in grads:
        ours.update(params, {"w": grad})
    want = _torch_run("adam", {"lr": 0.1, "beta1": 0.0, "beta2": 0.999, "eps": 1e-8}, start, grads)
    assert_close(params["w"], want)


@pytest.mark.parametrize("name", list(CASES))
def test_integer_gradients_step_as_their_float_values(name: str) -> None:
    make, _, hyper = CASES[name]
    grad = np.array([-128, 3, 127, 0], dtype=np.int8)
    as_int, as_float = {"w": np.ones(4)}, {"w": np.ones(4)}
    make(**hyper).update(as_int, {"w": grad})
    make(**hyper).update(as_float, {"w": grad.astype(np.float64)})
    np.testing.assert_array_equal(as_int["w"], as_float["w"])


def test_a_numpy_scalar_is_not_a_parameter_and_nothing_moves() -> None:
    params = {"W": np.ones(2), "s": np.float64(1.0)}
    with pytest.raises(TypeError, match="parameter 's' must be a float16/32/64 array"):
        Adam().update(params, {"W": np.ones(2), "s": np.float64(1.0)})
    np.testing.assert_array_equal(params["W"], np.ones(2))


@pytest.mark.parametrize("name", list(CASES))
def test_f_ordered_and_overlapping_arrays_step_as_plain_copies(name: str) -> None:
    make, _, hyper = CASES[name]
    rng = np.random.default_rng(19)
    base = rng.standard_normal((5, 4))
    fortran = {"W": np.asfortranarray(base.copy())}
    plain = {"W": base.copy()}
    grad = rng.standard_normal((5, 4))
    buffer = rng.standard_normal(1001)  # longer than a kernel's vector: stores land before loads
    shifted = {"w": buffer[1:]}  # the gradient overlaps the parameter, one element apart
    shifted_grad = buffer[:-1]
    shifted_plain, shifted_grad_plain = {"w": buffer[1:].copy()}, buffer[:-1].copy()
    a, b = make(**hyper), make(**hyper)
    for _ in range(3):
        a.update(fortran, {"W": grad})
        b.update(plain, {"W": grad})
    np.testing.assert_array_equal(fortran["W"], plain["W"])
    make(**hyper).update(shifted, {"w": shifted_grad})
    make(**hyper).update(shifted_plain, {"w": shifted_grad_plain})
    np.testing.assert_array_equal(shifted["w"], shifted_plain["w"])


def test_the_learning_rate_is_checked_whenever_it_is_set() -> None:
    optimizer = Adam()
    with pytest.raises(ValueError, match="Adam: lr must be >= 0"):
        optimizer.lr = -0.1
    with pytest.raises(ValueError, match="Adam: lr must be finite"):
        optimizer.lr = float("nan")
    optimizer.lr = 5e-324  # subnormal: the folded scale underflows to 0, not a ZeroDivisionError
    params = {"w": np.ones(3)}
    optimizer.update(params, {"w": np.ones(3)})
    np.testing.assert_array_equal(params["w"], np.ones(3))


def test_load_state_dict_replaces_the_state_it_had() -> None:
    params = {"a": np.ones(2), "b": np.ones(3)}
    optimizer = Momentum(lr=0.1)
    optimizer.update(params, {"a": np.ones(2), "b": np.ones(3)})
    optimizer.load_state_dict({"v/a": np.full(2, 5.0)})
    assert set(optimizer.v) == {"a"}  # b's velocity is gone, not kept beside the loaded one
    np.testing.assert_array_equal(optimizer.v["a"], np.full(2, 5.0))


def test_a_parameter_whose_dtype_changes_gets_fresh_scratch() -> None:
    optimizer = AdaGrad(lr=0.1)
    optimizer.update({"w": np.ones(3)}, {"w": np.ones(3)})
    params = {"w": np.ones(3, np.float32)}
    expected = {"w": np.ones(3, np.float32)}
    optimizer.h = {}  # new state for the float32 parameter; the scratch array is stale
    optimizer.update(params, {"w": np.full(3, 0.5, np.float32)})
    AdaGrad(lr=0.1).update(expected, {"w": np.full(3, 0.5, np.float32)})
    np.testing.assert_array_equal(params["w"], expected["w"])


def test_a_gradient_that_is_none_or_bools_and_a_state_that_is_no_dict_are_named() -> None:
    params = {"W": np.ones(3)}
    with pytest.raises(TypeError, match="gradient 'W' is None, not an array"):
        SGD(lr=1.0).update(params, {"W": None})
    with pytest.raises(TypeError, match="gradient 'W' is an array of bools"):
        SGD(lr=1.0).update(params, {"W": np.array([True, False, True])})  # a mask, by mistake
    np.testing.assert_array_equal(params["W"], np.ones(3))  # refused before any step
    with pytest.raises(TypeError, match="load_state_dict takes a dict of arrays by name, got list"):
        Momentum().load_state_dict([("v/W", np.zeros(3))])  # type: ignore[arg-type]


@pytest.mark.parametrize(("make", "entry"), [(lambda: Adam(), "v/W"), (lambda: AdaGrad(), "h/W"),
                                             (lambda: RMSprop(), "h/W")])  # fmt: skip
@pytest.mark.parametrize("bad", [-1.0, float("nan")])
def test_a_loaded_sum_of_squares_below_zero_is_refused(make: Any, entry: str, bad: float) -> None:
    # The next step takes its square root: every parameter turned NaN, Adam's without a word.
    optimizer = make()
    state = {name: np.zeros(3) for name in (f"{slot}/W" for slot in optimizer.slots)}
    if isinstance(optimizer, Adam):
        state["step/W"] = np.array(1)
    state[entry] = np.array([0.5, bad, 0.5])
    with pytest.raises(ValueError, match=f"'{entry}' holds a negative value or NaN"):
        optimizer.load_state_dict(state)
    state[entry] = np.array([0.5, 0.0, 0.5])  # a momentum may be negative; a square not
    optimizer.load_state_dict(state)
