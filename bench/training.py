"""Training with transforms in the forward pass, over the same step unpatched.

A step is forward, loss, backward and an optimiser step. The patched network runs
stochastic rounding on every weight in each forward pass; the ratio is its step time
over the unpatched network's. Cases run side by side, each with its own copy of the
network and its own optimiser.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import transform_core as tt
from bench.timing import measure
from bench.transforms import reference
from transform_core import kernels

MLP_TARGET = 1.15
SNN_TARGET = 1.05


def _step_fn(
    net: nn.Module,
    x: torch.Tensor,
    target: torch.Tensor,
    *,
    fast: bool = True,
    compiled: bool = True,
) -> Callable[[], object]:
    params = list(nn.Module.parameters(net))  # Rockpool modules override .parameters()
    optimiser = torch.optim.SGD(params, lr=1e-4)

    def step() -> None:
        with kernels.fast_paths(fast), kernels.compiled(compiled):
            optimiser.zero_grad(set_to_none=True)
            out = net(x)
            if isinstance(out, tuple):  # Rockpool: (output, state, record)
                out = out[0]
            loss = torch.nn.functional.mse_loss(out, target)
            loss.backward()  # type: ignore[no-untyped-call]
            optimiser.step()

    return step


def _rounding(w: torch.Tensor) -> torch.Tensor:
    return tt.stochastic_rounding(w, num_levels=256)


def _row(
    case: str, shape: dict[str, int], timings: dict[str, Any], target: float
) -> dict[str, Any]:
    base = timings.pop("unpatched")
    impls = {name: {**t.to_dict(), "ratio": t.median / base.median} for name, t in timings.items()}
    return {
        "group": "training",
        "case": case,
        "shape": shape,
        "device": "cpu",
        "baseline": "unpatched step",
        "baseline_ms": base.median * 1e3,
        "impls": impls,
        "target": target,
        "meets": bool(impls["rockq"]["ratio"] <= target),
    }


def mlp(*, width: int, depth: int, batch: int, repeats: int, warmup: int) -> dict[str, Any]:
    """An MLP of ``depth`` square layers, stochastic rounding on all weights."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    net = nn.Sequential(*layers)
    x, target = torch.randn(batch, width), torch.randn(batch, width)
    patched = tt.make_param_T_network(net, tt.make_param_T_config(net, _rounding, "weights"))
    cases = {
        "unpatched": _step_fn(copy.deepcopy(net), x, target),
        "rockq": _step_fn(patched, x, target),
        "blocks": _step_fn(copy.deepcopy(patched), x, target, compiled=False),
        "chain": _step_fn(copy.deepcopy(patched), x, target, fast=False),
    }
    timings = measure(cases, repeats=repeats, warmup=warmup)
    return _row("mlp", {"width": width, "depth": depth, "batch": batch}, timings, MLP_TARGET)


def snn(
    *, inputs: int, hidden: int, batch: int, steps: int, repeats: int, warmup: int
) -> dict[str, Any] | None:
    """A Rockpool LIF network over ``steps`` time steps; ``None`` without Rockpool."""
    ref = reference()
    if ref is None:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from rockpool.nn.combinators import Sequential
        from rockpool.nn.modules import LIFTorch, LinearTorch

        torch.manual_seed(0)
        net = Sequential(
            LinearTorch((inputs, hidden)), LIFTorch(hidden), LinearTorch((hidden, 10)), LIFTorch(10)
        )
        ours = tt.make_param_T_network(net, tt.make_param_T_config(net, _rounding, "weights"))

        def theirs_fn(w: torch.Tensor) -> torch.Tensor:
            return ref.stochastic_rounding(w, num_levels=256)  # type: ignore[no-any-return]

        theirs = ref.make_param_T_network(
            copy.deepcopy(net), ref.make_param_T_config(net, theirs_fn, "weights")
        )
    x = (torch.rand(batch, steps, inputs, generator=torch.Generator().manual_seed(1)) < 0.1).float()
    target = torch.full((batch, steps, 10), 0.1)
    cases = {
        "unpatched": _step_fn(copy.deepcopy(net), x, target),
        "rockq": _step_fn(ours, x, target),
        "blocks": _step_fn(copy.deepcopy(ours), x, target, compiled=False),
        "chain": _step_fn(copy.deepcopy(ours), x, target, fast=False),
        "rockpool": _step_fn(theirs, x, target),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        timings = measure(cases, repeats=repeats, warmup=warmup)
    shape = {"inputs": inputs, "hidden": hidden, "batch": batch, "time_steps": steps}
    return _row("rockpool_snn", shape, timings, SNN_TARGET)
