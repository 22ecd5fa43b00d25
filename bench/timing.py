"""Side-by-side timing: every case of a group is measured in the same rounds.

Each round runs every case once, in an order shuffled from round to round (from a fixed
seed), so a burst of load from elsewhere on the machine hits all cases alike rather than
one of them, and no case always follows the same other one: after a slow case that
keeps the host busy, a GPU has clocked down for whatever comes next. The figures are
medians over rounds, after warm-up rounds that are not counted.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch


@dataclass
class Timing:
    """Seconds per call of one case: median and minimum over the counted rounds."""

    median: float
    minimum: float
    rounds: int

    def to_dict(self) -> dict[str, float | int]:
        return {"median_ms": self.median * 1e3, "min_ms": self.minimum * 1e3, "rounds": self.rounds}


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so that a wall-clock interval covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    cases: Mapping[str, Callable[[], object]],
    *,
    repeats: int,
    warmup: int,
    device: torch.device | None = None,
    inner: int | None = 1,
) -> dict[str, Timing]:
    """Time each case side by side.

    Args:
        cases: Name -> function to time (its result is dropped).
        repeats: Counted rounds.
        warmup: Rounds run first and not counted (allocator, caches, kernel compilation).
        device: Synchronised around each sample when it is a GPU.
        inner: Calls per sample, for calls too short to time one by one; ``None`` picks
            it for each case after warm-up, for samples of about 10 ms (at most 50 calls).

    Returns:
        Name -> :class:`Timing` of one call.
    """
    device = device or torch.device("cpu")
    names = list(cases)
    samples: dict[str, list[float]] = {name: [] for name in names}
    calls = dict.fromkeys(names, inner or 1)
    order = random.Random(0)
    for round_index in range(warmup + repeats):
        for name in order.sample(names, len(names)):
            fn = cases[name]
            synchronize(device)
            start = time.perf_counter()
            for _ in range(calls[name]):
                fn()
            synchronize(device)
            elapsed = (time.perf_counter() - start) / calls[name]
            if round_index >= warmup:
                samples[name].append(elapsed)
            elif inner is None and round_index == warmup - 1:
                calls[name] = max(1, min(50, int(0.01 / max(elapsed, 1e-9))))
    return {
        name: Timing(statistics.median(values), min(values), len(values))
        for name, values in samples.items()
    }
