"""Argument checks shared across fmjax: each raises with the argument's name and what is allowed.

The checks of named options (``check_choice``, ``check_real``, ``check_int``, ``check_bool``) raise
``fmjax._errors.ArgumentError`` (a ValueError) or ``ArgumentTypeError`` (a TypeError), whose messages
name the argument as the API does and, through ``error.named(naming)``, as a caller says it (the CLI:
its flags). This module imports nothing of fmjax but those errors.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fmjax._errors import (  # noqa: F401  (re-exported: the checks' errors)
    ArgumentError,
    ArgumentTypeError,
    NamedMessage,
    NamedText,
    from_template,
    message_of,
    message_template,
)


def check_choice(name: str, value: Any, allowed: Iterable[str]) -> str:
    """Return ``value`` if it is one of ``allowed``; otherwise raise a ValueError listing them."""
    allowed = sorted(allowed)
    if not isinstance(value, str) or value not in allowed:
        names = ", ".join(map(repr, allowed))
        raise ArgumentError(lambda n: f"{n(name)} must be one of {names}; got {value!r}")
    return value


def lookup(name: str, value: Any, registry: Mapping[str, Any]) -> Any:
    """Return ``registry[value]``, raising a ValueError that lists the registry's keys."""
    return registry[check_choice(name, value, registry)]


def _scalar(value: Any) -> Any:
    """``value`` as a Python/NumPy scalar if it is a number or a concrete 0-d array, else ``value``.

    NumPy scalars (np.float32, np.int64, np.bool_) and 0-d NumPy or JAX arrays are unwrapped to Python
    numbers, floats through their shortest decimal form (np.float32(0.1) is 0.1); traced values are
    returned as they are (configuration must be concrete).
    """
    if isinstance(value, jax.core.Tracer):
        return value
    if isinstance(value, np.generic | np.ndarray | jax.Array) and np.ndim(value) == 0:
        try:
            array = np.asarray(value)
        except TypeError:  # e.g. a typed PRNG key: not a number
            return value
        if array.dtype.kind == "f":  # np.float32(0.1) is 0.1, not 0.10000000149011612
            return float(str(array[()]))
        return array.item()
    return value


def describe(value: Any) -> str:
    """A short description of ``value`` for an error message (its type and value, or shape and dtype)."""
    if isinstance(value, jax.core.Tracer):
        return (
            f"a traced value of shape {value.shape} (configuration must be concrete, not computed under jit)"
        )
    if isinstance(value, tuple | list | dict):
        return f"a {type(value).__name__} of {len(value)} items"
    if isinstance(value, np.generic):
        return f"numpy.{type(value).__name__} {value}"
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return f"an array of shape {tuple(value.shape)} and dtype {value.dtype}"
    return f"{type(value).__name__} {value!r}"


def _is_bool(value: Any) -> bool:
    if isinstance(value, bool | np.bool_):
        return True
    return hasattr(value, "dtype") and jnp.dtype(value.dtype) == jnp.bool_


def check_real(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
) -> float:
    """Return ``value`` as a float after checking it is a finite real number in the given range.

    Accepted: int, float, NumPy integer/floating scalars and concrete 0-d integer/floating arrays.
    Refused with a TypeError: bools, strings, complex numbers, arrays with more than one element,
    traced values. NaN, inf and values outside the range raise a ValueError naming ``name``.
    """
    plain = _scalar(value)
    if _is_bool(value) or isinstance(plain, bool) or not isinstance(plain, int | float):
        raise ArgumentTypeError(lambda n: f"{n(name)} must be a real number; got {describe(value)}")
    value = float(plain)
    if not math.isfinite(value):
        raise ArgumentError(lambda n: f"{n(name)} must be finite; got {value!r}")
    if low is not None and (value < low or (value == low and not low_inclusive)):
        op = ">=" if low_inclusive else ">"
        raise ArgumentError(lambda n: f"{n(name)} must be {op} {low}; got {value!r}")
    if high is not None and (value > high or (value == high and not high_inclusive)):
        op = "<=" if high_inclusive else "<"
        raise ArgumentError(lambda n: f"{n(name)} must be {op} {high}; got {value!r}")
    return value


def check_int(name: str, value: Any, *, low: int | None = None, high: int | None = None) -> int:
    """Return ``value`` as an int after checking it is an integer in [low, high].

    Accepted: int, NumPy integer scalars and concrete 0-d integer arrays. Refused with a TypeError:
    bools, floats (even integral ones), strings, traced values.
    """
    plain = _scalar(value)
    if _is_bool(value) or isinstance(plain, bool) or not isinstance(plain, int):
        raise ArgumentTypeError(lambda n: f"{n(name)} must be an int; got {describe(value)}")
    if low is not None and plain < low:
        raise ArgumentError(lambda n: f"{n(name)} must be >= {low}; got {plain!r}")
    if high is not None and plain > high:
        raise ArgumentError(lambda n: f"{n(name)} must be <= {high}; got {plain!r}")
    return int(plain)


def check_bool(name: str, value: Any) -> bool:
    """Return ``value`` as a bool after checking it is a bool, np.bool_ or a concrete 0-d bool array.

    Anything else (ints, strings such as "False", which would be truthy) raises a TypeError.
    """
    plain = _scalar(value)
    if not isinstance(plain, bool):
        raise ArgumentTypeError(lambda n: f"{n(name)} must be True or False; got {describe(value)}")
    return plain


FULL_PRECISION = ("float32", "float64")
HALF_PRECISION = ("bfloat16", "float16")


def check_batch(name: str, x: Any, *, half_precision: bool = False) -> None:
    """Check that ``x`` is a floating array of shape [batch, *dims] with at least one data axis.

    An empty batch (batch = 0) or empty samples (prod(dims) = 0) raise a ValueError: a mean over no
    samples is NaN, and a training step would advance on it.

    Accepted dtypes are float32 and float64, and with ``half_precision=True`` also bfloat16 and float16
    (for callers that upcast the batch themselves, e.g. a training step). Integer and other dtypes
    raise a TypeError naming ``name`` and listing the accepted dtypes.
    """
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{name} must be an array of shape [batch, *dims]; got {type(x).__name__}")
    if len(x.shape) < 2:
        raise ValueError(f"{name} must have shape [batch, *dims] (rank >= 2); got shape {x.shape}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} must hold at least one sample (batch >= 1); got shape {x.shape}")
    if math.prod(x.shape[1:]) == 0:
        raise ValueError(f"{name} must have at least one value per sample; got shape {x.shape}")
    accepted = FULL_PRECISION + (HALF_PRECISION if half_precision else ())
    if jnp.dtype(x.dtype).name not in accepted:
        raise TypeError(
            f"{name} must be a {', '.join(accepted[:-1])} or {accepted[-1]} array; got dtype {x.dtype}. "
            f"Convert it first, e.g. {name}.astype(jnp.float32) (integer data: scale it as the model expects)"
        )


def check_finite(name: str, x: Any) -> None:
    """Raise a ValueError if the concrete array ``x`` holds NaN or inf (tracers are left alone)."""
    try:
        bad = int(jnp.size(x) - jnp.sum(jnp.isfinite(x)))
    except jax.errors.ConcretizationTypeError:  # traced: checked where the values exist
        return
    if bad:
        raise ValueError(f"{name} must be finite; it holds {bad} NaN or inf value(s)")


def check_pair(x0: Any, x1: Any, *, half_precision: bool = False) -> None:
    """Check that ``x0`` and ``x1`` are batches of the same shape (dtypes as ``check_batch`` accepts)."""
    check_batch("x0", x0, half_precision=half_precision)
    check_batch("x1", x1, half_precision=half_precision)
    if x0.shape != x1.shape:
        raise ValueError(f"x0 and x1 must have the same shape; got {x0.shape} and {x1.shape}")


def check_unit_interval(name: str, t: Any) -> None:
    """Raise a ValueError if the concrete times ``t`` leave [0, 1] or are not finite (tracers pass)."""
    t = jnp.asarray(t)
    try:
        inside = bool(jnp.all((t >= 0) & (t <= 1)))
    except jax.errors.ConcretizationTypeError:  # traced: checked where the values exist
        return
    if not inside:
        raise ValueError(
            f"{name} must lie in [0, 1]; got values from {float(jnp.min(t))} to {float(jnp.max(t))}"
        )


def check_key(name: str, key: Any) -> None:
    """Check that ``key`` is one PRNG key: a typed key of shape () (``jax.random.key(0)``) or a raw
    uint32 key of shape [2] (``jax.random.PRNGKey(0)``). Ints, other arrays and batches of keys raise
    a TypeError naming ``name``; works on traced keys (only shape and dtype are read)."""
    how = f"{name} must be one PRNG key, e.g. jax.random.key(0)"
    if not hasattr(key, "shape") or not hasattr(key, "dtype"):
        raise TypeError(f"{how}; got {describe(key)}")
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        if key.shape != ():
            raise TypeError(f"{how}; got a batch of keys of shape {key.shape} (index or split it first)")
        return
    if jnp.dtype(key.dtype) != jnp.uint32 or len(key.shape) != 1:
        raise TypeError(f"{how}; got {describe(key)}")


def _signature_text(params: tuple[str, ...]) -> str:
    return ", ".join(params)


def check_callable(name: str, fn: Any, params: tuple[str, ...], *, hint: str = "") -> None:
    """Check that ``fn`` is callable as ``fn(*params)`` (positionally), naming ``name`` if not.

    Signatures Python cannot inspect (some builtins) pass; the call itself is left to fail.
    """
    call = f"{name}({_signature_text(params)})"
    if not callable(fn):
        raise TypeError(f"{name} must be a function called as {call}; got {describe(fn)}")
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return
    try:
        signature.bind(*params)
    except TypeError:
        raise TypeError(f"{name} must be callable as {call}; its signature is {signature}{hint}") from None


def check_output(call: str, out: Any, shape: tuple[int, ...], what: str) -> None:
    """Check that a user callable's output is one real floating array of ``shape``.

    ``call`` names the callable as the user wrote it (e.g. ``"velocity(t, x)"``); ``what`` says what
    the expected shape is (e.g. ``"[batch, *dims], the shape of x"``). Raises a TypeError for tuples,
    Python numbers and non-floating dtypes (ints, bools, complex), a ValueError for a wrong shape.
    Shapes are static, so under jit this runs once, at trace time.
    """
    if not hasattr(out, "shape") or not hasattr(out, "dtype") or isinstance(out, np.generic):
        raise TypeError(f"{call} must return one array of shape {what} = {shape}; got {describe(out)}")
    if not jnp.issubdtype(out.dtype, jnp.floating):
        raise TypeError(f"{call} must return a real floating-point array; got dtype {out.dtype}")
    if tuple(out.shape) != tuple(shape):
        raise ValueError(f"{call} must return shape {what} = {tuple(shape)}; got shape {tuple(out.shape)}")


def is_traced(*values: Any) -> bool:
    """Whether any leaf of ``values`` is a tracer (inside jit, vmap, grad...): values are unknown."""
    return any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(values))
