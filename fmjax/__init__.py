"""fmjax: flow matching in JAX.

Probability paths (``fmjax.paths``), manifolds (``fmjax.manifolds``), minibatch couplings
(``fmjax.couplings``), the pure CFM and [SF]²M losses (``fmjax.losses``), a jitted training step
(``fmjax.training``), diffrax ODE and SDE sampling (``fmjax.sampling``, ``fmjax.sde``), classifier-free
guidance (``fmjax.guidance``), log-likelihoods (``fmjax.likelihood``), metrics (``fmjax.metrics``),
reflow (``fmjax.reflow``), checkpoints (``fmjax.checkpoint``), data (``fmjax.data``), Flax models
(``fmjax.models``), training runs (``fmjax.runs``) and the ``fmjax`` command (``fmjax.cli``).

The names below and the submodules are imported on first use (``fmjax.sample`` imports
``fmjax.sampling`` and diffrax then; ``fmjax.paths`` imports the module), so ``import fmjax`` and the
``fmjax`` command start without loading every dependency.

>>> import fmjax
>>> fmjax.paths.CondOT(sigma_min=0.1).sigma_min
0.1
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
from typing import Any

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "Checkpointer": "fmjax.checkpoint",
    "GuidedVelocity": "fmjax.guidance",
    "guided_velocity": "fmjax.guidance",
    "Coupling": "fmjax.couplings",
    "exact": "fmjax.couplings",
    "independent": "fmjax.couplings",
    "schrodinger_bridge": "fmjax.couplings",
    "sinkhorn": "fmjax.couplings",
    "LikelihoodResult": "fmjax.likelihood",
    "bits_per_dim": "fmjax.likelihood",
    "log_likelihood": "fmjax.likelihood",
    "LossAux": "fmjax.losses",
    "SF2MAux": "fmjax.losses",
    "cfm_loss": "fmjax.losses",
    "sf2m_loss": "fmjax.losses",
    "two_networks": "fmjax.losses",
    "crossing_fraction": "fmjax.metrics",
    "normalized_path_energy": "fmjax.metrics",
    "path_energy": "fmjax.metrics",
    "straightness": "fmjax.metrics",
    "wasserstein2": "fmjax.metrics",
    "frechet_distance": "fmjax.metrics",
    "digits_frechet_distance": "fmjax.digits_classifier",
    "AffinePath": "fmjax.paths",
    "CondOT": "fmjax.paths",
    "Geodesic": "fmjax.paths",
    "Linear": "fmjax.paths",
    "PathSample": "fmjax.paths",
    "SchrodingerBridge": "fmjax.paths",
    "VariancePreserving": "fmjax.paths",
    "VPDiffusion": "fmjax.paths",
    "ReflowPairs": "fmjax.reflow",
    "reflow_pairs": "fmjax.reflow",
    "SampleResult": "fmjax.sampling",
    "Trajectory": "fmjax.sampling",
    "as_velocity": "fmjax.sampling",
    "sample": "fmjax.sampling",
    "sample_sde": "fmjax.sde",
    "sf2m_drift": "fmjax.sde",
    "sf2m_velocity": "fmjax.sde",
    "TrainState": "fmjax.training",
    "logit_normal": "fmjax.training",
    "make_train_step": "fmjax.training",
    "uniform": "fmjax.training",
}

__all__ = sorted(_EXPORTS)


def _submodules() -> list[str]:
    """The public submodules and subpackages of fmjax (``paths``, ``runs``, ...)."""
    return [module.name for module in pkgutil.iter_modules(__path__) if not module.name.startswith("_")]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is not None:
        value = getattr(importlib.import_module(module), name)
        globals()[name] = value  # later lookups skip __getattr__
        return value
    if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f"{__name__}.{name}")  # binds fmjax.<name> as it imports
    raise AttributeError(f"module 'fmjax' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS) | set(_submodules()))
