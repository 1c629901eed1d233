"""Data: 2D toy samplers (``fmjax.data.toy``)."""

from fmjax.data.toy import TOY_SAMPLERS, sample

__all__ = ["TOY_SAMPLERS", "sample"]
