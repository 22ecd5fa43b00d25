"""The built-in ``xylo`` recipe on a Xylo-shaped Rockpool network: training through the
transforms, burn-in, shared per-neuron scales and the hardware limits."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from transform_core.groups import GroupedTransform
from transform_core.patching import TWrapper
from transform_core.pipeline import burn_in, patch_network, plan_network
from transform_core.recipe import load_recipe
from transform_core.rockpool_support import main_output, reset_state

pytest.importorskip("rockpool")

from rockpool.nn.combinators import Sequential
from rockpool.nn.modules import LIFTorch, LinearTorch

pytestmark = pytest.mark.rockpool

N_IN, N_HIDDEN, N_OUT = 3, 5, 2


def seeded(build: Callable[[], nn.Module], seed: int = 11) -> Any:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def xylo_net() -> Any:
    """Input weights -> recurrent LIF layer -> output weights -> LIF readout."""
    return seeded(
        lambda: Sequential(
            LinearTorch((N_IN, N_HIDDEN)),
            LIFTorch(
                N_HIDDEN,
                has_rec=True,
                leak_mode="bitshifts",
                threshold=torch.full((N_HIDDEN,), 0.8),
            ),
            LinearTorch((N_HIDDEN, N_OUT)),
            LIFTorch(N_OUT, leak_mode="bitshifts"),
        )
    )


def spikes_in(steps: int = 20, batches: int = 2) -> torch.Tensor:
    gen = torch.Generator().manual_seed(3)
    return (
        torch.rand(batches, steps, N_IN, generator=gen) < 0.5
    ).float() * 20.0  # strong enough to fire


def test_the_recipe_states_xylo_limits_and_one_scale_group() -> None:
    recipe = load_recipe("xylo")
    assert recipe.limits == {
        "weights": (True, 8),
        "thresholds": (True, 16),
        "bitshifts": (False, 4),
    }
    (group,) = recipe.scale_groups
    assert (group.name, group.per, group.pair) == ("neuron_inputs", "neuron", "order")
    assert [m.sets_range for m in group.members] == [True, True, False]


def test_plan_pairs_each_layers_weights_with_the_neurons_they_feed() -> None:
    plan = plan_network(xylo_net(), load_recipe("xylo"))
    pairs = [[m.name for m in g.members] for g in plan.groups]
    assert pairs == [
        ["0_LinearTorch.weight", "1_LIFTorch.w_rec", "1_LIFTorch.threshold"],
        ["2_LinearTorch.weight", "3_LIFTorch.threshold"],
    ]
    factors = {m.name: m.factor for g in plan.groups for m in g.members}
    # 16-bit thresholds keep the 8-bit weights' step: (65535 - 1) / (255 - 1).
    assert factors["1_LIFTorch.threshold"] == pytest.approx(65534 / 254)
    assert factors["0_LinearTorch.weight"] == 1.0
    assert plan.to_dict()["scale_groups"][1]["members"][0]["name"] == "2_LinearTorch.weight"


def _raw(net: nn.Module) -> dict[str, torch.Tensor]:
    # Without the wrappers' "_mod" level, so names match the plain network's.
    return {k.replace("._mod", ""): v.detach().clone() for k, v in net.state_dict().items()}


def test_train_through_the_transforms_burn_in_and_meet_every_limit() -> None:
    recipe = load_recipe("xylo")
    net = xylo_net()
    plan = plan_network(net, recipe)
    plan.check()
    T_net = patch_network(net, plan)
    grouped = [
        fn
        for m in nn.Module.modules(T_net)
        if isinstance(m, TWrapper)
        for fn in m.T_config.values()
        if isinstance(fn, GroupedTransform)
    ]
    assert len(grouped) == 5
    before = _raw(T_net)
    optimiser = torch.optim.Adam(nn.Module.parameters(T_net), lr=0.05)
    x = spikes_in()
    target = torch.zeros(2, x.shape[1], N_OUT)
    target[..., 0] = 1.0  # teach output neuron 0 to fire
    losses = []
    for _ in range(4):
        reset_state(T_net)
        optimiser.zero_grad()
        loss = torch.nn.functional.mse_loss(main_output(T_net(x)), target)
        loss.backward()
        optimiser.step()
        losses.append(float(loss.detach()))
    after = _raw(T_net)
    moved = [k for k in before if not torch.equal(before[k], after[k]) and "weight" in k]
    assert "0_LinearTorch.weight" in moved and "2_LinearTorch.weight" in moved
    assert all(torch.isfinite(torch.tensor(losses)))

    # What the patched network computes is what the burned-in network computes.
    reset_state(T_net)
    with torch.no_grad():
        patched_out = main_output(T_net(x))
    raw = _raw(T_net)
    burned, report = burn_in(T_net, plan)
    reset_state(burned)
    with torch.no_grad():
        burned_out = main_output(burned(x))
    assert torch.equal(patched_out, burned_out)

    assert report.limits == recipe.limits
    assert report.ok, [str(v) for v in report.violations]
    state = burned.state_dict()
    for name in ("0_LinearTorch.weight", "1_LIFTorch.w_rec", "2_LinearTorch.weight"):
        values = state[name]
        assert torch.equal(values, values.round()) and values.abs().max() <= 127
    for name in ("1_LIFTorch.dash_mem", "3_LIFTorch.dash_syn"):
        assert set(state[name].flatten().tolist()) <= set(range(16))

    # One factor per neuron: the peak of the weights feeding it, from the trained raw values.
    peak = torch.maximum(
        raw["0_LinearTorch.weight"].abs().amax(0), raw["1_LIFTorch.w_rec"].abs().amax(0)
    )
    scale = 127 / peak
    expected_w = (raw["0_LinearTorch.weight"] * scale).round()
    expected_thr = (raw["1_LIFTorch.threshold"] * scale).round().clamp(-32767, 32767)
    assert (state["0_LinearTorch.weight"] - expected_w).abs().max() <= 1
    assert (state["1_LIFTorch.threshold"] - expected_thr).abs().max() <= 1
    assert state["0_LinearTorch.weight"].abs().amax(0).max() == 127
    out_scale = 127 / raw["2_LinearTorch.weight"].abs().amax(0)
    out_thr = (raw["3_LIFTorch.threshold"] * out_scale).round()
    assert (state["3_LIFTorch.threshold"] - out_thr).abs().max() <= 1
    # Burned-in values load back into the plain network.
    fresh = xylo_net()
    fresh.load_state_dict(state)
    assert torch.equal(fresh.state_dict()["1_LIFTorch.threshold"], state["1_LIFTorch.threshold"])


def test_the_range_follows_the_current_values() -> None:
    net = xylo_net()
    plan = plan_network(net, load_recipe("xylo"))
    T_net = patch_network(net, plan)
    lin = T_net[0]._mod
    lif = T_net[1]._mod
    thr_T = T_net[1].T_config["threshold"]
    first = thr_T(lif.threshold).clone()
    with torch.no_grad():
        lin.weight.mul_(2.0)
        lif.w_rec.mul_(2.0)
    # Twice the weights, half the scale: thresholds map to about half the integers.
    second = thr_T(lif.threshold)
    assert (second - first / 2).abs().max() <= 1
