"""Benchmark: digits MLP accuracy, float vs post-training vs fine-tuned, 4-bit and ternary.

Runs ``examples/digits.py`` at full size and checks the quality targets: after fine-tuning,
ternary within 2 points of float accuracy and 4-bit within 0.5 points. Not a test (it takes
a few minutes on 2 cores); run it from the repository root::

    python bench/finetune_digits.py

Exit status 0 when both targets hold, 1 otherwise.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from examples.digits import main

TARGETS = {"4-bit": 0.5, "ternary": 2.0}
"""Largest allowed drop from float accuracy after fine-tuning, in points."""


def bench() -> int:
    start = time.perf_counter()
    results = main(sys.argv[1:])
    elapsed = time.perf_counter() - start
    ok = True
    for name, limit in TARGETS.items():
        acc = results[name]
        drop = acc["float"] - acc["finetuned"]
        good = drop <= limit
        ok &= good
        print(
            f"{name:<8} drop after fine-tuning {drop:+.2f} points (target <= {limit}): "
            f"{'ok' if good else 'MISSED'}; post-training drop {acc['float'] - acc['post_training']:+.2f}"
        )
    print(f"total {elapsed:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(bench())
