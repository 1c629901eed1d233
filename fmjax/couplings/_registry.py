"""Couplings by name: the factories the CLI's ``--coupling`` and ``make_coupling`` accept."""

from __future__ import annotations

from fmjax._checks import lookup
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
