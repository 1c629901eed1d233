"""Image runs' model, evaluation, bits/dim and sampling: moved to ``fmjax.runs.tasks.images``; this name
stays for code written against it."""

from fmjax.runs.tasks.images import (  # noqa: F401
    class_labels_for,
    evaluate_images,
    few_step_frechet,
    generate_images,
    image_bits_per_dim,
    image_shape,
    unet,
)

__all__ = [
    "class_labels_for",
    "evaluate_images",
    "few_step_frechet",
    "generate_images",
    "image_bits_per_dim",
    "image_shape",
    "unet",
]
