"""Flow-matching losses, as pure functions of ``(apply_fn, params, key, x0, x1)``.

    L(theta) = E_{t, (x0, x1) ~ pi, eps} w(t) || v_theta(t, x_t, c) - u_t(x_t | x0, x1) ||^2

with (x0, x1) drawn from a coupling pi of the two batches, t from a time sampler and (x_t, u_t) from a
probability path; c is an optional condition paired with x1, and w(t) an optional time weighting. The
squared error is averaged over every data dimension, then over the batch (or kept per sample).

- ``cfm_loss`` (``fmjax.losses.cfm``): conditional flow matching; the model may predict x1 or the
  source point instead of the velocity (``target``);
- ``sf2m_loss`` (``fmjax.losses.sf2m``): score and flow matching, [SF]²M, for paths with noise;
- what they share (``fmjax.losses.common``): the checks of their arguments, the coupling of the batch,
  the condition dropout of classifier-free guidance (``drop_cond``), the time draw.

A new loss is a module here: check its arguments with ``common.check_arguments`` at its public entry,
couple and draw times with ``common.couple``, and compute its terms from the ``PathSample``.
"""

from fmjax.losses.cfm import TARGETS, LossAux, cfm_loss
from fmjax.losses.common import REDUCTIONS, class_labels, drop_cond
from fmjax.losses.sf2m import SF2MAux, check_flow_and_score, sf2m_loss, two_networks

__all__ = [
    "LossAux",
    "SF2MAux",
    "cfm_loss",
    "sf2m_loss",
    "two_networks",
    "check_flow_and_score",
    "class_labels",
    "drop_cond",
    "REDUCTIONS",
    "TARGETS",
]
