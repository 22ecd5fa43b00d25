"""rockq benchmarks: speed and memory as ratios measured side by side in one run.

Run ``python -m bench --help`` from the repository root; :mod:`bench.run` describes the
groups and the columns. Figures from a full run are kept in ``bench/RESULTS.md``.
"""
