"""Argument checks shared across fmjax: each raises with the argument's name and what is allowed."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp


def check_choice(name: str, value: Any, allowed: Iterable[str]) -> str:
    """Return ``value`` if it is one of ``allowed``; otherwise raise a ValueError listing them."""
    allowed = sorted(allowed)
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")
    return value


def lookup(name: str, value: Any, registry: Mapping[str, Any]) -> Any:
    """Return ``registry[value]``, raising a ValueError that lists the registry's keys."""
    return registry[check_choice(name, value, registry)]


def check_real(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
) -> float:
    """Return ``value`` as a float after checking it is a finite real number in the given range."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a real number; got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite; got {value!r}")
    if low is not None and (value < low or (value == low and not low_inclusive)):
        op = ">=" if low_inclusive else ">"
        raise ValueError(f"{name} must be {op} {low}; got {value!r}")
    if high is not None and (value > high or (value == high and not high_inclusive)):
        op = "<=" if high_inclusive else "<"
        raise ValueError(f"{name} must be {op} {high}; got {value!r}")
    return value


def check_int(name: str, value: Any, *, low: int | None = None) -> int:
    """Return ``value`` after checking it is an int (not a bool) no smaller than ``low``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int; got {type(value).__name__} {value!r}")
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}; got {value!r}")
    return value


FULL_PRECISION = ("float32", "float64")
HALF_PRECISION = ("bfloat16", "float16")


def check_batch(name: str, x: Any, *, half_precision: bool = False) -> None:
    """Check that ``x`` is a floating array of shape [batch, *dims] with at least one data axis.

    Accepted dtypes are float32 and float64, and with ``half_precision=True`` also bfloat16 and float16
    (for callers that upcast the batch themselves, e.g. a training step). Integer and other dtypes
    raise a TypeError naming ``name`` and listing the accepted dtypes.
    """
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{name} must be an array of shape [batch, *dims]; got {type(x).__name__}")
    if len(x.shape) < 2:
        raise ValueError(f"{name} must have shape [batch, *dims] (rank >= 2); got shape {x.shape}")
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
