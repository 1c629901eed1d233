"""Couplings by name: the factories that ``make_coupling``, ``resolve_coupling`` and ``--coupling`` accept."""

from __future__ import annotations

from typing import Any

from fmjax._checks import describe, lookup
from fmjax.couplings._base import Coupling
from fmjax.couplings._exact import exact
from fmjax.couplings._independent import independent
from fmjax.couplings._sinkhorn import schrodinger_bridge, sinkhorn

COUPLINGS = {
    "independent": independent,
    "exact": exact,
    "sinkhorn": sinkhorn,
    "sb": schrodinger_bridge,
}
"""Coupling factories by name, as accepted by ``make_coupling`` and the CLI's ``--coupling``."""


def make_coupling(name: str, **kwargs) -> Coupling:
    """Build a coupling by name (see ``COUPLINGS``) with the factory's keyword arguments."""
    return lookup("coupling", name, COUPLINGS)(**kwargs)


def resolve_coupling(coupling: Any, name: str = "coupling") -> Coupling:
    """A ``Coupling`` from a coupling or a name in ``COUPLINGS`` (e.g. "exact").

    A name builds the coupling with its factory's defaults (``make_coupling(name)``). A factory that
    was not called, or anything else, raises a TypeError naming ``name`` and how to build one.
    """
    if isinstance(coupling, str):
        return make_coupling(coupling)
    if isinstance(coupling, Coupling):
        return coupling
    names = ", ".join(map(repr, sorted(COUPLINGS)))
    if callable(coupling) and not isinstance(coupling, type) and coupling in COUPLINGS.values():
        raise TypeError(f"{name} must be a coupling, not its factory: call it, e.g. {coupling.__name__}()")
    raise TypeError(
        f"{name} must be an fmjax coupling (e.g. fmjax.independent(), fmjax.exact(), "
        f"fmjax.sinkhorn(epsilon=0.05)) or one of the names {names}; got {describe(coupling)}"
    )
