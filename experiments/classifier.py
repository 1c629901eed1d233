"""The digits classifier the experiments judge generated digits with: a re-export of
``fmjax.digits_classifier`` (moved into the library, where ``fmjax.digits_classifier.digits_frechet_distance``
uses it), kept so that ``from experiments.classifier import ...`` keeps working.

    python -m experiments.classifier               # trains it and prints its test accuracy
"""

from __future__ import annotations

from fmjax.digits_classifier import (
    FEATURES,
    LEVELS,
    SPACES,
    Classifier,
    classifier_frechet_distance,
    dequantise,
    load_digits,
    to_levels_space,
    train_classifier,
)

__all__ = [
    "FEATURES",
    "LEVELS",
    "SPACES",
    "Classifier",
    "load_digits",
    "dequantise",
    "to_levels_space",
    "train_classifier",
    "classifier_frechet_distance",
]

if __name__ == "__main__":
    trained = train_classifier(seed=0)
    print(f"test accuracy {trained.test_accuracy:.4f} (360 digits), trained in {trained.train_seconds:.1f} s")
