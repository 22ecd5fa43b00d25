"""Run the benchmark groups, print a table of ratios and optionally write them as JSON.

Usage, from the repository root::

    python -m bench                      # CPU transforms, channel rounding, training, GPU
    python -m bench --quick              # a small smoke run (seconds)
    python -m bench --groups gpu --json gpu.json
    python -m bench --groups memory      # peak memory of `rockq quantize` (1 GiB, 4 GiB files)

Every figure is a ratio measured side by side in the same run: a transform's time over a
copy of the same tensor, channel rounding over stochastic rounding of the same matrix
(and of a convolution weight), a patched training step over the unpatched one, ``rockq
quantize``'s peak memory over a plain safetensors read and write. Timings are medians of
the counted rounds, after warm-up rounds. Columns are implementations: ``rockq`` (as
shipped, with the compiled CPU kernels loaded before timing starts; a repeated call
reuses the storage of its previous result once that is unused, see
``kernels.output_like``), ``fresh`` (the same with every result in newly allocated
memory, as ``clone()`` gets), ``blocks`` (without the compiled kernels: the tensor
chains cut into blocks, as before they load or without Numba), ``chain`` (fast paths
off), ``before`` (``--before REV``: quantise.py at a git revision) and ``rockpool`` (the
reference, when installed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

import torch

GROUPS = ("transforms", "channel", "training", "gpu", "memory")
DEFAULT_GROUPS = ("transforms", "channel", "training", "gpu")
IMPLS = ("rockq", "fresh", "blocks", "chain", "before", "rockpool")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--groups",
        default=",".join(DEFAULT_GROUPS),
        help=f"comma-separated groups, or 'all' ({', '.join(GROUPS)}); default: all but memory",
    )
    p.add_argument("--quick", action="store_true", help="small sizes and few rounds (a smoke run)")
    p.add_argument("--size", type=int, help="elements of the CPU transform tensor (default 2**24)")
    p.add_argument("--matrix", type=int, help="side of the channel-rounding matrix (default 4096)")
    p.add_argument("--gpu-size", type=int, help="elements of the GPU tensor (default 2**26)")
    p.add_argument("--repeats", type=int, help="counted rounds (default 7; training 10)")
    p.add_argument("--warmup", type=int, help="uncounted rounds first (default 2)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own)")
    p.add_argument("--memory-mb", type=int, help="network size for memory (default 1024)")
    p.add_argument("--tensor-file-mb", type=int, help="tensor file for memory (default 4096)")
    p.add_argument("--no-reference", action="store_true", help="leave Rockpool out")
    p.add_argument(
        "--before",
        metavar="REV",
        help="also time transform_core/quantise.py as of this git revision (column 'before')",
    )
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the results here")
    return p


def _groups(text: str) -> list[str]:
    names = list(GROUPS) if text == "all" else [g.strip() for g in text.split(",") if g.strip()]
    unknown = [g for g in names if g not in GROUPS]
    if unknown:
        raise SystemExit(f"unknown group(s) {unknown}; choose from {', '.join(GROUPS)} or 'all'")
    return names


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
    from transform_core import kernels

    info["compiled_kernels"] = kernels.compiled_kernels() is not None
    try:
        import numba

        info["numba"] = numba.__version__
    except ImportError:
        info["numba"] = None
    from importlib.metadata import PackageNotFoundError, version

    # Versions from the installed metadata: importing these costs time (and Triton, once
    # imported, keeps its mode for the whole process).
    for package in ("rockpool", "triton"):
        try:
            info[package] = version(package)
        except PackageNotFoundError:
            info[package] = None
    return info


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the chosen groups; returns the JSON document."""
    from bench import memory, training, transforms
    from transform_core import kernels

    if args.threads:
        torch.set_num_threads(args.threads)
    # Steady state: a long run loads the compiled kernels early (see kernels.LOAD_AFTER_SECONDS).
    kernels.wait_for_compiled_kernels()
    if args.before:
        transforms.BEFORE = transforms.load_before(args.before)
    quick = args.quick
    ref = not args.no_reference
    repeats = args.repeats or (3 if quick else 7)
    warmup = args.warmup if args.warmup is not None else (1 if quick else 2)
    cpu = torch.device("cpu")
    rows: list[dict[str, Any]] = []
    skipped: dict[str, str] = {}
    for group in _groups(args.groups):
        if group == "transforms":
            size = args.size or (2**16 if quick else 2**24)
            rows += transforms.element_wise(
                list(transforms.CPU_TARGETS),
                transforms.CPU_TARGETS,
                group="transforms",
                shape=(size,),
                device=cpu,
                repeats=repeats,
                warmup=warmup,
                inner=1,
                with_reference=ref,
                baseline="clone()",
            )
        elif group == "channel":
            side = args.matrix or (256 if quick else 4096)
            conv = (16, 8, 3, 3) if quick else transforms.CONV_WEIGHT
            rows += transforms.channel(
                side=side,
                device=cpu,
                repeats=repeats,
                warmup=warmup,
                with_reference=ref,
                conv=conv,
            )
        elif group == "training":
            t_repeats = args.repeats or (2 if quick else 10)
            width, depth, batch = (64, 2, 16) if quick else (1024, 4, 256)
            rows.append(
                training.mlp(
                    width=width, depth=depth, batch=batch, repeats=t_repeats, warmup=warmup
                )
            )
            if ref:
                snn = training.snn(
                    inputs=16 if quick else 64,
                    hidden=32 if quick else 256,
                    batch=4 if quick else 32,
                    steps=5 if quick else 100,
                    repeats=t_repeats,
                    warmup=warmup,
                )
                if snn is not None:
                    rows.append(snn)
                else:
                    skipped["training:rockpool_snn"] = "Rockpool is not installed"
        elif group == "gpu":
            if not torch.cuda.is_available():
                skipped["gpu"] = "no CUDA device"
                continue
            gpu = torch.device("cuda")
            size = args.gpu_size or (2**16 if quick else 2**26)
            names = [*transforms.GPU_TARGETS, "stochastic_rounding_given_range"]
            flat = [n for n in names if n != "stochastic_channel_rounding"]
            common: dict[str, Any] = dict(
                device=gpu,
                repeats=repeats,
                warmup=warmup,
                inner=None,
                with_reference=ref,
                baseline="device copy (clone())",
            )
            rows += transforms.element_wise(
                flat, transforms.GPU_TARGETS, group="gpu", shape=(size,), **common
            )
            side = int(size**0.5)
            rows += transforms.element_wise(
                ["stochastic_channel_rounding"],
                transforms.GPU_TARGETS,
                group="gpu",
                shape=(side, side),
                **common,
            )
            rows += transforms.gpu_passes(size=size, device=gpu, repeats=repeats, warmup=warmup)
            # Small tensors: the GPU idles, and each call costs what the host spends on it.
            rows += transforms.element_wise(
                flat, {}, group="gpu-host", shape=(4096,), **{**common, "with_reference": False}
            )
        elif group == "memory":
            rows.append(memory.quantize_network(args.memory_mb or (8 if quick else 1024)))
            rows.extend(
                memory.quantize_tensors(
                    args.tensor_file_mb or (8 if quick else 4096), repeats=1 if quick else 5
                )
            )
    return {
        "schema": 1,
        "machine": machine(),
        "options": {
            "groups": _groups(args.groups),
            "quick": quick,
            "repeats": repeats,
            "warmup": warmup,
            "reference": ref,
            "before": args.before,
        },
        "rows": rows,
        "skipped": skipped,
    }


def _shape(shape: Any) -> str:
    if isinstance(shape, dict):
        return ",".join(f"{k}={v}" for k, v in shape.items())
    return "x".join(str(n) for n in shape)


def table(doc: dict[str, Any]) -> str:
    """The results as an aligned text table, one row per case."""
    shown = [i for i in IMPLS if any(i in row["impls"] for row in doc["rows"]) or i == "rockq"]
    header = ["group", "case", "shape", "baseline", "base ms", *shown, "target", "ok"]
    lines = [header]
    for row in doc["rows"]:
        ratios = [f"{row['impls'][i]['ratio']:.2f}x" if i in row["impls"] else "-" for i in shown]
        target = "-" if row["target"] is None else f"<= {row['target']}x"
        # The targets are for the full sizes: a smoke run's small tensors are not judged.
        meets = None if doc.get("options", {}).get("quick") else row["meets"]
        ok = {True: "yes", False: "MISS", None: "-"}[meets]
        lines.append(
            [
                row["group"],
                row["case"],
                _shape(row["shape"]),
                row["baseline"],
                f"{row['baseline_ms']:.2f}",
                *ratios,
                target,
                ok,
            ]
        )
    widths = [max(len(line[c]) for line in lines) for c in range(len(header))]
    text = [
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
        for line in lines
    ]
    text.insert(1, "  ".join("-" * w for w in widths))
    m = doc["machine"]
    text.append("")
    text.append(
        f"machine: {m['cpu']}, {m['torch_threads']} torch threads, torch {m['torch']}"
        + (f", GPU {m['gpu']}" if m["gpu"] else "")
        + (f", rockpool {m['rockpool']}" if m["rockpool"] else ", no rockpool")
    )
    for name, why in doc["skipped"].items():
        text.append(f"skipped {name}: {why}")
    return "\n".join(text)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m bench``; returns the exit status (0)."""
    args = _parser().parse_args(argv)
    doc = run(args)
    print(table(doc))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"wrote {args.json}")
    sys.stdout.flush()
    return 0
