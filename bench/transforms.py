"""Element-wise transforms on one large tensor, as multiples of copying that tensor.

A transform reads a tensor and writes one of the same size, so a copy (``clone()`` on
CPU, a device-to-device copy on a GPU) is the floor it is measured against. Three
implementations run side by side where they exist:

- ``rockq``: :mod:`transform_core` as shipped (fast paths on);
- ``chain``: the same functions with :func:`transform_core.kernels.fast_paths` off, the
  plain whole-tensor chains of tensor operations;
- ``rockpool``: the reference implementation, ``rockpool.transform.torch_transform``;
- ``before``: ``transform_core/quantise.py`` at an earlier git revision (``--before REV``).
"""

from __future__ import annotations

import contextlib
import subprocess
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from bench.timing import Timing, measure
from transform_core import cuda_kernels, kernels, quantise

Transform = Callable[[torch.Tensor], torch.Tensor]

#: Targets, as the largest ratio to the baseline that ``rockq`` may reach.
CPU_TARGETS = {
    "stochastic_rounding": 3.0,
    "deterministic_rounding": 1.5,
    "int_quant": 1.5,
    "t_decay": 2.0,
    "dropout": 2.0,
}
CHANNEL_TARGET = 1.2
GPU_TARGETS = {
    "stochastic_rounding": 1.5,
    "deterministic_rounding": 1.5,
    "stochastic_channel_rounding": 2.0,
}


def reference() -> ModuleType | None:
    """Rockpool's ``torch_transform`` module, or ``None`` when Rockpool is not installed."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import rockpool.transform.torch_transform as torch_transform
    except Exception:  # an absent or broken optional install both mean: no reference
        return None
    return torch_transform  # type: ignore[no-any-return]


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    # The reference warns on every call in some versions; the bench output stays readable.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _transforms(module: Any, generator: torch.Generator | None) -> dict[str, Transform]:
    """Each transform with the arguments of the benchmark (the reference takes no generator)."""
    extra = {} if generator is None else {"generator": generator}
    return {
        "stochastic_rounding": lambda x: module.stochastic_rounding(x, num_levels=256, **extra),
        # With the input range given: one pass over the data instead of two.
        "stochastic_rounding_given_range": lambda x: module.stochastic_rounding(
            x, [-4.0, 4.0], num_levels=256, **extra
        ),
        "deterministic_rounding": lambda x: module.deterministic_rounding(x, num_levels=256),
        "int_quant": lambda x: module.int_quant(x, n_bits=8),
        "t_decay": lambda x: module.t_decay(x, dt=1e-3),
        "dropout": lambda x: module.dropout(x, dropout_prob=0.5, **extra),
        "stochastic_channel_rounding": lambda x: module.stochastic_channel_rounding(
            x, [-1.0, 1.0], num_levels=256, **extra
        ),
    }


def _without_fast_paths(fn: Transform) -> Transform:
    def run(x: torch.Tensor) -> torch.Tensor:
        with kernels.fast_paths(False):
            return fn(x)

    return run


def _with_fresh_outputs(fn: Transform) -> Transform:
    """As shipped, but every result in newly allocated memory (no storage reuse)."""

    def run(x: torch.Tensor) -> torch.Tensor:
        kept = kernels.OUTPUT_CACHE_BYTES
        kernels.OUTPUT_CACHE_BYTES = 0
        try:
            return fn(x)
        finally:
            kernels.OUTPUT_CACHE_BYTES = kept

    return run


def _without_compiled_kernels(fn: Transform) -> Transform:
    def run(x: torch.Tensor) -> torch.Tensor:
        with kernels.compiled(False):
            return fn(x)

    return run


#: ``transform_core/quantise.py`` of an earlier revision, set by ``--before``.
BEFORE: ModuleType | None = None


def load_before(revision: str) -> ModuleType:
    """Import ``transform_core/quantise.py`` as it was at a git ``revision``."""
    source = subprocess.run(
        ["git", "show", f"{revision}:transform_core/quantise.py"],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
    ).stdout
    module = ModuleType(f"quantise_at_{revision}")
    exec(compile(source, f"{revision}:transform_core/quantise.py", "exec"), module.__dict__)
    return module


def implementations(
    device: torch.device, *, with_reference: bool
) -> dict[str, dict[str, Transform]]:
    """Implementation name -> transform name -> function, for tensors on ``device``."""
    generator = torch.Generator(device=device).manual_seed(0)
    ours = _transforms(quantise, generator)
    impls = {
        "rockq": ours,
        "fresh": {k: _with_fresh_outputs(f) for k, f in ours.items()},
        "blocks": {k: _without_compiled_kernels(f) for k, f in ours.items()},
        "chain": {k: _without_fast_paths(f) for k, f in ours.items()},
    }
    if BEFORE is not None:
        impls["before"] = _transforms(BEFORE, generator)
    ref = reference() if with_reference else None
    if ref is not None:
        torch.manual_seed(0)
        impls["rockpool"] = {
            name: (lambda f: lambda x: _call_quietly(f, x))(fn)
            for name, fn in _transforms(ref, None).items()
        }
    return impls


def _call_quietly(fn: Transform, x: torch.Tensor) -> torch.Tensor:
    with _quiet():
        return fn(x)


def _row(
    group: str,
    case: str,
    shape: list[int],
    device: torch.device,
    baseline: str,
    base: Timing,
    timings: dict[str, Timing],
    target: float | None,
) -> dict[str, Any]:
    impls = {name: {**t.to_dict(), "ratio": t.median / base.median} for name, t in timings.items()}
    ratio = impls.get("rockq", {}).get("ratio")
    return {
        "group": group,
        "case": case,
        "shape": shape,
        "device": str(device),
        "baseline": baseline,
        "baseline_ms": base.median * 1e3,
        "impls": impls,
        "target": target,
        "meets": None if target is None or ratio is None else bool(ratio <= target),
    }


def _bind(fn: Transform, x: torch.Tensor) -> Callable[[], object]:
    return lambda: fn(x)


def _input_for(name: str, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    generator = torch.Generator(device=device).manual_seed(1)
    if name == "t_decay":
        # Decay factors exp(-dt / tau) of neurons with tau between 1 and 100 time steps.
        tau = 1.0 + 99.0 * torch.rand(shape, generator=generator, device=device)
        return torch.exp(-1.0 / tau)
    return torch.randn(shape, generator=generator, device=device)


def element_wise(
    names: list[str],
    targets: dict[str, float],
    *,
    group: str,
    shape: tuple[int, ...],
    device: torch.device,
    repeats: int,
    warmup: int,
    inner: int | None,
    with_reference: bool,
    baseline: str,
) -> list[dict[str, Any]]:
    """One row per transform: each implementation's time over a copy of the same tensor."""
    impls = implementations(device, with_reference=with_reference)
    rows = []
    for name in names:
        x = _input_for(name, shape, device)
        cases: dict[str, Callable[[], object]] = {"copy": x.clone}
        failed: dict[str, str] = {}
        for impl, fns in impls.items():
            try:
                fns[name](x)
            except Exception as error:  # the reference does not run everywhere (CUDA)
                failed[impl] = f"{type(error).__name__}: {error}".splitlines()[0][:200]
                continue
            cases[impl] = _bind(fns[name], x)
        timings = measure(cases, repeats=repeats, warmup=warmup, device=device, inner=inner)
        base = timings.pop("copy")
        row = _row(group, name, list(shape), device, baseline, base, timings, targets.get(name))
        if failed:
            row["failed"] = failed
        rows.append(row)
        del x, cases
    return rows


def gpu_passes(
    *, size: int, device: torch.device, repeats: int, warmup: int
) -> list[dict[str, Any]]:
    """Stochastic rounding with the data's range, pass by pass, each over a device copy.

    The range is one read of the tensor and the rounding a read and a write, so the two
    passes together cannot take less than a read-only pass plus a copy. The read-only
    pass here is ``torch.amax``; the two passes are the ones ``stochastic_rounding`` runs.
    """
    x = _input_for("stochastic_rounding", (size,), device)
    generator = torch.Generator(device=device).manual_seed(0)
    ends = cuda_kernels.data_ends(x)
    if ends is None:
        return []

    def rounding() -> object:
        return cuda_kernels.round_in_data_range(
            x,
            ends,
            channel_dim=None,
            steps=255,
            symmetric=True,
            output_range=None,
            zero_level=None,
            fallback_level=0.0,
            stochastic=True,
            generator=generator,
        )

    cases: dict[str, Callable[[], object]] = {
        "copy": x.clone,
        "read-only pass (torch.amax)": lambda: torch.amax(x),
        "range pass (data_ends)": lambda: cuda_kernels.data_ends(x),
        "rounding pass, range given as a table": rounding,
        "stochastic_rounding (both passes)": lambda: quantise.stochastic_rounding(
            x, num_levels=256, generator=generator
        ),
    }
    timings = measure(cases, repeats=repeats, warmup=warmup, device=device, inner=None)
    base = timings.pop("copy")
    return [
        _row("gpu-passes", case, [size], device, "device copy (clone())", base, {"rockq": t}, None)
        for case, t in timings.items()
    ]


#: A convolution weight (out, in, 3, 3): along dim 1, the default, each channel is runs of
#: nine values, one per output channel.
CONV_WEIGHT = (256, 128, 3, 3)


def channel(
    *,
    side: int,
    device: torch.device,
    repeats: int,
    warmup: int,
    with_reference: bool,
    conv: tuple[int, ...] = CONV_WEIGHT,
) -> list[dict[str, Any]]:
    """Channel rounding over stochastic rounding of the same tensor, for each implementation.

    Two tensors: a square matrix (the target's case) and a convolution weight ``conv``
    along its input channels (no target; several calls per sample, as it is small).
    """
    impls = implementations(device, with_reference=with_reference)
    rows = []
    cases_by_shape = (
        ("stochastic_channel_rounding", (side, side), CHANNEL_TARGET, 1),
        ("conv_weight_channel_rounding", conv, None, None),
    )
    for case, shape, target, inner in cases_by_shape:
        x = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(device)
        cases: dict[str, Callable[[], object]] = {}
        for impl, fns in impls.items():
            cases[f"{impl}:base"] = _bind(fns["stochastic_rounding"], x)
            cases[impl] = _bind(fns["stochastic_channel_rounding"], x)
        timings = measure(cases, repeats=repeats, warmup=warmup, device=device, inner=inner)
        impls_out = {}
        for impl in impls:
            t, base = timings[impl], timings[f"{impl}:base"]
            impls_out[impl] = {**t.to_dict(), "ratio": t.median / base.median}
        ratio = impls_out["rockq"]["ratio"]
        rows.append(
            {
                "group": "channel",
                "case": case,
                "shape": list(shape),
                "device": str(device),
                "baseline": "stochastic_rounding (same implementation)",
                "baseline_ms": timings["rockq:base"].median * 1e3,
                "impls": impls_out,
                "target": target,
                "meets": None if target is None else bool(ratio <= target),
            }
        )
    return rows
