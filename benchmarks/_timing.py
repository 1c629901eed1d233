"""Interleaved timing: candidates take turns, so drift in machine load hits all of them alike."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def interleaved(
    candidates: dict[str, Callable[[], object]],
    *,
    repeats: int,
    inner: int,
    per_call: dict[str, int] | None = None,
) -> dict[str, float]:
    """Median seconds per unit of work of each candidate; ``inner`` units per timing.

    A unit is one call, or ``per_call[name]`` units for a candidate whose call does that many (a
    scan over several training steps): it is then called ``inner // per_call[name]`` times (at least
    once) and its time divided by the units done. Every candidate is called once first
    (compilation, caches). The callables must block until their work is done
    (``jax.block_until_ready``).
    """
    per_call = per_call or {}
    for fn in candidates.values():
        fn()
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            units = per_call.get(name, 1)
            calls = max(1, inner // units)
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            samples[name].append((time.perf_counter() - start) / (calls * units))
    return {name: statistics.median(values) for name, values in samples.items()}


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    """A GitHub-flavoured markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def relative(peer_seconds: float, fmjax_seconds: float) -> str:
    """A peer's time against fmjax's in words: "2.10x slower" or "1.05x faster"."""
    if peer_seconds >= fmjax_seconds:
        return f"{peer_seconds / fmjax_seconds:.2f}x slower"
    return f"{fmjax_seconds / peer_seconds:.2f}x faster"
