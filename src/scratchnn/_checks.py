"""The checks of constructor arguments that layers and optimisers share, of
class-index labels, which the losses and ``Sequential.accuracy`` share, and the strict
JSON reading of every file a user loads (:func:`strict_json`).

Each argument check returns the value as a plain Python ``int`` or
``float``, or raises ``TypeError`` (not a number of that kind: a bool, a
string, a float where a count belongs) or ``ValueError`` (a number outside
its range), naming the class and the argument: ``Dropout: p must be a real
number, got '0.5'``. For labels, :func:`labels_out_of_range` says whether
any lies outside the classes and :func:`label_error` makes the error to raise.
"""

from __future__ import annotations

import json
import math
import numbers
from collections import Counter
from typing import Any

import numpy as np
from numpy.typing import DTypeLike

from scratchnn.backend import FLOAT_DTYPES


def real(who: str, name: str, value: object) -> float:
    """``value`` as a finite float; bools, strings and the like raise ``TypeError``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{who}: {name} must be a real number, got {value!r}")
    try:
        result = float(value)
    except OverflowError:  # an int or a Fraction beyond the largest float
        raise ValueError(f"{who}: {name} must be finite, got a number beyond the float range") from None
    if not math.isfinite(result):
        raise ValueError(f"{who}: {name} must be finite, got {result}")
    return result


def nonnegative(who: str, name: str, value: object) -> float:
    """A finite float >= 0."""
    result = real(who, name, value)
    if result < 0.0:
        raise ValueError(f"{who}: {name} must be >= 0, got {result}")
    return result


def positive(who: str, name: str, value: object) -> float:
    """A finite float > 0."""
    result = real(who, name, value)
    if result <= 0.0:
        raise ValueError(f"{who}: {name} must be positive, got {result}")
    return result


def fraction(who: str, name: str, value: object, *, one: bool = False) -> float:
    """A float in [0, 1), or [0, 1] with ``one=True``."""
    result = real(who, name, value)
    if not (0.0 <= result < 1.0 or (one and result == 1.0)):
        raise ValueError(f"{who}: {name} must be in [0, 1{']' if one else ')'}, got {result}")
    return result


def real_or_nan(who: str, name: str, value: object) -> float:
    """``value`` as a float, NaN and infinities included (a diverged run's metrics);
    bools, strings and the like raise ``TypeError``; a 0-d array counts as its number."""
    if isinstance(value, np.ndarray) and value.ndim == 0 and value.dtype.kind in "iuf":
        value = value.item()
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{who}: {name} must be a real number, got {value!r}")
    try:
        return float(value)
    except OverflowError:
        raise ValueError(f"{who}: {name} is a number beyond the float range") from None


# The largest index NumPy holds (sys.maxsize, as a "no limit" is often written); past it
# NumPy's index arithmetic overflows.
MAX_COUNT = 2**63 - 1


def count(who: str, name: str, value: object, minimum: int = 1) -> int:
    """An integer >= ``minimum`` (and at most ``MAX_COUNT``); a float, even 3.0, raises
    ``TypeError``, as in PyTorch."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{who}: {name} must be an int, got {value!r}")
    result = int(value)
    if result < minimum:
        raise ValueError(f"{who}: {name} must be >= {minimum}, got {result}")
    if result > MAX_COUNT:
        raise ValueError(f"{who}: {name} is too large: {result}")
    return result


def given_generator(who: str, rng: object, *, or_none: bool = False) -> None:
    """``TypeError`` unless ``rng`` is a ``numpy.random.Generator`` (or None, where
    ``or_none``): the global NumPy random state is never used, and a seed would hide
    that the caller's generator does not move."""
    if isinstance(rng, np.random.Generator) or (or_none and rng is None):
        return
    raise TypeError(
        f"{who}: rng must be a numpy.random.Generator (np.random.default_rng(seed))"
        f"{' or None' if or_none else ''}, got {type(rng).__name__}"
    )


def generator(who: str, rng: object) -> np.random.Generator:
    """``rng`` itself, or a new generator from a seed; ``TypeError`` for anything else."""
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, numbers.Integral) and not isinstance(rng, (bool, np.bool_)):
        return np.random.default_rng(int(rng))
    raise TypeError(f"{who}: rng must be a numpy.random.Generator or a seed, got {rng!r}")


def labels_out_of_range(t: Any, n_classes: int) -> bool:
    """Whether any integer label lies outside ``[0, n_classes)``."""
    if t.dtype.kind == "i" and n_classes > np.iinfo(t.dtype).max + 1:
        # Every non-negative label of this type is a class: only the sign can be wrong.
        return bool(t.min() < 0)
    # Viewed as unsigned, a negative label becomes at least 2**(bits-1) (-1 as int8 is 255,
    # -128 is 128), past the last class here: one max checks both ends.
    unsigned = t if t.dtype.kind == "u" else t.view(t.dtype.str.replace("i", "u"))
    # .max(), not np.maximum.reduce: CuPy has reduce for add and multiply only.
    return bool(unsigned.max() >= n_classes)


def label_error(name: str, t: Any, n_classes: int) -> ValueError:
    """The error for labels outside ``[0, n_classes)``, naming the values found."""
    return ValueError(
        f"{name}: labels must lie in [0, {n_classes}), got values from {t.min()} to {t.max()}"
    )


def float_dtype(who: str, dtype: DTypeLike) -> np.dtype[Any]:
    """``dtype`` as float16, float32 or float64; ``TypeError`` for anything else, None
    included (NumPy reads None as float64, which would pass unnoticed)."""
    try:
        result = np.dtype(dtype) if dtype is not None else None
    except TypeError:
        result = None
    if result is None or result.newbyteorder("=") not in FLOAT_DTYPES:
        raise TypeError(f"{who}: dtype must be float16, float32 or float64, got {dtype!r}")
    return result.newbyteorder("=")



def flag(who: str, name: str, value: object) -> bool:
    """A bool (NumPy's too); a string such as "no" would otherwise count as True."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{who}: {name} must be True or False, got {value!r}")
    return bool(value)


def strict_json(text: str) -> Any:
    """``json.loads(text)``, refusing what two readers could read differently: a repeated key
    in an object (one reader keeps the first, another the last), a lone surrogate escape
    (``"\\ud800"``: no Unicode text, and no UTF-8 writer could write it back), and
    ``NaN``/``Infinity``, which are not JSON. Raises ``ValueError`` (and ``RecursionError``
    for absurdly nested text, as ``json.loads`` does)."""
    return json.loads(text, object_pairs_hook=_no_repeated_keys, parse_constant=_no_constant)


def _no_repeated_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):  # (counted in one pass: a hostile file has many keys)
        repeated = sorted(key for key, n in Counter(key for key, _ in pairs).items() if n > 1)
        shown = repeated[:5] + (["..."] if len(repeated) > 5 else [])
        raise ValueError(f"repeated key(s) {shown}")
    for key, value in pairs:
        for text in (key, value) if isinstance(value, str) else (key,):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                shown_text = repr(text) if len(text) <= 60 else repr(text[:60]) + "..."
                raise ValueError(f"{shown_text} holds a lone surrogate escape") from None
    return result


def _no_constant(value: str) -> Any:
    raise ValueError(f"{value} is not allowed in JSON")
