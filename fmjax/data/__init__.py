"""Data: 2D toy samplers (``fmjax.data.toy``) and image datasets via tfds (``fmjax.data.tfds_sources``)."""

from fmjax.data.toy import TOY_LOG_DENSITIES, TOY_SAMPLERS, log_density, sample

__all__ = ["TOY_SAMPLERS", "TOY_LOG_DENSITIES", "sample", "log_density"]
