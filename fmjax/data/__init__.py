"""Data: 2D toy samplers (``fmjax.data.toy``), image datasets via tfds (``fmjax.data.tfds_sources``),
Earth event datasets on the sphere (``fmjax.data.earth``) and stored (x0, x1) pairs for reflow
(``fmjax.data.pairs``)."""

from fmjax.data.pairs import PairSource, load_pairs, save_pairs
from fmjax.data.toy import TOY_LOG_DENSITIES, TOY_SAMPLERS, log_density, sample

__all__ = [
    "TOY_SAMPLERS",
    "TOY_LOG_DENSITIES",
    "sample",
    "log_density",
    "PairSource",
    "save_pairs",
    "load_pairs",
]
