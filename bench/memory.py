"""Peak memory of ``rockq quantize``, over a plain safetensors read and write of the same file.

Each command runs in a child of a fresh wrapper process, which reports the child's peak
resident set size (``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss``): a wrapper per
measurement, because that figure is the largest over all of a process's children.

Two cases:

- ``quantize_network``: a state dict of an MLP (built by :func:`mlp`, through ``--arch``)
  quantised with the ``int8`` recipe;
- ``quantize_tensors``: a bare safetensors file quantised tensor by tensor, for its peak
  memory and its wall time, over a plain copy and over a plain copy that also waits for
  the disk (``fsync``), as rockq does before it reports success.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

ROOT = Path(__file__).resolve().parents[1]

_WRAPPER = """
import json, resource, subprocess, sys, time
start = time.perf_counter()
done = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(json.dumps({"rc": done.returncode, "peak_kib": peak,
                  "seconds": time.perf_counter() - start, "stderr": done.stderr[-2000:]}))
"""

TENSOR_TIME_TARGET = 1.5
"""Tensor mode's wall time, as a multiple of a plain safetensors read and write."""

_PLAIN_COPY = (
    "import sys; from safetensors.torch import load_file, save_file; "
    "save_file(load_file(sys.argv[1]), sys.argv[2])"
)
_DURABLE_COPY = (
    _PLAIN_COPY + "; import os; fd = os.open(sys.argv[2], os.O_RDONLY); os.fsync(fd); os.close(fd)"
)
"""The plain copy, and then ``fsync``: the same guarantee as rockq's output, on disk."""


def mlp(width: int = 4096, depth: int = 16) -> nn.Module:
    """An MLP of ``depth`` square ``Linear`` layers: about ``4 * depth * width**2`` bytes."""
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers)


def _peak(cmd: list[str]) -> dict[str, Any]:
    # Each command starts with nothing left for the disk to write: a plain copy leaves its
    # file in the page cache, and its write-back would otherwise run into the next
    # measurement. Not timed.
    if hasattr(os, "sync"):
        os.sync()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    done = subprocess.run(
        [sys.executable, "-c", _WRAPPER, *cmd], capture_output=True, text=True, env=env, cwd=ROOT
    )
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    if result["rc"] != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {result['stderr']}")
    return result


def _rockq() -> list[str]:
    found = shutil.which("rockq", path=str(Path(sys.executable).parent)) or shutil.which("rockq")
    return [found] if found else [sys.executable, "-m", "cli.main"]


def _write_tensors(path: Path, megabytes: int) -> int:
    """Square float32 matrices of 16 MiB (or smaller for tiny files), named like weights,
    with their biases; returns the largest tensor's size in bytes."""
    side = 2048 if megabytes >= 16 else 256
    count = max(1, megabytes * 2**20 // (4 * side * side))
    generator = torch.Generator().manual_seed(0)
    tensors = {
        f"layer{i}.weight": torch.randn(side, side, generator=generator) for i in range(count)
    }
    tensors.update({f"layer{i}.bias": torch.zeros(side) for i in range(count)})
    save_file(tensors, str(path))
    return 4 * side * side


def _row(
    case: str, shape: dict[str, Any], plain: dict[str, Any], ours: dict[str, Any]
) -> dict[str, Any]:
    ratio = ours["peak_kib"] / plain["peak_kib"]
    return {
        "group": "memory",
        "case": case,
        "shape": shape,
        "device": "cpu",
        "baseline": "safetensors load_file + save_file (peak RSS)",
        "baseline_ms": plain["seconds"] * 1e3,
        "baseline_peak_mib": plain["peak_kib"] / 1024,
        "impls": {
            "rockq": {
                "peak_mib": ours["peak_kib"] / 1024,
                "median_ms": ours["seconds"] * 1e3,
                "ratio": ratio,
            }
        },
        "target": None,
        "meets": None,
    }


def quantize_network(megabytes: int) -> dict[str, Any]:
    """``rockq quantize`` of an MLP state dict of about ``megabytes`` MiB, through ``--arch``."""
    width = 4096 if megabytes >= 64 else 512
    depth = max(1, round(megabytes * 2**20 / (4 * width * width)))
    with tempfile.TemporaryDirectory(prefix="rockq-bench-") as tmp:
        src, out, copy = (
            Path(tmp, "net.safetensors"),
            Path(tmp, "q.safetensors"),
            Path(tmp, "c.safetensors"),
        )
        save_file({k: v.contiguous() for k, v in mlp(width, depth).state_dict().items()}, str(src))
        plain = _peak([sys.executable, "-c", _PLAIN_COPY, str(src), str(copy)])
        arch = [
            "--arch",
            "bench.memory:mlp",
            "--arch-kwargs",
            json.dumps({"width": width, "depth": depth}),
        ]
        ours = _peak([*_rockq(), "quantize", str(src), "int8", "-o", str(out), "-q", *arch])
    return _row(
        "quantize_network", {"megabytes": megabytes, "width": width, "depth": depth}, plain, ours
    )


def quantize_tensors(megabytes: int, repeats: int = 1) -> list[dict[str, Any]]:
    """Tensor-mode ``rockq quantize`` of a bare safetensors file of about ``megabytes`` MiB.

    Three rows: peak memory (with ``limit_mib``, three times the largest tensor plus 500 MB,
    the target), wall time over the plain read and write (the target's baseline), and wall
    time over the plain copy with an ``fsync`` at its end (no target: it shows what waiting
    for the disk costs). Times are medians of ``repeats`` runs of each, taken in turn, so
    that all sides see the same state of the machine.
    """
    plains: list[dict[str, Any]] = []
    durables: list[dict[str, Any]] = []
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="rockq-bench-") as tmp:
        src, out, copy = (
            Path(tmp, "t.safetensors"),
            Path(tmp, "q.safetensors"),
            Path(tmp, "c.safetensors"),
        )
        largest = _write_tensors(src, megabytes)
        for _ in range(repeats):
            for script, results in ((_PLAIN_COPY, plains), (_DURABLE_COPY, durables)):
                results.append(_peak([sys.executable, "-c", script, str(src), str(copy)]))
                copy.unlink()
            runs.append(_peak([*_rockq(), "quantize", str(src), "int8", "-o", str(out), "-q"]))
            for path in Path(tmp).glob("q.*"):
                path.unlink()
    shape = {"megabytes": megabytes, "largest_mib": largest / 2**20, "repeats": repeats}
    plain = max(plains, key=lambda r: r["peak_kib"])
    ours = max(runs, key=lambda r: r["peak_kib"])
    memory = _row("quantize_tensors", shape, plain, ours)
    # The target is absolute, not a ratio: the row's ratio stays peak over the plain copy's.
    memory["limit_mib"] = (3 * largest + 500e6) / 2**20
    timing = _time_row("quantize_tensors_time", shape, "", plains, runs, TENSOR_TIME_TARGET)
    durable = _time_row("quantize_tensors_time_durable", shape, " + fsync", durables, runs, None)
    return [memory, timing, durable]


def _time_row(
    case: str,
    shape: dict[str, Any],
    extra: str,
    baselines: list[dict[str, Any]],
    runs: list[dict[str, Any]],
    target: float | None,
) -> dict[str, Any]:
    base_s = statistics.median(r["seconds"] for r in baselines)
    ours_s = statistics.median(r["seconds"] for r in runs)
    return {
        "group": "memory",
        "case": case,
        "shape": shape,
        "device": "cpu",
        "baseline": f"safetensors load_file + save_file{extra} (wall time)",
        "baseline_ms": base_s * 1e3,
        "impls": {
            "rockq": {
                "median_ms": ours_s * 1e3,
                "ratio": ours_s / base_s,
                # Each run over the baseline's run just before it: how far the machine moved.
                "pair_ratios": [
                    o["seconds"] / b["seconds"] for b, o in zip(baselines, runs, strict=True)
                ],
            }
        },
        "target": target,
        "meets": None if target is None else ours_s / base_s <= target,
    }
