"""fmjax: flow matching in JAX.

Probability paths (``fmjax.paths``), minibatch couplings (``fmjax.couplings``), the pure CFM loss
(``fmjax.losses``), a jitted training step (``fmjax.training``), diffrax sampling
(``fmjax.sampling``), log-likelihoods (``fmjax.likelihood``), metrics, checkpoints, data and Flax models.
"""

from fmjax.checkpoint import Checkpointer
from fmjax.couplings import Coupling, exact, independent, schrodinger_bridge, sinkhorn
from fmjax.likelihood import LikelihoodResult, bits_per_dim, log_likelihood
from fmjax.losses import LossAux, cfm_loss
from fmjax.metrics import normalized_path_energy, path_energy, wasserstein2
from fmjax.paths import (
    AffinePath,
    CondOT,
    Linear,
    PathSample,
    SchrodingerBridge,
    VariancePreserving,
    VPDiffusion,
)
from fmjax.sampling import SampleResult, Trajectory, as_velocity, sample
from fmjax.training import TrainState, logit_normal, make_train_step, uniform

__version__ = "0.1.0"

__all__ = [
    "AffinePath",
    "LikelihoodResult",
    "bits_per_dim",
    "exact",
    "log_likelihood",
    "schrodinger_bridge",
    "sinkhorn",
    "Checkpointer",
    "CondOT",
    "Coupling",
    "Linear",
    "LossAux",
    "PathSample",
    "SampleResult",
    "SchrodingerBridge",
    "Trajectory",
    "TrainState",
    "VPDiffusion",
    "VariancePreserving",
    "as_velocity",
    "cfm_loss",
    "independent",
    "logit_normal",
    "make_train_step",
    "normalized_path_energy",
    "path_energy",
    "sample",
    "uniform",
    "wasserstein2",
]
