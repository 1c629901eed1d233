"""fmjax: flow matching in JAX.

Probability paths (``fmjax.paths``), minibatch couplings (``fmjax.couplings``), the pure CFM and
[SF]²M losses (``fmjax.losses``), a jitted training step (``fmjax.training``), diffrax ODE and SDE
sampling (``fmjax.sampling``, ``fmjax.sde``), classifier-free guidance (``fmjax.guidance``),
log-likelihoods (``fmjax.likelihood``), metrics, reflow, checkpoints, data and Flax models.

The names below are imported on first use (``fmjax.sample`` imports ``fmjax.sampling`` and diffrax
then), so ``import fmjax`` and the ``fmjax`` command start without loading every dependency.
"""

from __future__ import annotations

import importlib
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
    "digits_frechet_distance": "fmjax.metrics",
    "AffinePath": "fmjax.paths",
    "CondOT": "fmjax.paths",
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


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'fmjax' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
