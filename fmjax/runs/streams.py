"""The random streams of a run: one key per purpose, derived from the run's seed.

Every random draw of a run comes from one of these streams, so a draw of one purpose never shifts
another's (more evaluation samples leave the training data alone) and a resumed run draws what an
uninterrupted one drew. The numbers are part of every stored run's results: never renumber a stream;
a new purpose takes a new number.

====================  ==========================================================================
stream                what it draws
====================  ==========================================================================
``init``              the training state's key (the model's initial weights come from the seed)
``data``              each step's batch: ``fold_in(stream_key(seed, "data"), step)``
``eval``              the final evaluation's source, target and floor samples
``generate``          ``fmjax sample``'s source points (from ``--seed``, not the run's)
``nll``               ``fmjax nll``'s target points and probes (2D runs)
``reflow``            the source points a teacher is solved from for reflow pairs
``few_step``          the source of an image run's few-step Fréchet distances
``bits_per_dim``      an image run's dequantisation and Hutchinson probes: the seed's own key
====================  ==========================================================================
"""

from __future__ import annotations

import jax

__all__ = ["STREAMS", "stream_key"]

STREAMS: dict[str, int | None] = {
    "init": 1,
    "data": 2,
    "eval": 3,
    "generate": 4,
    "nll": 5,
    "reflow": 6,
    "few_step": 7,
    "bits_per_dim": None,
}
"""Stream name -> the number folded into the seed's key (None: the seed's key itself)."""


def stream_key(seed: int, name: str) -> jax.Array:
    """The key of the random stream ``name`` (``STREAMS``) for ``seed``.

    >>> import jax
    >>> bool((stream_key(0, "data") == jax.random.fold_in(jax.random.PRNGKey(0), 2)).all())
    True
    """
    key = jax.random.PRNGKey(seed)
    number = STREAMS[name]
    return key if number is None else jax.random.fold_in(key, number)
